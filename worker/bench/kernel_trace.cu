// Every kernel a process runs, with its start and end on the GPU, for machines without Nsight
// Systems: a CUDA injection library over CUPTI's activity API. Kernels of a CUDA graph are
// recorded one by one (graph nodes), so a graphed decode step shows kernel by kernel.
//
//   nvcc -shared -Xcompiler -fPIC -o kernel_trace.so worker/bench/kernel_trace.cu -lcupti
//   KERNEL_TRACE_CSV=trace.csv CUDA_INJECTION64_PATH=$PWD/kernel_trace.so dsv3-worker bench-cuda ...
//   python3 worker/bench/gpu_trace.py trace.csv
//
// The CSV has the columns `gpu_trace.py` reads from an nsys export: Start (ns), Duration (ns), Name.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {

constexpr size_t BUFFER_BYTES = 8 << 20;
FILE* out = nullptr;
std::mutex out_lock;

void check(CUptiResult r, const char* what) {
    if (r == CUPTI_SUCCESS) return;
    const char* msg = nullptr;
    cuptiGetResultString(r, &msg);
    std::fprintf(stderr, "kernel_trace: %s: %s\n", what, msg ? msg : "unknown CUPTI error");
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, BUFFER_BYTES));
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
    CUpti_Activity* record = nullptr;
    std::lock_guard<std::mutex> guard(out_lock);
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL)
            continue;
        auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(record);
        if (out)
            std::fprintf(out, "%llu,%llu,\"%s\"\n", (unsigned long long)k->start,
                         (unsigned long long)(k->end - k->start), k->name ? k->name : "?");
    }
    size_t dropped = 0;
    cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
    if (dropped) std::fprintf(stderr, "kernel_trace: %zu records dropped\n", dropped);
    std::free(buffer);
}

void flush_at_exit() {
    check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flushing the activity buffers");
    std::lock_guard<std::mutex> guard(out_lock);
    if (out) std::fclose(out);
    out = nullptr;
}

}  // namespace

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
extern "C" int InitializeInjection() {
    const char* path = std::getenv("KERNEL_TRACE_CSV");
    out = std::fopen(path ? path : "kernel_trace.csv", "w");
    if (!out) {
        std::fprintf(stderr, "kernel_trace: cannot write %s\n", path ? path : "kernel_trace.csv");
        return 0;
    }
    std::fprintf(out, "Start (ns),Duration (ns),Name\n");
    check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "registering the buffers");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enabling kernel records");
    std::atexit(flush_at_exit);
    return 1;
}
