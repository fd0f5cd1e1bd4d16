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
