//! Compiles every kernel through NVRTC. Needs libnvrtc, not a GPU: CI installs it from PyPI
//! (`nvidia-cuda-nvrtc`) and sets DSV3_REQUIRE_NVRTC=1 so a missing library fails instead of skipping.

use dsv3_cuda::{compile_kernels, nvrtc_present, KERNELS};

/// Whether NVRTC is here; without it the test is skipped, unless CI requires it.
fn nvrtc_or_skip() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var_os("DSV3_REQUIRE_NVRTC").is_none(),
        "DSV3_REQUIRE_NVRTC is set but libnvrtc was not found on LD_LIBRARY_PATH"
    );
    eprintln!("skipped: libnvrtc not found");
    false
}

#[test]
fn every_kernel_compiles_for_hopper_and_ampere_in_exactly_one_family() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["compute_90a", "compute_90", "compute_80"] {
        let families = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        let ptx: Vec<String> = families.iter().map(|p| p.to_src()).collect();
        for name in KERNELS {
            let holders = ptx.iter().filter(|p| p.contains(&format!(".entry {name}("))).count();
            assert_eq!(holders, 1, "{arch}: kernel `{name}` is in {holders} families");
        }
        let entries: usize = ptx.iter().map(|p| p.matches(".entry ").count()).sum();
        assert_eq!(entries, KERNELS.len(), "{arch}: PTX has kernels the list does not name");
    }
}

/// The kernel cache: the first start compiles a CUBIN and stores it; the next loads the same bytes
/// from the file; another architecture or another source is another entry.
#[test]
fn kernels_compile_to_a_cubin_once_and_then_come_from_the_cache() {
    use dsv3_cuda::kernel_cache::{kernel_image, Origin};
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let cache = dir.path().join("kernels");
    let (_, source) = dsv3_cuda::KERNEL_FAMILIES[0];
    let first = kernel_image(source, "sm_90", Some(&cache)).expect("compile");
    let Origin::Compiled { cached: Some(path), .. } = &first.origin else {
        panic!("first start: {:?}", first.origin)
    };
    // An ELF image, and the file holds exactly it.
    assert_eq!(&first.cubin[..4], b"\x7fELF");
    assert_eq!(std::fs::read(path).expect("cached file"), first.cubin);
    let second = kernel_image(source, "sm_90", Some(&cache)).expect("cache");
    assert!(
        matches!(&second.origin, Origin::Cache(p) if p == path),
        "{:?}",
        second.origin
    );
    assert_eq!(second.cubin, first.cubin);
    // A changed source misses the cache.
    let tiny = "extern \"C\" __global__ void k(float* x) { x[0] = 1.f; }";
    let other = kernel_image(tiny, "sm_90", Some(&cache)).expect("compile");
    assert!(matches!(other.origin, Origin::Compiled { .. }), "{:?}", other.origin);
    assert_eq!(std::fs::read_dir(&cache).expect("dir").count(), 2);
}

/// Kernels are launched with programmatic dependent launch: a kernel may be placed on the GPU
/// while the one before it still runs, so each must wait for it (`griddepcontrol.wait`) before
/// it touches memory another kernel writes or reads. In the Hopper PTX of every kernel, nothing
/// but parameter loads, shared memory and L2 prefetches (of weights) comes before the wait.
#[test]
fn every_kernel_waits_for_the_one_before_before_it_touches_memory() {
    if !nvrtc_or_skip() {
        return;
    }
    let families = compile_kernels("compute_90a").expect("compile");
    let ptx: String = families.iter().map(|p| p.to_src()).collect();
    for name in KERNELS {
        let start = ptx
            .find(&format!(".entry {name}("))
            .unwrap_or_else(|| panic!("no entry `{name}`"));
        let body = &ptx[start..];
        let body = &body[..body[1..].find(".entry ").map_or(body.len(), |e| e + 1)];
        let wait = body
            .find("griddepcontrol.wait")
            .unwrap_or_else(|| panic!("`{name}` never waits for the kernel before it"));
        for line in body[..wait].lines() {
            let op = line.trim();
            // past a guard predicate (`@%p1 ld...`, `@!%p1 ...`)
            let op = match op.strip_prefix('@') {
                Some(guarded) => guarded
                    .split_once(char::is_whitespace)
                    .map_or("", |(_, rest)| rest.trim_start()),
                None => op,
            };
            let touches = ["ld.", "st.", "atom.", "red.", "cp.", "call", "tex.", "suld", "sust"]
                .iter()
                .any(|p| op.starts_with(p));
            let harmless = op.starts_with("ld.param") || op.contains(".shared") || op.starts_with("prefetch");
            assert!(
                !touches || harmless,
                "`{name}` touches memory before it waits for the kernel before it: {}",
                line.trim()
            );
        }
    }
}
