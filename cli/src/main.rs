//! The `realm` command line.

mod bench;

use realm_server as serve;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use realm_gguf::{FileSource, GgufFile};
use realm_host::{Engine, EngineConfig, Message, Model, Params, Prompt};
use realm_tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(name = "realm", version, about = "Run LLMs as a WebAssembly component")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by `run` and `chat`.
#[derive(Args, Debug)]
struct GenOpts {
    /// The GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// Where to compute: cpu, or cuda[:N] (an NVIDIA GPU; needs its driver and NVRTC).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --device cuda: only the first N transformer blocks on the GPU, the rest of the
    /// model on the CPU (partial offload, for models larger than the GPU's memory).
    #[arg(long, value_name = "N")]
    gpu_layers: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// A system message (chat template prompts only).
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    /// Keep the most likely tokens up to this probability mass (1: all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    max_tokens: u32,
    /// Context size in tokens (0: the model's, up to 4096).
    #[arg(long = "ctx-size", default_value_t = 0)]
    ctx_size: u32,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep at most this many bytes of weights resident (e.g. 64M, 1G); the rest is read
    /// from the file when needed.
    #[arg(long, value_parser = parse_bytes)]
    max_resident: Option<u64>,
    /// Constrain the output to a GBNF grammar (llama.cpp's format) read from FILE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_schema", "json_mode"])]
    grammar: Option<PathBuf>,
    /// Constrain the output to JSON valid against the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "json_mode")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to a JSON object.
    #[arg(long)]
    json_mode: bool,
}

/// A `.wac` package: `NAME=PATH` (the name may hold colons, the path may not start one).
fn parse_dep(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(format!(
            "'{s}' is not NAME=PATH (e.g. realm:guest=realm_guest.wasm)"
        )),
    }
}

/// `NAME=PATH`, the file checked to exist.
fn parse_named_model(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => {
            let path = PathBuf::from(p);
            if !path.is_file() {
                return Err(format!("model file {p} does not exist"));
            }
            Ok((n.to_string(), path))
        }
        _ => Err(format!("'{s}' is not NAME=PATH")),
    }
}

/// `1234`, `64K`, `100M`, `2G` (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a byte count (like 4096, 64M or 2G)"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

impl GenOpts {
    fn params(&self) -> Params {
        Params {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eog: false,
        }
    }

    /// The output constraint the flags ask for, its file read.
    fn constraint(&self) -> anyhow::Result<Option<realm_host::Constraint>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(if let Some(g) = &self.grammar {
            Some(realm_host::Constraint::Gbnf(read(g)?))
        } else if let Some(s) = &self.json_schema {
            Some(realm_host::Constraint::JsonSchema(read(s)?))
        } else if self.json_mode {
            Some(realm_host::Constraint::JsonObject)
        } else {
            None
        })
    }

    fn load(&self) -> anyhow::Result<Model> {
        let path = self
            .model
            .clone()
            .unwrap_or_else(realm_host::default_model_path);
        if !path.exists() {
            anyhow::bail!(
                "model file {} does not exist (run `make models`, or pass --model)",
                path.display()
            );
        }
        let mut config = EngineConfig::default();
        if let Some(t) = self.threads {
            if t == 0 {
                anyhow::bail!("--threads must be at least 1");
            }
            config.threads = t;
        }
        config.max_resident = self.max_resident;
        config.device = self.device.clone();
        config.gpu_layers = self.gpu_layers;
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        spinner.set_message("compiling the Realm component…");
        let engine = Engine::new(config)?;
        spinner.set_message(format!("loading {}…", path.display()));
        let model = engine
            .load_model(&path)
            .with_context(|| format!("cannot load {}", path.display()));
        spinner.finish_and_clear();
        model
    }
}

