//! `realm serve`: an OpenAI-compatible HTTP server. Every request has a tenant to itself (a
//! wasmtime Store over the engine's shared, mapped weights), with a deadline, a memory cap
//! and a token cap; a tenant that passes a limit is dropped and the others go on, one
//! whose request ended cleanly waits, loaded, for the next request. Generation runs on a
//! thread per request (the ops' parallel parts on the engine's one spinning pool); the
//! HTTP side streams their pieces as server-sent events.
//!
//! As a library: [`Server::new`] loads the models, [`Server::router`] is the whole HTTP
//! API as an axum `Router` (tested in-process), and [`run`] binds and serves until a
//! signal, as `realm serve` does.

mod metrics;
mod nats;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use realm_host::{
    Constraint, Engine, EngineConfig, FinishReason, InferenceError, LimitError, Message, Model,
    Params, Prompt, StepLogprobs, TokenLogprob, Usage, finish_name,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// Server settings (`realm serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Served models: name → GGUF path.
    pub models: BTreeMap<String, PathBuf>,
    pub engine: EngineConfig,
    pub api_key: Option<String>,
    pub max_sessions: usize,
    /// Requests that may wait for a session slot (first come, first served); more get 429.
    pub max_queue: usize,
    pub request_timeout: Duration,
    /// Cap on `max_tokens` of any request (and the default where a request gives none).
    pub max_tokens: u32,
    /// KV cache positions per request (0: the model's own, up to 4096).
    pub ctx_size: u32,
    /// A tenant keeps its last conversation's KV cache, and a request it serves next
    /// reuses the prefix they share (a system prompt): same output, less prefill.
    pub prompt_cache: bool,
    /// Test hook: pass `REALM_TEST_FAULTS=1` to the guests (fault-injection prompts).
    pub test_faults: bool,
    /// How long a connection may take to send a request's headers, counted from when the
    /// server starts waiting for them: it also closes idle keep-alive connections.
    pub header_timeout: Duration,
    /// How long a request may take to send its body.
    pub body_timeout: Duration,
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// After SIGTERM / Ctrl-C: how long in-flight requests may still run before the
    /// process exits anyway (a second signal exits at once).
    pub shutdown_grace: Duration,
    /// Origins allowed to call from a browser (CORS; `*` for any). Empty: CORS off.
    pub cors: Vec<String>,
    /// Also answer on a NATS server at this URL (`nats.rs`: subjects under `nats_prefix`,
    /// in a queue group, so that several servers share the load).
    pub nats: Option<String>,
    pub nats_prefix: String,
}

/// The largest request body accepted (413 above it).
pub const MAX_BODY: usize = 4 << 20;

struct App {
    engine: Engine,
    config: ServeConfig,
    sessions: Arc<Semaphore>,
    /// One permit per open connection (`--max-connections`).
    connections: Arc<Semaphore>,
    metrics: metrics::Metrics,
    /// Per served model: its context length for clamping (from the first tenant).
    n_ctx_train: BTreeMap<String, u32>,
    /// Loaded tenants waiting for a request, per model file (see [`App::tenant`]).
    idle: std::sync::Mutex<BTreeMap<PathBuf, Vec<Model>>>,
    /// Requests waiting for a session slot.
    queued: std::sync::atomic::AtomicUsize,
}

impl App {
    /// A tenant for the model at `path`: an idle one that a finished request gave back,
    /// else a new one (a fresh Store, the guest parsing the model's header and building
    /// its tokenizer: ~100 ms on SmolLM2). A request has its tenant to itself; when it
    /// gives the tenant back only its session's KV cache stays (`--no-prompt-cache`:
    /// nothing), for the next request to reuse the prefix they share.
    fn tenant(&self, path: &std::path::Path) -> anyhow::Result<Model> {
        let started = Instant::now();
        let reused = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.get_mut(path).and_then(Vec::pop));
        let tenant = match reused {
            Some(t) => {
                self.metrics.tenants_reused.inc();
                t
            }
            None => self.engine.load_model(path)?,
        };
        self.metrics
            .tenant_start
            .observe(started.elapsed().as_secs_f64());
        Ok(tenant)
    }

    /// Gives back a tenant whose request ended cleanly (one that failed, ran past a limit
    /// or lost its client is dropped instead). At most `--max-sessions` wait per model:
    /// as many as were busy at once.
    fn give_back(&self, path: PathBuf, tenant: Model) {
        if let Ok(mut idle) = self.idle.lock() {
            let waiting = idle.entry(path).or_default();
            if waiting.len() < self.config.max_sessions {
                waiting.push(tenant);
            }
        }
    }
}

/// An OpenAI-shaped error: `{"error": {"message", "type", "code"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    retry_after: Option<u32>,
    /// The request parameter at fault, where there is one.
    param: Option<&'static str>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        m: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: m.into(),
            retry_after: None,
            param: None,
        }
    }

    fn invalid(code: &'static str, m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, m)
    }

    /// A parameter Realm does not support (yet): a 400 naming it, never a silent 200.
    fn unsupported(param: &'static str, m: impl Into<String>) -> Self {
        let mut e = Self::invalid("unsupported_parameter", m);
        e.param = Some(param);
        e
    }

    /// The OpenAI-shaped error for a status that a layer below the handlers produced
    /// (wrong method, a body too large or badly framed, a timeout).
    fn for_status(status: StatusCode) -> Self {
        let (kind, code, msg) = match status.as_u16() {
            405 => (
                "invalid_request_error",
                "method_not_allowed",
                "this endpoint does not take that method".to_string(),
            ),
            408 => (
                "invalid_request_error",
                "request_timeout",
                "the request was not received in time".to_string(),
            ),
            413 => (
                "invalid_request_error",
                "request_too_large",
                format!("the request body is larger than {} MiB", MAX_BODY >> 20),
            ),
            404 => (
                "invalid_request_error",
                "unknown_url",
                "no such endpoint".to_string(),
            ),
            400..=499 => (
                "invalid_request_error",
                "bad_request",
                "the request is malformed".to_string(),
            ),
            _ => (
                "server_error",
                "internal_error",
                "the server failed".to_string(),
            ),
        };
        Self::new(status, kind, code, msg)
    }

    /// A failure from loading or running a tenant, classified by its cause.
    fn from_run(e: &anyhow::Error) -> Self {
        let msg = format!("{e:#}");
        match e.downcast_ref::<LimitError>() {
            Some(LimitError::Deadline(_)) => {
                return Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "deadline_exceeded",
                    msg,
                );
            }
            Some(LimitError::Memory(_)) => {
                return Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "server_error",
                    "memory_limit_exceeded",
                    msg,
                );
            }
            None => {}
        }
        match e.downcast_ref::<InferenceError>() {
            Some(InferenceError::ContextOverflow(_)) => {
                Self::invalid("context_length_exceeded", msg)
            }
            Some(InferenceError::InvalidInput(_)) => Self::invalid("invalid_value", msg),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                msg,
            ),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed from the clock, for requests that give none.
fn time_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn request_id(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{n:x}")
}

