//! The architectures run natively on the CPU backend (no WebAssembly, no WIT): greedy ids
//! against llama.cpp's on the real models and the tiny RoPE models, embeddings, and the
//! files they must refuse. The component runs this same code over `realm:compute`; the
//! host's tests check that both give the same bits.
//!
//! Needs `make models` and `make test-models` (`make test` runs both first).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use realm_compute::ModelBytes;
use realm_kernels::cpu::CpuBackend;
use realm_kernels::pool::SpinPool;
use realm_model::{Error, LoadedModel, Message, Params, Prompt};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `path` loaded on a two-share CPU backend.
fn load(path: &Path) -> Result<LoadedModel<CpuBackend>, Error> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (`make models` and `make test-models` make the models)",
            path.display()
        )
    });
    let spin = Arc::new(SpinPool::new(2).expect("spin pool"));
    let backend = CpuBackend::new(spin, 1 << 32);
    LoadedModel::load("test", backend, ModelBytes::new(Arc::new(bytes)))
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("reference json"))
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    let a = v.as_array().expect("array");
    a.iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn gaps(v: &serde_json::Value) -> Vec<f64> {
    let a = v.as_array().expect("array");
    a.iter().map(|x| x.as_f64().expect("gap")).collect()
}

/// Greedy ids and top-2 margins for `prompt`.
fn greedy(m: &LoadedModel<CpuBackend>, prompt: Prompt, n: u32) -> (Vec<u32>, Vec<f32>) {
    let session = m.session(0).expect("session");
    let g = session
        .generate(prompt, Params::greedy(n))
        .expect("generation");
    while g.next().expect("next").is_some() {}
    (g.tokens(), g.margins())
}

/// The prompt of a reference case: chat `messages`, or a raw `prompt`.
fn prompt_of(case: &serde_json::Value) -> Prompt {
    match case["messages"].as_array() {
        Some(ms) => Prompt::Messages(
            ms.iter()
                .map(|m| Message {
                    role: m["role"].as_str().expect("role").into(),
                    content: m["content"].as_str().expect("content").into(),
                })
                .collect(),
        ),
        None => Prompt::Text(case["prompt"].as_str().expect("prompt").into()),
    }
}

