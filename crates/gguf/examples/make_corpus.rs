//! Writes the committed corpus of malformed GGUF files (`tests/data/malformed/`), one per
//! hostile input of the team's BAD-INPUTS list, plus `valid-tiny.gguf`, a small well-formed
//! llama model that the corpus test also truncates at every byte.
//!
//! `cargo run -p realm-gguf --example make_corpus -- crates/gguf/tests/data/malformed`

use std::path::PathBuf;

use realm_gguf::{Array, GgmlType, GgufWriter, Value};

/// Raw little-endian builder for headers no writer would produce.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).bytes(s)
    }
    /// A tensor info record.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        self.0.resize(self.0.len().next_multiple_of(align), 0);
        self
    }
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn strings(v: &[&str]) -> Value {
    Value::Array(Array::String(v.iter().map(|x| x.to_string()).collect()))
}

const N_EMBD: u64 = 8;
const N_VOCAB: u64 = 6;

/// A complete one-block llama model with a byte-level BPE vocabulary; `edit` may change
/// or add metadata before the tensors are written.
fn model(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> Vec<u8> {
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("realm corpus tiny")),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.embedding_length".into(), Value::U32(N_EMBD as u32)),
        ("llama.feed_forward_length".into(), Value::U32(16)),
        ("llama.attention.head_count".into(), Value::U32(2)),
        ("llama.attention.head_count_kv".into(), Value::U32(1)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            strings(&["<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ"]),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(vec![3, 3, 1, 1, 1, 1])),
        ),
        ("tokenizer.ggml.merges".into(), strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"),
        ),
    ];
    edit(&mut kv);
    let mut w = GgufWriter::new();
    for (k, v) in kv {
        w.kv(&k, v);
    }
    let f32s = |n: u64| {
        (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    w.tensor(
        "token_embd.weight",
        GgmlType::F32,
        &[N_EMBD, N_VOCAB],
        f32s(N_EMBD * N_VOCAB),
    )
    .tensor(
        "blk.0.attn_norm.weight",
        GgmlType::F32,
        &[N_EMBD],
        f32s(N_EMBD),
    )
    .tensor(
        "blk.0.ffn_down.weight",
        GgmlType::Q8_0,
        &[32, 2],
        vec![0u8; 68],
    )
    .tensor("output_norm.weight", GgmlType::F32, &[N_EMBD], f32s(N_EMBD));
    w.to_bytes()
}

fn set(kv: &mut [(String, Value)], key: &str, v: Value) {
    for (k, old) in kv.iter_mut() {
        if k == key {
            *old = v;
            return;
        }
    }
    panic!("no key {key}");
}

/// A file of metadata only, through the writer.
fn kv_only(entries: &[(&str, Value)]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in entries {
        w.kv(k, v.clone());
    }
    w.to_bytes()
}

/// A tensor-only file: one raw tensor info, then `data` bytes of data section.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(name, dims, ty, offset).pad_to(32);
    r.0.resize(r.0.len() + data, 0);
    r.0
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "crates/gguf/tests/data/malformed".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let valid = model(|_| {});
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| files.push((name, bytes));

    // 1. Header.
    add("01-empty", Vec::new());
    add("01-bad-magic", [b"GGML".as_slice(), &valid[4..]].concat());
    add("01-version-1", Raw::header(1, 0, 0).0);
    add("01-future-version", Raw::header(4, 0, 0).0);
    add("01-big-endian", {
        let mut v = valid.clone();
        v[4..8].copy_from_slice(&3u32.to_be_bytes());
        v
    });
    add("01-magic-only", b"GGUF".to_vec());

    // 2. Counts.
    add("02-n-tensors-past-eof", Raw::header(3, 1000, 0).0);
    add("02-n-tensors-2pow32", Raw::header(3, 1 << 32, 0).0);
    add("02-n-tensors-2pow63", Raw::header(3, 1 << 63, 0).0);
    add("02-n-tensors-max", Raw::header(3, u64::MAX, 0).0);
    add("02-n-kv-max", Raw::header(3, 0, u64::MAX).0);
    add("02-n-tensors-wraps", Raw::header(3, 1 << 60, 0).0);
    add("02-array-len-max", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9).u32(4).u64(u64::MAX);
        r.0
    });
    add("02-array-len-2pow32", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9).u32(8).u64(1 << 32);
        r.0
    });

    // 3. Strings.
    add("03-string-past-eof", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(8).u64(1000).bytes(b"short");
        r.0
    });
    add("03-string-over-cap", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(8).u64((16 << 20) + 1).bytes(b"x");
        r.0
    });
    add("03-string-len-max", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(8).u64(u64::MAX);
        r.0
    });
    add("03-key-invalid-utf8", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k\xff\xfe").u32(0).bytes(&[1]);
        r.0
    });
    add("03-token-invalid-utf8", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(2)
            .str(b"ok")
            .str(b"\xc3\x28");
        r.0
    });
    add(
        "03-tensor-name-64-bytes",
        one_tensor(&"t".repeat(64), &[1], 0, 0, 4),
    );
    add(
        "03-duplicate-key",
        kv_only(&[("general.name", s("a")), ("general.name", s("b"))]),
    );
    add("03-duplicate-tensor", {
        let mut r = Raw::header(3, 2, 0);
        r.tensor("w", &[1], 0, 0)
            .tensor("w", &[1], 0, 32)
            .pad_to(32);
        r.0.resize(r.0.len() + 64, 0);
        r.0
    });

    // 4. Values.
    add("04-unknown-value-type", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(0x7fff_ffff).u64(0);
        r.0
    });
    add("04-unknown-array-element-type", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9).u32(13).u64(1);
        r.0
    });
    add("04-array-depth-bomb", {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9);
        for _ in 0..10_000 {
            r.u32(9).u64(1);
        }
        r.u32(0).u64(0);
        r.0
    });
    add(
        "04-int8-scores",
        model(|kv| {
            kv.push((
                "tokenizer.ggml.scores".into(),
                Value::Array(Array::I8(vec![0; N_VOCAB as usize])),
            ))
        }),
    );
    add(
        "04-string-where-int-expected",
        model(|kv| set(kv, "llama.block_count", s("30"))),
    );
    add(
        "04-token-type-as-f32",
        model(|kv| {
            set(
                kv,
                "tokenizer.ggml.token_type",
                Value::Array(Array::F32(vec![1.0; N_VOCAB as usize])),
            )
        }),
    );

    // 5. Alignment.
    add(
        "05-alignment-0",
        kv_only(&[("general.alignment", Value::U32(0))]),
    );
    add(
        "05-alignment-13",
        kv_only(&[("general.alignment", Value::U32(13))]),
    );
    add(
        "05-alignment-2pow31",
        kv_only(&[("general.alignment", Value::U32(1 << 31))]),
    );
    add(
        "05-alignment-u64",
        kv_only(&[("general.alignment", Value::U64(32))]),
    );
    add(
        "05-alignment-string",
        kv_only(&[("general.alignment", s("32"))]),
    );

    // 6. Tensor dimensions.
    add("06-n-dims-0", one_tensor("w", &[], 0, 0, 32));
    add("06-n-dims-5", one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 32));
    add("06-dim-0", one_tensor("w", &[4, 0], 0, 0, 32));
    add("06-dim-minus-1", one_tensor("w", &[u64::MAX], 0, 0, 32));
    add(
        "06-dims-overflow-u64",
        one_tensor("w", &[1 << 32, 1 << 32, 1 << 2], 0, 0, 32),
    );
    add(
        "06-dims-overflow-u32",
        one_tensor("w", &[1 << 16, 1 << 17], 0, 0, 32),
    );
    add(
        "06-not-block-multiple",
        one_tensor("w", &[33], GgmlType::Q4_0 as u32, 0, 64),
    );
    add(
        "06-exabytes",
        one_tensor("w", &[1 << 40, 1 << 20], 0, 0, 32),
    );
    add(
        "06-padded-size-wraps",
        one_tensor("w", &[32], GgmlType::Q8_0 as u32, u64::MAX - 31, 64),
    );

    // 7. Tensor type and placement.
    add("07-type-out-of-range", one_tensor("w", &[32], 1000, 0, 64));
    add("07-type-removed-q4_2", one_tensor("w", &[32], 4, 0, 64));
    add(
        "07-type-unsupported-iq2_xxs",
        one_tensor(
            "blk.0.ffn_up.weight",
            &[256],
            GgmlType::IQ2_XXS as u32,
            0,
            96,
        ),
    );
    add("07-offset-unaligned", one_tensor("w", &[1], 0, 3, 32));
    add("07-offset-past-eof", one_tensor("w", &[8], 0, 4096, 32));
    add(
        "07-offset-past-2pow63",
        one_tensor("w", &[8], 0, 1 << 63, 32),
    );
    add("07-overlap", {
        let mut r = Raw::header(3, 2, 0);
        r.tensor("a", &[16], 0, 0)
            .tensor("b", &[16], 0, 32)
            .pad_to(32);
        r.0.resize(r.0.len() + 96, 0);
        r.0
    });
    add("07-data-one-byte-short", valid[..valid.len() - 1].to_vec());

    // 8. Hyper-parameters and vocabulary.
    add(
        "08-block-count-huge",
        model(|kv| set(kv, "llama.block_count", Value::U32(u32::MAX))),
    );
    add(
        "08-block-count-without-tensors",
        model(|kv| set(kv, "llama.block_count", Value::U32(30))),
    );
    add(
        "08-head-count-0",
        model(|kv| set(kv, "llama.attention.head_count", Value::U32(0))),
    );
    add(
        "08-head-count-not-dividing",
        model(|kv| set(kv, "llama.attention.head_count", Value::U32(3))),
    );
    add(
        "08-head-count-kv-not-dividing",
        model(|kv| set(kv, "llama.attention.head_count_kv", Value::U32(3))),
    );
    add(
        "08-context-length-huge",
        model(|kv| set(kv, "llama.context_length", Value::U64(1 << 40))),
    );
    add(
        "08-vocab-length-mismatch",
        model(|kv| {
            set(
                kv,
                "tokenizer.ggml.token_type",
                Value::Array(Array::I32(vec![1; 5])),
            )
        }),
    );
    add(
        "08-special-id-past-vocab",
        model(|kv| {
            set(
                kv,
                "tokenizer.ggml.eos_token_id",
                Value::U32(N_VOCAB as u32),
            )
        }),
    );
    add(
        "08-byte-token-minus-1",
        model(|kv| {
            set(
                kv,
                "tokenizer.ggml.tokens",
                strings(&["<|im_start|>", "<|im_end|>", "a", "b", "ab", "<0x-1>"]),
            );
            set(
                kv,
                "tokenizer.ggml.token_type",
                Value::Array(Array::I32(vec![3, 3, 1, 1, 1, 6])),
            );
        }),
    );
    add(
        "08-byte-token-zz",
        model(|kv| {
            set(
                kv,
                "tokenizer.ggml.tokens",
                strings(&["<|im_start|>", "<|im_end|>", "a", "b", "ab", "<0xZZ>"]),
            );
            set(
                kv,
                "tokenizer.ggml.token_type",
                Value::Array(Array::I32(vec![3, 3, 1, 1, 1, 6])),
            );
        }),
    );
    add(
        "08-chat-template-loops",
        model(|kv| {
            set(
                kv,
                "tokenizer.chat_template",
                s(
                    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
                ),
            )
        }),
    );
    add(
        "08-chat-template-recursive-macro",
        model(|kv| {
            set(
                kv,
                "tokenizer.chat_template",
                s("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
            )
        }),
    );
    add(
        "08-chat-template-syntax-error",
        model(|kv| set(kv, "tokenizer.chat_template", s("{% for m in messages %}"))),
    );
    add(
        "08-merge-without-space",
        model(|kv| set(kv, "tokenizer.ggml.merges", strings(&["ab"]))),
    );
    add(
        "08-unknown-tokenizer-model",
        model(|kv| set(kv, "tokenizer.ggml.model", s("wordpiece"))),
    );

    for (name, bytes) in &files {
        std::fs::write(dir.join(format!("{name}.gguf")), bytes)?;
    }
    std::fs::write(dir.join("valid-tiny.gguf"), &valid)?;
    eprintln!(
        "wrote {} malformed files and valid-tiny.gguf ({} bytes) to {}",
        files.len(),
        valid.len(),
        dir.display()
    );
    Ok(())
}
