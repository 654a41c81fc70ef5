#!/usr/bin/env python3
"""PyTorch bf16 linear on Llama-3-8B's projection shapes: the baseline for `gpu-gemm`.

What is timed: `torch.matmul(x, w.t())` with x: [m, k] bf16 activations and w: [n, k] bf16
weights, output [m, n] bf16 -- the GEMM an HF `nn.Linear` runs in a bf16 model
(`F.linear(x, w)` dispatches to the same cuBLAS call). PyTorch's defaults are kept (bf16
reduced-precision reduction allowed: `torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`,
printed).

How, the same as `gpu-gemm`: CUDA events around `calls` back-to-back calls; a rep's time per call
is the span divided by `calls`; the median of --reps reps after --warmup untimed ones. Calls rotate
over enough copies of the weight (>= 256 MiB together, at most 64) that the L2 cache never serves
one call's weight from the previous call; calls = max(copies, 4).

Columns: ms per call; TFLOP/s = 2*m*n*k / time; for m <= 8, GB/s of weight bytes read
(n*k*2 B / time). --json writes the same schema as `gpu-gemm --json` (tool "torch", mode "bf16").

    python3 bench/torch/matmul.py [--reps 20] [--warmup 3] [--m 1,16,64,512,2048,16384] [--json FILE]
"""

import argparse
import json
import statistics

import torch

SHAPES = [
    ("q/o", 4096, 4096),
    ("k/v", 1024, 4096),
    ("gate/up", 14336, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
DECODE_ROWS = 8
ROTATE_BYTES = 256 << 20


def median_ms(x, ws, warmup, reps):
    calls = max(len(ws), 4)

    def rep():
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(calls):
            torch.matmul(x, ws[i % len(ws)].t())
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / calls

    for _ in range(warmup):
        rep()
    return statistics.median(rep() for _ in range(max(reps, 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--m", default="1,16,64,512,2048,16384")
    ap.add_argument("--json")
    a = ap.parse_args()
    ms_list = [int(v) for v in a.m.split(",")]

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuBLAS bf16 reduced-precision reduction: "
          f"{torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}")
    print(f"torch.matmul: bf16 x [m, k] @ bf16 w [n, k].T -> bf16 [m, n]; "
          f"median of {a.reps} reps ({a.warmup} warm-up)")
    print()
    print("| shape | n | k | m | mode | ms | TFLOP/s | weight GB/s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    g = torch.Generator(device=dev)
    g.manual_seed(0x5EED)
    rows = []
    for shape, n, k in SHAPES:
        scale = (3.0 / k) ** 0.5
        w = ((torch.rand(n, k, device=dev, generator=g) * 2 - 1) * scale).to(torch.bfloat16)
        copies = max(1, min(64, -(-ROTATE_BYTES // (n * k * 2))))
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        for m in ms_list:
            free, _ = torch.cuda.mem_get_info()
            need = m * k * 2 + m * n * 2 + (1 << 30)
            if need > free:
                print(f"| {shape} | {n} | {k} | {m} | | skipped: needs {need >> 20} MiB | | |")
                continue
            x = (torch.rand(m, k, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
            ms = median_ms(x, ws, a.warmup, a.reps)
            tflops = 2.0 * m * n * k / (ms * 1e-3) / 1e12
            gbps = n * k * 2 / (ms * 1e-3) / 1e9 if m <= DECODE_ROWS else None
            print(f"| {shape} | {n} | {k} | {m} | bf16 | {ms:.4f} | {tflops:.1f} | "
                  f"{'' if gbps is None else f'{gbps:.0f}'} |")
            rows.append(dict(shape=shape, n=n, k=k, m=m, mode="bf16", ms=round(ms, 6),
                             tflops=round(tflops, 2),
                             weight_gbps=None if gbps is None else round(gbps, 1)))
            del x
        del ws, w
        torch.cuda.empty_cache()
    if a.json:
        doc = dict(tool="torch", device=name, activation="bf16", weight="bf16", output="bf16",
                   reps=a.reps, warmup=a.warmup, torch=torch.__version__,
                   cuda=torch.version.cuda, results=rows)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
