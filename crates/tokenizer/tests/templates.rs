//! The 70 real chat templates of llama.cpp's `models/templates/` (the tree the references
//! come from; `make test-models` fetches it) rendered by Realm against what Python's jinja2
//! renders with Hugging Face's setup (`tests/templates/render.py`, committed as
//! `tests/reference/templates.jsonl`): the same bytes, or an error where jinja2 gives one
//! (a template that needs tools or refuses a role).

use std::path::{Path, PathBuf};

use realm_tokenizer::{ChatTemplate, Message};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// 2024-07-26 10:11:12 UTC, the time render.py gives `strftime_now`.
const NOW: i64 = 1_721_988_672;

/// render.py's conversations, in its order.
fn cases() -> Vec<(Vec<Message>, bool)> {
    let m = |r: &str, c: &str| Message::new(r, c);
    let three = vec![
        m("user", "Hi"),
        m("assistant", "Hello! How can I help?"),
        m("user", "Tell me a joke."),
    ];
    vec![
        (vec![m("user", "Hello")], true),
        (
            vec![
                m("system", "You are a helpful assistant."),
                m("user", "What is 2+2?"),
            ],
            true,
        ),
        (three.clone(), true),
        (three, false),
        (
            vec![
                m("system", "Be brief."),
                m("user", "Name a color."),
                m("assistant", "Blue."),
            ],
            false,
        ),
    ]
}

#[test]
fn llama_cpp_templates_render_as_jinja2_does() {
    let dir = root().join("target/llama.cpp/src/models/templates");
    let reference = std::fs::read_to_string(root().join("tests/reference/templates.jsonl"))
        .expect("tests/reference/templates.jsonl");
    let cases = cases();
    let (mut same, mut errors, mut total) = (0, 0, 0);
    let mut failures = Vec::new();
    for line in reference.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).expect("json");
        let name = rec["template"].as_str().expect("template");
        let case = rec["case"].as_u64().expect("case") as usize;
        let source = std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (make test-models fetches the tree)"));
        total += 1;
        let (messages, generation_prompt) = &cases[case];
        let got = ChatTemplate::new(source, "test", "<s>".into(), "</s>".into())
            .map(|t| t.at_time(NOW))
            .and_then(|t| t.render(messages, *generation_prompt));
        match (&rec["output"], got) {
            (serde_json::Value::String(want), Ok(got)) if *want == got => same += 1,
            (serde_json::Value::String(want), got) => failures.push(format!(
                "{name} case {case}:\n  jinja2 {want:?}\n  realm  {got:?}"
            )),
            (_, Err(_)) => errors += 1,
            (_, Ok(got)) => failures.push(format!(
                "{name} case {case}: jinja2 fails ({}), Realm rendered {got:?}",
                rec["error"]
            )),
        }
    }
    println!("{total} renderings: {same} byte-equal to jinja2, {errors} errors as in jinja2");
    assert!(total >= 300, "only {total} renderings");
    assert!(
        failures.is_empty(),
        "{} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
