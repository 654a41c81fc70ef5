#!/usr/bin/env python3
"""Where a run's time went, from its tracing spans.

    STRATA_LOG=strata_runtime=debug strata generate ... 2> run.log
    bench/span-summary.py run.log [--phase decode]

Every span closes with `time.busy` (time inside it) and `time.idle`; this sums both per span path
(fields dropped, e.g. `decode:layer:gpu_batch:host_attention`) and prints the paths under the
given phase (`decode` or `prefill`; default: both), largest busy time first, with the count and
the mean. A child's time is part of its parent's.
"""
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(
    r"DEBUG (?P<path>\S+?): strata_\w+(?:::\w+)*: close time\.busy=(?P<b>[\d.]+)(?P<bu>ns|µs|us|ms|s) "
    r"time\.idle=(?P<i>[\d.]+)(?P<iu>ns|µs|us|ms|s)"
)


def main():
    args = sys.argv[1:]
    phase = None
    if "--phase" in args:
        k = args.index("--phase")
        phase = args[k + 1]
        del args[k : k + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    busy, idle, count = defaultdict(float), defaultdict(float), defaultdict(int)
    with open(args[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if not m:
                continue
            path = re.sub(r"\{[^}]*\}", "", m["path"])
            if phase and not (path == phase or path.startswith(phase + ":")):
                continue
            busy[path] += float(m["b"]) * UNITS[m["bu"]]
            idle[path] += float(m["i"]) * UNITS[m["iu"]]
            count[path] += 1
    if not busy:
        sys.exit(f"{args[0]}: no span closes (run with STRATA_LOG=strata_runtime=debug)")
    print(f"{'span':<58} {'count':>7} {'busy s':>9} {'idle s':>9} {'mean busy':>11}")
    for path in sorted(busy, key=lambda p: -busy[p]):
        mean = busy[path] / count[path]
        print(f"{path:<58} {count[path]:>7} {busy[path]:>9.3f} {idle[path]:>9.3f} "
              f"{mean * 1e6:>9.1f}µs")


if __name__ == "__main__":
    main()
