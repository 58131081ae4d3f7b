//! Broken checkpoints, each made from a copy of a fixture in a temporary directory, must fail
//! with `error: ` on stderr naming the file (or field, or tensor) and the problem, exit status 1,
//! and never a panic. `generate` and `inspect` both load the checkpoint, so both are checked.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{copy_fixture, fixture_dir, stevedore, Run, SafeTensors};

const EXPERT_W1: &str = "model.layers.1.block_sparse_moe.experts.3.w1.weight";
const EXPERT_W2: &str = "model.layers.2.block_sparse_moe.experts.5.w2.weight";

fn generate(dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--max-new-tokens", "2", "--json"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--prompt") {
        args.extend_from_slice(&["--prompt-ids", "5,6,7"]);
    }
    stevedore(args)
}

/// Both commands fail, each with an error mentioning every one of `needles`.
fn assert_load_fails(dir: &Path, needles: &[&str]) {
    generate(dir, &[]).err(needles);
    stevedore(["inspect", "--model", dir.to_str().unwrap()]).err(needles);
}

/// A mixtral copy and the path of its single `model.safetensors`.
fn mixtral() -> (tempfile::TempDir, PathBuf) {
    let tmp = copy_fixture("mixtral");
    let file = tmp.path().join("model.safetensors");
    (tmp, file)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn truncated_shard() {
    let (tmp, file) = mixtral();
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&file), "truncated"]);

    // A shard of a sharded checkpoint, cut inside its header's length field.
    let tmp = copy_fixture("qwen2_moe");
    let shard = tmp.path().join("model-00002-of-00004.safetensors");
    fs::write(&shard, &fs::read(&shard).unwrap()[..5]).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&shard), "too short"]);
}

#[test]
fn header_length_beyond_the_file() {
    let (tmp, file) = mixtral();
    let mut bytes = fs::read(&file).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    fs::write(&file, &bytes).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&file), "header length", &len.to_string(), "beyond the file"]);
}

#[test]
fn header_is_not_json() {
    let (tmp, file) = mixtral();
    let mut bytes = fs::read(&file).unwrap();
    bytes[8..16].copy_from_slice(b"{oops!!!");
    fs::write(&file, &bytes).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&file), "header"]);
}

#[test]
fn tensor_offsets_outside_the_file() {
    let (tmp, file) = mixtral();
    let mut st = SafeTensors::read(&file);
    // Move the last tensor's bytes past the end of the data section.
    let last = st.names().pop().unwrap();
    let (start, end) = st.offsets(&last);
    let shift = st.data.len() as u64;
    st.set_offsets(&last, start + shift, end + shift);
    st.write(&file);
    assert_load_fails(tmp.path(), &[path_str(&file), &last, "outside the file"]);
}

#[test]
fn overlapping_tensor_offsets() {
    let (tmp, file) = mixtral();
    let mut st = SafeTensors::read(&file);
    // Two experts' w1 (same dtype and shape) pointed at the same bytes.
    let other = EXPERT_W1.replace("experts.3", "experts.4");
    let (start, end) = st.offsets(EXPERT_W1);
    st.set_offsets(&other, start, end);
    st.write(&file);
    let stderr = generate(tmp.path(), &[]).err(&[path_str(&file), "overlapping"]).to_owned();
    assert!(
        stderr.contains(EXPERT_W1) || stderr.contains(&other),
        "the error names neither tensor:\n{stderr}"
    );
}

/// Fixture `fixture` (single-file) without tensor `name` fails to load, naming it and the model.
fn assert_missing_fails(fixture: &str, name: &str) {
    let tmp = copy_fixture(fixture);
    let file = tmp.path().join("model.safetensors");
    let mut st = SafeTensors::read(&file);
    st.remove(name);
    st.write(&file);
    assert_load_fails(tmp.path(), &[name, "missing", path_str(tmp.path())]);
}

#[test]
fn missing_tensor() {
    for name in [EXPERT_W2, "model.norm.weight", "model.layers.0.self_attn.k_proj.weight"] {
        assert_missing_fails("mixtral", name);
    }
}

