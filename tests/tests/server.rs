//! `stevedore serve` end to end: a real server on a free loopback port, real HTTP clients (ureq
//! here; curl and the official `openai` Python package in `server_clients.rs`), on `pydoc-moe`.
//! Greedy results equal `stevedore generate`'s; 32 concurrent clients each get their
//! single-client result; a client that leaves mid-stream frees its sequence; a full queue answers
//! 429; every bad request gets its status and OpenAI's error shape; metrics parse and move.

mod common;

use std::time::{Duration, Instant};

use common::http::{collect_stream, get, metric, post, post_raw, Events, Server};
use common::{fixture_dir, stevedore, PYDOC_MOE};
use serde_json::{json, Value};

fn model() -> String {
    fixture_dir(PYDOC_MOE).display().to_string()
}

/// `stevedore generate`'s greedy text for `prompt`.
fn generate(prompt: &str, max_new_tokens: usize) -> (String, usize) {
    let n = max_new_tokens.to_string();
    let out =
        stevedore(["generate", "--model", &model(), "--prompt", prompt, "--max-new-tokens", &n, "--json"]);
    let v: Value = serde_json::from_str(out.ok()).unwrap();
    (v["text"].as_str().unwrap().to_owned(), v["prompt_ids"].as_array().unwrap().len())
}

fn completion(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": PYDOC_MOE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

/// A completion's text, streamed or not.
fn complete(server: &Server, body: &Value) -> String {
    let url = server.url("/v1/completions");
    if body["stream"] == json!(true) {
        let (status, events) = Events::open(&url, body);
        assert_eq!(status, 200);
        collect_stream(events).0.remove(0).0
    } else {
        let r = post(&url, body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
    }
}

#[test]
fn greedy_results_equal_generate_streaming_or_not_chat_or_completion() {
    let server = Server::start(&["--model", &model()]);
    let prompt = "The import statement";
    let (expected, prompt_tokens) = generate(prompt, 40);
    let r = post(&server.url("/v1/completions"), &completion(prompt, 40, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], json!(expected));
    assert_eq!(v["usage"]["prompt_tokens"], json!(prompt_tokens));
    let (status, events) = Events::open(&server.url("/v1/completions"), &completion(prompt, 40, true));
    assert_eq!(status, 200);
    let (choices, usage) = collect_stream(events);
    assert_eq!(choices, vec![(expected.clone(), Some("length".to_owned()))]);
    assert!(usage.is_none(), "usage only with stream_options.include_usage");

    // Chat: the template renders "<bos>User: ...\nAssistant:", which is what generate runs for
    // the same text after its BOS.
    let (expected, prompt_tokens) = generate("User: What does the import statement do?\nAssistant:", 30);
    let body = json!({"messages": [{"role": "user", "content": "What does the import statement do?"}],
                      "max_completion_tokens": 30, "temperature": 0});
    let r = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": expected}));
    assert_eq!(v["usage"]["prompt_tokens"], json!(prompt_tokens));
    assert_eq!(v["usage"]["completion_tokens"], json!(30));
    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (_, events) = Events::open(&server.url("/v1/chat/completions"), &body);
    let (choices, usage) = collect_stream(events);
    assert_eq!(choices, vec![(expected, Some("length".to_owned()))]);
    assert_eq!(usage.unwrap()["total_tokens"], json!(prompt_tokens + 30));
}

#[test]
fn stop_sequences_n_and_echo() {
    let server = Server::start(&["--model", &model()]);
    let prompt = "The import statement";
    let (full, _) = generate(prompt, 40);
    // Stop at the first newline: the text before it, finish_reason stop, fewer tokens.
    let cut = full.find('\n').expect("the fixture's continuation has a newline");
    for stream in [false, true] {
        let mut body = completion(prompt, 40, stream);
        body["stop"] = json!(["\n", "no such text"]);
        if stream {
            let (_, events) = Events::open(&server.url("/v1/completions"), &body);
            assert_eq!(collect_stream(events).0, vec![(full[..cut].to_owned(), Some("stop".to_owned()))]);
        } else {
            let v = post(&server.url("/v1/completions"), &body).json();
            assert_eq!(v["choices"][0]["text"], json!(&full[..cut]));
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 40);
        }
    }
    // n = 3 greedy choices are the same text; two prompts come back in order; echo prepends.
    let body =
        json!({"prompt": [prompt, "A list"], "n": 2, "max_tokens": 12, "temperature": 0, "echo": true});
    let v = post(&server.url("/v1/completions"), &body).json();
    let texts: Vec<&str> =
        v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 4);
    assert_eq!(texts[0], texts[1]);
    assert!(texts[0].starts_with(prompt) && texts[2].starts_with("A list"), "{texts:?}");
    assert_eq!(texts[0], format!("{prompt}{}", &generate(prompt, 12).0));
    // Sampling with a seed repeats; the seeds of n choices differ.
    let body = json!({"prompt": prompt, "n": 2, "max_tokens": 16, "temperature": 1.0, "seed": 7});
    let a = post(&server.url("/v1/completions"), &body).json();
    let b = post(&server.url("/v1/completions"), &body).json();
    assert_eq!(a["choices"], b["choices"]);
    assert_ne!(a["choices"][0]["text"], a["choices"][1]["text"]);
}

