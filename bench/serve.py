#!/usr/bin/env python3
"""Aggregate decode throughput of `realm serve` with 1, 4 and 16 concurrent streaming
clients (4 greedy chat requests each, 24 new tokens, loopback), and the server's resident
memory growth per concurrent tenant. Runs tests/serve/load.py (the same load test as
`make test`) against a server it starts, and against llama.cpp's llama-server (-np 16 -cb)
when `scripts/llama-cpp.sh llama-server` has built it; --write puts the section in
BENCHMARKS.md.
Usage: bench/serve.py [MODEL.gguf] [--write] (needs .venv from `make test`; REALM_BIN picks
another `realm` binary and REALM_SERVE_FLAGS adds flags to `realm serve`, e.g. `--no-batch`,
for a same-run comparison; REALM_NO_PEER=1 skips llama-server; THREADS sets both servers'
compute threads, default 2)."""
import json, os, pathlib, re, subprocess, sys

model = next((a for a in sys.argv[1:] if not a.startswith("--")), "models/SmolLM2-135M-Instruct.Q4_1.gguf")
name = pathlib.Path(model).stem


def load(cmd, url_of, peer=False):
    """Starts the server `cmd`, waits for its URL (`url_of(server)`), runs the load test."""
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = url_of(server)
        out = subprocess.run([".venv/bin/python", "tests/serve/load.py", url, name, str(server.pid),
                              str(os.path.getsize(model))] + (["--peer"] if peer else []),
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"load test against {cmd[0]} failed:\n" + out.stdout + out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)


serve_flags = os.environ.get("REALM_SERVE_FLAGS", "").split()
# Compute threads of both servers (THREADS; default 2, the development VM's cores).
threads = os.environ.get("THREADS", "2")
r = load([os.environ.get("REALM_BIN", "./target/release/realm"), "serve", "--port", "0", "--threads", threads,
          "--model", model] + serve_flags, lambda s: s.stdout.readline().strip().rsplit(" ", 1)[-1])

# The peer: llama.cpp's own server from the reference tree (`scripts/llama-cpp.sh llama-server`),
# continuous batching over 16 slots, flash attention, 2 threads, the same model.
LLAMA_SERVER = pathlib.Path("target/llama.cpp/build/bin/llama-server")
peer = None
if LLAMA_SERVER.exists() and os.environ.get("REALM_NO_PEER") != "1":
    import socket, time, urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    class Died(Exception):
        pass

    def ready(server):
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise Died(server.returncode)
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit("llama-server did not start")

    peer_cmd = [str(LLAMA_SERVER), "-m", model, "--port", str(port), "-np", "16", "-cb", "-fa", "on",
                "-t", threads, "-c", str(16 * 512)]
    try:
        peer = load(peer_cmd, ready, peer=True)
    except Died as e:
        # llama.cpp's AMX weight repacking faults on some VMs that grant AMX tiles (its own
        # ldtilecfg); as llama-bench's `--repack 0` there, the server then runs unrepacked.
        print(f"llama-server exited with {e} while loading; again with --no-repack", file=sys.stderr)
        peer_cmd.append("--no-repack")
        peer = load(peer_cmd, ready, peer=True)

# REALM_COMMIT: the commit the binary was built from, where it runs away from the checkout.
commit = os.environ.get("REALM_COMMIT") or subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpuinfo = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "unknown CPU")
flags = next((l.split(":", 1)[1].split() for l in cpuinfo.splitlines() if l.startswith("flags")), [])
shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
machine = f"{cpu}, {os.cpu_count()} CPUs ({' '.join(shown) or 'no AVX2'})"
rows = "".join(
    f"| {c} | {r[f'requests_{c}']} | {r[f'tokens_per_s_{c}']:.1f} | "
    f"{r[f'ttft_p50_ms_{c}']:.0f} / {r[f'ttft_p99_ms_{c}']:.0f} | "
    f"{r[f'itl_p50_ms_{c}']:.1f} / {r[f'itl_p99_ms_{c}']:.1f} | "
    f"{r[f'queue_mean_ms_{c}']:.2f} | {r[f'cached_pct_{c}']:.0f} % | "
    f"{r[f'round_ms_{c}']:.2f} / {r[f'in_rounds_pct_{c}']:.0f} % / {r[f'products_pct_{c}']:.0f} % |\n"
    for c in (1, 4, 16))
