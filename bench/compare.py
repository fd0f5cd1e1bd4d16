#!/usr/bin/env python3
"""Realm against llama.cpp on the same GGUF, threads and token counts, in one run.

Realm runs through the full component path (`realm bench --json`); llama.cpp runs as the
Python package llama-cpp-python (pinned in the Makefile, built from source by pip with its
CPU defaults), with flash attention on as in the parity references. Both: prompt
processing of 64 and 512 tokens and generation of 128, median/min/max of RUNS runs,
peak RSS of the measuring process. Prints a Markdown section; --write puts it in
BENCHMARKS.md. Usage: bench/compare.py MODEL.gguf [--write]
"""
import json, os, platform, re, resource, statistics, subprocess, sys, time, pathlib

RUNS = int(os.environ.get("RUNS", "5"))
THREADS = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]
PP = [64, 512]
TG = 128


def summary(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def llama_cpp(model):
    """Measured in a child process so its peak RSS is its own."""
    code = f"""
import json, time, resource, numpy as np, llama_cpp
from llama_cpp import Llama
out = {{}}
for t in {THREADS}:
    llm = Llama({model!r}, n_threads=t, n_threads_batch=t, n_ctx=1024, n_batch=512, flash_attn=True, verbose=False)
    nv = llm.n_vocab(); r = {{}}
    for p in {PP}:
        toks = llm.tokenize(("the" + " the" * (p - 1)).encode(), add_bos=False)[:p]
        v = []
        for _ in range({RUNS}):
            llm.reset(); s = time.perf_counter(); llm.eval(toks); v.append(len(toks) / (time.perf_counter() - s))
        r[f"pp{{p}}"] = v
    v = []
    for _ in range({RUNS}):
        llm.reset(); llm.eval(llm.tokenize(("the" + " the" * 15).encode(), add_bos=False)[:16])
        s = time.perf_counter()
        for _ in range({TG}):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(nv,))
            llm.eval([int(np.argmax(logits))])
        v.append({TG} / (time.perf_counter() - s))
    r[f"tg{TG}"] = v
    out[t] = r
    del llm
out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def realm(model):
    res = subprocess.run(
        ["./target/release/realm", "bench", "--json", "--model", model, "--threads", ",".join(map(str, THREADS)),
         "--prompt", ",".join(map(str, PP)), "--gen", str(TG), "--runs", str(RUNS)],
        capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    model = sys.argv[1]
    r = realm(model)
    l = llama_cpp(model)
    rows = []
    for entry in r["results"]:
        t = entry["threads"]
        for test in [f"pp{p}" for p in PP] + [f"tg{TG}"]:
            rs = entry[test]["tokens_per_s"]
            ls = summary(l[str(t)][test])
            rows.append(f"| {t} | {test} | {rs['median']:.1f} ({rs['min']:.1f}–{rs['max']:.1f}) | "
                        f"{ls['median']:.1f} ({ls['min']:.1f}–{ls['max']:.1f}) | {rs['median'] / ls['median']:.2f}× |")
        sh = entry[f"tg{TG}"]["decode_time_share"]
        rows.append(f"| {t} | decode time split (Realm) | matmul {sh['matmul']*100:.0f} % · attention {sh['attention']*100:.0f} % · "
                    f"other ops {sh['other_ops']*100:.0f} % · WIT + guest {sh['wit_and_guest']*100:.0f} % | | |")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = pathlib.Path(model).name
    section = f"""## Speed: Realm vs llama.cpp — {name} (`bench/compare.py`)

{cpu}, {os.cpu_count()} cores, {platform.system()}; Realm commit {commit} (`realm bench`, the
full component path); llama.cpp = llama-cpp-python 0.3.36 (flash attention on). Tokens/s,
median (min–max) of {RUNS} runs; ratio = Realm / llama.cpp. Peak RSS of the measuring
process (all thread counts): Realm {r['peak_rss_bytes'] >> 20} MiB, llama.cpp {l['rss'] >> 20} MiB
(a Python process). Candle's quantized llama is not measured yet.

| threads | test | Realm | llama.cpp | ratio |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(section)
    if "--write" in sys.argv:
        p = pathlib.Path("BENCHMARKS.md")
        text = p.read_text() if p.exists() else "# Benchmarks\n"
        pat = re.escape(f"## Speed: Realm vs llama.cpp — {name}") + r".*?(?=\n## |\Z)"
        text = re.sub(pat, "", text, flags=re.S).rstrip() + "\n\n" + section
        p.write_text(text)


if __name__ == "__main__":
    main()