#[derive(Args, Debug)]
struct ServeOpts {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed on the first line of stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// A model to serve, as NAME=PATH or PATH (named after the file); repeatable
    /// (default: the default model).
    #[arg(long, short)]
    model: Vec<String>,
    /// Where to compute: cpu, or cuda[:N] (an NVIDIA GPU; needs its driver and NVRTC).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --device cuda: only the first N transformer blocks on the GPU, the rest of the
    /// model on the CPU (partial offload, for models larger than the GPU's memory).
    #[arg(long, value_name = "N")]
    gpu_layers: Option<usize>,
    /// Compute threads shared by all requests (default: all cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Require `Authorization: Bearer KEY` on /v1 (default: no auth; also $REALM_API_KEY).
    #[arg(long, env = "REALM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most requests generating at once; more wait for a slot, first come first served.
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Most requests waiting for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Seconds a request may run before it is stopped (504).
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Cap on max_tokens of any request (also the chat default).
    #[arg(long, default_value_t = 2048)]
    max_tokens: u32,
    /// KV cache positions per request (0: the model's own, up to 4096).
    #[arg(long = "ctx-size", default_value_t = 0)]
    ctx_size: u32,
    /// Start every request from a new KV cache: by default a tenant keeps its last
    /// conversation's cache and the next request it serves reuses their shared prefix
    /// (same output; only its time to first token can tell).
    #[arg(long)]
    no_prompt_cache: bool,
    /// Run each request's steps on its own rather than in rounds with the others' (by
    /// default the requests' steps run together, each weight's matmuls as one product:
    /// the same output, more tokens/s under load).
    #[arg(long)]
    no_batch: bool,
    /// Linear memory each tenant's guest may use (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_bytes, default_value = "1G")]
    max_guest_memory: u64,
    /// Keep at most this many bytes of weights resident, all tenants together.
    #[arg(long, value_parser = parse_bytes)]
    max_resident: Option<u64>,
    /// Seconds a connection may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a request may take to send its body (then 408).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Open connections at most (more are answered 503 and closed).
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds in-flight requests may still run after SIGTERM / Ctrl-C before the server
    /// exits anyway (a second signal exits at once).
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Let browser pages from ORIGIN call the API (CORS; `*` for any); repeatable.
    #[arg(long, value_name = "ORIGIN")]
    cors: Vec<String>,
    /// Also serve on a NATS server (e.g. nats://127.0.0.1:4222): PREFIX.generate,
    /// .embed, .models, .info, .tokenize, .detokenize and .template in a queue group, so
    /// that several servers share them (a generation is then read on its own subject).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// The NATS subjects' prefix and queue group.
    #[arg(long, value_name = "PREFIX", default_value = "realm")]
    nats_prefix: String,
    /// Test hook: let prompts inject guest faults (endless loop, unbounded allocation).
    #[arg(long, hide = true)]
    test_faults: bool,
}

/// A NATS subject prefix: dot-separated tokens of letters, digits, `-` and `_`.
fn nats_prefix(p: String) -> anyhow::Result<String> {
    let ok = !p.is_empty()
        && p.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !ok {
        anyhow::bail!(
            "--nats-prefix '{p}' is not a NATS subject prefix (tokens of letters, digits, - and _, joined by dots)"
        );
    }
    Ok(p)
}

