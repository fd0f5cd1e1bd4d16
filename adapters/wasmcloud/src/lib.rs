//! `realm:inference` over `wasmcloud:messaging`: every call becomes a NATS request to the
//! Realm servers on the lattice (`realm serve --nats`; the subjects are documented in
//! `server/src/nats.rs`), so that a component written against `realm:inference` runs
//! unchanged on a wasmCloud host. Composed with such a component, the result imports
//! `wasmcloud:messaging/consumer@0.2.0` (which the host serves over its data NATS
//! connection) instead of `realm:inference`.
//!
//! Configuration comes from the component's environment (`wasi:cli/environment`, a
//! workload's `localResources.environment` on wasmCloud):
//! - `REALM_NATS_PREFIX`: the servers' `--nats-prefix` (default `realm`);
//! - `REALM_NATS_TIMEOUT_MS`: how long one request may wait for its answer (default
//!   30000), and `REALM_NATS_NEXT_TIMEOUT_MS` for a generation's `next` (default 3000: a
//!   server answers it within about a second, so a longer silence means it is gone);
//! - `REALM_API_KEY`: sent with every request when the servers have `--api-key`.
//!
//! What differs from a local model:
//! - A generation starts on the server at the first `next` (or `tokens`, `usage`, …), so
//!   that `want-logprobs` and `constrain` called before it apply to all of it; the
//!   request's own errors (a prompt too long, a bad parameter) come from that call.
//! - `want-logprobs` and `constrain` after the first `next` cannot reach the running
//!   generation: the first records nothing more, the second is an `unsupported` error.
//! - A session is the server's: its context size is the server's `--ctx-size` (the
//!   `n-ctx` asked for is not sent), and a conversation that extends an earlier one is
//!   served from the server's prompt cache where its tenant still holds the prefix.
//! - `margins` is known once the generation has finished (empty before).
//! - A server that dies mid-generation makes the next `next` a `compute` error at once
//!   (NATS "no responders"), never a hang; any other server takes the next request.

wit_bindgen::generate!({
    path: "wit",
    world: "adapter",
    generate_all,
});

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use exports::realm::inference::runtime::{
    Generation, Guest, GuestGeneration, GuestModel, GuestSession, Model, Session,
};
use exports::realm::inference::types::{
    Chunk, Constraint, Embedding, Error, FinishReason, Message, ModelInfo, Params, Prompt,
    StepLogprobs, TokenLogprob, Usage,
};
use serde_json::{Value, json};
use wasmcloud::messaging::consumer;

struct Adapter;

export!(Adapter);

impl Guest for Adapter {
    type Model = RemoteModel;
    type Session = RemoteSession;
    type Generation = RemoteGeneration;
}

/// The subject of `what` under the servers' prefix.
fn subject(what: &str) -> String {
    let prefix = std::env::var("REALM_NATS_PREFIX").unwrap_or_else(|_| "realm".into());
    format!("{prefix}.{what}")
}

/// A timeout from the environment variable `var`, in milliseconds.
fn timeout_ms(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(default)
}

/// One request/reply on `subject`: the answer's JSON, or its `error` as `realm:inference`'s
/// error (a NATS failure, such as no server answering, is a `compute` error naming the
/// subject).
fn call(subject: &str, body: Value) -> Result<Value, Error> {
    call_within(subject, body, timeout_ms("REALM_NATS_TIMEOUT_MS", 30_000))
}

fn call_within(subject: &str, mut body: Value, timeout: u32) -> Result<Value, Error> {
    if let Ok(key) = std::env::var("REALM_API_KEY") {
        body["api_key"] = json!(key);
    }
    let bytes = body.to_string().into_bytes();
    let reply = consumer::request(subject, &bytes, timeout)
        .map_err(|e| Error::Compute(format!("Realm over NATS ({subject}): {e}")))?;
    let v: Value = serde_json::from_slice(&reply.body).map_err(|e| {
        Error::Compute(format!(
            "Realm over NATS ({subject}): a reply that is not JSON: {e}"
        ))
    })?;
    match v.get("error") {
        None => Ok(v),
        Some(e) => Err(remote_error(e)),
    }
}

/// A server's `{"code", "message"}` as the WIT's error variant.
fn remote_error(e: &Value) -> Error {
    let code = e["code"].as_str().unwrap_or("");
    let message = e["message"].as_str().unwrap_or("").to_string();
    match code {
        "model_not_found" => Error::NotFound(message),
        "context_length_exceeded" => Error::ContextOverflow(message),
        "unsupported_parameter" => Error::Unsupported(message),
        "invalid_value" | "invalid_json" | "invalid_api_key" | "bad_request" => {
            Error::InvalidInput(message)
        }
        _ => Error::Compute(format!("{code}: {message}")),
    }
}

