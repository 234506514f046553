//! Compiles every kernel through NVRTC. Needs libnvrtc, not a GPU: CI installs it from PyPI
//! (`nvidia-cuda-nvrtc`) and sets DSV3_REQUIRE_NVRTC=1 so a missing library fails instead of skipping.

use dsv3_cuda::{compile_kernels, nvrtc_present, KERNELS};

#[test]
fn every_kernel_compiles_for_hopper_and_ampere() {
    if !nvrtc_present() {
        assert!(
            std::env::var_os("DSV3_REQUIRE_NVRTC").is_none(),
            "DSV3_REQUIRE_NVRTC is set but libnvrtc was not found on LD_LIBRARY_PATH"
        );
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    for arch in ["compute_90", "compute_80"] {
        let ptx = compile_kernels(arch)
            .unwrap_or_else(|e| panic!("{arch}: {e:#}"))
            .to_src();
        for name in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel `{name}` is listed but not in the PTX"
            );
        }
        let entries = ptx.matches(".entry ").count();
        assert_eq!(entries, KERNELS.len(), "{arch}: PTX has kernels the list does not name");
    }
}