/// GLM-4.5's own parts: the router's correction bias and shared experts missing or misshapen,
/// and group settings that cannot route, each an error naming the file and tensor or field.
#[test]
fn glm4_moe_parts() {
    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    let shared = "model.layers.2.mlp.shared_experts.up_proj.weight";
    for name in [bias, shared] {
        assert_missing_fails("glm4_moe", name);
    }
    let tmp = copy_fixture("glm4_moe");
    let file = tmp.path().join("model.safetensors");
    let mut st = SafeTensors::read(&file);
    let dtype = st.dtype(bias);
    st.retype(bias, &dtype, &[4]);
    st.write(&file);
    assert_load_fails(tmp.path(), &[path_str(&file), bias, "shape"]);
    for (edit, needles) in [
        (("\"n_group\": 2", "\"n_group\": 3"), ["n_group", "groups of at least 2"]),
        (("\"topk_group\": 1", "\"topk_group\": 3"), ["topk_group", "at most `n_group`"]),
        (
            ("\"partial_rotary_factor\": 0.5", "\"partial_rotary_factor\": 0.1"),
            ["partial_rotary_factor", "even"],
        ),
    ] {
        let tmp = copy_fixture("glm4_moe");
        let path = tmp.path().join("config.json");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(edit.0), "{}", edit.0);
        fs::write(&path, text.replace(edit.0, edit.1)).unwrap();
        let mut all = vec![path_str(&path)];
        all.extend(needles);
        assert_load_fails(tmp.path(), &all);
    }
}

/// Phi-3.5-MoE's own parts: a LayerNorm bias or the LM head bias missing, LongRoPE factors that
/// do not match the head, and a position past where LongRoPE switches factors.
#[test]
fn phimoe_parts() {
    for name in [
        "model.layers.1.post_attention_layernorm.bias",
        "lm_head.bias",
        "model.layers.0.self_attn.o_proj.bias",
    ] {
        assert_missing_fails("phimoe", name);
    }
    let tmp = copy_fixture("phimoe");
    let path = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    v["rope_parameters"]["short_factor"].as_array_mut().unwrap().pop();
    fs::write(&path, v.to_string()).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&path), "short_factor", "has 7 values", "8 frequencies"]);
    // 60 prompt tokens + 10 new pass position 64, where LongRoPE would switch to its long factors.
    let prompt: Vec<String> = (3..63).map(|i| i.to_string()).collect();
    let run = stevedore([
        "generate",
        "--model",
        path_str(&fixture_dir("phimoe")),
        "--max-new-tokens",
        "10",
        "--prompt-ids",
        &prompt.join(","),
    ]);
    run.err(&["64"]);
}

/// DeepSeek-V3's latent attention: a missing latent norm, an expansion of the wrong shape, and
/// a config without the latent rank, each an error naming the file and tensor or field.
#[test]
fn deepseek_v3_parts() {
    assert_missing_fails("deepseek_v3", "model.layers.2.self_attn.kv_a_layernorm.weight");
    assert_missing_fails("deepseek_v3", "model.layers.0.self_attn.q_a_proj.weight");
    let tmp = copy_fixture("deepseek_v3");
    let file = tmp.path().join("model.safetensors");
    let mut st = SafeTensors::read(&file);
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let (dtype, shape) = (st.dtype(name), st.shape(name));
    st.retype(name, &dtype, &[shape[0] - 4, shape[1]]);
    st.write(&file);
    assert_load_fails(tmp.path(), &[path_str(&file), name, "shape"]);
    let tmp = copy_fixture("deepseek_v3");
    let path = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("kv_lora_rank");
    fs::write(&path, v.to_string()).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&path), "kv_lora_rank", "missing"]);
}

#[test]
fn wrong_dtype() {
    for dtype in ["I32", "F64"] {
        let (tmp, file) = mixtral();
        let mut st = SafeTensors::read(&file);
        let shape = st.shape(EXPERT_W1);
        st.retype(EXPERT_W1, dtype, &shape);
        st.write(&file);
        assert_load_fails(tmp.path(), &[path_str(&file), EXPERT_W1, dtype]);
    }
}

#[test]
fn wrong_shape() {
    // An expert's down projection stored transposed: same bytes, wrong shape.
    let (tmp, file) = mixtral();
    let mut st = SafeTensors::read(&file);
    let (dtype, shape) = (st.dtype(EXPERT_W2), st.shape(EXPERT_W2));
    st.retype(EXPERT_W2, &dtype, &[shape[1], shape[0]]);
    st.write(&file);
    let transposed = format!("[{}, {}]", shape[1], shape[0]);
    assert_load_fails(tmp.path(), &[path_str(&file), EXPERT_W2, "shape", &transposed]);

    // A dense weight one row short.
    let (tmp, file) = mixtral();
    let mut st = SafeTensors::read(&file);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (dtype, shape) = (st.dtype(name), st.shape(name));
    st.retype(name, &dtype, &[shape[0] - 1, shape[1]]);
    st.write(&file);
    assert_load_fails(tmp.path(), &[path_str(&file), name, "shape"]);
}

