#!/usr/bin/env python3
"""Realm against llama.cpp's own `llama-bench` on the same GGUF, in one run.

The peer is llama.cpp's `llama-bench`, built natively by scripts/llama-cpp.sh from the
tree Realm's references come from (llama-cpp-python 0.3.36's vendor/llama.cpp, CMake +
Ninja from PyPI, -DGGML_NATIVE=ON -DLLAMA_CURL=OFF), flash attention on (`-fa 1`). No Python
binding is in the timed loop. Realm runs through the full component path
(`realm bench --json`). Both: prompt processing of 64 and 512 tokens and generation of 128,
at 1 and 2 threads and 4, 8, 16 where the machine has the cores; median/min/max of RUNS.
Candle (bench/candle) is a second column (NO_CANDLE=1 skips it).

A second table pairs `REALM_KERNELS=avx2` with a llama.cpp build limited to AVX2 + FMA +
F16C (LLAMA_CPP_VARIANT=avx2), so the AVX2 comparison can be made on any x86 machine.
Every table names the CPU, its flags (AVX2 / AVX-512 / VNNI / AMX) and its last-level cache.

Usage: bench/compare.py MODEL.gguf [--write]   (--write: the sections in BENCHMARKS.md)
"""
import json, os, platform, re, resource, statistics, subprocess, sys, pathlib

RUNS = int(os.environ.get("RUNS", "5"))
CORES = os.cpu_count() or 1
THREADS = [int(t) for t in os.environ.get(
    "THREADS", ",".join(str(t) for t in (1, 2, 4, 8, 16) if t <= max(CORES, 2))).split(",")]
PP = [64, 512]
TG = 128
TESTS = [f"pp{p}" for p in PP] + [f"tg{TG}"]
LLAMA_BENCH = {"native": "target/llama.cpp/build/bin/llama-bench",
               "avx2": "target/llama.cpp/build-avx2/bin/llama-bench"}
CANDLE = "target/candle/release/candle-bench"


def summary(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def cpu():
    """Model name and the SIMD flags that pick kernels (`realm bench` reports the cache)."""
    info = open("/proc/cpuinfo").read()
    name = re.search(r"model name\s*:\s*(.*)", info)
    m = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(m.group(1).split()) if m else set()
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                         "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16") if f in flags]
    return {"name": name.group(1).strip() if name else platform.processor(), "flags": shown}


def measured_rss(cmd, env=None, check=True):
    """Runs `cmd` in a child of a small Python process; returns (stdout, the child's peak
    RSS in bytes), or None when it fails and `check` is off."""
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stderr.write(r.stderr)\n"
            "print(r.stdout)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
            "sys.exit(r.returncode)\n")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        if not check:
            return None
        sys.exit(f"{cmd[0]} failed (exit {res.returncode}): {res.stderr.strip()[-800:]}")
    lines = res.stdout.rstrip().splitlines()
    return "\n".join(lines[:-1]), int(lines[-1])


def llama_bench(variant, model):
    binary = LLAMA_BENCH[variant]
    if not os.path.exists(binary):
        env = dict(os.environ, LLAMA_CPP_VARIANT=variant)
        subprocess.run(["scripts/llama-cpp.sh", "llama-bench"], check=True, env=env)
    cmd = [binary, "-m", model, "-t", ",".join(map(str, THREADS)), "-p", ",".join(map(str, PP)),
           "-n", str(TG), "-fa", "1", "-r", str(RUNS), "-o", "json"]
    note = ""
    got = measured_rss(cmd, check=False)
    if got is None:
        # ggml's AMX path can die at its first `ldtilecfg` (seen on a 2-core Xeon VM that
        # runs a plain tile program fine); its plain CPU kernels are the peer there.
        got = measured_rss(cmd + ["--repack", "0"])
        note = "`--repack 0`: the AMX / repacked-weight path crashed on this machine"
    out, rss = got
    res = {"rss": rss, "note": note}
    for t in json.loads(out):
        test = f"pp{t['n_prompt']}" if t["n_gen"] == 0 else f"tg{t['n_gen']}"
        res.setdefault(str(t["n_threads"]), {})[test] = summary(t["samples_ts"])
    return res


