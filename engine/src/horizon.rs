//! The prefetch horizon, set by measurement (`predictor.prefetch_depth = "auto"`): how many MoE
//! layers ahead the predictive policy prefetches, and how many bytes per prefetch round, from
//! what the run measures as it goes (ExpertFlow's rule):
//!
//! ```text
//! layers = ceil(experts fetched per layer x expert bytes / (disk bandwidth x layer compute time))
//! bytes  = max(one expert, disk bandwidth x layer compute time x layers)
//! ```
//!
//! A read must be issued as many layers ahead as the layers of compute it takes to arrive; more
//! would read what the store cannot keep or what the predictions get wrong at that distance.
//! Every figure is a moving average over the steps so far, updated after each forward pass:
//! - disk bandwidth: bytes read over the wall time with at least one read in flight;
//! - layer compute time: the pass's time less its stalls, over its MoE layer steps;
//! - experts fetched per layer: demand misses and prefetches over the MoE layer steps.
//!
//! Until a read has been timed the horizon is one layer.

use serde::Serialize;
use stevedore_predictor::Horizon;

use crate::store::StoreStats;

/// Weight of the newest step in the moving averages.
const ALPHA: f64 = 0.2;

/// The figures behind the current horizon, for the stats JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct HorizonStats {
    /// MoE layers ahead prefetched now.
    pub layers: usize,
    /// Most bytes prefetched per round now.
    pub bytes: u64,
    /// Disk bandwidth seen by the store, bytes per second (0 before any read).
    pub bandwidth: f64,
    /// Compute time of one MoE layer step, seconds (stalls excluded).
    pub layer_seconds: f64,
    /// Experts read per MoE layer step (misses and prefetches).
    pub fetched_per_layer: f64,
    /// Times the horizon was recomputed.
    pub updates: u64,
}

/// See the module docs.
pub struct HorizonControl {
    expert_bytes: u64,
    /// Deepest horizon allowed: the forecaster's look-ahead.
    max_layers: usize,
    last: Option<StoreStats>,
    stats: HorizonStats,
}

impl HorizonControl {
    /// For experts of `expert_bytes` on average and predictions `max_layers` deep.
    pub fn new(expert_bytes: u64, max_layers: usize) -> Self {
        let stats = HorizonStats { layers: 1, bytes: expert_bytes, ..Default::default() };
        HorizonControl { expert_bytes: expert_bytes.max(1), max_layers: max_layers.max(1), last: None, stats }
    }

    /// The horizon in force.
    pub fn horizon(&self) -> Horizon {
        Horizon { layers: self.stats.layers, bytes: self.stats.bytes }
    }

    pub fn stats(&self) -> HorizonStats {
        self.stats
    }

    /// A forward pass of `seconds` with `layer_steps` MoE layer steps ended with the store at
    /// `now`: updates the averages and the horizon.
    pub fn update(&mut self, now: &StoreStats, seconds: f64, layer_steps: u64) {
        let last = self.last.replace(now.clone());
        let Some(last) = last else { return };
        if layer_steps == 0 {
            return;
        }
        let s = &mut self.stats;
        let avg = |old: f64, new: f64| if old == 0.0 { new } else { old + ALPHA * (new - old) };
        let busy = now.busy_seconds - last.busy_seconds;
        let read = now.bytes_read.saturating_sub(last.bytes_read);
        if busy > 1e-6 && read > 0 {
            s.bandwidth = avg(s.bandwidth, read as f64 / busy);
        }
        let stall = now.stall_seconds - last.stall_seconds;
        let compute = (seconds - stall).max(0.0) / layer_steps as f64;
        s.layer_seconds = avg(s.layer_seconds, compute);
        let fetched = (now.misses + now.prefetch_reads).saturating_sub(last.misses + last.prefetch_reads);
        s.fetched_per_layer = avg(s.fetched_per_layer, fetched as f64 / layer_steps as f64);
        s.updates += 1;
        if s.bandwidth > 0.0 && s.layer_seconds > 0.0 {
            let per_layer = s.bandwidth * s.layer_seconds;
            let need = s.fetched_per_layer * self.expert_bytes as f64;
            s.layers = ((need / per_layer).ceil() as usize).clamp(1, self.max_layers);
            s.bytes = ((per_layer * s.layers as f64) as u64).max(self.expert_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(bytes_read: u64, busy: f64, stall: f64, misses: u64) -> StoreStats {
        StoreStats { bytes_read, busy_seconds: busy, stall_seconds: stall, misses, ..StoreStats::default() }
    }

    #[test]
    fn the_horizon_covers_the_reads_a_layer_needs() {
        // 100 MB/s disk, 10 ms of compute per layer: 1 MB per layer of compute. Experts of
        // 1 MB, 3 fetched per layer: three layers ahead.
        let mut h = HorizonControl::new(1_000_000, 8);
        assert_eq!(h.horizon(), Horizon { layers: 1, bytes: 1_000_000 });
        h.update(&at(0, 0.0, 0.0, 0), 0.0, 0);
        // A pass of 10 layers: 0.1 s compute + 0.3 s stall; 30 MB in 0.3 s of busy disk.
        h.update(&at(30_000_000, 0.3, 0.3, 30), 0.4, 10);
        let s = h.stats();
        assert!((s.bandwidth - 1e8).abs() < 1.0 && (s.layer_seconds - 0.01).abs() < 1e-9);
        assert_eq!(h.horizon(), Horizon { layers: 3, bytes: 3_000_000 });
        // A much faster disk: one layer ahead is enough (the average moves a fifth of the way).
        for i in 0..40 {
            let n = 31 + i as u64;
            h.update(&at(30_000_000 + n * 30_000_000, 0.3 + n as f64 * 0.003, 0.3, 30 * n), 0.1, 10);
        }
        assert_eq!(h.horizon().layers, 1);
        // Never deeper than the predictions.
        let mut h = HorizonControl::new(1_000_000, 2);
        h.update(&at(0, 0.0, 0.0, 0), 0.0, 0);
        h.update(&at(1_000_000, 1.0, 1.0, 100), 1.001, 1);
        assert_eq!(h.horizon().layers, 2);
    }
}
