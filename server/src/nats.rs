//! `realm serve --nats URL`: the same models, tenants and limits as the HTTP API, over a
//! NATS connection, so that any number of Realm servers share one load (a queue group)
//! and a wasmCloud lattice (or any NATS client) reaches them without HTTP. Everything
//! `realm:inference` offers is here, so that `adapters/wasmcloud` can export that WIT over
//! `wasmcloud:messaging`.
//!
//! Subjects (`PREFIX` is `--nats-prefix`, `realm` by default), JSON payloads, request/reply
//! throughout (so that a wasmCloud component can drive it with `wasmcloud:messaging`'s
//! `request`):
//!
//! - `PREFIX.generate` (queue group `PREFIX`: one server takes it): `model` and exactly one
//!   of `messages` (OpenAI chat messages, rendered with the model's template), `prompt`
//!   (raw text) or `chat` (an OpenAI-style chat as JSON text, `{"messages", "tools"}`:
//!   `realm:inference`'s `generate-chat`); the sampling fields of the HTTP API
//!   (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `response_format`, `grammar`,
//!   `logprobs`/`top_logprobs`) and llama.cpp server's `top_k`, `min_p`, `repeat_penalty`,
//!   `repeat_last_n`, `ignore_eos`. Reply: `{"generation": ID, "server": NAME, "next":
//!   SUBJECT, "cancel": SUBJECT}` once the generation has started, or `{"error": …}`.
//! - `PREFIX.next.NAME.ID` (only the server that started it): what was generated since the
//!   last call (waiting up to a second for some): `{"text", "pieces": [{"text", "token"}],
//!   "done": false}` (with `"logprobs": [{"chosen", "top"}]` when asked for), and at the end
//!   also `"done": true, "finish_reason"` (`eog`, `stop` or `length`), `"usage"`, `"tokens"`
//!   and `"margins"`; or `{"error": …}`. If that server is gone the request fails at once
//!   with NATS's "no responders": a client never hangs on a dead server. A generation
//!   nobody asks for within `--timeout` is dropped.
//! - `PREFIX.cancel.NAME.ID`: stops it (reply `{"cancelled": true|false}`).
//! - `PREFIX.embed` (queue group): `{"model","input"}` → the HTTP API's `/v1/embeddings`
//!   body (floats), or `{"error": …}`.
//! - `PREFIX.info`, `PREFIX.tokenize`, `PREFIX.detokenize`, `PREFIX.template` (queue
//!   group): `{"model"}` → the model's `realm:inference` info; `{"model", "text",
//!   "add_special"}` → `{"tokens"}`; `{"model", "tokens"}` → `{"text"}`; `{"model",
//!   "messages", "add_generation_prompt"}` → `{"text"}` (the chat template rendered).
//! - `PREFIX.models` (queue group): the model list and the answering server's name.
//! - `PREFIX.load` (every server answers): `{"server","sessions_in_use","max_sessions",
//!   "queued","generations"}`.
//!
//! With `--api-key`, every request must carry the key: a NATS header `Authorization:
//! Bearer KEY`, or (for clients that cannot set headers, such as `wasmcloud:messaging`) an
//! `"api_key"` field in its JSON body.
//! Errors are `{"error": {"code", "type", "message"}}` with the HTTP API's codes
//! (`model_not_found`, `invalid_json`, `invalid_value`, `context_length_exceeded`,
//! `too_many_sessions`, `deadline_exceeded`, `invalid_api_key`, `unknown_generation`, …).
//! A request without a reply subject is dropped (there is nowhere to answer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use realm_host::{Model, Prompt, StepLogprobs, TokenLogprob, finish_name};
use serde::Deserialize;

use crate::{
    ApiError, ApiResult, App, ChatMessage, EmbeddingRequest, Input, Job, Piece, PromptField,
    Sampling, Shape, Timing, chat_messages, constraint, deadline_error, embed_all, on_tenant,
    parse, plain_list, plain_messages, spawn_generation, thread_gone, usage_json,
};

