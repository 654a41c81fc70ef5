//! Model shapes the planner's tests share (each test binary uses some of them).

#![allow(dead_code)]

use strata_planner::{MlpKind, ModelSpec};

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
    }
}
