//! `realm serve` on loopback: the official `openai` Python client, a 16-client load test,
//! malformed bodies, auth, client disconnects and tenant limits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A `realm serve --port 0` child, stopped (SIGTERM) on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let args: Vec<&str> = ["--threads", "2"].iter().chain(extra).copied().collect();
        let (child, addr) = common::serve(&args);
        Self { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 request; the status and body.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("send");
        // A server may answer (413) and close before an oversized body is all sent: the
        // write then fails with a broken pipe, and the answer is still there to read.
        if let Err(e) = s.write_all(body) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "send body: {e}"
            );
        }
        let mut out = Vec::new();
        if let Err(e) = s.read_to_end(&mut out) {
            assert!(!out.is_empty(), "no response: {e}");
        }
        common::http_answer(&out)
    }

    fn health(&self) -> serde_json::Value {
        let (status, body) = self.request("GET", "/health", &[], b"");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("health json")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: plain libc call on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// The venv Python with `openai` (made by `make test`), or `$REALM_TEST_PYTHON`.
fn python() -> PathBuf {
    let p = std::env::var_os("REALM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: `make test` creates it (python3 -m venv .venv && .venv/bin/pip install openai)",
        p.display()
    );
    p
}

/// Sessions are released as their threads end, just after the response: wait for it.
fn wait_idle(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.health()["sessions_in_use"] != 0 {
        assert!(Instant::now() < deadline, "a session was not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// Starts a streamed chat completion of `body` (with `headers`) and returns the connection
/// once the stream's first bytes (a 200) have come.
fn start_stream(server: &Server, body: &str, headers: &str) -> TcpStream {
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("first bytes");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("200"),
        "no stream started"
    );
    s
}

/// The value of the sample `name` (with its labels) in a `/metrics` text.
fn metric(m: &str, name: &str) -> f64 {
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
}

fn chat_body(content: &str, stream: bool, max_tokens: u32) -> String {
    serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": max_tokens, "stream": stream,
    })
    .to_string()
}

#[test]
fn the_official_openai_client_works() {
    let server = Server::start(&[]);
    let out = Command::new(python())
        .arg(common::root().join("tests/serve/openai_client.py"))
        .args([server.url().as_str(), MODEL])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sixteen_concurrent_streaming_clients_share_one_copy_of_the_weights() {
    let server = Server::start(&[]);
    let weights = std::fs::metadata(common::root().join("models").join(format!("{MODEL}.gguf")))
        .expect("model")
        .len();
    let out = Command::new(python())
        .arg(common::root().join("tests/serve/load.py"))
        .args([
            server.url().as_str(),
            MODEL,
            &server.pid().to_string(),
            &weights.to_string(),
        ])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load test failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("load test: {stdout}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().expect("a line")).expect("json");
    assert_eq!(v["requests_16"], 64);
    // Those texts (each equal to its lone request's) came from batched rounds: matmuls of
    // several tenants in one product.
    let (_, m) = server.request("GET", "/metrics", &[], b"");
    let value = |name: &str| metric(&m, name);
    let (products, rows) = (value("realm_batched_products"), value("realm_batched_rows"));
    assert!(
        products > 0.0 && rows >= 2.0 * products,
        "{products} products, {rows} rows"
    );
    assert!(value("realm_batched_rounds") > 0.0);
    // The rounds' time, and within it the shared products'.
    let (round, product) = (
        value("realm_batched_round_seconds"),
        value("realm_batched_product_seconds"),
    );
    assert!(
        round > 0.0 && product > 0.0 && product < round,
        "rounds {round} s, products {product} s"
    );
}

/// Fifty bodies that are not valid requests: every one a 4xx with an OpenAI error body;
/// the server still answers afterwards.
#[test]
fn malformed_requests_get_4xx_never_5xx() {
    let server = Server::start(&[]);
    let huge = "x".repeat(5 << 20);
    let mut bodies: Vec<(&str, String)> = vec![
        ("/v1/chat/completions", String::new()),
        ("/v1/chat/completions", "{".into()),
        ("/v1/chat/completions", "null".into()),
        ("/v1/chat/completions", "[]".into()),
        ("/v1/chat/completions", "42".into()),
        ("/v1/chat/completions", "\"text\"".into()),
        ("/v1/chat/completions", "{}".into()),
        ("/v1/chat/completions", r#"{"model": 5}"#.into()),
        ("/v1/chat/completions", format!(r#"{{"model": "{MODEL}"}}"#)),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": []}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": {{}}}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": [1]}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": [{{}}]}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": [{{"role": 1}}]}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model": "{MODEL}", "messages": [{{"role": "wizard", "content": "hi"}}]}}"#
            ),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": 7}}]}}"#),
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": [{{"type": "image_url"}}]}}]}}"#
            ),
        ),
        (
            "/v1/chat/completions",
            "{\"model\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}".into(),
        ),
        ("/v1/chat/completions", "\u{0}\u{1}\u{2}".into()),
        ("/v1/chat/completions", "{\"model\": \"\u{fffd}\"".into()),
        ("/v1/chat/completions", huge),
        ("/v1/completions", String::new()),
        ("/v1/completions", "{}".into()),
        ("/v1/completions", format!(r#"{{"model": "{MODEL}"}}"#)),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": ""}}"#),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": 3}}"#),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": ["a", "b"]}}"#),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": null}}"#),
        ),
        (
            "/v1/completions",
            r#"{"model": "nope", "prompt": "hi"}"#.into(),
        ),
        ("/v1/nothing-here", "{}".into()),
    ];
    let bad_params = [
        r#""temperature": -1"#,
        r#""temperature": 2.5"#,
        r#""temperature": "hot""#,
        r#""top_p": 0"#,
        r#""top_p": 1.5"#,
        r#""max_tokens": 0"#,
        r#""max_tokens": -3"#,
        r#""max_tokens": 1e99"#,
        r#""n": 2"#,
        r#""stop": ["a", "b", "c", "d", "e"]"#,
        r#""stop": [""]"#,
        r#""stop": 5"#,
        r#""seed": -1"#,
        r#""stream": "yes""#,
        r#""stream_options": 3"#,
    ];
    for p in bad_params {
        bodies.push((
            "/v1/chat/completions",
            format!(
                r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], {p}}}"#
            ),
        ));
    }
    for p in &bad_params[..5] {
        bodies.push((
            "/v1/completions",
            format!(r#"{{"model": "{MODEL}", "prompt": "hi", {p}}}"#),
        ));
    }
    assert_eq!(bodies.len(), 50);
    for (path, body) in &bodies {
        let (status, text) = server.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.as_bytes(),
        );
        assert!(
            (400..500).contains(&status),
            "{path} {:?} → {status} {text}",
            &body[..body.len().min(120)]
        );
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} {body:?}: non-JSON error body {text:?}: {e}"));
        assert!(v["error"]["message"].is_string(), "{text}");
        assert!(v["error"]["type"].is_string(), "{text}");
    }
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = chat_body("Hi", false, 2);
    let (status, text) = server.request("POST", "/v1/chat/completions", &[], body.as_bytes());
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"), "{text}");
    let (status, _) = server.request("GET", "/v1/models", &["Authorization: Bearer wrong"], b"");
    assert_eq!(status, 401);
    let (status, text) =
        server.request("GET", "/v1/models", &["Authorization: Bearer s3cret"], b"");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(MODEL), "{text}");
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &["Authorization: Bearer s3cret"],
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    // Health stays open (for load balancers).
    assert_eq!(server.health()["status"], "ok");
}