/// How long a `next` call waits for the first new piece before answering with none.
const NEXT_WAIT: Duration = Duration::from_secs(1);

/// This process's name on the NATS connection, in its subjects and in its answers.
fn server_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "realm-{}-{:x}",
            std::process::id(),
            crate::time_seed() & 0xffff
        )
    })
    .clone()
}

/// A running generation, between `next` calls.
struct Generation {
    rx: mpsc::Receiver<Piece>,
    timing: Timing,
    /// When a client last asked for it (one nobody asks for within `--timeout` is dropped).
    polled: Instant,
    /// Whether its `next` answers carry log-probabilities.
    logprobs: bool,
}

/// `PREFIX.generate`'s body.
#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: String,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<String>,
    chat: Option<String>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// The body of `PREFIX.info`, `.tokenize`, `.detokenize` and `.template`.
#[derive(Debug, Deserialize)]
struct ModelRequest {
    model: String,
    text: Option<String>,
    #[serde(default)]
    add_special: bool,
    tokens: Option<Vec<u32>>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    add_generation_prompt: bool,
}

struct Nats {
    app: Arc<App>,
    client: async_nats::Client,
    name: String,
    prefix: String,
    /// Running generations by id; a `next` call takes its entry out while it runs.
    generations: Mutex<HashMap<String, Generation>>,
    /// Generations out of the map while a `next` call reads them (counted by `load`).
    reading: std::sync::atomic::AtomicUsize,
}

/// Counts a generation as being read while it lives.
struct Reading<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Reading<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Connects to `url`, subscribes on `prefix.*` and serves in the background. Returns once
/// the subscriptions are in place (so that a client may ask as soon as the server says it
/// is up); a wrong URL is an error here.
pub(crate) async fn start(app: Arc<App>, url: &str, prefix: String) -> anyhow::Result<()> {
    let name = server_name();
    let client = async_nats::ConnectOptions::new()
        .name(&name)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    let sub = |s: &str| format!("{prefix}.{s}");
    let queue = || prefix.clone();
    let mut generate = client.queue_subscribe(sub("generate"), queue()).await?;
    let mut embed = client.queue_subscribe(sub("embed"), queue()).await?;
    let mut models = client.queue_subscribe(sub("models"), queue()).await?;
    let mut info = client.queue_subscribe(sub("info"), queue()).await?;
    let mut tokenize = client.queue_subscribe(sub("tokenize"), queue()).await?;
    let mut detokenize = client.queue_subscribe(sub("detokenize"), queue()).await?;
    let mut template = client.queue_subscribe(sub("template"), queue()).await?;
    let mut load = client.subscribe(sub("load")).await?;
    let mut next = client.subscribe(sub(&format!("next.{name}.*"))).await?;
    let mut cancel = client.subscribe(sub(&format!("cancel.{name}.*"))).await?;
    client.flush().await?;
    eprintln!(
        "realm serve: NATS {url} as {name}: {prefix}.generate, .embed, .models, .info, \
         .tokenize, .detokenize, .template (queue group {prefix}), .load, .next.{name}.*, \
         .cancel.{name}.*"
    );
    let n = Arc::new(Nats {
        app,
        client,
        name,
        prefix,
        generations: Mutex::default(),
        reading: Default::default(),
    });
    // Generations nobody polls any more (a client that went away) are dropped, which
    // stops them at their next piece and frees their session slot.
    let reaper = n.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            let budget = reaper.app.config.request_timeout;
            if let Ok(mut g) = reaper.generations.lock() {
                g.retain(|_, v| v.polled.elapsed() < budget);
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (msg, kind) = tokio::select! {
                Some(m) = generate.next() => (m, Kind::Generate),
                Some(m) = next.next() => (m, Kind::Next),
                Some(m) = cancel.next() => (m, Kind::Cancel),
                Some(m) = embed.next() => (m, Kind::Embed),
                Some(m) = models.next() => (m, Kind::Models),
                Some(m) = load.next() => (m, Kind::Load),
                Some(m) = info.next() => (m, Kind::Info),
                Some(m) = tokenize.next() => (m, Kind::Tokenize),
                Some(m) = detokenize.next() => (m, Kind::Detokenize),
                Some(m) = template.next() => (m, Kind::Template),
                else => break,
            };
            let Some(reply) = msg.reply.clone() else {
                tracing::debug!(target: "realm::nats", "{} without a reply subject", msg.subject);
                continue;
            };
            let n = n.clone();
            tokio::spawn(async move {
                let answer = match authorized(&n.app, &msg) {
                    Err(e) => error_json(&e),
                    Ok(()) => n
                        .answer(kind, &msg)
                        .await
                        .unwrap_or_else(|e| error_json(&e)),
                };
                let payload = Bytes::from(answer.to_string());
                if let Err(e) = n.client.publish(reply.clone(), payload).await {
                    tracing::warn!(target: "realm::nats", "cannot answer on {reply}: {e}");
                }
            });
        }
    });
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Generate,
    Next,
    Cancel,
    Embed,
    Models,
    Load,
    Info,
    Tokenize,
    Detokenize,
    Template,
}

