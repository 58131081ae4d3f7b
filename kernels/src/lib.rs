//! Compute kernels. Activations are always f32; weights are read in place in their stored
//! dtype (bf16, f16 or f32), little-endian, from byte slices that need not be aligned.
//!
//! Weights follow PyTorch's `nn.Linear` layout: `[rows = out_features, cols = in_features]`,
//! row-major. `matmul` computes `out[t, r] = sum_c x[t, c] * w[r, c]`.
//!
//! Every kernel has a scalar reference path and SIMD paths chosen at run time ([`Isa`]):
//! AVX-512F+VL and AVX2+FMA+F16C on x86-64. The public functions use the best path the CPU has;
//! `matmul_with` and the tests can force one. Paths differ in summation order and, for
//! `softmax` and `silu_mul`, in `exp` (a vector polynomial within 2^-23 relative error instead
//! of libm's); results agree to f32 rounding.
//!
//! Block-format weights ([`DType::Q8_0`], [`DType::Q4_0`]) are multiplied as llama.cpp's CPU
//! backend does: each activation row is quantized to q8_0 once, and each block's integer dot
//! product is scaled by the two blocks' scales. Their SIMD path is AVX2 (the AVX-512 path runs
//! the same code: there is no AVX-512 or VNNI quantized kernel, since no development machine
//! has AVX-512 to test one on).
//!
//! Module map: `backend` (the seam a forward pass computes through, and the [`Cpu`] backend),
//! `matmul` (threads, cache blocks, tiles), `x86::{avx512, avx2}` (matmul micro-kernels),
//! `quant` (block formats: ggml's quantization, the reference block dot, and the driver of
//! products against them) + `x86::quant` (their AVX2 tiles and activation quantization),
//! `elementwise` + `x86::elementwise` (dot, axpy, norms, softmax, SiLU, dtype conversion),
//! `scalar` (the reference).

mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
mod elementwise;
mod isa;
mod matmul;
mod quant;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::{bf16, f16};

pub use backend::{Backend, Cpu, SwiGlu};
pub use isa::Isa;
pub use matmul::{MatmulOptions, Threading};
pub use quant::{dequantize, quantize, QK};

/// Storage type of a weight tensor: a plain element type, or a block format whose blocks of
/// [`QK`] consecutive elements of a row share one scale (laid out exactly as ggml's, so that
/// sizes and error figures compare with llama.cpp's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// ggml's `q8_0`: per 32 weights an f16 scale `d` and 32 signed bytes `q`; `w = d * q`
    /// (34 bytes per block, 8.5 bits per weight).
    Q8_0,
    /// ggml's `q4_0`: per 32 weights an f16 scale `d` and 16 bytes of 4-bit `q` (weight `j` in
    /// the low nibble of byte `j`, weight `j + 16` in its high nibble); `w = d * (q - 8)`
    /// (18 bytes per block, 4.5 bits per weight).
    Q4_0,
}

impl DType {
    /// Every dtype, plain ones first.
    pub const ALL: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0];

    /// Bytes per element of a plain dtype. Block formats have no per-element size: use
    /// [`DType::bytes`]; asking one is a bug, and panics.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 | DType::Q4_0 => panic!("{} is a block format: ask DType::bytes", self.name()),
        }
    }

    /// Elements per block: 1 for plain dtypes, [`QK`] for block formats.
    pub fn block(self) -> usize {
        if self.is_block() {
            QK
        } else {
            1
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 2 + QK,
            DType::Q4_0 => 2 + QK / 2,
        }
    }

    /// Whether this is a block format (q8_0, q4_0).
    pub fn is_block(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0)
    }

    /// Bytes of `n` elements; `None` when `n` is not a whole number of blocks or the size
    /// overflows.
    pub fn bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block()) {
            return None;
        }
        (n / self.block()).checked_mul(self.block_bytes())
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
        }
    }

    /// A dtype by name, case-insensitive (`bf16`, `q8_0`, `Q4_0`, ...).
    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("weight of {rows}x{cols} {dtype:?} needs {expected} bytes, got {got}")]
    WeightSize { rows: usize, cols: usize, dtype: DType, expected: usize, got: usize },
    #[error("weight of {rows}x{cols} {dtype:?} is larger than the address space")]
    WeightTooLarge { rows: usize, cols: usize, dtype: DType },
    #[error("{dtype:?} stores rows in blocks of {block}, but a row has {cols} columns")]
    PartialBlock { cols: usize, dtype: DType, block: usize },
}