/// A positive, finite number of seconds from a flag.
fn seconds(flag: &str, v: f64) -> anyhow::Result<std::time::Duration> {
    if !(v > 0.0 && v.is_finite() && v < 1e9) {
        anyhow::bail!("--{flag} must be a positive number of seconds");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

impl ServeOpts {
    fn config(self) -> anyhow::Result<serve::ServeConfig> {
        let mut models = std::collections::BTreeMap::new();
        let specs = if self.model.is_empty() {
            vec![realm_host::default_model_path().display().to_string()]
        } else {
            self.model
        };
        for spec in specs {
            let (name, path) = match spec.split_once('=') {
                Some((n, p)) if !n.is_empty() => (n.to_string(), PathBuf::from(p)),
                _ => {
                    let p = PathBuf::from(&spec);
                    let n = p
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("model")
                        .to_string();
                    (n, p)
                }
            };
            if !path.exists() {
                anyhow::bail!("model file {} does not exist", path.display());
            }
            if models.insert(name.clone(), path).is_some() {
                anyhow::bail!("the model name '{name}' is given twice");
            }
        }
        let request_timeout = seconds("timeout", self.timeout)?;
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        if let Some(bad) = self
            .cors
            .iter()
            .find(|o| o.as_str() != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
        {
            anyhow::bail!("--cors takes an origin such as https://example.com (or *), not '{bad}'");
        }
        let mut engine = EngineConfig::default();
        if let Some(t) = self.threads {
            if t == 0 {
                anyhow::bail!("--threads must be at least 1");
            }
            engine.threads = t;
        }
        engine.max_resident = self.max_resident;
        engine.batch = !self.no_batch;
        engine.device = self.device.clone();
        engine.gpu_layers = self.gpu_layers;
        engine.max_guest_memory = usize::try_from(self.max_guest_memory).unwrap_or(usize::MAX);
        Ok(serve::ServeConfig {
            host: self.host,
            port: self.port,
            models,
            engine,
            api_key: self.api_key.filter(|k| !k.is_empty()),
            max_sessions: self.max_sessions.max(1),
            max_queue: self.max_queue,
            request_timeout,
            max_tokens: self.max_tokens.max(1),
            ctx_size: self.ctx_size,
            prompt_cache: !self.no_prompt_cache,
            test_faults: self.test_faults,
            header_timeout: seconds("header-timeout", self.header_timeout)?,
            body_timeout: seconds("body-timeout", self.body_timeout)?,
            max_connections: self.max_connections,
            shutdown_grace: seconds("shutdown-grace", self.shutdown_grace)?,
            cors: self.cors,
            nats: self.nats,
            nats_prefix: nats_prefix(self.nats_prefix)?,
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer one prompt, streaming the text to stdout.
    Run {
        #[command(flatten)]
        opts: GenOpts,
        /// Complete the prompt as plain text instead of applying the chat template.
        #[arg(long)]
        raw: bool,
        /// Print one JSON object at the end instead of streaming text.
        #[arg(long)]
        json: bool,
        prompt: String,
    },
    /// An interactive conversation (the session keeps its history).
    Chat {
        #[command(flatten)]
        opts: GenOpts,
    },
    /// Measure prompt processing and generation speed, with time split by op class.
    Bench {
        /// The GGUF model (default: the default model).
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Where to compute: cpu, or cuda[:N] (an NVIDIA GPU; needs its driver and NVRTC).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// With --device cuda: only the first N transformer blocks on the GPU.
        #[arg(long, value_name = "N")]
        gpu_layers: Option<usize>,
        /// Thread counts to measure (comma-separated).
        #[arg(long, short, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Prompt lengths in tokens (comma-separated).
        #[arg(long, short, value_delimiter = ',', default_value = "64,512")]
        prompt: Vec<u32>,
        /// Tokens to generate.
        #[arg(short = 'n', long = "gen", default_value_t = 128)]
        n_gen: u32,
        /// Repetitions of each measurement (median, min and max are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Cap on resident weight bytes, as for `run`.
        #[arg(long, value_parser = parse_bytes)]
        max_resident: Option<u64>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/models`, `/health`); every request runs as its own isolated tenant.
    Serve(ServeOpts),
    /// Run a WASI command component (an app) whose `wasi:nn` imports Realm serves, as
    /// `wasmedge --nn-preload` runs LlamaEdge apps: input tensor 0 is the prompt, tensor 1
    /// optional JSON options, output tensor 0 the text.
    #[command(name = "run-wasm")]
    RunWasm {
        /// A model for `load-by-name`: NAME:GGML:AUTO:PATH (repeatable).
        #[arg(long = "nn-preload", value_name = "NAME:GGML:AUTO:PATH")]
        preload: Vec<realm_wasi_nn::Preload>,
        /// A model served to `realm:compute`, for apps that embed the Realm component:
        /// NAME=PATH (repeatable).
        #[arg(long, value_parser = parse_named_model)]
        model: Vec<(String, PathBuf)>,
        /// A host directory the app may read, at the same path (repeatable).
        #[arg(long)]
        dir: Vec<PathBuf>,
        /// Compute threads (default: all cores).
        #[arg(long, short)]
        threads: Option<usize>,
        /// The app component (wasm32-wasip2), then its arguments (options after the app
        /// are the app's).
        #[arg(
            value_name = "APP.wasm [ARGS]",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<String>,
    },
    /// Compose components: plug the exports of each PLUG into the matching imports of
    /// SOCKET (as `wac plug` does), writing one component. Chains take one call per link,
    /// e.g. the Spin adapter plugged with Realm, then an app plugged with that.
    Plug {
        /// The component whose imports are filled.
        socket: PathBuf,
        /// A component whose exports fill them (repeatable).
        #[arg(long, required = true)]
        plug: Vec<PathBuf>,
        /// Where to write the composed component.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Build the component a `.wac` composition document describes (as `wac compose`
    /// does), e.g. `adapters/compute-wasm/realm-standalone.wac`.
    Compose {
        /// The `.wac` document.
        document: PathBuf,
        /// A package it names: NAME=PATH, e.g. realm:guest=realm_guest.wasm (repeatable).
        #[arg(long = "dep", value_parser = parse_dep)]
        deps: Vec<(String, PathBuf)>,
        /// Where to write the composed component.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Describe a GGUF file: architecture, hyper-parameters, tokenizer, tensors.
    Inspect {
        /// The GGUF file (default: the default model under models/).
        model: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        /// The GGUF file whose vocabulary to use.
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Do not add BOS/EOS even where the model asks for them.
        #[arg(long)]
        no_bos: bool,
        /// Treat control-token text such as `<|im_start|>` as ordinary characters.
        #[arg(long)]
        no_parse_special: bool,
        text: String,
    },
}

fn open(path: &Path) -> anyhow::Result<(FileSource, GgufFile)> {
    let src = FileSource::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file = GgufFile::read(&src)
        .with_context(|| format!("{} is not a usable GGUF file", path.display()))?;
    Ok((src, file))
}

fn run_prompt(opts: &GenOpts, raw: bool, json: bool, prompt: String) -> anyhow::Result<()> {
    let mut model = opts.load()?;
    let prompt = if raw {
        Prompt::Text(prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &opts.system {
            messages.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: prompt,
        });
        Prompt::Messages(messages)
    };
    let mut session = model.session(opts.ctx_size)?;
    let started = Instant::now();
    let constraint = opts.constraint()?;
    let mut generation = session.generate(prompt, opts.params())?;
    if let Some(c) = constraint {
        generation.constrain(c)?;
    }
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    for piece in &mut generation {
        let piece = piece?;
        if !json {
            stdout.write_all(piece.text.as_bytes())?;
            stdout.flush()?;
        }
        text.push_str(&piece.text);
    }
    let usage = generation.usage()?;
    let ids = generation.tokens()?;
    let finish = generation.finish_reason()?;
    let margins = generation.margins()?;
    let wall = started.elapsed();
    let model = generation.model();
    let per_s = |n: u32, ns: u64| {
        if ns == 0 {
            0.0
        } else {
            f64::from(n) / (ns as f64 / 1e9)
        }
    };
    if json {
        let stats = model.compute_stats();
        let store = model.store_stats();
        let out = serde_json::json!({
            "text": text,
            "ids": ids,
            "prompt_tokens": usage.prompt_tokens,
            "generated_tokens": usage.generated_tokens,
            "finish_reason": finish.map(realm_host::finish_name),
            "margins": margins,
            "prefill_tokens_per_s": per_s(usage.prompt_tokens, usage.prefill_ns),
            "decode_tokens_per_s": per_s(usage.generated_tokens.saturating_sub(1), usage.decode_ns),
            "constraint_ms_per_token": usage.constraint_ns as f64 / 1e6 / f64::from(usage.generated_tokens.max(1)),
            "wall_s": wall.as_secs_f64(),
            "guest_memory_peak_bytes": model.guest_memory_peak(),
            "weight_bytes": model.info.weight_bytes,
            "host_calls": stats.calls,
            "host_ms": {
                "matmul": stats.matmul_ns as f64 / 1e6,
                "attention": stats.attention_ns as f64 / 1e6,
                "other": stats.other_ns as f64 / 1e6,
                "reads": stats.read_ns as f64 / 1e6,
            },
            "weights": {
                "max_resident_bytes": opts.max_resident,
                "peak_resident_bytes": store.peak_resident_bytes,
                "loads": store.loads,
                "evictions": store.evictions,
                "prefetches": store.prefetches,
                "prefetch_hits": store.prefetch_hits,
            },
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn chat(opts: &GenOpts) -> anyhow::Result<()> {
    let mut model = opts.load()?;
    eprintln!(
        "realm chat: {} ({}). Type a message; an empty line or Ctrl-D ends.",
        model.info.name, model.info.architecture
    );
    let mut messages = Vec::new();
    if let Some(s) = &opts.system {
        messages.push(Message {
            role: "system".into(),
            content: s.clone(),
        });
    }
    let mut session = model.session(opts.ctx_size)?;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let mut reply = String::new();
        let mut generation = session.generate(Prompt::Messages(messages.clone()), opts.params())?;
        if let Some(c) = opts.constraint()? {
            generation.constrain(c)?;
        }
        for piece in &mut generation {
            let piece = piece?;
            stdout.write_all(piece.text.as_bytes())?;
            stdout.flush()?;
            reply.push_str(&piece.text);
        }
        writeln!(stdout)?;
        messages.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            opts,
            raw,
            json,
            prompt,
        } => run_prompt(&opts, raw, json, prompt)?,
        Command::Chat { opts } => chat(&opts)?,
        Command::Serve(opts) => serve::run(opts.config()?)?,
        Command::Bench {
            model,
            device,
            gpu_layers,
            threads,
            prompt,
            n_gen,
            runs,
            max_resident,
            json,
        } => {
            let path = model.unwrap_or_else(realm_host::default_model_path);
            bench::run(
                &path,
                &device,
                gpu_layers,
                &threads,
                &prompt,
                n_gen,
                runs.max(1),
                max_resident,
                json,
            )?
        }
        Command::RunWasm {
            preload,
            model,
            dir,
            threads,
            command,
        } => {
            let (app, args) = command
                .split_first()
                .map(|(a, rest)| (PathBuf::from(a), rest.to_vec()))
                .ok_or_else(|| anyhow::anyhow!("give the app component to run"))?;
            let mut config = EngineConfig::default();
            if let Some(t) = threads {
                anyhow::ensure!(t > 0, "--threads must be at least 1");
                config.threads = t;
            }
            let engine = std::sync::Arc::new(Engine::new(config)?);
            let run = realm_host::nn::RunWasm {
                app,
                args,
                preloads: preload,
                models: model,
                dirs: dir,
            };
            if !realm_host::nn::run_wasm(engine, run)? {
                return Err(ExitStatus.into());
            }
        }
        Command::Plug {
            socket,
            plug,
            output,
        } => {
            let bytes = realm_host::compose::plug(&socket, &plug)?;
            std::fs::write(&output, bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
        }
        Command::Compose {
            document,
            deps,
            output,
        } => {
            let bytes = realm_host::compose::compose(&document, &deps)?;
            std::fs::write(&output, bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
        }
        Command::Inspect { model, json } => {
            let path = model.unwrap_or_else(realm_host::default_model_path);
            let (_, file) = open(&path)?;
            if json {
                println!("{}", realm_host::inspect::report_json(&file));
            } else {
                print!(
                    "{}",
                    realm_host::inspect::report(&file, &path.display().to_string())
                );
            }
        }
        Command::Tokenize {
            model,
            no_bos,
            no_parse_special,
            text,
        } => {
            let path = model.unwrap_or_else(realm_host::default_model_path);
            let (_, file) = open(&path)?;
            let tok = Tokenizer::from_metadata(&file.metadata)
                .with_context(|| format!("{} has no usable tokenizer", path.display()))?;
            let ids = tok.encode(&text, !no_bos, !no_parse_special)?;
            println!("{}", serde_json::to_string(&ids)?);
        }
    }
    Ok(())
}

/// A `run-wasm` app that exited with a failure status.
#[derive(Debug, thiserror::Error)]
#[error("the app exited with a failure status")]
struct ExitStatus;

fn main() -> ExitCode {
    // `RUST_LOG=realm=debug` shows weight loads and evictions as they happen.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The app already said why it failed.
        Err(e) if e.is::<ExitStatus>() => ExitCode::FAILURE,
        Err(e) => {
            // One line, causes joined: no backtrace for errors the user can fix.
            eprintln!("realm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
