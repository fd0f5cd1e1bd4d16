//! Constrained generation for Realm's guest: GBNF grammars (llama.cpp's format), JSON
//! Schema and JSON mode compiled to GBNF, and a matcher that says which tokens of a
//! vocabulary may come next. Pure logic: it builds for the host and for `wasm32-wasip2`.

mod gbnf;
mod matcher;
mod schema;

pub use gbnf::{Elem, Grammar, MAX_GRAMMAR_LEN, MAX_REPEAT, MAX_RULES};
pub use matcher::{MAX_STACKS, Matcher, Vocabulary};
pub use schema::{json_object_grammar, schema_to_gbnf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("JSON schema: {0}")]
    Schema(String),
    #[error("the grammar does not allow {0:?} here")]
    Rejected(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a generation's output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// A GBNF grammar (start rule `root`).
    Gbnf(String),
    /// A JSON Schema, as JSON text.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
}

impl Constraint {
    /// The compiled grammar.
    pub fn compile(&self) -> Result<Grammar> {
        match self {
            Constraint::Gbnf(g) => Grammar::parse(g),
            Constraint::JsonSchema(s) => {
                let v: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| Error::Schema(format!("not valid JSON: {e}")))?;
                Grammar::parse(&schema_to_gbnf(&v)?)
            }
            Constraint::JsonObject => Grammar::parse(&json_object_grammar()),
        }
    }
}

#[cfg(test)]
mod tests;