/// Rewrites `config.json` of a mixtral copy with `edit` applied to its text.
fn with_config(edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, PathBuf) {
    let tmp = copy_fixture("mixtral");
    let path = tmp.path().join("config.json");
    fs::write(&path, edit(fs::read_to_string(&path).unwrap())).unwrap();
    (tmp, path)
}

#[test]
fn config_is_not_json() {
    let (tmp, path) = with_config(|t| t.replacen('{', "{ oops", 1));
    assert_load_fails(tmp.path(), &[path_str(&path), "invalid JSON"]);
}

#[test]
fn config_missing_field() {
    let (tmp, path) = with_config(|t| {
        let mut v: serde_json::Value = serde_json::from_str(&t).unwrap();
        v.as_object_mut().unwrap().remove("hidden_size").expect("the fixture has hidden_size");
        v.to_string()
    });
    assert_load_fails(tmp.path(), &[path_str(&path), "hidden_size", "missing"]);
}

#[test]
fn config_unsupported_architecture() {
    let (tmp, path) = with_config(|t| t.replace("MixtralForCausalLM", "GPT2LMHeadModel"));
    let supported = [
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
        "Glm4MoeForCausalLM",
        "PhimoeForCausalLM",
        "DeepseekV3ForCausalLM",
        "DeepseekV2ForCausalLM",
    ];
    let mut needles = vec![path_str(&path), "GPT2LMHeadModel", "unsupported"];
    needles.extend(supported);
    assert_load_fails(tmp.path(), &needles);
}

#[test]
fn config_missing() {
    let tmp = copy_fixture("mixtral");
    let path = tmp.path().join("config.json");
    fs::remove_file(&path).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&path), "No such file"]);
}

#[test]
fn missing_tokenizer_with_prompt() {
    let dir = fixture_dir("mixtral");
    assert!(!dir.join("tokenizer.json").exists(), "the mixtral fixture is expected to have no tokenizer");
    let tokenizer = dir.join("tokenizer.json");
    generate(&dir, &["--prompt", "hello"]).err(&[path_str(&tokenizer), "not found"]);
}

#[test]
fn missing_shard() {
    let tmp = copy_fixture("qwen2_moe");
    let shard = tmp.path().join("model-00003-of-00004.safetensors");
    fs::remove_file(&shard).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&shard), "No such file"]);
}

#[test]
fn shard_index_is_wrong() {
    let tmp = copy_fixture("qwen2_moe");
    let index = tmp.path().join("model.safetensors.index.json");
    let text = fs::read_to_string(&index).unwrap();
    fs::write(&index, &text[..text.len() / 2]).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&index), "invalid JSON"]);

    // The index places a tensor in a shard that does not hold it.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]["lm_head.weight"] = "model-00001-of-00004.safetensors".into();
    fs::write(&index, v.to_string()).unwrap();
    assert_load_fails(tmp.path(), &[path_str(&index), "lm_head.weight", "model-00001-of-00004.safetensors"]);
}

/// Replaces the file at `path` with a directory of that name: unreadable even as root.
fn make_directory(path: &Path) {
    fs::remove_file(path).unwrap();
    fs::create_dir(path).unwrap();
}

#[test]
fn unreadable_weights() {
    let (tmp, file) = mixtral();
    make_directory(&file);
    assert_load_fails(tmp.path(), &[path_str(&file), "directory"]);

    let tmp = copy_fixture("qwen2_moe");
    let shard = tmp.path().join("model-00004-of-00004.safetensors");
    make_directory(&shard);
    assert_load_fails(tmp.path(), &[path_str(&shard), "directory"]);
}

#[test]
fn unreadable_config() {
    let tmp = copy_fixture("mixtral");
    let path = tmp.path().join("config.json");
    make_directory(&path);
    assert_load_fails(tmp.path(), &[path_str(&path), "directory"]);
}

#[test]
fn unreadable_tokenizer_with_prompt() {
    let tmp = copy_fixture("mixtral");
    let path = tmp.path().join("tokenizer.json");
    fs::create_dir(&path).unwrap();
    generate(tmp.path(), &["--prompt", "hello"]).err(&[path_str(&path)]);
}

#[test]
fn weights_without_read_permission() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, file) = mixtral();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::File::open(&file).is_ok() {
        // Root (or CAP_DAC_OVERRIDE) reads it anyway; the directory cases above cover this.
        eprintln!("note: running with permission to read a mode-000 file (root?); skipping this check");
        return;
    }
    assert_load_fails(tmp.path(), &[path_str(&file), "ermission denied"]);
}
