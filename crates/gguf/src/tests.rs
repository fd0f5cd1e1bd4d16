//! Round trips through the writer and the reader's handling of hand-broken headers.

use crate::*;

fn tiny() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("general.alignment", Value::U32(64))
        .kv(
            "test.nested",
            Value::Array(Array::Array(vec![
                Array::U8(vec![1, 2]),
                Array::String(vec!["a".into()]),
            ])),
        )
        .kv("test.f64", Value::F64(0.5))
        .tensor(
            "a",
            GgmlType::F32,
            &[4, 2],
            (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect(),
        )
        .tensor("b", GgmlType::Q8_0, &[32], vec![0u8; 34]);
    w
}

#[test]
fn writer_output_round_trips() {
    let bytes = tiny().to_bytes();
    let f = GgufFile::read(bytes.as_slice()).expect("valid file");
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(
        f.metadata.str("general.architecture").expect("present"),
        "llama"
    );
    assert_eq!(f.metadata.get("test.f64"), Some(&Value::F64(0.5)));
    let nested = f.metadata.array("test.nested").expect("present");
    assert_eq!(nested.len(), 2);
    let a = f.tensor("a").expect("present");
    assert_eq!(a.dims, vec![4, 2]);
    assert_eq!(a.n_bytes, 32);
    assert_eq!(
        f.dequantize(bytes.as_slice(), a).expect("f32"),
        (0..8).map(|i| i as f32).collect::<Vec<_>>()
    );
    let b = f.tensor("b").expect("present");
    assert_eq!(b.offset % 64, 0);
    assert!(b.offset >= a.offset + 32);
}

fn patch(bytes: &mut [u8], at: usize, with: &[u8]) {
    bytes[at..at + with.len()].copy_from_slice(with);
}

#[test]
fn header_errors_name_the_problem() {
    let good = tiny().to_bytes();
    let err = |b: &[u8]| GgufFile::read(b).expect_err("must fail");

    assert!(matches!(err(&[]), GgufError::UnexpectedEof { .. }));
    let mut b = good.clone();
    patch(&mut b, 0, b"GGUG");
    assert!(matches!(err(&b), GgufError::BadMagic { .. }));
    let mut b = good.clone();
    patch(&mut b, 4, &1u32.to_le_bytes());
    assert!(matches!(
        err(&b),
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    let mut b = good.clone();
    patch(&mut b, 4, &3u32.to_be_bytes());
    let e = err(&b);
    assert!(e.to_string().contains("big-endian"), "{e}");
    let mut b = good.clone();
    patch(&mut b, 8, &u64::MAX.to_le_bytes());
    assert!(matches!(err(&b), GgufError::TooLarge { .. }));
    let mut b = good.clone();
    patch(&mut b, 16, &(1u64 << 63).to_le_bytes());
    assert!(matches!(err(&b), GgufError::TooLarge { .. }));
}

#[test]
fn bad_alignment_values() {
    for (v, ok) in [
        (Value::U32(0), false),
        (Value::U32(13), false),
        (Value::U32(1 << 31), false),
        (Value::U64(32), false),
        (Value::U32(16), true),
    ] {
        let mut w = GgufWriter::new();
        w.kv("general.alignment", v.clone());
        let r = GgufFile::read(w.to_bytes().as_slice());
        assert_eq!(r.is_ok(), ok, "{v:?}: {r:?}");
    }
}

#[test]
fn duplicate_keys_and_tensors_are_errors() {
    let mut w = GgufWriter::new();
    w.kv("k", Value::U8(1)).kv("k", Value::U8(2));
    assert!(matches!(
        GgufFile::read(w.to_bytes().as_slice()),
        Err(GgufError::DuplicateKey { .. })
    ));
    let mut w = GgufWriter::new();
    w.tensor("t", GgmlType::F32, &[1], vec![0; 4])
        .tensor("t", GgmlType::F32, &[1], vec![0; 4]);
    assert!(matches!(
        GgufFile::read(w.to_bytes().as_slice()),
        Err(GgufError::DuplicateTensor { .. })
    ));
}

#[test]
fn unsupported_type_is_named_with_the_tensor() {
    let mut w = GgufWriter::new();
    w.tensor(
        "blk.0.ffn_up.weight",
        GgmlType::IQ2_XXS,
        &[256],
        vec![0; 66],
    );
    let bytes = w.to_bytes();
    let f = GgufFile::read(bytes.as_slice()).expect("parses: the type is known");
    let e = f
        .dequantize(bytes.as_slice(), &f.tensors[0])
        .expect_err("no dequantizer");
    assert_eq!(
        e.to_string(),
        "tensor 'blk.0.ffn_up.weight' has type IQ2_XXS, which Realm does not support yet"
    );
}

#[test]
fn hparams_are_validated() {
    let base = |n_head: u32, n_layer: u32| {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()))
            .kv("llama.block_count", Value::U32(n_layer))
            .kv("llama.embedding_length", Value::U32(64))
            .kv("llama.feed_forward_length", Value::U32(128))
            .kv("llama.attention.head_count", Value::U32(n_head))
            .kv("llama.context_length", Value::U32(256))
            .tensor("blk.0.attn_norm.weight", GgmlType::F32, &[64], vec![0; 256])
            .tensor("blk.1.attn_norm.weight", GgmlType::F32, &[64], vec![0; 256]);
        GgufFile::read(w.to_bytes().as_slice()).expect("valid file")
    };
    let h = Hparams::from_gguf(&base(4, 2)).expect("valid");
    assert_eq!((h.head_dim, h.n_head_kv), (16, 4));
    assert!(Hparams::from_gguf(&base(0, 2)).is_err());
    assert!(Hparams::from_gguf(&base(5, 2)).is_err());
    assert!(Hparams::from_gguf(&base(4, 1)).is_err());
    assert!(Hparams::from_gguf(&base(4, 1_000_000)).is_err());
}

