#!/usr/bin/env python3
"""Summarises a Chrome trace of libtorch's profiler (conmim-bench train --profile, or
torch_train.py --profile): GPU kernel time per kernel name, the total GPU busy time and
the trace's wall span, as one JSON object — so the Rust and PyTorch steps can be
compared kernel by kernel.

    python tools/bench/trace_summary.py TRACE.json [--top 25] [--steps 3]
"""
import argparse
import collections
import json
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--steps", type=int, default=3, help="steps in the trace (per-step figures)")
    a = p.parse_args()
    with open(a.trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    per = collections.defaultdict(lambda: [0, 0.0])
    cats = collections.defaultdict(float)
    lo, hi = float("inf"), 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            d = float(e.get("dur", 0.0))
            per[e.get("name", "?")][0] += 1
            per[e.get("name", "?")][1] += d
            cats[cat] += d
            lo = min(lo, float(e["ts"]))
            hi = max(hi, float(e["ts"]) + d)
    busy = sum(v[1] for v in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[: a.top]
    out = {
        "trace": a.trace,
        "gpu_busy_ms_per_step": busy / 1e3 / a.steps,
        "gpu_span_ms_per_step": (hi - lo) / 1e3 / a.steps if hi > lo else 0.0,
        "by_category_ms_per_step": {k: v / 1e3 / a.steps for k, v in cats.items()},
        "kernels": len(per),
        "launches_per_step": sum(v[0] for v in per.values()) / a.steps,
        "top": [
            {"name": n[:140], "calls_per_step": c / a.steps, "ms_per_step": d / 1e3 / a.steps}
            for n, (c, d) in top
        ],
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
