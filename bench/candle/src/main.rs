//! `candle-bench MODEL.gguf RUNS PP,PP TG`: prompt processing and generation tokens/s of
//! candle-transformers' quantized llama or Gemma 3 on one GGUF (Candle's CPU backend, its
//! threads from `RAYON_NUM_THREADS`). Prints one JSON object: `{"pp64": [tok/s per run],
//! …, "tg128": […], "rss": peak bytes}`. Token ids are fixed (no tokenizer needed): every
//! prompt is one id repeated, and generation feeds back the argmax, as Realm's and
//! llama.cpp's benches do.

use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama};

enum Model {
    Llama(quantized_llama::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl Model {
    fn forward(&mut self, ids: &[u32], pos: usize) -> anyhow::Result<Tensor> {
        let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        Ok(match self {
            Model::Llama(m) => m.forward(&x, pos)?,
            Model::Gemma3(m) => m.forward(&x, pos)?,
        })
    }
}

fn load(path: &str) -> anyhow::Result<Model> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    let content = gguf_file::Content::read(&mut file)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(v) => v.to_string()?.clone(),
        None => bail!("{path} has no general.architecture"),
    };
    Ok(match arch.as_str() {
        "llama" => Model::Llama(quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
        "gemma3" => Model::Gemma3(quantized_gemma3::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
        other => bail!("candle-bench knows llama and gemma3, not {other}"),
    })
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, runs, pps, tg] = &args[..] else {
        bail!("usage: candle-bench MODEL.gguf RUNS PP,PP TG");
    };
    let runs: usize = runs.parse()?;
    let tg: usize = tg.parse()?;
    let mut out = serde_json::Map::new();
    for pp in pps.split(',') {
        let pp: usize = pp.parse()?;
        let mut v = Vec::new();
        for _ in 0..runs {
            // A fresh model per run: Candle's KV cache only grows.
            let mut m = load(model)?;
            let ids = vec![1u32; pp];
            let t = Instant::now();
            m.forward(&ids, 0)?;
            v.push(pp as f64 / t.elapsed().as_secs_f64());
        }
        out.insert(format!("pp{pp}"), v.into());
    }
    let mut v = Vec::new();
    for _ in 0..runs {
        let mut m = load(model)?;
        let logits = m.forward(&[1u32; 16], 0)?;
        let mut next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        let t = Instant::now();
        for i in 0..tg {
            let logits = m.forward(&[next], 16 + i)?;
            next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        }
        v.push(tg as f64 / t.elapsed().as_secs_f64());
    }
    out.insert(format!("tg{tg}"), v.into());
    out.insert("rss".into(), peak_rss().into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