/// A borrowed 2-D weight matrix in its stored dtype. `data` may be unaligned.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub dtype: DType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Weight<'a> {
    /// Checks that `data` holds exactly `rows * cols` elements of `dtype` (for a block format,
    /// that each row is whole blocks).
    pub fn new(dtype: DType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(dtype.block()) {
            return Err(KernelError::PartialBlock { cols, dtype, block: dtype.block() });
        }
        let expected = dtype
            .bytes(cols)
            .and_then(|row| row.checked_mul(rows))
            .ok_or(KernelError::WeightTooLarge { rows, cols, dtype })?;
        if data.len() != expected {
            return Err(KernelError::WeightSize { rows, cols, dtype, expected, got: data.len() });
        }
        Ok(Weight { dtype, data, rows, cols })
    }

    /// An f32 matrix (`rows * cols` values, row-major) as a weight: activations multiplied
    /// like weights (attention's keys and values).
    pub fn from_f32(data: &'a [f32], rows: usize, cols: usize) -> Self {
        // Weights are little-endian bytes; native f32 bytes are those only on little-endian CPUs.
        const { assert!(cfg!(target_endian = "little")) };
        assert_eq!(data.len(), rows * cols, "f32 weight of {rows}x{cols} from {} values", data.len());
        // SAFETY: the bytes of `data`, same lifetime; f32 has no padding and u8 no alignment.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), size_of_val(data)) };
        Weight { dtype: DType::F32, data: bytes, rows, cols }
    }

    /// Element `i` of the flat data, converted to f32 (reference path; slow).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        read_f32(self.dtype, self.data, i)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.dtype.bytes(self.cols).expect("a Weight's rows are whole blocks")
    }

    /// Row `r` converted to f32 into `out` (len `cols`). Used for embedding look-ups.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let rb = self.row_bytes();
        to_f32(self.dtype, &self.data[r * rb..(r + 1) * rb], out);
    }
}

/// Element `i` of little-endian `data` of `dtype`, as f32 (of a block format: dequantized).
#[inline]
pub fn read_f32(dtype: DType, data: &[u8], i: usize) -> f32 {
    match dtype {
        DType::Q8_0 | DType::Q4_0 => {
            let b = dtype.block_bytes();
            quant::block_value(dtype, &data[i / QK * b..][..b], i % QK)
        }
        DType::F32 => f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()),
        DType::F16 => f16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
        DType::BF16 => bf16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
    }
}

/// Converts a whole little-endian buffer to f32 (`out.len()` elements; block formats are
/// dequantized).
pub fn to_f32(dtype: DType, data: &[u8], out: &mut [f32]) {
    elementwise::to_f32(Isa::detect(), dtype, data, out)
}

/// `out[t, r] = sum_c x[t, c] * w[r, c]` for `t < n`, where `n = x.len() / w.cols`.
/// `out.len()` must be `n * w.rows`.
///
/// Uses the best SIMD path of the CPU and all of rayon's threads when the matmul is large enough.
/// Weights are read in place (never converted as a whole); accumulation is in f32.
pub fn matmul(x: &[f32], w: &Weight, out: &mut [f32]) {
    matmul::matmul_with(MatmulOptions::default(), x, w, out)
}

/// [`matmul`] of one `x` against several weights of the same column count (`out` of each
/// `n * w.rows`), in one parallel job: q, k and v, or an expert's gate and up projections, cost
/// one fork-join instead of one each. Every output equals what [`matmul`] gives.
pub fn matmul_many(x: &[f32], parts: &mut [(Weight, &mut [f32])]) {
    matmul::matmul_many_with(MatmulOptions::default(), x, parts)
}

/// [`matmul_many`] on a chosen path and threading. Panics if the CPU lacks `opts.isa`.
pub fn matmul_many_with(opts: MatmulOptions, x: &[f32], parts: &mut [(Weight, &mut [f32])]) {
    matmul::matmul_many_with(opts, x, parts)
}

/// [`matmul`] on a chosen path and threading. Panics if the CPU lacks `opts.isa`.
pub fn matmul_with(opts: MatmulOptions, x: &[f32], w: &Weight, out: &mut [f32]) {
    matmul::matmul_with(opts, x, w, out)
}

/// Runs `f` on a thread of the compute pool (rayon's global pool) and waits for it. A forward
/// pass runs there so that its hundreds of small parallel matmuls fork and join among the pool's
/// threads, which keep spinning between calls, instead of each call waking the pool from an
/// outside thread (measured 2 MiB bf16 matvecs on 2 cores: 12 GB/s called from outside, 19-20
/// GB/s from inside).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Dot product of two f32 slices of equal length (a longer one is cut to the shorter).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    elementwise::dot(Isa::detect(), a, b)
}

/// `y += alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    elementwise::axpy(Isa::detect(), alpha, x, y)
}

/// RMSNorm of each row of `x` (row length `w.len()`), in place: `x * w / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    elementwise::rms_norm(Isa::detect(), x, w, eps)
}

/// LayerNorm of each row of `x` (row length `w.len()`) in place, with weight `w` and bias `b`:
/// `(x - mean) / sqrt(var + eps) * w + b`, the variance biased (Phi-3.5-MoE's norms). A scalar
/// loop: a norm is a vanishing part of a forward pass.
pub fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    assert!(!w.is_empty() && w.len() == b.len(), "layer_norm: weight and bias of one nonzero length");
    scalar::layer_norm(x, w, b, eps)
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    elementwise::softmax(Isa::detect(), x)
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    elementwise::silu_mul(Isa::detect(), gate, up)
}