def realm(model, kernels=None):
    env = dict(os.environ)
    if kernels:
        env["REALM_KERNELS"] = kernels
    res = subprocess.run(
        ["./target/release/realm", "bench", "--json", "--model", model, "--threads", ",".join(map(str, THREADS)),
         "--prompt", ",".join(map(str, PP)), "--gen", str(TG), "--runs", str(RUNS)],
        capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


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
        out[str(t)] = {k: summary(v) for k, v in r.items()}
    out["rss"] = rss
    return out


def cell(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def rows(r, peer, c):
    out = []
    for entry in r["results"]:
        t = entry["threads"]
        for test in TESTS:
            rs, ls = entry[test]["tokens_per_s"], peer[str(t)][test]
            cs = c[str(t)][test] if c else None
            vs_c = f"{rs['median'] / cs['median']:.2f}×" if cs else "–"
            out.append(f"| {t} | {test} | {cell(rs)} | {cell(ls)} | {cell(cs) if cs else '–'} | "
                       f"**{rs['median'] / ls['median']:.2f}×** | {vs_c} |")
        sh = entry[f"tg{TG}"]["decode_time_share"]
        out.append(f"| {t} | decode time split (Realm) | matmul {sh['matmul']*100:.0f} % · attention "
                   f"{sh['attention']*100:.0f} % · other ops {sh['other_ops']*100:.0f} % · "
                   f"reads {sh.get('reads', 0)*100:.0f} % · WIT + guest "
                   f"{sh['wit_and_guest']*100:.0f} % | | | | |")
    return out


def ceiling(r):
    mb = r["decode_weight_bytes"] / 1e6
    if r.get("weights_fit_in_llc"):
        return (f"The {mb:.1f} MB a decode step reads fit in the last-level cache: decode is "
                f"compute-bound here, there is no memory ceiling.")
    parts = [f"{e['threads']} threads {e['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s → "
             f"{e['decode_ceiling_tokens_per_s']:.0f} tok/s" for e in r["results"]]
    return (f"Memory ceiling (read bandwidth over a buffer 4× the last-level cache ÷ {mb:.1f} MB "
            f"per decode step): " + "; ".join(parts) + ".")


def main():
    model = sys.argv[1]
    c_info = cpu()
    r = realm(model)
    l = llama_bench("native", model)
    c = candle(model) if os.environ.get("NO_CANDLE") != "1" else None
    r2 = realm(model, "avx2")
    l2 = llama_bench("avx2", model)
    # AMX prompt tiles are opt-in (their own numerics): measured where the CPU has them.
    r3 = realm(model, "amx") if "amx_int8" in c_info["flags"] else None
    if r3 and r3.get("kernels") != "amx":
        r3 = None
    # REALM_COMMIT: set where the binary was built elsewhere (bench/xeon.sh).
    commit = os.environ.get("REALM_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = pathlib.Path(model).name
    head = "| threads | test | Realm | llama-bench | Candle | vs llama.cpp | vs Candle |\n|---|---|---|---|---|---|---|\n"
    section = f"""## Speed: Realm vs llama-bench — {name} — {c_info['name']}, {CORES} cores (`bench/compare.py`)

{c_info['name']}, {CORES} cores, flags {' '.join(c_info['flags']) or 'none of AVX2/AVX-512/AMX'},
{f"{r['llc_bytes'] >> 20} MiB" if r.get('llc_bytes') else 'unknown'} last-level cache, {platform.system()}; Realm commit {commit} (`realm bench`,
the full component path); llama.cpp = `llama-bench -fa 1` from the llama-cpp-python 0.3.36
sdist's vendor/llama.cpp, built natively (`scripts/llama-cpp.sh`: `-DGGML_NATIVE=ON`, which
includes its AMX and repacked-weight paths where the CPU has them); Candle =
candle-transformers 0.10.2 quantized llama / Gemma 3 (`bench/candle`, `-C target-cpu=native`).
{'' if c else 'Candle not measured in this run (`NO_CANDLE=1`). '}Tokens/s, median (min–max) of {RUNS} runs; ratios = Realm / peer. Peak RSS: Realm
{r['peak_rss_bytes'] >> 20} MiB, llama-bench {l['rss'] >> 20} MiB, Candle
{(c['rss'] >> 20) if c else '–'} MiB. {ceiling(r)}{(' llama-bench ran with ' + l['note'] + '.') if l['note'] else ''}

{head}""" + "\n".join(rows(r, l, c)) + f"""

AVX2 pair, same run: Realm with `REALM_KERNELS=avx2` against llama.cpp built with
`-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON` (no AVX-512, no AMX){(', ' + l2['note']) if l2['note'] else ''}.

{head}""" + "\n".join(rows(r2, l2, None)) + "\n" + (f"""
AMX prompt tiles, same run: Realm with `REALM_KERNELS=amx` (opt-in: prompts in its own
block-order numerics, not bit-identical to the default kernels; decode unchanged) against
the native llama.cpp of the first table.

{head}""" + "\n".join(rows(r3, l, None)) + "\n" if r3 else "")
    print(section)
    if "--write" in sys.argv:
        p = pathlib.Path("BENCHMARKS.md")
        text = p.read_text() if p.exists() else "# Benchmarks\n"
        # This machine's section for the model, and the old llama-cpp-python sections
        # (a Python binding in the timed loop: not a fair peer).
        for old in (f"## Speed: Realm vs llama-bench — {name} — {c_info['name']}, {CORES} cores",
                    f"## Speed: Realm vs llama.cpp and Candle — {name}"):
            text = re.sub(re.escape(old) + r".*?(?=\n## |\Z)", "", text, flags=re.S)
        p.write_text(text.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
