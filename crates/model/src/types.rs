//! The inference API's values (the WIT `realm:inference/types`, as Rust types).

/// Why a request failed; mirrors the WIT `realm:inference/types.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No model of that name.
    NotFound(String),
    /// The file is not a model Realm can run (bad GGUF, missing tensors).
    InvalidModel(String),
    /// An architecture, tokenizer or quant type Realm does not support yet.
    Unsupported(String),
    /// Bad request: parameters out of range, an empty prompt.
    InvalidInput(String),
    /// The prompt (plus the tokens to generate) does not fit the context.
    ContextOverflow(String),
    /// The compute backend failed.
    Compute(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::InvalidModel(m) => write!(f, "invalid model: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::ContextOverflow(m) => write!(f, "context overflow: {m}"),
            Error::Compute(m) => write!(f, "compute error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<realm_compute::Error> for Error {
    fn from(e: realm_compute::Error) -> Self {
        use realm_compute::Error as E;
        match e {
            E::NotFound(m) => Error::NotFound(m),
            E::Unsupported(m) => Error::Unsupported(m),
            E::ResourceExhausted(m) => Error::ContextOverflow(m),
            other => Error::Compute(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Raw text (completion), or chat messages rendered with the model's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

/// Sampling and stopping. `temperature` 0 is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eog: bool,
}

impl Params {
    /// Sampling with no filters and no penalty (temperature 1, top-k off, top-p 1, min-p 0,
    /// repeat penalty 1), 256 new tokens: the base that OpenAI-style and benchmark
    /// parameters are built on (`Params { temperature, ..Params::neutral() }`).
    pub fn neutral() -> Self {
        Params {
            max_tokens: 256,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            stop: Vec::new(),
            ignore_eog: false,
        }
    }

    /// Greedy decoding of at most `max_tokens`.
    pub fn greedy(max_tokens: u32) -> Self {
        Params {
            temperature: 0.0,
            max_tokens,
            ..Params::neutral()
        }
    }
}

/// The defaults of the CLI and the API: llama.cpp's sampling (temperature 0.8, top-k 40,
/// top-p 0.95, min-p 0.05), 256 new tokens.
impl Default for Params {
    fn default() -> Self {
        Params {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            ..Params::neutral()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub tokenizer: String,
    pub chat_template: String,
    pub weight_bytes: u64,
}

/// One streamed piece: the text it completes (whole UTF-8 characters only) and the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    pub token: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Eog,
    /// A stop string, or a complete constrained match.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

/// A text's embedding: the mean of the model's final hidden states, unit length.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub values: Vec<f32>,
    /// Tokens the text was (BOS included).
    pub tokens: u32,
}

/// A token's log-probability under the model, with its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV cache the session held already (not computed again).
    pub cached_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_ns: u64,
    pub decode_ns: u64,
    pub constraint_ns: u64,
}
