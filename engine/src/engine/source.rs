//! The expert source of one forward pass: each MoE layer's plan is recorded (with `--trace`),
//! fed to the forecaster (predictive policy), and streamed from the store with the forecast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use stevedore_models::{ExpertPlan, ExpertSource, ExpertStream, ExpertsError, Foresight, LayerId};

use super::lock;
use crate::forecast::Forecaster;
use crate::record::Recorder;
use crate::store::ExpertStore;

/// Routes collected for regrouping: for each batch row that is its sequence's last, the
/// sequence's index in the running set; and the (index, MoE layer, experts) the rows took.
pub(crate) type RouteRows = (Vec<Option<usize>>, Mutex<Vec<(usize, usize, Vec<u32>)>>);

pub(crate) struct StepSource<'a> {
    pub store: &'a ExpertStore,
    pub forecaster: Option<&'a Mutex<Forecaster>>,
    pub recorder: &'a Mutex<Option<Recorder>>,
    /// MoE layers that streamed experts this pass, and the distinct experts they used in all.
    pub layer_steps: AtomicU64,
    pub layer_experts: AtomicU64,
    /// With regrouping: the routes of each sequence's last row.
    pub route_rows: Option<RouteRows>,
    /// The next-gate estimates each layer makes for the forecaster (and the trace).
    pub foresight: Option<Foresight>,
}

impl ExpertSource for StepSource<'_> {
    fn foresight(&self) -> Option<Foresight> {
        self.foresight
    }

    fn routing_bias(&self, layer: LayerId) -> Option<Vec<f32>> {
        self.store.routing_bias(layer)
    }

    fn stream<'p>(&'p self, plan: &'p ExpertPlan<'_>) -> Result<Box<dyn ExpertStream + 'p>, ExpertsError> {
        if let Some(r) = lock(self.recorder).as_mut() {
            r.record(plan);
        }
        self.layer_steps.fetch_add(1, Ordering::Relaxed);
        self.layer_experts.fetch_add(plan.experts.len() as u64, Ordering::Relaxed);
        if let Some((of_row, routes)) = &self.route_rows {
            let mut routes = lock(routes);
            for (r, seq) in of_row.iter().enumerate() {
                if let (Some(i), true) = (seq, plan.routed[r]) {
                    routes.push((*i, plan.moe.0, plan.choice(r).0.to_vec()));
                }
            }
        }
        let candidates = match self.forecaster {
            Some(f) => lock(f).observe(
                plan.moe.0,
                |r| plan.routed[r].then(|| plan.choice(r)),
                |r| {
                    (plan.ahead.iter())
                        .map(|g| {
                            let (experts, probs) = g.row(r);
                            (g.moe.0, experts, probs)
                        })
                        .collect()
                },
            ),
            None => Vec::new(),
        };
        match self.store.stream(plan, &candidates) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => Err(Arc::new(e)),
        }
    }
}
