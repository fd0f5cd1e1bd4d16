//! Realm's model logic, written against [`realm_compute::Compute`]: the architectures
//! ([`arch`]), the sampler ([`sample`]) and the generation loop ([`engine`]: prompts and
//! chat templates to tokens, prefill, sampling under constraints, stop strings, streaming
//! UTF-8, log-probabilities).
//!
//! The guest component runs it over the `realm:compute` imports (its `Compute` is a WIT
//! client); tests and native tools run it over any backend directly, e.g. the CPU one in
//! `realm-kernels`. Nothing here knows which.

pub mod arch;
pub mod engine;
pub mod sample;
mod types;

pub use engine::{DEFAULT_CTX, GenerationHandle, LoadedModel, SessionHandle};
pub use realm_compute::Compute;
pub use types::*;
