#!/usr/bin/env bash
# The GPU tests and benchmark on a machine with an NVIDIA GPU but no Rust (this project's
# GPU machine): `prepare` builds here what runs there; the rest runs there.
#
#   bench/gpu.sh prepare   # here: .gpu/ (test binary, realm, guest), .gpu1/ (half the
#                          # model, the llama.cpp tree) and .gpu2/ (the other half): at
#                          # most 64 MiB travels per command
#   then, on the GPU machine, back to back (its scratch survives only while it is warm),
#   carrying .gpu, then .gpu1, then .gpu2:
#     bench/gpu.sh stage .gpu        bench/gpu.sh stage .gpu1        bench/gpu.sh remote
#   and, for the side-by-side with llama.cpp's CUDA build (same machine, same run):
#     bench/gpu.sh llama     # builds llama-bench and llama-quantize for sm_90 (~5-8 min)
#     bench/gpu.sh quantizer # or only llama-quantize, CPU build (~1 min): enough for synth
#     bench/gpu.sh synth     # the 1B-class synthetic model (bench/gpu-synth.py), Q4_K_M
#     bench/gpu.sh bg llama  # (or bg quantizer) that build, then synth, detached: start it
#                            # right after staging .gpu1, run `remote` meanwhile; compare,
#                            # profile and parity1b wait for it
#     bench/gpu.sh compare   # llama-bench -fa 1 -ngl 99 and `realm bench --device cuda`
#                            # on SmolLM2 and the 1B model: pp512 and tg128
#     bench/gpu.sh parity1b  # the GPU-vs-CPU greedy test on the 1B model
#     bench/gpu.sh ab "" "REALM_CUDA_MATVEC_WARPS=16"  # variants side by side (env settings;
#                            # REALM_CUDA_DEFINES=A=1,B=2 for kernel macros)
#     bench/gpu.sh parts     # decode with whole steps and with parts of several growths
#     bench/gpu.sh profile   # ncu over decode steps of both models: per-kernel shares
#                            # (bench/gpu-profile.py), clocks and caches as in a real run
#     bench/gpu.sh profile-pp # the same over a 512-token prompt of each model
#                            # (MODELS="a.gguf ..." instead of both, without waiting for bg)
#     bench/gpu.sh sass K [M] # one decode launch of kernel K (on model M, default SmolLM2):
#                            # ncu's instruction and stall statistics, and its SASS source
#                            # view (CSV into $OUT when set) summed by bench/gpu-sass.py;
#                            # PROMPT=512 SKIP=4 for the fifth launch of K in a prompt's
#
# `remote` runs the GPU tests with REALM_REQUIRE_GPU=1 (SmolLM2 on the GPU against the CPU
# backend), `realm run --device cuda` and `realm bench` on the GPU; `offload` the partial
# offload (--gpu-layers) and the CPU-only run on all cores (slower: its own call, not while a
# background build shares the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
SCRATCH=${SCRATCH:-/tmp/realm-gpu}

# Waits (up to 10 minutes) for a `bg` job started in this scratch folder, if any.
wait_bg() {
    [ -f "$SCRATCH/bg.started" ] || return 0
    for _ in $(seq 300); do
        [ -f "$SCRATCH/bg.done" ] && break
        sleep 2
    done
    [ -f "$SCRATCH/bg.done" ] || { echo "the background build has not finished" >&2; exit 1; }
    [ -f "$SCRATCH/bg.ok" ] || { tail -20 "$SCRATCH/bg.log" >&2; echo "the background build failed" >&2; exit 1; }
    tail -3 "$SCRATCH/bg.log"
}

