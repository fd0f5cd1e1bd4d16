# Realm: `make run` answers a prompt on the default model, `make test` runs every test.
# Both set up what they need (wasm target, models) themselves.

CARGO ?= cargo
JOBS ?= 2
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT ?= What is the capital of France? Answer in one word.
WASM_CRATES := -p realm-gguf -p realm-tokenizer

.PHONY: setup models build run test lint fuzz clean-models

setup:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

models:
	@./scripts/fetch-models.sh

build: setup
	$(CARGO) build --release -j$(JOBS) -p realm-host

run: setup models build
	./target/release/realm inspect $(MODEL)
	./target/release/realm tokenize --model $(MODEL) "$(PROMPT)"

test: setup models
	$(CARGO) test --workspace -j$(JOBS)
	$(CARGO) build --target wasm32-wasip2 -j$(JOBS) $(WASM_CRATES)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -j$(JOBS) -- -D warnings

# Coverage-guided fuzzing of the GGUF reader (needs cargo-fuzz; not part of `make test`).
FUZZ_SECONDS ?= 300
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run gguf_reader corpus/gguf_reader ../guest/gguf/tests/data/malformed -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
