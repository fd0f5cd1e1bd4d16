#!/usr/bin/env python3
"""Realm on each host, the same prompt and greedy generation, in one run.

- native: `realm run --json` (the host provider: mapped weights, SIMD kernels, threads);
- `realm run-wasm`, the stock `wasmtime` CLI, Python's `wasmtime` package and Node through
  `jco`: the self-contained `realm-standalone.wasm` (`realm:compute` in WebAssembly:
  weights in the component's memory, portable kernels, one thread).

Speeds are the guest's own prompt/decode timings (its `usage`), so every host is measured
by the same clock; the median of RUNS runs. Prints a Markdown section; --write puts it in
BENCHMARKS.md. Needs `make test` (or `make standalone node-host wasmtime-cli .venv/.ok`).
Usage: bench/hosts.py [--write]
"""
import json, os, pathlib, platform, re, statistics, subprocess, sys

RUNS = int(os.environ.get("RUNS", "3"))
MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one word."
N = 16
WASM = "target/wasm32-wasip2/release/realm-standalone.wasm"
WASMTIME = str(pathlib.Path(os.environ.get("CARGO_HOME", pathlib.Path.home() / ".cargo")) / "bin/wasmtime")


def native():
    out = subprocess.run(["./target/release/realm", "run", "--json", "--temp", "0", "--threads", "1",
                          "-n", str(N), "--model", MODEL, QUESTION],
                         check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    return d["prefill_tokens_per_s"], d["decode_tokens_per_s"]


def from_timings(stderr):
    m = re.search(r"timings: prompt_tokens=(\d+) prefill_ns=(\d+) generated_tokens=(\d+) decode_ns=(\d+)", stderr)
    if not m:
        raise SystemExit("no timings in:\n" + stderr)
    p, pns, g, dns = map(int, m.groups())
    return p / (pns / 1e9), g / (dns / 1e9)


def command(prefix):
    def run():
        r = subprocess.run(prefix + [WASM, "--model", MODEL, "-n", str(N), "--timings", QUESTION],
                           check=True, capture_output=True, text=True)
        return from_timings(r.stderr)
    return run


def script(argv):
    def run():
        d = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
        return d["prompt_tokens"] / (d["prefill_ns"] / 1e9), d["generated_tokens"] / (d["decode_ns"] / 1e9)
    return run


HOSTS = [
    ("native host provider (`realm run`, 1 thread)", native),
    ("`realm run-wasm` (wasmtime 48 embedded)", command(["./target/release/realm", "run-wasm", "--dir", "models"])),
    ("stock `wasmtime run` 48.0.8", command([WASMTIME, "run", "--dir", "models"])),
    ("Python `wasmtime` 50.0.1 (component API)", script([".venv/bin/python", "tests/hosts/python_host.py", WASM,
                                                          "models", MODEL, QUESTION, str(N)])),
    ("Node.js 20 + `jco` 1.35.0", script(["node", "tests/hosts/node/node_host.mjs", "models", MODEL, QUESTION, str(N)])),
]


def main():
    rows = []
    base = None
    for name, run in HOSTS:
        pp, tg = zip(*(run() for _ in range(RUNS)))
        pp, tg = statistics.median(pp), statistics.median(tg)
        base = base or (pp, tg)
        rows.append(f"| {name} | {pp:.1f} | {tg:.1f} | {pp / base[0]:.3f}× | {tg / base[1]:.3f}× |")
        print(rows[-1], file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    section = f"""## Hosts: the self-contained component (`bench/hosts.py`)

{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Realm commit {commit}; {MODEL}, the
chat-templated prompt "{QUESTION}" (about 40 tokens), {N} greedy tokens; median of {RUNS} runs.
Tokens/s from the guest's own timings (`usage.prefill-ns`, `decode-ns`), the same clock on
every host. Every host gives the same greedy ids (`cli/tests/hosts.rs`). The
self-contained component runs `realm:compute` inside WebAssembly on one thread, with the
portable kernels (SIMD128 integer sums, an inlined exact FMA since wasm has no scalar one)
over weights copied into its memory, and no prompt tiles; the native provider runs
AVX-512 tiles on mapped weights. Making the wasm kernels fast is the next step there.

| host | prompt tokens/s | decode tokens/s | prompt vs native | decode vs native |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(section)
    if "--write" in sys.argv:
        p = pathlib.Path("BENCHMARKS.md")
        text = p.read_text()
        text = re.sub(r"## Hosts: the self-contained component.*?(?=\n## |\Z)", "", text, flags=re.S)
        p.write_text(text.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
