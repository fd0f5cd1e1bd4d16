//! `realm bench`: prompt processing and generation speed through the full component path
//! (guest → WIT → host), as median, min and max of several runs, with the decode time split
//! into host op classes and the rest (WIT crossings and guest work).

use std::path::Path;

use anyhow::Context;
use realm_host::{Engine, EngineConfig, Model, Params, Prompt};

/// Peak resident set of this process, from /proc (0 where unavailable).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of weights one decode step reads: every matrix once (the token embedding only
/// where it doubles as the output matrix; otherwise one row of it, ignored here).
fn decode_weight_bytes(path: &Path) -> anyhow::Result<u64> {
    let src = realm_gguf::FileSource::open(path)?;
    let file = realm_gguf::GgufFile::read(&src)?;
    let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
    Ok(file
        .tensors
        .iter()
        .filter(|t| t.dims.len() >= 2 && (tied || t.name != "token_embd.weight"))
        .map(|t| t.n_bytes)
        .sum())
}

/// The last-level cache's size in bytes (Linux sysfs: the highest cache level of CPU 0),
/// or None where the system does not say.
fn llc_bytes() -> Option<u64> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut best: Option<(u32, u64)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).ok();
        let (Some(level), Some(size)) = (read("level"), read("size")) else {
            continue;
        };
        let Ok(level) = level.trim().parse::<u32>() else {
            continue;
        };
        let size = size.trim();
        let (num, unit) = size.split_at(
            size.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(size.len()),
        );
        let Ok(num) = num.parse::<u64>() else {
            continue;
        };
        let bytes = num
            * match unit {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => 1,
            };
        if best.is_none_or(|(l, _)| level > l) {
            best = Some((level, bytes));
        }
    }
    best.map(|(_, b)| b)
}

