//! The CUDA backend on a GPU. Without one (no driver, no NVRTC or no device) every test
//! says SKIPPED and passes, unless `REALM_REQUIRE_GPU=1`, when it fails instead (`make
//! test-gpu` sets it; `bench/gpu.sh` runs it on the GPU machine).
//!
//! - Every op and the 32-value quants' matmuls give the CPU backend's bits; the K-quants'
//!   matmuls its values to float rounding.
//! - SmolLM2's greedy ids on the GPU equal the CPU backend's up to the first step whose
//!   top-2 logit gap is below [`GPU_NEAR_TIE`] on either, on llama.cpp's reference
//!   prompts, with the same gaps to the bit; two tenants on one device share one copy of
//!   the weights.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use realm_compute::{Compute, GgmlType, ModelBytes};
use realm_cuda::{CudaBackend, CudaDevice};
use realm_kernels::cpu::CpuBackend;
use realm_kernels::pool::SpinPool;
use realm_model::{LoadedModel, Message, Params, Prompt};

/// Where the GPU may rightly pick the other token (the and the CPU-to-llama.cpp
/// tests' rule). On a file of 32-value quants the GPU computes the CPU backend's bits
/// (the same order of operations in every op), so there the gaps must be equal too.
const GPU_NEAR_TIE: f32 = 0.02;

/// The checkout: `$REALM_ROOT` (a binary carried to another machine), else where this
/// test was built.
fn root() -> PathBuf {
    std::env::var_os("REALM_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        PathBuf::from,
    )
}

fn required() -> bool {
    std::env::var("REALM_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Device 0, or None after saying why the test is skipped.
fn device() -> Option<Arc<CudaDevice>> {
    match CudaDevice::open(0) {
        Ok(d) => {
            println!("GPU: {}", d.name());
            Some(d)
        }
        Err(e) if required() => panic!("REALM_REQUIRE_GPU=1, but: {e}"),
        Err(e) => {
            skipped(&e);
            None
        }
    }
}

/// Says that a test was skipped, past the test harness's capture (it must be seen).
fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED (no GPU here): {why}");
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Arc::new(SpinPool::new(2).expect("pool")), 1 << 32)
}

