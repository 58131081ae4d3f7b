//! `stevedore batch` end to end on `pydoc-moe`: every request answered exactly once across
//! SIGKILLs at several points and a Ctrl-C, each result equal to an uninterrupted run's; results
//! equal `stevedore generate`; bad lines become error records and the job goes on; fatal input
//! problems are clear errors at start; shards partition the input; the deploy files parse.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_dir, stevedore, PYDOC_MOE};
use serde_json::{json, Value};

fn model() -> String {
    fixture_dir(PYDOC_MOE).display().to_string()
}

/// `n` requests: completions and chat, different prompts and lengths, greedy.
fn requests(n: usize) -> Vec<Value> {
    let subjects =
        ["The import statement", "A list", "The with statement", "Exceptions", "A class", "Generators"];
    (0..n)
        .map(|i| {
            let s = subjects[i % subjects.len()];
            let max = 6 + (i * 5) % 14;
            let body = if i % 3 == 0 {
                json!({"messages": [{"role": "user", "content": format!("{s} {i}")}], "max_tokens": max, "temperature": 0})
            } else {
                json!({"model": "any", "prompt": format!("{s} {i}"), "max_tokens": max, "temperature": 0})
            };
            let url = if i % 3 == 0 { "/v1/chat/completions" } else { "/v1/completions" };
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": url, "body": body})
        })
        .collect()
}

fn write_input(dir: &Path, reqs: &[Value]) -> PathBuf {
    let path = dir.join("requests.jsonl");
    let text: String = reqs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn batch_args(input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["batch", "--model", &model(), "--input"].iter().map(|s| s.to_string()).collect();
    a.push(input.display().to_string());
    a.push("--output".into());
    a.push(output.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The output, checked: every line whole JSON, no custom_id twice. custom_id -> what must not
/// change between runs (status, choices' texts and finish reasons, usage).
fn results(path: &Path) -> BTreeMap<String, Value> {
    // A run killed before it opened the output leaves none.
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn last line in {}", path.display());
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}: {line}", i + 1));
        let id = v["custom_id"].as_str().map_or_else(|| format!("#line {}", v["line"]), str::to_owned);
        let body = &v["response"]["body"];
        let choices: Vec<Value> = body["choices"]
            .as_array()
            .map(|cs| {
                cs.iter().map(|c| json!([c["text"], c["message"]["content"], c["finish_reason"]])).collect()
            })
            .unwrap_or_default();
        let kept = json!({"status": v["response"]["status_code"], "choices": choices, "usage": body["usage"],
                          "error": v["error"], "error_body": body["error"]["message"]});
        assert!(out.insert(id.clone(), kept).is_none(), "{id} answered twice in {}", path.display());
    }
    out
}

fn wait_lines(path: &Path, at_least: usize, child: &mut std::process::Child) {
    let t = Instant::now();
    loop {
        let n = std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
        if n >= at_least || child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no progress to {at_least} lines");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn every_request_is_answered_exactly_once_across_kills() {
    let dir = tempfile::tempdir().unwrap();
    let reqs = requests(100);
    let input = write_input(dir.path(), &reqs);
    let reference = dir.path().join("reference.jsonl");
    stevedore(batch_args(&input, &reference, &["--max-batch", "2"])).ok();
    let expected = results(&reference);
    assert_eq!(expected.len(), 100);
    assert!(expected.values().all(|v| v["status"] == 200), "{expected:?}");

    // SIGKILL after 0, some, most lines; then a Ctrl-C; then run to the end.
    let output = dir.path().join("results.jsonl");
    let args = batch_args(&input, &output, &["--max-batch", "2"]);
    for at in [0, 7, 40, 85] {
        let mut child = spawn(&args);
        wait_lines(&output, at, &mut child);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whole lines, none twice, so far (a torn end is repaired on restart).
        let so_far = std::fs::read_to_string(&output).map(|t| t.lines().count()).unwrap_or(0);
        eprintln!("killed at {so_far} lines (waited for {at})");
        assert!(so_far < 100, "the run ended before the kill at {at}: the test needs a slower run");
    }
    let mut child = spawn(&args);
    wait_lines(&output, 90, &mut child);
    let interrupted = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("run the same command again") || out.status.success(),
        "{stderr}"
    );
    let run = stevedore(&args);
    run.ok();
    assert_eq!(
        results(&output),
        expected,
        "after kills and a restart, every result equals the uninterrupted run's"
    );
}

#[test]
fn a_torn_last_line_is_repaired_and_its_request_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &requests(6));
    let output = dir.path().join("results.jsonl");
    let args = batch_args(&input, &output, &[]);
    stevedore(&args).ok();
    let expected = results(&output);
    // Drop the last record and leave half of it, as a kill during the write would.
    let text = std::fs::read_to_string(&output).unwrap();
    let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    std::fs::write(&output, format!("{}{}", &text[..cut], &text[cut..cut + 30])).unwrap();
    let run = stevedore(&args);
    assert!(run.ok().is_empty() && run.stderr.contains("cut a torn last line"), "{}", run.stderr);
    assert_eq!(results(&output), expected);
}

#[test]
fn results_equal_generate() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["The import statement", "A list"];
    let reqs: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"custom_id": i.to_string(), "method": "POST", "url": "/v1/completions",
                             "body": {"prompt": p, "max_tokens": 30, "temperature": 0}})
        })
        .collect();
    let input = write_input(dir.path(), &reqs);
    let output = dir.path().join("out.jsonl");
    stevedore(batch_args(&input, &output, &[])).ok();
    let got = results(&output);
    for (i, p) in prompts.iter().enumerate() {
        let g =
            stevedore(["generate", "--model", &model(), "--prompt", p, "--max-new-tokens", "30", "--json"]);
        let v: Value = serde_json::from_str(g.ok()).unwrap();
        assert_eq!(got[&i.to_string()]["choices"][0][0], v["text"], "{p}");
    }
}

