//! Chat templates: the model's own Jinja template (from `chat_template.jinja` or
//! `tokenizer_config.json`) rendered by a real Jinja engine (`minijinja`) configured the way
//! transformers renders it: `trim_blocks` and `lstrip_blocks`, loop controls, Python string and
//! dict methods, `raise_exception`, `strftime_now`, and a `tojson` that writes what Python's
//! `json.dumps` writes.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

/// A model's chat template, compiled, with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the model ships a separate template for tool use (used when tools are given).
    has_tool_use: bool,
    tokens: Vec<(&'static str, String)>,
    /// Where it came from, for error messages.
    origin: String,
}

/// The names a template may read the special tokens by.
const TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

impl ChatTemplate {
    /// The template of the model in `dir`: `chat_template.jinja` if present (as transformers
    /// 4.47+ saves it), else `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// named templates of which `default` and `tool_use` are used). `Ok(None)`: the model has
    /// none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let (config_path, config) = tokenizer_config(dir)?;
        let jinja_path = dir.join("chat_template.jinja");
        let (origin, default, tool_use) = if jinja_path.exists() {
            let src =
                std::fs::read_to_string(&jinja_path).map_err(|e| format!("{}: {e}", jinja_path.display()))?;
            (jinja_path.display().to_string(), src, None)
        } else {
            let at = |msg: &str| format!("{}: chat_template: {msg}", config_path.display());
            match config.get("chat_template") {
                None | Some(Json::Null) => return Ok(None),
                Some(Json::String(s)) => (config_path.display().to_string(), s.clone(), None),
                Some(Json::Array(named)) => {
                    let find = |want: &str| -> Result<Option<String>, String> {
                        for t in named {
                            let name = t.get("name").and_then(Json::as_str);
                            let template = t.get("template").and_then(Json::as_str);
                            match (name, template) {
                                (Some(n), Some(src)) if n == want => return Ok(Some(src.to_owned())),
                                (Some(_), Some(_)) => {}
                                _ => return Err(at("each entry needs a string `name` and `template`")),
                            }
                        }
                        Ok(None)
                    };
                    let default = find("default")?.ok_or_else(|| at("no template named `default`"))?;
                    (config_path.display().to_string(), default, find("tool_use")?)
                }
                Some(_) => return Err(at("expected a string or a list of named templates")),
            }
        };
        Self::new(&origin, default, tool_use, special_tokens(&config)).map(Some)
    }

    /// The template in `path` (`--chat-template`), with the special tokens of the model in `dir`.
    pub fn from_file(path: &Path, dir: &Path) -> Result<Self, String> {
        let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, config) = tokenizer_config(dir)?;
        Self::new(&path.display().to_string(), src, None, special_tokens(&config))
    }

    /// Compiles `default` (and an optional tool-use variant) with these special tokens.
    pub fn new(
        origin: &str,
        default: String,
        tool_use: Option<String>,
        tokens: Vec<(&'static str, String)>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Python prints `True`, `False` and `None`.
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::Bool => {
                out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from)
            }
            ValueKind::None => out.write_str("None").map_err(Error::from),
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        let has_tool_use = tool_use.is_some();
        env.add_template_owned("default", default)
            .map_err(|e| format!("{origin}: the chat template does not compile: {}", describe(&e)))?;
        if let Some(t) = tool_use {
            env.add_template_owned("tool_use", t).map_err(|e| {
                format!("{origin}: the tool-use chat template does not compile: {}", describe(&e))
            })?;
        }
        Ok(ChatTemplate { env, has_tool_use, tokens, origin: origin.to_owned() })
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` (OpenAI-style objects) with `add_generation_prompt`, the tools if any,
    /// and extra variables (`chat_template_kwargs`, e.g. `enable_thinking`). The error is the
    /// template's own message (`raise_exception`) or what went wrong where.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, Json>>,
    ) -> Result<String, String> {
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = extra {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for (k, v) in &self.tokens {
            ctx.insert((*k).to_owned(), Json::String(v.clone()));
        }
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        // As transformers does: `tools` and `documents` are always there, None when not given
        // (so `tools is not none` means what the template's author meant).
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        let name = if tools.is_some() && self.has_tool_use { "tool_use" } else { "default" };
        let template = self.env.get_template(name).map_err(|e| describe(&e))?;
        template.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| describe(&e))
    }
}

/// `dir/tokenizer_config.json` (null when absent) and its path.
fn tokenizer_config(dir: &Path) -> Result<(std::path::PathBuf, Json), String> {
    let path = dir.join("tokenizer_config.json");
    let config = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Null,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    Ok((path, config))
}

fn special_tokens(config: &Json) -> Vec<(&'static str, String)> {
    TOKEN_KEYS.iter().filter_map(|&k| special_token(config.get(k)).map(|t| (k, t))).collect()
}

/// A special token as tokenizer_config.json writes it: a string, or an AddedToken object with
/// `content`.
fn special_token(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The error's message, and where in the template it happened.
fn describe(e: &Error) -> String {
    let mut msg = match e.kind() {
        // raise_exception: the template's own words.
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_owned(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            msg.push_str(&format!(" (template line {line})"));
        }
    }
    msg
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=...,
/// sort_keys=...)`, so `{"a": 1, "b": [1, 2]}` (Python's separators), not minijinja's compact
/// HTML-safe form.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?; // non-ASCII is written as is, like transformers
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item, key) = match separators.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    let fmt = PyJson { indent, item: &item, key: &key, sort_keys: sort_keys.unwrap_or(false) };
    fmt.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct PyJson<'a> {
    indent: Option<usize>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item);
                    }
                    self.newline(depth + 1, out);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item);
                    }
                    self.newline(depth + 1, out);
                    out.push_str(&Json::String(k.clone()).to_string());
                    out.push_str(self.key);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
            Json::Number(n) if n.is_f64() => {
                let f = n.as_f64().expect("is_f64");
                // Python writes integral floats with ".0" and large ones in exponent form.
                if f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            }
            other => out.push_str(&other.to_string()),
        }
    }
}

