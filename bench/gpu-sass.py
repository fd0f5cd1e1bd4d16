#!/usr/bin/env python3
"""Where one kernel launch spends its instructions and stalls, from `ncu --page source
--print-source sass --csv` output (what `bench/gpu.sh sass` writes): the executed
instructions, then the runs of consecutive SASS instructions executed the same number of
times (a straight-line stretch: a loop body, a prologue), largest first, with their warp
stall samples and first instruction. Usage: gpu-sass.py SOURCE.csv [RUNS]"""
import csv
import io
import sys


def rows(path):
    with open(path, newline="") as f:
        text = f.read()
    start = text.find('"Address"')
    if start < 0:
        sys.exit(f"{path}: no SASS table (was ncu run with --page source --csv?)")
    table = list(csv.reader(io.StringIO(text[start:])))
    head = table[0]
    col = {name: head.index(name) for name in (
        "Source", "Instructions Executed", "Warp Stall Sampling (All Samples)")}
    out = []
    for r in table[1:]:
        if len(r) != len(head):
            continue
        try:
            executed = int(r[col["Instructions Executed"]] or 0)
            stalls = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        except ValueError:
            continue
        out.append((executed, stalls, r[col["Source"]].strip()))
    return out


def runs(sass):
    """Consecutive instructions executed the same number of times (and at least once)."""
    found, at = [], 0
    while at < len(sass):
        n = sass[at][0]
        end = at
        while end < len(sass) and sass[end][0] == n:
            end += 1
        if n > 0:
            found.append((at, end, n))
        at = end
    return found


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sass = rows(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    executed = sum(e for e, _, _ in sass)
    samples = sum(s for _, s, _ in sass)
    print(f"{len(sass)} SASS instructions, {sum(1 for e, _, _ in sass if e)} executed; "
          f"{executed} warp-instructions executed, {samples} stall samples")
    print("| first | instructions | times each | warp-instructions | share | stall samples | starts with |")
    print("|---|---|---|---|---|---|---|")
    found = sorted(runs(sass), key=lambda r: -(r[1] - r[0]) * r[2])
    for a, b, n in found[:top]:
        work = (b - a) * n
        stalls = sum(s for _, s, _ in sass[a:b])
        print(f"| {a} | {b - a} | {n} | {work} | {100 * work / max(executed, 1):.1f} % | "
              f"{stalls} | `{sass[a][2][:48]}` |")


if __name__ == "__main__":
    main()
