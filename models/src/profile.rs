//! Where a forward pass spends its time, per kind of operation, when asked (`--profile`).
//!
//! Off by default, and then free: a [`time`] guard checks one relaxed atomic flag and reads no
//! clock. On, each guard adds its wall time to its op's counter; the engine reports the totals
//! (`stats.profile`) so that a decode's time can be set against the bytes it reads. The counters
//! are process-wide: one engine per process is how stevedore runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The operations a forward pass is cut into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Embedding look-ups.
    Embed,
    /// RMSNorms of the residual stream (input, post-attention, final).
    Norm,
    /// q, k, v projections (with q/k norms, clipping and RoPE).
    QkvProj,
    /// Scores, softmax and the weighted sum over the KV cache.
    Attention,
    /// The attention output projection.
    OProj,
    /// Router logits, softmax, top-k and grouping rows by expert.
    Router,
    /// Waiting for the expert source to hand over an expert (reads, room).
    ExpertWait,
    /// Routed experts' SwiGLU blocks (gathering rows included).
    Experts,
    /// Weighted sum of expert outputs into the residual stream.
    Combine,
    /// Dense MLP layers and shared experts.
    DenseFfn,
    /// The LM head.
    LmHead,
}

impl Op {
    pub const ALL: [Op; 11] = [
        Op::Embed,
        Op::Norm,
        Op::QkvProj,
        Op::Attention,
        Op::OProj,
        Op::Router,
        Op::ExpertWait,
        Op::Experts,
        Op::Combine,
        Op::DenseFfn,
        Op::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::Norm => "norm",
            Op::QkvProj => "qkv_proj",
            Op::Attention => "attention",
            Op::OProj => "o_proj",
            Op::Router => "router",
            Op::ExpertWait => "expert_wait",
            Op::Experts => "experts",
            Op::Combine => "combine",
            Op::DenseFfn => "dense_ffn",
            Op::LmHead => "lm_head",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];
static CALLS: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];

/// Turns the counters on or off (they keep their totals).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Times the rest of the scope as `op` when profiling is on.
#[must_use]
#[inline]
pub fn time(op: Op) -> Timer {
    Timer(enabled().then(|| (op, Instant::now())))
}

/// See [`time`].
pub struct Timer(Option<(Op, Instant)>);

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.0 {
            let i = op as usize;
            NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One op's totals.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub seconds: f64,
    pub calls: u64,
}

/// Every op's totals so far, in [`Op::ALL`]'s order.
pub fn snapshot() -> Vec<OpTime> {
    Op::ALL
        .iter()
        .map(|&op| OpTime {
            op: op.name(),
            seconds: NANOS[op as usize].load(Ordering::Relaxed) as f64 * 1e-9,
            calls: CALLS[op as usize].load(Ordering::Relaxed),
        })
        .collect()
}

/// Sets every total back to zero.
pub fn reset() {
    for (n, c) in NANOS.iter().zip(&CALLS) {
        n.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_count_only_while_enabled() {
        // The counters are process-wide: this is the only test in the crate that touches them.
        reset();
        drop(time(Op::Router));
        assert_eq!(snapshot()[Op::Router as usize].calls, 0);
        enable(true);
        {
            let _t = time(Op::Router);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        let s = snapshot()[Op::Router as usize];
        // Other tests' forward passes may add calls while it is on.
        assert!(s.op == "router" && s.calls >= 1, "{s:?}");
        assert!(s.seconds >= 0.002, "{s:?}");
        reset();
        assert_eq!(snapshot()[Op::Router as usize].calls, 0);
    }
}
