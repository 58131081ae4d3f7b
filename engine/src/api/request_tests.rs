//! Request parsing and checks, one small case each, against the pydoc-moe tokenizer and template.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pydoc-moe")
}

struct Fixture {
    text: Text,
    template: ChatTemplate,
    defaults: SamplingDefaults,
}

fn load() -> Fixture {
    Fixture {
        text: Text::load(&fixture()).unwrap().unwrap(),
        template: ChatTemplate::load(&fixture()).unwrap().unwrap(),
        defaults: SamplingDefaults::load(&fixture()).unwrap(),
    }
}

impl Fixture {
    fn info(&self) -> ModelInfo<'_> {
        ModelInfo {
            name: "pydoc-moe",
            text: Some(&self.text),
            template: Some(&self.template),
            context: 256,
            kv_positions: 200,
            vocab_size: 4096,
            defaults: &self.defaults,
        }
    }

    fn chat(&self, body: serde_json::Value) -> Result<Prepared, ApiError> {
        prepare_chat(body.to_string().as_bytes(), &self.info())
    }

    fn completion(&self, body: serde_json::Value) -> Result<Prepared, ApiError> {
        prepare_completion(body.to_string().as_bytes(), &self.info())
    }
}

/// The error's status, param and a word of its message.
fn check_err(r: Result<Prepared, ApiError>, status: u16, param: Option<&str>, says: &str) {
    let e = r.expect_err("should be refused");
    assert_eq!(e.status, status, "{e:?}");
    assert_eq!(e.param.as_deref(), param, "{e:?}");
    assert!(e.message.contains(says), "{:?} does not say {says:?}", e.message);
}

#[test]
fn chat_renders_the_template_without_adding_special_tokens() {
    let f = load();
    let p = f
        .chat(json!({"model": "pydoc-moe", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What does"}, {"type": "text", "text": "import do?"}]}
        ], "max_tokens": 5, "temperature": 0}))
        .unwrap();
    let rendered = "<|startoftext|>Be brief.\n\nUser: What does\nimport do?\nAssistant:";
    assert_eq!(p.prompts, vec![f.text.encode_with(rendered, false).unwrap()]);
    assert_eq!(p.prompts[0].iter().filter(|&&t| t == 1).count(), 1, "one BOS, the template's");
    assert_eq!((p.max_tokens.clone(), p.sampling.temperature, p.n), (vec![5], 0.0, 1));
    assert_eq!(p.endpoint, Endpoint::Chat);
}

