#!/usr/bin/env bash
# A LlamaEdge-style wasi-nn app (tests/wasi-nn-app, written against the wasi-nn WIT only)
# on Realm: `realm run-wasm --nn-preload` serves its wasi:nn imports.
# Usage: examples/wasi-nn-app/run.sh ["question"]   (from the repository root, after `make build`)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q --target wasm32-wasip2 -p realm-nn-app
question=${1:-What is the capital of France? Answer in one word.}
# The app sends the prompt as is: SmolLM2's chat format, written out.
prompt=$'<|im_start|>user\n'"$question"$'<|im_end|>\n<|im_start|>assistant\n'
./target/release/realm run-wasm \
    --nn-preload default:GGML:AUTO:models/SmolLM2-135M-Instruct.Q4_1.gguf \
    target/wasm32-wasip2/release/realm-nn-app.wasm \
    default "$prompt" '{"n-predict": 32, "temp": 0}'
