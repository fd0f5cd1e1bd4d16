//! The command of `realm-standalone.wasm`: answers one prompt through `realm:inference`,
//! streaming the text to stdout.
//!
//! `realm-standalone.wasm --model PATH [--temp T] [-n MAX] [--seed N] [--raw] [--timings]
//! PROMPT` (`--timings`: the guest's usage and timings, and the generated ids, on stderr)
//!
//! PATH is read through WASI, so the runtime must grant its directory (`wasmtime run
//! --dir models …`). The chat template is applied unless `--raw`; the default temperature
//! is 0 (greedy), so the same prompt gives the same answer on every host.

wit_bindgen::generate!({
    path: "wit",
    world: "cli",
    generate_all,
});

use std::io::Write;

use realm::inference::runtime::Model;
use realm::inference::types::{Message, Params, Prompt};

struct Args {
    model: String,
    prompt: String,
    raw: bool,
    timings: bool,
    params: Params,
}

const USAGE: &str = "usage: realm-standalone.wasm --model PATH [--temp T] [-n MAX] [--seed N] \
                     [--raw] [--timings] PROMPT";

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut params = Params {
        max_tokens: 256,
        temperature: 0.0,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 0,
        stop: Vec::new(),
        ignore_eog: false,
    };
    let (mut model, mut prompt, mut raw, mut timings) = (None, None, false, false);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--model" | "-m" => model = Some(value("--model")?),
            "--temp" => {
                params.temperature = value("--temp")?
                    .parse()
                    .map_err(|_| "--temp takes a number".to_string())?
            }
            "-n" | "--max-tokens" => {
                params.max_tokens = value("-n")?
                    .parse()
                    .map_err(|_| "-n takes a whole number".to_string())?
            }
            "--seed" => {
                params.seed = value("--seed")?
                    .parse()
                    .map_err(|_| "--seed takes a whole number".to_string())?
            }
            "--raw" => raw = true,
            "--timings" => timings = true,
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ if prompt.is_none() => prompt = Some(a),
            _ => return Err("give one prompt (quote it)".into()),
        }
    }
    Ok(Args {
        model: model.ok_or("--model PATH is required")?,
        prompt: prompt.ok_or("a prompt is required")?,
        raw,
        timings,
        params,
    })
}

fn run(args: Args) -> Result<(), String> {
    let model = Model::load(&args.model).map_err(|e| format!("{e:?}"))?;
    let prompt = if args.raw {
        Prompt::Text(args.prompt)
    } else {
        Prompt::Messages(vec![Message {
            role: "user".into(),
            content: args.prompt,
        }])
    };
    let session = model.session(0).map_err(|e| format!("{e:?}"))?;
    let generation = session
        .generate(&prompt, &args.params)
        .map_err(|e| format!("{e:?}"))?;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = generation.next().map_err(|e| format!("{e:?}"))? {
        let _ = out.write_all(chunk.text.as_bytes());
        let _ = out.flush();
    }
    let _ = writeln!(out);
    if args.timings {
        let u = generation.usage();
        eprintln!(
            "timings: prompt_tokens={} prefill_ns={} generated_tokens={} decode_ns={}",
            u.prompt_tokens, u.prefill_ns, u.generated_tokens, u.decode_ns
        );
        let ids: Vec<String> = generation.tokens().iter().map(u32::to_string).collect();
        eprintln!("ids: [{}]", ids.join(","));
    }
    Ok(())
}

fn main() {
    let result = parse(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("realm: error: {e}");
        std::process::exit(1);
    }
}
