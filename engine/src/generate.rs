//! The generation loop: prefill the prompt as one batch, then decode token by token with the
//! KV cache until EOS or the token limit.

use std::time::Instant;

use stevedore_models::{Error, Experts, KvCache, Model};

use crate::record::RoutingRecorder;
use crate::sampling::{Sampler, SamplingParams};
use crate::trace::Phase;

pub type GenerateError = Box<dyn std::error::Error + Send + Sync>;

pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
}

pub struct GenerateOutput {
    /// Generated ids; ends with the EOS id when generation stopped there.
    pub generated_ids: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Tokens produced by decode steps (every generated token after the first).
    pub decode_tokens: usize,
}

impl GenerateOutput {
    pub fn prefill_tokens_per_s(&self, prompt_len: usize) -> f64 {
        rate(prompt_len, self.prefill_seconds)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Positions a KV cache needs for `req` (saturating; see [`check_context`]).
pub fn kv_positions(req: &GenerateRequest) -> usize {
    req.prompt_ids.len().saturating_add(req.max_new_tokens)
}

/// Refuses a request longer than the model runs exactly (`ModelConfig::max_positions`).
pub fn check_context(model: &Model, req: &GenerateRequest) -> Result<(), Error> {
    let limit = model.config.max_positions();
    if kv_positions(req) > limit {
        return Err(Error::Input(format!(
            "the prompt's {} tokens plus --max-new-tokens {} exceed the model's context of {limit} positions \
             (max_position_embeddings{})",
            req.prompt_ids.len(),
            req.max_new_tokens,
            if model.config.sliding_window.is_some() { " or sliding_window" } else { "" }
        )));
    }
    Ok(())
}

/// Runs `req`, calling `on_token` with each new id as soon as it is chosen. With a `recorder`
/// (which wraps `experts`), every forward pass's routing is written to its trace.
pub fn generate(
    model: &Model,
    experts: &dyn Experts,
    recorder: Option<&RoutingRecorder>,
    req: &GenerateRequest,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenerateOutput, GenerateError> {
    let experts: &dyn Experts = match recorder {
        Some(r) => r,
        None => experts,
    };
    let after = |phase| -> Result<(), GenerateError> {
        match recorder {
            Some(r) => Ok(r.end_forward(phase)?),
            None => Ok(()),
        }
    };
    if req.prompt_ids.is_empty() {
        return Err(Error::Input("the prompt is empty".into()).into());
    }
    check_context(model, req)?;
    let mut kv = KvCache::new(&model.config, kv_positions(req));
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut out = GenerateOutput {
        generated_ids: Vec::new(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        decode_tokens: 0,
    };
    if req.max_new_tokens == 0 {
        return Ok(out);
    }
    let eos = &model.config.eos_token_ids;
    let t0 = Instant::now();
    let logits = {
        let _span = tracing::info_span!("prefill", tokens = req.prompt_ids.len()).entered();
        model.forward(&req.prompt_ids, &mut kv, experts)?
    };
    after(Phase::Prefill)?;
    let mut next = sampler.sample(&logits);
    out.prefill_seconds = t0.elapsed().as_secs_f64();
    out.generated_ids.push(next);
    on_token(next);
    let t1 = Instant::now();
    while out.generated_ids.len() < req.max_new_tokens && !eos.contains(&next) {
        let _span = tracing::debug_span!("decode", pos = kv.len()).entered();
        let logits = model.forward(&[next], &mut kv, experts)?;
        after(Phase::Decode)?;
        next = sampler.sample(&logits);
        out.generated_ids.push(next);
        out.decode_tokens += 1;
        on_token(next);
    }
    out.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(out)
}
