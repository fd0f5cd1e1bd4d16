//! A wasi-nn app written against the `wasi:nn@0.2.0-rc-2024-10-28` WIT only, the way
//! LlamaEdge apps drive WasmEdge's GGML plugin: load a preloaded graph by name, pass the
//! prompt (u8 tensor) and optional metadata JSON, `compute`, print output tensor 0.
//!
//! Usage: `realm-nn-app NAME PROMPT [METADATA_JSON] [--f32-prompt]`. With `--f32-prompt`
//! the prompt goes in as an f32 tensor, which the backend must refuse. A wasi-nn error is
//! printed as `wasi-nn error (CODE): MESSAGE` and the app exits with status 1.

wit_bindgen::generate!({
    path: "../../adapters/wasi-nn/wit",
    world: "ml",
    generate_all,
});

use wasi::nn::errors::Error;
use wasi::nn::graph;
use wasi::nn::tensor::{Tensor, TensorType};

fn fail(e: Error) -> ! {
    println!("wasi-nn error ({:?}): {}", e.code(), e.data());
    std::process::exit(1);
}

fn bytes(b: &[u8]) -> Tensor {
    Tensor::new(&[b.len() as u32], TensorType::U8, b)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f32_prompt = args.iter().any(|a| a == "--f32-prompt");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--f32-prompt").collect();
    let (Some(name), Some(prompt)) = (args.first(), args.get(1)) else {
        eprintln!("usage: realm-nn-app NAME PROMPT [METADATA_JSON] [--f32-prompt]");
        std::process::exit(2);
    };
    let graph = graph::load_by_name(name).unwrap_or_else(|e| fail(e));
    let ctx = graph.init_execution_context().unwrap_or_else(|e| fail(e));
    let prompt = if f32_prompt {
        let v: Vec<u8> = prompt
            .bytes()
            .flat_map(|b| f32::from(b).to_le_bytes())
            .collect();
        Tensor::new(&[prompt.len() as u32], TensorType::Fp32, &v)
    } else {
        bytes(prompt.as_bytes())
    };
    let mut inputs = vec![("prompt".to_string(), prompt)];
    if let Some(meta) = args.get(2) {
        inputs.push(("metadata".to_string(), bytes(meta.as_bytes())));
    }
    let outputs = ctx.compute(inputs).unwrap_or_else(|e| fail(e));
    let Some((_, text)) = outputs.first() else {
        eprintln!("compute returned no output tensor");
        std::process::exit(3);
    };
    println!("{}", String::from_utf8_lossy(&text.data()));
}
