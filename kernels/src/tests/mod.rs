//! Every kernel on every path the CPU has, against plain loops in f64 on deterministic
//! pseudo-random inputs: odd sizes (tails of every SIMD width) and weight bytes at odd addresses.

#[cfg(feature = "cuda")]
mod cuda;
mod elementwise;
mod matmul;
mod quant;

use half::{bf16, f16};

use crate::{matmul_many_with, matmul_with, DType, MatmulOptions, Weight};

/// Unit roundoff of f32: every correctly rounded f32 operation has relative error <= U.
const U: f64 = 1.0 / (1u64 << 24) as f64;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// SplitMix64: tiny, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// `vals` stored as little-endian `dtype` at byte 1 of the returned buffer, so that
/// `&buf[1..]` is misaligned for every dtype; also the values as stored (rounded to `dtype`).
fn encode_unaligned(dtype: DType, vals: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut buf = vec![0u8];
    let mut stored = Vec::with_capacity(vals.len());
    for &v in vals {
        match dtype {
            DType::F32 => {
                buf.extend(v.to_le_bytes());
                stored.push(v);
            }
            DType::F16 => {
                let h = f16::from_f32(v);
                buf.extend(h.to_bits().to_le_bytes());
                stored.push(h.to_f32());
            }
            DType::BF16 => {
                let h = bf16::from_f32(v);
                buf.extend(h.to_bits().to_le_bytes());
                stored.push(h.to_f32());
            }
            DType::Q8_0 | DType::Q4_0 => unreachable!("block formats are encoded whole: see tests::quant"),
        }
    }
    (buf, stored)
}

/// `Isa::assert_available` relies on each path needing everything the paths before it need.
#[test]
fn isa_availability_is_ordered() {
    let available = crate::Isa::available();
    assert_eq!(available.last(), Some(&crate::Isa::detect()));
    for isa in crate::Isa::ALL {
        assert_eq!(isa.is_available(), isa <= crate::Isa::detect(), "{isa:?}");
    }
}

/// `matmul_many` with `opts` over `ws` gives each weight exactly what `matmul` gives it alone,
/// bit for bit (`what` names the case in a failure).
fn assert_many_equals_each_alone(opts: MatmulOptions, x: &[f32], ws: &[Weight], what: &str) {
    let cols = ws.first().map_or(1, |w| w.cols).max(1);
    let n = x.len() / cols;
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; n * w.rows]).collect();
    let mut parts: Vec<(Weight, &mut [f32])> =
        ws.iter().zip(outs.iter_mut()).map(|(w, o)| (*w, &mut o[..])).collect();
    matmul_many_with(opts, x, &mut parts);
    for (w, got) in ws.iter().zip(&outs) {
        let mut alone = vec![0.0; n * w.rows];
        matmul_with(opts, x, w, &mut alone);
        assert!(
            got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: {:?} {:?} {:?} {}x{cols} n={n}",
            opts.isa,
            opts.threading,
            w.dtype,
            w.rows
        );
    }
}
