//! OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) parsed and checked against
//! the model, becoming engine [`Request`]s.
//!
//! Fields stevedore does not know are ignored, as OpenAI's own server and vLLM do; fields it
//! knows but cannot honour with a non-default value (`logprobs`, penalties, `logit_bias`,
//! `suffix`, non-text content parts) are refused with a 400 naming the field, never silently
//! dropped.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::chat::ChatTemplate;
use super::ApiError;
use crate::engine::Request;
use crate::sampling::SamplingParams;
use crate::text::Text;

/// Most choices one request may ask for (prompts x `n`).
pub const MAX_CHOICES: usize = 128;
/// Most stop sequences.
pub const MAX_STOPS: usize = 16;

/// What requests are checked against.
pub struct ModelInfo<'a> {
    /// The name clients use in `model`.
    pub name: &'a str,
    pub text: Option<&'a Text>,
    pub template: Option<&'a ChatTemplate>,
    /// Positions the model runs exactly (prompt plus new tokens).
    pub context: usize,
    /// Positions one sequence can hold in the KV cache.
    pub kv_positions: usize,
    pub vocab_size: usize,
    pub defaults: &'a SamplingDefaults,
}

/// What the API needs of a model beyond the engine: its name, chat template and sampling
/// defaults, loaded once by the server and by batch jobs.
pub struct ApiModel {
    pub name: String,
    pub template: Option<ChatTemplate>,
    pub defaults: SamplingDefaults,
}

impl ApiModel {
    /// Loads `dir`'s template (or `chat_template`'s) and generation defaults; the name is `name`
    /// or the directory's.
    pub fn load(dir: &Path, chat_template: Option<&Path>, name: Option<String>) -> Result<Self, String> {
        let template = match chat_template {
            Some(path) => Some(ChatTemplate::from_file(path, dir)?),
            None => ChatTemplate::load(dir)?,
        };
        let name = name.unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into())
        });
        Ok(ApiModel { name, template, defaults: SamplingDefaults::load(dir)? })
    }

    /// What requests are checked against, for `model` with `kv_positions` per sequence.
    pub fn info<'a>(
        &'a self,
        model: &stevedore_models::Model,
        text: Option<&'a Text>,
        kv_positions: usize,
    ) -> ModelInfo<'a> {
        ModelInfo {
            name: &self.name,
            text,
            template: self.template.as_ref(),
            context: model.config.max_positions(),
            kv_positions,
            vocab_size: model.config.vocab_size,
            defaults: &self.defaults,
        }
    }
}

/// Sampling defaults when a request does not say: OpenAI's (temperature 1, top-p 1), unless the
/// model's `generation_config.json` says otherwise (`do_sample: false` means greedy), as
/// transformers and vLLM do.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults { temperature: 1.0, top_p: 1.0, top_k: 0 }
    }
}

impl SamplingDefaults {
    /// Reads `dir/generation_config.json` (absent: OpenAI's defaults).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut d = Self::default();
        if let Some(t) = v.get("temperature").and_then(Value::as_f64) {
            d.temperature = t as f32;
        }
        if let Some(p) = v.get("top_p").and_then(Value::as_f64) {
            d.top_p = p as f32;
        }
        if let Some(k) = v.get("top_k").and_then(Value::as_u64) {
            d.top_k = k as usize;
        }
        if v.get("do_sample").and_then(Value::as_bool) == Some(false) {
            d.temperature = 0.0;
        }
        if !(d.temperature >= 0.0 && d.temperature.is_finite() && d.top_p > 0.0 && d.top_p <= 1.0) {
            return Err(format!("{}: temperature must be >= 0 and top_p in (0, 1]", path.display()));
        }
        Ok(d)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A checked request: its prompts (one for chat; one or more for completions), each run `n`
/// times, and how to run and report them.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompts: Vec<Vec<u32>>,
    /// Per prompt: its text, put before the output (`echo`), or empty.
    pub echo: Vec<String>,
    pub n: usize,
    /// Per prompt.
    pub max_tokens: Vec<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Prepared {
    /// The engine requests, choice `index` = prompt x `n` + i; choice i of a prompt samples with
    /// seed + i.
    pub fn requests(&self) -> Vec<Request> {
        let mut out = Vec::with_capacity(self.prompts.len() * self.n);
        for (p, ids) in self.prompts.iter().enumerate() {
            for i in 0..self.n {
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(i as u64);
                out.push(Request {
                    prompt_ids: ids.clone(),
                    max_new_tokens: self.max_tokens[p],
                    sampling,
                    prompt_logprobs: false,
                });
            }
        }
        out
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum::<usize>() * self.n
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// vLLM's extension; 0 or -1 mean no cut.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logprobs: Option<Value>,
    logit_bias: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<Value>,
    tools: Option<Value>,
    chat_template_kwargs: Option<Map<String, Value>>,
    max_completion_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    echo: Option<bool>,
    suffix: Option<String>,
}

/// Parses a JSON body into the endpoint's own fields and the shared ones (two passes over one
/// value rather than `#[serde(flatten)]`, which would lose the path of a bad field).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Common), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    }
    Ok((fields(&v)?, fields(&v)?))
}

fn fields<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // A missing field: serde names it in the message.
            let field = inner.split('`').nth(1).map(str::to_owned);
            ApiError::invalid(field.as_deref(), inner)
        } else {
            ApiError::invalid(Some(&path), format!("{path}: {inner}"))
        }
    })
}

