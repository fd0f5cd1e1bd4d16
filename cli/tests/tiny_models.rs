//! Small random-weight models against llama.cpp: Llama 3's RoPE frequency factors
//! (`rope_freqs.weight`), linear and YaRN RoPE scaling, the BOS default of the Llama 3
//! vocabulary, and the files Realm must refuse rather than run wrong.
//!
//! The models are written by `tests/models/make.py` (gguf-py, a vocabulary from llama.cpp's
//! tokenizer suite, llama.cpp's `llama-quantize`) and pinned by `tests/models/sha256sums`;
//! the references in `tests/reference/tiny-models/` are llama.cpp's greedy runs of them
//! (`tests/models/references.sh`). `make test-models` (part of `make test`) makes them.

mod common;

use std::path::PathBuf;

use common::{Parity, floats, greedy_parity, ids, ok, realm_output, root, run_json};

fn model(name: &str) -> String {
    let p: PathBuf = root()
        .join("target/test-models")
        .join(format!("{name}.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run `make test-models`",
        p.display()
    );
    p.display().to_string()
}

fn references(name: &str) -> Vec<serde_json::Value> {
    let path = root()
        .join("tests/reference/tiny-models")
        .join(format!("{name}.jsonl"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("reference json"))
        .collect()
}

/// Realm's greedy ids and top-2 margins on `model_name` for one reference prompt.
fn realm_greedy(model_name: &str, case: &serde_json::Value) -> (Vec<u64>, Vec<f64>, u64) {
    let m = model(model_name);
    let prompt = case["prompt"].as_str().expect("prompt");
    let out = run_json(&["--model", &m, "--raw", "--temp", "0", "-n", "32", prompt]);
    (
        ids(&out["ids"]),
        floats(&out["margins"]),
        out["prompt_tokens"].as_u64().expect("prompt_tokens"),
    )
}

/// Every prompt of `reference` run on `model_name`: (prompt id, parity).
fn parity(model_name: &str, reference: &str) -> Vec<(String, Parity, Vec<u64>, Vec<u64>)> {
    references(reference)
        .iter()
        .map(|case| {
            let (got, margins, prompt_tokens) = realm_greedy(model_name, case);
            let want = ids(&case["output_ids"]);
            let prompt_ids = ids(&case["prompt_ids"]);
            assert_eq!(
                prompt_tokens,
                prompt_ids.len() as u64,
                "prompt length differs from llama.cpp's {prompt_ids:?}"
            );
            let p = greedy_parity(&want, &floats(&case["top2_gaps"]), &got, &margins);
            (case["id"].as_str().expect("id").to_string(), p, want, got)
        })
        .collect()
}

/// Greedy ids equal llama.cpp's up to each prompt's first near-tie.
fn check_matches(name: &str) {
    let results = parity(name, name);
    let mut failures = Vec::new();
    for (id, p, want, got) in &results {
        println!(
            "{name} {id}: first divergence {:?}, first near-tie {:?}, largest top-2 gap difference {:.4}",
            p.divergence, p.near_tie, p.max_gap_diff
        );
        if !p.ok {
            failures.push(format!("{id}: llama.cpp {want:?}\n  realm     {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn llama3_rope_freqs_f32_matches_llama_cpp() {
    check_matches("llama3-tiny.f32");
}

#[test]
fn llama3_rope_freqs_q8_0_matches_llama_cpp() {
    check_matches("llama3-tiny.q8_0");
}

/// Qwen 3 (per-head q/k norms, NeoX RoPE) through the component, as llama-quantize's Q4_0.
#[test]
fn qwen3_q4_0_matches_llama_cpp() {
    check_matches("qwen3-tiny.q4_0");
}

/// Qwen 2 (q/k/v biases) through the component, as llama-quantize's Q8_0.
#[test]
fn qwen2_q8_0_matches_llama_cpp() {
    check_matches("qwen2-tiny.q8_0");
}

/// Phi-3 (fused q/k/v and gate-up, read as row ranges) through the component, Q4_0.
#[test]
fn phi3_q4_0_matches_llama_cpp() {
    check_matches("phi3-tiny.q4_0");
}

/// SmolLM3 (NoPE every fourth block) through the component, Q8_0.
#[test]
fn smollm3_q8_0_matches_llama_cpp() {
    check_matches("smollm3-tiny.q8_0");
}

/// Gemma 2 (attention and final logit soft-capping, sliding window on even layers)
/// through the component, Q8_0.
#[test]
fn gemma2_q8_0_matches_llama_cpp() {
    check_matches("gemma2-tiny.q8_0");
}

/// Phi-3 with LongRoPE's long factors (a context larger than the file's original one)
/// through the component, Q8_0.
#[test]
fn phi3_longrope_q8_0_matches_llama_cpp() {
    check_matches("phi3-tiny-longrope-long.q8_0");
}

/// Mistral 3 (attention temperature, YaRN's log multiplier) through the component, Q8_0.
#[test]
fn mistral3_q8_0_matches_llama_cpp() {
    check_matches("mistral3-tiny.q8_0");
}

/// The same in Q4_K_M (Q4_K and Q6_K: prompts in ggml's tiled K-quant order, the last
/// block's feed-forward on the last row only, as llama.cpp).
#[test]
fn mistral3_q4_k_m_matches_llama_cpp() {
    check_matches("mistral3-tiny.q4_k_m");
}

#[test]
fn linear_rope_scaling_matches_llama_cpp() {
    check_matches("llama-tiny-linear.f32");
}

#[test]
fn yarn_rope_scaling_matches_llama_cpp() {
    check_matches("llama-tiny-yarn.f32");
}

/// The same weights without `rope_freqs.weight`: Realm matches llama.cpp on that file too,
/// and its ids differ from the ones the file with the tensor gives before any near-tie —
/// so the tests above would fail if Realm ignored the tensor.
#[test]
fn without_rope_freqs_the_ids_differ() {
    check_matches("llama3-tiny-no-rope-freqs.f32");
    let against_freqs = parity("llama3-tiny-no-rope-freqs.f32", "llama3-tiny.f32");
    let differing: Vec<&str> = against_freqs
        .iter()
        .filter(|(_, p, _, _)| !p.ok)
        .map(|(id, ..)| id.as_str())
        .collect();
    assert!(
        !differing.is_empty(),
        "ignoring rope_freqs gave llama.cpp's Llama 3 ids on every prompt"
    );
    println!("prompts whose ids change without rope_freqs: {differing:?}");
}

/// The Llama 3 vocabulary (pre-tokenizer `llama-bpe`) with no `add_bos_token` key: BOS is
/// added, as llama.cpp does, and every prompt tokenizes to llama.cpp's ids.
#[test]
fn llama3_vocabulary_adds_bos_by_default() {
    let m = model("llama3-tiny.f32");
    for case in references("llama3-tiny.f32") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let out = ok(realm_output(&["tokenize", "--model", &m, prompt]));
        let got: serde_json::Value = serde_json::from_str(out.trim()).expect("json ids");
        assert_eq!(ids(&got), ids(&case["prompt_ids"]), "{prompt:?}");
        assert_eq!(ids(&got)[0], 128000, "BOS first");
    }
}

/// Files whose math Realm does not implement are refused with the reason, not run wrong.
#[test]
fn unimplemented_tensors_and_scalings_are_refused() {
    for (name, says) in [
        ("llama-tiny-q-bias.f32", "blk.0.attn_q.bias"),
        ("llama-tiny-longrope.f32", "longrope"),
    ] {
        let m = model(name);
        let out = realm_output(&["run", "--model", &m, "--raw", "-n", "4", "Hello"]);
        let err = common::text(&out.stderr);
        assert!(!out.status.success(), "{name} ran");
        assert!(err.contains(says), "{name}: {err}");
    }
}
