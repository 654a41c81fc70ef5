//! How `--gpu-mem` is shared on a GPU: the weights (resident when they fit, else streamed a layer
//! at a time through two layer-sized buffers), a workspace for activations, and the GPU KV tier
//! (everything left).

use strata_kernels::DType;

use crate::forward::weight_bytes;
use crate::model::ModelConfig;

/// The split of a GPU budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuBudget {
    /// All layers stay on the GPU; otherwise two layers' worth of buffers stream them.
    pub resident_weights: bool,
    /// Bytes the weights take on the GPU (all of them, or the global tensors plus two layers).
    pub weight_bytes: u64,
    /// Activations of one forward pass (a prefill chunk), cuBLAS workspace and slack.
    pub workspace_bytes: u64,
    /// What is left for the GPU KV tier.
    pub kv_bytes: u64,
}

/// Activations of a forward pass over `rows` rows: the f32 tensors alive at once in a layer (the
/// residual, norm output, q, k, v, attention output and partials, projections; the MLP's gate,
/// up and activation; half-precision GEMM operands), the logits of `logit_rows`, plus cuBLAS's
/// workspace and allocator slack, with a 1.5× margin.
pub fn workspace_bytes(cfg: &ModelConfig, rows: usize, logit_rows: usize) -> u64 {
    let h = cfg.hidden.max(cfg.q_dim()) as u64;
    let per_row = 8 * h + 3 * cfg.intermediate as u64 + 2 * cfg.intermediate.max(cfg.hidden) as u64;
    let act = rows as u64 * per_row * 4 + logit_rows as u64 * cfg.vocab as u64 * 4;
    act * 3 / 2 + (512 << 20)
}

/// Splits `budget` bytes of GPU memory for a model run with prefill chunks of `rows` rows and
/// `logit_rows` sequences in flight: all layers resident when they fit with a tenth of the
/// budget left for KV, else all staged.
pub fn split(cfg: &ModelConfig, budget: u64, rows: usize, logit_rows: usize) -> GpuBudget {
    split_with(cfg, budget, rows, logit_rows, None)
}

/// [`split`] with the number of resident layers given (a policy's weight split): those layers
/// stay on the GPU, the others are staged through two layer-sized buffers.
pub fn split_with(
    cfg: &ModelConfig,
    budget: u64,
    rows: usize,
    logit_rows: usize,
    resident_layers: Option<usize>,
) -> GpuBudget {
    let all = weight_bytes(cfg);
    let layer = all.saturating_sub(global_weight_bytes(cfg)) / cfg.layers.max(1) as u64;
    let workspace = workspace_bytes(cfg, rows, logit_rows);
    let resident = resident_layers.unwrap_or(
        // Resident when the weights leave at least a tenth of the budget for KV.
        if all + workspace + budget / 10 <= budget {
            cfg.layers
        } else {
            0
        },
    );
    let resident = resident.min(cfg.layers);
    let staging = if resident < cfg.layers { 2 * layer } else { 0 };
    let weights = global_weight_bytes(cfg) + resident as u64 * layer + staging;
    GpuBudget {
        resident_weights: resident == cfg.layers,
        weight_bytes: weights,
        workspace_bytes: workspace,
        kv_bytes: budget.saturating_sub(weights + workspace),
    }
}

/// Embedding, final norm and LM head (the tensors every forward pass uses).
fn global_weight_bytes(cfg: &ModelConfig) -> u64 {
    let tables = if cfg.tie_embeddings { 1 } else { 2 };
    (tables * cfg.vocab * cfg.hidden) as u64 * cfg.dtype.size_bytes() as u64
}

/// The GPU KV tier's dtype for `--kv-dtype auto`: the model's dtype when it is half precision,
/// else f32.
pub fn auto_kv_dtype(cfg: &ModelConfig) -> DType {
    match cfg.dtype {
        DType::F16 | DType::BF16 => cfg.dtype,
        DType::F32 => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic;

    #[test]
    fn an_8b_model_is_resident_on_80gb_and_streamed_on_24gb() {
        let cfg = synthetic::config("llama-3-8b").expect("preset");
        let big = split(&cfg, 80 << 30, 8192, 64);
        assert!(big.resident_weights);
        assert!(big.kv_bytes > 40 << 30, "{big:?}");
        let small = split(&cfg, 16 << 30, 8192, 8);
        assert!(!small.resident_weights, "{small:?}");
        assert!(small.weight_bytes < 4 << 30, "{small:?}");
        let half = split_with(&cfg, 16 << 30, 8192, 8, Some(16));
        assert!(!half.resident_weights);
        assert!(
            half.weight_bytes > small.weight_bytes + (6 << 30),
            "{half:?}"
        );
        assert!(half.kv_bytes < small.kv_bytes, "{half:?}");
        assert_eq!(
            small.weight_bytes + small.workspace_bytes + small.kv_bytes,
            16 << 30
        );
    }

    #[test]
    fn a_budget_below_the_workspace_leaves_no_kv() {
        let cfg = synthetic::config("llama-3-8b").expect("preset");
        assert_eq!(split(&cfg, 1 << 30, 8192, 8).kv_bytes, 0);
    }
}
