//! How `--gpu-mem` is shared on a GPU: the weights (resident when they fit, else streamed a layer
//! at a time through two layer-sized buffers), a workspace for activations, and the GPU KV tier
//! (everything left).

use strata_kernels::DType;

use crate::forward::weight_bytes;
use crate::model::ModelConfig;
use crate::policy_exec::model_spec;

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

/// Activations of a forward pass in `gpu_batches` GPU batches of at most `rows` rows with the
/// logits of `logit_rows`: the planner's [`strata_planner::prefill_workspace_bytes`], so a
/// planned policy and the run count GPU memory alike.
pub fn workspace_bytes(
    cfg: &ModelConfig,
    (rows, gpu_batches): (usize, usize),
    logit_rows: usize,
) -> u64 {
    strata_planner::prefill_workspace_bytes(
        &model_spec("", cfg),
        rows as u64,
        gpu_batches as u64,
        logit_rows as u64,
    )
}

/// Splits `budget` bytes of GPU memory for a model run with prefill chunks of `rows` rows and
/// `logit_rows` sequences in flight: all layers resident when they fit with a tenth of the
/// budget left for KV, else all staged.
pub fn split(cfg: &ModelConfig, budget: u64, rows: usize, logit_rows: usize) -> GpuBudget {
    split_with(cfg, budget, (rows, 1), logit_rows, None, 1)
}

