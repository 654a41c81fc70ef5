//! FlexGen's policy space, reproduced as a baseline inside strata (Sheng et al., "FlexGen:
//! High-Throughput Generative Inference of Large Language Models with a Single GPU", ICML 2023).
//!
//! A [`FlexGenPolicy`] is FlexGen's own `Policy` dataclass: the GPU batch size and number of GPU
//! batches of its zig-zag block schedule, and six percentages (`--percent w_gpu w_cpu c_gpu c_cpu
//! a_gpu a_cpu`; the disk share of each is what is left of 100) placing the weights, the KV cache
//! ("cache") and the hidden states between layers ("activations"), plus `cpu_cache_compute`:
//! attend over the CPU- and disk-resident cache on the CPU instead of fetching it to the GPU.
//!
//! Its rules, and how [`FlexGenPolicy::to_strata`] expresses them as a strata [`Policy`]:
//! - **weights by percentage per layer**: every layer keeps `w_gpu`% of its bytes on the GPU,
//!   `w_cpu`% in host memory and the rest on disk → `weights = (w_gpu, w_cpu, w_disk) / 100`
//!   (a strata weight split is per layer too).
//! - **KV split by sequence, never by position**: FlexGen cuts each GPU batch's cache tensor along
//!   the batch dimension, so a sequence's whole cache lives on one tier.
//!   [`FlexGenPolicy::kv_sequences`] gives the sequences per tier in each GPU batch (rounded to
//!   whole sequences, the GPU first); the strata policy carries the same bytes per tier as its
//!   cold split (`sequences on tier / gpu_batch_size`) with no hot window, which is what the cost
//!   model and the memory footprint depend on.
//! - **attention**: GPU cache is attended on the GPU; with `cpu_cache_compute` the host and disk
//!   cache is attended on the CPU (disk cache is read into host memory first: strata's storage
//!   engine does the same), otherwise it is fetched to the GPU.
//! - **schedule**: `gpu_batch_size × num_gpu_batches` sequences, each layer's weights loaded once
//!   per step and reused across the GPU batches, with one step of overlap (the next layer's loads
//!   while this one computes) → `prefetch_depth = 1`.
//! - **activations**: strata's executor keeps the hidden states between layers by its schedule —
//!   on the GPU with one GPU batch, in host memory with several — which is also what FlexGen's
//!   published policies choose; [`FlexGenPolicy::notes`] says when a given policy asks otherwise.
//!
//! [`search`] picks the best FlexGen policy for a workload with strata's own cost model
//! ([`crate::cost`]), so the baseline is tuned as well as strata's planner is. [`published`] holds
//! the policies of FlexGen's benchmark suite (OPT-6.7B, OPT-30B, OPT-175B; prompts 256 and 512;
//! 32 generated tokens; one 16 GB T4, 208 GB DRAM, 1.5 TB SSD), and
//! [`FlexGenPolicy::scaled_to`] fits one to other budgets.
//!
//! Invariants ([`FlexGenPolicy::validate`]): every percentage in [0, 100], each pair sums to at
//! most 100, `gpu_batch_size ≥ 1`, `num_gpu_batches ≥ 1`; a valid FlexGen policy always
//! translates into a valid strata policy for the batch `gpu_batch_size × num_gpu_batches`.

use serde::{Deserialize, Serialize};

use crate::cost::{Prediction, TierBytes, memory, predict};
use crate::error::{PlanError, Shortfall};
use crate::model::{Budgets, ModelSpec, Workload};
use crate::policy::{Attention, KvPlacement, POLICY_VERSION, PerTier, Policy, Tier, TierSplit};
use crate::profile::HardwareProfile;
use crate::search::gpu_batch_sizes;

/// FlexGen's `Policy` (the fields of its command line that place data and schedule work).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlexGenPolicy {
    pub gpu_batch_size: u64,
    pub num_gpu_batches: u64,
    pub w_gpu_percent: f64,
    pub w_cpu_percent: f64,
    pub cache_gpu_percent: f64,
    pub cache_cpu_percent: f64,
    pub act_gpu_percent: f64,
    pub act_cpu_percent: f64,
    pub cpu_cache_compute: bool,
}

