//! An HTTP workload that answers a question through `realm:inference`: `POST /` with the
//! question as the body (query: `model`, default `$REALM_MODEL`; `max_tokens`, default
//! 64; `temperature`, default 0: greedy; `ignore_eos=1` to generate past the end;
//! `json=1` for a JSON object as the answer; `logprobs=N` for each token's log-probability
//! and the N most likely ones; `stream=1` for the text itself as plain text, each piece
//! written as it is generated, a failure after the first piece as a last line `[error:
//! KIND: MESSAGE]`). Otherwise the answer is JSON: `{"text", "finish_reason", "tokens",
//! "prompt_tokens"}` (and `"logprobs"`), or `{"error": {"kind", "message"}}` with 400 (a
//! bad request), 404 (no such model) or 502 (Realm failed or is unreachable).
//!
//! `POST /inspect` shows the rest of the interface on the body's text: the model's info,
//! its tokens and their text again, the chat template's rendering of it as a user message,
//! and its embedding (`{"values", "tokens"}`).
//!
//! It knows nothing of NATS or wasmCloud: plugged with `adapters/wasmcloud` it runs on a
//! wasmCloud host against `realm serve --nats` servers; plugged with the Realm component
//! it would run anywhere `realm:inference` is served locally.

wit_bindgen::generate!({
    path: "wit",
    world: "ask",
    generate_all,
});

use realm::inference::runtime::Model;
use realm::inference::types::{Constraint, Error, FinishReason, Message, Params, Prompt};
use serde_json::{Value, json};
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Questions longer than this are refused (the body is read into memory).
const MAX_BODY: usize = 64 * 1024;

struct Ask;

wasi::http::proxy::export!(Ask);

impl wasi::exports::http::incoming_handler::Guest for Ask {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let mut out = Some(out);
        let (status, body) = match answer(&request, &mut out) {
            Ok(v) => (200, v),
            Err((status, kind, message)) => {
                (status, json!({"error": {"kind": kind, "message": message}}))
            }
        };
        // A streamed answer has taken `out` already.
        if let Some(out) = out {
            respond(out, status, &body);
        }
    }
}

type Failure = (u16, &'static str, String);

fn bad(message: impl Into<String>) -> Failure {
    (400, "invalid-input", message.into())
}

/// Realm's error as an HTTP status and the variant's name.
fn realm_error(e: Error) -> Failure {
    match e {
        Error::NotFound(m) => (404, "not-found", m),
        Error::InvalidInput(m) => (400, "invalid-input", m),
        Error::ContextOverflow(m) => (400, "context-overflow", m),
        Error::Unsupported(m) => (400, "unsupported", m),
        Error::InvalidModel(m) => (502, "invalid-model", m),
        Error::Compute(m) => (502, "compute", m),
    }
}

fn query(request: &IncomingRequest) -> Vec<(String, String)> {
    let path = request.path_with_query().unwrap_or_default();
    let Some((_, q)) = path.split_once('?') else {
        return Vec::new();
    };
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, Failure> {
    let body = request
        .consume()
        .map_err(|()| bad("the request body was already read"))?;
    let stream = body
        .stream()
        .map_err(|()| bad("the request body cannot be read"))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(16 * 1024) {
            Ok(chunk) => bytes.extend(chunk),
            Err(wasi::io::streams::StreamError::Closed) => break,
            Err(e) => return Err(bad(format!("reading the request body: {e:?}"))),
        }
        if bytes.len() > MAX_BODY {
            return Err(bad(format!("the question is longer than {MAX_BODY} bytes")));
        }
    }
    Ok(bytes)
}

fn answer(request: &IncomingRequest, out: &mut Option<ResponseOutparam>) -> Result<Value, Failure> {
    let q = query(request);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let number = |k: &str, default: f64| -> Result<f64, Failure> {
        get(k).map_or(Ok(default), |v| {
            v.parse().map_err(|_| bad(format!("{k} must be a number")))
        })
    };
    let model = get("model")
        .or_else(|| std::env::var("REALM_MODEL").ok())
        .ok_or_else(|| bad("no model: give ?model=NAME or set REALM_MODEL"))?;
    let max_tokens = number("max_tokens", 64.0)? as u32;
    let temperature = number("temperature", 0.0)? as f32;
    let logprobs = get("logprobs")
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| bad("logprobs must be 0 to 20"))
        })
        .transpose()?;
    let question = String::from_utf8(read_body(request)?)
        .map_err(|_| bad("the question must be UTF-8 text"))?;
    if question.trim().is_empty() {
        return Err(bad("POST the question as the request body"));
    }

    let model = Model::load(&model).map_err(realm_error)?;
    let user = vec![Message {
        role: "user".into(),
        content: question.clone(),
    }];
    if request
        .path_with_query()
        .unwrap_or_default()
        .starts_with("/inspect")
    {
        return inspect(&model, &question, &user);
    }
    let session = model.session(0).map_err(realm_error)?;
    let params = Params {
        max_tokens,
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 0,
        stop: Vec::new(),
        ignore_eog: get("ignore_eos").as_deref() == Some("1"),
    };
    let generation = session
        .generate(&Prompt::Messages(user), &params)
        .map_err(realm_error)?;
    if get("json").as_deref() == Some("1") {
        generation
            .constrain(&Constraint::JsonObject)
            .map_err(realm_error)?;
    }
    if let Some(top) = logprobs {
        generation.want_logprobs(top);
    }
    if get("stream").as_deref() == Some("1") {
        // Errors before the first piece are still a status; later ones end the text.
        let first = generation.next().map_err(realm_error)?;
        if let Some(out) = out.take() {
            stream(out, first, || generation.next().map_err(realm_error));
        }
        return Ok(Value::Null);
    }
    let mut text = String::new();
    let mut steps = Vec::new();
    while let Some(chunk) = generation.next().map_err(realm_error)? {
        text.push_str(&chunk.text);
        steps.extend(generation.take_logprobs());
    }
    let finish = match generation.finish_reason() {
        Some(FinishReason::Eog) => "eog",
        Some(FinishReason::Stop) => "stop",
        Some(FinishReason::Length) => "length",
        None => "",
    };
    let mut v = json!({
        "text": text,
        "finish_reason": finish,
        "tokens": generation.tokens(),
        "prompt_tokens": generation.usage().prompt_tokens,
    });
    if logprobs.is_some() {
        let entry = |t: &realm::inference::types::TokenLogprob| json!({"token": t.token, "logprob": t.logprob});
        v["logprobs"] = steps
            .iter()
            .map(|s| json!({"chosen": entry(&s.chosen), "top": s.top.iter().map(entry).collect::<Vec<_>>()}))
            .collect();
    }
    Ok(v)
}

