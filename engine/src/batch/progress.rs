//! Progress on stderr: an `indicatif` bar (requests done / total, generated tokens/s, ETA,
//! host-cache hit rate, bytes read per token), or with `--json-progress` the same as one JSON
//! object a line, at most once a second and at the end.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::engine::EngineStats;

pub struct Progress {
    bar: Option<ProgressBar>,
    json: bool,
    total: u64,
    started: Instant,
    last_json: Option<Instant>,
}

/// The figures both forms show.
pub struct Figures {
    pub done: u64,
    pub generated_tokens: u64,
    pub tokens_per_s: f64,
    pub hit_rate: f64,
    pub bytes_per_token: f64,
}

impl Figures {
    pub fn of(done: u64, stats: &EngineStats, seconds: f64) -> Self {
        let c = &stats.expert_cache;
        let tokens = stats.steps.generated_tokens;
        Figures {
            done,
            generated_tokens: tokens,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            hit_rate: c.hits as f64 / ((c.hits + c.misses) as f64).max(1.0),
            bytes_per_token: c.bytes_read as f64 / (tokens as f64).max(1.0),
        }
    }
}

impl Progress {
    /// `total`: requests this run answers; `already`: answered by earlier runs.
    pub fn new(total: u64, already: u64, json: bool) -> Self {
        let bar = (!json).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} requests  {msg}  ETA {eta}")
                    .expect("a valid template"),
            );
            b
        });
        let p = Progress { bar, json, total, started: Instant::now(), last_json: None };
        if already > 0 {
            p.println(&format!("resuming: {already} requests already answered in the output"));
        }
        p
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn update(&mut self, f: &Figures, force: bool) {
        if let Some(b) = &self.bar {
            b.set_position(f.done);
            b.set_message(format!(
                "{:.1} tok/s, cache hits {:.0}%, {:.0} MiB read/token",
                f.tokens_per_s,
                f.hit_rate * 100.0,
                f.bytes_per_token / (1 << 20) as f64
            ));
        }
        if self.json && (force || self.last_json.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))) {
            self.last_json = Some(Instant::now());
            let left = self.total.saturating_sub(f.done);
            let rate = f.done as f64 / self.seconds().max(1e-9);
            eprintln!(
                "{}",
                json!({
                    "done": f.done, "total": self.total, "generated_tokens": f.generated_tokens,
                    "tokens_per_s": f.tokens_per_s, "eta_seconds": if f.done > 0 { Some(left as f64 / rate) } else { None },
                    "cache_hit_rate": f.hit_rate, "bytes_read_per_token": f.bytes_per_token,
                    "elapsed_seconds": self.seconds(),
                })
            );
        }
    }

    /// A line above the bar (or plain, without one).
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(msg),
            // No terminal: plain lines (with --json-progress too: they are not JSON, but a
            // repaired output is worth saying).
            _ => eprintln!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
