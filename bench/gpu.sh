#!/usr/bin/env bash
# The GPU tests and benchmark on a machine with an NVIDIA GPU but no Rust (this project's
# GPU machine): `prepare` builds here what runs there, `remote` is what runs there.
#
#   bench/gpu.sh prepare   # here: .gpu/ (test binary, realm, guest), .gpu1/ and .gpu2/
#                          # (the model in halves: at most 64 MiB travels per command)
#   then, on the GPU machine, three commands back to back (its scratch survives only
#   while it is warm), carrying .gpu, then .gpu1, then .gpu2:
#     bench/gpu.sh stage .gpu        bench/gpu.sh stage .gpu1        bench/gpu.sh remote
#
# `remote` runs the GPU tests with REALM_REQUIRE_GPU=1 (SmolLM2 on the GPU against the CPU
# backend), `realm run --device cuda` and `realm bench` on the GPU and on all CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
SCRATCH=${SCRATCH:-/tmp/realm-gpu}

case "${1:-}" in
prepare)
    cargo test --release -j2 -p realm-cuda --no-run
    cargo build --release -j2 -p realm-cli
    make guest
    mkdir -p .gpu .gpu1 .gpu2
    for d in .gpu .gpu1 .gpu2; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude; done
    test=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
    cp "$test" .gpu/gpu-test && strip .gpu/gpu-test
    cp target/release/realm .gpu/realm && strip .gpu/realm
    cp target/wasm32-wasip2/release/realm_guest.wasm .gpu/
    rm -f .gpu1/* .gpu2/*
    half=$(( ($(stat -c %s "$MODEL") + 1) / 2 ))
    split -b "$half" "$MODEL" .gpu1/model.part.
    mv .gpu1/model.part.ab .gpu2/
    md5sum "$MODEL" | cut -d' ' -f1 >.gpu/model.md5
    du -sh .gpu .gpu1 .gpu2
    ;;
stage)
    mkdir -p "$SCRATCH" && cp "${2:?a folder to stage}"/* "$SCRATCH"/
    ls -la "$SCRATCH"
    ;;
remote)
    cp .gpu2/* "$SCRATCH"/
    cat "$SCRATCH"/model.part.aa "$SCRATCH"/model.part.ab >"$SCRATCH"/model.gguf
    test "$(md5sum "$SCRATCH"/model.gguf | cut -d' ' -f1)" = "$(cat "$SCRATCH"/model.md5)"
    # The test binary finds the llama.cpp references in this checkout.
    export REALM_ROOT=$PWD
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    grep -m1 'model name' /proc/cpuinfo
    REALM_REQUIRE_GPU=1 REALM_GPU_MODEL="$SCRATCH"/model.gguf "$SCRATCH"/gpu-test --nocapture
    "$SCRATCH"/realm run --device cuda --model "$SCRATCH"/model.gguf --temp 0 -n 24 "What is the capital of France?"
    "$SCRATCH"/realm bench --device cuda --model "$SCRATCH"/model.gguf -t 1 -p 64,512 -n 128 --runs 3
    "$SCRATCH"/realm bench --model "$SCRATCH"/model.gguf -t "$(nproc)" -p 64,512 -n 128 --runs 3
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