#[test]
fn completion_prompts_in_every_form() {
    let f = load();
    let p = f.completion(json!({"prompt": "The import statement"})).unwrap();
    assert_eq!(p.prompts, vec![f.text.encode("The import statement").unwrap()]);
    assert_eq!(p.max_tokens, vec![16], "OpenAI's default for completions");
    let p = f.completion(json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "seed": 9})).unwrap();
    assert_eq!(p.prompts.len(), 2);
    let reqs = p.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs.iter().map(|r| r.sampling.seed).collect::<Vec<_>>(), [9, 10, 9, 10]);
    let p = f.completion(json!({"prompt": [1, 50, 60], "echo": true})).unwrap();
    assert_eq!(p.prompts, vec![vec![1, 50, 60]]);
    assert_eq!(p.echo, vec![f.text.decode(&[1, 50, 60]).unwrap()]);
    let p = f
        .completion(
            json!({"prompt": [[1, 2], [3]], "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
    assert_eq!(p.prompts, vec![vec![1, 2], vec![3]]);
    assert!(p.stream && p.include_usage);
}

#[test]
fn chat_defaults_fill_the_context_the_kv_cache_allows() {
    let f = load();
    let p = f.chat(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
    assert_eq!(p.max_tokens[0] + p.prompts[0].len(), 200, "up to the KV cache's positions");
    assert_eq!(p.sampling.temperature, 1.0, "generation_config.json sets none: OpenAI's default");
}

#[test]
fn bad_requests_name_the_field() {
    let f = load();
    let user = json!([{"role": "user", "content": "hi"}]);
    check_err(prepare_chat(b"{not json", &f.info()), 400, None, "not valid JSON");
    check_err(prepare_chat(b"[1]", &f.info()), 400, None, "JSON object");
    check_err(f.chat(json!({"model": "pydoc-moe"})), 400, Some("messages"), "missing field");
    check_err(f.chat(json!({"messages": []})), 400, Some("messages"), "must not be empty");
    check_err(f.chat(json!({"messages": "hi"})), 400, Some("messages"), "messages");
    check_err(f.chat(json!({"messages": [{"content": "x"}]})), 400, Some("messages[0].role"), "role");
    check_err(
        f.chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        400,
        Some("messages[0].content[0]"),
        "only text parts",
    );
    check_err(
        f.chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
        400,
        Some("messages"),
        "not tool",
    );
    check_err(f.chat(json!({"messages": user, "model": "gpt-4o"})), 404, Some("model"), "does not exist");
    check_err(f.chat(json!({"messages": user, "temperature": 3})), 400, Some("temperature"), "[0, 2]");
    check_err(
        f.chat(json!({"messages": user, "temperature": "hot"})),
        400,
        Some("temperature"),
        "invalid type",
    );
    check_err(f.chat(json!({"messages": user, "top_p": 0})), 400, Some("top_p"), "(0, 1]");
    check_err(f.chat(json!({"messages": user, "max_tokens": -1})), 400, Some("max_tokens"), "at least 1");
    check_err(
        f.chat(json!({"messages": user, "max_completion_tokens": 0})),
        400,
        Some("max_completion_tokens"),
        "at least 1",
    );
    check_err(f.chat(json!({"messages": user, "n": 0})), 400, Some("n"), "at least 1");
    check_err(f.chat(json!({"messages": user, "stop": 3})), 400, Some("stop"), "string");
    check_err(
        f.chat(json!({"messages": user, "presence_penalty": 0.5})),
        400,
        Some("presence_penalty"),
        "not supported",
    );
    check_err(f.chat(json!({"messages": user, "logprobs": true})), 400, Some("logprobs"), "not supported");
    check_err(
        f.chat(json!({"messages": user, "stream_options": {"include_usage": true}})),
        400,
        Some("stream_options"),
        "stream: true",
    );
    check_err(f.completion(json!({"prompt": {"a": 1}})), 400, Some("prompt"), "prompt must be");
    check_err(f.completion(json!({"prompt": [1, -2]})), 400, Some("prompt"), "prompt must be");
    check_err(f.completion(json!({"prompt": [5000]})), 400, Some("prompt"), "outside the vocabulary");
    check_err(f.completion(json!({"prompt": "x", "suffix": "y"})), 400, Some("suffix"), "not supported");
    // Over the context: OpenAI's code; over the KV cache: the flag that helps.
    let e = f.completion(json!({"prompt": "x", "max_tokens": 300})).unwrap_err();
    assert_eq!((e.status, e.code), (400, Some("context_length_exceeded")), "{e:?}");
    assert!(e.message.contains("maximum context length is 256"), "{}", e.message);
    check_err(f.completion(json!({"prompt": "x", "max_tokens": 220})), 400, Some("max_tokens"), "--kv-cache");
    // Unknown fields are ignored; nulls are absent values.
    assert!(f
        .chat(
            json!({"messages": user, "user": "u1", "stop": null, "logprobs": false, "frequency_penalty": 0})
        )
        .is_ok());
}

#[test]
fn a_model_without_a_template_or_tokenizer_says_what_to_do() {
    let f = load();
    let info = ModelInfo { template: None, ..f.info() };
    let e =
        prepare_chat(json!({"messages": [{"role": "user", "content": "x"}]}).to_string().as_bytes(), &info)
            .unwrap_err();
    assert!(e.message.contains("--chat-template"), "{}", e.message);
    let info = ModelInfo { text: None, ..f.info() };
    let e = prepare_completion(br#"{"prompt": "x"}"#, &info).unwrap_err();
    assert!(e.message.contains("token ids"), "{}", e.message);
    assert!(prepare_completion(br#"{"prompt": [1, 2]}"#, &info).is_ok());
}

#[test]
fn generation_config_sets_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"temperature": 0.6, "top_p": 0.9, "top_k": 20}"#,
    )
    .unwrap();
    let d = SamplingDefaults::load(dir.path()).unwrap();
    assert_eq!(d, SamplingDefaults { temperature: 0.6, top_p: 0.9, top_k: 20 });
    std::fs::write(dir.path().join("generation_config.json"), r#"{"do_sample": false, "temperature": 0.6}"#)
        .unwrap();
    assert_eq!(SamplingDefaults::load(dir.path()).unwrap().temperature, 0.0);
    std::fs::write(dir.path().join("generation_config.json"), r#"{"top_p": 2}"#).unwrap();
    assert!(SamplingDefaults::load(dir.path()).unwrap_err().contains("generation_config.json"));
}
