//! A multi-turn chat with Realm's Rust API: one session keeps the conversation, and a turn
//! that extends it reuses the KV cache of the prefix already processed.
//!
//! `cargo run --release -p realm-host --example local-chat [MODEL.gguf]`

use realm_host::{Engine, EngineConfig, Message, Prompt};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(realm_host::default_model_path);
    let engine = Engine::new(EngineConfig::default())?;
    let mut model = engine.load_model(&path)?;
    let mut session = model.session(0)?;
    let params = realm_host::Params {
        temperature: 0.0,
        max_tokens: 48,
        ..realm_host::default_params()
    };
    let mut messages = Vec::new();
    for question in [
        "What is the capital of France? Answer in one word.",
        "And what is its most famous tower called?",
    ] {
        println!("> {question}");
        messages.push(Message {
            role: "user".into(),
            content: question.into(),
        });
        let mut reply = String::new();
        let mut generation =
            session.generate(Prompt::Messages(messages.clone()), params.clone())?;
        for piece in &mut generation {
            reply.push_str(&piece?.text);
        }
        let usage = generation.usage()?;
        println!("{reply}");
        println!(
            "  (prompt of {} tokens, {} generated)",
            usage.prompt_tokens, usage.generated_tokens
        );
        messages.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}
