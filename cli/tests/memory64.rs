//! Weights beyond 4 GiB behind the 32-bit guest, and a resident-memory budget that does not
//! change results.

mod common;

use std::process::Command;

use common::run_json;
use realm_gguf::{Array, GgmlType, GgufWriter, Value};

#[test]
fn budgets_give_the_same_greedy_ids() {
    let prompt = "Write a haiku about the sea.";
    let free = run_json(&["--temp", "0", "-n", "24", prompt]);
    let weights = free["weight_bytes"].as_u64().expect("weight bytes");
    for percent in [100u64, 50, 25] {
        let budget = (weights * percent / 100).to_string();
        let out = run_json(&["--temp", "0", "-n", "24", "--max-resident", &budget, prompt]);
        assert_eq!(out["ids"], free["ids"], "budget {percent}%");
        let w = &out["weights"];
        if percent < 100 {
            assert!(
                w["evictions"].as_u64().expect("evictions") > 0,
                "{percent}%: {w}"
            );
            assert!(
                w["prefetch_hits"].as_u64().expect("hits") > 0,
                "{percent}%: {w}"
            );
        }
        // The budget holds, but for one weight larger than it (the embeddings at 25 %).
        let largest = 28_704_768; // token_embd.weight, Q8_0 (576 × 49152)
        let peak = w["peak_resident_bytes"].as_u64().expect("peak");
        assert!(
            peak <= (weights * percent / 100).max(largest) + largest,
            "{percent}%: {w}"
        );
    }
}

/// GPT-2's byte-to-character map, so a 256-token vocabulary can encode any text.
fn byte_tokens() -> Vec<String> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            };
            c.to_string()
        })
        .collect()
}

/// Deterministic pseudo-random Q8_0 blocks (scale 1/64).
fn q8_0(rows: u64, cols: u64, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::new();
    for _ in 0..rows * cols / 32 {
        out.extend_from_slice(&half::f16::from_f32(1.0 / 64.0).to_le_bytes());
        for _ in 0..32 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push((s >> 56) as u8 % 64);
        }
    }
    out
}

#[test]
fn a_model_past_4_gib_runs_under_a_1_gib_budget() {
    let dir = std::env::temp_dir().join(format!("realm-memory64-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("large.gguf");
    let (e, ff, vocab, layers) = (64u64, 128u64, 256u64, 2u32);
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(layers))
        .kv("llama.context_length", Value::U32(256))
        .kv("llama.embedding_length", Value::U32(e as u32))
        .kv("llama.feed_forward_length", Value::U32(ff as u32))
        .kv("llama.attention.head_count", Value::U32(2))
        .kv("llama.attention.head_count_kv", Value::U32(1))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String("gpt2".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(byte_tokens())),
        )
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(Vec::new())),
        );
    // 4.5 GiB of zeros first, so every real weight sits past 2^32.
    w.zeros("padding.weight", GgmlType::Q8_0, &[32, (9u64 << 29) / 34]);
    let ones: Vec<u8> = (0..e).flat_map(|_| 1f32.to_le_bytes()).collect();
    w.tensor(
        "token_embd.weight",
        GgmlType::Q8_0,
        &[e, vocab],
        q8_0(vocab, e, 1),
    );
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let seed = u64::from(l) * 10;
        w.tensor(&p("attn_norm"), GgmlType::F32, &[e], ones.clone())
            .tensor(&p("attn_q"), GgmlType::Q8_0, &[e, e], q8_0(e, e, seed + 2))
            .tensor(
                &p("attn_k"),
                GgmlType::Q8_0,
                &[e, e / 2],
                q8_0(e / 2, e, seed + 3),
            )
            .tensor(
                &p("attn_v"),
                GgmlType::Q8_0,
                &[e, e / 2],
                q8_0(e / 2, e, seed + 4),
            )
            .tensor(
                &p("attn_output"),
                GgmlType::Q8_0,
                &[e, e],
                q8_0(e, e, seed + 5),
            )
            .tensor(&p("ffn_norm"), GgmlType::F32, &[e], ones.clone())
            .tensor(
                &p("ffn_gate"),
                GgmlType::Q8_0,
                &[e, ff],
                q8_0(ff, e, seed + 6),
            )
            .tensor(
                &p("ffn_up"),
                GgmlType::Q8_0,
                &[e, ff],
                q8_0(ff, e, seed + 7),
            )
            .tensor(
                &p("ffn_down"),
                GgmlType::Q8_0,
                &[ff, e],
                q8_0(e, ff, seed + 8),
            );
    }
    w.tensor("output_norm.weight", GgmlType::F32, &[e], ones);
    if let Err(err) = w.write_file(&path) {
        // Sparse files need almost no room; a disk without even that cannot run this test.
        let _ = std::fs::remove_dir_all(&dir);
        if err.raw_os_error() == Some(28) {
            eprintln!(
                "SKIPPED: no room for a sparse 4.5 GiB file in {}: {err}",
                dir.display()
            );
            return;
        }
        panic!("writing the test model: {err}");
    }
    assert!(std::fs::metadata(&path).expect("size").len() > 1 << 32);

    let model = path.to_str().expect("utf-8");
    let out = run_json(&[
        "--model",
        model,
        "--raw",
        "--temp",
        "0",
        "-n",
        "4",
        "--max-resident",
        "1G",
        "hello",
    ]);
    assert_eq!(out["ids"].as_array().expect("ids").len(), 4, "{out}");
    let again = run_json(&["--model", model, "--raw", "--temp", "0", "-n", "4", "hello"]);
    assert_eq!(out["ids"], again["ids"]);
    // Inspect reads offsets above 2^32 from the file too.
    let inspect = Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(["inspect", "--json", model])
        .output()
        .expect("inspect");
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("json");
    let embd = info["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .expect("embd");
    assert!(embd["offset"].as_u64().expect("offset") > 1 << 32, "{embd}");
    let _ = std::fs::remove_dir_all(&dir);
}