fn malformed(what: &str) -> Error {
    Error::Compute(format!("Realm over NATS: malformed {what} reply"))
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

fn messages_json(messages: &[Message]) -> Value {
    messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect()
}

pub struct RemoteModel {
    name: String,
    info: ModelInfo,
}

impl RemoteModel {
    fn ask(&self, what: &str, mut body: Value) -> Result<Value, Error> {
        body["model"] = json!(self.name);
        call(&subject(what), body)
    }
}

impl GuestModel for RemoteModel {
    /// Asks a server for the model's info, which also says that the name is served.
    fn load(name: String) -> Result<Model, Error> {
        let i = call(&subject("info"), json!({"model": name}))?;
        let info = ModelInfo {
            name: str_of(&i["name"]),
            architecture: str_of(&i["architecture"]),
            n_vocab: u32_of(&i["n_vocab"]),
            n_ctx_train: u32_of(&i["n_ctx_train"]),
            n_layer: u32_of(&i["n_layer"]),
            n_embd: u32_of(&i["n_embd"]),
            n_head: u32_of(&i["n_head"]),
            n_head_kv: u32_of(&i["n_head_kv"]),
            tokenizer: str_of(&i["tokenizer"]),
            chat_template: str_of(&i["chat_template"]),
            weight_bytes: i["weight_bytes"].as_u64().unwrap_or(0),
        };
        Ok(Model::new(RemoteModel { name, info }))
    }

    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn tokenize(&self, text: String, add_special: bool) -> Result<Vec<u32>, Error> {
        let r = self.ask(
            "tokenize",
            json!({"text": text, "add_special": add_special}),
        )?;
        ids(&r["tokens"]).ok_or_else(|| malformed("tokenize"))
    }

    fn detokenize(&self, ids: Vec<u32>) -> Result<String, Error> {
        let r = self.ask("detokenize", json!({"tokens": ids}))?;
        r["text"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| malformed("detokenize"))
    }

    fn apply_template(
        &self,
        messages: Vec<Message>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let body = json!({
            "messages": messages_json(&messages),
            "add_generation_prompt": add_generation_prompt,
        });
        let r = self.ask("template", body)?;
        r["text"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| malformed("template"))
    }

    fn embed(&self, text: String) -> Result<Embedding, Error> {
        let r = self.ask("embed", json!({"input": text}))?;
        let values = r["data"][0]["embedding"]
            .as_array()
            .ok_or_else(|| malformed("embed"))?
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| malformed("embed"))?;
        Ok(Embedding {
            values,
            tokens: u32_of(&r["usage"]["prompt_tokens"]),
        })
    }

    fn session(&self, _n_ctx: u32) -> Result<Session, Error> {
        Ok(Session::new(RemoteSession {
            model: self.name.clone(),
            n_past: Rc::new(Cell::new(0)),
        }))
    }
}

fn ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

pub struct RemoteSession {
    model: String,
    /// Positions the last generation used (prompt and generated tokens).
    n_past: Rc<Cell<u32>>,
}

impl RemoteSession {
    fn start(&self, input: (&str, Value), p: Params) -> Generation {
        let mut body = json!({
            "model": self.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_k": p.top_k,
            "top_p": p.top_p,
            "min_p": p.min_p,
            "repeat_penalty": p.repeat_penalty,
            "repeat_last_n": p.repeat_last_n,
            "seed": p.seed,
            "ignore_eos": p.ignore_eog,
        });
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        body[input.0] = input.1;
        Generation::new(RemoteGeneration(RefCell::new(State {
            request: Some(body),
            next: String::new(),
            cancel: String::new(),
            queue: VecDeque::new(),
            steps: Vec::new(),
            tokens: Vec::new(),
            margins: Vec::new(),
            finish: None,
            usage: None,
            failed: None,
            n_past: self.n_past.clone(),
        })))
    }
}

impl GuestSession for RemoteSession {
    fn generate(&self, prompt: Prompt, params: Params) -> Result<Generation, Error> {
        let input = match prompt {
            Prompt::Text(t) => ("prompt", json!(t)),
            Prompt::Messages(m) => ("messages", messages_json(&m)),
        };
        Ok(self.start(input, params))
    }

    fn generate_chat(&self, chat: String, params: Params) -> Result<Generation, Error> {
        Ok(self.start(("chat", json!(chat)), params))
    }

    fn n_past(&self) -> u32 {
        self.n_past.get()
    }
}

/// A generation on some server: the request until it starts, then its subjects and
/// what arrived.
pub struct RemoteGeneration(RefCell<State>);

struct State {
    /// The generate request, until it is sent.
    request: Option<Value>,
    next: String,
    cancel: String,
    /// Pieces received and not yet handed out.
    queue: VecDeque<Chunk>,
    /// Log-probability steps not yet taken.
    steps: Vec<StepLogprobs>,
    tokens: Vec<u32>,
    margins: Vec<f32>,
    finish: Option<FinishReason>,
    /// Set once the server said it is done.
    usage: Option<Usage>,
    /// The error that ended it (returned again by later `next` calls).
    failed: Option<Error>,
    n_past: Rc<Cell<u32>>,
}

impl State {
    /// Sends the request if it was not yet sent.
    fn start(&mut self) -> Result<(), Error> {
        let Some(body) = self.request.take() else {
            return Ok(());
        };
        let r = call(&subject("generate"), body)?;
        match (r["next"].as_str(), r["cancel"].as_str()) {
            (Some(n), Some(c)) => {
                self.next = n.to_string();
                self.cancel = c.to_string();
                Ok(())
            }
            _ => Err(malformed("generate")),
        }
    }

