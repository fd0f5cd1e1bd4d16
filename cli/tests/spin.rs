//! The Spin adapter (`adapters/spin`, exporting `fermyon:spin/llm@2.0.0` over
//! `realm:inference`): composed with the Realm component and a small app that imports
//! only Spin's `llm` (tests/spin-app), with `realm plug`, then run with `realm run-wasm`.

mod common;

use common::{built, native_raw_text, ok, realm_output as realm, root, smollm2 as model, text};

/// app ← (adapter ← Realm): a component that imports only WASI and `realm:compute`.
/// Composed once per test process (the tests run in parallel).
fn composed() -> String {
    static COMPOSED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COMPOSED.get_or_init(compose).clone()
}

fn compose() -> String {
    let dir = root().join("target/tmp/spin-test");
    std::fs::create_dir_all(&dir).expect("target/tmp");
    let llm = dir.join("spin-llm-realm.wasm").display().to_string();
    let app = dir.join("spin-app-composed.wasm").display().to_string();
    let (adapter, guest, spin_app) = (
        built("realm_spin_llm.wasm"),
        built("realm_guest.wasm"),
        built("realm-spin-app.wasm"),
    );
    ok(realm(&["plug", &adapter, "--plug", &guest, "-o", &llm]));
    ok(realm(&["plug", &spin_app, "--plug", &llm, "-o", &app]));
    app
}

const PROMPT: &str = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn spin_app_infers_and_embeds_through_the_adapter() {
    let app = composed();
    let serve = format!("smol={}", model());
    let run = |args: &[&str]| {
        let mut all = vec!["run-wasm", "--model", &serve, &app];
        all.extend_from_slice(args);
        realm(&all)
    };

    // infer, greedy: the native path's text, and Spin's usage counts.
    let out = ok(run(&["infer", "smol", PROMPT, "8"]));
    let (answer, usage) = out.trim_end().rsplit_once('\n').expect("text, then usage");
    assert!(answer.contains("Paris"), "{out}");
    assert_eq!(answer, native_raw_text(PROMPT, &[]));
    let ids = ok(realm(&["tokenize", "--model", &model(), PROMPT]));
    let n_prompt = serde_json::from_str::<Vec<u32>>(&ids).expect("ids").len();
    let counts: Vec<usize> = usage
        .strip_prefix("usage: ")
        .expect("usage line")
        .split(' ')
        .map(|n| n.parse().expect("count"))
        .collect();
    assert_eq!(counts[0], n_prompt, "{usage}");
    assert!((1..=8).contains(&counts[1]), "{usage}");

    // Spin's default parameters (`none`): sampled, but still an answer.
    let out = ok(run(&["infer", "smol", PROMPT]));
    assert!(out.contains("usage: "), "{out}");

    // generate-embeddings: one unit vector per text, related texts close.
    let out = ok(run(&[
        "embed",
        "smol",
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
    ]));
    assert!(out.contains("embeddings: 2 x 576"), "{out}");
    assert_eq!(out.matches("norm: 1.0000").count(), 2, "{out}");
    let cos: f32 = out
        .lines()
        .find_map(|l| l.strip_prefix("cosine: "))
        .expect("cosine")
        .parse()
        .expect("number");
    assert!(cos > 0.5, "{out}");
}

#[test]
fn spin_errors_map_to_spin_variants() {
    let app = composed();
    let serve = format!("smol={}", model());
    for (args, want) in [
        (&["infer", "nope", "hi", "4"][..], "ModelNotSupported"),
        (&["infer", "smol", "", "4"], "InvalidInput"),
        (&["embed", "nope", "x"], "ModelNotSupported"),
    ] {
        let mut all = vec!["run-wasm", "--model", &serve, &app];
        all.extend_from_slice(args);
        let out = realm(&all);
        let so = text(&out.stdout);
        assert!(!out.status.success(), "{args:?}: {so}");
        assert!(
            so.contains("llm error: ") && so.contains(want),
            "{args:?}: {so}"
        );
        assert!(!text(&out.stderr).contains("trapped"), "{args:?}");
    }
}
