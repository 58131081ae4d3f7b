//! Which instruction-set path a kernel runs. Detection happens at run time, so one binary uses
//! AVX-512 where the CPU has it and still runs (on the scalar path) where it has nothing.

use std::sync::OnceLock;

/// An implementation of the kernels. Every variant computes the same function; they differ in
/// summation order only, so results agree to f32 rounding.
///
/// `Scalar` is the reference: plain loops, single-threaded, available everywhere. Tests force
/// every path available on the machine and compare each against a plain f32 loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops (the reference path).
    Scalar,
    /// AVX2 + FMA + F16C (x86-64, 256-bit vectors).
    Avx2,
    /// AVX-512F + VL for the matmul micro-kernels; element-wise kernels use the AVX2 code (on
    /// Zen 4 a 512-bit op is two 256-bit halves, and those kernels are bound by L1 or memory).
    Avx512,
}

impl Isa {
    /// Every variant, from the reference to the widest.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// The best path this CPU supports (detected once, then cached).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::ALL.into_iter().rev().find(|isa| isa.is_available()).unwrap_or(Isa::Scalar))
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => has_avx2(),
            // The AVX-512 path falls back to AVX2 code for tails and element-wise kernels.
            Isa::Avx512 => has_avx2() && has_avx512(),
        }
    }

    /// The paths this CPU can run, reference first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_available()).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Panics with a clear message when the CPU cannot run `self`; every SIMD entry point calls
    /// this before executing instructions the CPU may not have. Cheap enough for per-call use
    /// (a cached load and a compare): each path needs everything the paths before it need, so
    /// `self` runs exactly when it is not above [`Isa::detect`].
    #[inline]
    pub(crate) fn assert_available(self) {
        assert!(self <= Isa::detect(), "kernel path {} is not supported by this CPU", self.name());
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}
