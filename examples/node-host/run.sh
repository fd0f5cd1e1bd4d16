#!/usr/bin/env bash
# Realm from Node.js: the self-contained component transpiled by jco
# (tests/hosts/node/node_host.mjs), greedy.
# Usage: examples/node-host/run.sh ["question"]   (from the repository root; `make node-host`
# builds what it needs)
set -euo pipefail
cd "$(dirname "$0")/../.."
node tests/hosts/node/node_host.mjs models models/SmolLM2-135M-Instruct.Q4_1.gguf \
    "${1:-What is the capital of France? Answer in one word.}" 16