/// `stop`: a string or a list of up to 4.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Chat: `true`/`false`; completions: how many alternatives (0–20).
    logprobs: Option<Value>,
    /// Chat: alternatives per token (0–20), with `logprobs: true`.
    top_logprobs: Option<Value>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}`.
    response_format: Option<Value>,
    /// A GBNF grammar the output must match (llama.cpp server's extension).
    grammar: Option<String>,
    /// llama.cpp server's sampling extensions (and `realm:inference`'s parameters):
    /// top-k (0: off), min-p, the repetition penalty over the last `repeat_last_n` tokens,
    /// and generating past end-of-generation tokens. Unset, each is off.
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<u32>,
    ignore_eos: Option<bool>,
    /// OpenAI parameters that change the output and that Realm does not implement yet:
    /// read only to refuse them by name when set (serde would ignore them silently).
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
struct Unsupported {
    functions: Option<Value>,
    function_call: Option<Value>,
    echo: Option<Value>,
    best_of: Option<Value>,
    suffix: Option<Value>,
    logit_bias: Option<Value>,
    presence_penalty: Option<Value>,
    frequency_penalty: Option<Value>,
}

/// The output constraint of `response_format` (or `grammar`), if any.
fn constraint(s: &Sampling) -> ApiResult<Option<Constraint>> {
    let bad = |m: String| {
        let mut e = ApiError::invalid("invalid_value", m);
        e.param = Some("response_format");
        e
    };
    let from_format = match &s.response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(Constraint::JsonObject),
            Some("json_schema") => {
                let schema = f
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| bad("json_schema needs a `schema`".into()))?;
                Some(Constraint::JsonSchema(schema.to_string()))
            }
            other => {
                return Err(bad(format!(
                    "response_format type must be text, json_object or json_schema, not {other:?}"
                )));
            }
        },
    };
    match (&s.grammar, from_format) {
        (Some(_), Some(_)) => Err(bad("give either `grammar` or `response_format`".into())),
        (Some(g), None) => Ok(Some(Constraint::Gbnf(g.clone()))),
        (None, f) => Ok(f),
    }
}

impl Unsupported {
    /// A 400 naming the first parameter set to something Realm would otherwise ignore.
    fn check(&self) -> ApiResult<()> {
        let set = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Bool(true)) => true,
        };
        let checks: [(&'static str, bool); 8] = [
            ("functions", set(&self.functions)),
            ("function_call", set(&self.function_call)),
            ("echo", set(&self.echo)),
            (
                "best_of",
                set(&self.best_of) && self.best_of != Some(json!(1)),
            ),
            ("suffix", set(&self.suffix)),
            ("logit_bias", set(&self.logit_bias)),
            ("presence_penalty", set(&self.presence_penalty)),
            ("frequency_penalty", set(&self.frequency_penalty)),
        ];
        match checks.iter().find(|(_, on)| *on) {
            Some((name, _)) => Err(ApiError::unsupported(
                name,
                format!("'{name}' is not supported by this server yet; leave it unset"),
            )),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    /// An assistant's earlier tool calls, and a tool message's answer to one.
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// Message content: a string, or a list of parts of which text parts are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptField,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// Parse a JSON body into `T`, with OpenAI-shaped 400s for anything wrong.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "invalid_json",
            "the request body is empty",
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError::invalid("invalid_request", format!("invalid request: {e}")))
}

impl App {
    fn model_path(&self, name: &str) -> ApiResult<PathBuf> {
        self.config.models.get(name).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "the model '{name}' does not exist; served: {}",
                    self.config
                        .models
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }

    /// Validated generation parameters (OpenAI defaults: temperature 1, top-p 1).
    fn params(&self, s: &Sampling, model: &str, default_max: u32) -> ApiResult<Params> {
        s.unsupported.check()?;
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "invalid_value",
                "only n = 1 is supported",
            ));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "invalid_value",
                "temperature must be between 0 and 2",
            ));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "invalid_value",
                "top_p must be in (0, 1]",
            ));
        }
        let max = s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(default_max);
        if max == 0 {
            return Err(ApiError::invalid(
                "invalid_value",
                "max_tokens must be at least 1",
            ));
        }
        let stop = match &s.stop {
            None => Vec::new(),
            Some(Stop::One(x)) => vec![x.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "invalid_value",
                "stop takes up to 4 non-empty strings",
            ));
        }
        let min_p = s.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::invalid(
                "invalid_value",
                "min_p must be between 0 and 1",
            ));
        }
        let repeat_penalty = s.repeat_penalty.unwrap_or(1.0);
        if !(repeat_penalty > 0.0 && repeat_penalty <= 10.0) {
            return Err(ApiError::invalid(
                "invalid_value",
                "repeat_penalty must be in (0, 10]",
            ));
        }
        let neutral = realm_host::neutral_params();
        let ctx = self.n_ctx_train.get(model).copied().unwrap_or(u32::MAX);
        Ok(Params {
            max_tokens: max.min(self.config.max_tokens).min(ctx),
            temperature,
            top_p,
            top_k: s.top_k.unwrap_or(neutral.top_k),
            min_p,
            repeat_penalty,
            repeat_last_n: s.repeat_last_n.unwrap_or(neutral.repeat_last_n),
            ignore_eog: s.ignore_eos.unwrap_or(false),
            seed: s.seed.unwrap_or_else(time_seed),
            stop,
        })
    }
}

/// What a generation thread reports.
enum Piece {
    /// Text, the log-probabilities of the tokens behind it (when asked for), and the id
    /// of the token that completed it.
    Text(String, Vec<StepLogprobs>, u32),
    Done {
        finish: Option<FinishReason>,
        usage: Usage,
        /// Every generated id and its step's top-2 logit gap (`realm:inference`'s
        /// `tokens` and `margins`, which the NATS service passes on).
        tokens: Vec<u32>,
        margins: Vec<f32>,
    },
    Failed(ApiError),
}

/// Run one request as a fresh tenant on a blocking thread. The first message on `started`
/// says whether generation began (so the HTTP status can still be an error); pieces then
/// flow on `tx` until the end, an error, or the receiver going away (client disconnect),
/// which stops generation and drops the tenant.
/// What a generation starts from.
enum Input {
    Prompt(Prompt),
    /// An OpenAI-style chat as JSON text (with tools, tool calls and their results).
    Chat(String),
}

/// What one generation request asks for.
struct Job {
    prompt: Input,
    params: Params,
    /// Alternatives per token for log-probabilities (`None`: off).
    logprobs: Option<u32>,
    constraint: Option<Constraint>,
}

fn spawn_generation(
    app: Arc<App>,
    path: PathBuf,
    job: Job,
    permit: tokio::sync::OwnedSemaphorePermit,
    deadline: Instant,
) -> (oneshot::Receiver<ApiResult<()>>, mpsc::Receiver<Piece>) {
    let Job {
        prompt,
        params,
        logprobs,
        constraint,
    } = job;
    let (started_tx, started) = oneshot::channel();
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        let permit = permit;
        let mut tenant: Model = match app.tenant(&path) {
            Ok(m) => m,
            Err(e) => {
                let _ = started_tx.send(Err(ApiError::from_run(&e)));
                return;
            }
        };
        tenant.set_deadline_at(deadline, app.config.request_timeout);
        let mut session = match match app.config.prompt_cache {
            true => tenant.session_reusing(app.config.ctx_size),
            false => tenant.session(app.config.ctx_size),
        } {
            Ok(s) => s,
            Err(e) => {
                let _ = started_tx.send(Err(ApiError::from_run(&e)));
                return;
            }
        };
        let begun = match prompt {
            Input::Prompt(p) => session.generate(p, params),
            Input::Chat(c) => session.generate_chat(&c, params),
        };
        // (`map_err` consumes it, so that nothing of it outlives `generation`.)
        let mut generation = match begun.map_err(|e| ApiError::from_run(&e)) {
            Ok(g) => g,
            Err(e) => {
                let _ = started_tx.send(Err(e));
                return;
            }
        };
        if let Some(c) = constraint
            && let Err(e) = generation.constrain(c)
        {
            let _ = started_tx.send(Err(ApiError::from_run(&e)));
            return;
        }
        if let Some(top) = logprobs
            && let Err(e) = generation.want_logprobs(top)
        {
            let _ = started_tx.send(Err(ApiError::from_run(&e)));
            return;
        }
        if started_tx.send(Ok(())).is_err() {
            return;
        }
        loop {
            let steps = |g: &mut realm_host::Generation<'_>| match logprobs {
                Some(_) => g.take_logprobs(),
                None => Ok(Vec::new()),
            };
            let msg = match generation
                .next()
                .map(|c| c.and_then(|c| Ok((c, steps(&mut generation)?))))
            {
                Some(Ok((chunk, steps))) => Piece::Text(chunk.text, steps, chunk.token),
                Some(Err(e)) => {
                    tracing::warn!(target: "realm::serve", "generation stopped: {e:#}");
                    let _ = tx.blocking_send(Piece::Failed(ApiError::from_run(&e)));
                    return;
                }
                None => break,
            };
            if tx.blocking_send(msg).is_err() {
                tracing::debug!(target: "realm::serve", "client went away; generation cancelled");
                return;
            }
        }
        let ended = (|| {
            Ok::<_, anyhow::Error>(Piece::Done {
                finish: generation.finish_reason()?,
                usage: generation.usage()?,
                tokens: generation.tokens()?,
                margins: generation.margins()?,
            })
        })();
        let done = ended.unwrap_or_else(|e| Piece::Failed(ApiError::from_run(&e)));
        // The tenant and its session slot are freed before the client hears the end, so
        // a client that saw `[DONE]` finds the slot free (`/health`, the next request).
        drop(generation);
        if matches!(done, Piece::Done { .. }) && app.config.prompt_cache {
            session.keep();
        } else {
            drop(session);
        }
        if matches!(done, Piece::Done { .. }) {
            app.give_back(path, tenant);
        } else {
            drop(tenant);
        }
        drop(permit);
        let _ = tx.blocking_send(done);
    });
    (started, rx)
}

fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "length",
        Some(f) if finish_name(f) == "stop" || finish_name(f) == "eog" => "stop",
        _ => "stop",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Shared by both endpoints: admission, the tenant thread, then a JSON body or an SSE
/// stream built by `shape` (chat or completion).
async fn respond(
    app: Arc<App>,
    model: String,
    prompt: Prompt,
    sampling: &Sampling,
    default_max: u32,
    shape: Shape,
) -> ApiResult<Response> {
    // The request's deadline counts from its arrival, tenant start included.
    let arrived = Instant::now();
    let deadline = arrived + app.config.request_timeout;
    let path = app.model_path(&model)?;
    let params = app.params(sampling, &model, default_max)?;
    let (stream, include_usage) = (
        sampling.stream,
        sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    );
    let logprobs = shape.logprobs(sampling)?;
    let constraint = constraint(sampling)?;
    let permit = app.admit().await?;
    let job = Job {
        prompt: Input::Prompt(prompt),
        params,
        logprobs,
        constraint,
    };
    let (started, mut rx) = spawn_generation(app.clone(), path, job, permit, deadline);
    let late = || deadline_error(app.config.request_timeout);
    tokio::time::timeout_at(deadline.into(), started)
        .await
        .map_err(|_| late())?
        .map_err(|_| thread_gone())??;
    let id = request_id(shape.id_prefix());
    let created = now_s();
    let mut timing = Timing::new(&app, arrived);
    if !stream {
        let whole = async {
            let mut text = String::new();
            let mut steps = Vec::new();
            while let Some(p) = rx.recv().await {
                timing.piece(&p);
                match p {
                    Piece::Text(t, s, _) => {
                        text.push_str(&t);
                        steps.extend(s);
                    }
                    Piece::Done { finish, usage, .. } => {
                        let lp = logprobs.map(|_| shape.logprobs_json(&steps, 0));
                        return Ok(Json(
                            shape.whole(&id, created, &model, &text, finish, &usage, lp),
                        )
                        .into_response());
                    }
                    Piece::Failed(e) => return Err(e),
                }
            }
            Err(thread_gone())
        };
        // Dropping `rx` at the deadline stops the generation thread at its next piece.
        return tokio::time::timeout_at(deadline.into(), whole)
            .await
            .map_err(|_| late())?;
    }
    let budget = app.config.request_timeout;
    let (etx, erx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| Event::default().data(v.to_string());
        // Bytes of text streamed so far (completions' `text_offset`).
        let mut offset = 0;
        if let Some(first) = shape.first_chunk(&id, created, &model)
            && etx.send(Ok(send(first))).await.is_err()
        {
            return;
        }
        loop {
            let p = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => Piece::Failed(deadline_error(budget)),
            };
            timing.piece(&p);
            let ev = match p {
                Piece::Text(t, steps, _) => {
                    let lp = logprobs.map(|_| shape.logprobs_json(&steps, offset));
                    offset += t.len();
                    send(shape.chunk(&id, created, &model, &t, lp))
                }
                Piece::Done { finish, usage, .. } => {
                    let _ = etx
                        .send(Ok(send(shape.last_chunk(&id, created, &model, finish))))
                        .await;
                    if include_usage {
                        let _ = etx
                            .send(Ok(send(shape.usage_chunk(&id, created, &model, &usage))))
                            .await;
                    }
                    break;
                }
                Piece::Failed(e) => {
                    let _ = etx.send(Ok(send(e.body()))).await;
                    break;
                }
            };
            if etx.send(Ok(ev)).await.is_err() {
                // Dropping `rx` here stops the generation thread at its next piece.
                return;
            }
        }
        let _ = etx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(ReceiverStream::new(erx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A generation's latencies and token counts, into the server's metrics.
struct Timing {
    app: Arc<App>,
    arrived: Instant,
    last: Option<Instant>,
}

impl Timing {
    fn new(app: &Arc<App>, arrived: Instant) -> Self {
        Self {
            app: app.clone(),
            arrived,
            last: None,
        }
    }

    fn piece(&mut self, p: &Piece) {
        let m = &self.app.metrics;
        match p {
            Piece::Text(..) => {
                let now = Instant::now();
                match self.last {
                    None => m
                        .time_to_first_token
                        .observe((now - self.arrived).as_secs_f64()),
                    Some(t) => m.inter_token.observe((now - t).as_secs_f64()),
                }
                self.last = Some(now);
            }
            Piece::Done { usage, .. } => {
                m.prompt_tokens.inc_by(u64::from(usage.prompt_tokens));
                m.prompt_tokens_cached
                    .inc_by(u64::from(usage.cached_tokens));
                m.generated_tokens.inc_by(u64::from(usage.generated_tokens));
            }
            Piece::Failed(_) => {}
        }
    }
}

/// Response shapes of the two endpoints.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    fn id_prefix(self) -> &'static str {
        match self {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        }
    }

    /// Alternatives per token the request asks for (`None`: no log-probabilities). Chat
    /// takes `logprobs: true` and `top_logprobs` (0–20); completions `logprobs` (0–20).
    fn logprobs(self, s: &Sampling) -> ApiResult<Option<u32>> {
        let count = |v: &Value, name: &'static str| {
            v.as_u64()
                .filter(|&n| n <= 20)
                .map(|n| n as u32)
                .ok_or_else(|| {
                    let mut e = ApiError::invalid(
                        "invalid_value",
                        format!("{name} must be an integer from 0 to 20"),
                    );
                    e.param = Some(name);
                    e
                })
        };
        let top = match &s.top_logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(count(v, "top_logprobs")?),
        };
        match (self, &s.logprobs) {
            (Shape::Chat, None | Some(Value::Null) | Some(Value::Bool(false))) => {
                if top.is_some_and(|t| t > 0) {
                    let mut e =
                        ApiError::invalid("invalid_value", "top_logprobs needs logprobs: true");
                    e.param = Some("top_logprobs");
                    return Err(e);
                }
                Ok(None)
            }
            (Shape::Chat, Some(Value::Bool(true))) => Ok(Some(top.unwrap_or(0))),
            (Shape::Chat, Some(_)) => {
                let mut e = ApiError::invalid("invalid_value", "logprobs must be true or false");
                e.param = Some("logprobs");
                Err(e)
            }
            (Shape::Completion, None | Some(Value::Null)) => Ok(None),
            (Shape::Completion, Some(v)) => Ok(Some(count(v, "logprobs")?)),
        }
    }

    /// The `logprobs` object of a choice or chunk for `steps`, whose text starts `offset`
    /// bytes into the completion.
    fn logprobs_json(self, steps: &[StepLogprobs], offset: usize) -> Value {
        let text = |t: &TokenLogprob| String::from_utf8_lossy(&t.bytes).into_owned();
        match self {
            Shape::Chat => {
                let entry = |t: &TokenLogprob| json!({"token": text(t), "logprob": t.logprob, "bytes": t.bytes});
                let content: Vec<Value> = steps
                    .iter()
                    .map(|s| {
                        let mut v = entry(&s.chosen);
                        v["top_logprobs"] = s.top.iter().map(entry).collect();
                        v
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Shape::Completion => {
                let mut at = offset;
                let mut offsets = Vec::with_capacity(steps.len());
                for s in steps {
                    offsets.push(at);
                    at += s.chosen.bytes.len();
                }
                let top: Vec<Value> = steps
                    .iter()
                    .map(|s| {
                        let m: serde_json::Map<String, Value> =
                            s.top.iter().map(|t| (text(t), json!(t.logprob))).collect();
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "tokens": steps.iter().map(|s| text(&s.chosen)).collect::<Vec<_>>(),
                    "token_logprobs": steps.iter().map(|s| s.chosen.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn whole(
        self,
        id: &str,
        created: u64,
        model: &str,
        text: &str,
        finish: Option<FinishReason>,
        usage: &Usage,
        logprobs: Option<Value>,
    ) -> Value {
        match self {
            Shape::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": logprobs, "finish_reason": finish_str(finish)}],
                "usage": usage_json(usage),
            }),
            Shape::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": finish_str(finish)}],
                "usage": usage_json(usage),
            }),
        }
    }

    fn first_chunk(self, id: &str, created: u64, model: &str) -> Option<Value> {
        match self {
            Shape::Chat => Some(json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": null, "finish_reason": null}],
            })),
            Shape::Completion => None,
        }
    }

    fn chunk(
        self,
        id: &str,
        created: u64,
        model: &str,
        text: &str,
        logprobs: Option<Value>,
    ) -> Value {
        match self {
            Shape::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                             "finish_reason": null}],
            }),
            Shape::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": null}],
            }),
        }
    }

    fn last_chunk(self, id: &str, created: u64, model: &str, f: Option<FinishReason>) -> Value {
        match self {
            Shape::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {}, "logprobs": null,
                             "finish_reason": finish_str(f)}],
            }),
            Shape::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": "", "logprobs": null,
                             "finish_reason": finish_str(f)}],
            }),
        }
    }

    fn usage_chunk(self, id: &str, created: u64, model: &str, u: &Usage) -> Value {
        let object = match self {
            Shape::Chat => "chat.completion.chunk",
            Shape::Completion => "text_completion",
        };
        json!({"id": id, "object": object, "created": created, "model": model,
               "choices": [], "usage": usage_json(u)})
    }
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let req: ChatRequest = parse(&body)?;
    let messages = chat_messages(req.messages)?;
    let tools = Tools::from_request(req.tools, req.tool_choice)?;
    let with_tools = tools.is_some()
        || messages
            .iter()
            .any(|m| m.get("tool_calls").is_some() || m["role"] == "tool");
    let prompt = if with_tools {
        let defs = tools.as_ref().map(|t| t.defs.clone());
        Input::Chat(json!({"messages": messages, "tools": defs}).to_string())
    } else {
        Input::Prompt(plain_messages(&messages))
    };
    let max = app.config.max_tokens;
    respond_tools(app, req.model, prompt, &req.sampling, max, tools).await
}

/// A chat's messages as the template reads them: checked roles, text content (from a
/// string or text parts), `developer` as `system`, tool calls' arguments as objects.
fn chat_messages(input: Vec<ChatMessage>) -> ApiResult<Vec<Value>> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "invalid_value",
            "messages must not be empty",
        ));
    }
    let mut messages = Vec::with_capacity(input.len());
    for m in input {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                "invalid_value",
                format!("unknown message role '{}'", m.role),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            "invalid_value",
                            format!("content parts of type '{}' are not supported", p.kind),
                        ));
                    }
                    t.push_str(p.text.as_deref().unwrap_or(""));
                }
                t
            }
        };
        let role = if m.role == "developer" {
            "system".into()
        } else {
            m.role
        };
        let mut v = json!({"role": role, "content": content});
        if let Some(calls) = m.tool_calls {
            // Templates read the arguments as an object (OpenAI sends a JSON string).
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|mut c| {
                    if let Some(a) = c.pointer("/function/arguments").and_then(Value::as_str)
                        && let Ok(parsed) = serde_json::from_str::<Value>(a)
                    {
                        c["function"]["arguments"] = parsed;
                    }
                    c
                })
                .collect();
            v["tool_calls"] = json!(calls);
            if content.is_empty() {
                v["content"] = Value::Null;
            }
        }
        if let Some(id) = m.tool_call_id {
            v["tool_call_id"] = json!(id);
        }
        if let Some(n) = m.name {
            v["name"] = json!(n);
        }
        messages.push(v);
    }
    Ok(messages)
}

/// Checked messages (no tool calls) as a prompt.
fn plain_messages(messages: &[Value]) -> Prompt {
    Prompt::Messages(plain_list(messages))
}

/// Chat messages as `realm:inference` messages (role and text content).
fn plain_list(messages: &[Value]) -> Vec<Message> {
    messages
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap_or("").to_string(),
            content: m["content"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

/// A request's tools and what it asks of them.
struct Tools {
    /// The `tools` list as given (the template renders it).
    defs: Value,
    /// Function names, in order.
    names: Vec<String>,
    choice: ToolChoice,
}

#[derive(Debug, Clone, PartialEq)]
enum ToolChoice {
    /// Never parse calls out of the answer.
    None,
    /// The model decides: an answer that is a `<tool_call>` becomes `tool_calls`.
    Auto,
    /// A call to one of the tools (or to the named one) is required: the answer is
    /// constrained to one by a grammar built from the tools' parameter schemas.
    Required(Option<String>),
}

impl Tools {
    fn from_request(tools: Option<Vec<Value>>, choice: Option<Value>) -> ApiResult<Option<Self>> {
        let bad = |param: &'static str, m: String| {
            let mut e = ApiError::invalid("invalid_value", m);
            e.param = Some(param);
            e
        };
        let tools = tools.unwrap_or_default();
        let mut names = Vec::new();
        for t in &tools {
            let name = t
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty());
            match (t.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => names.push(n.to_string()),
                _ => {
                    return Err(bad(
                        "tools",
                        "each tool must be {\"type\": \"function\", \"function\": {\"name\", …}}"
                            .into(),
                    ));
                }
            }
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(c)) => match c.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required(None),
                other => return Err(bad("tool_choice", format!("unknown tool_choice {other:?}"))),
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if names.iter().any(|x| x == n) => ToolChoice::Required(Some(n.into())),
                Some(n) => return Err(bad("tool_choice", format!("no tool is named {n:?}"))),
                None => {
                    return Err(bad(
                        "tool_choice",
                        "tool_choice must name a function".into(),
                    ));
                }
            },
        };
        if tools.is_empty() {
            return match choice {
                ToolChoice::Required(_) => {
                    Err(bad("tool_choice", "tool_choice needs `tools`".into()))
                }
                _ => Ok(None),
            };
        }
        Ok(Some(Self {
            defs: Value::Array(tools),
            names,
            choice,
        }))
    }

    /// The GBNF grammar of one `<tool_call>{"name": …, "arguments": …}</tool_call>` whose
    /// arguments are valid against the chosen tools' parameter schemas.
    fn grammar(&self) -> ApiResult<Option<String>> {
        let ToolChoice::Required(only) = &self.choice else {
            return Ok(None);
        };
        let mut alts = Vec::new();
        for t in self.defs.as_array().into_iter().flatten() {
            let name = t
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let params = t
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or(json!({"type": "object"}));
            alts.push(json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
            }));
        }
        let schema = json!({"anyOf": alts});
        let call = realm_grammar::schema_to_gbnf(&schema).map_err(|e| {
            let mut e = ApiError::invalid("invalid_value", format!("tools: {e}"));
            e.param = Some("tools");
            e
        })?;
        let call = call.replacen("root ::= ", "call ::= ", 1);
        Ok(Some(format!(
            "root ::= \"<tool_call>\" [ \\n]? call \"</tool_call>\"\n{call}"
        )))
    }

    /// The calls in `text` (every `<tool_call>…</tool_call>` holding `{"name", "arguments"}`
    /// for a known tool), as OpenAI's `tool_calls`, and the text around them; `None` when
    /// the answer holds none.
    fn parse(&self, text: &str) -> Option<(Vec<Value>, String)> {
        if self.choice == ToolChoice::None {
            return None;
        }
        let (open, close) = ("<tool_call>", "</tool_call>");
        let mut calls = Vec::new();
        let mut rest = String::new();
        let mut t = text;
        while let Some(a) = t.find(open) {
            let after = &t[a + open.len()..];
            let b = after.find(close)?;
            let v: Value = serde_json::from_str(after[..b].trim()).ok()?;
            let name = v.get("name").and_then(Value::as_str)?;
            if !self.names.iter().any(|n| n == name) {
                return None;
            }
            let args = v.get("arguments").cloned().unwrap_or(json!({}));
            rest.push_str(&t[..a]);
            calls.push(json!({
                "id": format!("call_{:x}_{}", time_seed(), calls.len()),
                "type": "function",
                "function": {"name": name, "arguments": args.to_string()},
            }));
            t = &after[b + close.len()..];
        }
        rest.push_str(t);
        (!calls.is_empty()).then(|| (calls, rest.trim().to_string()))
    }
}

/// Chat with tools in play: the answer is collected whole (a stream gets it as one delta
/// at the end), tool calls parsed out of it. Without tools, [`respond`] as usual.
async fn respond_tools(
    app: Arc<App>,
    model: String,
    prompt: Input,
    sampling: &Sampling,
    default_max: u32,
    tools: Option<Tools>,
) -> ApiResult<Response> {
    let (tools, prompt) = match (tools, prompt) {
        (None, Input::Prompt(p)) => {
            return respond(app, model, p, sampling, default_max, Shape::Chat).await;
        }
        (tools, prompt) => (tools, prompt),
    };
    if sampling.grammar.is_some()
        || sampling
            .response_format
            .as_ref()
            .is_some_and(|f| f.get("type") != Some(&json!("text")))
    {
        let mut e = ApiError::invalid(
            "invalid_value",
            "tools cannot be combined with response_format or grammar",
        );
        e.param = Some("tools");
        return Err(e);
    }
    if Shape::Chat.logprobs(sampling)?.is_some() {
        let mut e = ApiError::invalid(
            "invalid_value",
            "logprobs cannot be combined with tools yet",
        );
        e.param = Some("logprobs");
        return Err(e);
    }
    let arrived = Instant::now();
    let path = app.model_path(&model)?;
    let params = app.params(sampling, &model, default_max)?;
    let constraint = match &tools {
        Some(t) => t.grammar()?.map(Constraint::Gbnf),
        None => None,
    };
    let permit = app.admit().await?;
    let job = Job {
        prompt,
        params,
        logprobs: None,
        constraint,
    };
    let (text, finish, usage) = whole_text(&app, path, job, permit, arrived).await?;
    let id = request_id("chatcmpl");
    let created = now_s();
    let (message, finish) = match tools.as_ref().and_then(|t| t.parse(&text)) {
        Some((calls, rest)) => (
            json!({"role": "assistant", "content": if rest.is_empty() { Value::Null } else { json!(rest) }, "tool_calls": calls}),
            "tool_calls",
        ),
        None => (
            json!({"role": "assistant", "content": text}),
            finish_str(finish),
        ),
    };
    if !sampling.stream {
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": usage_json(&usage),
        }))
        .into_response());
    }
    // One stream: the role, the whole answer (content, or the calls with their index),
    // the finish reason, usage when asked, [DONE].
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let mut delta = message.clone();
    if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for (i, c) in calls.iter_mut().enumerate() {
            c["index"] = json!(i);
        }
    }
    let mut events = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(delta, Value::Null),
        chunk(json!({}), json!(finish)),
    ];
    if sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage)
    {
        events.push(Shape::Chat.usage_chunk(&id, created, &model, &usage));
    }
    let stream = tokio_stream::iter(
        events
            .into_iter()
            .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
            .chain(std::iter::once(Ok(Event::default().data("[DONE]")))),
    );
    Ok(Sse::new(stream).into_response())
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let req: CompletionRequest = parse(&body)?;
    let prompt = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(ApiError::invalid(
                "invalid_value",
                "prompt must be one string (batches are not supported)",
            ));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "invalid_value",
            "prompt must not be empty",
        ));
    }
    // OpenAI's legacy default for completions is 16 tokens.
    respond(
        app,
        req.model,
        Prompt::Text(prompt),
        &req.sampling,
        16,
        Shape::Completion,
    )
    .await
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: PromptField,
    encoding_format: Option<String>,
    dimensions: Option<u32>,
}

/// `/v1/embeddings`: each input through a fresh tenant's model (mean-pooled final hidden
/// states, unit length), on a blocking thread under the same limits as generation.
async fn embeddings(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let req: EmbeddingRequest = parse(&body)?;
    let inputs = match req.input {
        PromptField::One(s) => vec![s],
        PromptField::Many(v) => v,
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_value",
                format!("encoding_format must be \"float\" or \"base64\", not \"{other}\""),
            ));
        }
    };
    if req.dimensions.is_some() {
        return Err(ApiError::invalid(
            "invalid_value",
            "dimensions cannot be changed for this model",
        ));
    }
    let (tokens, result) = embed_all(&app, &req.model, inputs).await?;
    let data: Vec<Value> = result
        .into_iter()
        .enumerate()
        .map(|(i, values)| {
            // base64: the little-endian f32 bytes, as OpenAI's clients decode them.
            let embedding = if base64 {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(values)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// Spin's remote LLM protocol (`[llm_compute] type = "remote_http"`): `/infer`.
#[derive(Debug, Deserialize)]
struct SpinInfer {
    model: String,
    prompt: String,
    options: Option<SpinOptions>,
}

/// Spin's `inferencing-params`, camelCase; missing fields take Spin's defaults.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpinOptions {
    max_tokens: Option<u32>,
    repeat_penalty: Option<f32>,
    repeat_penalty_last_n_token_count: Option<u32>,
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
}

async fn spin_infer(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let deadline = Instant::now() + app.config.request_timeout;
    let req: SpinInfer = parse(&body)?;
    if req.prompt.is_empty() {
        return Err(ApiError::invalid(
            "invalid_value",
            "prompt must not be empty",
        ));
    }
    let path = app.model_path(&req.model)?;
    let o = req.options.unwrap_or(SpinOptions {
        max_tokens: None,
        repeat_penalty: None,
        repeat_penalty_last_n_token_count: None,
        temperature: None,
        top_k: None,
        top_p: None,
    });
    if o.max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "invalid_value",
            "maxTokens must be at least 1",
        ));
    }
    let temperature = o.temperature.unwrap_or(0.8);
    let top_p = o.top_p.unwrap_or(0.9);
    let repeat_penalty = o.repeat_penalty.unwrap_or(1.1);
    let valid =
        (0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0 && repeat_penalty > 0.0;
    if !valid {
        return Err(ApiError::invalid(
            "invalid_value",
            "temperature must be in [0, 2], topP in (0, 1] and repeatPenalty positive",
        ));
    }
    let ctx = app.n_ctx_train.get(&req.model).copied().unwrap_or(u32::MAX);
    let params = Params {
        max_tokens: o
            .max_tokens
            .unwrap_or(100)
            .clamp(1, app.config.max_tokens)
            .min(ctx),
        temperature,
        top_k: o.top_k.unwrap_or(40),
        top_p,
        repeat_penalty,
        repeat_last_n: o.repeat_penalty_last_n_token_count.unwrap_or(64),
        seed: time_seed(),
        ..realm_host::neutral_params()
    };
    let permit = app.admit().await?;
    let job = Job {
        prompt: Input::Prompt(Prompt::Text(req.prompt)),
        params,
        logprobs: None,
        constraint: None,
    };
    let arrived = deadline - app.config.request_timeout;
    let (text, _, usage) = whole_text(&app, path, job, permit, arrived).await?;
    Ok(Json(json!({
        "text": text,
        "usage": {
            "promptTokenCount": usage.prompt_tokens,
            "generatedTokenCount": usage.generated_tokens,
        },
    }))
    .into_response())
}

/// Runs `job` to the end (or the request's deadline, counted from `arrived`): the whole
/// text, how it finished, and its usage.
async fn whole_text(
    app: &Arc<App>,
    path: PathBuf,
    job: Job,
    permit: tokio::sync::OwnedSemaphorePermit,
    arrived: Instant,
) -> ApiResult<(String, Option<FinishReason>, Usage)> {
    let deadline = arrived + app.config.request_timeout;
    let (started, mut rx) = spawn_generation(app.clone(), path, job, permit, deadline);
    let mut timing = Timing::new(app, arrived);
    let whole = async {
        started.await.map_err(|_| thread_gone())??;
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            timing.piece(&p);
            match p {
                Piece::Text(t, ..) => text.push_str(&t),
                Piece::Done { finish, usage, .. } => return Ok((text, finish, usage)),
                Piece::Failed(e) => return Err(e),
            }
        }
        Err(thread_gone())
    };
    tokio::time::timeout_at(deadline.into(), whole)
        .await
        .map_err(|_| deadline_error(app.config.request_timeout))?
}

/// Spin's remote protocol: `/embed` with `{model, input: [text]}`.
#[derive(Debug, Deserialize)]
struct SpinEmbed {
    model: String,
    input: Vec<String>,
}

async fn spin_embed(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    let req: SpinEmbed = parse(&body)?;
    let (tokens, vectors) = embed_all(&app, &req.model, req.input).await?;
    Ok(Json(json!({
        "embeddings": vectors,
        "usage": {"promptTokenCount": tokens},
    }))
    .into_response())
}

fn busy(app: &App) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "too_many_sessions",
        format!(
            "all {} sessions are busy; retry later",
            app.config.max_sessions
        ),
    );
    e.retry_after = Some(1);
    e
}

/// The 504 of a request that reached its deadline (the same as a tenant's own trap).
fn deadline_error(budget: Duration) -> ApiError {
    ApiError::from_run(&anyhow::Error::new(LimitError::Deadline(budget)))
}

fn thread_gone() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        "the generation thread ended without a result",
    )
}

/// Embeddings of `inputs` in one fresh tenant: (tokens, vectors).
/// `f` on a tenant of `model` on a blocking thread, under the same admission and deadline as
/// a generation (at the deadline the answer is a 504; the tenant's own deadline stops its
/// thread). The tenant is given back when `f` succeeds.
async fn on_tenant<R: Send + 'static>(
    app: &Arc<App>,
    model: &str,
    f: impl FnOnce(&mut Model) -> ApiResult<R> + Send + 'static,
) -> ApiResult<R> {
    let path = app.model_path(model)?;
    let permit = app.admit().await?;
    let deadline = Instant::now() + app.config.request_timeout;
    let worker = app.clone();
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut tenant = worker.tenant(&path).map_err(|e| ApiError::from_run(&e))?;
        tenant.set_deadline_at(deadline, worker.config.request_timeout);
        let out = f(&mut tenant)?;
        worker.give_back(path, tenant);
        Ok(out)
    });
    tokio::time::timeout_at(deadline.into(), job)
        .await
        .map_err(|_| deadline_error(app.config.request_timeout))?
        .map_err(|_| thread_gone())?
}

async fn embed_all(
    app: &Arc<App>,
    model: &str,
    inputs: Vec<String>,
) -> ApiResult<(u32, Vec<Vec<f32>>)> {
    if inputs.is_empty() || inputs.len() > 256 || inputs.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "invalid_value",
            "input must be a non-empty string or a list of 1 to 256 non-empty strings",
        ));
    }
    // Positions an input may take: --ctx-size where set, else the model's own context.
    let ctx = match app.config.ctx_size {
        0 => app.n_ctx_train.get(model).copied().unwrap_or(u32::MAX),
        n => n,
    };
    let result = on_tenant(app, model, move |tenant| {
        let mut out = Vec::with_capacity(inputs.len());
        for (i, t) in inputs.iter().enumerate() {
            let n = tenant
                .tokenize(t, true)
                .map_err(|e| ApiError::from_run(&e))?
                .len();
            if n > ctx as usize {
                return Err(ApiError::invalid(
                    "context_length_exceeded",
                    format!("input {i} is {n} tokens; this server's context is {ctx}"),
                ));
            }
            out.push(tenant.embed(t).map_err(|e| ApiError::from_run(&e))?);
        }
        Ok(out)
    })
    .await?;
    let tokens = result.iter().map(|e| e.tokens).sum();
    app.metrics.prompt_tokens.inc_by(u64::from(tokens));
    Ok((tokens, result.into_iter().map(|e| e.values).collect()))
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app
        .config
        .models
        .keys()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "realm"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "models": app.config.models.keys().collect::<Vec<_>>(),
        "sessions_in_use": app.config.max_sessions - app.sessions.available_permits(),
        "max_sessions": app.config.max_sessions,
    }))
}

async fn not_found() -> ApiError {
    ApiError::for_status(StatusCode::NOT_FOUND)
}

/// Bearer-token check on `/v1/*` (when `--api-key` is set).
async fn auth(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &app.config.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // Spin sends `bearer TOKEN`; the scheme is case-insensitive (RFC 9110).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                "missing or incorrect API key (Authorization: Bearer …)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

impl App {
    /// A session slot for one request. When all `--max-sessions` are busy the request
    /// waits for one, first come first served (a client that goes away leaves the
    /// queue); with `--max-queue` requests waiting already it gets the 429 that says
    /// when to retry, and one that waits past `--timeout` the 504.
    async fn admit(&self) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        let arrived = Instant::now();
        // Permits go to waiters in order as they are released, so this never jumps the
        // queue.
        if let Ok(p) = self.sessions.clone().try_acquire_owned() {
            self.metrics.queue_time.observe(0.0);
            return Ok(p);
        }
        /// Counts a request as waiting until it has its slot or is gone.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let ahead = self.queued.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.queued);
        if ahead >= self.config.max_queue {
            return Err(busy(self));
        }
        let deadline = arrived + self.config.request_timeout;
        match tokio::time::timeout_at(deadline.into(), self.sessions.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => {
                self.metrics
                    .queue_time
                    .observe(arrived.elapsed().as_secs_f64());
                Ok(p)
            }
            Ok(Err(_)) => Err(busy(self)),
            Err(_) => Err(deadline_error(self.config.request_timeout)),
        }
    }

    /// The request's `Origin` where CORS allows it.
    fn cors_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let o = origin.to_str().ok()?;
        let allowed = self.config.cors.iter().any(|c| c == "*" || c == o);
        allowed.then(|| origin.clone())
    }
}

/// Whether `e` (from reading a body) is the size cap.
fn over_limit(e: &axum::Error) -> bool {
    let mut err: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = err {
        if x.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        err = x.source();
    }
    false
}

/// The outermost layer of every request: its id (`x-request-id`, the client's when sane),
/// CORS, the body read under `--body-timeout` and [`MAX_BODY`], and an OpenAI-shaped body
/// on every error that a layer below the handlers produced (405, 413, a bad chunked body).
async fn edge(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let path = req.uri().path().to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| request_id("req"), str::to_string);
    let origin = app.cors_origin(req.headers());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Whether the connection must close after this answer (a body left unread).
    let mut close = true;
    let mut resp = if origin.is_some() && req.method() == Method::OPTIONS {
        close = false;
        // A browser's preflight: answered here, before the API key is asked for.
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, x-request-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else if declared.is_some_and(|n| n > MAX_BODY as u64) {
        ApiError::for_status(StatusCode::PAYLOAD_TOO_LARGE).into_response()
    } else {
        let (parts, body) = req.into_parts();
        let read = axum::body::to_bytes(body, MAX_BODY);
        match tokio::time::timeout(app.config.body_timeout, read).await {
            Err(_) => ApiError::for_status(StatusCode::REQUEST_TIMEOUT).into_response(),
            Ok(Err(e)) if over_limit(&e) => {
                ApiError::for_status(StatusCode::PAYLOAD_TOO_LARGE).into_response()
            }
            Ok(Err(_)) => ApiError::invalid(
                "bad_request",
                "the request body could not be read (bad framing or a dropped connection)",
            )
            .into_response(),
            Ok(Ok(bytes)) => {
                close = false;
                next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                    .await
            }
        }
    };
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !json {
        let allow = resp.headers().get(header::ALLOW).cloned();
        resp = ApiError::for_status(status).into_response();
        if let Some(a) = allow {
            resp.headers_mut().insert(header::ALLOW, a);
        }
    }
    let h = resp.headers_mut();
    if close {
        // The rest of that body will not be read: the connection cannot be reused.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    if let Some(o) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, retry-after"),
        );
    }
    app.metrics.answered(&path, resp.status().as_u16());
    app.metrics
        .duration
        .observe(arrived.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`: Prometheus' text format (behind `--api-key` when one is set).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let used = |max: usize, free: usize| i64::try_from(max.saturating_sub(free)).unwrap_or(0);
    m.sessions_in_use.set(used(
        app.config.max_sessions,
        app.sessions.available_permits(),
    ));
    m.sessions_max
        .set(i64::try_from(app.config.max_sessions).unwrap_or(0));
    m.queue_waiting
        .set(i64::try_from(app.queued.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0));
    m.connections_open.set(used(
        app.config.max_connections,
        app.connections.available_permits(),
    ));
    let b = app.engine.batched();
    m.batched_rounds
        .set(i64::try_from(b.rounds).unwrap_or(i64::MAX));
    m.batched_products
        .set(i64::try_from(b.products).unwrap_or(i64::MAX));
    m.batched_rows
        .set(i64::try_from(b.rows).unwrap_or(i64::MAX));
    m.batched_round_seconds.set(b.round_seconds);
    m.batched_product_seconds.set(b.product_seconds);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

fn router(app: Arc<App>) -> Router {
    let spin = Router::new()
        .route("/infer", post(spin_infer))
        .route("/embed", post(spin_embed))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    let v1 = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/embeddings", post(embeddings))
        .route("/models", get(models))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .nest("/v1", v1)
        .merge(spin)
        .route("/health", get(health))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(app.clone(), edge))
        .with_state(app)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// A connection over `--max-connections`: a 503 in OpenAI's shape, then closed.
async fn refuse(mut stream: tokio::net::TcpStream, cap: usize) {
    use tokio::io::AsyncWriteExt;
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "too_many_connections",
        format!("the server has {cap} connections open, its limit; retry later"),
    );
    e.retry_after = Some(1);
    let body = e.body().to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accept connections until the first signal, each under the header timeout (which also
/// ends idle keep-alive connections) and the connection cap; then let in-flight requests
/// finish for up to `--shutdown-grace` (a second signal exits at once).
async fn serve_connections(listener: tokio::net::TcpListener, app: Arc<App>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let conns = app.connections.clone();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(router(app.clone()));
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(target: "realm::serve", "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, app.config.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(app.config.header_timeout);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let open = app.config.max_connections - conns.available_permits();
    eprintln!(
        "realm serve: shutting down: {open} connection(s) open, {} s to finish \
         (a second signal exits now)",
        app.config.shutdown_grace.as_secs_f64()
    );
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("realm serve: second signal: exiting now");
        std::process::exit(130);
    });
    if tokio::time::timeout(app.config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        let open = app.config.max_connections - conns.available_permits();
        eprintln!("realm serve: grace period over; closing {open} connection(s)");
        // Half-read requests and unfinished streams end with the process.
        std::process::exit(0);
    }
}

/// A loaded server: the engine and its models, ready to answer requests.
pub struct Server(Arc<App>);

impl Server {
    /// Loads every model once (checking it) on an engine made from `config`.
    pub fn new(config: ServeConfig) -> anyhow::Result<Self> {
        let mut engine_config = config.engine.clone();
        if config.test_faults {
            engine_config
                .guest_env
                .push(("REALM_TEST_FAULTS".into(), "1".into()));
        }
        let engine = Engine::new(engine_config)?;
        let mut n_ctx_train = BTreeMap::new();
        let mut idle = BTreeMap::new();
        for (name, path) in &config.models {
            // A first tenant checks the file and maps it; later tenants share the mapping.
            // It waits for the first request.
            let m = engine
                .load_model(path)
                .with_context(|| format!("cannot load model '{name}' from {}", path.display()))?;
            n_ctx_train.insert(name.clone(), m.info.n_ctx_train);
            idle.entry(path.clone()).or_insert_with(Vec::new).push(m);
        }
        Ok(Self(Arc::new(App {
            engine,
            sessions: Arc::new(Semaphore::new(config.max_sessions.max(1))),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            metrics: metrics::Metrics::new(),
            n_ctx_train,
            idle: std::sync::Mutex::new(idle),
            queued: std::sync::atomic::AtomicUsize::new(0),
            config,
        })))
    }

    /// The HTTP API (every route and the edge middleware), to serve or to call in-process.
    pub fn router(&self) -> Router {
        router(self.0.clone())
    }
}

/// Load every model once (checking it), bind, and serve until SIGTERM / Ctrl-C.
pub fn run(config: ServeConfig) -> anyhow::Result<()> {
    let app = Server::new(config)?.0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let addr = format!("{}:{}", app.config.host, app.config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        // NATS first: once the address line is out, every way in is open.
        if let Some(url) = &app.config.nats {
            nats::start(app.clone(), url, app.config.nats_prefix.clone()).await?;
        }
        // The first line on stdout is the address (tests and scripts read it).
        println!("realm serve: listening on http://{local}");
        eprintln!(
            "realm serve: models {}; {} sessions at most; {} s per request{}",
            app.config
                .models
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            app.config.max_sessions,
            app.config.request_timeout.as_secs_f64(),
            if app.config.api_key.is_some() {
                "; API key required"
            } else {
                ""
            }
        );
        serve_connections(listener, app).await;
        anyhow::Ok(())
    });
    // Every connection has ended; blocking work still running is not waited for.
    rt.shutdown_timeout(Duration::from_millis(200));
    served
}

/// The error table: every failure a tenant can report, and every status produced below
/// the handlers, with the HTTP status and OpenAI error type and code it answers with.
#[cfg(test)]
mod error_table {
    use super::*;

    fn row(e: &ApiError) -> (u16, &'static str, &'static str) {
        (e.status.as_u16(), e.kind, e.code)
    }

    #[test]
    fn every_tenant_failure_has_its_status() {
        let inference = |e: InferenceError| anyhow::Error::new(e);
        let cases: Vec<(anyhow::Error, (u16, &str, &str))> = vec![
            (
                anyhow::Error::new(LimitError::Deadline(Duration::from_secs(2))),
                (504, "timeout", "deadline_exceeded"),
            ),
            (
                anyhow::Error::new(LimitError::Memory(1 << 20)),
                (507, "server_error", "memory_limit_exceeded"),
            ),
            (
                inference(InferenceError::ContextOverflow(
                    "the prompt is 9000 tokens".into(),
                )),
                (400, "invalid_request_error", "context_length_exceeded"),
            ),
            (
                inference(InferenceError::InvalidInput(
                    "top_p 7 is outside 0..=1".into(),
                )),
                (400, "invalid_request_error", "invalid_value"),
            ),
            // Models are checked when the server starts: a model that fails later, or a
            // compute failure, is the server's fault.
            (
                inference(InferenceError::NotFound("no model named 'x'".into())),
                (500, "server_error", "internal_error"),
            ),
            (
                inference(InferenceError::InvalidModel("tensor 'x' is missing".into())),
                (500, "server_error", "internal_error"),
            ),
            (
                inference(InferenceError::Unsupported("architecture 'mamba'".into())),
                (500, "server_error", "internal_error"),
            ),
            (
                inference(InferenceError::Compute("out of bounds: row 3".into())),
                (500, "server_error", "internal_error"),
            ),
            (
                anyhow::anyhow!("the generation thread panicked"),
                (500, "server_error", "internal_error"),
            ),
        ];
        for (e, want) in cases {
            let msg = format!("{e:#}");
            // The kind survives context added on the way up, and the message is kept.
            let wrapped = e.context("while generating");
            let api = ApiError::from_run(&wrapped);
            assert_eq!(row(&api), want, "{msg}");
            assert!(api.message.contains(&msg), "{} / {msg}", api.message);
        }
    }

    #[test]
    fn statuses_from_below_the_handlers_are_openai_errors() {
        let cases = [
            (404, (404, "invalid_request_error", "unknown_url")),
            (405, (405, "invalid_request_error", "method_not_allowed")),
            (408, (408, "invalid_request_error", "request_timeout")),
            (413, (413, "invalid_request_error", "request_too_large")),
            (400, (400, "invalid_request_error", "bad_request")),
            (431, (431, "invalid_request_error", "bad_request")),
            (500, (500, "server_error", "internal_error")),
        ];
        for (status, want) in cases {
            let s = StatusCode::from_u16(status).expect("a status");
            let e = ApiError::for_status(s);
            assert_eq!(row(&e), want);
            let body = e.body();
            assert_eq!(body["error"]["code"], want.2);
            assert!(!body["error"]["message"].as_str().unwrap_or("").is_empty());
        }
    }
}
