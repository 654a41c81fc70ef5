//! Model shapes, workloads and policies the planner's tests share (each test binary uses some
//! of them).

#![allow(dead_code)]

use strata_planner::{
    Attention, KvPlacement, MlpKind, ModelSpec, POLICY_VERSION, PerTier, Policy, Tier, TierSplit,
    Workload,
};

pub const GIB: u64 = 1 << 30;

/// An OPT model (MHA, plain MLP of 4 × hidden, f16 weights and KV).
pub fn opt(name: &str, hidden: u64, layers: u64, heads: u64) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        layers,
        hidden,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        intermediate: 4 * hidden,
        vocab: 50272,
        weight_dtype_bytes: 2,
        kv_dtype_bytes: 2,
        mlp: MlpKind::Plain,
        gemm_passes: 1,
    }
}

/// Llama-3-8B (GQA: 32 query heads, 8 KV heads; gated MLP; bf16 weights and KV).
pub fn llama_3_8b() -> ModelSpec {
    ModelSpec {
        name: "llama-3-8b".into(),
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        intermediate: 14336,
        vocab: 128256,
        weight_dtype_bytes: 2,
        kv_dtype_bytes: 2,
        mlp: MlpKind::Gated,
        gemm_passes: 1,
    }
}

/// `batch` prompts of `prompt_len` tokens, 16 generated.
pub fn wl(batch: u64, prompt_len: u64) -> Workload {
    Workload {
        batch,
        prompt_len,
        gen_len: 16,
    }
}

/// Weights 7/8 on the GPU and 1/8 streamed from host memory; `cold` KV split, attended near the
/// data; one GPU batch.
pub fn streamed_policy(batch: u64, cold: TierSplit) -> Policy {
    Policy {
        version: POLICY_VERSION,
        weights: TierSplit {
            gpu: 0.875,
            host: 0.125,
            disk: 0.0,
        },
        kv: KvPlacement {
            hot_window_tokens: 256,
            hot_tier: Tier::Gpu,
            cold,
        },
        recompute: PerTier::default(),
        attention_host: Attention::AttendNear,
        attention_disk: Attention::AttendNear,
        gpu_batch_size: batch,
        num_gpu_batches: 1,
        kv_block_tokens: 64,
        prefetch_depth: 1,
        host_mlp_share: 0.0,
    }
}
