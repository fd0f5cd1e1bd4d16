//! Every reference dequantizer is bit-exact with gguf-py (llama.cpp's Python port) on the
//! vectors in `tests/data/quant/` (see the README there for their origin).

use std::path::Path;

use realm_gguf::{GgmlType, quant};

fn type_by_name(name: &str) -> GgmlType {
    GgmlType::ALL
        .iter()
        .copied()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn dequantizers_match_gguf_py_bit_for_bit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quant");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    let cases = manifest.as_array().expect("a list");
    let mut types_seen = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["case"].as_str().expect("case name");
        let ty = type_by_name(case["type"].as_str().expect("type"));
        let raw = std::fs::read(dir.join(format!("{name}.bin"))).expect("blocks");
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.f32")))
            .expect("values")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut got = vec![0f32; want.len()];
        quant::dequantize(ty, &raw, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{name} ({ty}) element {i}: got {g:e}, gguf-py {w:e}"
            );
        }
        types_seen.insert(ty);
    }
    let supported: std::collections::BTreeSet<_> = GgmlType::ALL
        .iter()
        .copied()
        .filter(|t| t.is_supported() && *t != GgmlType::F32)
        .collect();
    let missing: Vec<_> = supported.difference(&types_seen).collect();
    assert!(missing.is_empty(), "no reference vectors for {missing:?}");
}
