#!/usr/bin/env bash
# Runs on the GPU machine's Xeon (see bench/xeon-pack.sh): `setup` unpacks Realm and the
# llama.cpp tree and builds llama-bench (native, and AVX2-only) with every core; `part DIR`
# keeps the first half of the model; `run DIR` joins the halves, checks the sha256, and
# runs bench/compare.py (no Candle: its bench is a Rust build) at 1, 2, 4, 8 and 16
# threads, leaving the table in $OUT/compare.md. For the server comparison instead:
# `setup` with LLAMA_TARGETS=llama-server VARIANTS=native, then `serve DIR`: bench/serve.py
# with every core for both servers, leaving its section in $OUT/serve.md.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=/tmp/realm-xeon
case "$1" in
  setup)
    rm -rf "$KEEP" && mkdir -p "$KEEP/llama.cpp/src"
    cp .xeon/p1/realm .xeon/p1/realm_guest.wasm "$KEEP/"
    tar -C "$KEEP/llama.cpp/src" -xJf .xeon/p1/llama.cpp.tar.xz
    for v in ${VARIANTS:-native avx2}; do
      # shellcheck disable=SC2086  # a list of targets
      LLAMA_CPP_OFFLINE=1 LLAMA_CPP_DIR="$KEEP/llama.cpp" LLAMA_CPP_VARIANT=$v JOBS=$(nproc) \
        scripts/llama-cpp.sh ${LLAMA_TARGETS:-llama-bench} > "$KEEP/build-$v.log" 2>&1 || { tail -30 "$KEEP/build-$v.log"; exit 1; }
    done
    ls -la "$KEEP"/llama.cpp/build*/bin/llama-*
    ;;
  part) cp "$2/model.0" "$KEEP/" ;;
  run)
    mkdir -p target/release target/wasm32-wasip2/release target/llama.cpp models
    cp "$KEEP/realm" target/release/ && cp "$KEEP/realm_guest.wasm" target/wasm32-wasip2/release/
    for v in build build-avx2; do
      mkdir -p "target/llama.cpp/$v" && cp -r "$KEEP/llama.cpp/$v/bin" "target/llama.cpp/$v/"
    done
    model="models/$(cat "$2/name")"
    cat "$KEEP/model.0" "$2/model.1" > "$model"
    echo "$(cat "$2/sha256")  $model" | sha256sum -c
    lscpu | grep -E "Model name|^CPU\(s\)|L3" || true
    REALM_COMMIT=$(cat "$2/commit") NO_CANDLE=1 THREADS=${THREADS:-1,2,4,8,16} RUNS=${RUNS:-5} python3 bench/compare.py "$model" \
      | tee "${OUT:-/tmp}/compare.md"
    ;;
  serve)
    mkdir -p target/release target/wasm32-wasip2/release target/llama.cpp/build models .venv/bin
    cp "$KEEP/realm" target/release/ && cp "$KEEP/realm_guest.wasm" target/wasm32-wasip2/release/
    cp -r "$KEEP/llama.cpp/build/bin" target/llama.cpp/build/
    # The machine's Python (itself a venv) has httpx, which the load test needs; a symlink
    # to it would lose its venv, so a wrapper.
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python
    chmod +x .venv/bin/python
    model="models/$(cat "$2/name")"
    cat "$KEEP/model.0" "$2/model.1" > "$model"
    echo "$(cat "$2/sha256")  $model" | sha256sum -c
    lscpu | grep -E "Model name|^CPU\(s\)|L3" || true
    REALM_COMMIT=$(cat "$2/commit") THREADS=${THREADS:-$(nproc)} python3 bench/serve.py "$model" | tee "${OUT:-/tmp}/serve.md"
    ;;
  *) echo "usage: bench/xeon.sh setup | part DIR | run DIR | serve DIR" >&2; exit 2 ;;
esac