/// 32 different prompts.
fn prompts() -> Vec<String> {
    let subjects = [
        "The import statement",
        "A list",
        "The with statement",
        "Exceptions",
        "A class",
        "The dict type",
        "Generators",
        "The print function",
    ];
    let tails = ["", " is", " can be used", " returns"];
    subjects.iter().flat_map(|s| tails.iter().map(move |t| format!("{s}{t}"))).collect()
}

#[test]
fn thirty_two_concurrent_clients_each_get_their_single_client_result() {
    let server = Server::start(&["--model", &model(), "--max-batch", "32"]);
    let prompts = prompts();
    let bodies: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let max = 8 + (i * 7) % 24; // different lengths: sequences leave and others go on
            if i % 2 == 0 {
                completion(p, max, i % 4 == 0)
            } else {
                json!({"messages": [{"role": "user", "content": p}], "max_tokens": max, "temperature": 0, "stream": i % 4 == 1})
            }
        })
        .collect();
    let run = |body: &Value| -> String {
        if body.get("messages").is_some() {
            let url = server.url("/v1/chat/completions");
            if body["stream"] == json!(true) {
                collect_stream(Events::open(&url, body).1).0.remove(0).0
            } else {
                post(&url, body).json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
            }
        } else {
            complete(&server, body)
        }
    };
    let alone: Vec<String> = bodies.iter().map(run).collect();
    let before = get(&server.url("/metrics"), None).body;
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies.iter().map(|b| s.spawn(|| run(b))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({}) differs when run with the others", prompts[i]);
    }
    // They shared forward passes: more sequences per pass than one at a time.
    let after = get(&server.url("/metrics"), None).body;
    let per_pass = |t: &str| {
        (
            metric(t, "stevedore_batch_sequences_sum").unwrap(),
            metric(t, "stevedore_batch_sequences_count").unwrap(),
        )
    };
    let ((s0, c0), (s1, c1)) = (per_pass(&before), per_pass(&after));
    assert!((s1 - s0) / (c1 - c0) > 2.0, "{} sequences per pass", (s1 - s0) / (c1 - c0));
    assert_eq!(metric(&after, "stevedore_requests_in_flight"), Some(0.0));
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_sequence() {
    let server = Server::start(&["--model", &model()]);
    let (status, mut events) =
        Events::open(&server.url("/v1/completions"), &completion("The import statement", 240, true));
    assert_eq!(status, 200);
    for _ in 0..3 {
        events.next().expect("a chunk");
    }
    drop(events);
    let t = Instant::now();
    loop {
        let m = get(&server.url("/metrics"), None).body;
        let gone = metric(&m, "stevedore_client_disconnects_total") == Some(1.0)
            && metric(&m, "stevedore_engine_requests_cancelled_total") == Some(1.0)
            && metric(&m, "stevedore_kv_blocks_used") == Some(0.0)
            && metric(&m, "stevedore_requests_in_flight") == Some(0.0);
        if gone {
            let generated = metric(&m, "stevedore_generated_tokens_total").unwrap();
            assert!(generated < 240.0, "the sequence ran on to {generated} tokens");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the sequence was not freed:\n{m}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log().contains("client went away"), "{}", server.log());
    // The server goes on.
    assert_eq!(post(&server.url("/v1/completions"), &completion("A list", 4, false)).status, 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(&["--model", &model(), "--max-batch", "1", "--max-queue", "0"]);
    let (status, mut events) =
        Events::open(&server.url("/v1/completions"), &completion("The import statement", 240, true));
    assert_eq!(status, 200);
    events.next().expect("a chunk");
    let r = post(&server.url("/v1/completions"), &completion("A list", 4, false));
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // Two choices never fit one slot either.
    let r = post(&server.url("/v1/completions"), &json!({"prompt": "x", "n": 2}));
    assert_eq!(r.status, 429);
    drop(events);
    let t = Instant::now();
    while post(&server.url("/v1/completions"), &completion("A list", 4, false)).status != 200 {
        assert!(t.elapsed() < Duration::from_secs(20), "the slot was never given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (method, path, content type, body, status, error code or param to expect).
fn bad_requests() -> Vec<(&'static str, &'static str, &'static str, String, u16, &'static str)> {
    let chat = "/v1/chat/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5 << 20));
    vec![
        ("POST", chat, "application/json", "{not json".into(), 400, "not valid JSON"),
        (
            "POST",
            chat,
            "application/json",
            json!({"messages": msgs, "model": "gpt-4o"}).to_string(),
            404,
            "model_not_found",
        ),
        ("POST", chat, "application/json", json!({"model": PYDOC_MOE}).to_string(), 400, "messages"),
        (
            "POST",
            chat,
            "application/json",
            json!({"messages": msgs, "temperature": -1}).to_string(),
            400,
            "temperature",
        ),
        ("POST", chat, "application/json", json!({"messages": msgs, "top_p": 1.5}).to_string(), 400, "top_p"),
        (
            "POST",
            chat,
            "application/json",
            json!({"messages": msgs, "max_tokens": 0}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "POST",
            chat,
            "application/json",
            json!({"messages": msgs, "max_tokens": 100000}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            "POST",
            "/v1/completions",
            "application/json",
            json!({"prompt": "a ".repeat(300)}).to_string(),
            400,
            "context_length_exceeded",
        ),
        ("POST", "/v1/completions", "application/json", big, 413, "request_too_large"),
        ("POST", chat, "text/plain", json!({"messages": msgs}).to_string(), 415, "unsupported_media_type"),
        ("POST", "/v1/embeddings", "application/json", "{}".into(), 404, "not_found"),
        ("GET", chat, "", String::new(), 405, "method_not_allowed"),
    ]
}

#[test]
fn every_bad_request_gets_its_status_and_openai_error_and_the_server_goes_on() {
    let server = Server::start(&["--model", &model()]);
    for (method, path, ctype, body, status, says) in bad_requests() {
        let r = match method {
            "GET" => get(&server.url(path), None),
            _ => post_raw(&server.url(path), ctype, &body, None),
        };
        assert_eq!(r.status, status, "{method} {path} {}: {}", &body[..body.len().min(80)], r.body);
        let e = &r.json()["error"];
        let all = format!("{} {} {} {}", e["message"], e["type"], e["param"], e["code"]);
        assert!(all.contains(says), "{path}: {all} does not mention {says}");
        assert!(e["message"].is_string() && e["type"].is_string(), "{}", r.body);
        assert!(r.content_type.starts_with("application/json"), "{}", r.content_type);
    }
    assert_eq!(post(&server.url("/v1/completions"), &completion("A list", 4, false)).status, 200);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn an_api_key_is_required_when_given() {
    let server = Server::start(&["--model", &model(), "--api-key", "sesame"]);
    assert!(server.log().contains("API key required"), "{}", server.log());
    let body = completion("A list", 4, false).to_string();
    let url = server.url("/v1/completions");
    for key in [None, Some("wrong")] {
        let r = post_raw(&url, "application/json", &body, key);
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    assert_eq!(post_raw(&url, "application/json", &body, Some("sesame")).status, 200);
    assert_eq!(get(&server.url("/metrics"), None).status, 401);
    assert_eq!(get(&server.url("/v1/models"), Some("sesame")).json()["data"][0]["id"], PYDOC_MOE);
    assert_eq!(get(&server.url("/health"), None).status, 200, "health needs no key");
}

#[test]
fn without_a_key_it_listens_on_loopback_and_says_so() {
    let server = Server::start(&["--model", &model()]);
    assert!(server.base.starts_with("http://127.0.0.1:"), "{}", server.base);
    assert!(server.log().contains("loopback only"), "{}", server.log());
    assert_eq!(get(&server.url("/health"), None).json(), json!({"status": "ok"}));
    let m = get(&server.url("/v1/models/pydoc-moe"), None).json();
    assert_eq!((m["object"].clone(), m["max_model_len"].clone()), (json!("model"), json!(256)));
    assert_eq!(get(&server.url("/v1/models/other"), None).status, 404);
}

/// A strict reading of the Prometheus text format (0.0.4): every line a `# HELP`/`# TYPE`
/// comment or a sample `name{label="value",...} number`, samples after their TYPE, histogram
/// buckets cumulative and ending in `+Inf` equal to `_count`.
fn check_exposition(text: &str) {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types = std::collections::HashMap::new();
    // Per histogram: its latest bucket value (the +Inf one at the end), and its count.
    let mut buckets: std::collections::HashMap<String, f64> = Default::default();
    let mut counts: std::collections::HashMap<String, f64> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a name"));
            assert!(name_ok(name), "bad metric name in {line:?}");
            if kind == "TYPE" {
                let t = parts.next().expect("a type");
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&t), "{line:?}");
                types.insert(name.to_owned(), t.to_owned());
            } else {
                assert_eq!(kind, "HELP", "{line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                (n, Some(l.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line:?}"))))
            }
            None => (series, None),
        };
        assert!(name_ok(name), "bad sample name in {line:?}");
        for l in labels.into_iter().flat_map(|l| l.split(',')).filter(|l| !l.is_empty()) {
            let (k, val) = l.split_once('=').unwrap_or_else(|| panic!("bad label in {line:?}"));
            assert!(name_ok(k) && val.starts_with('"') && val.ends_with('"'), "bad label in {line:?}");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| types.contains_key(*f));
        let family = family.unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line:?}");
        if name.ends_with("_bucket") {
            assert!(labels.is_some_and(|l| l.contains("le=\"")), "bucket without le: {line:?}");
            let prev = buckets.insert(family.to_owned(), v).unwrap_or(0.0);
            assert!(v >= prev, "buckets not cumulative at {line:?}");
        } else if name.ends_with("_count") && types[family] == "histogram" {
            counts.insert(family.to_owned(), v);
        }
    }
    assert_eq!(buckets, counts, "each histogram's +Inf bucket equals its count");
}

#[test]
fn metrics_parse_and_move_as_requests_run() {
    let server = Server::start(&["--model", &model()]);
    let before = get(&server.url("/metrics"), None);
    assert!(before.content_type.starts_with("text/plain; version=0.0.4"), "{}", before.content_type);
    check_exposition(&before.body);
    post(&server.url("/v1/completions"), &completion("A list", 10, false));
    post(&server.url("/v1/completions"), &json!({"prompt": "x", "temperature": 9}));
    let after = get(&server.url("/metrics"), None).body;
    check_exposition(&after);
    let m = |t: &str, s: &str| metric(t, s).unwrap_or(0.0);
    let ok = r#"stevedore_requests_total{endpoint="/v1/completions",status="200"}"#;
    let bad = r#"stevedore_requests_total{endpoint="/v1/completions",status="400"}"#;
    assert_eq!(m(&after, ok) - m(&before.body, ok), 1.0);
    assert_eq!(m(&after, bad) - m(&before.body, bad), 1.0);
    assert_eq!(
        m(&after, "stevedore_generated_tokens_total") - m(&before.body, "stevedore_generated_tokens_total"),
        10.0
    );
    assert_eq!(m(&after, "stevedore_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(m(&after, "stevedore_inter_token_latency_seconds_count"), 9.0);
    assert!(m(&after, "stevedore_engine_steps_total") >= 10.0);
    // The automatic budget holds this model whole, so the warm start read every expert: the
    // layers' lookups are hits.
    let hits = r#"stevedore_expert_cache_hits_total{tier="host",precision="bf16"}"#;
    assert!(m(&after, hits) > 0.0, "{after}");
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits() {
    let mut server = Server::start(&["--model", &model(), "--shutdown-timeout", "60"]);
    let (_, mut events) =
        Events::open(&server.url("/v1/completions"), &completion("The import statement", 200, true));
    let first = events.next().expect("a chunk");
    let kill =
        std::process::Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let (choices, _) = collect_stream(events);
    assert_eq!(choices[0].1.as_deref(), Some("length"), "the running request finished: {first}");
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "{}", server.log());
    assert!(server.log().contains("shutting down"), "{}", server.log());
}

#[test]
fn sigterm_past_the_timeout_cancels_what_still_runs() {
    let mut server = Server::start(&["--model", &model(), "--shutdown-timeout", "0"]);
    let (_, mut events) =
        Events::open(&server.url("/v1/completions"), &completion("The import statement", 240, true));
    events.next().expect("a chunk");
    let kill =
        std::process::Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    assert!(rest.iter().any(|d| d.contains("\"error\"") && d.contains("engine stopped")), "{rest:?}");
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "{}", server.log());
}
