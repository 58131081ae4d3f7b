//! stevedore's chat-template rendering (minijinja, set up as transformers sets up Jinja2) against
//! transformers' own `apply_chat_template`, 4.x and 5.x, on the templates and conversations of
//! `tests/fixtures/make_chat_templates.py`: every string equal, every refusal refused with the
//! template's message.

mod common;

use common::{fixture_dir, PYDOC_MOE};
use serde_json::Value;
use stevedore_engine::api::chat::ChatTemplate;

#[test]
fn renderings_equal_transformers_4_and_5() {
    let dir = fixture_dir("chat_templates");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir(PYDOC_MOE).join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let tokens: Vec<(&'static str, String)> = ["bos_token", "eos_token", "pad_token"]
        .into_iter()
        .filter_map(|k| config[k].as_str().map(|v| (k, v.to_owned())))
        .collect();
    for major in ["4", "5"] {
        let path = dir.join(format!("rendered-{major}.json"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let rendered = doc["rendered"].as_array().unwrap();
        assert!(rendered.len() >= 20, "{}: too few renderings", path.display());
        for r in rendered {
            let (file, case_name) = (r["template"].as_str().unwrap(), r["case"].as_str().unwrap());
            let src = std::fs::read_to_string(dir.join(file)).unwrap();
            let t = ChatTemplate::new(file, src, None, tokens.clone()).unwrap();
            let case = &doc["cases"][case_name];
            let messages = case["messages"].as_array().unwrap();
            let tools = case.get("tools");
            let gen = case.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
            let ours = t.render(messages, tools, gen, case.get("kwargs").and_then(Value::as_object));
            let what = format!("{file} / {case_name} vs transformers {}", doc["transformers"]);
            match (&r["text"], &r["error"], ours) {
                (Value::String(want), _, Ok(got)) => assert_eq!(&got, want, "{what}"),
                (_, Value::String(want), Err(got)) => {
                    assert!(got.contains(want.as_str()), "{what}: {got} vs {want}")
                }
                (_, _, got) => panic!("{what}: transformers gave {r}, we gave {got:?}"),
            }
        }
    }
}
