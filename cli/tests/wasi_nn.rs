//! `realm run-wasm`: a wasi-nn app (tests/wasi-nn-app, written against the wasi-nn WIT
//! only) runs with Realm as its wasi-nn backend, LlamaEdge-style.

mod common;

use common::{built, native_raw_text, realm_output as realm, root, smollm2 as model, text};

fn app() -> String {
    built("realm-nn-app.wasm")
}

/// SmolLM2's chat template, written out by the app as LlamaEdge apps do.
const PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn wasi_nn_app_answers_paris_as_the_native_path_does() {
    let preload = format!("default:GGML:AUTO:{}", model());
    let meta = r#"{"n-predict": 8, "temp": 0, "ctx-size": 512, "stream": false}"#;
    let out = realm(&[
        "run-wasm",
        "--nn-preload",
        &preload,
        &app(),
        "default",
        PROMPT,
        meta,
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let got = text(&out.stdout);
    assert!(got.contains("Paris"), "{got}");
    // The same text as `realm run` on the same raw prompt and options.
    assert_eq!(
        got.trim_end(),
        native_raw_text(PROMPT, &["--ctx-size", "512"])
    );
}

#[test]
fn bad_tensors_and_metadata_are_wasi_nn_errors() {
    let preload = format!("default:GGML:AUTO:{}", model());
    let cases: [(&[&str], &str); 5] = [
        (
            &["default", "hi", r#"{"temp": "hot"}"#],
            "invalid metadata JSON",
        ),
        (&["default", "hi", r#"{"n_predict": 3}"#], "unknown field"),
        (
            &["default", "hi", "{}", "--f32-prompt"],
            "must be of type u8",
        ),
        (&["default", ""], "the prompt is empty"),
        (&["nope", "hi"], "failed to find graph with name: nope"),
    ];
    for (args, why) in cases {
        let mut all = vec!["run-wasm", "--nn-preload", &preload];
        let app = app();
        all.push(&app);
        all.extend_from_slice(args);
        let out = realm(&all);
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{args:?}: {so}");
        // The app got a wasi-nn error it could print (wasmtime-wasi-nn passes most as
        // `runtime-error` with a fixed text; the reason is logged), and nothing trapped.
        assert!(so.contains("wasi-nn error ("), "{args:?}: {so}{se}");
        assert!(so.contains(why) || se.contains(why), "{args:?}: {so}{se}");
        assert!(!se.contains("trapped"), "{args:?}: {se}");
    }
}

#[test]
fn bad_preloads_are_clear_cli_errors() {
    let app = app();
    let not_gguf = root().join("Cargo.toml").display().to_string();
    let cases = [
        ("default:ONNX:AUTO:x.onnx".to_string(), "not supported"),
        ("default".to_string(), "NAME:ENCODING:TARGET:PATH"),
        (
            "default:GGML:AUTO:/no/such.gguf".to_string(),
            "cannot preload `default`",
        ),
        (
            format!("default:GGML:AUTO:{not_gguf}"),
            "cannot preload `default`",
        ),
    ];
    for (spec, why) in cases {
        let out = realm(&["run-wasm", "--nn-preload", &spec, &app, "default", "hi"]);
        let se = text(&out.stderr);
        assert!(!out.status.success(), "{spec}");
        // One line says why (clap adds a hint line for argument errors).
        let first = se.lines().next().unwrap_or_default();
        assert!(first.contains(why), "{spec}: {se}");
    }
}
