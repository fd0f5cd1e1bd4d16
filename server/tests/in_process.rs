//! The HTTP API called in-process (no socket): the router with its edge middleware over a
//! real engine and the default model, one request per row of the error table that a
//! client can reach, and a real answer.
//!
//! Needs `make models` and the release guest component (`make test` builds both first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use realm_server::{ServeConfig, Server};
use serde_json::{Value, json};
use tower::ServiceExt;

fn server() -> Server {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} is missing: run `make models`",
        model.display()
    );
    Server::new(ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        models: BTreeMap::from([("smollm2".to_string(), model)]),
        engine: realm_host::EngineConfig {
            threads: 2,
            ..realm_host::EngineConfig::default()
        },
        api_key: None,
        max_sessions: 4,
        request_timeout: Duration::from_secs(60),
        max_tokens: 16,
        ctx_size: 64,
        prompt_cache: true,
        max_queue: 8,
        test_faults: false,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(30),
        max_connections: 16,
        shutdown_grace: Duration::from_secs(1),
        cors: Vec::new(),
        nats: None,
        nats_prefix: "realm".into(),
    })
    .expect("the server loads the model")
}

/// `method path body` through the router: the status and the JSON body.
async fn call(s: &Server, method: Method, path: &str, body: String) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let resp = s.router().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_and_refuses_in_process() {
    let s = server();
    let (status, body) = call(&s, Method::GET, "/health", String::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let q = "What is the capital of France? Answer in one word.";
    let (status, body) = call(&s, Method::POST, "/v1/chat/completions", chat(q, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert!(text.contains("Paris"), "{body}");

    // llama.cpp server's sampling fields: top_k 1 at temperature 1 is greedy whatever the
    // seed; ignore_eos generates past the end of the answer.
    for seed in [1, 2] {
        let extra = json!({"temperature": 1.0, "top_k": 1, "seed": seed});
        let (status, top1) = call(&s, Method::POST, "/v1/chat/completions", chat(q, extra)).await;
        assert_eq!(status, StatusCode::OK, "{top1}");
        assert_eq!(top1["choices"][0]["message"]["content"], text, "{top1}");
    }
    let extra = json!({"ignore_eos": true, "max_tokens": 16});
    let (status, long) = call(&s, Method::POST, "/v1/chat/completions", chat(q, extra)).await;
    assert_eq!(status, StatusCode::OK, "{long}");
    assert_eq!(long["usage"]["completion_tokens"], 16, "{long}");
    assert_eq!(long["choices"][0]["finish_reason"], "length", "{long}");

    // Each row a client can reach: (method, path, body, status, error code).
    let long = "word ".repeat(200);
    let chat_path = "/v1/chat/completions";
    let rows: Vec<(Method, &str, String, u16, &str)> = vec![
        (
            Method::POST,
            chat_path,
            chat(&long, json!({})),
            400,
            "context_length_exceeded",
        ),
        (
            Method::POST,
            chat_path,
            chat(q, json!({"top_p": 7})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            chat_path,
            chat(q, json!({"min_p": 2})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            chat_path,
            chat(q, json!({"repeat_penalty": 0})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            chat_path,
            chat(q, json!({"model": "nope"})),
            404,
            "model_not_found",
        ),
        (
            Method::POST,
            chat_path,
            chat(q, json!({"logit_bias": {"1": 2}})),
            400,
            "unsupported_parameter",
        ),
        (
            Method::POST,
            chat_path,
            "{".to_string(),
            400,
            "invalid_json",
        ),
        (
            Method::GET,
            chat_path,
            String::new(),
            405,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v2/nothing",
            String::new(),
            404,
            "unknown_url",
        ),
        (
            Method::POST,
            "/v1/completions",
            "x".repeat(5 << 20),
            413,
            "request_too_large",
        ),
    ];
    for (method, path, body, want, code) in rows {
        let (status, got) = call(&s, method.clone(), path, body).await;
        assert_eq!(status.as_u16(), want, "{method} {path}: {got}");
        assert_eq!(got["error"]["code"], code, "{method} {path}: {got}");
    }
}

/// A request's tenant is given back when it ends cleanly and serves the next request: the
/// answers are the ones fresh tenants give (the sessions, KV caches and activations of the
/// earlier request are gone), and `/metrics` counts the reuse and the start times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_reused_without_carrying_anything_over() {
    let s = server();
    let questions = [
        "What is the capital of France? Answer in one word.",
        "Name a color of the rainbow.",
        "What is the capital of France? Answer in one word.",
    ];
    let mut answers = Vec::new();
    for q in questions {
        let (status, body) =
            call(&s, Method::POST, "/v1/chat/completions", chat(q, json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        answers.push(body["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(answers[0], answers[2]);
    assert_ne!(answers[0], answers[1]);
    let req = Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let resp = s.router().oneshot(req).await.expect("infallible");
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} is missing:\n{text}"))
    };
    // The tenant loaded at start served all three requests.
    assert_eq!(value("realm_tenants_reused_total"), 3.0, "{text}");
    assert_eq!(value("realm_tenant_start_seconds_count"), 3.0, "{text}");
    let mean = value("realm_tenant_start_seconds_sum") / 3.0;
    println!(
        "mean tenant start over 3 reused tenants: {:.3} ms",
        mean * 1e3
    );
}
