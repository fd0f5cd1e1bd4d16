//! End to end through the real component: `realm run` on the default model, compared with
//! llama.cpp's greedy outputs, plus streaming, isolation of weights, and error handling.
//!
//! Needs `make models` and the release guest component (`make test` builds both first).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;

use common::{floats, greedy_parity, ids, realm, root, run_json};

#[test]
fn paris_in_one_word() {
    let out = realm()
        .args([
            "run",
            "--temp",
            "0",
            "What is the capital of France? Answer in one word.",
        ])
        .output()
        .expect("realm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
}

/// Greedy ids equal llama.cpp's up to the first near-tie (a top-2 logit gap below 0.02 in
/// llama.cpp's run), or over the whole output, end-of-generation id included.
#[test]
fn greedy_ids_match_llama_cpp() {
    check_greedy_parity("smollm2-135m-q4_1", None);
}

#[test]
fn gemma3_greedy_ids_match_llama_cpp() {
    check_greedy_parity("gemma-3-270m-q4_k_m", Some("gemma-3-270m-q4_k_m.gguf"));
}

#[test]
fn gemma3_answers_paris() {
    let model = root().join("models/gemma-3-270m-q4_k_m.gguf");
    let out = realm()
        .args([
            "run",
            "--model",
            model.to_str().expect("utf-8"),
            "--raw",
            "--temp",
            "0",
            "-n",
            "8",
        ])
        .arg("Question: What is the capital of France?\nAnswer:")
        .output()
        .expect("realm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(" Paris"), "{text:?}");
}

/// Runs every prompt of `tests/reference/<dir>/greedy.jsonl` (chat `messages`, or a raw
/// `prompt` when `model` is given) and compares with llama.cpp's greedy ids.
fn check_greedy_parity(dir: &str, model: Option<&str>) {
    let path = root()
        .join("tests/reference")
        .join(dir)
        .join("greedy.jsonl");
    let model_arg = model.map(|m| {
        root()
            .join("models")
            .join(m)
            .to_str()
            .expect("utf-8")
            .to_string()
    });
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for line in std::fs::read_to_string(&path).expect("reference").lines() {
        let case: serde_json::Value = serde_json::from_str(line).expect("json");
        let name = case["id"].as_str().expect("id");
        let max = case["max_new_tokens"].to_string();
        let mut args: Vec<String> = vec!["--temp".into(), "0".into(), "-n".into(), max];
        if let Some(m) = &model_arg {
            args.extend(["--model".into(), m.clone()]);
        }
        match case["messages"].as_array() {
            Some(messages) => {
                let mut user = String::new();
                for m in messages {
                    let text: String = m["content"].as_str().expect("text").into();
                    match m["role"].as_str() {
                        Some("system") => args.extend(["--system".into(), text]),
                        _ => user = text,
                    }
                }
                args.push(user);
            }
            None => args.extend([
                "--raw".into(),
                case["prompt"].as_str().expect("prompt").into(),
            ]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_json(&args);
        let (want, got) = (ids(&case["output_ids"]), ids(&out["ids"]));
        let p = greedy_parity(
            &want,
            &floats(&case["top2_gaps"]),
            &got,
            &floats(&out["margins"]),
        );
        report.push(format!(
            "{name}: first divergence {:?}, first near-tie {:?}, largest top-2 gap difference before divergence {:.3}",
            p.divergence, p.near_tie, p.max_gap_diff
        ));
        if !p.ok {
            failures.push(format!("{name}: llama.cpp {want:?}\n  realm     {got:?}"));
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        report.join("\n")
    );
}

#[test]
fn weights_stay_in_the_host() {
    let out = run_json(&["--temp", "0", "-n", "16", "Tell me about the sea."]);
    let guest = out["guest_memory_peak_bytes"].as_u64().expect("peak");
    let weights = out["weight_bytes"].as_u64().expect("weights");
    assert!(weights > 90_000_000, "{weights}");
    // The guest holds the tokenizer and bookkeeping, never the weights.
    assert!(
        guest < weights / 4,
        "guest linear memory {guest} vs weights {weights}"
    );
}

#[test]
fn text_streams_while_generating() {
    let mut child = realm()
        .args([
            "run",
            "--raw",
            "--temp",
            "0",
            "-n",
            "48",
            "Once upon a time",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("realm starts");
    let mut stdout = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("a first byte");
    // The first piece arrived while the process was still generating the rest.
    assert!(
        child.try_wait().expect("status").is_none(),
        "realm had already exited"
    );
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("the rest");
    assert!(child.wait().expect("exit").success());
    assert!(rest.len() > 20, "{rest:?}");
}

fn one_line_error(args: &[&str], needle: &str) {
    let out = realm().args(args).output().expect("realm runs");
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn errors_are_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("realm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let model = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let full = std::fs::read(&model).expect("model");

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &full[..full.len() / 2]).expect("write");

    // A well-formed file of an architecture Realm does not know.
    let file = realm_gguf::GgufFile::read(full.as_slice()).expect("parses");
    let mut w = realm_gguf::GgufWriter::new();
    for (k, v) in file.metadata.iter() {
        let k = k.replacen("llama.", "mamba9.", 1);
        let v = if k == "general.architecture" {
            realm_gguf::Value::String("mamba9".into())
        } else {
            v.clone()
        };
        w.kv(&k, v);
    }
    w.tensor(
        "blk.0.attn_norm.weight",
        realm_gguf::GgmlType::F32,
        &[576],
        vec![0; 576 * 4],
    );
    let unknown = dir.join("mamba9.gguf");
    std::fs::write(&unknown, w.to_bytes()).expect("write");

    let s = |p: &PathBuf| p.to_str().expect("utf-8").to_string();
    one_line_error(
        &["run", "--model", &s(&dir.join("missing.gguf")), "hi"],
        "does not exist",
    );
    one_line_error(&["run", "--model", &s(&truncated), "hi"], "spans bytes");
    one_line_error(
        &["run", "--model", &s(&unknown), "hi"],
        "architecture 'mamba9' is not supported (known: llama, gemma2, gemma3,",
    );
    let long = "the sea ".repeat(200);
    one_line_error(&["run", "--ctx-size", "128", &long], "context overflow");
    one_line_error(&["run", "--temp", "-1", "hi"], "temperature");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_keeps_the_conversation() {
    use std::io::Write;
    let mut child = realm()
        .args(["chat", "--temp", "0", "-n", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("realm starts");
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(b"What is the capital of France? Answer in one word.\nAnd of Italy?\n\n")
        .expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("exit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies.len() >= 2, "{text}");
    assert_eq!(replies[0], "The capital of France is Paris.");
    // The second answer is given in the context of the first question.
    assert!(text.contains("Rome"), "{text}");
}
