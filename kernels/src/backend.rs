//! The backend seam: the compute a forward pass hands to a device.
//!
//! A model's forward pass keeps its activations as f32 rows and asks a [`Backend`] for the
//! products that read weights: matrix products of one input against one or more weight
//! matrices (`matmuls`: q, k and v as one launch), and the SwiGLU
//! feed-forward block (an MLP or one routed expert) against three. Everything else (norms,
//! RoPE, softmax, attention over the KV cache) is element-wise work on activations.
//!
//! Two methods, both implemented by every backend, after ggml's split of a backend into a few
//! concepts and candle's device enum: the CPU backend ([`Cpu`]) runs the SIMD kernels of this
//! crate on all cores. A CUDA backend implements the same two methods for weights resident in
//! device memory (ship the rows over, compute, ship the results back: the Fiddler placement for
//! an expert that lives on the GPU), and the engine picks the backend per expert by where its
//! weights are, which is what [`Weight`]'s storage will say once there is more than host memory.

use crate::{matmul, matmul_many, silu_mul, Weight};

/// The three projections of a SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Copy, Debug)]
pub struct SwiGlu<'a> {
    /// `[intermediate, hidden]`
    pub gate: Weight<'a>,
    /// `[intermediate, hidden]`
    pub up: Weight<'a>,
    /// `[hidden, intermediate]`
    pub down: Weight<'a>,
}

/// The weight-reading compute of a forward pass. Rows are independent: a row's result must not
/// depend on the other rows passed with it (the engine's "batched equals alone" invariant).
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// `out[t, r] = sum_c x[t, c] * w[r, c]` for every row `t` of `x`, for each `(w, out)` of
    /// `parts` (one weight, or several against the same `x` as one launch: q, k and v).
    fn matmuls(&self, x: &[f32], parts: &mut [(Weight<'_>, &mut [f32])]);
    /// `out[t] = down(silu(gate(x[t])) * up(x[t]))` for every row `t` of `x`.
    fn swiglu(&self, x: &[f32], w: &SwiGlu<'_>, out: &mut [f32]);
}

/// The CPU backend: this crate's kernels, best SIMD path of the machine, all cores.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmuls(&self, x: &[f32], parts: &mut [(Weight<'_>, &mut [f32])]) {
        matmul_many(x, parts)
    }

    fn swiglu(&self, x: &[f32], w: &SwiGlu<'_>, out: &mut [f32]) {
        let n = x.len().checked_div(w.gate.cols).unwrap_or(0);
        let mut g = vec![0.0; n * w.gate.rows];
        let mut u = vec![0.0; n * w.up.rows];
        // Gate and up in one parallel job: one fork-join fewer per expert, and twice the rows
        // to share among the threads.
        matmul_many(x, &mut [(w.gate, &mut g), (w.up, &mut u)]);
        silu_mul(&mut g, &u);
        matmul(&g, &w.down, out);
    }
}