/// Parses and checks a `/v1/chat/completions` body.
pub fn prepare_chat(body: &[u8], m: &ModelInfo) -> Result<Prepared, ApiError> {
    let (b, common): (ChatBody, Common) = parse(body)?;
    let template = m.template.ok_or_else(|| {
        ApiError::invalid(
            Some("messages"),
            "the model has no chat template (chat_template in tokenizer_config.json or chat_template.jinja); \
             use /v1/completions, or start the server with --chat-template FILE",
        )
    })?;
    let text = m.text.ok_or_else(|| ApiError::invalid(None, "the model has no tokenizer.json"))?;
    if b.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must not be empty"));
    }
    let messages =
        b.messages.iter().enumerate().map(|(i, msg)| message(i, msg)).collect::<Result<Vec<_>, _>>()?;
    let tools = b.tools.filter(|t| !t.is_null());
    let rendered =
        template.render(&messages, tools.as_ref(), true, b.chat_template_kwargs.as_ref()).map_err(|e| {
            ApiError::invalid(Some("messages"), format!("the chat template refused the messages: {e}"))
        })?;
    // The template writes the special tokens itself (a BOS, say): none are added, as
    // transformers' apply_chat_template does.
    let ids = text.encode_with(&rendered, false).map_err(ApiError::server)?;
    let max = match (b.max_completion_tokens, common.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    finish(Endpoint::Chat, common, vec![ids], vec![String::new()], max, None, m)
}

/// Parses and checks a `/v1/completions` body.
pub fn prepare_completion(body: &[u8], m: &ModelInfo) -> Result<Prepared, ApiError> {
    let (b, common): (CompletionBody, Common) = parse(body)?;
    if b.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
    }
    let bad = || {
        ApiError::invalid(
            Some("prompt"),
            "prompt must be a string, an array of strings, an array of token ids, or an array of arrays of token ids",
        )
    };
    let encode = |s: &str| -> Result<Vec<u32>, ApiError> {
        let t = m.text.ok_or_else(|| {
            ApiError::invalid(Some("prompt"), "the model has no tokenizer.json: give the prompt as token ids")
        })?;
        t.encode(s).map_err(ApiError::server)
    };
    let ids_of = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?.iter().map(|x| x.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
    };
    let (prompts, texts): (Vec<Vec<u32>>, Vec<Option<String>>) = match &b.prompt {
        Value::String(s) => (vec![encode(s)?], vec![Some(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid(Some("prompt"), "prompt is empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let texts: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            let ids = texts.iter().map(|s| encode(s)).collect::<Result<_, _>>()?;
            (ids, texts.into_iter().map(|s| Some(s.to_owned())).collect())
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            (vec![ids_of(&b.prompt).ok_or_else(bad)?], vec![None])
        }
        Value::Array(items) if items.iter().all(Value::is_array) => {
            let ids: Vec<Vec<u32>> = items.iter().map(ids_of).collect::<Option<_>>().ok_or_else(bad)?;
            let n = ids.len();
            (ids, vec![None; n])
        }
        _ => return Err(bad()),
    };
    let echo = if b.echo.unwrap_or(false) {
        prompts
            .iter()
            .zip(texts)
            .map(|(ids, t)| match (t, m.text) {
                (Some(t), _) => Ok(t),
                (None, Some(text)) => text.decode(ids).map_err(ApiError::server),
                (None, None) => {
                    Err(ApiError::invalid(Some("echo"), "echo of token ids needs tokenizer.json"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![String::new(); prompts.len()]
    };
    let max = common.max_tokens.map(|n| ("max_tokens", n));
    // OpenAI's legacy default for completions.
    finish(Endpoint::Completions, common, prompts, echo, max, Some(16), m)
}

/// One chat message as the template sees it: `role` and `content` (text parts joined with
/// newlines, as vLLM does for templates that take a string), other fields kept.
fn message(i: usize, msg: &Value) -> Result<Value, ApiError> {
    let at = format!("messages[{i}]");
    let obj =
        msg.as_object().ok_or_else(|| ApiError::invalid(Some(&at), format!("{at} must be an object")))?;
    if !obj.get("role").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(Some(&format!("{at}.role")), format!("{at}.role must be a string")));
    }
    let mut out = obj.clone();
    match obj.get("content") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str);
                match (kind, p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t),
                    _ => {
                        return Err(ApiError::invalid(
                            Some(&format!("{at}.content[{j}]")),
                            format!(
                                "{at}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got type {}",
                                kind.unwrap_or("none")
                            ),
                        ))
                    }
                }
            }
            out.insert("content".into(), Value::String(texts.join("\n")));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some(&format!("{at}.content")),
                format!("{at}.content must be a string or an array of text parts"),
            ))
        }
    }
    Ok(Value::Object(out))
}

