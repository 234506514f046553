// The small-batch FP8 products' loads alone, by weight layout (`nvcc -arch=sm_90a -O3 -o
// /tmp/weight_layout worker/bench/weight_layout.cu && /tmp/weight_layout`): the loads of
// fp8x8_mma_k_over_warps (16-row tiles; lane (g, t) reads 32 bytes of rows g and g + 8 per
// 128-byte k chunk; a block's warps take contiguous k ranges) on row-major weights, the same
// bytes from a tiled layout (each warp's 16 rows x 128 bytes one contiguous 2 KB piece), and a
// plain read stream, on the shapes of o_proj, dense down and q_b. Weights evicted from L2 first;
// each time, from CUDA events around one launch, includes the launch.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
__device__ unsigned sink;

__device__ __forceinline__ uint4 ldg(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The loads of one 16-row tile, a block's warps taking contiguous ranges of its k chunks. Row
// major: lane (g, t) reads 32 bytes of rows g and g + 8 at 32t of each 128-byte chunk. Tiled:
// chunk c of tile b is 2 KB at (b * chunks + c) * 2048, and the lane reads its 64 bytes at 64 *
// lane. The same bytes a lane either way, UNROLL chunks in flight.
template <bool TILED, int UNROLL>
__global__ void __launch_bounds__(256) tile_loads(const uint8_t* w, int k, int warps_per_block) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int chunks = k / 128, per = chunks / warps_per_block;
    const uint8_t* w0 = TILED ? w + (size_t)blockIdx.x * chunks * 2048 + lane * 64
                              : w + (size_t)(blockIdx.x * 16 + g) * k + 32 * t;
    const uint8_t* w1 = TILED ? w0 + 32 : w0 + (size_t)8 * k;  // the lane's second 32 bytes
    const size_t chunk_stride = TILED ? 2048 : 128;
    unsigned acc = 0;
    for (int ch = warp * per; ch < (warp + 1) * per; ch += UNROLL) {
        uint4 a[UNROLL][4];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint4* p0 = (const uint4*)(w0 + (ch + u) * chunk_stride);
            const uint4* p1 = (const uint4*)(w1 + (ch + u) * chunk_stride);
            a[u][0] = ldg(p0); a[u][1] = ldg(p0 + 1); a[u][2] = ldg(p1); a[u][3] = ldg(p1 + 1);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc ^= a[u][i].x ^ a[u][i].y ^ a[u][i].z ^ a[u][i].w;
    }
    if (acc == 0x12345678u) sink = acc;
}

__global__ void stream(const uint4* w, size_t n16) {
    unsigned acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = ldg(w + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) sink = acc;
}

// Reads `flush` (larger than L2): the weights leave L2 and no dirty lines are left to write back
// during the timed kernel (a memset would leave them).
__global__ void evict(const uint4* flush, size_t n16) {
    unsigned acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x)
        acc ^= ldg(flush + i).x;
    if (acc == 0x12345678u) sink = acc;
}

template <typename F>
float time_it(F launch, uint8_t* flush, size_t flush_bytes) {
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    float total = 0; int reps = 20;
    for (int r = 0; r < reps + 2; ++r) {
        evict<<<1024, 256>>>((const uint4*)flush, flush_bytes / 16);
        cudaEventRecord(a); launch(); cudaEventRecord(b); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b);
        if (r >= 2) total += ms;
    }
    return total / reps * 1000.f;  // µs, mean
}

int main() {
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaDeviceProp prop; cudaGetDeviceProperties(&prop, 0);
    printf("%s, %d SMs\n", prop.name, sms);
    size_t flush_bytes = 256ull << 20;
    uint8_t* flush; cudaMalloc(&flush, flush_bytes); cudaMemset(flush, 0, flush_bytes);
    struct Shape { const char* name; int n, k; } shapes[] = {{"o_proj", 7168, 16384}, {"dense down", 7168, 18432}, {"q_b", 24576, 1536}};
    printf("| shape | MB | layout | warps | chunks in flight | µs | GB/s |\n|---|---:|---|---:|---:|---:|---:|\n");
    for (auto s : shapes) {
        size_t bytes = (size_t)s.n * s.k;
        uint8_t* w; cudaMalloc(&w, bytes); cudaMemset(w, 1, bytes);
        int tiles = s.n / 16;
        for (int warps : {2, 4, 8}) {
            if ((s.k / 128) % warps) continue;
            auto rep = [&](const char* layout, int unroll, float us) {
                printf("| %s | %.1f | %s | %d | %d | %.1f | %.0f |\n", s.name, bytes / 1e6, layout, warps, unroll, us, bytes / us / 1e3);
            };
            const bool even = (s.k / 128 / warps) % 2 == 0;  // two chunks a step divide each warp's range
            for (bool tiled : {false, true}) {
                const char* layout = tiled ? "tiled" : "row-major";
                auto kernel1 = tiled ? tile_loads<true, 1> : tile_loads<false, 1>;
                auto kernel2 = tiled ? tile_loads<true, 2> : tile_loads<false, 2>;
                rep(layout, 1, time_it([&] { kernel1<<<tiles, 32 * warps>>>(w, s.k, warps); }, flush, flush_bytes));
                if (even) rep(layout, 2, time_it([&] { kernel2<<<tiles, 32 * warps>>>(w, s.k, warps); }, flush, flush_bytes));
            }
        }
        float us = time_it([&] { stream<<<sms * 8, 256>>>((const uint4*)w, bytes / 16); }, flush, flush_bytes);
        printf("| %s | %.1f | read stream | – | – | %.1f | %.0f |\n", s.name, bytes / 1e6, us, bytes / us / 1e3);
        cudaFree(w);
    }
    cudaError_t e = cudaGetLastError();
    printf("%s\n", cudaGetErrorString(e));
}