/// [`split`] with prefill passes of several GPU batches (`prefill`: rows of one GPU batch, GPU
/// batches per pass) and the number of resident layers given (a policy's weight split): those
/// layers stay on the GPU, the others are staged through `lookahead + 1` layer-sized buffers
/// (the one computing and the copies ahead of it, a policy's `prefetch_depth`).
pub fn split_with(
    cfg: &ModelConfig,
    budget: u64,
    prefill: (usize, usize),
    logit_rows: usize,
    resident_layers: Option<usize>,
    lookahead: usize,
) -> GpuBudget {
    let all = weight_bytes(cfg);
    let layer = all.saturating_sub(global_weight_bytes(cfg)) / cfg.layers.max(1) as u64;
    let workspace = workspace_bytes(cfg, prefill, logit_rows);
    let resident = resident_layers.unwrap_or(
        // Resident when the weights leave at least a tenth of the budget for KV.
        if all + workspace + budget / 10 <= budget {
            cfg.layers
        } else {
            0
        },
    );
    let resident = resident.min(cfg.layers);
    let staging = if resident < cfg.layers {
        (lookahead.max(1) as u64 + 1) * layer
    } else {
        0
    };
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
pub(crate) mod tests {
    use super::*;
    use crate::model::synthetic;

    /// `batch` prompts of `prompt` tokens generating 32, under budgets given in GiB.
    pub(crate) fn workload(
        batch: u64,
        prompt: u64,
        gpu_gib: u64,
        host_gib: u64,
        disk_gib: u64,
    ) -> (strata_planner::Workload, strata_planner::Budgets) {
        let wl = strata_planner::Workload {
            batch,
            prompt_len: prompt,
            gen_len: 32,
        };
        let budgets = strata_planner::Budgets {
            gpu_bytes: gpu_gib << 30,
            host_bytes: host_gib << 30,
            disk_bytes: disk_gib << 30,
        };
        (wl, budgets)
    }

    /// `p`'s resident layers (its GPU share rounded to whole layers, as the executor keeps them),
    /// the rows of one prefill GPU batch, and the runtime's split of `gpu_bytes` for them: what
    /// `generate --policy` lays out.
    fn runtime_split(
        cfg: &ModelConfig,
        p: &strata_planner::Policy,
        wl: &strata_planner::Workload,
        gpu_bytes: u64,
    ) -> (usize, u64, GpuBudget) {
        let resident = (p.weights.gpu * cfg.layers as f64).round() as usize;
        let rows = strata_planner::prefill_batch_rows(p, wl);
        let split = split_with(
            cfg,
            gpu_bytes,
            (rows as usize, p.num_gpu_batches as usize),
            wl.batch as usize,
            Some(resident),
            p.prefetch_depth.max(1) as usize,
        );
        (resident, rows, split)
    }

    #[test]
    fn an_8b_model_is_resident_on_80gb_and_streamed_on_24gb() {
        let cfg = synthetic::config("llama-3-8b").expect("preset");
        let big = split(&cfg, 80 << 30, 8192, 64);
        assert!(big.resident_weights);
        assert!(big.kv_bytes > 40 << 30, "{big:?}");
        let small = split(&cfg, 16 << 30, 8192, 8);
        assert!(!small.resident_weights, "{small:?}");
        assert!(small.weight_bytes < 4 << 30, "{small:?}");
        let half = split_with(&cfg, 16 << 30, (8192, 1), 8, Some(16), 1);
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
        // Copies two staged layers ahead hold one more layer's weights than double buffering.
        let layer = (weight_bytes(&cfg) - global_weight_bytes(&cfg)) / cfg.layers as u64;
        let deeper = split_with(&cfg, 16 << 30, (8192, 1), 8, Some(16), 2);
        assert_eq!(deeper.weight_bytes, half.weight_bytes + layer);
        assert_eq!(deeper.kv_bytes, half.kv_bytes - layer);
        // All resident: nothing is staged, whatever the look-ahead.
        assert_eq!(split_with(&cfg, 80 << 30, (8192, 1), 64, None, 2), big);
    }

    /// The planner and the runtime count GPU memory alike: for policies the planner says fit a
    /// `--gpu-mem` budget, the runtime's split of that budget (same resident layers, prefill
    /// rows of one GPU batch's prompts, as `generate --policy` sets them) leaves the KV room the
    /// planner put on the GPU, within 5%.
    #[test]
    fn planned_gpu_kv_fits_in_the_runtime_split() {
        use strata_planner::{HardwareProfile, plan};
        let cfg = synthetic::config("llama-3-8b").expect("preset");
        let spec = model_spec("llama-3-8b", &cfg);
        let profile = HardwareProfile::h100_reference();
        for (gpu_gib, batch, prompt) in [(80u64, 16u64, 2048u64), (24, 8, 8192), (20, 4, 4096)] {
            let (wl, budgets) = workload(batch, prompt, gpu_gib, 64, 200);
            let p = plan(&spec, &wl, &budgets, &profile).expect("a plan").policy;
            let (_, _, split) = runtime_split(&cfg, &p, &wl, budgets.gpu_bytes);
            let final_len = (prompt + 32).div_ceil(p.kv_block_tokens) * p.kv_block_tokens;
            let kv_per_token = 2 * cfg.kv_dim() as u64 * 2 * cfg.layers as u64;
            let hot = p.kv.hot_window_tokens.min(final_len);
            let hot_on_gpu = if p.kv.hot_tier == strata_planner::Tier::Gpu {
                hot
            } else {
                0
            };
            let gpu_tokens = hot_on_gpu + (p.kv.cold.gpu * (final_len - hot) as f64) as u64;
            let planned_kv = batch * gpu_tokens * kv_per_token;
            // Within 5%: the count here is by tokens, the planner's by whole blocks.
            assert!(
                split.kv_bytes as f64 >= 0.95 * planned_kv as f64,
                "{gpu_gib} GiB, {batch} x {prompt}: the planner puts {planned_kv} B of KV on the \
                 GPU, the runtime leaves {} ({split:?}, policy {p:?})",
                split.kv_bytes
            );
        }
    }

    /// OPT-30B with FlexGen's budgets (16 GiB of GPU, 100 GiB of host memory) at prompt 512 and
    /// 256: the planner's policy, laid out as `generate --policy` lays it out, gets the GPU KV it
    /// planned (none, or at least the tier's minimum, which the run needs to keep a tier at all)
    /// and the whole scratch beside it, within the room the budget leaves.
    #[test]
    fn planned_policies_keep_their_gpu_kv_and_the_scratch() {
        use crate::policy_exec::gpu_kv_tier_bytes;
        use strata_planner::{Budgets, HardwareProfile, Workload, plan};
        let cfg = synthetic::config("opt-30b").expect("preset");
        let spec = model_spec("opt-30b", &cfg);
        // An H100 machine's calibrated profile (`strata calibrate`), under which the plan at 44
        // × 256 put 7% of the cold KV on the GPU: less than the run's minimum tier.
        let profile: HardwareProfile = serde_json::from_str(CALIBRATED_H100).expect("profile");
        let budgets = Budgets {
            gpu_bytes: 16 << 30,
            host_bytes: 100 << 30,
            disk_bytes: 40 << 30,
        };
        for (batch, prompt) in [(6u64, 512u64), (44, 256), (24, 512)] {
            let wl = Workload {
                batch,
                prompt_len: prompt,
                gen_len: 32,
            };
            let p = plan(&spec, &wl, &budgets, &profile).expect("a plan").policy;
            let (_, rows, split) = runtime_split(&cfg, &p, &wl, budgets.gpu_bytes);
            let bt = p.kv_block_tokens;
            let block_bytes = 2 * cfg.kv_dim() as u64 * bt * 2;
            let layers = cfg.layers as u64;
            let (tier, short) = gpu_kv_tier_bytes(&p, &wl, layers, block_bytes, split.kv_bytes);
            let scratch = strata_planner::gpu_scratch_blocks(rows, bt) * block_bytes;
            let what = format!("{batch} x {prompt}: policy {p:?}, split {split:?}");
            assert!(short.is_none(), "{what}: {short:?}");
            assert!(
                tier + scratch <= split.kv_bytes,
                "{what}: tier {tier} + scratch {scratch}"
            );
            let min = strata_planner::gpu_kv_min_blocks(batch, layers, rows, bt);
            assert!(
                tier == 0 || tier / block_bytes >= min,
                "{what}: tier {tier}"
            );
            eprintln!(
                "{batch} x {prompt}: GPU KV tier {tier} B, scratch {scratch} B, room {}",
                split.kv_bytes
            );
        }
    }

    /// The GPU KV tier a plan counts on fits in what the runtime leaves of `--gpu-mem` after
    /// the weights it keeps (whole resident layers, two staging buffers) and the activations:
    /// the run then holds the KV the prediction assumed. Plans of the executor's search space
    /// whose weights are split between the GPU and host memory, as the planner picks them for
    /// Llama-3-8B at 4K and 32K context.
    #[test]
    fn a_planned_gpu_kv_tier_fits_the_runtime_split_of_the_gpu_budget() {
        use crate::policy_exec::{gpu_kv_tier_bytes, search_space};
        use strata_planner::{HardwareProfile, plan_with};
        let hw = HardwareProfile::h100_reference();
        let cases = [
            ("llama-3-8b", 8u64, 4096u64, 20u64, 64u64),
            ("llama-3-8b", 16, 4096, 24, 64),
            ("llama-3-8b", 8, 32704, 24, 32),
            ("llama-3-8b", 4, 8192, 18, 24),
            ("opt-30b", 6, 512, 16, 100),
        ];
        let mut split_weights = 0;
        for (name, batch, prompt, gpu_gib, host_gib) in cases {
            let cfg = synthetic::config(name).expect("preset");
            let spec = model_spec(name, &cfg);
            let (wl, budgets) = workload(batch, prompt, gpu_gib, host_gib, 100);
            let what = format!("{name} {batch}x{prompt}, GPU {gpu_gib} GiB");
            let p = plan_with(&spec, &wl, &budgets, &hw, &search_space())
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .policy;
            let (resident, _, split) = runtime_split(&cfg, &p, &wl, budgets.gpu_bytes);
            if resident > 0 && resident < cfg.layers {
                split_weights += 1;
            }
            let block_bytes = 2 * cfg.kv_dim() as u64 * p.kv_block_tokens * 2;
            let (bytes, short) =
                gpu_kv_tier_bytes(&p, &wl, cfg.layers as u64, block_bytes, split.kv_bytes);
            assert_eq!(short, None, "{what}: {p:?}");
            assert!(bytes <= split.kv_bytes, "{what}");
        }
        assert!(
            split_weights >= 2,
            "only {split_weights} case(s) split the weights: the test no longer exercises it"
        );
    }

    const CALIBRATED_H100: &str = r#"{
        "version": 1,
        "machine": "NVIDIA H100 80GB HBM3, 16 CPU cores, disk /tmp/cal (io_uring)",
        "measured_at": "2026-11-22T22:03:58Z", "reference": false, "has_gpu": true,
        "gemm_tflops": {"f32": 51.7, "f16": 749.4, "bf16": 782.4},
        "hbm_gbps": 3011.7, "h2d_gbps": 55.01, "d2h_gbps": 55.21, "host_mem_gbps": 51.9,
        "host_attention_gbps": 50.52, "disk_read_gbps": 1.233, "disk_write_gbps": 1.985,
        "disk_measured": true, "disk_half_bandwidth_request_bytes": 4096,
        "gpu_layer_overhead_us": 155.5, "prefill_attention_tflops": 280.1,
        "host_memory_shared_gbps": 84.71, "gpu_bytes": 85017493504,
        "host_bytes": 133437825024, "disk_bytes": 68653113344, "cpu_cores": 16
    }"#;

    #[test]
    fn a_budget_below_the_workspace_leaves_no_kv() {
        let cfg = synthetic::config("llama-3-8b").expect("preset");
        assert_eq!(split(&cfg, 1 << 30, 8192, 8).kv_bytes, 0);
    }
}
