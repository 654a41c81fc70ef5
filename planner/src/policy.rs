//! The policy: everything the executor needs to run one workload, as frozen data (FlexGen's
//! `Policy` dataclass, widened). One executor interprets every policy; nothing here is a mode.
//!
//! - `weights`: fraction of every layer's weights resident per tier (the rest of a layer is
//!   streamed to the GPU when the layer runs; computation is always on the GPU).
//! - `kv`: the newest `hot_window_tokens` of each sequence live on `hot_tier`; older (cold)
//!   tokens are split over the tiers by `cold`, in whole blocks of `kv_block_tokens`.
//! - `recompute`: per tier, the share of that tier's cold tokens stored as the layer's input
//!   hidden states instead of K and V; their K, V are regenerated on the GPU when needed.
//! - `attention_host` / `attention_disk`: where the KV stored on that tier is attended — fetched
//!   to the GPU, attended near the data (host threads; the storage engine for disk), or split.
//!   GPU-resident KV and regenerated KV are always attended on the GPU.
//! - `gpu_batch_size × num_gpu_batches = batch`: FlexGen's block schedule; each layer's weights
//!   are loaded once per step and reused across the GPU batches.
//! - `prefetch_depth`: layers (or GPU batches) of transfers in flight ahead of compute.
//! - `host_mlp_share`: in decode steps, this share of the MLP neurons of every host-resident
//!   layer is computed by host threads straight from the staged weights, and only the rest of
//!   the MLP is copied to the GPU: fewer bytes over PCIe, paid for with host memory bandwidth
//!   (the prefill, with many rows per GPU batch, fetches and computes the whole MLP on the GPU).
//!
//! Invariants ([`Policy::validate`]): every split sums to 1 (±1e-6) with entries in [0, 1];
//! recompute shares and near fractions in [0, 1]; `gpu_batch_size·num_gpu_batches == batch`;
//! `kv_block_tokens ≥ 1`; `prefetch_depth ≥ 1`; `host_mlp_share` in [0, 1], and non-zero only with
//! a GPU batch of at most [`HOST_MLP_MAX_ROWS`] sequences; `version == POLICY_VERSION`.

use serde::{Deserialize, Serialize};

use crate::error::PlanError;
use crate::model::Workload;

pub const POLICY_VERSION: u32 = 1;

/// Rows per GPU batch up to which a forward pass computes the host's MLP share on the host: a
/// decode step's few rows make the MLP a matrix-vector product bound by memory bandwidth, which
/// host threads can add to PCIe's; a prefill's many rows are compute-bound, and stay on the GPU.
pub const HOST_MLP_MAX_ROWS: u64 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Gpu,
    Host,
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Host, Tier::Disk];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// A value per tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PerTier<T> {
    pub gpu: T,
    pub host: T,
    pub disk: T,
}

impl<T: Copy> PerTier<T> {
    pub fn get(&self, tier: Tier) -> T {
        match tier {
            Tier::Gpu => self.gpu,
            Tier::Host => self.host,
            Tier::Disk => self.disk,
        }
    }

    pub fn get_mut(&mut self, tier: Tier) -> &mut T {
        match tier {
            Tier::Gpu => &mut self.gpu,
            Tier::Host => &mut self.host,
            Tier::Disk => &mut self.disk,
        }
    }
}

/// Fractions per tier summing to 1.
pub type TierSplit = PerTier<f64>;

/// Whole layers of weights per tier, as the executor places them: the GPU and disk shares
/// rounded to the nearest layer (the disk's out of what the GPU leaves), host memory what is
/// left.
pub fn weight_layers(weights: &TierSplit, layers: u64) -> PerTier<u64> {
    let round = |share: f64| (share * layers as f64).round().max(0.0) as u64;
    let gpu = round(weights.gpu).min(layers);
    let disk = round(weights.disk).min(layers - gpu);
    PerTier {
        gpu,
        host: layers - gpu - disk,
        disk,
    }
}

