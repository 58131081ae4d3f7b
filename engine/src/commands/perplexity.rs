//! `stevedore perplexity`: the teacher-forced perplexity of a text file, with the chunking of
//! llama.cpp's `llama-perplexity` (`tools/perplexity/perplexity.cpp`), so that the numbers compare.
//!
//! The text is tokenized once with the model's tokenizer (a BOS in front when the tokenizer adds
//! one, as llama.cpp's `common_tokenize(.., add_special = true)` does; no other special tokens),
//! cut into consecutive chunks of `--context` tokens (the remainder dropped), and each chunk's
//! first token replaced by BOS when the tokenizer adds one. Each chunk runs as its own sequence
//! from position 0; only the second half of its predictions counts: with `first = context / 2`,
//! the tokens at positions `first + 1 ..= context - 1`, each given the chunk's tokens before it
//! (`context - 1 - first` per chunk). PPL = exp(mean negative log-likelihood over every scored
//! token), and its error is llama.cpp's: sqrt(var(NLL) / (n - 1)) x PPL.
//!
//! Every chunk is one engine request asking for its prompt's log-probabilities and no new
//! tokens ([`Request::prompt_logprobs`]), all submitted at once, so they share forward passes.
//! A sequence's log-probabilities do not depend on its batch or on how its prompt is chunked, so
//! the result is the same at any `--max-batch`, `engine.max_batch_tokens` or host-cache budget.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use stevedore_models::SeqId;

use super::engine_args::EngineArgs;
use super::CliError;
use crate::engine::{EngineError, Event, Request};
use crate::sampling::SamplingParams;
use crate::size::human;

/// `--context` when none is given: llama.cpp's default, or the model's context if shorter.
pub const DEFAULT_CONTEXT: usize = 512;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The text to score (UTF-8), tokenized whole with the model's tokenizer.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per chunk (default: 512, or the model's context if shorter). At least 3: the
    /// second half of each chunk is scored.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Score only the first K chunks (default: every whole chunk of the text).
    #[arg(long, value_name = "K")]
    pub chunks: Option<usize>,
    /// Print one JSON object (ppl, nll_mean, tokens scored, chunks, context, seconds, stats).
    #[arg(long)]
    pub json: bool,
}

/// The chunks llama.cpp's perplexity runs: `tokens` (BOS included when the tokenizer adds one)
/// cut into consecutive pieces of `context` tokens from the start, the remainder dropped, at
/// most `limit` of them, each one's first token replaced by `bos` when given.
pub fn chunk_tokens(tokens: &[u32], context: usize, limit: Option<usize>, bos: Option<u32>) -> Vec<Vec<u32>> {
    let whole = tokens.chunks_exact(context);
    let n = limit.map_or(whole.len(), |k| k.min(whole.len()));
    whole
        .take(n)
        .map(|c| {
            let mut c = c.to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect()
}

/// The log-probabilities of a chunk that count, from its prompt log-probabilities (entry `i`
/// predicts token `i + 1`): those of the tokens at positions `context / 2 + 1 ..= context - 1`.
pub fn scored(prompt_logprobs: &[f32]) -> &[f32] {
    let context = prompt_logprobs.len() + 1;
    &prompt_logprobs[context / 2..]
}

/// Negative log-likelihood totals over scored tokens, in f64.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Nll {
    pub sum: f64,
    pub sum_sq: f64,
    pub count: usize,
}

impl Nll {
    pub fn add(&mut self, logprobs: &[f32]) {
        for &lp in logprobs {
            let nll = -f64::from(lp);
            self.sum += nll;
            self.sum_sq += nll * nll;
        }
        self.count += logprobs.len();
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }

    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// llama.cpp's estimate of PPL's standard error: the NLL's standard error of the mean,
    /// sqrt((E[x^2] - E[x]^2) / (n - 1)), times PPL. `None` under two scored tokens.
    pub fn ppl_error(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let n = self.count as f64;
        let var = (self.sum_sq / n - self.mean() * self.mean()).max(0.0);
        Some((var / (n - 1.0)).sqrt() * self.ppl())
    }
}

/// `path`'s text: an error naming the file when it cannot be read, is not UTF-8 or is empty.
fn read_text(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!("{}: the file is empty: nothing to score", path.display()).into());
    }
    Ok(text)
}

/// `--context`, checked against the model's context (`limit`, from config.json's `fields`).
fn context(asked: Option<usize>, limit: usize, fields: &str) -> Result<usize, CliError> {
    match asked {
        None => Ok(DEFAULT_CONTEXT.min(limit)),
        Some(c) if c < 3 => {
            Err(format!("--context {c} is too small: at least 3 tokens (the second half of a chunk is scored)").into())
        }
        Some(c) if c > limit => Err(format!(
            "--context {c} is more than the model's context of {limit} positions ({fields}); give at most {limit}"
        )
        .into()),
        Some(c) => Ok(c),
    }
}

