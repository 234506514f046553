#!/usr/bin/env python3
"""Where one decode step's time goes on the GPU, from a kernel trace of the graphed step.

`gpu.sh run trace` records `bench-cuda` with `kernel_trace.cu` injected (CUPTI's record of every
kernel, each node of a CUDA graph on its own, not the graph as one launch): a CSV of start,
duration and name, as `nsys stats --report cuda_gpu_trace --format csv` also writes; this script
reads either. A step starts with its `embed_rows` kernel, so the step taken is the one between the
last two of them (a complete step that is not the last). Printed: the step's span, the time some
kernel was running, the time none was (the gaps programmatic dependent launch did not hide), and
per kernel name the launches, their time and the gaps before them. ncu times kernels alone; this
shows them in the step.

    python3 worker/bench/gpu_trace.py trace_cuda_gpu_trace.csv [--list]
"""
import argparse
import csv
import sys
from collections import defaultdict


def column(header, *words):
    for i, name in enumerate(header):
        if all(w.lower() in name.lower() for w in words):
            return i
    sys.exit(f"no column with {words} in {header}")


def kernels(path):
    """(start ns, end ns, name) of every kernel in the trace, in start order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # nsys prints notes before its table: the header is the first row naming a start and a duration.
    at = next(i for i, r in enumerate(rows) if any("Start" in c for c in r) and any("Duration" in c for c in r))
    header, rows = rows[at], rows[at + 1:]
    start, duration, name = column(header, "start"), column(header, "duration"), column(header, "name")
    out = []
    for r in rows:
        if len(r) <= max(start, duration, name) or r[name].startswith("[CUDA"):
            continue  # copies and memsets
        s, d = int(float(r[start])), int(float(r[duration]))
        out.append((s, s + d, r[name].split("(")[0].strip()))
    return sorted(out)


def one_step(ks):
    starts = [i for i, k in enumerate(ks) if k[2].startswith("embed_rows")]
    if len(starts) >= 2:
        return ks[starts[-2]:starts[-1]]
    if starts:
        return ks[starts[-1]:]
    sys.exit("no embed_rows kernel in the trace: no decode step to take")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--list", action="store_true", help="every kernel of the step in order")
    args = p.parse_args()
    step = one_step(kernels(args.csv))
    first, last = step[0][0], max(k[1] for k in step)
    busy, reach = 0, first
    per = defaultdict(lambda: [0, 0, 0])  # launches, ns running, ns of gap before
    lines = []
    for s, e, name in step:
        gap = s - reach  # > 0: nothing ran; < 0: overlapped the kernels before
        busy += max(0, e - max(s, reach))
        reach = max(reach, e)
        per[name][0] += 1
        per[name][1] += e - s
        per[name][2] += max(0, gap)
        lines.append(f"| {(s - first) / 1e3:.1f} | {name} | {(e - s) / 1e3:.1f} | {gap / 1e3:+.1f} |")
    span = last - first
    print(f"One decode step on the GPU: {len(step)} kernels over {span / 1e3:.1f} µs; some kernel running "
          f"{busy / 1e3:.1f} µs ({100 * busy / span:.0f}%), none {(span - busy) / 1e3:.1f} µs.\n")
    print("| kernel | launches | µs running | share of the step | µs of gaps before |")
    print("|---|---:|---:|---:|---:|")
    for name, (n, ns, gap) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"| `{name}` | {n} | {ns / 1e3:.1f} | {100 * ns / span:.1f}% | {gap / 1e3:.1f} |")
    if args.list:
        print("\n| µs from the step's start | kernel | µs | gap before (µs; − overlap) |")
        print("|---:|---|---:|---:|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
