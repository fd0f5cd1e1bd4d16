//! The `realm` binary on the real models and on broken input.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model(name: &str) -> PathBuf {
    let p = root().join("models").join(name);
    assert!(p.exists(), "{} is missing: run `make models`", p.display());
    p
}

fn realm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(args)
        .output()
        .expect("realm runs")
}

fn inspect_json(name: &str) -> serde_json::Value {
    let out = realm(&[
        "inspect",
        "--json",
        model(name).to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn inspect_shows_the_real_files() {
    let smol = inspect_json("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(smol["tensors"].as_array().expect("tensors").len(), 272);
    assert_eq!(smol["architecture"], "llama");
    assert_eq!(smol["hparams"]["n_layer"], 30);
    assert_eq!(smol["hparams"]["n_head_kv"], 3);
    assert_eq!(smol["tokenizer"]["kind"], "bpe");
    assert_eq!(smol["types"]["Q4_1"]["count"], 210);

    let gemma = inspect_json("gemma-3-270m-q4_k_m.gguf");
    assert_eq!(gemma["tensors"].as_array().expect("tensors").len(), 236);
    assert_eq!(gemma["architecture"], "gemma3");
    assert_eq!(gemma["hparams"]["head_dim"], 256);
    assert_eq!(gemma["tokenizer"]["n_vocab"], 262144);
    assert_eq!(gemma["types"]["Q4_K"]["count"], 27);

    let text = realm(&[
        "inspect",
        model("SmolLM2-135M-Instruct.Q4_1.gguf")
            .to_str()
            .expect("utf-8"),
    ]);
    let text = String::from_utf8(text.stdout).expect("utf-8");
    assert!(text.contains("tensors: 272"), "{text}");
    assert!(text.contains("blk.29.ffn_up.weight"), "{text}");
    assert!(text.contains("Q4_1 ×210"), "{text}");
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let out = realm(&[
        "tokenize",
        "--model",
        model("gemma-3-270m-q4_k_m.gguf").to_str().expect("utf-8"),
        "Hello world",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[2,9259,1902]");
    let out = realm(&[
        "tokenize",
        "-m",
        model("SmolLM2-135M-Instruct.Q4_1.gguf")
            .to_str()
            .expect("utf-8"),
        "<|im_start|>user\nHi<|im_end|>",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[1,4093,198,26843,2]"
    );
}

#[test]
fn bad_files_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("realm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let full = std::fs::read(model("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("read");
    let in_header = dir.join("in-header.gguf");
    std::fs::write(&in_header, &full[..1_000_000]).expect("write");
    let in_data = dir.join("in-data.gguf");
    std::fs::write(&in_data, &full[..50_000_000]).expect("write");
    let missing = dir.join("missing.gguf");
    for (path, needle) in [
        (&in_header, "array 'tokenizer.ggml.merges'"),
        (&in_data, "spans bytes"),
        (&missing, "cannot open"),
    ] {
        let out = realm(&["inspect", path.to_str().expect("utf-8")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--device`: an unknown one is refused by name with the devices there are; `cuda` on a
/// machine without an NVIDIA driver is a one-line error, and with one it answers (the
/// GPU machine runs this too).
#[test]
fn devices_are_chosen_by_name_with_one_line_errors() {
    let m = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = m.to_str().expect("utf-8 path");
    let out = realm(&["run", "--device", "tpu", "--model", m, "-n", "4", "Hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unknown device 'tpu'") && err.contains("cuda"),
        "{err}"
    );
    let out = realm(&["run", "--device", "cuda:x", "--model", m, "-n", "4", "Hi"]);
    assert!(!out.status.success());
    let out = realm(&[
        "run",
        "--device",
        "cuda",
        "--temp",
        "0",
        "--model",
        m,
        "-n",
        "8",
        "What is the capital of France?",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Paris"), "{text}");
    } else {
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("realm: error:") && last.contains("CUDA"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // Partial offload needs a GPU device.
    let out = realm(&["run", "--gpu-layers", "4", "--model", m, "-n", "4", "Hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--gpu-layers") && err.contains("--device cuda"),
        "{err}"
    );
}

/// `realm tokenize` on vocabulary-only GGUFs of llama.cpp's tokenizer suite (the tree
/// `make test-models` fetches) gives llama.cpp's ids; `crates/tokenizer/tests/suite.rs`
/// runs every text of every vocabulary through the library, this the CLI a user runs.
#[test]
fn tokenize_runs_llama_cpps_suite_vocabularies() {
    let dir = root().join("target/llama.cpp/src/models");
    for vocab in [
        "deepseek-llm",
        "qwen35",
        "falcon",
        "llama-bpe",
        "bert-bge",
        "gemma-4",
    ] {
        let path = dir.join(format!("ggml-vocab-{vocab}.gguf"));
        let inp = std::fs::read_to_string(path.with_extension("gguf.inp"))
            .unwrap_or_else(|e| panic!("{}: {e} (make test-models)", path.display()));
        let out = std::fs::read_to_string(path.with_extension("gguf.out")).expect(".out");
        let p = path.to_str().expect("utf-8 path");
        let mut checked = 0;
        for (text, want) in inp.split("\n__ggml_vocab_test__\n").zip(out.lines()) {
            // Texts a shell argument carries as they are, a few per vocabulary.
            if text.trim().is_empty() || text.starts_with('-') || checked == 6 {
                continue;
            }
            let o = realm(&[
                "tokenize",
                "--no-bos",
                "--no-parse-special",
                "--model",
                p,
                text,
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let got: Vec<u32> = serde_json::from_slice(&o.stdout).expect("a JSON array of ids");
            let want: Vec<u32> = want
                .split_whitespace()
                .map(|t| t.parse().expect("an id"))
                .collect();
            assert_eq!(got, want, "{vocab}: {text:?}");
            checked += 1;
        }
        assert_eq!(checked, 6, "{vocab}");
    }
}

/// `realm bench --json`: the decode time split covers the ops, the reads of results (where a
/// GPU's queued work shows) and the rest, shares of one decode that add up to at most 1.
#[test]
fn bench_splits_decode_time_by_where_it_goes() {
    let smol = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = realm(&[
        "bench",
        "--json",
        "--model",
        smol.to_str().expect("utf-8 path"),
        "-t",
        "1",
        "-p",
        "8",
        "-n",
        "8",
        "--runs",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let r = &v["results"][0];
    assert!(r["pp8"]["tokens_per_s"]["median"].as_f64().expect("pp8") > 0.0);
    let sh = &r["tg8"]["decode_time_share"];
    let part = |k: &str| sh[k].as_f64().unwrap_or_else(|| panic!("{k} in {sh}"));
    let parts = ["matmul", "attention", "other_ops", "reads", "wit_and_guest"].map(part);
    assert!(parts.iter().all(|p| (0.0..=1.0).contains(p)), "{sh}");
    // The guest reads the logits row of every step.
    assert!(part("reads") > 0.0, "{sh}");
    assert!(
        part("matmul") > part("reads"),
        "on the CPU the products dominate: {sh}"
    );
    assert!(parts.iter().sum::<f64>() <= 1.0 + 1e-9, "{sh}");
}
