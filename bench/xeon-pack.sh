#!/usr/bin/env bash
# Packs what bench/xeon.sh needs on the GPU machine's 16-core Xeon (no Rust, no network,
# at most 64 MiB per command) into .xeon/ (git-ignored), in three loads:
#   .xeon/p1: a stripped `realm`, the guest component, the llama.cpp tree (no models/; its UI sources, which llama-server links)
#   .xeon/p2, .xeon/p3: the two halves of MODEL
# Then three back-to-back device runs (the machine keeps /tmp while warm):
#   carry .xeon/p1: bench/xeon.sh setup     (builds llama-bench, native and AVX2-only)
#   carry .xeon/p2: bench/xeon.sh part .xeon/p2
#   carry .xeon/p3: bench/xeon.sh run .xeon/p3    (compare.py at 1-16 threads → $OUT)
# Usage: bench/xeon-pack.sh [MODEL]   (after `make build` and `make test-models`)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
# .xeon/ is in .gitignore: it must never be committed (~150 MB).
rm -rf .xeon && mkdir -p .xeon/p1 .xeon/p2 .xeon/p3
strip -o .xeon/p1/realm target/release/realm
cp target/wasm32-wasip2/release/realm_guest.wasm .xeon/p1/
tar -C target/llama.cpp/src --exclude=./models --exclude=./docs \
    --exclude=./examples --exclude=./media --exclude=./tests -cJf .xeon/p1/llama.cpp.tar.xz .
size=$(stat -c %s "$MODEL")
half=$((size / 2))
head -c "$half" "$MODEL" > .xeon/p2/model.0
tail -c +"$((half + 1))" "$MODEL" > .xeon/p3/model.1
basename "$MODEL" > .xeon/p3/name
sha256sum "$MODEL" | cut -d' ' -f1 > .xeon/p3/sha256
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +changes)" > .xeon/p3/commit
du -sh .xeon/p1 .xeon/p2 .xeon/p3