impl TierSplit {
    pub fn all_on(tier: Tier) -> Self {
        let mut s = PerTier::default();
        match tier {
            Tier::Gpu => s.gpu = 1.0,
            Tier::Host => s.host = 1.0,
            Tier::Disk => s.disk = 1.0,
        }
        s
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvPlacement {
    /// Newest tokens of each sequence kept on `hot_tier` (0: new KV goes straight to `cold`).
    pub hot_window_tokens: u64,
    pub hot_tier: Tier,
    /// Where the older tokens live.
    pub cold: TierSplit,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Attention {
    /// Copy the KV to the GPU and attend there.
    FetchToGpu,
    /// Attend where the KV lives; only q goes over and (o, lse) comes back.
    AttendNear,
    /// Attend `near_fraction` of the tier's KV near the data and fetch the rest, using both
    /// PCIe and the host's memory bandwidth at once.
    Split { near_fraction: f64 },
}

impl Attention {
    pub fn near_fraction(self) -> f64 {
        match self {
            Attention::FetchToGpu => 0.0,
            Attention::AttendNear => 1.0,
            Attention::Split { near_fraction } => near_fraction,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Attention::FetchToGpu => "fetch to GPU".into(),
            Attention::AttendNear => "attend near the data".into(),
            Attention::Split { near_fraction } => {
                format!("split: {:.0}% near, rest fetched", near_fraction * 100.0)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub version: u32,
    pub weights: TierSplit,
    pub kv: KvPlacement,
    /// Share of each tier's cold tokens stored as hidden states (recomputed on the GPU).
    pub recompute: PerTier<f64>,
    pub attention_host: Attention,
    pub attention_disk: Attention,
    pub gpu_batch_size: u64,
    pub num_gpu_batches: u64,
    pub kv_block_tokens: u64,
    pub prefetch_depth: u32,
    /// Share of a host-resident layer's MLP neurons that host threads compute in decode steps
    /// (policies written before this field existed read as 0: all on the GPU).
    #[serde(default)]
    pub host_mlp_share: f64,
}

impl Policy {
    /// Whether the policy keeps KV on the GPU (its hot window, or a share of the older tokens).
    pub fn keeps_gpu_kv(&self) -> bool {
        self.kv.cold.gpu > 0.0 || (self.kv.hot_tier == Tier::Gpu && self.kv.hot_window_tokens > 0)
    }

    pub fn attention(&self, tier: Tier) -> Attention {
        match tier {
            Tier::Gpu => Attention::FetchToGpu,
            Tier::Host => self.attention_host,
            Tier::Disk => self.attention_disk,
        }
    }

    pub fn validate(&self, workload: &Workload) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::InvalidPolicy(m));
        if self.version != POLICY_VERSION {
            return bad(format!(
                "version {} (this strata reads version {POLICY_VERSION})",
                self.version
            ));
        }
        check_split("weights", &self.weights)?;
        check_split("kv.cold", &self.kv.cold)?;
        for t in Tier::ALL {
            let r = self.recompute.get(t);
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("recompute.{} = {r} is not in [0, 1]", t.name()));
            }
            let a = self.attention(t).near_fraction();
            if !(0.0..=1.0).contains(&a) {
                return bad(format!(
                    "attention_{}: near_fraction {a} not in [0, 1]",
                    t.name()
                ));
            }
        }
        if self.gpu_batch_size == 0 || self.gpu_batch_size * self.num_gpu_batches != workload.batch
        {
            return bad(format!(
                "gpu_batch_size {} × num_gpu_batches {} must equal the batch {}",
                self.gpu_batch_size, self.num_gpu_batches, workload.batch
            ));
        }
        if self.kv_block_tokens == 0 {
            return bad("kv_block_tokens must be at least 1".into());
        }
        if self.prefetch_depth == 0 {
            return bad("prefetch_depth must be at least 1".into());
        }
        let share = self.host_mlp_share;
        if !(0.0..=1.0).contains(&share) {
            return bad(format!("host_mlp_share = {share} is not in [0, 1]"));
        }
        if share > 0.0 && self.gpu_batch_size > HOST_MLP_MAX_ROWS {
            return bad(format!(
                "host_mlp_share = {share} needs GPU batches of at most {HOST_MLP_MAX_ROWS} \
                 sequences (decode rows the host computes quickly), not {}",
                self.gpu_batch_size
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        // Numbers and enums only: always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn check_split(name: &str, s: &TierSplit) -> Result<(), PlanError> {
    let parts = [s.gpu, s.host, s.disk];
    if parts.iter().any(|p| !(0.0..=1.0).contains(p))
        || (parts.iter().sum::<f64>() - 1.0).abs() > 1e-6
    {
        return Err(PlanError::InvalidPolicy(format!(
            "{name} fractions {parts:?} must each be in [0, 1] and sum to 1"
        )));
    }
    Ok(())
}