/// Activations quantized on the GPU are byte for byte the CPU backend's.
#[test]
fn activations_quantize_to_the_cpu_backends_bytes() {
    let Some(dev) = device() else { return };
    let k = 256;
    let xs: Vec<f32> = (0..3 * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    for (kind, q81) in [
        (realm_kernels::quant::VecDot::Q8_0, false),
        (realm_kernels::quant::VecDot::Q8_1, true),
    ] {
        let gpu = dev.quantize_q8(&xs, k, q81).expect("quantize");
        let mut cpu = Vec::new();
        for row in xs.chunks_exact(k) {
            realm_kernels::quant::quantize_row(kind, row, &mut cpu);
        }
        assert_eq!(gpu.len(), cpu.len());
        let first = gpu.iter().zip(&cpu).position(|(a, b)| a != b);
        assert_eq!(
            first,
            None,
            "q8_1 {q81}: gpu {:?}\n cpu {:?}",
            &gpu[..40],
            &cpu[..40]
        );
    }
}

/// Q8_K activations (the K-quants' products) are byte for byte the CPU backend's, ties
/// of magnitude between signs included.
#[test]
fn k_quant_activations_quantize_to_the_cpu_backends_bytes() {
    let Some(dev) = device() else { return };
    let mut xs: Vec<f32> = (0..4 * 256)
        .map(|i| ((i * 53 % 211) as f32 - 105.0) / 33.0)
        .collect();
    // Block 1: its largest magnitude twice, negative first; block 2: all zero.
    xs[256 + 7] = -9.0;
    xs[256 + 200] = 9.0;
    xs[512..768].fill(0.0);
    let gpu = dev.quantize_q8k(&xs).expect("quantize");
    let mut cpu = Vec::new();
    for row in xs.chunks_exact(256) {
        realm_kernels::quant::quantize_row(realm_kernels::quant::VecDot::Q8K, row, &mut cpu);
    }
    assert_eq!(gpu.len(), cpu.len());
    let first = gpu.iter().zip(&cpu).position(|(a, b)| a != b);
    assert_eq!(first, None, "first differing byte");
}

/// The kernels compile (NVRTC only: no GPU needed). `make test` runs this with NVRTC
/// from PyPI and `REALM_REQUIRE_NVRTC=1`, so the kernels cannot rot on machines without
/// a GPU.
#[test]
fn kernels_compile_with_nvrtc() {
    match realm_cuda::compile_kernels() {
        Ok(()) => println!("kernels compiled"),
        Err(e) if required() || std::env::var("REALM_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("{e}")
        }
        Err(e) if e.starts_with("no NVRTC") => skipped(&e),
        Err(e) => panic!("{e}"),
    }
}

/// `xs` (rows of `dims[0]`) times the weight at the start of `file`, on backend `c`.
fn product<C: realm_compute::Backend>(
    c: &C,
    file: &ModelBytes,
    ty: GgmlType,
    dims: &[u64; 2],
    xs: &[f32],
) -> Vec<f32> {
    let (k, n) = (dims[0] as usize, dims[1] as usize);
    let rows = xs.len() / k;
    let w = Compute::weight(c, file, 0, ty, dims).expect("weight");
    let (x, o) = (Compute::tensor(c, k as u32), Compute::tensor(c, n as u32));
    realm_compute::checked::write_tensor(c, &x, rows, xs.to_vec()).expect("write");
    Compute::matmul(c, &x, &w, &o).expect("matmul");
    (0..rows as u32)
        .flat_map(|r| Compute::read_row(c, &o, r).expect("row"))
        .collect()
}

#[test]
fn quantized_matmuls_agree_with_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let gpu = CudaBackend::new(dev, 1 << 32);
    let cpu = cpu();
    let (k, n) = (256usize, 96usize);
    // 1 and 5 rows: activations quantized inside the matmul (decoding); 8: the same, in
    // the K-quants' prompt order; 200: by a kernel of their own first (prompts, tiles).
    for rows in [1usize, 5, 8, 200] {
        products_agree(&gpu, &cpu, k, n, rows);
    }
    // Ragged tiles (45 rows, 40 columns, 10 blocks a row: none a multiple of the tiles;
    // 2 super-blocks for the K-quants), and 8 rows too wide to quantize in shared memory
    // (the matvec from global memory).
    products_agree(&gpu, &cpu, 320, 40, 45);
    products_agree(&gpu, &cpu, 512, 40, 45);
    products_agree(&gpu, &cpu, 512, 150, 130);
    // Five super-blocks a column: the tensor-core tiles' loads run one super-block ahead,
    // and Q6_K's 210-byte blocks start on every alignment of 2.
    products_agree(&gpu, &cpu, 1280, 200, 70);
    products_agree(&gpu, &cpu, 8192, 16, 8);
    // Products wide enough for several columns a warp (6400 of them: 3 a warp on a GPU of
    // 132 multiprocessors, the last warp's short).
    products_agree(&gpu, &cpu, 512, 6400, 1);
    products_agree(&gpu, &cpu, 512, 6400, 3);
    // K-quant prompts in dp4a tiles too, where the GPU would use its tensor cores.
    let dp4a = CudaDevice::open_without_tensor_cores(0).expect("the device again");
    let gpu = CudaBackend::new(dp4a, 1 << 32);
    products_agree(&gpu, &cpu, 512, 150, 130);
}

