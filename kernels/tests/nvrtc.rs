//! Every CUDA kernel source compiles cleanly with NVRTC for the GPUs we target (A100: sm_80,
//! L40S / RTX 40xx: sm_89, H100 / H200: sm_90), both as PTX for the virtual architecture
//! (`compute_XX`) and as a cubin for the real one (`sm_XX`, which also runs the PTX assembler
//! over the inline assembly), with an empty log: a warning fails like an error. Each PTX defines
//! every kernel the backend loads. Needs no GPU, only NVRTC.
//!
//! Runs where `libnvrtc.so` (or `libnvrtc.so.13`) can be loaded: on the loader's path, e.g.
//! `scripts/install-nvrtc.sh` then
//! `LD_LIBRARY_PATH=$PWD/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib cargo test -p stevedore-kernels --features cuda --test nvrtc`.
//! Without it the test prints "skipped: ..." and passes, unless `STEVEDORE_REQUIRE_NVRTC=1`
//! (set by `bench/gpu/run.sh`), which makes a missing NVRTC a failure.
#![cfg(feature = "cuda")]

use stevedore_kernels::cuda::{compile, nvrtc_present, nvrtc_version, SOURCES};

const ARCHS: [&str; 3] = ["80", "89", "90"];

fn nvrtc_or_skip() -> bool {
    if nvrtc_present() {
        return true;
    }
    let reason =
        "libnvrtc not found on the loader's path (run scripts/install-nvrtc.sh and set LD_LIBRARY_PATH)";
    assert!(
        std::env::var("STEVEDORE_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "STEVEDORE_REQUIRE_NVRTC=1: {reason}"
    );
    println!("skipped: {reason}");
    false
}

#[test]
fn every_source_compiles_cleanly_for_every_target() {
    if !nvrtc_or_skip() {
        return;
    }
    println!("NVRTC {:?}", nvrtc_version().unwrap());
    for source in SOURCES {
        for arch in ARCHS {
            let ptx = compile(&source, &format!("compute_{arch}")).unwrap_or_else(|e| panic!("{e}"));
            let ptx = String::from_utf8(ptx).expect("PTX is text");
            for kernel in source.kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{} for compute_{arch} has no kernel {kernel}",
                    source.name
                );
            }
            let cubin = compile(&source, &format!("sm_{arch}")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                cubin.get(..4),
                Some(&b"\x7fELF"[..]),
                "{} for sm_{arch}: not an ELF cubin",
                source.name
            );
            println!(
                "{} for compute_{arch} and sm_{arch}: {} bytes of PTX, {} of cubin",
                source.name,
                ptx.len(),
                cubin.len()
            );
        }
    }
}

/// A broken source is reported with NVRTC's log, and so is a warning: the check above can fail.
#[test]
fn errors_and_warnings_are_refused_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = stevedore_kernels::cuda::Source {
        name: "broken.cu",
        code: "extern \"C\" __global__ void k(float* x) { x[0] = undeclared; }",
        kernels: &["k"],
    };
    let err = compile(&broken, "compute_90").unwrap_err().to_string();
    assert!(err.contains("broken.cu") && err.contains("undeclared"), "{err}");
    let warns = stevedore_kernels::cuda::Source {
        name: "warns.cu",
        code: "extern \"C\" __global__ void k(float* x) { int unused = 1; x[0] = 0.0f; }",
        kernels: &["k"],
    };
    let err = compile(&warns, "compute_90").unwrap_err().to_string();
    assert!(err.contains("warns.cu") && err.contains("unused"), "{err}");
}

/// The kernels include no header, so NVRTC alone compiles them (no CUDA headers to find on a
/// machine that has only the driver and NVRTC).
#[test]
fn sources_need_no_headers() {
    for source in SOURCES {
        assert!(!source.code.contains("#include"), "{} includes a header", source.name);
    }
}