    /// One `next` round trip: what arrived goes into the queue.
    fn pull(&mut self) -> Result<(), Error> {
        let timeout = timeout_ms("REALM_NATS_NEXT_TIMEOUT_MS", 3_000);
        let r = call_within(&self.next, json!({}), timeout)?;
        for p in r["pieces"].as_array().into_iter().flatten() {
            let token = u32_of(&p["token"]);
            self.tokens.push(token);
            self.queue.push_back(Chunk {
                text: str_of(&p["text"]),
                token,
            });
        }
        for s in r["logprobs"].as_array().into_iter().flatten() {
            let top = s["top"].as_array().into_iter().flatten();
            self.steps.push(StepLogprobs {
                chosen: logprob(&s["chosen"]),
                top: top.map(logprob).collect(),
            });
        }
        if r["done"] == json!(true) {
            self.finish = match r["finish_reason"].as_str() {
                Some("eog") => Some(FinishReason::Eog),
                Some("stop") => Some(FinishReason::Stop),
                Some("length") => Some(FinishReason::Length),
                _ => None,
            };
            if let Some(t) = ids(&r["tokens"]) {
                self.tokens = t;
            }
            self.margins = r["margins"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m.as_f64().unwrap_or(0.0) as f32)
                .collect();
            let u = &r["usage"];
            let usage = Usage {
                prompt_tokens: u32_of(&u["prompt_tokens"]),
                cached_tokens: u32_of(&u["prompt_tokens_details"]["cached_tokens"]),
                generated_tokens: u32_of(&u["completion_tokens"]),
                prefill_ns: 0,
                decode_ns: 0,
                constraint_ns: 0,
            };
            self.n_past
                .set(usage.prompt_tokens.saturating_add(usage.generated_tokens));
            self.usage = Some(usage);
        }
        Ok(())
    }

    /// Starts the generation if needed; a failure ends it.
    fn ensure_started(&mut self) -> Result<(), Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.start().inspect_err(|e| self.failed = Some(e.clone()))
    }
}

fn logprob(v: &Value) -> TokenLogprob {
    TokenLogprob {
        token: u32_of(&v["token"]),
        bytes: v["bytes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b.as_u64().unwrap_or(0) as u8)
            .collect(),
        logprob: v["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
    }
}

impl GuestGeneration for RemoteGeneration {
    fn next(&self) -> Result<Option<Chunk>, Error> {
        let mut s = self.0.borrow_mut();
        s.ensure_started()?;
        loop {
            if let Some(c) = s.queue.pop_front() {
                return Ok(Some(c));
            }
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            if s.usage.is_some() {
                return Ok(None);
            }
            // A `next` answers within about a second, with or without text.
            if let Err(e) = s.pull() {
                s.failed = Some(e.clone());
                return Err(e);
            }
        }
    }

    fn finish_reason(&self) -> Option<FinishReason> {
        self.0.borrow().finish
    }

    fn usage(&self) -> Usage {
        let s = self.0.borrow();
        s.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            cached_tokens: 0,
            generated_tokens: s.tokens.len() as u32,
            prefill_ns: 0,
            decode_ns: 0,
            constraint_ns: 0,
        })
    }

    fn tokens(&self) -> Vec<u32> {
        self.0.borrow().tokens.clone()
    }

    fn margins(&self) -> Vec<f32> {
        self.0.borrow().margins.clone()
    }

    fn want_logprobs(&self, top: u32) {
        if let Some(r) = self.0.borrow_mut().request.as_mut() {
            r["logprobs"] = json!(true);
            r["top_logprobs"] = json!(top.min(20));
        }
    }

    fn take_logprobs(&self) -> Vec<StepLogprobs> {
        std::mem::take(&mut self.0.borrow_mut().steps)
    }

    fn constrain(&self, c: Constraint) -> Result<(), Error> {
        let mut s = self.0.borrow_mut();
        let Some(r) = s.request.as_mut() else {
            return Err(Error::Unsupported(
                "over NATS, a constraint must be set before the first next()".into(),
            ));
        };
        match c {
            Constraint::Gbnf(g) => r["grammar"] = json!(g),
            Constraint::JsonSchema(schema) => {
                let schema: Value = serde_json::from_str(&schema)
                    .map_err(|e| Error::InvalidInput(format!("JSON Schema: {e}")))?;
                r["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}});
            }
            Constraint::JsonObject => r["response_format"] = json!({"type": "json_object"}),
        }
        Ok(())
    }
}

impl Drop for RemoteGeneration {
    /// A generation dropped before its end (or after a `next` that failed, e.g. timed out
    /// on a slow server) is cancelled on its server, best effort: a server that is gone
    /// has dropped it already, and NATS says so at once.
    fn drop(&mut self) {
        let s = self.0.get_mut();
        if !s.cancel.is_empty() && s.usage.is_none() {
            let _ = call(&s.cancel, json!({}));
        }
    }
}