/// `strftime_now(format)`: the current local time, formatted by the C library's `strftime`
/// (templates use it to date the system prompt).
fn strftime_now(format: String) -> Result<String, Error> {
    let bad = || Error::new(ErrorKind::InvalidOperation, "strftime_now: cannot format the time");
    let fmt = std::ffi::CString::new(format).map_err(|_| bad())?;
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes into the
    // `tm` we own; `strftime` writes at most `buf.len()` bytes into `buf` and returns how many
    // it wrote (0 on overflow), reading the NUL-terminated `fmt`.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad());
        }
        let mut buf = vec![0u8; 256];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
        buf.truncate(n);
        String::from_utf8(buf).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(src: &str) -> ChatTemplate {
        let tokens = vec![("bos_token", "<s>".to_owned()), ("eos_token", "</s>".to_owned())];
        ChatTemplate::new("test", src.to_owned(), None, tokens).unwrap()
    }

    #[test]
    fn renders_with_python_methods_and_whitespace_control() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n{% if m['role'] == 'user' %}\n[INST] {{ m['content'].strip() }} [/INST]\n{% else %}\n{{ m.content }}{{ eos_token }}\n{% endif %}\n{% endfor %}",
        );
        let msgs =
            [json!({"role": "user", "content": "  hi  "}), json!({"role": "assistant", "content": "yo"})];
        assert_eq!(t.render(&msgs, None, false, None).unwrap(), "<s>[INST] hi [/INST]\nyo</s>\n");
    }

    #[test]
    fn raise_exception_is_the_error() {
        let t = template("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}");
        let err = t.render(&[json!({"role": "assistant", "content": "x"})], None, true, None).unwrap_err();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = template("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}");
        let tools = json!([{"name": "f", "n": 1.0, "b": [1, 2], "e": {}, "u": "é"}]);
        let out = t.render(&[], Some(&tools), false, None).unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"n\": 1.0, \"b\": [1, 2], \"e\": {}, \"u\": \"é\"}]|{\n  \"name\": \"f\",\n  \"n\": 1.0,\n  \"b\": [\n    1,\n    2\n  ],\n  \"e\": {},\n  \"u\": \"é\"\n}"
        );
    }

    #[test]
    fn loads_named_templates_and_added_token_objects() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({
            "bos_token": {"content": "<|b|>", "lstrip": false},
            "chat_template": [
                {"name": "default", "template": "{{ bos_token }}{{ messages | length }}"},
                {"name": "tool_use", "template": "T{{ tools | length }}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        let m = [json!({"role": "user", "content": "a"})];
        assert_eq!(t.render(&m, None, true, None).unwrap(), "<|b|>1");
        assert_eq!(t.render(&m, Some(&json!([1, 2])), true, None).unwrap(), "T2");
        // chat_template.jinja wins over the config's.
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ add_generation_prompt }}").unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&m, None, true, None).unwrap(), "JTrue");
    }

    #[test]
    fn bad_templates_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for %}"}"#)
            .unwrap();
        let err = ChatTemplate::load(dir.path()).err().unwrap();
        assert!(err.contains("tokenizer_config.json") && err.contains("does not compile"), "{err}");
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
        assert!(ChatTemplate::load(dir.path()).err().unwrap().contains("expected a string"));
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{}"#).unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
    }
}
