//! `stevedore serve` driven by the clients people use: `curl`, and the official `openai` Python
//! package (with `prometheus_client` parsing /metrics). Each says "skipped: ..." when its client
//! is not installed. Python: `STEVEDORE_TEST_PYTHON`, else `.venv-clients/bin/python` at the
//! workspace root, else `python3` (see tests/clients/requirements.txt).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::Server;
use common::{fixture_dir, stevedore, PYDOC_MOE};
use serde_json::{json, Value};

fn model() -> String {
    fixture_dir(PYDOC_MOE).display().to_string()
}

fn generate(prompt: &str, max_new_tokens: usize) -> String {
    let n = max_new_tokens.to_string();
    let out =
        stevedore(["generate", "--model", &model(), "--prompt", prompt, "--max-new-tokens", &n, "--json"]);
    let v: Value = serde_json::from_str(out.ok()).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

/// A Python that has the `openai` package, if any.
fn python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("STEVEDORE_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-clients/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| Command::new(p).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn the_openai_python_package_gets_generates_results() {
    let Some(py) = python() else {
        eprintln!(
            "skipped: no Python with the `openai` package (pip install -r tests/clients/requirements.txt)"
        );
        return;
    };
    let server = Server::start(&["--model", &model()]);
    let prompt = "The import statement";
    let user = "What does the import statement do?";
    let expected = json!({
        "model": PYDOC_MOE,
        "prompt": prompt,
        "completion": generate(prompt, 40),
        "chat": [user, generate(&format!("User: {user}\nAssistant:"), 30)],
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/openai_client.py");
    let out = Command::new(&py).arg(&script).arg(&server.base).arg(expected.to_string()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}\n--- server\n{}", py.display(), server.log());
    for step in ["models.list", "completions, streamed", "chat.completions, streamed with usage", "errors"] {
        assert!(stdout.contains(&format!("ok: {step}")), "{stdout}");
    }
    eprint!("{stdout}");
}

fn curl(args: &[&str]) -> Option<String> {
    let out = Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output().ok()?;
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn curl_gets_generates_results_streaming_or_not() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let server = Server::start(&["--model", &model()]);
    let expected = generate("The import statement", 24);
    let url = server.url("/v1/completions");
    let body = json!({"prompt": "The import statement", "max_tokens": 24, "temperature": 0});
    let out = curl(&[&url, "-H", "Content-Type: application/json", "-d", &body.to_string()]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["choices"][0]["text"], json!(expected));
    let mut body = body;
    body["stream"] = json!(true);
    let out = curl(&["-N", &url, "-H", "Content-Type: application/json", "-d", &body.to_string()]).unwrap();
    let datas: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{out}");
    let text: String = datas[..datas.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_owned()
        })
        .collect();
    assert_eq!(text, expected);
}