impl FlexGenPolicy {
    /// From FlexGen's flags: `--percent` (six numbers), `--gpu-batch-size`, `--num-gpu-batches`,
    /// `--cpu-cache-compute`. Validated.
    pub fn from_flags(
        percent: &[f64],
        gpu_batch_size: u64,
        num_gpu_batches: u64,
        cpu_cache_compute: bool,
    ) -> Result<Self, PlanError> {
        let &[w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu] = percent else {
            return Err(PlanError::InvalidInput {
                field: "--percent",
                reason: format!(
                    "expected six numbers `w_gpu w_cpu c_gpu c_cpu a_gpu a_cpu`, got {}",
                    percent.len()
                ),
            });
        };
        let p = FlexGenPolicy {
            gpu_batch_size,
            num_gpu_batches,
            w_gpu_percent: w_gpu,
            w_cpu_percent: w_cpu,
            cache_gpu_percent: c_gpu,
            cache_cpu_percent: c_cpu,
            act_gpu_percent: a_gpu,
            act_cpu_percent: a_cpu,
            cpu_cache_compute,
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        let pairs = [
            ("weights", self.w_gpu_percent, self.w_cpu_percent),
            ("cache", self.cache_gpu_percent, self.cache_cpu_percent),
            ("activations", self.act_gpu_percent, self.act_cpu_percent),
        ];
        for (what, gpu, cpu) in pairs {
            for v in [gpu, cpu] {
                if !(0.0..=100.0).contains(&v) {
                    return Err(PlanError::InvalidInput {
                        field: "--percent",
                        reason: format!("{what} percentage {v} is not in [0, 100]"),
                    });
                }
            }
            if gpu + cpu > 100.0 + 1e-9 {
                return Err(PlanError::InvalidInput {
                    field: "--percent",
                    reason: format!(
                        "{what}: gpu {gpu}% + cpu {cpu}% = {}% is over 100 (the disk gets the rest)",
                        gpu + cpu
                    ),
                });
            }
        }
        if self.gpu_batch_size == 0 {
            return Err(PlanError::InvalidInput {
                field: "--gpu-batch-size",
                reason: "must be at least 1".into(),
            });
        }
        if self.num_gpu_batches == 0 {
            return Err(PlanError::InvalidInput {
                field: "--num-gpu-batches",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// Sequences in flight: `gpu_batch_size × num_gpu_batches`.
    pub fn batch(&self) -> u64 {
        self.gpu_batch_size * self.num_gpu_batches
    }

    pub fn w_disk_percent(&self) -> f64 {
        (100.0 - self.w_gpu_percent - self.w_cpu_percent).max(0.0)
    }

    pub fn cache_disk_percent(&self) -> f64 {
        (100.0 - self.cache_gpu_percent - self.cache_cpu_percent).max(0.0)
    }

    pub fn act_disk_percent(&self) -> f64 {
        (100.0 - self.act_gpu_percent - self.act_cpu_percent).max(0.0)
    }

    /// Sequences of each GPU batch whose whole KV cache lives on each tier: the GPU gets
    /// `round(gbs · c_gpu%)`, the host `round(gbs · (c_gpu + c_cpu)%)` minus that, the disk the
    /// rest (FlexGen cuts the cache tensor along the batch dimension).
    pub fn kv_sequences(&self) -> PerTier<u64> {
        let g = self.gpu_batch_size;
        let upto = |pct: f64| ((g as f64 * pct / 100.0).round() as u64).min(g);
        let gpu = upto(self.cache_gpu_percent);
        let host = upto(self.cache_gpu_percent + self.cache_cpu_percent).max(gpu) - gpu;
        PerTier {
            gpu,
            host,
            disk: g - gpu - host,
        }
    }

    /// The strata policy that places and schedules what this FlexGen policy does (see the module
    /// header), with KV blocks of `kv_block_tokens`.
    pub fn to_strata(&self, kv_block_tokens: u64) -> Policy {
        let seqs = self.kv_sequences();
        let g = self.gpu_batch_size.max(1) as f64;
        let attention = if self.cpu_cache_compute {
            Attention::AttendNear
        } else {
            Attention::FetchToGpu
        };
        Policy {
            version: POLICY_VERSION,
            weights: TierSplit {
                gpu: self.w_gpu_percent / 100.0,
                host: self.w_cpu_percent / 100.0,
                disk: self.w_disk_percent() / 100.0,
            },
            kv: KvPlacement {
                hot_window_tokens: 0,
                hot_tier: Tier::Gpu,
                cold: TierSplit {
                    gpu: seqs.gpu as f64 / g,
                    host: seqs.host as f64 / g,
                    disk: seqs.disk as f64 / g,
                },
            },
            recompute: PerTier::default(),
            attention_host: attention,
            attention_disk: attention,
            gpu_batch_size: self.gpu_batch_size,
            num_gpu_batches: self.num_gpu_batches,
            kv_block_tokens: kv_block_tokens.max(1),
            prefetch_depth: 1,
            // FlexGen computes every weight on the GPU.
            host_mlp_share: 0.0,
        }
    }

    /// Where this policy asks for something strata's translation does not reproduce exactly.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (want_gpu, want_cpu) = if self.num_gpu_batches == 1 {
            (100.0, 0.0)
        } else {
            (0.0, 100.0)
        };
        if self.act_gpu_percent != want_gpu || self.act_cpu_percent != want_cpu {
            out.push(format!(
                "activations {}/{}/{}% (gpu/cpu/disk): strata keeps the hidden states between \
                 layers {} with {} GPU batch(es)",
                self.act_gpu_percent,
                self.act_cpu_percent,
                self.act_disk_percent(),
                if self.num_gpu_batches == 1 {
                    "on the GPU"
                } else {
                    "in host memory"
                },
                self.num_gpu_batches
            ));
        }
        let seqs = self.kv_sequences();
        let g = self.gpu_batch_size as f64;
        let exact = (seqs.gpu as f64 / g - self.cache_gpu_percent / 100.0).abs() < 1e-9
            && (seqs.host as f64 / g - self.cache_cpu_percent / 100.0).abs() < 1e-9;
        if !exact {
            out.push(format!(
                "cache {}/{}/{}% of a GPU batch of {} rounds to whole sequences: {}/{}/{}",
                self.cache_gpu_percent,
                self.cache_cpu_percent,
                self.cache_disk_percent(),
                self.gpu_batch_size,
                seqs.gpu,
                seqs.host,
                seqs.disk
            ));
        }
        out
    }

    /// FlexGen's own flags for this policy.
    pub fn flags(&self) -> String {
        format!(
            "--percent {} {} {} {} {} {} --gpu-batch-size {} --num-gpu-batches {}{}",
            self.w_gpu_percent,
            self.w_cpu_percent,
            self.cache_gpu_percent,
            self.cache_cpu_percent,
            self.act_gpu_percent,
            self.act_cpu_percent,
            self.gpu_batch_size,
            self.num_gpu_batches,
            if self.cpu_cache_compute {
                " --cpu-cache-compute"
            } else {
                ""
            }
        )
    }

    /// Peak bytes per tier under strata's memory model, for the batch this policy runs.
    pub fn memory(&self, m: &ModelSpec, prompt_len: u64, gen_len: u64, block: u64) -> TierBytes {
        let wl = Workload {
            batch: self.batch(),
            prompt_len,
            gen_len,
        };
        memory(m, &wl, &self.to_strata(block))
    }
}

/// The machine of FlexGen's published suite: one T4 (16 GB), 208 GB of DRAM, 1.5 TB of SSD.
pub const PUBLISHED_MACHINE: Budgets = Budgets {
    gpu_bytes: 16 << 30,
    host_bytes: 208 << 30,
    disk_bytes: 1536 << 30,
};

/// One policy of FlexGen's published suite.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PublishedPolicy {
    /// `opt-6.7b`, `opt-30b` or `opt-175b`.
    pub model: &'static str,
    pub prompt_len: u64,
    pub gen_len: u64,
    pub policy: FlexGenPolicy,
}

const fn fg(
    percent: [f64; 6],
    gpu_batch_size: u64,
    num_gpu_batches: u64,
    cpu_cache_compute: bool,
) -> FlexGenPolicy {
    FlexGenPolicy {
        gpu_batch_size,
        num_gpu_batches,
        w_gpu_percent: percent[0],
        w_cpu_percent: percent[1],
        cache_gpu_percent: percent[2],
        cache_cpu_percent: percent[3],
        act_gpu_percent: percent[4],
        act_cpu_percent: percent[5],
        cpu_cache_compute,
    }
}

/// FlexGen's benchmark suite without compression (its `benchmark/flexgen/bench_suite.py`,
/// cases `6b7_1x1`, `30b_1x1`, `175b_1x1`: `--cpu` is `cpu_cache_compute`).
pub const PUBLISHED: &[PublishedPolicy] = &[
    PublishedPolicy {
        model: "opt-6.7b",
        prompt_len: 256,
        gen_len: 32,
        policy: fg([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 4, 1, false),
    },
    PublishedPolicy {
        model: "opt-6.7b",
        prompt_len: 512,
        gen_len: 32,
        policy: fg([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 2, 1, false),
    },
    PublishedPolicy {
        model: "opt-30b",
        prompt_len: 256,
        gen_len: 32,
        policy: fg([10.0, 90.0, 0.0, 100.0, 0.0, 100.0], 160, 2, true),
    },
    PublishedPolicy {
        model: "opt-30b",
        prompt_len: 512,
        gen_len: 32,
        policy: fg([20.0, 80.0, 0.0, 100.0, 0.0, 100.0], 48, 3, true),
    },
    PublishedPolicy {
        model: "opt-175b",
        prompt_len: 256,
        gen_len: 32,
        policy: fg([0.0, 50.0, 0.0, 0.0, 0.0, 100.0], 64, 8, true),
    },
    PublishedPolicy {
        model: "opt-175b",
        prompt_len: 512,
        gen_len: 32,
        policy: fg([0.0, 50.0, 0.0, 0.0, 0.0, 100.0], 32, 8, true),
    },
];

/// The published policy for a model (`synthetic:opt-30b`, `facebook/opt-30b`, …) and prompt.
pub fn published(model: &str, prompt_len: u64) -> Option<&'static PublishedPolicy> {
    let name = model.to_ascii_lowercase();
    let base = name
        .split(':')
        .find(|s| s.starts_with("opt-"))
        .unwrap_or(&name);
    let base = base.rsplit('/').next().unwrap_or(base);
    PUBLISHED
        .iter()
        .find(|p| p.prompt_len == prompt_len && p.model == base)
}

/// Weight share moved down one tier at a time by [`FlexGenPolicy::scaled_to`], in points.
const SCALE_WEIGHT_STEP_PERCENT: f64 = 5.0;

impl FlexGenPolicy {
    /// This policy fitted to `budgets` (it was tuned for [`PUBLISHED_MACHINE`]): the number of
    /// GPU batches, `cpu_cache_compute` and the cache and activation percentages are kept; the
    /// GPU batch size starts at the published one times `budget gpu / 16 GiB` and steps down
    /// until the policy fits under strata's memory model; if no GPU batch size fits, the weights
    /// move down a tier ([`SCALE_WEIGHT_STEP_PERCENT`] points at a time, from the tier that is
    /// short) and the batch search starts again. Errors when nothing fits.
    pub fn scaled_to(
        &self,
        m: &ModelSpec,
        prompt_len: u64,
        gen_len: u64,
        budgets: &Budgets,
        block: u64,
    ) -> Result<FlexGenPolicy, PlanError> {
        let ratio = budgets.gpu_bytes as f64 / PUBLISHED_MACHINE.gpu_bytes as f64;
        let start = ((self.gpu_batch_size as f64 * ratio).floor() as u64).max(1);
        let mut p = *self;
        let mut closest = TierBytes::default();
        let mut considered = 0;
        for _ in 0..=(3.0 * 100.0 / SCALE_WEIGHT_STEP_PERCENT) as usize {
            for gbs in (1..=start).rev() {
                considered += 1;
                let q = FlexGenPolicy {
                    gpu_batch_size: gbs,
                    ..p
                };
                let mem = q.memory(m, prompt_len, gen_len, block);
                if budgets.hold(&mem) {
                    return Ok(q);
                }
                closest = mem;
            }
            // Not even one sequence per GPU batch fits: move weights off the tier that is short.
            let step = SCALE_WEIGHT_STEP_PERCENT;
            if closest.gpu > budgets.gpu_bytes && p.w_gpu_percent > 0.0 {
                let d = step.min(p.w_gpu_percent);
                p.w_gpu_percent -= d;
                p.w_cpu_percent += d;
            } else if closest.host > budgets.host_bytes && p.w_cpu_percent > 0.0 {
                p.w_cpu_percent -= step.min(p.w_cpu_percent);
            } else {
                break;
            }
        }
        Err(nothing_fits(&closest, budgets, considered))
    }
}

pub(crate) fn nothing_fits(mem: &TierBytes, b: &Budgets, considered: u64) -> PlanError {
    let shortfalls = Tier::ALL
        .iter()
        .map(|&t| Shortfall {
            tier: t,
            needed_bytes: mem.get(t),
            budget_bytes: match t {
                Tier::Gpu => b.gpu_bytes,
                Tier::Host => b.host_bytes,
                Tier::Disk => b.disk_bytes,
            },
        })
        .filter(|s| s.short_bytes() > 0)
        .collect();
    PlanError::NothingFits {
        shortfalls,
        considered,
    }
}

/// FlexGen's policy space as searched by [`search`].
#[derive(Clone, Debug)]
pub struct FlexGenSpace {
    /// Weight percentages in multiples of this.
    pub weight_step_percent: u32,
    /// Cache percentages in multiples of this.
    pub cache_step_percent: u32,
    /// At most this many GPU batch sizes (the largest divisors of the batch).
    pub max_gpu_batch_sizes: usize,
    pub kv_block_tokens: u64,
}

impl Default for FlexGenSpace {
    fn default() -> Self {
        FlexGenSpace {
            weight_step_percent: 5,
            cache_step_percent: 10,
            max_gpu_batch_sizes: 8,
            kv_block_tokens: 64,
        }
    }
}

/// The best FlexGen policy for a workload.
#[derive(Clone, Debug, Serialize)]
pub struct FlexGenPlan {
    pub flexgen: FlexGenPolicy,
    pub policy: Policy,
    pub prediction: Prediction,
    pub considered: u64,
    pub feasible: u64,
}

/// `(gpu, cpu)` percentage pairs in steps of `step`, GPU-heaviest first.
fn percent_pairs(step: u32) -> Vec<(f64, f64)> {
    let step = step.clamp(1, 100);
    let mut out = Vec::new();
    for g in (0..=100 / step).rev() {
        for c in (0..=(100 / step - g)).rev() {
            out.push(((g * step) as f64, (c * step) as f64));
        }
    }
    out
}

/// The FlexGen policy (in [`FlexGenSpace`]) with the least predicted job time under strata's cost
/// model, among those that fit `budgets`; activations follow strata's schedule (see the module
/// header). The batch is the workload's.
pub fn search(
    m: &ModelSpec,
    wl: &Workload,
    budgets: &Budgets,
    hw: &HardwareProfile,
    space: &FlexGenSpace,
) -> Result<FlexGenPlan, PlanError> {
    m.validate()?;
    wl.validate()?;
    let weights = percent_pairs(space.weight_step_percent);
    let caches = percent_pairs(space.cache_step_percent);
    let mut best: Option<(f64, FlexGenPolicy)> = None;
    let (mut considered, mut feasible) = (0u64, 0u64);
    let mut closest: Option<(u64, TierBytes)> = None;
    for gbs in gpu_batch_sizes(wl.batch, space.max_gpu_batch_sizes) {
        let ngb = wl.batch / gbs;
        let act = if ngb == 1 { (100.0, 0.0) } else { (0.0, 100.0) };
        for &(w_gpu, w_cpu) in &weights {
            for &(c_gpu, c_cpu) in &caches {
                let off_gpu_cache = c_gpu < 100.0;
                for cpu_cache_compute in [false, true] {
                    if cpu_cache_compute && !off_gpu_cache {
                        continue;
                    }
                    let fp = FlexGenPolicy {
                        gpu_batch_size: gbs,
                        num_gpu_batches: ngb,
                        w_gpu_percent: w_gpu,
                        w_cpu_percent: w_cpu,
                        cache_gpu_percent: c_gpu,
                        cache_cpu_percent: c_cpu,
                        act_gpu_percent: act.0,
                        act_cpu_percent: act.1,
                        cpu_cache_compute,
                    };
                    considered += 1;
                    let p = fp.to_strata(space.kv_block_tokens);
                    let mem = memory(m, wl, &p);
                    if !budgets.hold(&mem) {
                        let over = mem.gpu.saturating_sub(budgets.gpu_bytes)
                            + mem.host.saturating_sub(budgets.host_bytes)
                            + mem.disk.saturating_sub(budgets.disk_bytes);
                        if closest.is_none_or(|(o, _)| over < o) {
                            closest = Some((over, mem));
                        }
                        continue;
                    }
                    feasible += 1;
                    let t = predict(m, wl, &p, hw).total_s;
                    if best.is_none_or(|(b, _)| t < b) {
                        best = Some((t, fp));
                    }
                }
            }
        }
    }
    let Some((_, flexgen)) = best else {
        let mem = closest.map(|(_, m)| m).unwrap_or_default();
        return Err(nothing_fits(&mem, budgets, considered));
    };
    let policy = flexgen.to_strata(space.kv_block_tokens);
    Ok(FlexGenPlan {
        flexgen,
        policy,
        prediction: predict(m, wl, &policy, hw),
        considered,
        feasible,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_validated_naming_the_flag() {
        let e = FlexGenPolicy::from_flags(&[100.0, 0.0, 100.0], 1, 1, false).unwrap_err();
        assert!(e.to_string().contains("--percent"), "{e}");
        let e = FlexGenPolicy::from_flags(&[60.0, 50.0, 100.0, 0.0, 100.0, 0.0], 1, 1, false)
            .unwrap_err();
        assert!(e.to_string().contains("over 100"), "{e}");
        let e = FlexGenPolicy::from_flags(&[-1.0, 50.0, 100.0, 0.0, 100.0, 0.0], 1, 1, false)
            .unwrap_err();
        assert!(e.to_string().contains("not in [0, 100]"), "{e}");
        let e = FlexGenPolicy::from_flags(&[100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 0, 1, false)
            .unwrap_err();
        assert!(e.to_string().contains("--gpu-batch-size"), "{e}");
        let e = FlexGenPolicy::from_flags(&[100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 2, 0, false)
            .unwrap_err();
        assert!(e.to_string().contains("--num-gpu-batches"), "{e}");
    }

    #[test]
    fn kv_sequences_round_to_whole_sequences_gpu_first() {
        let p = fg([0.0, 100.0, 33.0, 33.0, 100.0, 0.0], 10, 1, false);
        let s = p.kv_sequences();
        assert_eq!((s.gpu, s.host, s.disk), (3, 4, 3));
        assert_eq!(p.notes().len(), 1, "{:?}", p.notes());
        let p = fg([0.0, 100.0, 0.0, 0.0, 0.0, 100.0], 7, 2, true);
        assert_eq!(p.kv_sequences().disk, 7);
        assert!(p.notes().is_empty(), "{:?}", p.notes());
    }

    #[test]
    fn published_policies_are_found_by_model_and_prompt() {
        assert_eq!(
            published("synthetic:opt-30b", 512)
                .unwrap()
                .policy
                .gpu_batch_size,
            48
        );
        assert_eq!(
            published("facebook/opt-175b", 256)
                .unwrap()
                .policy
                .num_gpu_batches,
            8
        );
        assert!(published("synthetic:opt-30b", 1000).is_none());
        assert!(published("synthetic:llama-3-8b", 512).is_none());
        for p in PUBLISHED {
            p.policy.validate().unwrap();
        }
    }
}
