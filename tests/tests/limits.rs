//! Requests and configs past what a model can run are clear errors, not panics or aborts.

mod common;

use common::{copy_fixture, fixture_dir, stevedore};

#[test]
fn generation_past_the_context_is_refused() {
    let dir = fixture_dir("pydoc-moe");
    for n in ["300", "18446744073709551615"] {
        stevedore([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            n,
        ])
        .err(&["context of 256 positions", "max_position_embeddings"]);
    }
}

#[test]
fn absurd_config_values_name_the_field() {
    let cases = [
        ("\"rms_norm_eps\"", "\"clip_qkv\": -1.0, \"rms_norm_eps\"", "clip_qkv"),
        ("\"rms_norm_eps\"", "\"head_dim\": 4611686018427387904, \"rms_norm_eps\"", "overflow"),
        ("\"rms_norm_eps\"", "\"rope_theta\": 0.0, \"rms_norm_eps\"", "rope_theta"),
    ];
    for (from, to, needle) in cases {
        let tmp = copy_fixture("olmoe");
        let path = tmp.path().join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from));
        // Later keys win in serde_json, so drop any existing key of the same name first.
        let key = to.split(':').next().unwrap();
        let kept: String =
            text.lines().filter(|l| !l.trim_start().starts_with(key)).collect::<Vec<_>>().join("\n");
        std::fs::write(&path, kept.replacen(from, to, 1)).unwrap();
        stevedore(["generate", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "1"])
            .err(&["config.json", needle]);
    }
}
