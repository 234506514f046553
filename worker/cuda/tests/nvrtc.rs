//! Compiles every kernel through NVRTC. Needs libnvrtc, not a GPU: CI installs it from PyPI
//! (`nvidia-cuda-nvrtc`) and sets DSV3_REQUIRE_NVRTC=1 so a missing library fails instead of skipping.

use dsv3_cuda::launch::Kind;
use dsv3_cuda::{compile_kernels, kernels, nvrtc_present, KERNEL_FAMILIES};
use std::collections::BTreeMap;
use std::sync::Mutex;

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

/// The PTX of every kernel family for `arch`, compiled once for all the tests here.
fn family_ptx(arch: &'static str) -> &'static [String] {
    static COMPILED: Mutex<BTreeMap<&str, &'static [String]>> = Mutex::new(BTreeMap::new());
    let mut compiled = COMPILED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    compiled.entry(arch).or_insert_with(|| {
        let families = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        Vec::leak(families.iter().map(|p| p.to_src()).collect())
    })
}

#[test]
fn every_kernel_compiles_for_hopper_and_ampere_in_exactly_one_family() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["compute_90a", "compute_90", "compute_80"] {
        let ptx = family_ptx(arch);
        for &(name, _) in kernels::ALL {
            let holders = ptx.iter().filter(|p| p.contains(&format!(".entry {name}("))).count();
            assert_eq!(holders, 1, "{arch}: kernel `{name}` is in {holders} families");
        }
        let entries: usize = ptx.iter().map(|p| p.matches(".entry ").count()).sum();
        assert_eq!(
            entries,
            kernels::ALL.len(),
            "{arch}: PTX has kernels the list does not name"
        );
    }
}

/// The parameters of kernel `name` in `ptx`, as the kinds a launch passes: 8 bytes (`.u64`, an
/// address or a u64), 4 bytes of integer, 4 of float, or a 128-byte tensor map.
fn ptx_params(ptx: &str, name: &str) -> Vec<&'static [Kind]> {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no entry `{name}`"));
    let list = &ptx[start..];
    let list = &list[list.find('(').expect("(") + 1..list.find(')').expect(")")];
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| -> &'static [Kind] {
            if p.starts_with(".param .u64 ") {
                &[Kind::Ptr, Kind::U64]
            } else if p.starts_with(".param .u32 ") || p.starts_with(".param .s32 ") {
                &[Kind::I32]
            } else if p.starts_with(".param .f32 ") {
                &[Kind::F32]
            } else if p.starts_with(".param .align ") && p.contains(".b8 ") && p.ends_with("[128]") {
                &[Kind::Map]
            } else {
                panic!("`{name}`: a parameter no launcher passes: {p}")
            }
        })
        .collect()
}

/// The parameters of kernel `name` as its CUDA C declares them: `extern "C" __global__ void`,
/// maybe `__launch_bounds__(...)`, then the name (`fp8_mma_n##NT` stands for `fp8_mma_n1`, ...)
/// and the list, or a macro that holds the list.
fn c_params(sources: &str, name: &str) -> Vec<Kind> {
    let text = sources.replace("\\\n", " ");
    let declared = text.split("extern \"C\" __global__ void").skip(1).find_map(|rest| {
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix("__launch_bounds__(") {
            Some(bounds) => bounds[bounds.find(')')? + 1..].trim_start(),
            None => rest,
        };
        let (decl, list) = rest.split_once('(')?;
        let decl = decl.trim();
        let same = match decl.split_once("##NT") {
            Some((stem, _)) => name
                .strip_prefix(stem)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            None => decl == name,
        };
        same.then(|| list[..list.find(')').expect(")")].trim().to_string())
    });
    let list = declared.unwrap_or_else(|| panic!("no C declaration of `{name}`"));
    // A list held by a macro: `#define MACRO <list>`.
    let list = match text.split(&format!("#define {list} ")).nth(1) {
        Some(defined) if !list.contains(',') => defined.lines().next().unwrap_or("").to_string(),
        _ => list,
    };
    list.split(',')
        .map(|p| {
            let ty = p.trim();
            let ty = ty[..ty
                .rfind(|c: char| !c.is_alphanumeric() && c != '_')
                .map_or(0, |i| i + 1)]
                .trim();
            if ty.contains("TensorMap") {
                Kind::Map
            } else if ty.contains('*') {
                Kind::Ptr
            } else {
                match ty.trim_start_matches("const ") {
                    "int" | "unsigned" | "u32" => Kind::I32,
                    "u64" => Kind::U64,
                    "float" => Kind::F32,
                    other => panic!("`{name}`: a parameter type no launcher passes: {other} ({p})"),
                }
            }
        })
        .collect()
}

