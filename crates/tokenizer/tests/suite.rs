//! llama.cpp's own tokenizer suite: every `models/ggml-vocab-*.gguf` of the tree the
//! references come from (`make test-models` fetches it into target/llama.cpp/src) with
//! its `.inp` texts (separated by `\n__ggml_vocab_test__\n`) and `.out` ids, tokenized as
//! llama.cpp's test-tokenizer-0 does (no BOS/EOS added, special-token text not parsed).
//! Every vocabulary Realm reads must pass every text; the ones it refuses are listed by
//! name with the reason, and may only be the known ones.

use std::path::{Path, PathBuf};

use realm_tokenizer::Tokenizer;

fn suite_dir() -> PathBuf {
    std::env::var_os("REALM_VOCAB_SUITE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/llama.cpp/src/models"),
        PathBuf::from,
    )
}

/// The vocabularies Realm does not read yet (they must fail with an error, not give wrong
/// ids): none now.
const REFUSED: &[&str] = &[];

#[test]
fn llama_cpp_tokenizer_suite() {
    let dir = suite_dir();
    let mut vocabs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (make test-models fetches the llama.cpp tree)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "gguf")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ggml-vocab-"))
                && p.with_extension("gguf.inp").exists()
        })
        .collect();
    vocabs.sort();
    assert!(
        vocabs.len() >= 15,
        "only {} vocabularies in {}",
        vocabs.len(),
        dir.display()
    );
    let mut failures = Vec::new();
    let (mut passed, mut texts) = (0, 0);
    for path in &vocabs {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let bytes = std::fs::read(path).expect("vocab file");
        let file = realm_gguf::GgufFile::read(bytes.as_slice()).expect("a GGUF header");
        let tok = match Tokenizer::from_metadata(&file.metadata) {
            Ok(t) => t,
            Err(e) => {
                println!("{name}: refused: {e}");
                if !REFUSED.contains(&name.as_str()) {
                    failures.push(format!("{name}: refused: {e}"));
                }
                continue;
            }
        };
        let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).expect(".inp");
        let out = std::fs::read_to_string(path.with_extension("gguf.out")).expect(".out");
        let cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let expected: Vec<Vec<u32>> = out
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .map(|t| t.parse().expect("an id"))
                    .collect()
            })
            .collect();
        let n = expected.len().min(cases.len());
        let mut ok = 0;
        for (text, want) in cases.iter().zip(&expected).take(n) {
            let got = tok.encode(text, false, false).unwrap_or_default();
            if &got == want {
                ok += 1;
            } else if failures.len() < 40 {
                failures.push(format!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}"));
            }
        }
        println!("{name}: {ok}/{n} texts");
        passed += ok;
        texts += n;
    }
    println!("{passed}/{texts} texts over {} vocabularies", vocabs.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