/// Read bandwidth of main memory with `threads` threads: the best of five passes summing
/// a buffer four times the last-level cache (512 MiB at least, 4 GiB at most), in bytes
/// per second. A decode step reads every weight once, so where the weights do not fit in
/// the cache, bandwidth / weight bytes bounds decode tokens/s.
fn read_bandwidth(threads: usize) -> anyhow::Result<f64> {
    let bytes = llc_bytes()
        .unwrap_or(0)
        .saturating_mul(4)
        .clamp(512 << 20, 4 << 30);
    let len = (bytes / 8) as usize; // u64 words
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let buf: Vec<u64> = (0..len as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(len.div_ceil(threads))
                .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((len * 8) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn params(max_tokens: u32) -> Params {
    Params {
        max_tokens,
        temperature: 0.0,
        repeat_last_n: 0,
        ignore_eog: true,
        ..realm_host::neutral_params()
    }
}

/// A raw prompt of about `n` tokens ("the the the …": one token per word in common vocabularies).
fn prompt_of(n: u32) -> Prompt {
    let mut s = String::from("the");
    for _ in 1..n {
        s.push_str(" the");
    }
    Prompt::Text(s)
}

#[derive(Debug, Clone, Copy, Default)]
struct Split {
    matmul: f64,
    attention: f64,
    other: f64,
    /// Reading results back (on a GPU: waiting for the queued ops, where its time shows).
    reads: f64,
    rest: f64,
}

fn stats(v: &mut [f64]) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let med = v[v.len() / 2];
    serde_json::json!({ "median": med, "min": v[0], "max": v[v.len() - 1] })
}

/// Context of every measured session: the peers are run with the same.
const BENCH_CTX: u32 = 1024;

fn prefill(model: &mut Model, n: u32) -> anyhow::Result<(f64, u32)> {
    let mut session = model.session(BENCH_CTX)?;
    let mut g = session.generate(prompt_of(n), params(1))?;
    for piece in &mut g {
        piece?;
    }
    let u = g.usage()?;
    Ok((
        f64::from(u.prompt_tokens) / (u.prefill_ns as f64 / 1e9),
        u.prompt_tokens,
    ))
}

fn decode(model: &mut Model, n: u32) -> anyhow::Result<(f64, Split)> {
    let mut session = model.session(BENCH_CTX)?;
    let mut g = session.generate(prompt_of(16), params(n))?;
    let before = g.model().compute_stats();
    for piece in &mut g {
        piece?;
    }
    let u = g.usage()?;
    let after = g.model().compute_stats();
    let total = u.decode_ns as f64;
    let share = |a: u64, b: u64| (a - b) as f64 / total;
    let s = Split {
        matmul: share(after.matmul_ns, before.matmul_ns),
        attention: share(after.attention_ns, before.attention_ns),
        other: share(after.other_ns, before.other_ns),
        reads: share(after.read_ns, before.read_ns),
        rest: 0.0,
    };
    let rest = (1.0 - s.matmul - s.attention - s.other - s.reads).max(0.0);
    let tps = f64::from(u.generated_tokens.saturating_sub(1)) / (total / 1e9);
    Ok((tps, Split { rest, ..s }))
}

#[allow(clippy::too_many_arguments, reason = "the bench command's options")]
pub fn run(
    path: &Path,
    device: &str,
    gpu_layers: Option<usize>,
    threads: &[usize],
    prompts: &[u32],
    n_gen: u32,
    runs: usize,
    max_resident: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let weight_bytes =
        decode_weight_bytes(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut results = Vec::new();
    for &t in threads {
        anyhow::ensure!(t > 0, "thread counts must be at least 1");
        let config = EngineConfig {
            threads: t,
            max_resident,
            device: device.to_string(),
            gpu_layers,
            ..EngineConfig::default()
        };
        let engine = Engine::new(config)?;
        let mut model = engine
            .load_model(path)
            .with_context(|| format!("cannot load {}", path.display()))?;
        let mut entry = serde_json::json!({ "threads": t });
        for &p in prompts {
            let mut v = Vec::new();
            let mut actual = p;
            for _ in 0..runs {
                let (tps, n) = prefill(&mut model, p)?;
                v.push(tps);
                actual = n;
            }
            entry[format!("pp{p}")] =
                serde_json::json!({ "tokens": actual, "tokens_per_s": stats(&mut v) });
        }
        let mut v = Vec::new();
        let mut split = Split::default();
        for _ in 0..runs {
            let (tps, s) = decode(&mut model, n_gen)?;
            v.push(tps);
            split = s;
        }
        entry[format!("tg{n_gen}")] = serde_json::json!({
            "tokens_per_s": stats(&mut v),
            "decode_time_share": {
                "matmul": split.matmul, "attention": split.attention, "other_ops": split.other,
                "reads": split.reads, "wit_and_guest": split.rest,
            },
        });
        let store = model.store_stats();
        entry["weights"] = serde_json::json!({
            "peak_resident_bytes": store.peak_resident_bytes, "loads": store.loads,
            "evictions": store.evictions, "prefetch_hits": store.prefetch_hits,
        });
        results.push(entry);
    }
    // Taken before the bandwidth probe's buffer raises it.
    let peak_rss = peak_rss_bytes();
    let llc = llc_bytes();
    // Where the weights fit in the last-level cache, decode is bound by compute: there is
    // no memory ceiling to compare with (nor on a GPU), so no probe (its buffer is four
    // times the cache: seconds of page faults).
    let fits = llc.is_some_and(|c| weight_bytes <= c);
    if device == "cpu" && !fits {
        for entry in &mut results {
            let t = entry["threads"].as_u64().unwrap_or(1) as usize;
            let bw = read_bandwidth(t)?;
            entry["read_bandwidth_bytes_per_s"] = serde_json::json!(bw);
            entry["decode_ceiling_tokens_per_s"] = serde_json::json!(bw / weight_bytes as f64);
        }
    }
    let device_name = match device {
        "cpu" => cpu_model(),
        cuda => realm_host::compute::cuda_device(cuda).map_or_else(|e| e, |d| d.name().to_string()),
    };
    let out = serde_json::json!({
        "model": path.display().to_string(),
        "device": device,
        "device_name": device_name,
        "gpu_layers": gpu_layers,
        "runs": runs,
        "peak_rss_bytes": peak_rss,
        "decode_weight_bytes": weight_bytes,
        "llc_bytes": llc,
        "weights_fit_in_llc": fits,
        "kernels": format!("{:?}", realm_host::compute::quant::kernel_level()).to_lowercase(),
        "results": results,
    });
    if json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "model {} · {runs} runs each · peak RSS {} MiB · device {device} ({device_name}){} · CPU kernels {}",
        path.display(),
        peak_rss >> 20,
        gpu_layers.map_or(String::new(), |n| format!(
            ", first {n} blocks on it, the rest on the CPU"
        )),
        out["kernels"].as_str().unwrap_or("?")
    );
    println!("| threads | test | tokens/s median | min | max |");
    println!("|---|---|---|---|---|");
    for r in out["results"].as_array().into_iter().flatten() {
        let t = &r["threads"];
        for (k, v) in r.as_object().into_iter().flatten() {
            if let Some(s) = v.get("tokens_per_s") {
                println!(
                    "| {t} | {k} | {:.1} | {:.1} | {:.1} |",
                    s["median"].as_f64().unwrap_or(0.0),
                    s["min"].as_f64().unwrap_or(0.0),
                    s["max"].as_f64().unwrap_or(0.0)
                );
            }
        }
        let sh = &r[format!("tg{n_gen}")]["decode_time_share"];
        println!(
            "|   | decode time | matmul {:.0} % · attention {:.0} % · other ops {:.0} % · {} {:.0} % · WIT + guest {:.0} % |||",
            sh["matmul"].as_f64().unwrap_or(0.0) * 100.0,
            sh["attention"].as_f64().unwrap_or(0.0) * 100.0,
            sh["other_ops"].as_f64().unwrap_or(0.0) * 100.0,
            // A GPU's ops are queued, their time spent where results are read.
            if device == "cpu" {
                "reads"
            } else {
                "reads (the GPU's queued ops)"
            },
            sh["reads"].as_f64().unwrap_or(0.0) * 100.0,
            sh["wit_and_guest"].as_f64().unwrap_or(0.0) * 100.0
        );
        if device != "cpu" {
            // The CPU's memory ceiling says nothing about a GPU's.
        } else if fits {
            println!(
                "|   | memory ceiling | none: {:.1} MB of weights fit in the {} MiB last-level cache, decode is compute-bound |||",
                weight_bytes as f64 / 1e6,
                llc.unwrap_or(0) >> 20
            );
        } else {
            println!(
                "|   | memory ceiling | {:.1} GB/s read ÷ {:.1} MB of weights per token = {:.0} tok/s |||",
                r["read_bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e9,
                weight_bytes as f64 / 1e6,
                r["decode_ceiling_tokens_per_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// The CPU's model name (`/proc/cpuinfo`), or "unknown CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