/// Every typed launcher (`kernels.rs`) passes the parameters its kernel takes: as many, each of
/// the size and kind the compiled kernel reads, on every architecture, and each a pointer where
/// the CUDA C has one and a number where it has a number.
#[test]
fn every_launcher_passes_the_parameters_its_compiled_kernel_takes() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["compute_90a", "compute_80"] {
        let ptx: String = family_ptx(arch).concat();
        for &(name, kinds) in kernels::ALL {
            let takes = ptx_params(&ptx, name);
            assert_eq!(
                takes.len(),
                kinds.len(),
                "{arch}: `{name}` takes {} parameters, its launcher passes {}",
                takes.len(),
                kinds.len()
            );
            for (i, (kind, allowed)) in kinds.iter().zip(&takes).enumerate() {
                assert!(
                    allowed.contains(kind),
                    "{arch}: parameter {i} of `{name}` is {allowed:?} in the kernel, {kind:?} in its launcher"
                );
            }
        }
    }
    let sources: String = KERNEL_FAMILIES.iter().map(|&(_, source)| source).collect();
    for &(name, kinds) in kernels::ALL {
        assert_eq!(
            c_params(&sources, name),
            kinds,
            "`{name}`: the CUDA C against its launcher"
        );
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
    let ptx: String = family_ptx("compute_90a").concat();
    for &(name, _) in kernels::ALL {
        assert_waits_before_touching_memory(&ptx, name);
    }
}

/// Kernel `name` of `ptx` touches no memory but parameters, shared memory and prefetches before
/// `griddepcontrol.wait`.
fn assert_waits_before_touching_memory(ptx: &str, name: &str) {
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

/// Every probe's build (`DSV3_*_PROBE`, all of its parts at once) compiles, its kernels still
/// wait for the kernel before them first, and the MLA decode's timeline declares the record the
/// benchmark reads (in service the parts are off: the tests above check that build).
#[test]
fn every_probe_builds_with_all_its_parts() {
    if !nvrtc_or_skip() {
        return;
    }
    for probe in dsv3_cuda::probes::ALL {
        let (family, source) = dsv3_cuda::KERNEL_FAMILIES
            .iter()
            .find(|(_, source)| source.contains(probe.source))
            .unwrap_or_else(|| panic!("{}: no kernel family holds its kernel", probe.var));
        let defines: String = probe.parts.iter().map(|(_, d)| format!("#define {d} 1\n")).collect();
        let ptx = dsv3_cuda::compile_family(&format!("{defines}{source}"), "compute_90a")
            .unwrap_or_else(|e| panic!("{}: family `{family}` with every part: {e:#}", probe.var))
            .to_src();
        for &(name, _) in kernels::ALL {
            if ptx.contains(&format!(".entry {name}(")) {
                assert_waits_before_touching_memory(&ptx, name);
            }
        }
        if std::ptr::eq(probe, &dsv3_cuda::probes::MLA_DECODE) {
            let record = dsv3_cuda::probes::MLA_TIMELINE_RECORD;
            assert!(
                ptx.contains(&format!(" {record}[")),
                "no `{record}` in the timeline build"
            );
        }
    }
}
