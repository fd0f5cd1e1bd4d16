//! A command that uses Spin's LLM interface the way a Spin app does.
//!
//! - `realm-spin-app infer MODEL PROMPT [MAX_TOKENS]`: greedy (temperature 0) when
//!   MAX_TOKENS is given, Spin's default parameters (`none`) otherwise; prints the text,
//!   then `usage: PROMPT_TOKENS GENERATED_TOKENS`.
//! - `realm-spin-app embed MODEL TEXT...`: prints `embeddings: COUNT x DIMS`, each norm,
//!   the cosine similarity of the first two, and `usage: PROMPT_TOKENS`.
//!
//! Errors are printed as `llm error: …` with exit status 1.

wit_bindgen::generate!({
    path: "wit",
    world: "app",
    generate_all,
});

use fermyon::spin::llm::{self, InferencingParams};

fn fail(e: llm::Error) -> ! {
    println!("llm error: {e:?}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["infer", model, prompt, rest @ ..] => {
            let params = rest.first().map(|n| InferencingParams {
                max_tokens: n.parse().unwrap_or(16),
                repeat_penalty: 1.0,
                repeat_penalty_last_n_token_count: 64,
                temperature: 0.0,
                top_k: 40,
                top_p: 0.9,
            });
            let r = llm::infer(model, prompt, params).unwrap_or_else(|e| fail(e));
            println!("{}", r.text);
            println!(
                "usage: {} {}",
                r.usage.prompt_token_count, r.usage.generated_token_count
            );
        }
        ["embed", model, texts @ ..] => {
            let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
            let r = llm::generate_embeddings(model, &texts).unwrap_or_else(|e| fail(e));
            let dims = r.embeddings.first().map_or(0, Vec::len);
            println!("embeddings: {} x {dims}", r.embeddings.len());
            for e in &r.embeddings {
                println!("norm: {:.4}", e.iter().map(|v| v * v).sum::<f32>().sqrt());
            }
            if let [a, b, ..] = r.embeddings.as_slice() {
                let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                println!("cosine: {cos:.4}");
            }
            println!("usage: {}", r.usage.prompt_token_count);
        }
        _ => {
            eprintln!(
                "usage: realm-spin-app infer MODEL PROMPT [MAX_TOKENS] | embed MODEL TEXT..."
            );
            std::process::exit(2);
        }
    }
}
