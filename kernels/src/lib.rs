//! Compute kernels. Activations are always f32; weights are read in place in their stored
//! dtype (bf16, f16 or f32), little-endian, from byte slices that need not be aligned.
//!
//! Weights follow PyTorch's `nn.Linear` layout: `[rows = out_features, cols = in_features]`,
//! row-major. `matmul` computes `out[t, r] = sum_c x[t, c] * w[r, c]`.

use half::{bf16, f16};

/// Storage type of a weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("weight of {rows}x{cols} {dtype:?} needs {expected} bytes, got {got}")]
    WeightSize {
        rows: usize,
        cols: usize,
        dtype: DType,
        expected: usize,
        got: usize,
    },
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
    pub fn new(dtype: DType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = rows * cols * dtype.size();
        if data.len() != expected {
            return Err(KernelError::WeightSize { rows, cols, dtype, expected, got: data.len() });
        }
        Ok(Weight { dtype, data, rows, cols })
    }

    /// Element `i` of the flat data, converted to f32 (reference path; slow).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        read_f32(self.dtype, self.data, i)
    }

    /// Row `r` converted to f32 into `out` (len `cols`). Used for embedding look-ups.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let start = r * self.cols;
        to_f32(self.dtype, &self.data[start * self.dtype.size()..(start + self.cols) * self.dtype.size()], out);
    }
}

/// Element `i` of little-endian `data` of `dtype`, as f32.
#[inline]
pub fn read_f32(dtype: DType, data: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()),
        DType::F16 => f16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
        DType::BF16 => bf16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
    }
}

/// Converts a whole little-endian buffer to f32 (`out.len()` elements).
pub fn to_f32(dtype: DType, data: &[u8], out: &mut [f32]) {
    assert_eq!(data.len(), out.len() * dtype.size());
    for (i, o) in out.iter_mut().enumerate() {
        *o = read_f32(dtype, data, i);
    }
}

/// `out[t, r] = sum_c x[t, c] * w[r, c]` for `t < n`, where `n = x.len() / w.cols`.
/// `out.len()` must be `n * w.rows`.
pub fn matmul(x: &[f32], w: &Weight, out: &mut [f32]) {
    let n = x.len() / w.cols;
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(out.len(), n * w.rows);
    for t in 0..n {
        let xt = &x[t * w.cols..(t + 1) * w.cols];
        for r in 0..w.rows {
            let mut acc = 0.0f32;
            for (c, xv) in xt.iter().enumerate() {
                acc += xv * w.get(r * w.cols + c);
            }
            out[t * w.rows + r] = acc;
        }
    }
}

/// Dot product of two f32 slices of equal length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// RMSNorm of each row of `x` (row length `w.len()`), in place: `x * w / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