/// A client that goes away mid-stream frees its session; others are served meanwhile.
#[test]
fn a_disconnected_client_frees_its_session() {
    let server = Server::start(&[]);
    let body = chat_body("Tell me a very long story about a dragon.", true, 2000);
    let s = start_stream(&server, &body, "");
    assert_eq!(server.health()["sessions_in_use"], 1);
    drop(s);
    wait_idle(&server);
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat_body("What is the capital of France?", false, 8).as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
}

/// With every session busy a request waits for one (`realm_queue_waiting` counts it),
/// and is served when a slot frees; its wait is in `realm_queue_seconds`.
#[test]
fn a_request_waits_in_the_queue_for_a_session() {
    let server = Server::start(&["--max-sessions", "1", "--max-queue", "4"]);
    let long = start_stream(
        &server,
        &chat_body("Tell me a very long story about a dragon.", true, 2000),
        "",
    );
    let metric = |name: &str| metric(&server.request("GET", "/metrics", &[], b"").1, name);
    std::thread::scope(|scope| {
        let queued = scope.spawn(|| {
            server.request(
                "POST",
                "/v1/chat/completions",
                &[],
                chat_body("What is the capital of France?", false, 4).as_bytes(),
            )
        });
        let t = Instant::now();
        while metric("realm_queue_waiting") < 1.0 {
            assert!(t.elapsed() < Duration::from_secs(60), "never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(!queued.is_finished(), "served while the only slot was busy");
        drop(long);
        let (status, text) = queued.join().expect("client");
        assert_eq!(status, 200, "{text}");
    });
    assert_eq!(metric("realm_queue_waiting"), 0.0);
    assert_eq!(metric("realm_queue_seconds_count"), 2.0);
    assert!(metric("realm_queue_seconds_sum") >= 0.2);
}

/// A tenant's next request reuses the KV cache of the prefix it shares with the last one
/// (the default system prompt), and says so in `usage`; its text is the same as a server
/// without the prompt cache gives.
#[test]
fn the_prompt_cache_reuses_a_shared_prefix_without_changing_the_answer() {
    let ask = |server: &Server, q: &str| -> serde_json::Value {
        let (status, text) = server.request(
            "POST",
            "/v1/chat/completions",
            &[],
            chat_body(q, false, 12).as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("json")
    };
    let cached =
        |v: &serde_json::Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let (a, b) = ("What is the capital of France?", "Name three colours.");
    // One tenant: the second request finds the first's cache.
    let server = Server::start(&["--max-sessions", "1"]);
    assert_eq!(cached(&ask(&server, a)), Some(0));
    let reused = ask(&server, b);
    let n = cached(&reused).expect("cached_tokens");
    let prompt = reused["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    assert!(n >= 8 && n < prompt, "{reused}");
    drop(server);
    let fresh_server = Server::start(&["--no-prompt-cache"]);
    assert_eq!(cached(&ask(&fresh_server, a)), Some(0));
    let fresh = ask(&fresh_server, b);
    assert_eq!(cached(&fresh), Some(0), "{fresh}");
    assert_eq!(
        reused["choices"][0]["message"]["content"],
        fresh["choices"][0]["message"]["content"]
    );
}

/// A request past its deadline is stopped with 504 while the server keeps serving.
#[test]
fn the_request_deadline_stops_a_tenant() {
    let server = Server::start(&["--timeout", "0.5"]);
    let t = Instant::now();
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat_body("Tell me a very long story about a dragon.", false, 2000).as_bytes(),
    );
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("deadline_exceeded"), "{text}");
    // The answer comes at the deadline (counted from the request's arrival), not when the
    // tenant next notices it; the margin only absorbs a loaded test machine.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "answered after {:?}",
        t.elapsed()
    );
    // A stream ends at its deadline with the error as its last event.
    let t = Instant::now();
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat_body("Tell me a very long story about a dragon.", true, 2000).as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("deadline_exceeded") && text.contains("[DONE]"),
        "{text}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "ended after {:?}",
        t.elapsed()
    );
    wait_idle(&server);
    let (status, text) = server.request(
        "POST",
        "/v1/completions",
        &[],
        format!(r#"{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 2, "temperature": 0}}"#)
            .as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
}

/// Test-only faults (`--test-faults`): a guest that loops forever and one that allocates
/// without bound are stopped by their limits (504, 507) while another client's stream,
/// running at the same time, completes with the same text as when alone.
#[test]
fn runaway_tenants_are_stopped_while_others_complete() {
    let server = Server::start(&[
        "--test-faults",
        "--timeout",
        "8",
        "--max-guest-memory",
        "256M",
    ]);
    let ask = chat_body(
        "What is the capital of France? Answer in one word.",
        true,
        24,
    );
    let (status, alone) = server.request("POST", "/v1/chat/completions", &[], ask.as_bytes());
    assert_eq!(status, 200, "{alone}");
    let text_of = |sse: &str| -> String {
        sse.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    };
    let expected = text_of(&alone);
    assert!(expected.contains("Paris"), "{expected}");
    std::thread::scope(|s| {
        let looping = s.spawn(|| {
            server.request(
                "POST",
                "/v1/chat/completions",
                &[],
                chat_body("REALM_FAULT:loop", false, 8).as_bytes(),
            )
        });
        let hoarding = s.spawn(|| {
            server.request(
                "POST",
                "/v1/chat/completions",
                &[],
                chat_body("REALM_FAULT:alloc", false, 8).as_bytes(),
            )
        });
        // Started after the faulty ones, so it runs beside them.
        std::thread::sleep(Duration::from_millis(300));
        let (status, body) = server.request("POST", "/v1/chat/completions", &[], ask.as_bytes());
        assert_eq!(status, 200, "{body}");
        assert_eq!(text_of(&body), expected);
        let (status, body) = looping.join().expect("thread");
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("deadline_exceeded"), "{body}");
        let (status, body) = hoarding.join().expect("thread");
        assert_eq!(status, 507, "{body}");
        assert!(body.contains("memory_limit_exceeded"), "{body}");
    });
    wait_idle(&server);
}

/// Without `--test-faults` the hooks are inert: the text is just a prompt.
#[test]
fn fault_prompts_are_ordinary_text_without_the_test_flag() {
    let server = Server::start(&["--timeout", "60"]);
    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat_body("REALM_FAULT:loop", false, 4).as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
}

/// SIGTERM stops accepting but lets an in-flight stream finish: it ends with
/// `data: [DONE]`, and the server exits cleanly.
#[test]
fn sigterm_finishes_in_flight_streams() {
    let mut server = Server::start(&[]);
    let body = chat_body("Tell me a story about a dragon.", true, 48);
    let mut s = start_stream(&server, &body, "");
    // SAFETY: plain libc call on our own child's pid.
    unsafe { libc_kill(server.pid() as i32, 15) };
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: [DONE]"), "the stream was cut: {text}");
    assert!(
        text.contains("\"finish_reason\":\"length\"")
            || text.contains("\"finish_reason\":\"stop\""),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = server.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

/// Spin's remote LLM protocol (`[llm_compute] type = "remote_http"`), exact JSON shapes:
/// `POST /infer` and `POST /embed` with `authorization: bearer TOKEN`, as Spin sends them.
#[test]
fn spin_remote_llm_protocol() {
    let server = Server::start(&["--api-key", "spin-token"]);
    let auth = "authorization: bearer spin-token";
    let infer = serde_json::json!({
        "model": MODEL,
        "prompt": "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n",
        "options": {"maxTokens": 12, "repeatPenalty": 1.0, "repeatPenaltyLastNTokenCount": 64,
                    "temperature": 0.0, "topK": 40, "topP": 0.9},
    })
    .to_string();
    let (status, _) = server.request("POST", "/infer", &[], infer.as_bytes());
    assert_eq!(status, 401, "no token must be refused");
    let (status, body) = server.request("POST", "/infer", &[auth], infer.as_bytes());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["text", "usage"], "{body}");
    assert!(
        v["text"].as_str().expect("text").contains("Paris"),
        "{body}"
    );
    let usage = v["usage"].as_object().expect("usage");
    assert_eq!(
        usage.keys().collect::<Vec<_>>(),
        ["generatedTokenCount", "promptTokenCount"]
    );
    assert!(usage["promptTokenCount"].as_u64().expect("count") > 10);
    let generated = usage["generatedTokenCount"].as_u64().expect("count");
    assert!((1..=12).contains(&generated), "{body}");

    let embed =
        serde_json::json!({"model": MODEL, "input": ["hello world", "goodbye"]}).to_string();
    let (status, body) = server.request("POST", "/embed", &[auth], embed.as_bytes());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let e = v["embeddings"].as_array().expect("embeddings");
    assert_eq!(e.len(), 2);
    assert_eq!(
        e[0].as_array().expect("vector").len(),
        576,
        "SmolLM2's width"
    );
    assert!(
        v["usage"]["promptTokenCount"].as_u64().expect("count") >= 3,
        "{body}"
    );

    // Unknown model and bad options: 4xx with a message.
    let bad = serde_json::json!({"model": "nope", "prompt": "hi"}).to_string();
    let (status, _) = server.request("POST", "/infer", &[auth], bad.as_bytes());
    assert_eq!(status, 404);
    let bad =
        serde_json::json!({"model": MODEL, "prompt": "hi", "options": {"topP": 7.0}}).to_string();
    let (status, _) = server.request("POST", "/infer", &[auth], bad.as_bytes());
    assert_eq!(status, 400);
}

/// Sends `bytes` on a fresh connection and reads until the server closes it (or
/// `wait` passes): the whole response, headers included, and how long it took.
fn exchange(addr: &str, bytes: &[u8], wait: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).ok();
    let t = Instant::now();
    s.write_all(bytes).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

/// The status line's code, a header's value (lower-case name) and the JSON body.
fn parts(resp: &str) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (
        status,
        headers,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Waits for the child to exit; its status, or a panic naming `what` after `limit`.
fn exited(server: &mut Server, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = server.child.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that never finishes its headers does not hold up shutdown past the grace
/// period (it used to keep the server running for as long as it stayed connected).
#[test]
fn a_half_sent_request_does_not_hold_shutdown() {
    let mut server = Server::start(&["--shutdown-grace", "1", "--header-timeout", "120"]);
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: plain libc call on our own child's pid.
    unsafe { libc_kill(server.pid() as i32, 15) };
    let st = exited(
        &mut server,
        Duration::from_secs(15),
        "still running 15 s after SIGTERM",
    );
    assert!(st.success(), "exit status {st}");
}

/// A second SIGTERM exits at once, even with a stream in flight and a long grace period.
#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "300"]);
    let body = chat_body("Tell me a very long story about a dragon.", true, 2000);
    let _stream = start_stream(&server, &body, "");
    // SAFETY: plain libc calls on our own child's pid.
    unsafe { libc_kill(server.pid() as i32, 15) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "the first signal must let the stream finish"
    );
    unsafe { libc_kill(server.pid() as i32, 15) };
    let st = exited(
        &mut server,
        Duration::from_secs(15),
        "the second signal did not exit",
    );
    assert_eq!(st.code(), Some(130), "exit status {st}");
}

/// Headers, bodies and idle keep-alive connections each have a time limit, and the
/// number of open connections a cap; nothing of that needs an API key to reach.
#[test]
fn slow_idle_and_surplus_connections_are_closed() {
    let server = Server::start(&[
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--api-key",
        "k",
    ]);
    let limit = Duration::from_secs(20);
    // Partial headers, and silence: closed without an answer.
    for bytes in [&b"GET /health HTTP/1.1\r\nHost: x\r\n"[..], b""] {
        let (resp, took) = exchange(&server.addr, bytes, limit);
        assert!(took < Duration::from_secs(10), "open for {took:?}");
        assert!(resp.is_empty(), "{resp}");
    }
    // A body that stops coming: 408 in OpenAI's shape, then closed.
    let (resp, took) = exchange(
        &server.addr,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 100\r\n\r\n{\"model\"",
        limit,
    );
    assert!(took < Duration::from_secs(10), "open for {took:?}");
    let (status, headers, body) = parts(&resp);
    assert_eq!(status, 408, "{resp}");
    assert_eq!(body["error"]["code"], "request_timeout", "{resp}");
    assert_eq!(header(&headers, "connection"), Some("close"));
    // A keep-alive connection left idle after an answer is closed too.
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    s.set_read_timeout(Some(limit)).ok();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "idle for {:?}",
        t.elapsed()
    );

    let capped = Server::start(&["--max-connections", "2"]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&capped.addr).expect("connect");
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .expect("send");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (resp, _) = exchange(
        &capped.addr,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        limit,
    );
    let (status, headers, body) = parts(&resp);
    assert_eq!(status, 503, "{resp}");
    assert_eq!(body["error"]["code"], "too_many_connections", "{resp}");
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(capped.health()["status"], "ok");
}

/// Errors made below the handlers (wrong method, body too large or badly framed, an
/// unknown path) are OpenAI-shaped JSON too, and every answer carries a request id.
#[test]
fn every_error_is_openai_shaped_and_every_answer_has_a_request_id() {
    let server = Server::start(&[]);
    let wait = Duration::from_secs(60);
    let big = vec![b'a'; 5 << 20];
    let mut chunked =
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    chunked.extend(format!("{:x}\r\n", big.len()).as_bytes());
    chunked.extend(&big);
    chunked.extend(b"\r\n0\r\n\r\n");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
            "request_too_large",
        ),
        (chunked, 413, "request_too_large"),
        (
            b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
                .to_vec(),
            400,
            "bad_request",
        ),
        (
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            404,
            "unknown_url",
        ),
    ];
    for (bytes, want, code) in cases {
        let (resp, _) = exchange(&server.addr, &bytes, wait);
        let (status, headers, body) = parts(&resp);
        assert_eq!(status, want, "{resp}");
        assert_eq!(body["error"]["code"], code, "{resp}");
        assert!(body["error"]["message"].is_string(), "{resp}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/json"),
            "{resp}"
        );
        assert!(
            header(&headers, "x-request-id").is_some_and(|v| !v.is_empty()),
            "{resp}"
        );
    }
    // A client's own request id is kept.
    let (resp, _) = exchange(
        &server.addr,
        b"GET /health HTTP/1.1\r\nHost: x\r\nx-request-id: trace-42\r\nConnection: close\r\n\r\n",
        wait,
    );
    assert_eq!(
        header(&parts(&resp).1, "x-request-id"),
        Some("trace-42"),
        "{resp}"
    );
    assert_eq!(server.health()["status"], "ok");
}

