#!/usr/bin/env bash
# Peak RSS and decode speed of `realm run` on the default model with and without a
# resident-weight budget (issue: memory64). Writes the table to stdout; `--write` also
# replaces the "Memory" section of BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s build models >/dev/null
REALM=./target/release/realm
PROMPT="Write a haiku about the sea."
N=64
RUNS=${RUNS:-3}
weights=$($REALM run --json -n 1 --temp 0 "$PROMPT" | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["weight_bytes"])')

measure() { # $1 label, rest: extra args
  local label=$1; shift
  local rss=() tps=() evict=0 peak=0
  for _ in $(seq "$RUNS"); do
    out=$( { /usr/bin/time -f "RSS %M" $REALM run --json --threads 2 --temp 0 -n $N "$@" "$PROMPT"; } 2>&1 )
    rss+=("$(echo "$out" | awk '/^RSS/ {print $2}')")
    json=$(echo "$out" | grep '^{')
    tps+=("$(echo "$json" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["decode_tokens_per_s"],1))')")
    evict=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["weights"]["evictions"])')
    peak=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["weights"]["peak_resident_bytes"])')
  done
  med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  printf '| %s | %s MiB | %s | %s MiB | %s |\n' "$label" "$(( $(med "${rss[@]}") / 1024 ))" "$(med "${tps[@]}")" "$(( peak / 1048576 ))" "$evict"
}

table=$(
  echo "| budget | peak process RSS (median of $RUNS) | decode tok/s (median) | peak resident weights | evictions |"
  echo "|---|---|---|---|---|"
  measure "none" 
  measure "100 % ($((weights / 1048576)) MiB)" --max-resident "$weights"
  measure "50 %" --max-resident "$((weights / 2))"
  measure "25 %" --max-resident "$((weights / 4))"
)
echo "$table"
if [ "${1:-}" = "--write" ]; then
  python3 - "$table" <<'PY'
import re, sys, pathlib, platform, subprocess
p = pathlib.Path("BENCHMARKS.md")
text = p.read_text() if p.exists() else "# Benchmarks\n"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
section = f"""## Memory: resident-weight budget (`bench/memory.sh`)

SmolLM2-135M-Instruct Q4_1, `realm run --threads 2 --temp 0 -n 64`, {cpu}, {platform.system()},
commit {commit}. Weights are used in place from the mapped file; under a budget the least
recently used are released (`MADV_DONTNEED`) and read again when needed, with the learned
next weight prefetched. Greedy ids are identical at every budget (tested in
`cli/tests/memory64.rs`).

{sys.argv[1]}
"""
text = re.sub(r"## Memory: resident-weight budget.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n\n" + section
p.write_text(text)
PY
fi
