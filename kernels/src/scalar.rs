//! The reference path: plain loops, written to be obviously right rather than fast. The SIMD
//! paths must agree with these to f32 rounding (summation order is the only difference).

use crate::{read_f32, DType, Weight};

/// Converts `out.len()` little-endian elements of `dtype` to f32.
pub(crate) fn to_f32(dtype: DType, data: &[u8], out: &mut [f32]) {
    if dtype.is_block() {
        return crate::quant::to_f32(dtype, data, out);
    }
    let size = dtype.size();
    for (o, bytes) in out.iter_mut().zip(data.chunks_exact(size)) {
        *o = read_f32(dtype, bytes, 0);
    }
}

/// `out[t, r] = sum_c x[t, c] * w[r, c]`; each weight row is converted once and reused by every
/// token.
pub(crate) fn matmul(x: &[f32], w: &Weight, out: &mut [f32], n: usize) {
    let mut row = vec![0.0f32; w.cols];
    let row_bytes = w.row_bytes();
    for r in 0..w.rows {
        to_f32(w.dtype, &w.data[r * row_bytes..(r + 1) * row_bytes], &mut row);
        for t in 0..n {
            out[t * w.rows + r] = dot(&x[t * w.cols..(t + 1) * w.cols], &row);
        }
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

pub(crate) fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// LayerNorm of each row of `x` (row length `w.len()`) with weight and bias, as torch's
/// `nn.LayerNorm` computes it: biased variance, `eps` inside the square root.
pub(crate) fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = w.len() as f32;
    for row in x.chunks_mut(w.len()) {
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), c) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + c;
        }
    }
}

pub(crate) fn softmax(x: &mut [f32]) {
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

pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
