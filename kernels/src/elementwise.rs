//! Element-wise kernels, dispatched on [`Isa`]. Both SIMD paths run the AVX2 code (see
//! [`Isa::Avx512`] for why).

use crate::{scalar, DType, Isa};

/// Runs `$simd` (an expression calling `crate::x86::elementwise`) when `$isa` is a SIMD path,
/// `$scalar` otherwise.
macro_rules! dispatch {
    ($isa:expr, $simd:expr, $scalar:expr) => {{
        let isa: Isa = $isa;
        isa.assert_available();
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => {
                #[allow(unused_unsafe)]
                // SAFETY: both paths need AVX2, FMA and F16C, which `assert_available` checked.
                unsafe {
                    $simd
                }
            }
            _ => $scalar,
        }
    }};
}

pub(crate) fn to_f32(isa: Isa, dtype: DType, data: &[u8], out: &mut [f32]) {
    assert_eq!(
        Some(data.len()),
        dtype.bytes(out.len()),
        "to_f32: {} bytes of {} for {} elements",
        data.len(),
        dtype.name(),
        out.len()
    );
    if dtype.is_block() {
        return scalar::to_f32(dtype, data, out);
    }
    dispatch!(isa, crate::x86::elementwise::to_f32(dtype, data, out), scalar::to_f32(dtype, data, out))
}

pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    dispatch!(isa, crate::x86::elementwise::dot(a, b), scalar::dot(a, b))
}

pub(crate) fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    dispatch!(isa, crate::x86::elementwise::axpy(alpha, x, y), scalar::axpy(alpha, x, y))
}

pub(crate) fn rms_norm(isa: Isa, x: &mut [f32], w: &[f32], eps: f32) {
    assert!(!w.is_empty(), "rms_norm: empty weight");
    dispatch!(isa, crate::x86::elementwise::rms_norm(x, w, eps), scalar::rms_norm(x, w, eps))
}

pub(crate) fn softmax(isa: Isa, x: &mut [f32]) {
    dispatch!(isa, crate::x86::elementwise::softmax(x), scalar::softmax(x))
}

pub(crate) fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    dispatch!(isa, crate::x86::elementwise::silu_mul(gate, up), scalar::silu_mul(gate, up))
}
