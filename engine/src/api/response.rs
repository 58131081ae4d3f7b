//! Response bodies in OpenAI's shapes: `chat.completion` / `text_completion` objects, their
//! streamed chunks (`chat.completion.chunk`, `text_completion`), and usage.

use serde_json::{json, Value};

use super::request::Endpoint;

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// One finished choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceResult {
    pub index: usize,
    pub text: String,
    /// `stop` (a stop id or sequence) or `length`.
    pub finish_reason: &'static str,
}

/// What every body and chunk of one response repeats.
#[derive(Clone, Debug)]
pub struct Meta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Meta {
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Meta {
            endpoint,
            id: format!("{prefix}-{}", unique_hex()),
            created: unix_now(),
            model: model.to_owned(),
        }
    }

    /// The whole response.
    pub fn body(&self, choices: &[ChoiceResult], usage: Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .map(|c| match self.endpoint {
                Endpoint::Chat => json!({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": null,
                    "finish_reason": c.finish_reason,
                }),
                Endpoint::Completions => json!({
                    "index": c.index, "text": c.text, "logprobs": null, "finish_reason": c.finish_reason,
                }),
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices, "usage": usage.json(),
        })
    }

    /// A streamed chunk for choice `index`: its role (chat's first chunk), some text, or its
    /// finish reason. With `include_usage`, chunks carry `"usage": null` until the last.
    pub fn chunk(&self, index: usize, piece: Delta, include_usage: bool) -> Value {
        let (delta, finish) = match piece {
            Delta::Role => (json!({"role": "assistant", "content": ""}), None),
            Delta::Text(t) => (json!({"content": t}), None),
            Delta::Finish(r) => (json!({}), Some(r)),
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => json!({
                "index": index,
                "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut v = self.chunk_head(vec![choice]);
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The last chunk with `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.chunk_head(Vec::new());
        v["usage"] = usage.json();
        v
    }

    fn chunk_head(&self, choices: Vec<Value>) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }
}

/// What a chunk carries.
pub enum Delta<'a> {
    Role,
    Text(&'a str),
    Finish(&'static str),
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 24 hex digits, different for every call (a process-wide counter mixed with a random key).
pub fn unique_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    format!("{:016x}{:08x}", h.finish(), n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_chunks_have_openai_shapes() {
        let m = Meta::new(Endpoint::Chat, "tiny");
        assert!(m.id.starts_with("chatcmpl-"));
        assert_ne!(m.id, Meta::new(Endpoint::Chat, "tiny").id);
        let usage = Usage { prompt_tokens: 3, completion_tokens: 2 };
        let b = m.body(&[ChoiceResult { index: 0, text: "hi".into(), finish_reason: "stop" }], usage);
        assert_eq!(b["object"], "chat.completion");
        assert_eq!(b["choices"][0]["message"]["content"], "hi");
        assert_eq!(b["usage"]["total_tokens"], 5);
        let c = m.chunk(0, Delta::Text("x"), true);
        assert_eq!(c["choices"][0]["delta"]["content"], "x");
        assert!(c["usage"].is_null() && c.as_object().unwrap().contains_key("usage"));
        assert_eq!(m.chunk(0, Delta::Finish("length"), false)["choices"][0]["finish_reason"], "length");
        assert_eq!(m.usage_chunk(usage)["choices"], json!([]));
        let t = Meta::new(Endpoint::Completions, "tiny");
        assert_eq!(t.chunk(1, Delta::Text("y"), false)["choices"][0]["text"], "y");
        assert_eq!(t.body(&[], usage)["object"], "text_completion");
    }
}