/// Prints chunk results in order as they arrive (`[1]12.3456,[2]...`, llama.cpp's running PPL)
/// under an `indicatif` bar; without a terminal the bar is hidden and the line printed as it grows.
struct Progress {
    bar: ProgressBar,
    line: String,
    started: Instant,
}

impl Progress {
    fn new(chunks: usize) -> Self {
        let bar = ProgressBar::with_draw_target(Some(chunks as u64), ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} chunks  {msg}  ETA {eta}")
                .expect("a valid template"),
        );
        Progress { bar, line: String::new(), started: Instant::now() }
    }

    /// Chunk `k` (from 1) is done and `nll` covers chunks 1..=k; `tokens` have run.
    fn chunk(&mut self, k: usize, nll: &Nll, tokens: usize) {
        let entry = format!("[{k}]{:.4},", nll.ppl());
        self.bar.set_position(k as u64);
        if self.bar.is_hidden() {
            eprint!("{entry}");
            let _ = std::io::stderr().flush();
        } else {
            let rate = tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            self.bar.set_message(format!("PPL {:.4}, {rate:.1} tok/s", nll.ppl()));
        }
        self.line.push_str(&entry);
    }

    fn finish(self) {
        if self.bar.is_hidden() {
            eprintln!();
        } else {
            self.bar.finish_and_clear();
            eprintln!("{}", self.line);
        }
    }
}