/// Checks the shared fields and sizes the requests.
fn finish(
    endpoint: Endpoint,
    c: Common,
    prompts: Vec<Vec<u32>>,
    echo: Vec<String>,
    max: Option<(&'static str, i64)>,
    default_max: Option<usize>,
    m: &ModelInfo,
) -> Result<Prepared, ApiError> {
    let model = match c.model {
        Some(name) if name != m.name => return Err(ApiError::model_not_found(&name, m.name)),
        _ => m.name.to_owned(),
    };
    let unsupported = |field: &str| ApiError::invalid(Some(field), format!("{field} is not supported"));
    if c.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("presence_penalty"));
    }
    if c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("frequency_penalty"));
    }
    if c.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
        return Err(unsupported("logprobs"));
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(unsupported("logit_bias"));
    }
    let d = m.defaults;
    let temperature = c.temperature.map_or(d.temperature as f64, |t| t);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = c.top_p.map_or(d.top_p as f64, |p| p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), format!("top_p must be in (0, 1], got {top_p}")));
    }
    let top_k = match c.top_k {
        None => d.top_k,
        Some(k) if k == -1 || k >= 0 => k.max(0) as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k must be >= 0 (or -1 for none), got {k}"),
            ))
        }
    };
    let n = c.n.unwrap_or(1);
    if n < 1 || (n as usize).saturating_mul(prompts.len()) > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "n must be at least 1, and prompts x n at most {MAX_CHOICES}; got n = {n} for {} prompts",
                prompts.len()
            ),
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            Some("stream_options"),
            "stream_options is only allowed with stream: true",
        ));
    }
    let stop = match c.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) if a.len() <= MAX_STOPS && a.iter().all(Value::is_string) => {
            a.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("stop must be a string or an array of at most {MAX_STOPS} strings"),
            ))
        }
    };
    let seed = c.seed.map_or_else(random_seed, |s| s as u64);
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for ids in &prompts {
        if ids.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= m.vocab_size) {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!("token id {t} is outside the vocabulary ({} ids)", m.vocab_size),
            ));
        }
        let room = m.context.min(m.kv_positions);
        let want = match max {
            Some((field, v)) if v < 1 => {
                return Err(ApiError::invalid(Some(field), format!("{field} must be at least 1, got {v}")))
            }
            Some((_, v)) => usize::try_from(v).unwrap_or(usize::MAX),
            None => default_max.unwrap_or(usize::MAX).min(room.saturating_sub(ids.len())).max(1),
        };
        let total = ids.len().saturating_add(want);
        if total > m.context {
            return Err(ApiError::invalid(
                Some(if endpoint == Endpoint::Chat { "messages" } else { "prompt" }),
                format!(
                    "this model's maximum context length is {} tokens; however, you requested {total} tokens ({} in the {}, {want} for the completion)",
                    m.context,
                    ids.len(),
                    if endpoint == Endpoint::Chat { "messages" } else { "prompt" },
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if total > m.kv_positions {
            return Err(ApiError::invalid(
                max.map(|(f, _)| f),
                format!(
                    "the request needs {total} positions ({} prompt tokens + {want} new) but the server's KV cache holds {} \
                     positions for one sequence; ask for fewer tokens, or start the server with a larger --kv-cache",
                    ids.len(),
                    m.kv_positions
                ),
            ));
        }
        max_tokens.push(want);
    }
    Ok(Prepared {
        endpoint,
        model,
        prompts,
        echo,
        n: n as usize,
        max_tokens,
        sampling: SamplingParams { temperature: temperature as f32, top_k, top_p: top_p as f32, seed },
        stop,
        stream,
        include_usage: c.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
    })
}

/// A seed for a request that gave none: different every time.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
