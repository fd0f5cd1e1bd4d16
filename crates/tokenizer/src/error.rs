//! The tokenizer crate's error type: messages carry the offending key, id or text.

use realm_gguf::GgufError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error("tokenizer.ggml.model '{0}' is not supported (known: gpt2, llama, bert, gemma4)")]
    UnknownModel(String),
    #[error("tokenizer.ggml.pre '{name}' is not supported (known: {known})")]
    UnknownPretokenizer { name: String, known: String },
    #[error("{key} is an array of {found}, expected {expected}")]
    WrongArrayType {
        key: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("the vocabulary has {n_vocab} tokens, more than the limit of {limit}")]
    VocabTooLarge { n_vocab: usize, limit: usize },
    #[error("{key} has {len} entries but tokenizer.ggml.tokens has {n_vocab}")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        n_vocab: usize,
    },
    #[error("{key} is {id}, outside the vocabulary of {n_vocab} tokens")]
    SpecialIdOutOfRange {
        key: String,
        id: u64,
        n_vocab: usize,
    },
    #[error("token {id} is typed as a byte token but its text {text:?} is not <0xHH>")]
    BadByteToken { id: u32, text: String },
    #[error("token {id} has type {ty}, which is not a llama.cpp token type (0..=6)")]
    BadTokenType { id: u32, ty: i32 },
    #[error("merge #{index} {text:?} is not two tokens separated by a space")]
    BadMerge { index: usize, text: String },
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    UnknownId { id: u32, n_vocab: usize },
    #[error("pre-tokenizer regex failed: {0}")]
    Regex(String),
    #[error("chat template: {0}")]
    Template(String),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