/// Every case of `cases` gives llama.cpp's ids up to its first near-tie (a top-2 logit gap
/// below 0.02 in llama.cpp's run, where a float difference may rightly pick the other
/// token; see `tests/reference/README.md`).
fn check_parity(model: &Path, cases: &[serde_json::Value], default_n: u32) {
    let m = load(model).expect("loads");
    let mut failures = Vec::new();
    let mut worst_gap = 0f32;
    for case in cases {
        let n = case["max_new_tokens"]
            .as_u64()
            .map_or(default_n, |n| n as u32);
        let (got, margins) = greedy(&m, prompt_of(case), n);
        let want = ids(&case["output_ids"]);
        let their_gaps = gaps(&case["top2_gaps"]);
        let near_tie = their_gaps.iter().position(|&g| g < 0.02);
        let upto = near_tie.unwrap_or(want.len().max(got.len()));
        // How far Realm's top-2 gaps are from llama.cpp's, up to the first near-tie.
        worst_gap = their_gaps
            .iter()
            .zip(&margins)
            .take(upto)
            .fold(worst_gap, |m, (a, b)| m.max((*a as f32 - b).abs()));
        let (w, g) = (&want[..upto.min(want.len())], &got[..upto.min(got.len())]);
        if w != g {
            failures.push(format!(
                "{}: llama.cpp {want:?}\n  realm     {got:?} (near-tie at {near_tie:?})",
                case["id"]
            ));
        }
    }
    println!(
        "{}: {} prompts, largest top-2 gap difference from llama.cpp {worst_gap}",
        model.display(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_smollm2_greedy_ids_match_llama_cpp() {
    let dir = root().join("tests/reference/smollm2-135m-q4_1");
    check_parity(
        &root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &jsonl(&dir.join("greedy.jsonl")),
        32,
    );
}

#[test]
fn gemma3_greedy_ids_match_llama_cpp() {
    let dir = root().join("tests/reference/gemma-3-270m-q4_k_m");
    check_parity(
        &root().join("models/gemma-3-270m-q4_k_m.gguf"),
        &jsonl(&dir.join("greedy.jsonl")),
        32,
    );
}

/// Llama 3's RoPE frequency factors, linear and YaRN scaling, on random-weight models.
#[test]
fn llama_rope_variants_match_llama_cpp() {
    for name in [
        "llama3-tiny.f32",
        "llama3-tiny.q8_0",
        "llama3-tiny.q4_0",
        "llama3-wide.q4_k_m",
        "llama3-tiny-no-rope-freqs.f32",
        "llama-tiny-linear.f32",
        "llama-tiny-yarn.f32",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Qwen 3 (per-head q/k RMS norms, NeoX RoPE, tied output) on a random-weight model over
/// the Qwen 2 vocabulary, in F32 and as llama-quantize makes it in Q8_0 and Q4_0.
#[test]
fn qwen3_greedy_ids_match_llama_cpp() {
    for name in [
        "qwen3-tiny.f32",
        "qwen3-tiny.q8_0",
        "qwen3-tiny.q4_0",
        "qwen3-wide.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Qwen 2 (biases on q, k and v, NeoX RoPE, tied output) on a random-weight model, F32,
/// Q8_0 and Q4_0.
#[test]
fn qwen2_greedy_ids_match_llama_cpp() {
    for name in [
        "qwen2-tiny.f32",
        "qwen2-tiny.q8_0",
        "qwen2-tiny.q4_0",
        "qwen2-wide.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Phi-3 (q/k/v fused in attn_qkv, gate and up in ffn_up, NeoX RoPE, q scaled before
/// attention) on a random-weight model, F32, Q8_0 and Q4_0.
#[test]
fn phi3_greedy_ids_match_llama_cpp() {
    for name in [
        "phi3-tiny.f32",
        "phi3-tiny.q8_0",
        "phi3-tiny.q4_0",
        "phi3-wide.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Phi-3 with LongRoPE (Phi-3.5 / the 128k models): the same weights with long and short
/// per-pair factors and the converter's magnitude scale. llama.cpp's reference runs with a
/// 1024-position context, these sessions with the model's 2048: the file whose original
/// context is 64 must rotate by the long factors, the one with 4096 by the short ones (the
/// two references differ, so taking the wrong set, or none, fails).
#[test]
fn phi3_longrope_greedy_ids_match_llama_cpp() {
    for name in [
        "phi3-tiny-longrope-long.f32",
        "phi3-tiny-longrope-long.q8_0",
        "phi3-tiny-longrope-short.f32",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// SmolLM3 (no RoPE on every fourth block) on a random-weight model of four blocks, F32
/// and Q8_0.
#[test]
fn smollm3_greedy_ids_match_llama_cpp() {
    for name in [
        "smollm3-tiny.f32",
        "smollm3-tiny.q8_0",
        "smollm3-tiny.q4_0",
        "smollm3-wide.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Gemma 2 (attention and final logit soft-capping, an 8-position window on the even
/// layers, post-norms) on a random-weight model of four blocks, F32 and Q8_0.
#[test]
fn gemma2_greedy_ids_match_llama_cpp() {
    for name in [
        "gemma2-tiny.f32",
        "gemma2-tiny.q8_0",
        "gemma2-tiny.q4_0",
        "gemma2-wide.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Mistral 3 (Llama 4's attention temperature stepping every 8 positions, YaRN with the
/// file's β and log multiplier) on a random-weight 256-wide model in F32, Q8_0 and Q4_K_M
/// (Q4_K and Q6_K blocks); prompts of 6 to 773 tokens cross the temperature's steps inside
/// a prompt and while decoding.
#[test]
fn mistral3_greedy_ids_match_llama_cpp() {
    for name in [
        "mistral3-tiny.f32",
        "mistral3-tiny.q8_0",
        "mistral3-tiny.q4_0",
        "mistral3-tiny.q4_k_m",
    ] {
        let model = root().join(format!("target/test-models/{name}.gguf"));
        let refs = root().join(format!("tests/reference/tiny-models/{name}.jsonl"));
        check_parity(&model, &jsonl(&refs), 32);
    }
}

/// Files whose tensors or RoPE the llama blocks do not implement are refused, not run
/// wrong: a bias on q (Qwen-style) and Phi-3's `longrope`.
#[test]
fn llama_refuses_what_it_does_not_implement() {
    for (name, why) in [
        ("llama-tiny-q-bias", "attn_q.bias"),
        ("llama-tiny-longrope", "longrope"),
    ] {
        let path = root().join(format!("target/test-models/{name}.f32.gguf"));
        match load(&path) {
            Err(Error::Unsupported(m)) => assert!(m.contains(why), "{name}: {m}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name} loaded"),
        }
    }
}

/// Embeddings: unit length, the same text gives the same vector, and related texts are
/// closer than unrelated ones.
#[test]
fn embeddings_are_pooled_and_normalized() {
    let m = load(&root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).expect("loads");
    let e = |t: &str| m.embed(t).expect("embeds");
    let (a, a2) = (e("The cat sat on the mat."), e("The cat sat on the mat."));
    let (b, c) = (
        e("A cat was sitting on a rug."),
        e("Quarterly tax filing deadlines."),
    );
    let norm: f32 = a.values.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_eq!(a.values, a2.values);
    assert_eq!(a.values.len(), 576);
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    assert!(
        dot(&a.values, &b.values) > dot(&a.values, &c.values),
        "related {} vs unrelated {}",
        dot(&a.values, &b.values),
        dot(&a.values, &c.values)
    );
}

/// A prompt split across two forward passes (prefix reuse) gives the same next tokens as
/// one pass: the KV cache continues where it stopped.
#[test]
fn the_cache_continues_across_calls() {
    let m = load(&root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).expect("loads");
    let msgs = |extra: &[&str]| {
        let mut v = vec![Message {
            role: "user".into(),
            content: "Name three colors.".into(),
        }];
        for (i, t) in extra.iter().enumerate() {
            v.push(Message {
                role: if i % 2 == 0 { "assistant" } else { "user" }.into(),
                content: (*t).into(),
            });
        }
        Prompt::Messages(v)
    };
    let full = msgs(&["Red, green and blue.", "Now three animals."]);
    let (fresh, _) = greedy(&m, full.clone(), 12);
    let session = m.session(0).expect("session");
    let first = session
        .generate(msgs(&[]), Params::greedy(4))
        .expect("first turn");
    while first.next().expect("next").is_some() {}
    let before = session.n_past();
    let second = session.generate(full, Params::greedy(12)).expect("second");
    while second.next().expect("next").is_some() {}
    assert!(before > 0);
    assert_eq!(second.tokens(), fresh);
}

/// The run-time-chosen backend (`Erased`, what the host provider uses) is the CPU backend
/// behind a box: the same ids and the same margins, bit for bit.
#[test]
fn the_erased_backend_gives_the_same_bits() {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&path).expect("model");
    let spin = Arc::new(SpinPool::new(2).expect("spin pool"));
    let erased = realm_compute::Erased::new(CpuBackend::new(spin, 1 << 32));
    let boxed = LoadedModel::load("test", erased, ModelBytes::new(Arc::new(bytes))).expect("loads");
    let direct = load(&path).expect("loads");
    let prompt = || Prompt::Text("The three primary colors are".into());
    let session = boxed.session(0).expect("session");
    let g = session
        .generate(prompt(), Params::greedy(16))
        .expect("generation");
    while g.next().expect("next").is_some() {}
    let (ids, margins) = greedy(&direct, prompt(), 16);
    assert_eq!(g.tokens(), ids);
    let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&g.margins()), bits(&margins));
}
