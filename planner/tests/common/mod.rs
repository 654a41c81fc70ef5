//! Model shapes the planner's tests share.

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
