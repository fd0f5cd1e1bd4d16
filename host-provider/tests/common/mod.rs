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
