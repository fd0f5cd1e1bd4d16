#!/usr/bin/env python3
"""Per-kernel time shares from `ncu --csv --metrics gpu__time_duration.sum` output (what
`bench/gpu.sh profile` writes): kernels grouped by name and grid, mean and share of the
summed durations, largest first. Usage: gpu-profile.py NCU.csv [...]"""
import collections
import csv
import sys


def table(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) > 10]
    if not rows:
        return f"{path}: no kernels"
    head, rows = rows[0], rows[1:]
    name, value, grid = (head.index(c) for c in ("Kernel Name", "Metric Value", "Grid Size"))
    times = collections.defaultdict(list)
    for r in rows:
        try:
            times[(r[name], r[grid])].append(float(r[value].replace(",", "")))
        except ValueError:
            continue
    total = sum(sum(v) for v in times.values())
    out = [
        f"{path}: {sum(len(v) for v in times.values())} kernels, {total / 1000:.0f} µs",
        "| kernel | grid | launches | mean µs | share |",
        "|---|---|---|---|---|",
    ]
    for (k, g), v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        mean = sum(v) / len(v) / 1000
        out.append(f"| {k} | {g} | {len(v)} | {mean:.2f} | {100 * sum(v) / total:.1f} % |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(table(p) for p in sys.argv[1:]))
