//! Recording routing while generating (`stevedore generate --trace FILE`): an [`Experts`] wrapper
//! that notes each MoE layer's choices and hands the weights through untouched.

use std::path::Path;
use std::sync::Mutex;

use stevedore_models::{ExpertWeights, Experts, ExpertsError, LayerRouting, ModelConfig};

use crate::trace::{LayerChoice, Phase, TokenRouting, TraceError, TraceMeta, TraceWriter};

pub struct RoutingRecorder<'a> {
    inner: &'a dyn Experts,
    /// Decoder layer id of each MoE layer.
    layer_ids: Vec<u32>,
    state: Mutex<State>,
}

struct State {
    writer: Option<TraceWriter>,
    /// The tokens of the forward pass in progress, filled layer by layer.
    pending: Vec<TokenRouting>,
    first_pos: usize,
}

impl<'a> RoutingRecorder<'a> {
    pub fn create(
        path: &Path,
        model_name: &str,
        cfg: &ModelConfig,
        inner: &'a dyn Experts,
    ) -> Result<Self, TraceError> {
        let layer_ids: Vec<u32> = cfg.moe_layers().map(|l| l as u32).collect();
        let meta = TraceMeta {
            model: model_name.to_owned(),
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
            layer_ids: layer_ids.clone(),
        };
        let writer = TraceWriter::create(path, &meta)?;
        Ok(RoutingRecorder {
            inner,
            layer_ids,
            state: Mutex::new(State { writer: Some(writer), pending: Vec::new(), first_pos: 0 }),
        })
    }

    /// Ends a forward pass: writes its tokens' routing to the trace.
    pub fn end_forward(&self, phase: Phase) -> Result<(), TraceError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let pending = std::mem::take(&mut st.pending);
        let writer = st.writer.as_mut().expect("writer present until finish");
        for mut t in pending {
            t.phase = phase;
            writer.write_token(&t)?;
        }
        Ok(())
    }

    pub fn finish(self) -> Result<(), TraceError> {
        let st = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        st.writer.expect("writer present until finish").finish()
    }
}

impl Experts for RoutingRecorder<'_> {
    fn for_each(
        &self,
        routing: &LayerRouting<'_>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError> {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let moe = self.layer_ids.iter().position(|&l| l as usize == routing.layer).ok_or_else(|| {
                format!("layer {} routed experts but the config marks it dense", routing.layer)
            })?;
            let n = routing.n_tokens();
            if st.pending.is_empty() || st.first_pos != routing.first_pos {
                st.first_pos = routing.first_pos;
                st.pending = (0..n)
                    .map(|t| TokenRouting {
                        seq: 0,
                        pos: (routing.first_pos + t) as u32,
                        token_id: routing.tokens.get(t).copied(),
                        phase: Phase::Prefill,
                        layers: vec![None; self.layer_ids.len()],
                    })
                    .collect();
            }
            let k = routing.top_k;
            for (t, tok) in st.pending.iter_mut().enumerate() {
                tok.layers[moe] = Some(LayerChoice {
                    experts: routing.topk_ids[t * k..(t + 1) * k].to_vec(),
                    weights: routing.topk_weights[t * k..(t + 1) * k].to_vec(),
                });
            }
        }
        self.inner.for_each(routing, f)
    }
}
