//! Helpers shared by the integration tests that drive the `realm` binary.

use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `realm`, run from the repository root as a user would (so `models/` is the default).
pub fn realm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_realm"));
    c.current_dir(root());
    c
}

/// `realm run --json --threads 2 ARGS…`, which must succeed; its JSON object.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = realm()
        .args(["run", "--json", "--threads", "2"])
        .args(args)
        .output()
        .expect("realm runs");
    assert!(
        out.status.success(),
        "realm run {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    serde_json::from_str(stdout.trim().lines().last().expect("a line")).expect("json")
}

/// Bytes as text (lossy), for messages and checks.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command's stdout, which must have succeeded (else both streams are shown).
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `realm ARGS…` from the repository root, its output.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn realm_output(args: &[&str]) -> std::process::Output {
    realm().args(args).output().expect("realm runs")
}

/// The default model's path, which `make models` fetches.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn smollm2() -> String {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `make models`", p.display());
    p.display().to_string()
}

/// A wasm32-wasip2 build output (a component), which `make test` builds.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn built(file: &str) -> String {
    let p = root().join("target/wasm32-wasip2/release").join(file);
    assert!(
        p.exists(),
        "{} is missing: `make test` builds it (cargo build --release --target wasm32-wasip2)",
        p.display()
    );
    p.display().to_string()
}

/// The native path's greedy text for a raw `prompt` (8 tokens, on the default model), with
/// `extra` options for `realm run`: what every adapter test compares against.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn native_raw_text(prompt: &str, extra: &[&str]) -> String {
    let model = smollm2();
    let mut args = vec!["run", "--raw", "--temp", "0", "-n", "8", "--model", &model];
    args.extend_from_slice(extra);
    args.push(prompt);
    ok(realm_output(&args)).trim_end().to_string()
}

/// A JSON array of numbers as f64.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// A JSON array of token ids.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

/// Where Realm's greedy run stands against llama.cpp's on one prompt.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub struct Parity {
    /// The first step where the ids differ (or one output stopped early).
    pub divergence: Option<usize>,
    /// The first step where llama.cpp's top-2 logit gap is below 0.02.
    pub near_tie: Option<usize>,
    /// The ids agree on every step before the first near-tie (the correctness bar).
    pub ok: bool,
    /// Largest |llama.cpp's top-2 gap − Realm's| over the steps before any divergence.
    pub max_gap_diff: f64,
}

/// Compares greedy ids up to the first near-tie (a top-2 gap below 0.02 in llama.cpp's run,
/// where tiny float differences may rightly pick the other token).
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn greedy_parity(want: &[u64], gaps: &[f64], got: &[u64], margins: &[f64]) -> Parity {
    let near_tie = gaps.iter().position(|&g| g < 0.02);
    let divergence = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .or((want.len() != got.len()).then(|| want.len().min(got.len())));
    let checked = near_tie.unwrap_or(want.len()).min(want.len());
    let max_gap_diff = gaps
        .iter()
        .zip(margins)
        .take(divergence.unwrap_or(usize::MAX))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    Parity {
        divergence,
        near_tie,
        ok: want[..checked] == got[..checked.min(got.len())],
        max_gap_diff,
    }
}

/// `realm serve --port 0 ARGS…` as a child (stdout piped, stderr inherited), once it says
/// it is listening: the child and its `host:port`.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn serve(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = realm()
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("realm serve starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the address line");
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .expect("an address")
        .to_string();
    assert!(
        line.contains("listening on") && addr.contains(':'),
        "unexpected first line: {line}"
    );
    (child, addr)
}

/// A child process killed on drop.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits (30 s at most) until something listens on 127.0.0.1:`port`.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn wait_port(port: u16, what: &str) {
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `bin` (a nats-server) on a free loopback port, its output to `log`; its URL.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn start_nats(bin: &str, log: std::process::Stdio) -> (Proc, String) {
    let port = free_port();
    let child = std::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let nats = Proc(child);
    wait_port(port, "nats-server");
    (nats, format!("nats://127.0.0.1:{port}"))
}

/// A two-thread tokio runtime for the NATS clients of a test.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An HTTP/1.x answer read to its end (the connection closed): its status and body.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module uses it"
)]
pub fn http_answer(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}
