#!/usr/bin/env bash
# Realm on wasmCloud, all on 127.0.0.1: NATS, an OCI registry, two `realm serve --nats`
# servers and two stock `wash host`s; the example workload (examples/wasmcloud/ask, an HTTP
# handler written against `realm:inference` only), plugged with adapters/wasmcloud, pushed
# to the registry and started on both hosts; then the question through each host.
# Usage: examples/wasmcloud/run.sh ["question"]   (from the repository root, after
# `make build adapters`; it installs wash, nats-server and nats-py into target/ the first
# time, and needs Debian's docker-registry: `make registry`). KEEP=1 leaves it all running
# until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
question=${1:-What is the capital of France? Answer in one word.}
model=SmolLM2-135M-Instruct.Q4_1
make -s target/nats/.ok target/wash/.ok registry
out=target/wasm32-wasip2/release
cargo build --release -q --target wasm32-wasip2 -p realm-wasmcloud -p realm-wasmcloud-ask
dir=target/tmp/wasmcloud-example
rm -rf "$dir" && mkdir -p "$dir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "nothing on port $1" >&2; exit 1; }

nats_port=$(port); url=nats://127.0.0.1:$nats_port
target/nats/bin/nats-server -a 127.0.0.1 -p "$nats_port" >"$dir/nats.log" 2>&1 & pids+=($!)
reg_port=$(port)
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$PWD/$dir/registry" "$reg_port" >"$dir/registry.yml"
docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 & pids+=($!)
wait_port "$nats_port"; wait_port "$reg_port"

# The workload: the example plugged with the adapter, pushed as an OCI image.
./target/release/realm plug $out/realm_wasmcloud_ask.wasm --plug $out/realm_wasmcloud.wasm -o "$dir/ask.wasm"
image=127.0.0.1:$reg_port/realm-ask:0.1.0
HOME=$PWD/$dir/home target/wash/bin/wash oci push --insecure "$image" "$dir/ask.wasm" >"$dir/push.log"

for i in 1 2; do
    ./target/release/realm serve --threads 1 --port 0 --nats "$url" >"$dir/realm-$i.log" 2>&1 & pids+=($!)
done
# The workload's starter listens for the hosts' heartbeats before they start.
target/wash/bin/python examples/wasmcloud/start_workload.py "$url" "$image" 2 "$model" >"$dir/start.log" 2>&1 &
starter=$!
for _ in $(seq 300); do grep -q waiting "$dir/start.log" && break; sleep 0.1; done
http_ports=()
for i in 1 2; do
    p=$(port); http_ports+=("$p")
    HOME=$PWD/$dir/home-$i target/wash/bin/wash host --host-name "realm-example-$i" \
        --scheduler-nats-url "$url" --data-nats-url "$url" --http-addr "127.0.0.1:$p" \
        --allow-insecure-registries >"$dir/host-$i.log" 2>&1 & pids+=($!)
done
wait "$starter" || { cat "$dir/start.log"; exit 1; }
grep -v waiting "$dir/start.log"

for p in "${http_ports[@]}"; do
    echo "host on :$p answers:"
    curl -sS -H 'Host: realm-ask' --data-binary "$question" "http://127.0.0.1:$p/?max_tokens=32"
    echo
done
if [ "${KEEP:-0}" = 1 ]; then
    echo "running (logs in $dir); ask with: curl -H 'Host: realm-ask' --data 'question' http://127.0.0.1:${http_ports[0]}/ ; Ctrl-C stops"
    wait
fi
