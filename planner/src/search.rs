//! The search: enumerate a discretised policy space, drop what does not fit, keep the fastest.
//!
//! Space ([`SearchSpace::default`]): weight splits in eighths (45), plus GPU/host splits in whole
//! layers (at most 32 steps; 24 more for a 32-layer model), and cold-KV splits in quarters
//! (15) over the three tiers; hot window (4 blocks) on the GPU or the host; per off-GPU tier holding KV, attention
//! near-fraction {0, ½, 1} × recompute share {0, ½, 1} (full recompute leaves nothing to attend
//! near); GPU recompute {0, 1}; GPU batch sizes dividing the batch (the largest 8); block sizes
//! {16, 32, 64, 128}; prefetch depth {1, 2}; host MLP share {0, ¼, ⅜, ½, ⅝, ¾} where weights are
//! in host memory, GPU batches have at most [`HOST_MLP_MAX_ROWS`] sequences and the weight
//! copies bound the decode step without one (nowhere else can it gain). Options that cannot differ (attention of a tier that
//! holds no KV) are enumerated once.
//!
//! Each feasible policy is also considered filled ([`fill_faster_tiers`]): its cold KV moved up
//! into the room the budgets leave on the GPU and in host memory, in whole blocks, which the
//! quarter steps alone cannot express (the GPU memory left after the weights, say). The unfilled
//! policy stays a candidate: the executor runs recompute only without GPU KV, and moving KV onto
//! the GPU can cost GPU time that host attention hid behind other GPU batches.
//!
//! Objective: predicted job time (prefill + gen_len decode steps). Ties keep the first found;
//! enumeration order puts weights on faster tiers first. Invariants: the returned policy and every
//! alternative fit the budgets; the objective does not depend on the budgets and a larger budget
//! only fills faster tiers further, so a larger budget never returns a slower plan. When nothing
//! fits, the error reports the policy that came closest (least total bytes over budget), tier by
//! tier.

use std::collections::HashMap;

use serde::Serialize;

use crate::cost::{Prediction, Stream, TierBytes, memory, predict};
use crate::error::{PlanError, Shortfall};
use crate::fill::fill_faster_tiers;
use crate::model::{Budgets, ModelSpec, Workload};
use crate::policy::{
    Attention, HOST_MLP_MAX_ROWS, KvPlacement, POLICY_VERSION, PerTier, Policy, Tier, TierSplit,
};
use crate::profile::HardwareProfile;

#[derive(Clone, Debug)]
pub struct SearchSpace {
    /// Weight splits are multiples of `1 / weight_steps`.
    pub weight_steps: u32,
    /// And, between GPU and host memory (none on disk), multiples of `1 / n` for `n` the
    /// model's layers or this many, the fewer: the runtime keeps whole layers resident, and an
    /// eighth of a 32-layer model is 4 layers.
    pub weight_layer_steps: u32,
    /// KV splits are multiples of `1 / kv_steps`.
    pub kv_steps: u32,
    pub near_fractions: Vec<f64>,
    pub recompute_shares: Vec<f64>,
    pub block_tokens: Vec<u64>,
    pub prefetch_depths: Vec<u32>,
    /// Host MLP shares tried where the policy allows one (weights in host memory, small GPU
    /// batches).
    pub host_mlp_shares: Vec<f64>,
    pub hot_window_blocks: u64,
    /// At most this many GPU batch sizes (the largest divisors of the batch).
    pub max_gpu_batch_sizes: usize,
    /// Alternatives returned besides the best.
    pub runners_up: usize,
    /// Only policies this accepts are considered (an executor that runs part of the space
    /// passes its own check, so the plan it gets is one it can run); `None`: all.
    pub runnable: Option<fn(&Policy, &ModelSpec) -> bool>,
}

impl Default for SearchSpace {
    fn default() -> Self {
        SearchSpace {
            weight_steps: 8,
            weight_layer_steps: 32,
            kv_steps: 4,
            near_fractions: vec![0.0, 0.5, 1.0],
            recompute_shares: vec![0.0, 0.5, 1.0],
            block_tokens: vec![16, 32, 64, 128],
            prefetch_depths: vec![1, 2],
            host_mlp_shares: vec![0.0, 0.25, 0.375, 0.5, 0.625, 0.75],
            hot_window_blocks: 4,
            max_gpu_batch_sizes: 8,
            runners_up: 4,
            runnable: None,
        }
    }
}

/// A policy that lost, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Alternative {
    /// What sets it apart (`fetch all KV to the GPU`, `weights 50% gpu / 50% host, …`).
    pub label: String,
    pub policy: Policy,
    pub prediction: Prediction,
    /// Its predicted job time over the chosen one's (≥ 1).
    pub slowdown: f64,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub policy: Policy,
    pub prediction: Prediction,
    pub alternatives: Vec<Alternative>,
    /// Policies enumerated, and how many fit the budgets.
    pub considered: u64,
    pub feasible: u64,
}

