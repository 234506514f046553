//! dsv3-cuda: the DeepSeek-V3 forward pass on NVIDIA GPUs.
//!
//! CUDA is loaded at run time (cudarc `dynamic-loading`), so the one `dsv3-worker` binary runs on
//! machines without it; [`device_status`] says whether a GPU can be used before anything touches
//! the driver. Kernels are CUDA C in `kernels/` (a shared header and one file per family),
//! compiled by NVRTC on the first start and cached; large products go through cuBLAS(Lt). [`CudaModel`] is a [`dsv3_engine::StepBackend`] whose routed experts
//! are on the GPU or reached through an executor; [`CudaExperts`] is an expert shard on the GPU.

pub mod absorb;
pub mod bench;
pub mod bench_attention;
pub mod bench_linear;
pub mod bench_speculative;
pub mod cache;
pub mod data_plane;
pub mod expert_wgmma;
pub mod experts;
pub mod fp8_gemm;
pub mod gpu;
pub mod kernel_cache;
pub mod kernels;
pub mod launch;
pub mod linear;
pub mod mla_decode;
pub mod mla_prefill;
pub mod model;
pub mod nccl;
pub mod probes;
pub mod projection;
pub mod switches;
pub mod tiles;
pub mod weights;

pub use experts::CudaExperts;
pub use gpu::{compile_family, compile_kernels, driver_present, nvrtc_present, Gpu, KERNEL_FAMILIES};
pub use model::{pick_tokens, CudaModel, DeviceTrace, HostExperts, ModelExperts};

/// Whether a CUDA GPU is usable here: `Ok(count)` or why not.
pub fn device_status() -> Result<usize, String> {
    if !driver_present() {
        return Err("no CUDA driver found (libcuda could not be loaded)".into());
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(0) => Err("the CUDA driver reports no GPU".into()),
        Ok(n) => Ok(n as usize),
        Err(e) => Err(format!("the CUDA driver failed to initialise: {e}")),
    }
}
