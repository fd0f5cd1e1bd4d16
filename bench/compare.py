#!/usr/bin/env python3
"""Realm against llama.cpp on the same GGUF, threads and token counts, in one run.

Realm runs through the full component path (`realm bench --json`); llama.cpp runs as the
Python package llama-cpp-python (pinned in the Makefile, built from source by pip with its
CPU defaults), with flash attention on as in the parity references. Both: prompt
processing of 64 and 512 tokens and generation of 128, median/min/max of RUNS runs,
peak RSS of the measuring process. Prints a Markdown section; --write puts it in
BENCHMARKS.md. Candle (bench/candle) is measured the same way. Usage:
bench/compare.py MODEL.gguf [--write]
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


CANDLE = "target/candle/release/candle-bench"


def candle(model):
    """candle-transformers' quantized llama / Gemma 3 (bench/candle, built natively), one
    child process per thread count (Candle's threads come from RAYON_NUM_THREADS)."""
    out, rss = {}, 0
    for t in THREADS:
        env = dict(os.environ, RAYON_NUM_THREADS=str(t))
        res = subprocess.run([CANDLE, model, str(RUNS), ",".join(map(str, PP)), str(TG)],
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            sys.exit(f"candle-bench failed on {model}: {res.stderr.strip()[-500:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rss = max(rss, r.pop("rss"))
        out[str(t)] = r
    out["rss"] = rss
    return out


def cell(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def main():
    model = sys.argv[1]
    r = realm(model)
    l = llama_cpp(model)
    # NO_CANDLE=1 skips the (slow) Candle peer for quick iterations; `make bench` runs it.
    c = candle(model) if os.environ.get("NO_CANDLE") != "1" else None
    rows = []
    for entry in r["results"]:
        t = entry["threads"]
        for test in [f"pp{p}" for p in PP] + [f"tg{TG}"]:
            rs = entry[test]["tokens_per_s"]
            ls = summary(l[str(t)][test])
            cs = summary(c[str(t)][test]) if c else None
            rows.append(f"| {t} | {test} | {cell(rs)} | {cell(ls)} | {cell(cs) if cs else '–'} | "
                        f"{rs['median'] / ls['median']:.2f}× | {(rs['median'] / cs['median']) if cs else 0:.2f}× |")
        sh = entry[f"tg{TG}"]["decode_time_share"]
        rows.append(f"| {t} | decode time split (Realm) | matmul {sh['matmul']*100:.0f} % · attention {sh['attention']*100:.0f} % · "
                    f"other ops {sh['other_ops']*100:.0f} % · WIT + guest {sh['wit_and_guest']*100:.0f} % | | | | |")
        bw, ceil = entry["read_bandwidth_bytes_per_s"], entry["decode_ceiling_tokens_per_s"]
        tg = f"tg{TG}"
        rows.append(f"| {t} | memory ceiling: {bw / 1e9:.1f} GB/s ÷ {r['decode_weight_bytes'] / 1e6:.1f} MB = {ceil:.0f} tok/s | "
                    f"{entry[tg]['tokens_per_s']['median'] / ceil * 100:.0f} % of it | "
                    f"{summary(l[str(t)][tg])['median'] / ceil * 100:.0f} % | {(summary(c[str(t)][tg])['median'] / ceil * 100) if c else 0:.0f} % | | |")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = pathlib.Path(model).name
    section = f"""## Speed: Realm vs llama.cpp and Candle — {name} (`bench/compare.py`)

{cpu}, {os.cpu_count()} cores, {platform.system()}; Realm commit {commit} (`realm bench`, the
full component path); llama.cpp = llama-cpp-python 0.3.36 built from source by pip (native
CPU features, flash attention on); Candle = candle-transformers 0.10.2 quantized
llama / Gemma 3 (`bench/candle`, `-C target-cpu=native`, as Candle advises). Tokens/s,
median (min–max) of {RUNS} runs; ratios = Realm / peer. Peak RSS of each measuring process
(all thread counts): Realm {r['peak_rss_bytes'] >> 20} MiB, llama.cpp {l['rss'] >> 20} MiB (a
Python process), Candle {(c['rss'] >> 20) if c else '–'} MiB. Memory ceiling: main-memory read bandwidth
(`realm bench`, 512 MiB buffer) ÷ the weight bytes a decode step reads.

| threads | test | Realm | llama.cpp | Candle | vs llama.cpp | vs Candle |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(section)
    if "--write" in sys.argv:
        p = pathlib.Path("BENCHMARKS.md")
        text = p.read_text() if p.exists() else "# Benchmarks\n"
        for old in (f"## Speed: Realm vs llama.cpp — {name}", f"## Speed: Realm vs llama.cpp and Candle — {name}"):
            pat = re.escape(old) + r".*?(?=\n## |\Z)"
            text = re.sub(pat, "", text, flags=re.S)
        p.write_text(text.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
