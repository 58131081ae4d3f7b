//! Recording routing while generating (`--trace FILE`): every token of every forward pass, with
//! its sequence, position, step and each MoE layer's choice (and, for the tokens that use them,
//! the next-gate estimates each layer made, and the step's prefetch horizon when measured), in
//! stevedore's trace format
//! (`docs/traces.md`). The simulator replays such a trace with the engine's own schedule.

use std::path::Path;

use stevedore_models::{ExpertPlan, LayerMap, ModelConfig};

use crate::trace::{Foreseen, Horizon, LayerChoice, Phase, TokenRouting, TraceError, TraceMeta, TraceWriter};

/// One row of a forward pass as the recorder needs it.
#[derive(Clone, Copy, Debug)]
pub struct RecordRow {
    pub seq: u64,
    pub pos: usize,
    pub token: u32,
    pub phase: Phase,
}

pub struct Recorder {
    writer: TraceWriter,
    /// Forward passes begun so far.
    step: u64,
    /// The tokens of the forward pass in progress, filled layer by layer.
    pending: Vec<TokenRouting>,
    /// Per pending token: whether it is its sequence's only row in the pass, the tokens whose
    /// next-gate estimates the forecaster uses and the trace keeps.
    alone: Vec<bool>,
}

impl Recorder {
    pub fn create(
        path: &Path,
        model_name: &str,
        cfg: &ModelConfig,
        layers: &LayerMap,
    ) -> Result<Self, TraceError> {
        let meta = TraceMeta {
            model: model_name.to_owned(),
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
            layer_ids: layers.moe_layers().iter().map(|l| l.0 as u32).collect(),
        };
        let writer = TraceWriter::create(path, &meta)?;
        Ok(Recorder { writer, step: 0, pending: Vec::new(), alone: Vec::new() })
    }

    /// A forward pass begins with `rows` (a sequence's rows contiguous), prefetching as far
    /// as `horizon` when that was set from measurement.
    pub fn begin_step(&mut self, rows: &[RecordRow], moe_layers: usize, horizon: Option<Horizon>) {
        self.alone = crate::forecast::alone_rows(&rows.iter().map(|r| r.seq).collect::<Vec<_>>());
        self.pending = rows
            .iter()
            .map(|r| TokenRouting {
                ahead: Vec::new(),
                seq: r.seq,
                pos: r.pos as u32,
                step: Some(self.step),
                token_id: Some(r.token),
                phase: r.phase,
                layers: vec![None; moe_layers],
                horizon,
            })
            .collect();
        self.step += 1;
    }

    /// The next-gate estimates made from the rows' embeddings at the pass's start (`ahead(r)`),
    /// kept for the rows that use them.
    pub fn record_start<'a>(&mut self, ahead: impl Fn(usize) -> crate::forecast::RowAhead<'a>) {
        for (r, tok) in self.pending.iter_mut().enumerate().filter(|(r, _)| self.alone[*r]) {
            for (layer, experts, probs) in ahead(r) {
                tok.ahead.push(Foreseen {
                    at: None,
                    layer,
                    experts: experts.to_vec(),
                    probs: probs.to_vec(),
                });
            }
        }
    }

    /// An MoE layer routed the pass's rows (those of failed sequences are left unrecorded).
    pub fn record(&mut self, plan: &ExpertPlan<'_>) {
        for (r, tok) in self.pending.iter_mut().enumerate() {
            if plan.routed.get(r).copied().unwrap_or(false) {
                let (experts, weights) = plan.choice(r);
                tok.layers[plan.moe.0] =
                    Some(LayerChoice { experts: experts.to_vec(), weights: weights.to_vec() });
                if self.alone[r] {
                    for g in plan.ahead {
                        let (experts, probs) = g.row(r);
                        tok.ahead.push(Foreseen {
                            at: Some(plan.moe.0),
                            layer: g.moe.0,
                            experts: experts.to_vec(),
                            probs: probs.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// The forward pass ended: writes its tokens.
    pub fn end_step(&mut self) -> Result<(), TraceError> {
        for t in std::mem::take(&mut self.pending) {
            self.writer.write_token(&t)?;
        }
        Ok(())
    }

    /// Flushes the file.
    pub fn finish(self) -> Result<(), TraceError> {
        self.writer.finish()
    }
}
