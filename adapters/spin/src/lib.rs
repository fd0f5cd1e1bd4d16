//! Spin's LLM interface (`fermyon:spin/llm@2.0.0`) on top of `realm:inference`.
//!
//! Composed with the Realm component, this gives any component that imports Spin's
//! `llm` (a Spin app, or an app composed by hand) Realm's models: `infer` completes the
//! prompt as plain text, as Spin's own engine does, and `generate-embeddings` returns
//! Realm's mean-pooled, unit-length embeddings. A model is loaded once per instance, on
//! first use, under the name the app passes (the host maps names to GGUF files).

wit_bindgen::generate!({
    path: "wit",
    world: "adapter",
    generate_all,
});

use std::cell::RefCell;

use exports::fermyon::spin::llm::{
    EmbeddingsResult, EmbeddingsUsage, Error, Guest, InferencingParams, InferencingResult,
    InferencingUsage,
};
use realm::inference::runtime::Model;
use realm::inference::types::{Error as RealmError, Params, Prompt};

/// Spin's defaults when `infer` gets no parameters.
pub const SPIN_DEFAULTS: InferencingParams = InferencingParams {
    max_tokens: 100,
    repeat_penalty: 1.1,
    repeat_penalty_last_n_token_count: 64,
    temperature: 0.8,
    top_k: 40,
    top_p: 0.9,
};

/// Spin's parameters as Realm's (min-p off and no stop strings: Spin has neither).
pub fn params(p: &InferencingParams) -> Params {
    Params {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: 0.0,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_penalty_last_n_token_count,
        seed: 0,
        stop: Vec::new(),
        ignore_eog: false,
    }
}

/// Realm's errors in Spin's terms: an unknown model is `model-not-supported`, a bad
/// request `invalid-input`, everything else a `runtime-error` with Realm's message.
pub fn spin_error(e: RealmError) -> Error {
    match e {
        RealmError::NotFound(_) => Error::ModelNotSupported,
        RealmError::InvalidInput(m) | RealmError::ContextOverflow(m) => Error::InvalidInput(m),
        RealmError::InvalidModel(m) | RealmError::Unsupported(m) | RealmError::Compute(m) => {
            Error::RuntimeError(m)
        }
    }
}

thread_local! {
    /// Models loaded by this instance, by name.
    static MODELS: RefCell<Vec<(String, Model)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the model called `name`, loading it the first time.
fn with_model<R>(name: &str, f: impl FnOnce(&Model) -> Result<R, Error>) -> Result<R, Error> {
    MODELS.with_borrow_mut(|models| {
        if !models.iter().any(|(n, _)| n == name) {
            let m = Model::load(name).map_err(spin_error)?;
            models.push((name.to_string(), m));
        }
        let (_, m) = models
            .iter()
            .find(|(n, _)| n == name)
            .ok_or(Error::ModelNotSupported)?;
        f(m)
    })
}

struct Adapter;

impl Guest for Adapter {
    fn infer(
        model: String,
        prompt: String,
        params: Option<InferencingParams>,
    ) -> Result<InferencingResult, Error> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let p = params.unwrap_or(SPIN_DEFAULTS);
        with_model(&model, |m| {
            let session = m.session(0).map_err(spin_error)?;
            let generation = session
                .generate(&Prompt::Text(prompt), &self::params(&p))
                .map_err(spin_error)?;
            let mut text = String::new();
            while let Some(chunk) = generation.next().map_err(spin_error)? {
                text.push_str(&chunk.text);
            }
            let usage = generation.usage();
            Ok(InferencingResult {
                text,
                usage: InferencingUsage {
                    prompt_token_count: usage.prompt_tokens,
                    generated_token_count: usage.generated_tokens,
                },
            })
        })
    }

    fn generate_embeddings(model: String, text: Vec<String>) -> Result<EmbeddingsResult, Error> {
        with_model(&model, |m| {
            let mut embeddings = Vec::with_capacity(text.len());
            let mut tokens = 0u32;
            for t in &text {
                let e = m.embed(t).map_err(spin_error)?;
                tokens = tokens.saturating_add(e.tokens);
                embeddings.push(e.values);
            }
            Ok(EmbeddingsResult {
                embeddings,
                usage: EmbeddingsUsage {
                    prompt_token_count: tokens,
                },
            })
        })
    }
}

export!(Adapter);
