//! Tokenizer behaviour on small hand-made vocabularies (the real ones are in `tests/`).

use realm_gguf::{Array, GgufFile, GgufWriter, Value};

use crate::*;

fn metadata(w: &GgufWriter) -> realm_gguf::Metadata {
    GgufFile::read(w.to_bytes().as_slice())
        .expect("valid file")
        .metadata
}

fn strings(v: &[&str]) -> Value {
    Value::Array(Array::String(v.iter().map(|s| s.to_string()).collect()))
}

fn spm_vocab(tokens: &[&str], scores: Vec<f32>, types: Vec<i32>) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", Value::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strings(tokens))
        .kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .kv("tokenizer.ggml.add_space_prefix", Value::Bool(false))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(0));
    w
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let mut tokens = vec!["<s>", "▁", "a", "b", "ab", "▁ab", "<ctl>"];
    let mut types = vec![3, 1, 1, 1, 1, 1, 3];
    let mut scores = vec![0.0, -1.0, -2.0, -2.0, -0.5, -0.1, 0.0];
    let bytes: Vec<String> = (0..=255).map(|b| format!("<0x{b:02X}>")).collect();
    tokens.extend(bytes.iter().map(String::as_str));
    types.extend(std::iter::repeat_n(6, 256));
    scores.extend(std::iter::repeat_n(0.0, 256));
    let tok = Tokenizer::from_metadata(&metadata(&spm_vocab(&tokens, scores, types)))
        .expect("valid vocab");
    let ids = tok.encode(" ab é<ctl>", true, true).expect("encodes");
    // BOS, "▁ab", "▁", then é as two byte tokens (0xC3 0xA9), then the control token.
    assert_eq!(ids, vec![0, 5, 1, 7 + 0xC3, 7 + 0xA9, 6]);
    assert_eq!(tok.decode(&ids, false).expect("decodes"), " ab é");
    // Without parse_special the control token's text is ordinary characters.
    let plain = tok.encode("<ctl>", false, false).expect("encodes");
    assert!(!plain.contains(&6));
}

#[test]
fn malformed_vocabularies_are_errors() {
    let base = |tokens: &[&str], scores: Vec<f32>, types: Vec<i32>| {
        Tokenizer::from_metadata(&metadata(&spm_vocab(tokens, scores, types)))
    };
    assert!(matches!(
        base(&["a", "b"], vec![0.0], vec![1, 1]),
        Err(TokenizerError::LengthMismatch { .. })
    ));
    assert!(matches!(
        base(&["a", "<0xZZ>"], vec![0.0; 2], vec![1, 6]),
        Err(TokenizerError::BadByteToken { .. })
    ));
    assert!(matches!(
        base(&["a", "<0x-1>"], vec![0.0; 2], vec![1, 6]),
        Err(TokenizerError::BadByteToken { .. })
    ));
    assert!(matches!(
        base(&["a"], vec![0.0], vec![9]),
        Err(TokenizerError::BadTokenType { .. })
    ));
    let mut w = spm_vocab(&["a"], vec![0.0], vec![1]);
    w.kv("tokenizer.ggml.eos_token_id", Value::U32(7));
    assert!(matches!(
        Tokenizer::from_metadata(&metadata(&w)),
        Err(TokenizerError::SpecialIdOutOfRange { .. })
    ));
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", Value::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strings(&["a"]))
        .kv("tokenizer.ggml.scores", Value::Array(Array::I8(vec![1])));
    assert!(matches!(
        Tokenizer::from_metadata(&metadata(&w)),
        Err(TokenizerError::WrongArrayType { .. })
    ));
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", Value::String("wordpiece".into()));
    assert!(matches!(
        Tokenizer::from_metadata(&metadata(&w)),
        Err(TokenizerError::UnknownModel(_))
    ));
}

/// When a file leaves them out, special ids and BOS/EOS flags are llama.cpp's defaults for
/// its tokenizer model and pre-tokenizer.
#[test]
fn defaults_follow_llama_cpp() {
    let spm = Defaults::for_model("llama", None);
    assert_eq!((spm.bos, spm.eos, spm.unk), (Some(1), Some(2), Some(0)));
    assert!(spm.add_bos && spm.add_space_prefix && !spm.add_eos);
    for pre in ["llama-bpe", "llama3", "tekken", "chameleon"] {
        assert!(Defaults::for_model("gpt2", Some(pre)).add_bos, "{pre}");
    }
    for pre in [Some("smollm"), Some("qwen2"), Some("gpt-2"), None] {
        let d = Defaults::for_model("gpt2", pre);
        assert!(!d.add_bos && !d.add_space_prefix, "{pre:?}");
        assert_eq!((d.bos, d.eos), (Some(11), Some(11)));
    }
}
