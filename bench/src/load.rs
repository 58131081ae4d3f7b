//! A load generator for `stevedore serve`: N client threads, each sending streaming completion
//! requests one after another over real HTTP, timing every chunk as it arrives; and the
//! percentiles and report of the `serve-load` benchmark.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

/// A `stevedore serve` child process on a free loopback port; stopped with SIGTERM on drop.
pub struct ServerProcess {
    child: Child,
    pub base: String,
}

impl ServerProcess {
    /// Starts `bin serve --port 0 ARGS` and waits (up to two minutes) for the address it prints.
    pub fn start(bin: &Path, args: &[String]) -> Result<ServerProcess, String> {
        let mut child = Command::new(bin)
            .args(["serve", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let _ = tx.send(Ok(rest.split_whitespace().next().unwrap_or_default().to_owned()));
                }
                lines.push(line);
            }
            let _ = tx.send(Err(lines.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(addr)) => Ok(ServerProcess { child, base: format!("http://{addr}") }),
            Ok(Err(log)) => Err(format!("the server exited before listening:\n{log}")),
            Err(_) => {
                let _ = child.kill();
                Err("the server did not start listening within two minutes".into())
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed request as the client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// From sending to the first chunk with text.
    pub ttft_seconds: f64,
    /// Between consecutive chunks with text.
    pub gaps_seconds: Vec<f64>,
    pub completion_tokens: u64,
    pub start_seconds: f64,
    pub end_seconds: f64,
}

/// Sends one streaming completion of `prompt_ids` and times it (times relative to `epoch`).
pub fn stream_once(
    agent: &ureq::Agent,
    base: &str,
    prompt_ids: &[u32],
    max_tokens: usize,
    epoch: Instant,
) -> Result<Timing, String> {
    let body = json!({
        "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let r = agent
        .post(&format!("{base}/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| format!("request failed: {e}"))?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut first = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut tokens = None;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.map_err(|e| format!("reading the stream: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("bad chunk ({e}): {data}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("the server failed the request: {e}"));
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n);
        }
        let has_text = v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match last {
                None => first = Some(now - start),
                Some(t) => gaps.push((now - t).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Ok(Timing {
        ttft_seconds: first.ok_or("no text came back")?.as_secs_f64(),
        gaps_seconds: gaps,
        completion_tokens: tokens.ok_or("no usage chunk came back")?,
        start_seconds: (start - epoch).as_secs_f64(),
        end_seconds: epoch.elapsed().as_secs_f64(),
    })
}

/// The `p`-th percentile (0-100) by nearest rank; 0 for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// One concurrency level's results.
#[derive(Clone, Debug, Serialize)]
pub struct Level {
    pub clients: usize,
    pub requests: usize,
    pub tokens: u64,
    pub wall_seconds: f64,
    pub tokens_per_s: f64,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub itl_p50: f64,
    pub itl_p99: f64,
    /// From the server's /metrics: sequences per forward pass, expert bytes read per token.
    pub sequences_per_pass: f64,
    pub bytes_read_per_token: f64,
    pub x_one: f64,
}

impl Level {
    pub fn of(clients: usize, timings: &[Timing], metrics: &str) -> Level {
        let tokens: u64 = timings.iter().map(|t| t.completion_tokens).sum();
        let start = timings.iter().map(|t| t.start_seconds).fold(f64::INFINITY, f64::min);
        let end = timings.iter().map(|t| t.end_seconds).fold(0.0, f64::max);
        let wall = (end - start).max(1e-9);
        let ttft: Vec<f64> = timings.iter().map(|t| t.ttft_seconds).collect();
        let gaps: Vec<f64> = timings.iter().flat_map(|t| t.gaps_seconds.iter().copied()).collect();
        let m = |name: &str| metric_sum(metrics, name);
        Level {
            clients,
            requests: timings.len(),
            tokens,
            wall_seconds: wall,
            tokens_per_s: tokens as f64 / wall,
            ttft_p50: percentile(&ttft, 50.0),
            ttft_p99: percentile(&ttft, 99.0),
            itl_p50: percentile(&gaps, 50.0),
            itl_p99: percentile(&gaps, 99.0),
            sequences_per_pass: m("stevedore_batch_sequences_sum")
                / m("stevedore_batch_sequences_count").max(1.0),
            bytes_read_per_token: m("stevedore_expert_bytes_read_total") / (tokens as f64).max(1.0),
            x_one: 0.0,
        }
    }
}

/// The sum of a metric's samples (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The report's table.
pub fn markdown(levels: &[Level]) -> String {
    let mut s = String::from(
        "| clients | requests | tokens | tok/s (total) | x one | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | sequences/pass | read/token |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let ms = |x: f64| format!("{:.0} ms", x * 1e3);
    for l in levels {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {:.1} | {:.0} MiB |\n",
            l.clients,
            l.requests,
            l.tokens,
            l.tokens_per_s,
            l.x_one,
            ms(l.ttft_p50),
            ms(l.ttft_p99),
            ms(l.itl_p50),
            ms(l.itl_p99),
            l.sequences_per_pass,
            l.bytes_read_per_token / (1 << 20) as f64,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_metric_sums() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 0.0)), (3.0, 5.0, 1.0));
        assert_eq!(percentile(&[], 50.0), 0.0);
        let text = "# TYPE x counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\ny 1\n";
        assert_eq!(metric_sum(text, "x_total"), 5.5);
        assert_eq!(metric_sum(text, "y"), 1.0);
    }
}
