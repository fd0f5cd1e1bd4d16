//! `realm serve --nats URL`: the same models, tenants and limits as the HTTP API, over a
//! NATS connection, so that any number of Realm servers share one load (a queue group)
//! and a wasmCloud lattice (or any NATS client) reaches them without HTTP.
//!
//! Subjects (`PREFIX` is `--nats-prefix`, `realm` by default), JSON payloads, request/reply
//! throughout (so that a wasmCloud component can drive it with `wasmcloud:messaging`'s
//! `request`):
//!
//! - `PREFIX.generate` (queue group `PREFIX`: one server takes it): an OpenAI
//!   chat-completion request body (`model`, `messages`, `max_tokens`, `temperature`,
//!   `top_p`, `seed`, `stop`, `response_format`, `grammar`). Reply: `{"generation": ID,
//!   "server": NAME, "next": SUBJECT}` once the generation has started, or `{"error": …}`.
//! - `PREFIX.next.NAME.ID` (only the server that started it): the text generated since the
//!   last call (waiting up to a second for some), `{"text", "done": false}`, and at the end
//!   `{"text", "done": true, "finish_reason", "usage"}` or `{"error": …}`. If that server is
//!   gone the request fails at once with NATS's "no responders": a client never hangs on a
//!   dead server. A generation nobody asks for within `--timeout` is dropped.
//! - `PREFIX.cancel.NAME.ID`: stops it (reply `{"cancelled": true|false}`).
//! - `PREFIX.embed` (queue group): `{"model","input"}` → the HTTP API's `/v1/embeddings`
//!   body (floats), or `{"error": …}`.
//! - `PREFIX.models` (queue group): the model list and the answering server's name.
//! - `PREFIX.load` (every server answers): `{"server","sessions_in_use","max_sessions",
//!   "queued","generations"}`.
//!
//! With `--api-key`, every request must carry a NATS header `Authorization: Bearer KEY`.
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

use crate::{
    ApiError, ApiResult, App, ChatRequest, EmbeddingRequest, Input, Job, Piece, PromptField,
    Timing, chat_messages, constraint, deadline_error, embed_all, finish_str, parse,
    plain_messages, spawn_generation, thread_gone, usage_json,
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
}

struct Nats {
    app: Arc<App>,
    client: async_nats::Client,
    name: String,
    prefix: String,
    /// Running generations by id; a `next` call takes its entry out while it runs.
    generations: Mutex<HashMap<String, Generation>>,
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
    let mut load = client.subscribe(sub("load")).await?;
    let mut next = client.subscribe(sub(&format!("next.{name}.*"))).await?;
    let mut cancel = client.subscribe(sub(&format!("cancel.{name}.*"))).await?;
    client.flush().await?;
    eprintln!(
        "realm serve: NATS {url} as {name}: {prefix}.generate, .embed, .models (queue group \
         {prefix}), .load, .next.{name}.*, .cancel.{name}.*"
    );
    let n = Arc::new(Nats {
        app,
        client,
        name,
        prefix,
        generations: Mutex::default(),
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
}

fn error_json(e: &ApiError) -> Value {
    json!({"error": {"code": e.code, "type": e.kind, "message": e.message}})
}

/// `--api-key`: the request's `Authorization: Bearer KEY` header (the scheme in any case,
/// as the HTTP API).
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
        .map(|(_, token)| token.trim());
    match token {
        Some(k) if k == key.as_str() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or incorrect API key (a NATS header 'Authorization: Bearer KEY')",
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
            Kind::Load => {
                let app = &self.app;
                Ok(json!({
                    "server": self.name,
                    "sessions_in_use": app.config.max_sessions - app.sessions.available_permits(),
                    "max_sessions": app.config.max_sessions,
                    "queued": app.queued.load(std::sync::atomic::Ordering::Relaxed),
                    "generations": self.generations.lock().map_or(0, |g| g.len()),
                }))
            }
        }
    }

    /// Checks a chat request as the HTTP API does, admits it and starts its generation.
    async fn generate(&self, payload: &Bytes) -> ApiResult<Value> {
        let app = &self.app;
        let arrived = Instant::now();
        let deadline = arrived + app.config.request_timeout;
        let req: ChatRequest = parse(payload)?;
        if req.tools.is_some() || req.tool_choice.is_some() {
            return Err(ApiError::unsupported(
                "tools",
                "tools are not supported over NATS yet (use the HTTP API)",
            ));
        }
        if req.sampling.logprobs.is_some() || req.sampling.top_logprobs.is_some() {
            return Err(ApiError::unsupported(
                "logprobs",
                "logprobs are not supported over NATS yet (use the HTTP API)",
            ));
        }
        let messages = chat_messages(req.messages)?;
        if messages
            .iter()
            .any(|m| m.get("tool_calls").is_some() || m["role"] == "tool")
        {
            return Err(ApiError::unsupported(
                "messages",
                "tool calls and tool messages are not supported over NATS yet",
            ));
        }
        let path = app.model_path(&req.model)?;
        let params = app.params(&req.sampling, &req.model, app.config.max_tokens)?;
        let constraint = constraint(&req.sampling)?;
        let permit = app.admit().await?;
        let job = Job {
            prompt: Input::Prompt(plain_messages(&messages)),
            params,
            logprobs: None,
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

    /// The text since the last call: waits up to [`NEXT_WAIT`] for a first piece, then
    /// takes every piece already there.
    async fn next(&self, id: &str) -> ApiResult<Value> {
        let taken = self.generations.lock().ok().and_then(|mut g| g.remove(id));
        let mut g = taken.ok_or_else(|| unknown_generation(id))?;
        let mut text = String::new();
        let mut piece = match tokio::time::timeout(NEXT_WAIT, g.rx.recv()).await {
            Ok(Some(p)) => Some(p),
            Ok(None) => return Err(thread_gone()),
            Err(_) => None,
        };
        while let Some(p) = piece.take() {
            g.timing.piece(&p);
            match p {
                Piece::Text(t, _) => text.push_str(&t),
                Piece::Done { finish, usage } => {
                    return Ok(json!({
                        "text": text, "done": true, "finish_reason": finish_str(finish),
                        "usage": usage_json(&usage), "server": self.name,
                    }));
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
        if let Ok(mut all) = self.generations.lock() {
            all.insert(id.to_string(), g);
        }
        Ok(json!({"text": text, "done": false}))
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
