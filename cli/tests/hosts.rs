//! The self-contained component (`realm-standalone.wasm`: the Realm component with
//! `realm:compute` in WebAssembly and a command, composed by
//! `adapters/compute-wasm/realm-standalone.wac`) on other hosts: the stock `wasmtime` CLI,
//! Python's `wasmtime` package, Node through `jco`, and `realm run-wasm`. Each must give
//! the native path's greedy ids (or text, where the host prints text).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{built, ok, root, text};

fn standalone() -> String {
    built("realm-standalone.wasm")
}

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const QUESTION: &str = "What is the capital of France? Answer in one word.";

fn run_in_root(program: &str, args: &[&str]) -> Output {
    assert!(
        root().join(MODEL).exists(),
        "{MODEL} is missing: run `make models`"
    );
    Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// The native path: `realm run --json`, greedy, 8 tokens.
fn native() -> (Vec<u64>, String) {
    let realm = env!("CARGO_BIN_EXE_realm");
    let out = ok(run_in_root(
        realm,
        &[
            "run", "--json", "--temp", "0", "-n", "8", "--model", MODEL, QUESTION,
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let ids = v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|i| i.as_u64())
        .collect();
    (ids, v["text"].as_str().expect("text").to_string())
}

#[test]
fn python_wasmtime_host_gives_the_native_greedy_ids() {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "`make test` creates .venv with the `wasmtime` package"
    );
    let out = ok(run_in_root(
        python.to_str().expect("utf-8"),
        &[
            "tests/hosts/python_host.py",
            &standalone(),
            "models",
            MODEL,
            QUESTION,
            "8",
        ],
    ));
    assert_native(&out);
}

/// `{"ids": [...], "text": ...}` from a host script: the ids and text must be native's.
fn assert_native(out: &str) {
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let ids: Vec<u64> = v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|i| i.as_u64())
        .collect();
    let (want_ids, want_text) = native();
    assert_eq!(ids, want_ids);
    assert_eq!(v["text"], want_text.as_str());
    assert!(want_text.contains("Paris"), "{want_text}");
}

#[test]
fn node_jco_host_gives_the_native_greedy_ids() {
    let script = root().join("tests/hosts/node/node_host.mjs");
    assert!(
        root()
            .join("tests/hosts/node/out/realm-standalone.js")
            .exists(),
        "`make test` transpiles the component with jco (`make node-host`)"
    );
    let out = ok(run_in_root(
        "node",
        &[
            script.to_str().expect("utf-8"),
            "models",
            MODEL,
            QUESTION,
            "8",
        ],
    ));
    assert_native(&out);
}

/// A run of the standalone command (`--timings` adds the ids on stderr): its text and ids
/// must be the native path's.
fn assert_native_command(out: Output) {
    let stderr = text(&out.stderr);
    let stdout = ok(out);
    let ids: Vec<u64> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no ids in: {stderr}"));
    let (want_ids, want_text) = native();
    assert_eq!(ids, want_ids);
    assert_eq!(stdout.trim_end(), want_text);
}

/// The command's arguments: greedy, 8 tokens, ids and timings on stderr.
fn command_args(first: &[&'static str]) -> Vec<String> {
    let mut v: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    v.extend([
        standalone(),
        "--model".into(),
        MODEL.into(),
        "-n".into(),
        "8".into(),
    ]);
    v.extend(["--timings".into(), QUESTION.into()]);
    v
}

#[test]
fn realm_run_wasm_runs_the_standalone_command() {
    let args = command_args(&["run-wasm", "--dir", "models"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_native_command(run_in_root(env!("CARGO_BIN_EXE_realm"), &args));
}

/// The stock CLI, `cargo install wasmtime-cli@48.0.8 --locked` (which `make test` does once).
fn wasmtime_cli() -> String {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let p = cargo_home.join("bin/wasmtime");
    assert!(
        p.exists(),
        "{} is missing: `make test` installs wasmtime-cli 48.0.8 there",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn stock_wasmtime_cli_runs_the_standalone_component() {
    let wasmtime = wasmtime_cli();
    let version = ok(run_in_root(&wasmtime, &["--version"]));
    assert!(version.contains("48.0.8"), "{version}");
    let args = command_args(&["run", "--dir", "models"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_native_command(run_in_root(&wasmtime, &args));
}

#[test]
fn models_past_the_32_bit_memory_get_a_clear_error() {
    // A sparse 3.5 GiB file: refused from its size, before any read.
    let dir = root().join("target/tmp/big");
    std::fs::create_dir_all(&dir).expect("dir");
    let big = dir.join("big.gguf");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(7 << 29).expect("sparse file");
    drop(f);
    let out = run_in_root(
        env!("CARGO_BIN_EXE_realm"),
        &[
            "run-wasm",
            "--dir",
            "target/tmp/big",
            &standalone(),
            "--model",
            "target/tmp/big/big.gguf",
            "hi",
        ],
    );
    let _ = std::fs::remove_file(&big);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("3.5 GiB") && err.contains("up to 3 GiB") && err.contains("realm run"),
        "{err}"
    );
    assert!(!err.contains("trapped"), "{err}");
}
