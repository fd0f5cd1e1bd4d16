//! The GPU check of the original design: the default model answers one greedy prompt on the
//! CPU backend and on CUDA device 0 (`--device cuda`), and the example prints both texts, the
//! GPU's name, each side's decode speed and whether the two agree. Without a GPU (no driver,
//! no NVRTC, no device) it says so in one line and exits 0, unless `REALM_REQUIRE_GPU=1`.
//!
//! `cargo run --release -p realm-host --example gpu-test [PROMPT]`

use std::time::Instant;

use realm_host::{Engine, EngineConfig, Message, Prompt};

/// The answer on `device`, its generated tokens and their decode speed.
fn answer(device: &str, prompt: &str) -> anyhow::Result<(String, u32, f64)> {
    let engine = Engine::new(EngineConfig {
        device: device.into(),
        ..EngineConfig::default()
    })?;
    let mut model = engine.load_model(&realm_host::default_model_path())?;
    let mut session = model.session(0)?;
    let params = realm_host::Params {
        max_tokens: 48,
        temperature: 0.0,
        ..realm_host::neutral_params()
    };
    let messages = vec![Message {
        role: "user".into(),
        content: prompt.into(),
    }];
    let mut generation = session.generate(Prompt::Messages(messages), params)?;
    let mut text = String::new();
    let mut first = None;
    for piece in &mut generation {
        text.push_str(&piece?.text);
        first.get_or_insert_with(Instant::now);
    }
    let n = generation.usage()?.generated_tokens;
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok((text, n, f64::from(n.saturating_sub(1)) / secs.max(1e-9)))
}

fn main() -> anyhow::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France? Answer in one sentence.".into());
    let gpu = match realm_host::compute::cuda_device("cuda") {
        Ok(d) => d,
        Err(e) if std::env::var("REALM_REQUIRE_GPU").as_deref() == Ok("1") => {
            anyhow::bail!("REALM_REQUIRE_GPU=1, but: {e}")
        }
        Err(e) => {
            println!("gpu-test: skipped, no GPU here ({e})");
            return Ok(());
        }
    };
    println!("GPU: {}", gpu.name());
    let (on_gpu, n_gpu, tps_gpu) = answer("cuda", &prompt)?;
    let (on_cpu, n_cpu, tps_cpu) = answer("cpu", &prompt)?;
    println!("cuda ({n_gpu} tokens, {tps_gpu:.1} tok/s): {on_gpu}");
    println!("cpu  ({n_cpu} tokens, {tps_cpu:.1} tok/s): {on_cpu}");
    let (replays, captures) = gpu.graph_stats();
    println!("decode steps replayed from CUDA graphs: {replays} ({captures} captured)");
    // Greedy texts may part at a near-tie (the two sum in different orders); say where.
    let same = on_gpu
        .chars()
        .zip(on_cpu.chars())
        .take_while(|(a, b)| a == b)
        .count();
    if on_gpu == on_cpu {
        println!("the GPU's text equals the CPU's");
    } else {
        println!("the texts agree for {same} characters, then part (a near-tie)");
    }
    Ok(())
}
