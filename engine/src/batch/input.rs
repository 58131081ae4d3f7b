//! The input: OpenAI's Batch API JSONL, one request a line:
//! `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
//! "body": {...}}`. Each line becomes a prepared request or the error record it will be answered
//! with; only an unreadable file or a `custom_id` used twice stops the job (naming both lines).
//! Unknown fields are ignored, at the top level as in bodies (as OpenAI does). The body's `model`
//! is echoed in the response, not checked: a batch file written for another model still runs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::output::line_key;
use crate::api::request::{prepare_chat, prepare_completion, ModelInfo, Prepared};
use crate::api::ApiError;

/// One input line.
pub struct Entry {
    pub line: usize,
    /// `custom_id`, or `#line N` for a line without one.
    pub key: String,
    pub custom_id: Option<String>,
    /// The body's `model`, echoed in the response.
    pub model: Option<String>,
    pub request: Result<Prepared, Refusal>,
}

/// Why a line is answered with an error instead of a completion.
#[derive(Debug)]
pub enum Refusal {
    /// The line is not a request (`error` in the output, no `response`).
    Line(String),
    /// The request is one the API refuses (`response` with its status and error body).
    Api(ApiError),
}

/// Reads `path`: every non-blank line, in order.
pub fn read(path: &Path, info: &ModelInfo) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the input: {e}", path.display()))?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(raw);
        let v = parsed.as_ref().ok();
        let custom_id = v.and_then(|v| v.get("custom_id")).and_then(Value::as_str).map(str::to_owned);
        if let Some(id) = &custom_id {
            if let Some(first) = seen.insert(id.clone(), line) {
                return Err(format!(
                    "{}:{line}: custom_id {id:?} is also on line {first}; every request needs its own",
                    path.display()
                ));
            }
        }
        let key = custom_id.clone().unwrap_or_else(|| line_key(line));
        let model = v.and_then(|v| v["body"]["model"].as_str()).map(str::to_owned);
        let request = match &parsed {
            Err(e) => Err(Refusal::Line(format!("line {line} is not valid JSON: {e}"))),
            Ok(v) => request(v, line, info),
        };
        out.push(Entry { line, key, custom_id, model, request });
    }
    Ok(out)
}

fn request(v: &Value, line: usize, info: &ModelInfo) -> Result<Prepared, Refusal> {
    let bad = |msg: String| Refusal::Line(format!("line {line}: {msg}"));
    let obj = v.as_object().ok_or_else(|| bad("a request must be a JSON object".into()))?;
    match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(_) => return Err(bad("custom_id must be a non-empty string".into())),
        None => return Err(bad("missing custom_id".into())),
    }
    match obj.get("method").and_then(Value::as_str) {
        None | Some("POST") => {}
        Some(m) => return Err(bad(format!("method must be POST, got {m:?}"))),
    }
    let url = obj.get("url").and_then(Value::as_str).ok_or_else(|| bad("missing url".into()))?;
    let mut body = match obj.get("body") {
        Some(Value::Object(b)) => b.clone(),
        Some(_) => return Err(bad("body must be a JSON object".into())),
        None => return Err(bad("missing body".into())),
    };
    body.remove("model");
    let bytes = serde_json::to_vec(&body).expect("a JSON object serialises");
    let prepared = match url {
        "/v1/chat/completions" => prepare_chat(&bytes, info),
        "/v1/completions" => prepare_completion(&bytes, info),
        other => {
            return Err(bad(format!(
                "url {other:?} is not supported: use /v1/chat/completions or /v1/completions"
            )))
        }
    };
    let p = prepared.map_err(Refusal::Api)?;
    if p.stream {
        return Err(Refusal::Api(ApiError::invalid(Some("stream"), "stream is not supported in batch jobs")));
    }
    Ok(p)
}