fn error_json(e: &ApiError) -> Value {
    json!({"error": {"code": e.code, "type": e.kind, "message": e.message}})
}

/// `--api-key`: the request's `Authorization: Bearer KEY` header (the scheme in any case,
/// as the HTTP API), or an `"api_key"` field in its JSON body.
fn authorized(app: &App, msg: &async_nats::Message) -> ApiResult<()> {
    let Some(key) = &app.config.api_key else {
        return Ok(());
    };
    let given = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Authorization"))
        .map(|v| v.as_str().to_string());
    let token = given
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string())
        .or_else(|| {
            #[derive(Deserialize)]
            struct Keyed {
                api_key: String,
            }
            serde_json::from_slice::<Keyed>(&msg.payload)
                .ok()
                .map(|k| k.api_key)
        });
    match token {
        Some(k) if k == key.as_str() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or incorrect API key (a NATS header 'Authorization: Bearer KEY', or \
             \"api_key\" in the body)",
        )),
    }
}

fn unknown_generation(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_generation",
        format!("no running generation '{id}' here (it ended, was dropped, or is being read)"),
    )
}

impl Nats {
    async fn answer(&self, kind: Kind, msg: &async_nats::Message) -> ApiResult<Value> {
        // The generation id is the subject's last token (`…next.NAME.ID`).
        let id = || msg.subject.rsplit('.').next().unwrap_or("").to_string();
        match kind {
            Kind::Generate => self.generate(&msg.payload).await,
            Kind::Next => self.next(&id()).await,
            Kind::Cancel => {
                let gone = self
                    .generations
                    .lock()
                    .ok()
                    .and_then(|mut g| g.remove(&id()));
                Ok(json!({"cancelled": gone.is_some()}))
            }
            Kind::Embed => self.embed(&msg.payload).await,
            Kind::Models => {
                let data: Vec<Value> = self
                    .app
                    .config
                    .models
                    .keys()
                    .map(|id| json!({"id": id, "object": "model", "owned_by": "realm"}))
                    .collect();
                Ok(json!({"object": "list", "data": data, "server": self.name}))
            }
            Kind::Info | Kind::Tokenize | Kind::Detokenize | Kind::Template => {
                self.model_call(kind, &msg.payload).await
            }
            Kind::Load => {
                let app = &self.app;
                Ok(json!({
                    "server": self.name,
                    "sessions_in_use": app.config.max_sessions - app.sessions.available_permits(),
                    "max_sessions": app.config.max_sessions,
                    "queued": app.queued.load(std::sync::atomic::Ordering::Relaxed),
                    "generations": self.generations.lock().map_or(0, |g| g.len())
                        + self.reading.load(std::sync::atomic::Ordering::Relaxed),
                }))
            }
        }
    }