/// `/inspect`: the model's info, the text's tokens and their text again, the template's
/// rendering of it as a user message, and its embedding.
fn inspect(model: &Model, text: &str, user: &[Message]) -> Result<Value, Failure> {
    let info = model.info();
    let tokens = model.tokenize(text, true).map_err(realm_error)?;
    let again = model.detokenize(&tokens).map_err(realm_error)?;
    let rendered = model.apply_template(user, true).map_err(realm_error)?;
    let embedding = model.embed(text).map_err(realm_error)?;
    Ok(json!({
        "info": {
            "name": info.name, "architecture": info.architecture, "n_vocab": info.n_vocab,
            "n_ctx_train": info.n_ctx_train, "n_layer": info.n_layer, "n_embd": info.n_embd,
            "n_head": info.n_head, "n_head_kv": info.n_head_kv, "tokenizer": info.tokenizer,
            "weight_bytes": info.weight_bytes,
        },
        "tokens": tokens,
        "detokenized": again,
        "template": rendered,
        "embedding": {"values": embedding.values, "tokens": embedding.tokens},
    }))
}

/// A 200 text/plain answer: `first`, then each piece `next` gives, written as it comes;
/// a failure ends it with a line `[error: KIND: MESSAGE]`.
fn stream(
    out: ResponseOutparam,
    first: Option<realm::inference::types::Chunk>,
    mut next: impl FnMut() -> Result<Option<realm::inference::types::Chunk>, Failure>,
) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(body) = outgoing.write() {
        let mut piece = Ok(first);
        loop {
            let text = match piece {
                Ok(Some(c)) => c.text,
                Ok(None) => break,
                Err((_, kind, message)) => {
                    let _ = write_all(&body, format!("\n[error: {kind}: {message}]\n").as_bytes());
                    break;
                }
            };
            if write_all(&body, text.as_bytes()).is_err() {
                // The client went away: dropping the generation stops it.
                break;
            }
            piece = next();
        }
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

/// `blocking-write-and-flush` takes at most 4096 bytes a call.
fn write_all(stream: &wasi::io::streams::OutputStream, bytes: &[u8]) -> Result<(), ()> {
    for piece in bytes.chunks(4096) {
        stream.blocking_write_and_flush(piece).map_err(|_| ())?;
    }
    Ok(())
}

fn respond(out: ResponseOutparam, status: u16, body: &Value) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"application/json".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = outgoing.write() {
        let _ = write_all(&stream, body.to_string().as_bytes());
    }
    let _ = OutgoingBody::finish(outgoing, None);
}
