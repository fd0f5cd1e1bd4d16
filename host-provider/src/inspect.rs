//! `realm inspect`: what a GGUF file holds, like gguf-dump, as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use realm_gguf::{Array, GgmlType, GgufFile, Hparams, Value};
use realm_tokenizer::{ChatTemplate, Tokenizer};

/// A short rendering of a metadata value: arrays show their type, length and first items.
pub fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 80 => format!(
            "{:?}… ({} bytes)",
            s.chars().take(60).collect::<String>(),
            s.len()
        ),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => describe_array(a),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

fn describe_array(a: &Array) -> String {
    fn head<T: std::fmt::Debug>(v: &[T]) -> String {
        let items: Vec<String> = v.iter().take(5).map(|x| format!("{x:?}")).collect();
        format!(
            "{}{}",
            items.join(", "),
            if v.len() > 5 { ", …" } else { "" }
        )
    }
    let items = match a {
        Array::U8(v) => head(v),
        Array::I8(v) => head(v),
        Array::U16(v) => head(v),
        Array::I16(v) => head(v),
        Array::U32(v) => head(v),
        Array::I32(v) => head(v),
        Array::F32(v) => head(v),
        Array::Bool(v) => head(v),
        Array::String(v) => head(v),
        Array::Array(v) => head(&v.iter().map(describe_array).collect::<Vec<_>>()),
        Array::U64(v) => head(v),
        Array::I64(v) => head(v),
        Array::F64(v) => head(v),
    };
    format!("[{}; {}] [{items}]", a.element_type().name(), a.len())
}

/// Count and bytes of tensors per type, in type order.
pub fn type_histogram(f: &GgufFile) -> BTreeMap<GgmlType, (usize, u64)> {
    let mut h = BTreeMap::new();
    for t in &f.tensors {
        let e = h.entry(t.ty).or_insert((0usize, 0u64));
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    h
}

fn id(v: Option<u32>) -> String {
    v.map_or_else(|| "-".into(), |i| i.to_string())
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The human-readable report. Parts that fail (no tokenizer, odd hyper-parameters) are
/// reported in place rather than hiding the rest of the file.
pub fn report(f: &GgufFile, path: &str) -> String {
    let mut s = String::new();
    let arch = f.architecture().unwrap_or("(none)");
    let _ = writeln!(s, "file:          {path} ({} bytes)", f.file_size);
    let _ = writeln!(
        s,
        "format:        GGUF v{}, alignment {}, data section at {}",
        f.version, f.alignment, f.data_offset
    );
    let _ = writeln!(s, "architecture:  {arch}");
    if let Ok(name) = f.metadata.str("general.name") {
        let _ = writeln!(s, "name:          {name}");
    }
    match Hparams::from_gguf(f) {
        Ok(h) => {
            let _ = writeln!(
                s,
                "hparams:       n_layer {} · n_embd {} · n_ff {} · n_head {} · n_head_kv {} · head_dim {} · n_ctx_train {} · rope_freq_base {} · rms_eps {:e}",
                h.n_layer,
                h.n_embd,
                h.n_ff,
                h.n_head,
                h.n_head_kv,
                h.head_dim,
                h.n_ctx_train,
                h.rope_freq_base,
                h.rms_eps
            );
        }
        Err(e) => {
            let _ = writeln!(s, "hparams:       unavailable: {e}");
        }
    }
    match Tokenizer::from_metadata(&f.metadata) {
        Ok(t) => {
            let v = t.vocab();
            let pre = f.metadata.str("tokenizer.ggml.pre").unwrap_or("-");
            let _ = writeln!(
                s,
                "tokenizer:     {} (pre {pre}), {} tokens, bos {} eos {} add_bos {} · end of generation {:?}",
                t.kind_name(),
                v.len(),
                id(v.bos),
                id(v.eos),
                v.add_bos,
                v.eog_ids()
            );
            let arch = f.architecture().unwrap_or("");
            let fallback = realm_model::arch::default_template(arch);
            match ChatTemplate::from_metadata(&f.metadata, v, fallback) {
                Ok(c) => {
                    let _ = writeln!(s, "chat template: {}", c.origin);
                }
                Err(e) => {
                    let _ = writeln!(s, "chat template: unusable: {e}");
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "tokenizer:     unavailable: {e}");
        }
    }
    let total: u64 = f.tensors.iter().map(|t| t.n_bytes).sum();
    let hist: Vec<String> = type_histogram(f)
        .iter()
        .map(|(ty, (n, bytes))| format!("{ty} ×{n} ({})", mib(*bytes)))
        .collect();
    let _ = writeln!(s, "quant types:   {}", hist.join(", "));
    let _ = writeln!(s, "\nmetadata: {} keys", f.metadata.len());
    for (k, v) in f.metadata.iter() {
        let _ = writeln!(s, "  {k:<44} {}", describe_value(v));
    }
    let _ = writeln!(s, "\ntensors: {} ({})", f.tensors.len(), mib(total));
    let _ = writeln!(
        s,
        "  {:>4}  {:<36} {:<6} {:<22} {:>12} {:>12}",
        "#", "name", "type", "shape", "offset", "bytes"
    );
    for (i, t) in f.tensors.iter().enumerate() {
        let shape = format!("{:?}", t.dims);
        let _ = writeln!(
            s,
            "  {i:>4}  {:<36} {:<6} {shape:<22} {:>12} {:>12}",
            t.name,
            t.ty.name(),
            t.offset,
            t.n_bytes
        );
    }
    s
}

/// The same facts as JSON, for scripts and tests.
pub fn report_json(f: &GgufFile) -> serde_json::Value {
    let hist: serde_json::Map<String, serde_json::Value> = type_histogram(f)
        .into_iter()
        .map(|(ty, (n, bytes))| {
            (
                ty.name().to_string(),
                serde_json::json!({ "count": n, "bytes": bytes }),
            )
        })
        .collect();
    let tok = Tokenizer::from_metadata(&f.metadata);
    serde_json::json!({
        "version": f.version,
        "file_size": f.file_size,
        "alignment": f.alignment,
        "data_offset": f.data_offset,
        "architecture": f.architecture().ok(),
        "hparams": Hparams::from_gguf(f).ok().map(|h| serde_json::json!({
            "n_layer": h.n_layer, "n_embd": h.n_embd, "n_ff": h.n_ff, "n_head": h.n_head,
            "n_head_kv": h.n_head_kv, "head_dim": h.head_dim, "n_ctx_train": h.n_ctx_train,
            "rope_freq_base": h.rope_freq_base, "rms_eps": h.rms_eps,
        })),
        "tokenizer": tok.as_ref().ok().map(|t| serde_json::json!({
            "kind": t.kind_name(), "n_vocab": t.vocab().len(), "bos": t.vocab().bos, "eos": t.vocab().eos,
        })),
        "metadata_keys": f.metadata.len(),
        "types": hist,
        "tensors": f.tensors.iter().map(|t| serde_json::json!({
            "name": t.name, "type": t.ty.name(), "shape": t.dims, "offset": t.offset, "bytes": t.n_bytes,
        })).collect::<Vec<_>>(),
    })
}
