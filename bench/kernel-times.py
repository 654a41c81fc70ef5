#!/usr/bin/env python3
"""Sums the GPU time of a run's last decode steps, kernel by kernel, from Nsight Compute's CSV.

Record a short run (a few new tokens) with one metric, so each kernel is timed alone:

    ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        --log-file run.csv strata generate ... --max-new-tokens 3
    bench/kernel-times.py run.csv [--steps 1]

Each forward pass ends with its sampling (argmax), so the last `--steps` passes are the kernels
after the argmax that ends the pass before them. Set beside the run's measured step time,
the sum says whether the step is bound by the GPU's kernels (sum close to the step) or by the
host issuing them (the GPU idle for the difference).
"""
import argparse
import csv
import collections
import sys

UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3,
         "second": 1.0, "s": 1.0}


def kernels(path):
    """(name, seconds) per timed kernel launch, in launch order."""
    with open(path, newline="") as f:
        rows = csv.DictReader(line for line in f if line.startswith('"'))
        out = []
        for r in rows:
            if r.get("Metric Name") != "gpu__time_duration.sum":
                continue
            unit = UNITS.get(r["Metric Unit"])
            if unit is None:
                sys.exit(f"{path}: unknown time unit {r['Metric Unit']!r}")
            value = float(r["Metric Value"].replace(",", ""))
            name = r["Kernel Name"].removeprefix("void ").split("(")[0]
            out.append((name, value * unit))
    if not out:
        sys.exit(f"{path}: no gpu__time_duration.sum rows (record with --metrics "
                 "gpu__time_duration.sum --csv)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=1, help="passes to sum, counted from the end")
    ap.add_argument("--top", type=int, default=12, help="kernels to list")
    a = ap.parse_args()
    ks = kernels(a.csv)
    # A pass ends with its sampling (one argmax per GPU batch, launched back to back).
    ends = [i for i, (n, _) in enumerate(ks)
            if n.startswith("argmax") and (i + 1 == len(ks) or not ks[i + 1][0].startswith("argmax"))]
    if len(ends) < a.steps + 1:
        sys.exit(f"{a.csv}: {len(ends)} passes found, {a.steps} asked for (and one before them)")
    last = ks[ends[-a.steps - 1] + 1: ends[-1] + 1]
    total = sum(t for _, t in last)
    by = collections.defaultdict(lambda: [0, 0.0])
    for n, t in last:
        by[n][0] += 1
        by[n][1] += t
    print(f"{a.csv}: last {a.steps} pass(es), {len(last)} kernels, "
          f"{1e3 * total / a.steps:.3f} ms of kernel time per pass")
    print(f"  {'kernel':<48} {'launches':>9} {'ms/pass':>9} {'share':>6}")
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"  {n[:48]:<48} {c // a.steps:>9} {1e3 * t / a.steps:>9.3f} {t / total:>6.1%}")


if __name__ == "__main__":
    main()
