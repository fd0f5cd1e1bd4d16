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
    order = []  # (kernel, ns) in launch order
    for r in rows:
        try:
            ns = float(r[value].replace(",", ""))
        except ValueError:
            continue
        times[(r[name], r[grid])].append(ns)
        order.append((r[name], ns))
    total = sum(sum(v) for v in times.values())
    out = [
        f"{path}: {sum(len(v) for v in times.values())} kernels, {total / 1000:.0f} µs",
        "| kernel | grid | launches | mean µs | share |",
        "|---|---|---|---|---|",
    ]
    for (k, g), v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        mean = sum(v) / len(v) / 1000
        out.append(f"| {k} | {g} | {len(v)} | {mean:.2f} | {100 * sum(v) / total:.1f} % |")
    # Whole decode steps (each starts with its embedding launch): the kernels' time per
    # token, to set against the measured time per token (the rest is launch gaps and host).
    starts = [i for i, (k, _) in enumerate(order) if k == "embed"]
    steps = [sum(ns for _, ns in order[a:b]) for a, b in zip(starts, starts[1:])]
    if steps:
        out.append(f"kernels per decode step: {sum(steps) / len(steps) / 1000:.0f} µs "
                   f"({len(steps)} whole steps, {starts[1] - starts[0]} launches each)")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(table(p) for p in sys.argv[1:]))