#[test]
fn bad_lines_become_error_records_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let ok = json!({"custom_id": "ok", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "A list", "max_tokens": 4, "unknown_field": 1}, "extra": true});
    let lines = [
        ok.to_string(),
        "{not json".into(),
        json!({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}).to_string(),
        json!({"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {}}).to_string(),
        json!({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}).to_string(),
        json!({"custom_id": "long", "url": "/v1/completions", "body": {"prompt": "a ".repeat(300)}})
            .to_string(),
        json!({"custom_id": "neg", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": -1}})
            .to_string(),
        json!({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}).to_string(),
    ];
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    stevedore(batch_args(&input, &output, &[])).ok();
    let r = results(&output);
    assert_eq!(r.len(), lines.len(), "{r:#?}");
    assert_eq!(r["ok"]["status"], 200, "unknown fields are ignored");
    let says = |key: &str, what: &str| {
        let v = &r[key];
        let all = format!("{} {}", v["error"], v["error_body"]);
        assert!(all.contains(what), "{key}: {all} does not say {what}");
    };
    says("#line 2", "not valid JSON");
    says("#line 3", "missing custom_id");
    says("url", "not supported");
    says("nobody", "missing body");
    says("long", "maximum context length");
    says("neg", "max_tokens must be at least 1");
    says("get", "method must be POST");
}

#[test]
fn fatal_input_problems_are_clear_errors_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let dup = [requests(3)[0].clone(), requests(3)[1].clone(), requests(3)[0].clone()];
    let input = write_input(dir.path(), &dup);
    let out = dir.path().join("out.jsonl");
    stevedore(batch_args(&input, &out, &[])).err(&["requests.jsonl:3", "also on line 1"]);
    stevedore(batch_args(&dir.path().join("missing.jsonl"), &out, &[]))
        .err(&["missing.jsonl", "cannot read the input"]);
    stevedore(batch_args(&input, &dir.path().join("no/such/dir/out.jsonl"), &[])).err(&["does not exist"]);
    std::fs::write(&out, "not a record\n").unwrap();
    let input = write_input(dir.path(), &requests(2));
    stevedore(batch_args(&input, &out, &[])).err(&["out.jsonl:1: not a result record"]);
    stevedore(batch_args(&input, &dir.path().join("o.jsonl"), &["--shard", "3/3"])).err(&["0 <= I < N"]);
}

#[test]
fn shards_partition_the_input_and_concatenate_to_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let reqs: Vec<Value> = requests(24)
        .into_iter()
        .map(|mut r| {
            r["body"]["max_tokens"] = json!(2);
            r
        })
        .collect();
    let input = write_input(dir.path(), &reqs);
    let whole = dir.path().join("whole.jsonl");
    stevedore(batch_args(&input, &whole, &[])).ok();
    let expected = results(&whole);
    let mut union: HashMap<String, Value> = HashMap::new();
    for i in 0..3 {
        let out = dir.path().join(format!("shard-{i}.jsonl"));
        stevedore(batch_args(&input, &out, &["--shard", &format!("{i}/3")])).ok();
        let part = results(&out);
        assert!(!part.is_empty() && part.len() < 24, "shard {i}: {} requests", part.len());
        for (k, v) in part {
            assert!(union.insert(k.clone(), v).is_none(), "{k} in two shards");
        }
    }
    assert_eq!(union.into_iter().collect::<BTreeMap<_, _>>(), expected);
    // The environment of a Slurm array task chooses the same shard as the flag.
    let a = dir.path().join("flag.jsonl");
    let b = dir.path().join("env.jsonl");
    stevedore(batch_args(&input, &a, &["--shard", "1/3"])).ok();
    let out = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(batch_args(&input, &b, &[]))
        .envs([("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "3")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(results(&a), results(&b));
}

#[test]
fn the_deploy_files_parse_and_agree_with_the_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let text = std::fs::read_to_string(root.join("kubernetes-indexed-job.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("valid YAML");
    let job = &docs[0];
    assert_eq!(job["kind"].as_str(), Some("Job"));
    assert_eq!(job["spec"]["completionMode"].as_str(), Some("Indexed"));
    let completions = job["spec"]["completions"].as_i64().unwrap();
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_vec().unwrap();
    let count = env.iter().find(|e| e["name"].as_str() == Some("STEVEDORE_SHARD_COUNT")).unwrap();
    assert_eq!(count["value"].as_str(), Some(completions.to_string().as_str()));
    let args = container["args"][0].as_str().unwrap();
    assert!(args.contains("stevedore batch") && args.contains("${JOB_COMPLETION_INDEX}"), "{args}");

    let slurm = root.join("slurm-array.sh");
    let s = std::fs::read_to_string(&slurm).unwrap();
    assert!(
        s.contains("#SBATCH --array=0-3")
            && s.contains("stevedore batch")
            && s.contains("SLURM_ARRAY_TASK_ID")
    );
    if let Ok(o) = Command::new("bash").arg("-n").arg(&slurm).output() {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn regrouping_gives_the_same_results_as_fcfs() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &requests(40));
    let run = |schedule: &str| {
        let out = dir.path().join(format!("{schedule}.jsonl"));
        let r = stevedore(batch_args(&input, &out, &["--max-batch", "4", "--schedule", schedule, "--json"]));
        let summary: Value = serde_json::from_str(r.ok()).unwrap();
        assert!(summary["sequences_per_pass"].as_f64().unwrap() <= 4.0, "{summary}");
        results(&out)
    };
    let fcfs = run("fcfs");
    assert_eq!(fcfs.len(), 40);
    assert_eq!(run("regroup"), fcfs);
}