/// [`plan_with`] over the default space.
pub fn plan(
    m: &ModelSpec,
    wl: &Workload,
    budgets: &Budgets,
    hw: &HardwareProfile,
) -> Result<Plan, PlanError> {
    plan_with(m, wl, budgets, hw, &SearchSpace::default())
}

type Family = (&'static str, fn(&Policy) -> bool);

/// Named families of policies; the best of each that the winner is not in is reported.
const FAMILIES: &[Family] = &[
    ("fetch all off-GPU KV to the GPU, no recompute", |p| {
        no_recompute(p)
            && p.attention_host.near_fraction() == 0.0
            && p.attention_disk.near_fraction() == 0.0
    }),
    (
        "attend near the data for all off-GPU KV, no recompute",
        |p| no_recompute(p) && fully_near(p, Tier::Host) && fully_near(p, Tier::Disk),
    ),
    ("no recompute", no_recompute),
    ("recompute from hidden states", |p| !no_recompute(p)),
    ("all weights on the GPU", |p| p.weights.gpu >= 1.0),
    ("one GPU batch", |p| p.num_gpu_batches == 1),
    ("several GPU batches", |p| p.num_gpu_batches > 1),
    ("the whole MLP on the GPU", |p| p.host_mlp_share == 0.0),
];

fn no_recompute(p: &Policy) -> bool {
    Tier::ALL.iter().all(|&t| p.recompute.get(t) == 0.0)
}

fn holds_kv(p: &Policy, t: Tier) -> bool {
    p.kv.cold.get(t) > 0.0 || p.kv.hot_tier == t
}

fn fully_near(p: &Policy, t: Tier) -> bool {
    !holds_kv(p, t) || p.attention(t).near_fraction() >= 1.0
}

struct Best {
    time: f64,
    policy: Policy,
}

struct Search<'a> {
    m: &'a ModelSpec,
    wl: &'a Workload,
    budgets: &'a Budgets,
    hw: &'a HardwareProfile,
    runnable: Option<fn(&Policy, &ModelSpec) -> bool>,
    host_mlp_shares: &'a [f64],
    considered: u64,
    feasible: u64,
    best: Option<Best>,
    families: Vec<Option<Best>>,
    placements: HashMap<[u32; 7], Best>,
    closest: Option<(u64, TierBytes)>,
}

impl Search<'_> {
    fn consider(&mut self, p: Policy, key: [u32; 7]) {
        if self.runnable.is_some_and(|ok| !ok(&p, self.m)) {
            return;
        }
        self.considered += 1;
        let mem = memory(self.m, self.wl, &p);
        let over = mem.gpu.saturating_sub(self.budgets.gpu_bytes)
            + mem.host.saturating_sub(self.budgets.host_bytes)
            + mem.disk.saturating_sub(self.budgets.disk_bytes);
        if over > 0 {
            if self.closest.is_none_or(|(o, _)| over < o) {
                self.closest = Some((over, mem));
            }
            return;
        }
        self.feasible += 1;
        if let Some(filled) = fill_faster_tiers(self.m, self.wl, &p, self.budgets, &mem) {
            self.consider(filled, key);
        }
        let prediction = predict(self.m, self.wl, &p, self.hw);
        self.keep(p, prediction.total_s, key);
        // The host MLP share changes no memory, and gains only where the weight copies bound
        // the decode step: only there are its other values worth predicting.
        let streams_weights = p.weights.host > 0.0 && p.gpu_batch_size <= HOST_MLP_MAX_ROWS;
        if p.host_mlp_share == 0.0 && streams_weights && prediction.bound_by == Stream::H2d {
            for &host_mlp_share in self.host_mlp_shares {
                if host_mlp_share > 0.0 {
                    let q = Policy {
                        host_mlp_share,
                        ..p
                    };
                    self.considered += 1;
                    self.feasible += 1;
                    let time = predict(self.m, self.wl, &q, self.hw).total_s;
                    self.keep(q, time, key);
                }
            }
        }
    }

    /// Records a feasible policy and its predicted job time.
    fn keep(&mut self, p: Policy, time: f64, key: [u32; 7]) {
        let better = |b: &Option<Best>| b.as_ref().is_none_or(|b| time < b.time);
        if better(&self.best) {
            self.best = Some(Best { time, policy: p });
        }
        for (i, (_, member)) in FAMILIES.iter().enumerate() {
            if member(&p) && better(&self.families[i]) {
                self.families[i] = Some(Best { time, policy: p });
            }
        }
        let slot = self
            .placements
            .entry(key)
            .or_insert(Best { time, policy: p });
        if time < slot.time {
            *slot = Best { time, policy: p };
        }
    }
}

