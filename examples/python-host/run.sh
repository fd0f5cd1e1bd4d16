#!/usr/bin/env bash
# Realm from Python: the self-contained component run by the `wasmtime` package's
# component API (tests/hosts/python_host.py), greedy.
# Usage: examples/python-host/run.sh ["question"]   (from the repository root; `make test`
# or `make standalone .venv/.ok` builds what it needs)
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python tests/hosts/python_host.py target/wasm32-wasip2/release/realm-standalone.wasm \
    models models/SmolLM2-135M-Instruct.Q4_1.gguf \
    "${1:-What is the capital of France? Answer in one word.}" 16
