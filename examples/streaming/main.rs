//! Token streaming with Realm's Rust API: each piece is printed as soon as the guest yields
//! it (whole UTF-8 characters only), then the speed and finish reason.
//!
//! `cargo run --release -p realm-host --example streaming [PROMPT]`

use std::io::Write;
use std::time::Instant;

use realm_host::{Engine, EngineConfig, Message, Prompt};

fn main() -> anyhow::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Write a haiku about the sea.".into());
    let engine = Engine::new(EngineConfig::default())?;
    let mut model = engine.load_model(&realm_host::default_model_path())?;
    let mut session = model.session(0)?;
    let params = realm_host::Params {
        max_tokens: 64,
        seed: 42,
        ..realm_host::default_params()
    };
    let messages = vec![Message {
        role: "user".into(),
        content: prompt,
    }];
    let started = Instant::now();
    let mut first = None;
    let mut generation = session.generate(Prompt::Messages(messages), params)?;
    let mut out = std::io::stdout().lock();
    let mut pieces = 0;
    for piece in &mut generation {
        let piece = piece?;
        first.get_or_insert_with(|| started.elapsed());
        out.write_all(piece.text.as_bytes())?;
        out.flush()?;
        pieces += 1;
    }
    let usage = generation.usage()?;
    let finish = generation.finish_reason()?;
    writeln!(out)?;
    writeln!(
        out,
        "[{pieces} pieces; first after {:.0} ms; {} tokens in {:.2} s; finish: {}]",
        first.unwrap_or_default().as_secs_f64() * 1e3,
        usage.generated_tokens,
        started.elapsed().as_secs_f64(),
        finish.map_or("none", realm_host::finish_name)
    )?;
    Ok(())
}