/// Parameters that would change the answer and that Realm does not implement are refused
/// by name (they were ignored with a 200); their neutral values are accepted.
#[test]
fn unsupported_parameters_are_refused_by_name() {
    let server = Server::start(&[]);
    let chat = |extra: &str| {
        format!(
            r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 2, "temperature": 0, {extra}}}"#
        )
    };
    for (extra, param) in [
        (r#""functions": [{"name": "f"}]"#, "functions"),
        (r#""logit_bias": {"42": 5}"#, "logit_bias"),
        (r#""presence_penalty": 0.5"#, "presence_penalty"),
        (r#""frequency_penalty": 0.5"#, "frequency_penalty"),
    ] {
        let (status, text) =
            server.request("POST", "/v1/chat/completions", &[], chat(extra).as_bytes());
        assert_eq!(status, 400, "{extra}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["error"]["param"], param, "{text}");
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{text}");
    }
    // Log-probabilities and response formats are supported; malformed requests for them
    // name the parameter.
    for (extra, param) in [
        (r#""response_format": {"type": "yaml"}"#, "response_format"),
        (
            r#""response_format": {"type": "json_schema"}"#,
            "response_format",
        ),
        (r#""top_logprobs": 3"#, "top_logprobs"),
        (r#""logprobs": 3"#, "logprobs"),
        (r#""logprobs": true, "top_logprobs": 21"#, "top_logprobs"),
        (
            r#""logprobs": true, "tools": [{"type": "function", "function": {"name": "f"}}]"#,
            "logprobs",
        ),
    ] {
        let (status, text) =
            server.request("POST", "/v1/chat/completions", &[], chat(extra).as_bytes());
        assert_eq!(status, 400, "{extra}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["error"]["param"], param, "{text}");
        assert_eq!(v["error"]["code"], "invalid_value", "{text}");
    }
    for extra in [
        r#""response_format": {"type": "text"}"#,
        r#""logprobs": false"#,
        r#""presence_penalty": 0"#,
        r#""tools": []"#,
    ] {
        let (status, text) =
            server.request("POST", "/v1/chat/completions", &[], chat(extra).as_bytes());
        assert_eq!(status, 200, "{extra}: {text}");
    }
    for (extra, param) in [
        (r#""echo": true"#, "echo"),
        (r#""best_of": 2"#, "best_of"),
        (r#""suffix": "end""#, "suffix"),
        (r#""logprobs": 21"#, "logprobs"),
    ] {
        let body = format!(r#"{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 2, {extra}}}"#);
        let (status, text) = server.request("POST", "/v1/completions", &[], body.as_bytes());
        assert_eq!(status, 400, "{extra}: {text}");
        assert!(text.contains(&format!("\"param\":\"{param}\"")), "{text}");
    }
    // Spin's /infer agrees with /v1 about zero tokens.
    let body = format!(r#"{{"model": "{MODEL}", "prompt": "Hi", "options": {{"maxTokens": 0}}}}"#);
    let (status, text) = server.request("POST", "/infer", &[], body.as_bytes());
    assert_eq!(status, 400, "{text}");
}

/// 429s (all sessions busy and no room in the queue) say when to retry; CORS is off
/// unless asked for, then answers the browser's preflight before the API key is checked
/// and marks the allowed origin's answers.
#[test]
fn retry_after_and_cors() {
    let server = Server::start(&[
        "--max-sessions",
        "1",
        "--max-queue",
        "0",
        "--api-key",
        "k",
        "--cors",
        "https://app.example",
    ]);
    let body = chat_body("Tell me a very long story about a dragon.", true, 2000);
    let s = start_stream(&server, &body, "Authorization: Bearer k\r\n");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    let (resp, _) = exchange(&server.addr, req.as_bytes(), Duration::from_secs(60));
    let (status, headers, _) = parts(&resp);
    assert_eq!(status, 429, "{resp}");
    assert_eq!(header(&headers, "retry-after"), Some("1"), "{resp}");
    drop(s);

    let preflight = |origin: &str| {
        let req = format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n"
        );
        parts(&exchange(&server.addr, req.as_bytes(), Duration::from_secs(60)).0)
    };
    let (status, headers, _) = preflight("https://app.example");
    assert_eq!(status, 204);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        header(&headers, "access-control-allow-headers")
            .is_some_and(|h| h.contains("authorization"))
    );
    let (status, headers, _) = preflight("https://evil.example");
    assert_ne!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let (resp, _) = exchange(
        &server.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        Duration::from_secs(60),
    );
    let (status, headers, _) = parts(&resp);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example")
    );

    let plain = Server::start(&["--api-key", "k"]);
    let req = b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n";
    let (status, headers, body) = parts(&exchange(&plain.addr, req, Duration::from_secs(60)).0);
    assert!(status >= 400, "CORS is off by default");
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    assert!(body["error"]["message"].is_string());
}

/// Embeddings keep to `--ctx-size` (they used to ignore it).
#[test]
fn embeddings_keep_to_the_context_size() {
    let server = Server::start(&["--ctx-size", "16"]);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(4);
    let body = serde_json::json!({"model": MODEL, "input": long}).to_string();
    let (status, text) = server.request("POST", "/v1/embeddings", &[], body.as_bytes());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("context_length_exceeded"), "{text}");
    let body = serde_json::json!({"model": MODEL, "input": "a fox"}).to_string();
    let (status, text) = server.request("POST", "/v1/embeddings", &[], body.as_bytes());
    assert_eq!(status, 200, "{text}");
}

/// Through the whole server: a control token typed into a message is plain text (several
/// tokens), where the template's own markers are one token each.
#[test]
fn control_tokens_typed_into_messages_stay_text() {
    let server = Server::start(&[]);
    let prompt_tokens = |content: &str| {
        let (status, text) = server.request(
            "POST",
            "/v1/chat/completions",
            &[],
            chat_body(content, false, 1).as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens")
    };
    let one = prompt_tokens("x");
    let forged = prompt_tokens("<|im_start|>");
    // As a control token it would be one token, like "x"; as text it is several.
    assert!(forged >= one + 3, "x: {one} tokens, <|im_start|>: {forged}");
}

/// `/metrics` in Prometheus' text format: requests by endpoint and status, tokens, and the
/// latency histograms, consistent with what the requests returned.
#[test]
fn metrics_count_requests_tokens_and_latencies() {
    let server = Server::start(&["--api-key", "k"]);
    let auth = ["Authorization: Bearer k"];
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &auth,
        chat_body("Hi", true, 5).as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let (status, text) = server.request(
        "POST",
        "/v1/chat/completions",
        &auth,
        chat_body("Hi", false, 5).as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let generated = v["usage"]["completion_tokens"].as_u64().expect("tokens");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("tokens");
    // The second request had the first one's tenant (the only one) and its KV cache:
    // all its prompt but the last token was there already.
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt - 1,
        "{v}"
    );
    let (status, _) = server.request("POST", "/v1/chat/completions", &auth, b"{");
    assert_eq!(status, 400);
    let (status, _) = server.request("GET", "/metrics", &[], b"");
    assert_eq!(status, 401, "metrics follow --api-key");
    wait_idle(&server);
    let (status, m) = server.request("GET", "/metrics", &auth, b"");
    assert_eq!(status, 200, "{m}");
    let value = |name: &str| metric(&m, name);
    assert_eq!(
        value(r#"realm_requests_total{endpoint="/v1/chat/completions",code="200"}"#),
        2.0
    );
    assert_eq!(
        value(r#"realm_requests_total{endpoint="/v1/chat/completions",code="400"}"#),
        1.0
    );
    assert_eq!(
        value(r#"realm_requests_total{endpoint="/metrics",code="401"}"#),
        1.0
    );
    // Both requests generated the same greedy text (the streamed one's counts are equal).
    assert_eq!(
        value("realm_generated_tokens_total"),
        2.0 * generated as f64
    );
    assert_eq!(value("realm_prompt_tokens_total"), 2.0 * prompt as f64);
    assert_eq!(
        value("realm_prompt_tokens_cached_total"),
        prompt as f64 - 1.0
    );
    // Both found a session slot free at once.
    assert_eq!(value("realm_queue_seconds_count"), 2.0);
    assert_eq!(value("realm_queue_seconds_sum"), 0.0);
    assert_eq!(value("realm_queue_waiting"), 0.0);
    assert_eq!(value("realm_time_to_first_token_seconds_count"), 2.0);
    assert!(value("realm_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(
        value("realm_inter_token_seconds_count"),
        2.0 * (generated as f64 - 1.0)
    );
    assert_eq!(value("realm_sessions_in_use"), 0.0);
    assert_eq!(value("realm_sessions_max"), 64.0);
    assert!(value("realm_connections_open") >= 1.0);
}

/// Constrained output on both models: every output under a JSON Schema parses and
/// validates (`jsonschema`), JSON mode gives objects, a GBNF grammar is matched, and
/// schemas or grammars that cannot be kept are 400s (`tests/serve/structured.py`).
#[test]
fn structured_output_always_validates_on_both_models() {
    let gemma = common::root().join("models/gemma-3-270m-q4_k_m.gguf");
    let smol = format!("smollm2={}", common::smollm2());
    let gemma = format!("gemma3={}", gemma.display());
    let server = Server::start(&["--model", &smol, "--model", &gemma]);
    let out = Command::new(python())
        .arg(common::root().join("tests/serve/structured.py"))
        .args([server.url().as_str(), "smollm2", "gemma3"])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "structured output checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}