    /// Checks a generation request as the HTTP API does, admits it and starts it.
    async fn generate(&self, payload: &Bytes) -> ApiResult<Value> {
        let app = &self.app;
        let arrived = Instant::now();
        let deadline = arrived + app.config.request_timeout;
        let req: GenerateRequest = parse(payload)?;
        if req.tools.is_some() || req.tool_choice.is_some() {
            return Err(ApiError::unsupported(
                "tools",
                "over NATS, tools travel inside \"chat\" (an OpenAI-style chat as JSON text)",
            ));
        }
        let input = match (req.messages, req.prompt, req.chat) {
            (Some(m), None, None) => {
                let messages = chat_messages(m)?;
                if messages
                    .iter()
                    .any(|m| m.get("tool_calls").is_some() || m["role"] == "tool")
                {
                    return Err(ApiError::unsupported(
                        "messages",
                        "over NATS, tool calls and tool messages travel inside \"chat\"",
                    ));
                }
                Input::Prompt(plain_messages(&messages))
            }
            (None, Some(p), None) if !p.is_empty() => Input::Prompt(Prompt::Text(p)),
            (None, None, Some(c)) if !c.is_empty() => Input::Chat(c),
            _ => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "give exactly one of messages, prompt (non-empty text) or chat (JSON text)",
                ));
            }
        };
        let path = app.model_path(&req.model)?;
        let params = app.params(&req.sampling, &req.model, app.config.max_tokens)?;
        let constraint = constraint(&req.sampling)?;
        let logprobs = Shape::Chat.logprobs(&req.sampling)?;
        if logprobs.is_some() && matches!(input, Input::Chat(_)) {
            return Err(ApiError::unsupported(
                "logprobs",
                "logprobs cannot be combined with a chat with tools yet",
            ));
        }
        let permit = app.admit().await?;
        let job = Job {
            prompt: input,
            params,
            logprobs,
            constraint,
        };
        let (started, rx) = spawn_generation(app.clone(), path, job, permit, deadline);
        tokio::time::timeout_at(deadline.into(), started)
            .await
            .map_err(|_| deadline_error(app.config.request_timeout))?
            .map_err(|_| thread_gone())??;
        let id = crate::request_id("gen");
        let g = Generation {
            rx,
            timing: Timing::new(app, arrived),
            polled: Instant::now(),
            logprobs: logprobs.is_some(),
        };
        self.generations
            .lock()
            .map_err(|_| thread_gone())?
            .insert(id.clone(), g);
        Ok(json!({
            "generation": id,
            "server": self.name,
            "next": format!("{}.next.{}.{id}", self.prefix, self.name),
            "cancel": format!("{}.cancel.{}.{id}", self.prefix, self.name),
        }))
    }

    /// What was generated since the last call: waits up to [`NEXT_WAIT`] for a first
    /// piece, then takes every piece already there.
    async fn next(&self, id: &str) -> ApiResult<Value> {
        // Counted before it leaves the map, so that `load` never misses it.
        let _reading = Reading::new(&self.reading);
        let taken = self.generations.lock().ok().and_then(|mut g| g.remove(id));
        let mut g = taken.ok_or_else(|| unknown_generation(id))?;
        let mut text = String::new();
        let mut pieces = Vec::new();
        let mut steps = Vec::new();
        let mut piece = match tokio::time::timeout(NEXT_WAIT, g.rx.recv()).await {
            Ok(Some(p)) => Some(p),
            Ok(None) => return Err(thread_gone()),
            Err(_) => None,
        };
        let answer = |text: String, pieces: Vec<Value>, steps: &[StepLogprobs], logprobs| {
            let mut v = json!({"text": text, "pieces": pieces, "done": false});
            if logprobs {
                v["logprobs"] = steps.iter().map(step_json).collect();
            }
            v
        };
        while let Some(p) = piece.take() {
            g.timing.piece(&p);
            match p {
                Piece::Text(t, s, token) => {
                    text.push_str(&t);
                    pieces.push(json!({"text": t, "token": token}));
                    steps.extend(s);
                }
                Piece::Done {
                    finish,
                    usage,
                    tokens,
                    margins,
                } => {
                    let mut v = answer(text, pieces, &steps, g.logprobs);
                    v["done"] = json!(true);
                    v["finish_reason"] = json!(finish.map(finish_name));
                    v["usage"] = usage_json(&usage);
                    v["tokens"] = json!(tokens);
                    v["margins"] = json!(margins);
                    v["server"] = json!(self.name);
                    return Ok(v);
                }
                Piece::Failed(e) => return Err(e),
            }
            piece = match g.rx.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(thread_gone()),
            };
        }
        g.polled = Instant::now();
        let logprobs = g.logprobs;
        if let Ok(mut all) = self.generations.lock() {
            all.insert(id.to_string(), g);
        }
        Ok(answer(text, pieces, &steps, logprobs))
    }

    /// `info`, `tokenize`, `detokenize` and `template`: one call on a loaded tenant of the
    /// model, under the same admission and deadline as a generation.
    async fn model_call(&self, kind: Kind, payload: &Bytes) -> ApiResult<Value> {
        let req: ModelRequest = parse(payload)?;
        let missing = |field: &str| {
            ApiError::invalid("invalid_value", format!("this request needs \"{field}\""))
        };
        let run = |r: anyhow::Result<Value>| r.map_err(|e| ApiError::from_run(&e));
        match kind {
            Kind::Info => on_tenant(&self.app, &req.model, |m| Ok(info_json(m))).await,
            Kind::Tokenize => {
                let text = req.text.ok_or_else(|| missing("text"))?;
                let special = req.add_special;
                on_tenant(&self.app, &req.model, move |m| {
                    run(m.tokenize(&text, special).map(|t| json!({"tokens": t})))
                })
                .await
            }
            Kind::Detokenize => {
                let ids = req.tokens.ok_or_else(|| missing("tokens"))?;
                on_tenant(&self.app, &req.model, move |m| {
                    run(m.detokenize(&ids).map(|t| json!({"text": t})))
                })
                .await
            }
            _ => {
                let messages = plain_list(&chat_messages(
                    req.messages.ok_or_else(|| missing("messages"))?,
                )?);
                let add = req.add_generation_prompt;
                on_tenant(&self.app, &req.model, move |m| {
                    run(m.apply_template(&messages, add).map(|t| json!({"text": t})))
                })
                .await
            }
        }
    }

    /// An embeddings request: the HTTP API's `/v1/embeddings` body (floats only).
    async fn embed(&self, payload: &Bytes) -> ApiResult<Value> {
        let req: EmbeddingRequest = parse(payload)?;
        if req.encoding_format.as_deref().is_some_and(|f| f != "float") || req.dimensions.is_some()
        {
            return Err(ApiError::invalid(
                "invalid_value",
                "over NATS, embeddings are floats of the model's own size",
            ));
        }
        let inputs = match req.input {
            PromptField::One(s) => vec![s],
            PromptField::Many(v) => v,
        };
        let (tokens, result) = embed_all(&self.app, &req.model, inputs).await?;
        let data: Vec<Value> = result
            .into_iter()
            .enumerate()
            .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
            .collect();
        Ok(json!({
            "object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }
}

/// A model's `realm:inference` info as JSON.
fn info_json(m: &Model) -> Value {
    let i = &m.info;
    json!({
        "name": i.name, "architecture": i.architecture, "n_vocab": i.n_vocab,
        "n_ctx_train": i.n_ctx_train, "n_layer": i.n_layer, "n_embd": i.n_embd,
        "n_head": i.n_head, "n_head_kv": i.n_head_kv, "tokenizer": i.tokenizer,
        "chat_template": i.chat_template, "weight_bytes": i.weight_bytes,
    })
}

/// One step's log-probabilities as JSON (token bytes as a list of numbers).
fn step_json(s: &StepLogprobs) -> Value {
    let entry =
        |t: &TokenLogprob| json!({"token": t.token, "bytes": t.bytes, "logprob": t.logprob});
    json!({"chosen": entry(&s.chosen), "top": s.top.iter().map(entry).collect::<Vec<_>>()})
}
