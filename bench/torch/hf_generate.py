#!/usr/bin/env python3
"""End-to-end generation baseline: Hugging Face transformers (PyTorch, bf16) on strata's
`synthetic:llama-3-8b` shapes, random weights, one GPU.

The model is a `LlamaForCausalLM` built from a `LlamaConfig` that matches strata's preset
(runtime/src/model/synthetic.rs): 32 layers, hidden 4096, 32 heads of 128, 8 KV heads,
intermediate 14336, vocabulary 128256, RMSNorm eps 1e-5, RoPE theta 500000 with Llama-3 scaling
(factor 8, low 1, high 4, original context 8192), context 131072, untied LM head, no biases. Its
weights are random bf16, initialised directly on the GPU (nothing is downloaded); attention is
"sdpa"; the KV cache is generate's default (DynamicCache). Prompts are random token ids
[batch, prompt_len]; decoding is greedy with exactly gen_len new tokens (no EOS).

For each batch size: one untimed warm-up generate (full prompt, 4 new tokens), then, timed with
CUDA synchronisation around wall-clock time:
  - t_prefill: generate(max_new_tokens=1), i.e. time to first token (the prompt's forward pass
    plus the first token's logits and selection);
  - t_total: generate(max_new_tokens=gen_len, min_new_tokens=gen_len).
Reported:
  - prefill tok/s = batch * prompt_len / t_prefill
  - decode tok/s  = batch * (gen_len - 1) / (t_total - t_prefill)   (tokens after the first)
  - e2e tok/s     = batch * gen_len / t_total                         (generated tokens only)

--step-diag B (default 1; 0: off) then times one decode step outside generate at batch B after
the prompt: its wall time (synchronised) and the GPU kernel time within it (torch.profiler, the
sum of the step's CUDA kernel durations). Kernel time far below wall time means the step is bound
by the host (Python and kernel launches), not by the GPU.

    python3 bench/torch/hf_generate.py [--batches 1,16,64] [--prompt-len 2048] [--gen-len 128]
                                       [--json FILE]
"""

import argparse
import inspect
import json
import platform
import time

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
ROPE_THETA = 500000.0


def llama3_8b_config():
    kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, use_cache=True)
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers 5
        kw["rope_parameters"] = dict(ROPE, rope_theta=ROPE_THETA)
    else:  # transformers 4
        kw["rope_theta"] = ROPE_THETA
        kw["rope_scaling"] = dict(ROPE)
    cfg = LlamaConfig(**kw)
    rope = getattr(cfg, "rope_parameters", None) or dict(getattr(cfg, "rope_scaling", None) or {},
                                                          rope_theta=getattr(cfg, "rope_theta", None))
    assert rope.get("rope_type") == "llama3" and float(rope.get("rope_theta")) == ROPE_THETA, rope
    return cfg, rope


def build_model(cfg):
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.bfloat16} if major >= 5 else {"torch_dtype": torch.bfloat16}
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", **dtype_kw)
    model.eval()
    return model


def timed_generate(model, ids, mask, new_tokens):
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return dt


def step_diag(model, cfg, batch, prompt_len, reps=5):
    """(wall ms, GPU kernel ms) of one decode step at `batch` after a `prompt_len` prompt."""
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step():
            return model(input_ids=nxt, past_key_values=cache, use_cache=True,
                         logits_to_keep=1).logits

        step()
        walls = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    return sorted(walls)[len(walls) // 2], gpu_ms, len(kernels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--step-diag", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]

    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"transformers {transformers.__version__}; python {platform.python_version()}")
    cfg, rope = llama3_8b_config()
    t0 = time.perf_counter()
    model = build_model(cfg)
    torch.cuda.synchronize()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params / 1e9:.3f} B parameters, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB bf16 on the GPU, built in "
          f"{time.perf_counter() - t0:.1f} s; attn {model.config._attn_implementation}; "
          f"rope {rope}")
    print(f"prompt {a.prompt_len} tokens, {a.gen_len} new tokens, greedy, DynamicCache")
    print()
    print("| batch | prompt | new | prefill s | total s | prefill tok/s | decode tok/s | "
          "e2e tok/s | peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen_ = torch.Generator(device="cuda")
    gen_.manual_seed(0)
    rows = []
    for b in batches:
        row = dict(batch=b, prompt_len=a.prompt_len, gen_len=a.gen_len)
        try:
            ids = torch.randint(0, cfg.vocab_size, (b, a.prompt_len), device="cuda",
                                generator=gen_)
            mask = torch.ones_like(ids)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                timed_generate(model, ids, mask, 4)  # warm-up
                t_prefill = timed_generate(model, ids, mask, 1)
                t_total = timed_generate(model, ids, mask, a.gen_len)
            row.update(
                prefill_s=round(t_prefill, 4), total_s=round(t_total, 4),
                prefill_tok_s=round(b * a.prompt_len / t_prefill, 1),
                decode_tok_s=round(b * (a.gen_len - 1) / (t_total - t_prefill), 1),
                e2e_tok_s=round(b * a.gen_len / t_total, 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
            print(f"| {b} | {a.prompt_len} | {a.gen_len} | {row['prefill_s']:.3f} | "
                  f"{row['total_s']:.3f} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
                  f"{row['e2e_tok_s']:.1f} | {row['peak_gib']} |", flush=True)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            print(f"| {b} | {a.prompt_len} | {a.gen_len} | {row['error']} | | | | | |", flush=True)
        rows.append(row)
        ids = mask = None
        torch.cuda.empty_cache()
    diag = None
    if a.step_diag > 0:
        try:
            wall, gpu_ms, n_kernels = step_diag(model, cfg, a.step_diag, a.prompt_len)
            diag = dict(batch=a.step_diag, context=a.prompt_len + 1, wall_ms=round(wall, 2),
                        gpu_kernel_ms=round(gpu_ms, 2), kernels=n_kernels)
            print(f"\none decode step outside generate, batch {a.step_diag}, context "
                  f"{a.prompt_len + 1}: wall {wall:.1f} ms (median of 5), GPU kernel time "
                  f"{gpu_ms:.1f} ms in {n_kernels} kernels (torch.profiler)")
        except Exception as e:  # a diagnostic: never lose the results above to it
            diag = dict(error=repr(e))
            print(f"\nstep diagnostic failed: {e!r}")
    if a.json:
        doc = dict(tool="transformers", gpu=gpu, torch=torch.__version__,
                   cuda=torch.version.cuda, transformers=transformers.__version__,
                   model="synthetic:llama-3-8b (LlamaForCausalLM, random bf16)", attn="sdpa",
                   cache="DynamicCache", decoding="greedy", results=rows, step_diag=diag)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
