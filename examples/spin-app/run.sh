#!/usr/bin/env bash
# A component that imports only Spin's `fermyon:spin/llm@2.0.0` (tests/spin-app), composed
# with the Spin adapter and the Realm component by `realm plug`, run by `realm run-wasm`.
# Usage: examples/spin-app/run.sh ["question"]   (from the repository root, after `make build`)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q --target wasm32-wasip2 -p realm-spin-llm -p realm-spin-app
out=target/wasm32-wasip2/release
mkdir -p target/tmp
./target/release/realm plug $out/realm_spin_llm.wasm --plug $out/realm_guest.wasm -o target/tmp/spin-llm-realm.wasm
./target/release/realm plug $out/realm-spin-app.wasm --plug target/tmp/spin-llm-realm.wasm -o target/tmp/spin-app.wasm
question=${1:-What is the capital of France? Answer in one word.}
prompt=$'<|im_start|>user\n'"$question"$'<|im_end|>\n<|im_start|>assistant\n'
./target/release/realm run-wasm --model smol=models/SmolLM2-135M-Instruct.Q4_1.gguf \
    target/tmp/spin-app.wasm infer smol "$prompt" 32
./target/release/realm run-wasm --model smol=models/SmolLM2-135M-Instruct.Q4_1.gguf \
    target/tmp/spin-app.wasm embed smol "The cat sat on the mat." "A cat was sitting on the mat."
