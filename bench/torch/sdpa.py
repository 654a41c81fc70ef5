#!/usr/bin/env python3
"""PyTorch causal SDPA on the flash backend: the baseline for `gpu-prefill`.

What is timed: `F.scaled_dot_product_attention(q, k, v, is_causal=True)` inside
`torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)` (FlashAttention-2 in PyTorch),
q: [batch, 32, seq, 128], k, v: [batch, 8, seq, 128] (Llama-3-8B's GQA, `enable_gqa=True`; if
this PyTorch's flash backend refuses GQA, k and v are expanded to 32 heads before timing and the
table says so), all bf16 or f16, output in the same dtype. Contiguous (unpaged) KV.

How, the same as `gpu-prefill`: CUDA events around --calls back-to-back calls; a rep's time per
call is the span divided by the calls; the median of --reps reps after --warmup untimed ones.

FLOPs, the same convention: 4 * heads * head_dim * sum of visible keys, the sum being
batch * seq * (seq + 1) / 2. --json writes the same schema as `gpu-prefill --json` (tool
"torch", kernel "sdpa-flash").

    python3 bench/torch/sdpa.py [--reps 10] [--warmup 2] [--calls 3]
        [--shapes 64:512,16:2048,4:8192,1:16384] [--dtypes bf16,f16] [--json FILE]
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def median_ms(fn, warmup, reps, calls):
    def rep():
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(calls):
            fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / calls

    for _ in range(warmup):
        rep()
    return statistics.median(rep() for _ in range(max(reps, 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--shapes", default="64:512,16:2048,4:8192,1:16384")
    ap.add_argument("--dtypes", default="bf16,f16")
    ap.add_argument("--json")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(":")) for s in a.shapes.split(",")]
    dtypes = a.dtypes.split(",")

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"sdpa flash: {N_HEADS} q heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}; "
          f"median of {a.reps} reps x {a.calls} calls ({a.warmup} warm-up)")
    print()
    print("| dtype | batch | seq | kernel | ms | TFLOP/s |")
    print("|---|---:|---:|---|---:|---:|")
    g = torch.Generator(device=dev)
    g.manual_seed(0x5EED)
    rows = []
    for batch, seq in shapes:
        for dname in dtypes:
            dt = DTYPES[dname]
            q = (torch.rand(batch, N_HEADS, seq, HEAD_DIM, device=dev, generator=g) * 2 - 1).to(dt)
            k = (torch.rand(batch, KV_HEADS, seq, HEAD_DIM, device=dev, generator=g) * 2 - 1).to(dt)
            v = (torch.rand(batch, KV_HEADS, seq, HEAD_DIM, device=dev, generator=g) * 2 - 1).to(dt)
            kernel = "sdpa-flash"
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                try:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    torch.cuda.synchronize()

                    def fn():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True)
                except RuntimeError as e:
                    print(f"(flash refused enable_gqa: {str(e).splitlines()[0]}; "
                          f"expanding KV to {N_HEADS} heads)")
                    rep = N_HEADS // KV_HEADS
                    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                    kernel = "sdpa-flash (KV expanded)"

                    def fn():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                ms = median_ms(fn, a.warmup, a.reps, a.calls)
            visible = batch * seq * (seq + 1) / 2
            tflops = 4 * N_HEADS * HEAD_DIM * visible / (ms * 1e-3) / 1e12
            print(f"| {dname} | {batch} | {seq} | {kernel} | {ms:.3f} | {tflops:.1f} |")
            rows.append({"dtype": dname, "batch": batch, "seq": seq, "kernel": kernel,
                         "ms": round(ms, 6), "tflops": round(tflops, 2)})
            del q, k, v
    if a.json:
        out = {"tool": "torch", "device": name, "torch": torch.__version__,
               "heads": N_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
               "q": "same as kv", "o": "same as kv", "reps": a.reps, "warmup": a.warmup,
               "results": rows}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