fn products_agree(gpu: &CudaBackend, cpu: &CpuBackend, k: usize, n: usize, rows: usize) {
    let xs: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ]
    .into_iter()
    .filter(|ty| k.is_multiple_of(ty.block_size() as usize))
    {
        let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(ty, k, n, 3)));
        let dims = [k as u64, n as u64];
        let on_gpu = product(gpu, &file, ty, &dims, &xs);
        let on_cpu = product(cpu, &file, ty, &dims, &xs);
        let scale = on_cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = on_gpu
            .iter()
            .zip(&on_cpu)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{ty}, {rows} rows: largest difference {worst} (outputs up to {scale})");
        assert!(worst <= 0.02 * scale, "{ty}: {worst} against {scale}");
        // Every quant but Q5_K follows the CPU's order of operations (for the K-quants
        // the order of fewer than 8 rows and that of 8 or more): the same bits.
        if ty != GgmlType::Q5_K {
            assert_eq!(worst, 0.0, "{ty}, {rows} rows: not the CPU's bits");
        }
    }
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("reference json"))
        .collect()
}

fn prompt_of(case: &serde_json::Value) -> Prompt {
    match case["messages"].as_array() {
        Some(ms) => Prompt::Messages(
            ms.iter()
                .map(|m| Message {
                    role: m["role"].as_str().expect("role").into(),
                    content: m["content"].as_str().expect("content").into(),
                })
                .collect(),
        ),
        None => Prompt::Text(case["prompt"].as_str().expect("prompt").into()),
    }
}

fn greedy<C: Compute>(m: &LoadedModel<C>, prompt: Prompt, n: u32) -> (Vec<u32>, Vec<f32>) {
    let session = m.session(0).expect("session");
    let g = session
        .generate(prompt, Params::greedy(n))
        .expect("generation");
    while g.next().expect("next").is_some() {}
    (g.tokens(), g.margins())
}