case "${1:-}" in
prepare)
    cargo test --release -j2 -p realm-cuda --no-run
    cargo build --release -j2 -p realm-cli
    make guest
    mkdir -p .gpu .gpu1 .gpu2
    mkdir -p .git/info
    for d in .gpu .gpu1 .gpu2; do grep -qsx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude; done
    test=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
    cp "$test" .gpu/gpu-test && strip .gpu/gpu-test
    cp target/release/realm .gpu/realm && strip .gpu/realm
    cp target/wasm32-wasip2/release/realm_guest.wasm .gpu/
    rm -f .gpu1/* .gpu2/*
    half=$(( ($(stat -c %s "$MODEL") + 1) / 2 ))
    split -b "$half" "$MODEL" .gpu1/model.part.
    mv .gpu1/model.part.ab .gpu2/
    md5sum "$MODEL" | cut -d' ' -f1 >.gpu/model.md5
    # The llama.cpp tree for its CUDA build there (its gguf-py, and of its models only the
    # vocabulary the synthetic 1B model uses).
    tar -C target/llama.cpp/src --exclude=./docs --exclude=./examples --exclude=./media \
        --exclude=./tests --exclude='./models/*' -cJf .gpu1/llama.cpp.tar.xz .
    cp target/llama.cpp/src/models/ggml-vocab-llama-spm.gguf .gpu1/
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
    ;;
ab)
    # Variants side by side: `bench/gpu.sh ab "" "REALM_CUDA_DEFINES=MV_CH=8,X=1"
    # "REALM_CUDA_MATVEC_WARPS=16" ...`, each set of environment settings ("" none) in turn,
    # twice (ROUNDS=N: N times): prompt and decode rates of AB_MODEL (default SmolLM2), or
    # what AB_RUN asks of `realm bench` (default "-p 512 -n 128 --runs 3"). A setting may end
    # in a command that runs realm (`env` runs it): "taskset -c 3", "REALM_X=1 taskset -c 3".
    # With REALM_CUDA_TRACE=1 each session's step times are shown too.
    shift
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    m=${AB_MODEL:-$SCRATCH/model.gguf}
    read -ra run <<<"${AB_RUN:--p 512 -n 128 --runs 3}"
    for round in $(seq "${ROUNDS:-2}"); do
        for d in "$@"; do
            echo "== round $round: ${d:-defaults}"
            # shellcheck disable=SC2086 # $d is a list of assignments (and a command)
            env $d "$SCRATCH"/realm bench --device cuda --model "$m" -t 1 "${run[@]}" 2>&1 |
                grep -E '\| pp|\| tg|trace'
        done
    done
    ;;
parts)
    # Decode with the step sent whole (0) and in parts growing 2, 3 (the default) and 6-fold.
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    for m in "$SCRATCH"/model.gguf "$SCRATCH"/llama-1b.q4_k_m.gguf; do
        [ -f "$m" ] || continue
        for g in 0 2 3 6 0 3; do
            echo "== $(basename "$m") REALM_CUDA_PARTS=$g"
            REALM_CUDA_PARTS=$g "$SCRATCH"/realm bench --device cuda --model "$m" -t 1 -p 512 -n 128 --runs 3 | grep -E 'pp512|tg128'
        done
    done
    ;;
offload)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    # Partial offload: half the blocks on the GPU, the rest on the CPU (greedy texts may part
    # from the CPU's at a near-tie, as the GPU's do).
    split=$("$SCRATCH"/realm run --device cuda --gpu-layers 15 --model "$SCRATCH"/model.gguf --temp 0 -n 24 "What is the capital of France?")
    whole=$("$SCRATCH"/realm run --model "$SCRATCH"/model.gguf --temp 0 -n 24 "What is the capital of France?")
    echo "--gpu-layers 15: $split"
    echo "cpu:             $whole"
    "$SCRATCH"/realm bench --device cuda --gpu-layers 15 --model "$SCRATCH"/model.gguf -t "$(nproc)" -p 512 -n 128 --runs 3
    "$SCRATCH"/realm bench --model "$SCRATCH"/model.gguf -t "$(nproc)" -p 64,512 -n 128 --runs 3
    ;;
bg)
    case "${2:-}" in llama | quantizer) ;; *) echo "bg llama or bg quantizer" >&2; exit 2 ;; esac
    rm -f "$SCRATCH/bg.done" "$SCRATCH/bg.ok" && touch "$SCRATCH/bg.started"
    # From a copy of what it needs: the next command's copy of this tree replaces this one
    # (a build configured while it was being copied found no tests/llama-ref/main.cpp).
    rm -rf "$SCRATCH/tree" && mkdir -p "$SCRATCH/tree/tests"
    cp -r bench scripts "$SCRATCH/tree/" && cp -r tests/llama-ref tests/models "$SCRATCH/tree/tests/"
    setsid nohup bash -c "cd '$SCRATCH/tree' && bench/gpu.sh $2 && bench/gpu.sh synth && touch '$SCRATCH/bg.ok'; touch '$SCRATCH/bg.done'" \
        >"$SCRATCH/bg.log" 2>&1 </dev/null &
    echo "started: $2, then synth (log: $SCRATCH/bg.log)"
    ;;
llama)
    rm -rf "$SCRATCH/llama.cpp" && mkdir -p "$SCRATCH/llama.cpp/src"
    tar -C "$SCRATCH/llama.cpp/src" -xJf "$SCRATCH/llama.cpp.tar.xz"
    cp "$SCRATCH/ggml-vocab-llama-spm.gguf" "$SCRATCH/llama.cpp/src/models/"
    export PATH=/usr/local/cuda/bin:$PATH
    LLAMA_CPP_OFFLINE=1 LLAMA_CPP_DIR="$SCRATCH/llama.cpp" LLAMA_CPP_VARIANT=cuda JOBS=$(nproc) \
        scripts/llama-cpp.sh llama-bench llama-quantize >"$SCRATCH/llama-build.log" 2>&1 ||
        { tail -30 "$SCRATCH/llama-build.log"; exit 1; }
    ls -la "$SCRATCH"/llama.cpp/build-cuda/bin/
    ;;
quantizer)
    rm -rf "$SCRATCH/llama.cpp" && mkdir -p "$SCRATCH/llama.cpp/src"
    tar -C "$SCRATCH/llama.cpp/src" -xJf "$SCRATCH/llama.cpp.tar.xz"
    cp "$SCRATCH/ggml-vocab-llama-spm.gguf" "$SCRATCH/llama.cpp/src/models/"
    LLAMA_CPP_OFFLINE=1 LLAMA_CPP_DIR="$SCRATCH/llama.cpp" JOBS=$(nproc) \
        scripts/llama-cpp.sh llama-quantize >"$SCRATCH/llama-build.log" 2>&1 ||
        { tail -30 "$SCRATCH/llama-build.log"; exit 1; }
    ls -la "$SCRATCH"/llama.cpp/build/bin/
    ;;
synth)
    python3 bench/gpu-synth.py "$SCRATCH/llama.cpp/src" "$SCRATCH/llama-1b.f16.gguf"
    # The CUDA build's llama-quantize (`llama`), else the CPU one (`quantizer`).
    quantize=$(ls "$SCRATCH"/llama.cpp/build-cuda/bin/llama-quantize "$SCRATCH"/llama.cpp/build/bin/llama-quantize 2>/dev/null | head -1 || true)
    "$quantize" "$SCRATCH/llama-1b.f16.gguf" \
        "$SCRATCH/llama-1b.q4_k_m.gguf" Q4_K_M "$(nproc)" >"$SCRATCH/quantize.log" 2>&1 ||
        { tail -20 "$SCRATCH/quantize.log"; exit 1; }
    rm -f "$SCRATCH/llama-1b.f16.gguf"
    ls -la "$SCRATCH/llama-1b.q4_k_m.gguf"
    ;;
compare)
    wait_bg
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    for m in "$SCRATCH"/model.gguf "$SCRATCH"/llama-1b.q4_k_m.gguf; do
        echo "== $(basename "$m")"
        "$SCRATCH"/llama.cpp/build-cuda/bin/llama-bench -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r 3 2>/dev/null
        "$SCRATCH"/realm bench --device cuda --model "$m" -t 1 -p 512 -n 128 --runs 3
    done
    ;;
parity1b)
    wait_bg
    # The GPU-vs-CPU greedy test on the synthetic 1B model.
    export REALM_ROOT=$PWD LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    REALM_REQUIRE_GPU=1 REALM_GPU_MODEL="$SCRATCH"/llama-1b.q4_k_m.gguf "$SCRATCH"/gpu-test \
        --nocapture greedy_ids
    ;;
profile | profile-pp)
    [ -n "${MODELS:-}" ] || wait_bg
    # Under ncu, one kernel at a time, its clock and cache controls off so that durations
    # are those of a real run: `profile`, 400 kernels of decode steps (after the 16-token
    # prompt's); `profile-pp`, every kernel of one 512-token prompt (and a decode step).
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    if [ "$1" = profile ]; then
        pick=(--launch-skip 2000 -c 400) run=(-p 16 -n 64)
    else
        pick=() run=(-p 512 -n 1)
    fi
    for m in ${MODELS:-"$SCRATCH"/model.gguf "$SCRATCH"/llama-1b.q4_k_m.gguf}; do
        [ -f "$m" ] || continue
        csv="$SCRATCH/$1-$(basename "$m" .gguf).csv"
        /usr/local/cuda/bin/ncu --graph-profiling node --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv "${pick[@]}" \
            "$SCRATCH"/realm bench --device cuda --model "$m" -t 1 "${run[@]}" --runs 1 \
            >"$csv" 2>/dev/null
        python3 bench/gpu-profile.py "$csv"
    done
    ;;
sass)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export REALM_COMPONENT="$SCRATCH"/realm_guest.wasm
    kernel=${2:?a kernel name, e.g. matmul_q8_fused}
    model=${3:-$SCRATCH/model.gguf}
    [ "$model" = "$SCRATCH/model.gguf" ] || wait_bg  # only the 1B model waits for bg
    csv="${OUT:-$SCRATCH}/$kernel.csv"
    ncu=(/usr/local/cuda/bin/ncu --graph-profiling node --clock-control none --cache-control none
        --kernel-name "$kernel" --launch-skip "${SKIP:-400}" --launch-count 1)
    run=("$SCRATCH"/realm bench --device cuda --model "$model" -t 1 -p "${PROMPT:-16}" -n 64 --runs 1)
    "${ncu[@]}" --section LaunchStats --section InstructionStats --section WarpStateStats \
        --section SpeedOfLight --section Occupancy "${run[@]}" 2>/dev/null |
        grep -E "Duration|Grid Size|Block Size|Registers|Waves Per SM|Achieved Occupancy|Executed Instructions  |Warp Cycles Per Issued|Stall"
    "${ncu[@]}" --section WarpStateStats --section SourceCounters --page source \
        --print-source sass --csv "${run[@]}" >"$csv" 2>/dev/null
    python3 bench/gpu-sass.py "$csv"
    ;;
*)
    sed -n '2,30p' "$0"
    exit 2
    ;;
esac
