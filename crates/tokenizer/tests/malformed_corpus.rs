//! The committed corpus of hostile GGUF files (`crates/gguf/tests/data/malformed/`, made by
//! `cargo run -p realm-gguf --example make_corpus`): each must be rejected with an error by
//! some stage of loading a model's format (header, dequantization, hyper-parameters,
//! tokenizer, chat template), none may panic, and none may allocate much more than its own
//! size. `valid-tiny.gguf` must load, and fail cleanly when cut at every byte offset.
//!
//! This file holds one test so that the counting allocator measures it alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use realm_gguf::{GgufFile, Hparams};
use realm_tokenizer::{Builtin, ChatTemplate, Message, Tokenizer};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Every stage of understanding a model file, stopping at the first error.
fn load_format(bytes: &[u8]) -> Result<(), String> {
    let file = GgufFile::read(bytes).map_err(|e| format!("header: {e}"))?;
    for t in &file.tensors {
        file.dequantize(bytes, t)
            .map_err(|e| format!("tensor: {e}"))?;
    }
    Hparams::from_gguf(&file).map_err(|e| format!("hparams: {e}"))?;
    let tok = Tokenizer::from_metadata(&file.metadata).map_err(|e| format!("tokenizer: {e}"))?;
    let tmpl = ChatTemplate::from_metadata(&file.metadata, tok.vocab(), Builtin::ChatMl)
        .map_err(|e| format!("template: {e}"))?;
    let prompt = tmpl
        .render(&[Message::new("user", "ab")], true)
        .map_err(|e| format!("template: {e}"))?;
    tok.encode(&prompt, true, true)
        .map_err(|e| format!("tokenizer: {e}"))?;
    Ok(())
}

/// Run `load_format`, returning its result and the most it allocated beyond what was live.
fn measured(bytes: &[u8]) -> (Result<(), String>, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = std::panic::catch_unwind(|| load_format(bytes));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    match r {
        Ok(r) => (r, peak),
        Err(_) => (Err("PANIC".into()), peak),
    }
}

/// What a file of `len` bytes may make the loader allocate: a constant for the compiled
/// pre-tokenizer regexes and template engine, plus a small multiple of the file.
fn budget(len: usize) -> usize {
    (8 << 20) + 32 * len
}

#[test]
fn hostile_files_are_rejected_cleanly_and_cheaply() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gguf/tests/data/malformed");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    entries.sort();

    let mut failures = Vec::new();
    let mut n_malformed = 0;
    for path in &entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let bytes = std::fs::read(path).expect("read");
        let (result, peak) = measured(&bytes);
        let valid = name.starts_with("valid-");
        match (&result, valid) {
            (Err(e), _) if e == "PANIC" => failures.push(format!("{name}: panicked")),
            (Ok(()), false) => failures.push(format!("{name}: accepted")),
            (Err(e), true) => failures.push(format!("{name}: rejected: {e}")),
            _ => {}
        }
        if peak > budget(bytes.len()) {
            failures.push(format!(
                "{name}: allocated {peak} bytes for a {}-byte file",
                bytes.len()
            ));
        }
        if !valid {
            n_malformed += 1;
            println!("{name}: {}", result.err().unwrap_or_default());
        }
    }
    assert!(n_malformed >= 30, "only {n_malformed} malformed files");

    // Truncation at every byte offset of the valid file.
    let valid = std::fs::read(dir.join("valid-tiny.gguf")).expect("valid-tiny.gguf");
    for cut in 0..valid.len() {
        let (result, peak) = measured(&valid[..cut]);
        match result {
            Ok(()) => failures.push(format!("valid-tiny cut at {cut}: accepted")),
            Err(e) if e == "PANIC" => failures.push(format!("valid-tiny cut at {cut}: panicked")),
            Err(_) => {}
        }
        if peak > budget(cut) {
            failures.push(format!("valid-tiny cut at {cut}: allocated {peak} bytes"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