#[test]
fn smollm2_greedy_ids_equal_the_cpu_backends_up_to_near_ties() {
    let Some(dev) = device() else { return };
    let path = std::env::var_os("REALM_GPU_MODEL").map_or_else(
        || root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    let bytes = match std::fs::read(&path) {
        Ok(b) => Arc::new(b),
        Err(e) if required() => panic!("{}: {e}", path.display()),
        Err(e) => {
            skipped(&format!("{}: {e} (`make models`)", path.display()));
            return;
        }
    };
    // Every quant but Q5_K follows the CPU backend's order of operations: the same bits.
    let exact = realm_gguf::GgufFile::read(bytes.as_slice())
        .is_ok_and(|f| f.tensors.iter().all(|t| t.ty != GgmlType::Q5_K));
    let file = ModelBytes::new(bytes);
    let on_gpu = LoadedModel::load("m", CudaBackend::new(dev.clone(), 1 << 32), file.clone())
        .expect("loads on the GPU");
    let uploaded = dev.weight_bytes();
    // A second tenant on the device: no second copy of the weights.
    let second = LoadedModel::load("m", CudaBackend::new(dev.clone(), 1 << 32), file.clone())
        .expect("a second tenant");
    assert_eq!(dev.weight_bytes(), uploaded, "a second copy was uploaded");
    println!("weights on the device: {uploaded} bytes, shared by two tenants");
    let on_cpu = LoadedModel::load("m", cpu(), file).expect("loads on the CPU");
    let cases = jsonl(&root().join("tests/reference/smollm2-135m-q4_1/greedy.jsonl"));
    let mut failures = Vec::new();
    let mut compared = 0;
    for case in &cases {
        let (g, gm) = greedy(&on_gpu, prompt_of(case), 32);
        let (c, cm) = greedy(&on_cpu, prompt_of(case), 32);
        let tie = gm
            .iter()
            .zip(&cm)
            .position(|(a, b)| a.min(*b) < GPU_NEAR_TIE)
            .unwrap_or(usize::MAX);
        let upto = tie.min(g.len()).min(c.len());
        compared += upto;
        let worst = gm[..upto]
            .iter()
            .zip(&cm)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!(
            "{}: {upto} tokens compared, largest top-2 gap difference {worst}",
            case["id"]
        );
        let show = |m: &[f32]| {
            m.iter()
                .take(8)
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
        };
        println!("  gaps gpu {:?}\n  gaps cpu {:?}", show(&gm), show(&cm));
        if exact && worst != 0.0 {
            failures.push(format!("{}: the gaps differ by {worst}", case["id"]));
        }
        if g[..upto] != c[..upto] {
            failures.push(format!(
                "{}: cpu {c:?}\n  gpu {g:?} (near-tie at {tie})",
                case["id"]
            ));
        }
    }
    // The second tenant computes the same as the first.
    let first = &cases[0];
    assert_eq!(
        greedy(&second, prompt_of(first), 16).0,
        greedy(&on_gpu, prompt_of(first), 16).0
    );
    // Decoding ran from captured CUDA graphs (a step repeating the one before).
    let (replays, captures) = dev.graph_stats();
    println!("{replays} steps replayed from {captures} captured graphs");
    assert!(replays > 0 && captures > 0, "no step ran from a graph");
    println!("{} prompts, {compared} tokens compared", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Deterministic values in about [-2, 2].
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 500.0)
        .collect()
}

/// Each op on the GPU against the CPU backend, on SmolLM2's shapes (576 wide, 9 heads of
/// 64 sharing 3 KV heads): a prompt of 37 rows, then one more row. The largest difference
/// per op is printed; each must be 0.
#[test]
fn ops_agree_with_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let gpu = CudaBackend::new(dev, 1 << 32);
    let cpu = cpu();
    let (w, ff, kvw, rows) = (576usize, 1536usize, 192usize, 37usize);
    // A file of f32 values: a norm weight at offset 0.
    let norm: Vec<u8> = values(w, 9)
        .iter()
        .flat_map(|v| (v.abs() + 0.5).to_le_bytes())
        .collect();
    let file = ModelBytes::new(Arc::new(norm));
    let rope = realm_compute::RopeParams {
        head_dim: 64,
        n_rot: 64,
        mode: realm_compute::RopeMode::Normal,
        freq_base: 100_000.0,
        freq_scale: 1.0,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 8192,
    };
    fn run<C: realm_compute::Backend>(
        c: &C,
        file: &ModelBytes,
        rope: &realm_compute::RopeParams,
        (w, ff, kvw, rows): (usize, usize, usize, usize),
    ) -> Vec<(&'static str, Vec<f32>)> {
        let t = |cols: usize, rows: usize, seed: usize| {
            let x = Compute::tensor(c, cols as u32);
            realm_compute::checked::write_tensor(c, &x, rows, values(cols * rows, seed))
                .expect("write");
            x
        };
        let read = |x: &C::Tensor, rows: usize| -> Vec<f32> {
            (0..rows as u32)
                .flat_map(|r| Compute::read_row(c, x, r).expect("row"))
                .collect()
        };
        let mut out = Vec::new();
        let norm_w = Compute::weight(c, file, 0, GgmlType::F32, &[w as u64]).expect("norm");
        let x = t(w, rows, 1);
        let o = Compute::tensor(c, w as u32);
        Compute::rms_norm(c, &x, &norm_w, 1e-5, &o).expect("norm");
        out.push(("rms_norm", read(&o, rows)));
        let q = t(w, rows, 2);
        Compute::rope(c, &q, 0, rope, None).expect("rope");
        out.push(("rope at 0..37", read(&q, rows)));
        let k = t(kvw, rows, 3);
        Compute::rope(c, &k, 0, rope, None).expect("rope");
        let v = t(kvw, rows, 4);
        let cache = Compute::cache(c, 1, 64, 3, 64);
        let att = Compute::tensor(c, w as u32);
        Compute::attention(c, &q, &k, &v, &cache, 0, 0, 9, 0.125, 0, 0.0, &att).expect("attention");
        out.push(("attention, 37 rows", read(&att, rows)));
        let (q1, k1, v1) = (t(w, 1, 5), t(kvw, 1, 6), t(kvw, 1, 7));
        Compute::rope(c, &q1, rows as u32, rope, None).expect("rope");
        out.push(("rope at 37", read(&q1, 1)));
        Compute::rope(c, &k1, rows as u32, rope, None).expect("rope");
        let att1 = Compute::tensor(c, w as u32);
        Compute::attention(
            c,
            &q1,
            &k1,
            &v1,
            &cache,
            0,
            rows as u32,
            9,
            0.125,
            0,
            0.0,
            &att1,
        )
        .expect("attention");
        out.push(("attention, row 38", read(&att1, 1)));
        for (name, act) in [
            ("glu silu", realm_compute::Activation::Silu),
            ("glu gelu", realm_compute::Activation::GeluTanh),
        ] {
            let (g, u) = (t(ff, rows, 8), t(ff, rows, 9));
            Compute::glu(c, &g, &u, act).expect("glu");
            out.push((name, read(&u, rows)));
        }
        let (a, b) = (t(w, rows, 10), t(w, rows, 11));
        Compute::add(c, &a, &b).expect("add");
        Compute::scale(c, &a, 0.37).expect("scale");
        out.push(("add, scale", read(&a, rows)));
        // Per-row factors in runs (Mistral 3's temperature steps), as the CPU's.
        let f: Vec<f32> = (0..rows).map(|r| 1.0 + (r / 8) as f32 * 0.25).collect();
        Compute::scale_rows(c, &a, &f).expect("scale_rows");
        out.push(("scale_rows", read(&a, rows)));
        out
    }
    let dims = (w, ff, kvw, rows);
    let on_gpu = run(&gpu, &file, &rope, dims);
    let on_cpu = run(&cpu, &file, &rope, dims);
    let mut bad = Vec::new();
    for ((name, g), (_, c)) in on_gpu.iter().zip(&on_cpu) {
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (worst, at) = g
            .iter()
            .zip(c)
            .enumerate()
            .fold((0f32, 0), |(m, at), (i, (a, b))| {
                let d = (a - b).abs();
                if d > m { (d, i) } else { (m, at) }
            });
        println!("{name}: largest difference {worst} at {at} (outputs up to {scale})");
        // The CPU backend's order of operations in every op: its bits.
        let tolerance = 0.0;
        if worst > tolerance {
            bad.push(format!(
                "{name}: {worst} at {at}: gpu {} cpu {}",
                g[at], c[at]
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Attention over long contexts against the CPU backend, bit for bit: decoding takes heads of
/// 64, 128 and 256 values in chunks (`attention_rows`: 256, 128 and 64 positions), so these
/// contexts take several chunks a row; other sizes take `attention` (an odd size: no value
/// tiles); batches of 16 to 63 rows take `attention` too. Batches of 64
/// rows or more take the CPU's other numerics (ggml-cpu's tiled flash attention), with and
/// without a window and a soft cap; batches below 64 the f16 ones.
#[test]
fn long_attention_agrees_with_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let gpu = CudaBackend::new(dev, 1 << 32);
    let cpu = cpu();
    // (heads, KV heads, head size, prompt rows, then steps of these rows, window, soft cap)
    type Case = (u32, u32, usize, usize, &'static [usize], u32, f32);
    // Batches of 64+ rows: blocks take up to 4 heads of a KV group (groups of 3, 4, 2, 1
    // and 8 here: two blocks a group).
    let cases: [Case; 7] = [
        (9, 3, 64, 290, &[1, 3, 1], 0, 0.0),
        (16, 2, 64, 80, &[1], 0, 0.0),
        (4, 1, 256, 70, &[1, 2], 0, 0.0),
        // An odd head size: no value tiles (they are copied in words), keys a value a load.
        (2, 1, 65, 20, &[1, 64], 0, 0.0),
        (2, 2, 128, 64, &[1, 63, 100, 1], 0, 0.0),
        (4, 2, 128, 100, &[1, 70], 50, 0.0),
        (4, 4, 64, 90, &[2, 65], 0, 30.0),
    ];
    fn run<C: realm_compute::Backend>(
        c: &C,
        (heads, kv, hd, prompt, steps, window, softcap): Case,
    ) -> Vec<Vec<f32>> {
        let t = |cols: usize, rows: usize, seed: usize| {
            let x = Compute::tensor(c, cols as u32);
            realm_compute::checked::write_tensor(c, &x, rows, values(cols * rows, seed))
                .expect("write");
            x
        };
        let (qw, kvw) = (heads as usize * hd, kv as usize * hd);
        let cache = Compute::cache(c, 1, 400, kv, hd as u32);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = Vec::new();
        let mut pos = 0;
        for (i, &rows) in std::iter::once(&prompt).chain(steps).enumerate() {
            let (q, k, v) = (
                t(qw, rows, 3 * i),
                t(kvw, rows, 3 * i + 1),
                t(kvw, rows, 3 * i + 2),
            );
            let att = Compute::tensor(c, qw as u32);
            Compute::attention(
                c, &q, &k, &v, &cache, 0, pos as u32, heads, scale, window, softcap, &att,
            )
            .expect("attention");
            out.push(
                (0..rows as u32)
                    .flat_map(|r| Compute::read_row(c, &att, r).expect("row"))
                    .collect(),
            );
            pos += rows;
        }
        out
    }
    for case in cases {
        let (on_gpu, on_cpu) = (run(&gpu, case), run(&cpu, case));
        for (step, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            let worst = g.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!(
                "{} heads of {}, step {step} ({} values): largest difference {worst}",
                case.0,
                case.2,
                g.len()
            );
            assert_eq!(g.len(), c.len());
            assert!(
                g.iter().zip(c).all(|(a, b)| a.to_bits() == b.to_bits()),
                "heads of {}, step {step}: largest difference {worst}",
                case.2
            );
        }
    }
}

/// A layer's decode ops as the GPU merges them (a norm taken over by the product after it,
/// q, k and v in one launch, an add folded into the product before it) against the same ops
/// on the CPU backend, for 1 and 3 rows: every output, the merged ones' too, the CPU's bits.
#[test]
fn merged_launches_agree_with_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let gpu = CudaBackend::new(dev, 1 << 32);
    let cpu = cpu();
    type Out = Vec<(&'static str, Vec<f32>)>;
    fn run<C: realm_compute::Backend>(
        c: &C,
        tys: [GgmlType; 3],
        k: usize,
        rows: usize,
        mode: realm_compute::RopeMode,
    ) -> Out {
        let norm: Vec<u8> = values(k, 9)
            .iter()
            .flat_map(|v| (v.abs() + 0.5).to_le_bytes())
            .collect();
        let norm_w = Compute::weight(
            c,
            &ModelBytes::new(Arc::new(norm)),
            0,
            GgmlType::F32,
            &[k as u64],
        )
        .expect("norm");
        // Heads of 64: SmolLM2's 9 sharing 3 for 576, else 4 KV heads.
        let kv = if k == 576 { 192 } else { k / 4 };
        let widths = [k, kv, kv];
        let ws: Vec<_> = tys
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (&ty, n))| {
                let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(
                    ty,
                    k,
                    n,
                    5 + i as u64,
                )));
                Compute::weight(c, &file, 0, ty, &[k as u64, n as u64]).expect("weight")
            })
            .collect();
        let x = Compute::tensor(c, k as u32);
        realm_compute::checked::write_tensor(c, &x, rows, values(k * rows, 1)).expect("write");
        let h = Compute::tensor(c, k as u32);
        let outs: Vec<_> = widths
            .iter()
            .map(|&n| Compute::tensor(c, n as u32))
            .collect();
        Compute::rms_norm(c, &x, &norm_w, 1e-5, &h).expect("norm");
        for (w, o) in ws.iter().zip(&outs) {
            Compute::matmul(c, &h, w, o).expect("matmul");
        }
        // RoPE of q and k, then attention (the keys and values stored by the RoPE launch;
        // in normal mode, by the q/k/v launch, which then rotates q and k too).
        let rope = realm_compute::RopeParams {
            mode,
            ..rope_params()
        };
        Compute::rope(c, &outs[0], 0, &rope, None).expect("rope");
        Compute::rope(c, &outs[1], 0, &rope, None).expect("rope");
        let cache = Compute::cache(c, 1, 16, (kv / 64) as u32, 64);
        let att = Compute::tensor(c, k as u32);
        let heads = (k / 64) as u32;
        Compute::attention(
            c, &outs[0], &outs[1], &outs[2], &cache, 0, 0, heads, 0.125, 0, 0.0, &att,
        )
        .expect("attention");
        // x += att · wq (the first weight again: an output projection and its add).
        let t = Compute::tensor(c, k as u32);
        Compute::matmul(c, &att, &ws[0], &t).expect("matmul");
        Compute::add(c, &x, &t).expect("add");
        // The feed-forward: norm, gate and up (one launch with their GLU), down and its add.
        let ff = 2 * k;
        let ffn: Vec<_> = [(tys[0], k, ff), (tys[0], k, ff), (tys[2], ff, k)]
            .iter()
            .enumerate()
            .map(|(i, &(ty, kk, n))| {
                let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(
                    ty,
                    kk,
                    n,
                    9 + i as u64,
                )));
                Compute::weight(c, &file, 0, ty, &[kk as u64, n as u64]).expect("weight")
            })
            .collect();
        let h2 = Compute::tensor(c, k as u32);
        let (gate, up, down) = (
            Compute::tensor(c, ff as u32),
            Compute::tensor(c, ff as u32),
            Compute::tensor(c, k as u32),
        );
        Compute::rms_norm(c, &x, &norm_w, 1e-5, &h2).expect("norm");
        Compute::matmul(c, &h2, &ffn[0], &gate).expect("matmul");
        Compute::matmul(c, &h2, &ffn[1], &up).expect("matmul");
        Compute::glu(c, &gate, &up, realm_compute::Activation::Silu).expect("glu");
        Compute::matmul(c, &up, &ffn[2], &down).expect("matmul");
        Compute::add(c, &x, &down).expect("add");
        let read = |x: &C::Tensor| -> Vec<f32> {
            (0..rows as u32)
                .flat_map(|r| Compute::read_row(c, x, r).expect("row"))
                .collect()
        };
        vec![
            ("gate", read(&gate)),
            ("up after the GLU", read(&up)),
            ("down", read(&down)),
            ("norm", read(&h)),
            ("q", read(&outs[0])),
            ("k", read(&outs[1])),
            ("v", read(&outs[2])),
            ("attention", read(&att)),
            ("o", read(&t)),
            ("x + o", read(&x)),
        ]
    }
    for (tys, k) in [
        ([GgmlType::Q4_1; 3], 576),
        ([GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_1], 576),
        ([GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K], 1024),
    ] {
        for (rows, mode) in [1, 3].into_iter().flat_map(|r| {
            [
                realm_compute::RopeMode::Neox,
                realm_compute::RopeMode::Normal,
            ]
            .map(|m| (r, m))
        }) {
            let on_gpu = run(&gpu, tys, k, rows, mode);
            let on_cpu = run(&cpu, tys, k, rows, mode);
            for ((name, g), (_, c)) in on_gpu.iter().zip(&on_cpu) {
                let same = g.iter().zip(c).all(|(a, b)| a.to_bits() == b.to_bits());
                println!(
                    "{tys:?} k {k}, {rows} rows, {mode:?}, {name}: {}",
                    if same { "same bits" } else { "DIFFERENT" }
                );
                assert!(
                    same,
                    "{tys:?}, {rows} rows, {mode:?}: {name} differs from the CPU's"
                );
            }
        }
    }
    // The merging itself: norm + q + k + v in one launch, the output projection and its add
    // in another (the reads above flushed every step; queue the ops again to count).
    let k = 576;
    let file = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(
        GgmlType::Q4_1,
        k,
        k,
        5,
    )));
    let w = Compute::weight(&gpu, &file, 0, GgmlType::Q4_1, &[k as u64, k as u64]).expect("weight");
    let norm_file = ModelBytes::new(Arc::new(vec![0x3f80_0000u32.to_le_bytes(); k].concat()));
    let norm_w = Compute::weight(&gpu, &norm_file, 0, GgmlType::F32, &[k as u64]).expect("norm");
    let [x, h, q, kk, v, t] = std::array::from_fn(|_| Compute::tensor(&gpu, k as u32));
    realm_compute::checked::write_tensor(&gpu, &x, 1, values(k, 1)).expect("write");
    Compute::rms_norm(&gpu, &x, &norm_w, 1e-5, &h).expect("norm");
    for o in [&q, &kk, &v] {
        Compute::matmul(&gpu, &h, &w, o).expect("matmul");
    }
    assert_eq!(gpu.queued(), 1, "norm, q, k and v: one launch");
    // The table made above: no flush.
    let rope = rope_params();
    Compute::rope(&gpu, &q, 0, &rope, None).expect("rope");
    Compute::rope(&gpu, &kk, 0, &rope, None).expect("rope");
    let cache = Compute::cache(&gpu, 1, 16, 9, 64);
    let att = Compute::tensor(&gpu, k as u32);
    Compute::attention(&gpu, &q, &kk, &v, &cache, 0, 0, 9, 0.125, 0, 0.0, &att).expect("attention");
    assert_eq!(
        gpu.queued(),
        3,
        "RoPE of q and k storing k and v, then attention"
    );
    Compute::matmul(&gpu, &q, &w, &t).expect("matmul");
    Compute::add(&gpu, &x, &t).expect("add");
    assert_eq!(
        gpu.queued(),
        4,
        "the output projection and its add: one more"
    );
    // The feed-forward's norm, gate, up and GLU: one launch; down and its add: one.
    let wide = ModelBytes::new(Arc::new(realm_kernels::synthetic::weights(
        GgmlType::Q4_1,
        k,
        2 * k,
        6,
    )));
    let wg =
        Compute::weight(&gpu, &wide, 0, GgmlType::Q4_1, &[k as u64, 2 * k as u64]).expect("weight");
    let (gate, up) = (
        Compute::tensor(&gpu, 2 * k as u32),
        Compute::tensor(&gpu, 2 * k as u32),
    );
    Compute::rms_norm(&gpu, &x, &norm_w, 1e-5, &h).expect("norm");
    Compute::matmul(&gpu, &h, &wg, &gate).expect("matmul");
    Compute::matmul(&gpu, &h, &wg, &up).expect("matmul");
    Compute::glu(&gpu, &gate, &up, realm_compute::Activation::GeluTanh).expect("glu");
    assert_eq!(gpu.queued(), 5, "norm, gate, up and their GLU: one more");
    // A product writing the norm's own input is not merged into it (it would race).
    Compute::rms_norm(&gpu, &x, &norm_w, 1e-5, &h).expect("norm");
    Compute::matmul(&gpu, &h, &w, &x).expect("matmul");
    assert_eq!(gpu.queued(), 7);
}

/// RoPE as llama's (NeoX pairs, heads of 64).
fn rope_params() -> realm_compute::RopeParams {
    realm_compute::RopeParams {
        head_dim: 64,
        n_rot: 64,
        mode: realm_compute::RopeMode::Neox,
        freq_base: 10_000.0,
        freq_scale: 1.0,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 4096,
    }
}