/// RoPE scaling keys read as llama.cpp reads them, and bad values named.
#[test]
fn rope_scaling_follows_llama_cpp() {
    let with = |extra: &[(&str, Value)]| {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()))
            .kv("llama.block_count", Value::U32(1))
            .kv("llama.embedding_length", Value::U32(64))
            .kv("llama.feed_forward_length", Value::U32(128))
            .kv("llama.attention.head_count", Value::U32(2))
            .kv("llama.context_length", Value::U32(4096))
            .tensor("blk.0.attn_norm.weight", GgmlType::F32, &[64], vec![0; 256]);
        for (k, v) in extra {
            w.kv(k, v.clone());
        }
        Hparams::from_gguf(&GgufFile::read(w.to_bytes().as_slice()).expect("valid file"))
    };
    // No keys: linear with factor 1 is no scaling; n_rot is the head width.
    let h = with(&[]).expect("valid");
    assert_eq!(h.rope_scaling.kind, RopeScalingType::Linear);
    assert_eq!(
        (
            h.rope_scaling.freq_scale,
            h.rope_scaling.ext_factor,
            h.n_rot
        ),
        (1.0, 0.0, 32)
    );
    assert_eq!(h.rope_scaling.n_ctx_orig, 4096);
    // Linear: angles × 1/factor (the old `rope.scale_linear` key too).
    let h = with(&[("llama.rope.scaling.factor", Value::F32(4.0))]).expect("valid");
    assert_eq!(h.rope_scaling.freq_scale, 0.25);
    let h = with(&[("llama.rope.scale_linear", Value::F32(2.0))]).expect("valid");
    assert_eq!(h.rope_scaling.freq_scale, 0.5);
    // `none` never scales, whatever the factor.
    let h = with(&[
        ("llama.rope.scaling.type", Value::String("none".into())),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
    ])
    .expect("valid");
    assert_eq!(h.rope_scaling.freq_scale, 1.0);
    // YaRN: extrapolation mix on, its original context, and a magnitude factor whose two
    // corrections (llama_context's and ggml's) cancel to about 1 + 0.1·ln(factor).
    let h = with(&[
        ("llama.rope.scaling.type", Value::String("yarn".into())),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
        (
            "llama.rope.scaling.original_context_length",
            Value::U32(1024),
        ),
    ])
    .expect("valid");
    let s = h.rope_scaling;
    assert_eq!(
        (s.kind, s.ext_factor, s.n_ctx_orig),
        (RopeScalingType::Yarn, 1.0, 1024)
    );
    assert!((s.attn_factor - 1.0).abs() < 1e-6, "{}", s.attn_factor);
    // Bad values are refused with the key.
    for (k, v) in [
        (
            "llama.rope.scaling.type",
            Value::String("ntk-by-parts".into()),
        ),
        ("llama.rope.scaling.factor", Value::F32(-2.0)),
        ("llama.rope.scaling.attn_factor", Value::F32(f32::NAN)),
        ("llama.rope.dimension_count", Value::U32(33)),
        ("llama.rope.dimension_count", Value::U32(64)),
    ] {
        let e = with(&[(k, v)]).expect_err(k).to_string();
        assert!(e.contains(k), "{e}");
    }
}

/// A source that claims to be 1 TiB: the header bytes, then zeros.
struct Sparse(Vec<u8>);

impl Source for Sparse {
    fn size(&self) -> u64 {
        1 << 40
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|at| self.0.get(at))
                .copied()
                .unwrap_or(0);
        }
        Ok(())
    }
}

#[test]
fn sizes_and_offsets_past_4_gib_stay_64_bit() {
    // Candle's reader truncated these to 32 bits inside a wasm32 guest. Second tensor:
    // 2^34 f32 values (64 GiB) placed 5 GiB into the data section.
    let mut raw = b"GGUF".to_vec();
    raw.extend_from_slice(&3u32.to_le_bytes());
    raw.extend_from_slice(&2u64.to_le_bytes());
    raw.extend_from_slice(&0u64.to_le_bytes());
    for (name, dim, offset) in [("small", 8u64, 0u64), ("huge", 1 << 34, 5 << 30)] {
        raw.extend_from_slice(&(name.len() as u64).to_le_bytes());
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&dim.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        raw.extend_from_slice(&offset.to_le_bytes());
    }
    let f = GgufFile::read(&Sparse(raw)).expect("parses");
    let huge = f.tensor("huge").expect("present");
    assert_eq!(huge.dims, vec![1 << 34]);
    assert_eq!(huge.n_bytes, 1 << 36);
    assert_eq!(huge.offset, f.data_offset + (5 << 30));
    assert!(huge.offset > u32::MAX as u64);
}
