//! `GET /metrics`: Prometheus text exposition through the `prometheus-client` crate. Request,
//! token and latency metrics are counted by the server as requests run; the engine's own counters
//! (batches, KV blocks, the expert cache, prefetching, prediction) are read from
//! [`Engine::stats`] at each scrape, so they are never stale and never counted twice.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::engine::{Engine, BATCH_SIZE_BOUNDS};

type Labels = Vec<(&'static str, String)>;

/// What the server counts itself.
pub struct Metrics {
    registry: Registry,
    /// By endpoint and HTTP status.
    pub requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// Requests whose client went away before the end.
    pub disconnects: Counter,
    pub in_flight: Gauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
}

impl Metrics {
    pub fn new(engine: Arc<Engine>) -> Self {
        let mut registry = Registry::with_prefix("stevedore");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "HTTP requests answered, by endpoint and status", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens of requests run", prompt_tokens.clone());
        let generated_tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated for clients", generated_tokens.clone());
        let disconnects = Counter::default();
        registry.register(
            "client_disconnects",
            "Requests cancelled because the client went away",
            disconnects.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("requests_in_flight", "Sequences accepted and not yet finished", in_flight.clone());
        // 1 ms .. ~65 s.
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            time_to_first_token.clone(),
        );
        // 0.25 ms .. ~8 s.
        let inter_token_latency = Histogram::new(exponential_buckets(0.00025, 2.0, 16));
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence",
            inter_token_latency.clone(),
        );
        let request_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from arrival to the last token",
            request_duration.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { engine }));
        Metrics {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            disconnects,
            in_flight,
            time_to_first_token,
            inter_token_latency,
            request_duration,
        }
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![("endpoint", endpoint.to_owned()), ("status", status.to_string())])
            .inc();
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The engine's counters at scrape time.
struct EngineCollector {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

fn counter<N: prometheus_client::encoding::EncodeCounterValue + Send + Sync + std::fmt::Debug>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &Labels,
    v: N,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let mut m = e.encode_descriptor(name, help, None, c.metric_type())?;
    if labels.is_empty() {
        c.encode(m)
    } else {
        c.encode(m.encode_family(labels)?)
    }
}

/// One counter family with a series per label set (every set the same label names).
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for EngineCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.engine.stats();
        let steps = &s.steps;
        let none = Labels::new();
        counter(&mut e, "engine_steps", "Forward passes run", &none, steps.steps)?;
        counter(&mut e, "engine_prefill_rows", "Prompt token rows run", &none, steps.prefill_rows)?;
        counter(&mut e, "engine_decode_rows", "Generated token rows fed back", &none, steps.decode_rows)?;
        counter(&mut e, "engine_forward_seconds", "Time in forward passes", &none, steps.forward_seconds)?;
        counter(&mut e, "engine_requests_finished", "Sequences finished", &none, steps.requests_finished)?;
        counter(&mut e, "engine_requests_failed", "Sequences failed", &none, steps.requests_failed)?;
        counter(
            &mut e,
            "engine_requests_cancelled",
            "Sequences cancelled (their KV blocks freed)",
            &none,
            steps.requests_cancelled,
        )?;
        gauge(&mut e, "batch_running_sequences", "Sequences in the running batch", steps.running as i64)?;
        gauge(&mut e, "queue_depth", "Requests waiting for a batch slot or KV blocks", steps.waiting as i64)?;
        gauge(&mut e, "kv_blocks_used", "KV cache blocks in use", steps.kv_blocks_used as i64)?;
        gauge(&mut e, "kv_blocks_total", "KV cache blocks in all", steps.kv_blocks_total as i64)?;
        // Sequences per forward pass, as a histogram (per-bucket counts: the encoder makes them
        // cumulative).
        let buckets: Vec<(f64, u64)> = BATCH_SIZE_BOUNDS
            .iter()
            .map(|&b| b as f64)
            .chain([f64::INFINITY])
            .zip(steps.batch_sizes.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        let total: u64 = steps.batch_sizes.iter().sum();
        let mut m = e.encode_descriptor(
            "batch_sequences",
            "Sequences per forward pass",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            // The sum is of sequences; rows (prompt chunks count several) are exported apart.
            steps.batch_sizes_sum as f64,
            total,
            &buckets,
            None,
        )?;

        let c = &s.expert_cache;
        let tier = vec![("tier", "host".to_owned()), ("precision", self.engine.expert_precision())];
        // Hits, misses and bytes per precision: the checkpoint's, and the low-bit copies'
        // under the HOBBIT policy.
        let p = &c.precision;
        let mut by_precision = vec![(tier.clone(), p.full_hits, p.full_misses, p.full_bytes_read)];
        if let Some(low) = p.low_format {
            let labels = vec![("tier", "host".to_owned()), ("precision", low.to_ascii_lowercase())];
            by_precision.push((labels, p.low_hits, p.low_misses, p.low_bytes_read));
        }
        let family = |name: &str, help: &str, value: fn(&(Labels, u64, u64, u64)) -> u64| {
            let series: Vec<(Labels, u64)> = by_precision.iter().map(|b| (b.0.clone(), value(b))).collect();
            (name.to_owned(), help.to_owned(), series)
        };
        for (name, help, series) in [
            family("expert_cache_hits", "Experts found resident (or already being read)", |b| b.1),
            family("expert_cache_misses", "Experts that had to be read", |b| b.2),
            family("expert_bytes_read", "Bytes read from the shard files", |b| b.3),
        ] {
            counters(&mut e, &name, &help, &series)?;
        }
        counter(&mut e, "expert_skipped", "Experts the HOBBIT policy skipped", &tier, p.skipped)?;
        counter(&mut e, "expert_cache_evictions", "Experts evicted", &tier, c.evictions)?;
        counter(&mut e, "expert_reads", "Expert reads completed", &tier, c.reads)?;
        counter(&mut e, "expert_read_failures", "Expert reads that failed", &tier, c.failed_reads)?;
        counter(
            &mut e,
            "expert_read_stall_seconds",
            "Time layers waited for expert bytes or room",
            &none,
            c.stall_seconds,
        )?;
        counter(&mut e, "prefetch_issued", "Expert reads started ahead of need", &tier, c.prefetch_reads)?;
        counter(&mut e, "prefetch_useful", "Prefetched experts later used", &tier, c.prefetch_hits)?;
        gauge(
            &mut e,
            "expert_cache_resident_bytes",
            "Bytes of experts resident in host RAM",
            c.resident_bytes as i64,
        )?;
        gauge(&mut e, "expert_cache_budget_bytes", "The host expert cache's budget", c.budget_bytes as i64)?;
        if let Some(f) = &s.forecast {
            counter(&mut e, "predictor_predictions", "Routing predictions made", &none, f.predictions)?;
            counter(
                &mut e,
                "predictor_predicted_experts",
                "Experts predicted, over all scored predictions",
                &none,
                f.predicted,
            )?;
            counter(
                &mut e,
                "predictor_correct_experts",
                "Predicted experts the layer then used",
                &none,
                f.correct,
            )?;
            counter(
                &mut e,
                "predictor_routed_experts",
                "Experts the predicted layers used",
                &none,
                f.routed,
            )?;
            gauge(&mut e, "predictor_precision", "Correct / predicted experts", f.precision())?;
            gauge(&mut e, "predictor_recall", "Correct / routed experts", f.recall())?;
        }
        Ok(())
    }
}