peer_rows = "" if peer is None else "".join(
    f"| {c} | {peer[f'tokens_per_s_{c}']:.1f} | {r[f'tokens_per_s_{c}'] / peer[f'tokens_per_s_{c}']:.2f}× | "
    f"{peer[f'ttft_p50_ms_{c}']:.0f} / {peer[f'ttft_p99_ms_{c}']:.0f} | "
    f"{peer[f'itl_p50_ms_{c}']:.1f} / {peer[f'itl_p99_ms_{c}']:.1f} |\n"
    for c in (1, 4, 16))
peer_section = "" if peer is None else f"""
The same load, same run, against llama.cpp's `{' '.join(['llama-server'] + peer_cmd[5:])}` (model
and port elided; built from the references' tree by `scripts/llama-cpp.sh llama-server`; its
prompt cache, on by default, reuses a slot's shared prefix as Realm's does; its batched texts
are not checked against its lone ones, which its numerics need not match):

| concurrent clients | llama-server tokens/s | Realm / llama-server | TTFT p50 / p99 | inter-token p50 / p99 |
|---|---|---|---|---|
{peer_rows}
llama-server RSS: {peer['rss_before'] >> 20} MiB before the load, peak {peer['rss_peak'] >> 20} MiB.
"""
section = f"""## Server: concurrent clients — {name} (`bench/serve.py`)

`{' '.join(['realm serve --threads', threads] + serve_flags)}` on loopback, Realm commit {commit}, on {machine}; each client streams 4 greedy
chat requests of 24 new tokens one after another (a tenant per concurrent request: Store,
guest instance and loaded model, reused by later requests with the KV cache of the prefix
they share, the default system prompt; then prefill and decode); every response is checked
to equal the lone request's text. Aggregate generated tokens/s over the whole run, per
request the time to its first streamed piece (TTFT) and between its pieces (inter-token),
p50 / p99 in ms, the mean wait for a session slot (`realm_queue_seconds`; `--max-sessions`
is 64, so none waits), the share of prompt tokens whose KV cache a tenant held already
(`realm_prompt_tokens_cached`) and the batching rounds: their mean length in ms, the share of
the run spent in them and, of that, in the shared products (`realm_batched_round_seconds`,
`realm_batched_product_seconds`; the time outside rounds is the tenants' own work between
steps: sampling, detokenizing, streaming, recording the next step):

| concurrent clients | requests | tokens/s | TTFT p50 / p99 | inter-token p50 / p99 | queue mean ms | prompt cached | round ms / in rounds / products |
|---|---|---|---|---|---|---|---|
{rows}
Tenant start (`realm_tenant_start_seconds`): p50 at most {r['tenant_start_p50_le_ms']:g} ms over
{r['tenant_starts']:.0f} requests, {r['tenants_reused']:.0f} of them served by an idle loaded tenant (the
others, the first of each concurrent slot, load a new one: the guest parses the header and
builds the tokenizer).

Server RSS: {r['rss_before'] >> 20} MiB before the load (weights mapped and touched), peak
{r['rss_peak'] >> 20} MiB with 16 tenants at once: {r['rss_growth_per_tenant'] / 2**20:.1f} MiB per
concurrent tenant (guest linear memory, KV cache, instance) against {os.path.getsize(model) >> 20} MiB of
weights, which all tenants share (one mapping per engine).
{peer_section}"""
print(section)
if "--write" in sys.argv:
    p = pathlib.Path("BENCHMARKS.md")
    text = p.read_text() if p.exists() else "# Benchmarks\n"
    text = re.sub(re.escape(f"## Server: concurrent clients — {name}") + r".*?(?=\n## |\Z)", "", text, flags=re.S)
    p.write_text(text.rstrip() + "\n\n" + section)