pub fn run(args: &PerplexityArgs) -> Result<(), CliError> {
    if args.chunks == Some(0) {
        return Err("--chunks must be at least 1".into());
    }
    let settings = args.engine.settings()?;
    let text = read_text(&args.text)?;
    let loaded = settings.load()?;
    let tokenizer = loaded.text().ok_or_else(|| {
        format!(
            "{}: not found; perplexity needs the model's tokenizer",
            args.engine.model.join("tokenizer.json").display()
        )
    })?;
    let cfg = &loaded.model().config;
    let fields = match (cfg.sliding_window, cfg.rope_kind) {
        (Some(_), _) => "max_position_embeddings or sliding_window",
        (None, stevedore_models::RopeKind::LongRope) => "LongRoPE's original_max_position_embeddings",
        (None, _) => "max_position_embeddings",
    };
    let context = context(args.context, cfg.max_positions(), fields)?;
    let bos = tokenizer.added_bos()?;
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    tokens.extend(tokenizer.encode_with(&text, false).map_err(|e| format!("{}: {e}", args.text.display()))?);
    let chunks = chunk_tokens(&tokens, context, args.chunks, bos);
    if chunks.is_empty() {
        return Err(format!(
            "{}: too short: it has {} tokens{}, and one chunk needs {context} (--context); give a longer text or \
             a smaller --context",
            args.text.display(),
            tokens.len(),
            if bos.is_some() { " with the BOS" } else { "" }
        )
        .into());
    }

    // KV: as many chunks as may run at once, unless given.
    let kv_cache = settings.kv_cache.unwrap_or_else(|| {
        let resident = chunks.len().min(settings.resident());
        settings.default_kv(loaded.kv_bytes_for(std::iter::repeat_n(context, resident)))
    });
    let engine = settings.start(loaded, kv_cache)?;
    let started = Instant::now();
    let (tx, rx) = crossbeam_channel::unbounded::<(SeqId, Event)>();
    // Kept until the end: dropping a handle cancels its request.
    let mut handles = Vec::with_capacity(chunks.len());
    let mut chunk_of = std::collections::HashMap::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let req = Request {
            prompt_ids: chunk.clone(),
            max_new_tokens: 0,
            sampling: SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
            prompt_logprobs: true,
        };
        let h = engine.submit_to(req, &tx).map_err(|e| format!("chunk {}: {e}", k + 1))?;
        chunk_of.insert(h.id(), k);
        handles.push(h);
    }
    drop(tx);

    let mut progress = Progress::new(chunks.len());
    let mut results: Vec<Option<Vec<f32>>> = vec![None; chunks.len()];
    let (mut total, mut shown, mut left) = (Nll::default(), 0, chunks.len());
    for (id, event) in rx.iter() {
        let k = chunk_of[&id];
        let logprobs = match event {
            Event::Token { .. } => continue,
            Event::Failed(msg) => {
                return Err(format!("chunk {} (tokens {}..): {msg}", k + 1, k * context).into())
            }
            Event::Finished(c) => c.prompt_logprobs.ok_or(EngineError::Stopped)?,
        };
        results[k] = Some(logprobs);
        // Running PPL in chunk order, as llama.cpp prints it.
        while let Some(Some(lp)) = results.get(shown) {
            total.add(scored(lp));
            shown += 1;
            progress.chunk(shown, &total, shown * context);
        }
        left -= 1;
        if left == 0 {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    drop(handles);
    if shown < chunks.len() {
        return Err(EngineError::Stopped.into());
    }
    let dense = engine.model().dense_bytes();
    let stats = engine.finish()?;
    let per_chunk: Vec<f64> = results
        .iter()
        .map(|r| {
            let mut n = Nll::default();
            n.add(scored(r.as_deref().expect("every chunk finished")));
            n.mean()
        })
        .collect();
    let run_tokens = chunks.len() * context;
    if args.json {
        println!(
            "{}",
            json!({
                "text": args.text,
                "text_tokens": tokens.len(),
                "bos": bos,
                "context": context,
                "chunks": chunks.len(),
                "tokens_scored": total.count,
                "nll_mean": total.mean(),
                "ppl": total.ppl(),
                "ppl_error": total.ppl_error(),
                "nll_per_chunk": per_chunk,
                "seconds": seconds,
                "tokens_per_s": run_tokens as f64 / seconds.max(1e-9),
                "stats": super::generate::stats_json(&stats, dense),
            })
        );
    } else {
        match total.ppl_error() {
            Some(err) => println!("PPL = {:.4} +/- {err:.5}", total.ppl()),
            None => println!("PPL = {:.4}", total.ppl()),
        }
        let cache = &stats.expert_cache;
        eprintln!(
            "{} chunks of {context} tokens ({} scored) in {seconds:.1} s ({:.1} tok/s); expert cache {} {} budget, \
             {} hits, {} misses, {} read ({}), peak RSS {}",
            chunks.len(),
            total.count,
            run_tokens as f64 / seconds.max(1e-9),
            cache.policy,
            human(cache.budget_bytes),
            cache.hits,
            cache.misses,
            human(cache.bytes_read),
            if cache.direct_io { "O_DIRECT" } else { "buffered" },
            crate::sys::peak_rss_bytes().map(human).unwrap_or_else(|| "unknown".into()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_whole_and_start_with_bos() {
        let tokens: Vec<u32> = (10..31).collect(); // 21 tokens
        let c = chunk_tokens(&tokens, 8, None, Some(1));
        assert_eq!(c, [vec![1, 11, 12, 13, 14, 15, 16, 17], vec![1, 19, 20, 21, 22, 23, 24, 25]]);
        assert_eq!(chunk_tokens(&tokens, 8, Some(1), None), [(10..18).collect::<Vec<u32>>()]);
        assert_eq!(chunk_tokens(&tokens, 8, Some(5), None).len(), 2);
        assert!(chunk_tokens(&tokens, 22, None, Some(1)).is_empty());
    }

    #[test]
    fn the_second_half_is_scored() {
        // context 8: first = 4, tokens 5, 6, 7 scored: prompt log-probabilities 4, 5, 6.
        let lp = [-0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
        assert_eq!(scored(&lp), [-4.0, -5.0, -6.0]);
        // context 7: first = 3, tokens 4, 5, 6.
        assert_eq!(scored(&lp[..6]), [-3.0, -4.0, -5.0]);
        // context 3: first = 1, token 2 only.
        assert_eq!(scored(&lp[..2]), [-1.0]);
    }

    #[test]
    fn nll_totals_ppl_and_llama_cpp_error() {
        let mut n = Nll::default();
        n.add(&[-1.0, -3.0]);
        assert_eq!((n.count, n.mean()), (2, 2.0));
        assert!((n.ppl() - 2f64.exp()).abs() < 1e-12);
        // E[x^2] - E[x]^2 = 5 - 4 = 1; sqrt(1 / 1) x e^2
        assert!((n.ppl_error().unwrap() - 2f64.exp()).abs() < 1e-12);
        let mut one = Nll::default();
        one.add(&[-1.0]);
        assert_eq!(one.ppl_error(), None);
    }

    #[test]
    fn context_defaults_and_limits() {
        let f = "max_position_embeddings";
        assert_eq!(context(None, 4096, f).unwrap(), 512);
        assert_eq!(context(None, 256, f).unwrap(), 256);
        assert_eq!(context(Some(100), 256, f).unwrap(), 100);
        assert!(context(Some(257), 256, f).unwrap_err().to_string().contains(
            "--context 257 is more than the model's context of 256 positions (max_position_embeddings)"
        ));
        assert!(context(Some(2), 256, f).unwrap_err().to_string().contains("at least 3"));
    }

    #[test]
    fn the_bos_the_tokenizer_adds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let pydoc = crate::text::Text::load(&dir.join("pydoc-moe")).unwrap().unwrap();
        assert_eq!(pydoc.added_bos().unwrap(), Some(1));
        let bytes = crate::text::Text::load(&dir.join("bytes-tokenizer")).unwrap().unwrap();
        assert_eq!(bytes.added_bos().unwrap(), None);
        assert_eq!(bytes.encode("ab").unwrap(), [97, 98]);
    }
}
