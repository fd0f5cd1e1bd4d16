#!/usr/bin/env bash
# Builds llama.cpp's own tools from the tree Realm's references come from: the
# `vendor/llama.cpp` of the llama-cpp-python 0.3.36 sdist (llama.cpp 0c1e57098), with CMake
# and Ninja from PyPI, native CPU flags, no curl. Everything lands in target/llama.cpp/:
#   src/      the llama.cpp tree (its gguf-py, vocabularies and templates too)
#   venv/     Python with cmake, ninja, numpy and that tree's gguf-py
#   build/    tests/llama-ref (realm-llama-ref) over llama.cpp; tools in build/bin/
#   build-avx2/  the same with LLAMA_CPP_VARIANT=avx2: AVX2 + FMA + F16C only (no AVX-512,
#             no AMX), the peer of Realm's REALM_KERNELS=avx2 on any x86 machine
#   build-cuda/  LLAMA_CPP_VARIANT=cuda: the CUDA build for sm_90 (needs nvcc on PATH)
# Usage: [LLAMA_CPP_VARIANT=avx2] scripts/llama-cpp.sh [TARGET…]
#        (default targets: llama-quantize realm-llama-ref)
# Reruns are cheap: the download, venv and configure are kept, Ninja rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${LLAMA_CPP_DIR:-target/llama.cpp}")
URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
JOBS=${JOBS:-2}
mkdir -p "$DIR"

if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
  [ "${LLAMA_CPP_OFFLINE:-0}" != 1 ] || { echo "no llama.cpp tree in $DIR/src" >&2; exit 1; }
  echo "fetching llama-cpp-python 0.3.36 (its vendored llama.cpp)…" >&2
  curl -fsSL --retry 3 "$URL" -o "$DIR/sdist.tar.gz.part"
  echo "$SHA  $DIR/sdist.tar.gz.part" | sha256sum -c --status ||
    { echo "sha256 mismatch for the llama-cpp-python sdist" >&2; exit 1; }
  rm -rf "$DIR/src.part" && mkdir -p "$DIR/src.part"
  tar xzf "$DIR/sdist.tar.gz.part" -C "$DIR/src.part" --strip-components=3 \
    llama_cpp_python-0.3.36/vendor/llama.cpp
  rm -rf "$DIR/src" && mv "$DIR/src.part" "$DIR/src" && rm -f "$DIR/sdist.tar.gz.part"
fi

# LLAMA_CPP_OFFLINE=1: no download and no venv; the tree must be in src/ already and
# CMake and Ninja on PATH (the GPU machine, which has no network: bench/xeon.sh).
if [ "${LLAMA_CPP_OFFLINE:-0}" != 1 ]; then
  if [ ! -f "$DIR/venv/.ok" ]; then
    python3 -m venv "$DIR/venv"
    "$DIR/venv/bin/pip" install --quiet cmake==4.1.2 ninja==1.13.0 numpy==2.3.4 "$DIR/src/gguf-py"
    touch "$DIR/venv/.ok"
  fi
  export PATH="$DIR/venv/bin:$PATH"
fi

case "${LLAMA_CPP_VARIANT:-native}" in
  native) BUILD=$DIR/build; CPU=(-DGGML_NATIVE=ON) ;;
  avx2) BUILD=$DIR/build-avx2
        CPU=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
             -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF) ;;
  # The GPU machine (bench/gpu.sh llama): CUDA for the H200 (sm_90), all layers offloadable.
  cuda) BUILD=$DIR/build-cuda; CPU=(-DGGML_NATIVE=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90) ;;
  *) echo "LLAMA_CPP_VARIANT must be native, avx2 or cuda" >&2; exit 2 ;;
esac
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S tests/llama-ref -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_DIR="$DIR/src" "${CPU[@]}" -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF >/dev/null
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-quantize realm-llama-ref)
echo "building ${targets[*]} (llama.cpp, ${LLAMA_CPP_VARIANT:-native}, -j$JOBS)…" >&2
cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}"