/// The weight splits of `space` for a model of `layers` layers, GPU-heaviest first: the grid of
/// `weight_steps` over the three tiers, and GPU/host splits in `min(layers,
/// weight_layer_steps)` steps that the grid lacks. Keys count in units of `1 / (weight_steps ×
/// layer steps)`, the same for both.
fn weight_splits(space: &SearchSpace, layers: u64) -> Vec<([u32; 3], TierSplit)> {
    let steps = space.weight_steps.max(1);
    let fine = (layers.min(u64::from(space.weight_layer_steps)) as u32).max(1);
    let mut out: Vec<([u32; 3], TierSplit)> = splits(steps)
        .into_iter()
        .map(|(q, w)| (q.map(|x| x * fine), w))
        .collect();
    for g in (1..fine).rev() {
        if (g * steps).is_multiple_of(fine) {
            continue; // on the grid already
        }
        let gpu = g as f64 / fine as f64;
        out.push((
            [g * steps, (fine - g) * steps, 0],
            PerTier {
                gpu,
                host: 1.0 - gpu,
                disk: 0.0,
            },
        ));
    }
    out.sort_by(|a, b| {
        (b.1.gpu, b.1.host)
            .partial_cmp(&(a.1.gpu, a.1.host))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// All splits of 1 over the three tiers in steps of `1/steps`, GPU-heaviest first.
fn splits(steps: u32) -> Vec<([u32; 3], TierSplit)> {
    let mut out = Vec::new();
    for g in (0..=steps).rev() {
        for h in (0..=steps - g).rev() {
            let d = steps - g - h;
            let f = |x: u32| x as f64 / steps as f64;
            out.push((
                [g, h, d],
                PerTier {
                    gpu: f(g),
                    host: f(h),
                    disk: f(d),
                },
            ));
        }
    }
    out
}

fn attention_of(near: f64) -> Attention {
    if near <= 0.0 {
        Attention::FetchToGpu
    } else if near >= 1.0 {
        Attention::AttendNear
    } else {
        Attention::Split {
            near_fraction: near,
        }
    }
}

/// (attention, recompute share) options for an off-GPU tier holding cold tokens (`has_cold`)
/// and/or the hot window (`hot_here`). Attention is enumerated only while KV is left to attend.
fn tier_options(space: &SearchSpace, hot_here: bool, has_cold: bool) -> Vec<(Attention, f64)> {
    let shares: &[f64] = if has_cold {
        &space.recompute_shares
    } else {
        &[0.0]
    };
    let mut out = Vec::new();
    for &r in shares {
        let kv_left = hot_here || (has_cold && r < 1.0);
        if kv_left {
            out.extend(space.near_fractions.iter().map(|&a| (attention_of(a), r)));
        } else {
            out.push((Attention::FetchToGpu, r));
        }
    }
    out
}

pub(crate) fn gpu_batch_sizes(batch: u64, max: usize) -> Vec<u64> {
    let mut d = Vec::new();
    let mut i = 1;
    while i * i <= batch {
        if batch.is_multiple_of(i) {
            d.push(i);
            d.push(batch / i);
        }
        i += 1;
    }
    d.sort_unstable_by(|a, b| b.cmp(a));
    d.dedup();
    d.truncate(max.max(1));
    d
}

pub fn plan_with(
    m: &ModelSpec,
    wl: &Workload,
    budgets: &Budgets,
    hw: &HardwareProfile,
    space: &SearchSpace,
) -> Result<Plan, PlanError> {
    m.validate()?;
    wl.validate()?;
    let mut s = Search {
        m,
        wl,
        budgets,
        hw,
        runnable: space.runnable,
        host_mlp_shares: &space.host_mlp_shares,
        considered: 0,
        feasible: 0,
        best: None,
        families: FAMILIES.iter().map(|_| None).collect(),
        placements: HashMap::new(),
        closest: None,
    };
    let weight_splits = weight_splits(space, m.layers);
    let kv_splits = splits(space.kv_steps.max(1));
    let gbs = gpu_batch_sizes(wl.batch, space.max_gpu_batch_sizes);
    for (wq, weights) in &weight_splits {
        for (cq, cold) in &kv_splits {
            for hot_tier in [Tier::Gpu, Tier::Host] {
                let key = [wq[0], wq[1], wq[2], cq[0], cq[1], cq[2], hot_tier as u32];
                let gpu_r: &[f64] = if cold.gpu > 0.0 { &[0.0, 1.0] } else { &[0.0] };
                let host_opts = tier_options(space, hot_tier == Tier::Host, cold.host > 0.0);
                let disk_opts = tier_options(space, false, cold.disk > 0.0);
                for &rg in gpu_r {
                    for &(ah, rh) in &host_opts {
                        for &(ad, rd) in &disk_opts {
                            for &block in &space.block_tokens {
                                for &depth in &space.prefetch_depths {
                                    for &g in &gbs {
                                        let p = Policy {
                                            version: POLICY_VERSION,
                                            weights: *weights,
                                            kv: KvPlacement {
                                                hot_window_tokens: space.hot_window_blocks * block,
                                                hot_tier,
                                                cold: *cold,
                                            },
                                            recompute: PerTier {
                                                gpu: rg,
                                                host: rh,
                                                disk: rd,
                                            },
                                            attention_host: ah,
                                            attention_disk: ad,
                                            gpu_batch_size: g,
                                            num_gpu_batches: wl.batch / g,
                                            kv_block_tokens: block,
                                            prefetch_depth: depth,
                                            host_mlp_share: 0.0,
                                        };
                                        s.consider(p, key);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    finish(s, space)
}

fn finish(s: Search<'_>, space: &SearchSpace) -> Result<Plan, PlanError> {
    let Some(best) = s.best else {
        let mem = s.closest.map(|(_, m)| m).unwrap_or_default();
        let shortfalls = Tier::ALL
            .iter()
            .map(|&t| Shortfall {
                tier: t,
                needed_bytes: mem.get(t),
                budget_bytes: match t {
                    Tier::Gpu => s.budgets.gpu_bytes,
                    Tier::Host => s.budgets.host_bytes,
                    Tier::Disk => s.budgets.disk_bytes,
                },
            })
            .filter(|sf| sf.short_bytes() > 0)
            .collect();
        return Err(PlanError::NothingFits {
            shortfalls,
            considered: s.considered,
        });
    };
    let chosen = predict(s.m, s.wl, &best.policy, s.hw);
    let alt = |label: String, b: &Best| {
        let prediction = predict(s.m, s.wl, &b.policy, s.hw);
        Alternative {
            why: why(&chosen, &prediction),
            slowdown: prediction.total_s / chosen.total_s,
            label,
            policy: b.policy,
            prediction,
        }
    };
    let mut alternatives = Vec::new();
    for (i, (label, member)) in FAMILIES.iter().enumerate() {
        if member(&best.policy) {
            continue;
        }
        if let Some(b) = &s.families[i] {
            alternatives.push(alt(format!("best with {label}"), b));
        }
    }
    let mut others: Vec<&Best> = s
        .placements
        .values()
        .filter(|b| placement_label(&b.policy) != placement_label(&best.policy))
        .collect();
    others.sort_by(|a, b| a.time.total_cmp(&b.time));
    // Filled policies of different grid placements can land on the same placement.
    let mut labels = std::collections::HashSet::new();
    others.retain(|b| labels.insert(placement_label(&b.policy)));
    for b in others.into_iter().take(space.runners_up) {
        alternatives.push(alt(format!("placement {}", placement_label(&b.policy)), b));
    }
    Ok(Plan {
        policy: best.policy,
        prediction: chosen,
        alternatives,
        considered: s.considered,
        feasible: s.feasible,
    })
}

/// `weights g/h/d 100/0/0%, cold KV 50/50/0%, hot on gpu`.
pub fn placement_label(p: &Policy) -> String {
    let pc = |s: &TierSplit| {
        format!(
            "{:.0}/{:.0}/{:.0}%",
            s.gpu * 100.0,
            s.host * 100.0,
            s.disk * 100.0
        )
    };
    format!(
        "weights gpu/host/disk {}, cold KV {}, hot window on {}",
        pc(&p.weights),
        pc(&p.kv.cold),
        p.kv.hot_tier.name()
    )
}

fn why(chosen: &Prediction, alt: &Prediction) -> String {
    let d = &alt.decode_step;
    let ratio = alt.total_s / chosen.total_s;
    let verdict = if ratio < 1.005 {
        format!("practically tied ({ratio:.3}×)")
    } else {
        format!("{ratio:.2}× slower")
    };
    format!(
        "{verdict}: decode step {:.2} ms bound by {} ({:.3} ms/layer) vs {:.2} ms bound by {}; prefill {:.2} s vs {:.2} s",
        d.total_s * 1e3,
        d.bound_by.name(),
        d.layer_s * 1e3,
        chosen.decode_step.total_s * 1e3,
        chosen.decode_step.bound_by.name(),
        alt.prefill.total_s,
        chosen.prefill.total_s
    )
}
