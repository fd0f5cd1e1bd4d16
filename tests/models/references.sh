#!/usr/bin/env bash
# Re-makes tests/reference/tiny-models/: llama.cpp's greedy ids, top-2 gaps and top logits
# for every tiny model Realm runs (tests/models/make.py) on tests/models/prompts.jsonl, 32 tokens each,
# one CPU thread, flash attention. Run after `make test-models`; commit what changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
REF=target/llama.cpp/build/realm-llama-ref
OUT=tests/reference/tiny-models
[ -x "$REF" ] || scripts/llama-cpp.sh realm-llama-ref
mkdir -p "$OUT"
for model in target/test-models/*.gguf; do
  name=$(basename "$model" .gguf)
  # Files Realm refuses (tests/models/make.py) need no reference.
  case "$name" in *-q-bias.* | *-longrope.*) continue ;; esac
  echo "llama.cpp greedy: $name" >&2
  "$REF" "$model" 32 < tests/models/prompts.jsonl > "$OUT/$name.jsonl"
done
(cd target/test-models && sha256sum *.gguf) > tests/models/sha256sums
