//! Running a planner [`Policy`] with `generate --policy auto|FILE`, and checking its prediction
//! against the run.
//!
//! What the executor runs: weights on the GPU (resident), in host memory (staged and fetched
//! layer by layer) and on disk (read into staging buffers for every pass, then fetched), split
//! by whole layers; FlexGen's block schedule (`num_gpu_batches` GPU
//! batches per step, each layer loaded once per step); host and disk KV attended near the data,
//! fetched to the compute device, or split (`attention_*`); a share of KV blocks stored as
//! hidden states and recomputed (`recompute.*`). A policy outside that space is refused with the
//! field that needs the missing piece (per-tier recompute shares that differ between tiers that
//! all hold cold KV), so a run never claims to follow a policy it does not.
//! The KV cache refuses, naming `recompute`, what it cannot hold: hidden states with a GPU KV
//! tier, or hidden states larger than a KV block. The GPU KV tier holds what the policy keeps on
//! the GPU ([`gpu_kv_tier_bytes`]), not whatever GPU memory is left, so the prediction covers
//! the KV that lands there.

use serde::Serialize;
use strata_planner::{
    Attention, MlpKind, ModelSpec, Policy, Prediction, Tier, Workload, kv_slots_on, kv_tokens_on,
    weight_layers,
};

use crate::forward::Residency;
use crate::generate::JobStats;
use crate::kv::AttentionRoutes;
use crate::model::{Family, ModelConfig};

/// What the executor takes from a policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Executable {
    pub residency: Residency,
    pub block_tokens: usize,
    pub batch_size: usize,
    pub exec: ExecSettings,
}

/// The executor's settings beyond weights and block size. The default is what `generate` does
/// without `--policy`: the whole batch as one GPU batch, KV attended where it lives, no
/// recompute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExecSettings {
    /// GPU batches per step (FlexGen's `num_gpu_batches`).
    pub gpu_batches: usize,
    /// Share of the host and disk tiers' KV attended near the data (the rest is fetched).
    pub routes: AttentionRoutes,
    /// Share of full KV blocks stored as the layer's input hidden states.
    pub recompute: f64,
    /// Staged layers copied ahead of the one computing (the policy's `prefetch_depth`).
    pub weight_lookahead: usize,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            gpu_batches: 1,
            routes: AttentionRoutes::default(),
            recompute: 0.0,
            weight_lookahead: 1,
        }
    }
}

/// The planner's view of a model (`dtype_bytes` for weights; the GPU tier keeps K and V in the
/// weights' dtype too).
pub fn model_spec(name: &str, c: &ModelConfig) -> ModelSpec {
    let dtype_bytes = c.dtype.size_bytes() as u64;
    ModelSpec {
        name: name.to_string(),
        layers: c.layers as u64,
        hidden: c.hidden as u64,
        heads: c.heads as u64,
        kv_heads: c.kv_heads as u64,
        head_dim: c.head_dim as u64,
        intermediate: c.intermediate as u64,
        vocab: c.vocab as u64,
        weight_dtype_bytes: dtype_bytes,
        kv_dtype_bytes: dtype_bytes,
        mlp: match c.family {
            Family::Opt => MlpKind::Plain,
            Family::Llama | Family::Qwen2 => MlpKind::Gated,
        },
        gemm_passes: 1,
    }
}

/// The settings that run `p` on a model of `layers` layers, or why the executor cannot run it
/// yet.
pub fn executable(p: &Policy, layers: usize) -> Result<Executable, String> {
    let w = p.weights;
    let residency = if w.gpu >= 1.0 {
        Residency::Resident
    } else if w.host >= 1.0 && p.host_mlp_share == 0.0 {
        Residency::Staged
    } else {
        // Whole layers: the GPU and disk shares rounded to the nearest layer, the host's what
        // is left.
        let split = weight_layers(&w, layers as u64);
        Residency::Split {
            resident_layers: split.gpu as usize,
            host_mlp_share: p.host_mlp_share,
            disk_layers: split.disk as usize,
        }
    };
    let recompute = recompute_share(p)?;
    if p.num_gpu_batches == 0 {
        return Err("num_gpu_batches = 0: a step needs at least one GPU batch".into());
    }
    Ok(Executable {
        residency,
        block_tokens: p.kv_block_tokens as usize,
        batch_size: (p.gpu_batch_size * p.num_gpu_batches) as usize,
        exec: ExecSettings {
            gpu_batches: p.num_gpu_batches as usize,
            routes: AttentionRoutes {
                host_near: p.attention_host.near_fraction(),
                disk_near: p.attention_disk.near_fraction(),
            },
            recompute,
            weight_lookahead: p.prefetch_depth.max(1) as usize,
        },
    })
}

/// The executor decides once per block, when it fills, whether it keeps hidden states, before
/// knowing which tier it will end up in: one share for every cold block. Per-tier shares run
/// when they agree, or when only one tier holds cold KV (or recompute applies to the GPU tier's
/// cold share only when all of it is there).
fn recompute_share(p: &Policy) -> Result<f64, String> {
    if let Some(share) = one_recompute_share(p) {
        return Ok(share);
    }
    let listed: Vec<String> = Tier::ALL
        .into_iter()
        .filter(|&t| p.kv.cold.get(t) > 0.0)
        .map(|t| format!("recompute.{} = {}", t.name(), p.recompute.get(t)))
        .collect();
    Err(format!(
        "{}: different recompute shares for tiers that all hold cold KV are not built yet (the \
         executor stores hidden states for one share of every cold block)",
        listed.join(", ")
    ))
}

/// The recompute share every tier holding cold KV agrees on (0 when none holds any), or `None`
/// when they differ. Allocates nothing: the planner's search asks it of every policy.
fn one_recompute_share(p: &Policy) -> Option<f64> {
    let mut share: Option<f64> = None;
    for t in Tier::ALL {
        if p.kv.cold.get(t) > 0.0 {
            let r = p.recompute.get(t);
            match share {
                Some(s) if (r - s).abs() >= 1e-9 => return None,
                Some(_) => {}
                None => share = Some(r),
            }
        }
    }
    Some(share.unwrap_or(0.0))
}

/// Whether this executor can run `p` on a model of spec `m`, and run it near its prediction:
/// [`executable`], plus the KV cache's own refusals that the policy alone decides (recompute only
/// where hidden states are no larger than K and V), and no fetching of host or disk KV (see
/// below). The planner's search takes it (`SearchSpace::runnable`) so `--policy auto`,
/// `strata plan` and `strata bench` choose among policies that run.
pub fn runnable(p: &Policy, m: &ModelSpec) -> bool {
    let recompute = Tier::ALL.iter().any(|&t| p.recompute.get(t) > 0.0);
    // The fetch path copies KV block by block (gathered on the host, one synchronous copy per
    // block into the pool): on an H100 it ran 20-40x slower than the cost model predicts, so the
    // search keeps host and disk KV attended near the data until fetches stream on the copy
    // stream. A policy FILE may still ask for fetching.
    let fetches = [Tier::Host, Tier::Disk].iter().any(|&t| {
        let holds_kv = p.kv.cold.get(t) > 0.0 || (p.kv.hot_tier == t && p.kv.hot_window_tokens > 0);
        holds_kv && p.attention(t) != Attention::AttendNear
    });
    // `executable`'s refusals, checked without building its error messages: the search asks
    // this of every policy it enumerates.
    p.num_gpu_batches > 0
        && one_recompute_share(p).is_some()
        && !fetches
        // Hidden states for recompute need a cache without a GPU KV tier, so a policy with
        // recompute runs only when it keeps none there (and then `generate` makes none).
        && (!recompute || (!p.keeps_gpu_kv() && hidden_fits_kv_block(m)))
}

/// Bytes of the GPU KV tier that runs `p` for `wl` on a model of `layers` layers, with KV
/// blocks of `block_bytes` (the GPU tier's dtype): the policy's GPU KV (at least the tier's
/// minimum, [`strata_planner::gpu_kv_min_blocks`], when it keeps any), at most `room` (what the
/// GPU budget leaves after weights and workspace), and a note for the user when the room falls
/// short of the policy.
pub fn gpu_kv_tier_bytes(
    p: &Policy,
    wl: &Workload,
    layers: u64,
    block_bytes: u64,
    room: u64,
) -> (u64, Option<String>) {
    let blocks = kv_tokens_on(p, wl, Tier::Gpu) / p.kv_block_tokens.max(1) * wl.batch * layers;
    let rows = strata_planner::prefill_batch_rows(p, wl);
    let min = strata_planner::gpu_kv_min_blocks(wl.batch, layers, rows, p.kv_block_tokens);
    let planned = if blocks > 0 { blocks.max(min) } else { 0 } * block_bytes;
    if planned <= room {
        return (planned, None);
    }
    let note = format!(
        "the policy keeps {} of KV on the GPU but the GPU budget leaves {}: the rest goes to \
         host memory, and the run will be slower than predicted",
        strata_planner::human_bytes(planned),
        strata_planner::human_bytes(room)
    );
    (room, Some(note))
}

/// Bytes of the host KV tier that runs `p` for `wl` on a model of `layers` layers, with host
/// block slots of `slot_bytes`, when `budget` is what `--host-mem` (or its default) allows. The
/// KV cache spills to disk only what the host tier cannot hold, so a policy that puts KV on disk
/// gets a host tier of the KV it keeps on the host (its hot window and host share, KV and hidden
/// states, in whole blocks): the host weights it counts in the same budget stay out of it, and
/// the disk holds, and is read for, what the prediction says. The tier never drops below two
/// slots per sequence and layer (a writable block, and room to spill through), nor rises above
/// `budget`. A policy that keeps no KV on disk gets `budget`: nothing would spill either way.
pub fn host_kv_tier_bytes(
    p: &Policy,
    wl: &Workload,
    layers: u64,
    slot_bytes: u64,
    budget: u64,
) -> u64 {
    if kv_slots_on(p, wl, Tier::Disk) == 0 {
        return budget;
    }
    let planned = kv_slots_on(p, wl, Tier::Host) * wl.batch * layers;
    let min = 2 * wl.batch * layers;
    (planned.max(min) * slot_bytes).min(budget)
}

/// Whether a token's hidden state (kept in f32) fits where its K and V would be (in the KV
/// dtype): the KV cache stores a recomputed block's hidden states in the block's own slot.
fn hidden_fits_kv_block(m: &ModelSpec) -> bool {
    4 * m.hidden <= 2 * m.kv_heads * m.head_dim * m.kv_dtype_bytes
}

/// The planner's search space restricted to what this executor runs.
pub fn search_space() -> strata_planner::SearchSpace {
    strata_planner::SearchSpace {
        runnable: Some(runnable),
        ..Default::default()
    }
}

/// The prediction beside what the run measured.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyCheck {
    pub policy: Policy,
    pub prediction: Prediction,
    pub predicted_decode_step_s: f64,
    pub measured_decode_step_s: f64,
    /// measured / predicted.
    pub decode_step_ratio: f64,
    /// The median of the run's decode steps, and it over the prediction: beside the mean, it
    /// says whether a few slow steps or all of them made the miss.
    pub measured_decode_step_median_s: f64,
    pub decode_step_median_ratio: f64,
    pub predicted_prefill_s: f64,
    pub measured_prefill_s: f64,
    pub prefill_ratio: f64,
    pub predicted_bound_by: String,
    /// The calibrated lower bound of a decode step (every stream's bytes over its calibrated
    /// bandwidth, the slowest of them, as if all overlapped perfectly; see
    /// `PhaseTime::floor_s`), and the measured step over it.
    pub decode_step_lower_bound_s: f64,
    pub decode_step_over_lower_bound: f64,
    /// Each stream's time over the job (prefill and the decode steps run), predicted and
    /// measured.
    pub streams: Vec<StreamCheck>,
    /// Seconds the passes waited for layers' weights to land on the device: copy time compute
    /// did not hide (the overlap the prediction assumes, where it failed).
    pub weight_wait_s: f64,
    /// Where the prediction missed, when the decode step is more than 20% off: the timed stream
    /// furthest over its prediction, or that none was (see [`prediction_miss`]).
    pub miss: Option<String>,
}

/// One stream's seconds over the job: the planner's prediction beside what the run timed.
#[derive(Clone, Debug, Serialize)]
pub struct StreamCheck {
    pub stream: &'static str,
    pub predicted_s: f64,
    /// `None` where the run has no timer for the stream.
    pub measured_s: Option<f64>,
    /// What the measured time is, or why there is none.
    pub measured_as: &'static str,
}

/// The median of `xs` (the mean of the middle two for an even count); `None` when empty.
pub(crate) fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Compares the prediction with the run: seconds per decode step (decode seconds over decode
/// steps, a step being one token for every running sequence), prefill seconds, and each
/// stream's seconds over the job, on a model of `layers` layers.
pub fn check(
    policy: &Policy,
    prediction: &Prediction,
    stats: &JobStats,
    layers: u64,
) -> PolicyCheck {
    let steps = stats.decode_steps.max(1) as f64;
    let measured_step = stats.decode_seconds / steps;
    let median_step = median(&stats.decode_step_seconds).unwrap_or(measured_step);
    let predicted_step = prediction.decode_step.total_s;
    let ratio = |m: f64, p: f64| if p > 0.0 { m / p } else { f64::NAN };
    PolicyCheck {
        policy: *policy,
        prediction: *prediction,
        predicted_decode_step_s: predicted_step,
        measured_decode_step_s: measured_step,
        decode_step_ratio: ratio(measured_step, predicted_step),
        measured_decode_step_median_s: median_step,
        decode_step_median_ratio: ratio(median_step, predicted_step),
        predicted_prefill_s: prediction.prefill.total_s,
        measured_prefill_s: stats.prefill_seconds,
        prefill_ratio: ratio(stats.prefill_seconds, prediction.prefill.total_s),
        predicted_bound_by: prediction.bound_by.name().to_string(),
        decode_step_lower_bound_s: prediction.decode_step.floor_s,
        decode_step_over_lower_bound: ratio(measured_step, prediction.decode_step.floor_s),
        streams: stream_checks(prediction, stats, layers),
        weight_wait_s: stats.weight_wait_seconds,
        miss: None,
    }
    .with_miss(stats.decode_steps as f64)
}

/// What to look at when a decode step is more than 20% off its prediction (`ratio` is measured
/// over predicted; `job_excess_s`, the job's measured seconds (prefill and decode) less its
/// predicted ones): the timed stream whose measured seconds are furthest past its prediction in
/// the same direction, when that accounts for at least a quarter of the job's miss; otherwise,
/// that no timed stream does, so the time went where no timer looks (GPU kernels, and host and
/// GPU work that ran in turn rather than overlapped).
pub fn prediction_miss(ratio: f64, job_excess_s: f64, streams: &[StreamCheck]) -> Option<String> {
    if (0.8..=1.2).contains(&ratio) || ratio.is_nan() {
        return None;
    }
    // Positive: off in the direction of the step (over when slow, under when fast).
    let sign = if ratio > 1.0 { 1.0 } else { -1.0 };
    let (word, mark) = if sign > 0.0 {
        ("over", "+")
    } else {
        ("under", "-")
    };
    let furthest = streams
        .iter()
        .filter_map(|s| s.measured_s.map(|m| (s, m, sign * (m - s.predicted_s))))
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .filter(|(_, _, off)| *off > 0.0);
    let job = (sign * job_excess_s).max(0.0);
    Some(match furthest {
        Some((s, m, off)) if off >= 0.25 * job => format!(
            "the step ran {ratio:.2}x its prediction; the timed stream furthest {word} its \
             prediction is {} ({m:.3} s measured against {:.3} s, {mark}{off:.3} s of the job's \
             {mark}{job:.3} s)",
            s.stream, s.predicted_s
        ),
        _ if sign > 0.0 => format!(
            "the step ran {ratio:.2}x its prediction, and no timed stream accounts for most of the \
             job's {mark}{job:.3} s: the difference is in the compute device's kernels, or in \
             host and device work that ran in turn rather than overlapped"
        ),
        _ => format!(
            "the step ran {ratio:.2}x its prediction, and no timed stream accounts for most of the \
             job's {mark}{job:.3} s: the compute device's kernels ran faster than predicted, or \
             streams the prediction adds up overlapped"
        ),
    })
}

/// Predicted seconds per stream over the prefill and the decode steps the run made, beside the
/// run's timers. GPU kernels are not timed; the host memory is a floor the streams share, not a
/// stream, so it is left out.
fn stream_checks(prediction: &Prediction, stats: &JobStats, layers: u64) -> Vec<StreamCheck> {
    use strata_planner::Stream;
    let steps = stats.decode_steps as f64;
    let predicted = |s: Stream| {
        layers as f64
            * (prediction.prefill.per_layer.get(s)
                + steps * prediction.decode_step.per_layer.get(s))
    };
    let copies = stats.gpu_copies.as_ref();
    let kv = &stats.kv;
    let weight_reads = stats.disk_weights.map_or(0.0, |w| w.read_seconds);
    let rows: [(Stream, Option<f64>, &'static str); 6] = [
        (Stream::GpuCompute, None, "kernels are not timed"),
        (
            Stream::H2d,
            copies.map(|c| c.h2d_seconds),
            "timed copies to the GPU (uploads under 64 KiB are not timed)",
        ),
        (
            Stream::D2h,
            copies.map(|c| c.d2h_seconds),
            "timed copies to the host",
        ),
        (
            Stream::HostAttention,
            Some(kv.host_attention_seconds + stats.host_mlp_seconds),
            "host-tier attention and host MLP share, wall time",
        ),
        (
            Stream::DiskRead,
            Some(kv.storage_attention_seconds + weight_reads),
            "storage attention (reads and math) and weight reads",
        ),
        (
            Stream::DiskWrite,
            Some(kv.disk_write_seconds),
            "KV written to disk",
        ),
    ];
    let mut checks: Vec<StreamCheck> = rows
        .into_iter()
        .map(|(s, measured_s, measured_as)| StreamCheck {
            stream: s.name(),
            predicted_s: predicted(s),
            measured_s,
            measured_as: if copies.is_none() && matches!(s, Stream::H2d | Stream::D2h) {
                "no GPU in this run"
            } else {
                measured_as
            },
        })
        .collect();
    // Host compute's two parts, each beside its own timer: which of them misses is what to
    // calibrate next.
    let mlp = layers as f64
        * (prediction.prefill.per_layer.host_mlp_s
            + steps * prediction.decode_step.per_layer.host_mlp_s);
    let at = checks
        .iter()
        .position(|c| c.stream == Stream::HostAttention.name())
        .map_or(checks.len(), |i| i + 1);
    checks.splice(
        at..at,
        [
            StreamCheck {
                stream: "host attention",
                predicted_s: predicted(Stream::HostAttention) - mlp,
                measured_s: Some(kv.host_attention_seconds),
                measured_as: "host-tier attention, wall time",
            },
            StreamCheck {
                stream: "host MLP share",
                predicted_s: mlp,
                measured_s: Some(stats.host_mlp_seconds),
                measured_as: "host MLP share, wall time",
            },
        ],
    );
    checks
}

impl PolicyCheck {
    fn with_miss(mut self, decode_steps: f64) -> Self {
        let job_excess = self.measured_prefill_s - self.predicted_prefill_s
            + decode_steps * (self.measured_decode_step_s - self.predicted_decode_step_s);
        self.miss = prediction_miss(self.decode_step_ratio, job_excess, &self.streams);
        self
    }

    /// Lines for the end of a run.
    pub fn report(&self) -> String {
        format!(
            "policy check: decode step predicted {:.2} ms (bound by {}), measured {:.2} ms \
             ({:.2}x; median step {:.2} ms, {:.2}x; {:.2}x the calibrated lower bound of {:.2} \
             ms); prefill predicted {:.3} s, measured {:.3} s ({:.2}x)",
            self.predicted_decode_step_s * 1e3,
            self.predicted_bound_by,
            self.measured_decode_step_s * 1e3,
            self.decode_step_ratio,
            self.measured_decode_step_median_s * 1e3,
            self.decode_step_median_ratio,
            self.decode_step_over_lower_bound,
            self.decode_step_lower_bound_s * 1e3,
            self.predicted_prefill_s,
            self.measured_prefill_s,
            self.prefill_ratio
        ) + &self.streams_report()
    }

    /// The streams that either side puts above zero, one line each.
    fn streams_report(&self) -> String {
        let busy: Vec<&StreamCheck> = self
            .streams
            .iter()
            .filter(|s| s.predicted_s > 0.0 || s.measured_s.is_some_and(|m| m > 0.0))
            .collect();
        if busy.is_empty() {
            return String::new();
        }
        let mut out = String::from("\n  per stream over the job, predicted / measured:");
        for s in busy {
            let measured = match s.measured_s {
                Some(m) => format!("{m:.3} s ({})", s.measured_as),
                None => format!("– ({})", s.measured_as),
            };
            out.push_str(&format!(
                "\n    {:<16} {:>10.3} s / {measured}",
                s.stream, s.predicted_s
            ));
        }
        if let Some(m) = &self.miss {
            out.push_str(&format!("\n  where it missed: {m}"));
        }
        if self.weight_wait_s > 0.0 {
            out.push_str(&format!(
                "\n  waited {:.3} s for weight copies to land (copy time compute did not hide)",
                self.weight_wait_s
            ));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use strata_planner::{Attention, KvPlacement, PerTier, TierSplit};

    fn gpu_only() -> Policy {
        Policy {
            version: strata_planner::POLICY_VERSION,
            weights: TierSplit::all_on(Tier::Gpu),
            kv: KvPlacement {
                hot_window_tokens: 0,
                hot_tier: Tier::Gpu,
                cold: TierSplit::all_on(Tier::Gpu),
            },
            recompute: PerTier::default(),
            attention_host: Attention::AttendNear,
            attention_disk: Attention::AttendNear,
            gpu_batch_size: 8,
            num_gpu_batches: 1,
            kv_block_tokens: 32,
            prefetch_depth: 1,
            host_mlp_share: 0.0,
        }
    }

    #[test]
    fn recompute_runs_only_without_gpu_kv_and_where_hidden_states_fit_the_kv_dtype() {
        let spec = |name: &str, kv_bytes: u64| {
            let mut m = model_spec(name, &crate::model::synthetic::config(name).unwrap());
            m.kv_dtype_bytes = kv_bytes;
            m
        };
        let mut p = gpu_only();
        p.kv.cold = TierSplit::all_on(Tier::Disk);
        p.kv.hot_window_tokens = 256;
        p.kv.hot_tier = Tier::Host;
        p.recompute.disk = 0.5;
        // OPT (MHA): a token's f32 hidden state is as large as its bf16 K and V.
        assert!(runnable(&p, &spec("opt-6.7b", 2)));
        assert!(runnable(&p, &spec("opt-6.7b", 4)));
        // Llama-3-8B (GQA, 8 of 32 heads): four times larger even against f32 K and V.
        assert!(!runnable(&p, &spec("llama-3-8b", 4)));
        // KV on the GPU (its hot window, or older tokens) rules recompute out.
        let mut hot_gpu = p;
        hot_gpu.kv.hot_tier = Tier::Gpu;
        assert!(hot_gpu.keeps_gpu_kv());
        assert!(!runnable(&hot_gpu, &spec("opt-6.7b", 2)));
        let mut cold_gpu = p;
        cold_gpu.kv.cold = TierSplit {
            gpu: 0.5,
            host: 0.0,
            disk: 0.5,
        };
        assert!(!runnable(&cold_gpu, &spec("opt-6.7b", 2)));
        hot_gpu.recompute.disk = 0.0;
        assert!(runnable(&hot_gpu, &spec("opt-6.7b", 2)));
    }

    /// `runnable` checks `executable`'s refusals without building its messages: over a grid of
    /// cold-KV splits, recompute shares and GPU batch counts, the two agree.
    #[test]
    fn runnable_refuses_exactly_what_executable_refuses() {
        let m = model_spec(
            "opt-6.7b",
            &crate::model::synthetic::config("opt-6.7b").unwrap(),
        );
        let splits = [
            TierSplit::all_on(Tier::Host),
            TierSplit::all_on(Tier::Disk),
            TierSplit {
                gpu: 0.0,
                host: 0.5,
                disk: 0.5,
            },
        ];
        let shares = [0.0, 0.5, 1.0];
        let (mut refused, mut taken) = (0, 0);
        for cold in splits {
            for (host, disk) in shares.iter().flat_map(|&h| shares.map(|d| (h, d))) {
                for batches in [0, 1, 2] {
                    let mut p = gpu_only();
                    p.kv.cold = cold;
                    p.kv.hot_tier = Tier::Host;
                    p.kv.hot_window_tokens = 64;
                    p.recompute.host = host;
                    p.recompute.disk = disk;
                    p.num_gpu_batches = batches;
                    let ok = executable(&p, m.layers as usize).is_ok();
                    assert_eq!(runnable(&p, &m), ok, "{p:?}");
                    if ok {
                        taken += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused > 0 && taken > 0, "{refused} refused, {taken} taken");
    }

    /// The workload of the tier-size tests: 4 prompts of 4000 tokens, 16 generated.
    fn four_prompts_of_4000() -> Workload {
        Workload {
            batch: 4,
            prompt_len: 4000,
            gen_len: 16,
        }
    }

    /// The GPU KV tier holds what the policy keeps on the GPU: nothing for a policy without GPU
    /// KV, its hot window and GPU share in whole blocks otherwise, and no more than the budget
    /// leaves (saying so).
    #[test]
    fn the_gpu_kv_tier_holds_the_policys_gpu_kv() {
        let wl = four_prompts_of_4000();
        let block_bytes = 1 << 16;
        let mut p = gpu_only();
        p.kv.cold = TierSplit::all_on(Tier::Host);
        p.kv.hot_tier = Tier::Host;
        p.kv.hot_window_tokens = 128;
        assert_eq!(kv_tokens_on(&p, &wl, Tier::Gpu), 0);
        assert_eq!(
            gpu_kv_tier_bytes(&p, &wl, 32, block_bytes, 1 << 40),
            (0, None)
        );
        // 4016 tokens: 128 hot on the GPU and a tenth of the 3888 older ones, 516.8 in all: 17
        // blocks of 32.
        p.kv.hot_tier = Tier::Gpu;
        p.kv.cold = TierSplit {
            gpu: 0.1,
            host: 0.9,
            disk: 0.0,
        };
        assert_eq!(kv_tokens_on(&p, &wl, Tier::Gpu), 17 * 32);
        let planned = 17 * 4 * 32 * block_bytes;
        assert_eq!(
            gpu_kv_tier_bytes(&p, &wl, 32, block_bytes, 1 << 40),
            (planned, None)
        );
        let (bytes, note) = gpu_kv_tier_bytes(&p, &wl, 32, block_bytes, planned / 2);
        assert_eq!(bytes, planned / 2);
        assert!(note.is_some_and(|n| n.contains("slower than predicted")));
        // A sliver of KV on the GPU gets the tier's minimum: a writable block per sequence and
        // layer, one prefill GPU batch's blocks and one per sequence (the run keeps no tier below
        // that).
        p.kv.hot_tier = Tier::Host;
        p.kv.cold = TierSplit {
            gpu: 0.001,
            host: 0.999,
            disk: 0.0,
        };
        let rows = strata_planner::prefill_batch_rows(&p, &wl);
        let min = 4 * 32 + rows.div_ceil(32) + 4;
        assert_eq!(
            gpu_kv_tier_bytes(&p, &wl, 32, block_bytes, 1 << 40),
            (min * block_bytes, None)
        );
    }

    /// With KV on disk, the host KV tier holds the policy's host KV (not the whole host budget,
    /// which also holds host weights), so the disk holds what the prediction reads from it.
    #[test]
    fn the_host_kv_tier_holds_the_policys_host_kv_when_kv_goes_to_disk() {
        let wl = four_prompts_of_4000();
        let slot = 1 << 16;
        let budget = 1 << 40;
        let mut p = gpu_only();
        p.kv.hot_tier = Tier::Host;
        p.kv.hot_window_tokens = 128;
        p.kv.cold = TierSplit {
            gpu: 0.0,
            host: 0.9,
            disk: 0.1,
        };
        // 4016 tokens: 128 hot and 90% of the 3888 older ones on the host, 3627.2 in all: 114
        // blocks of 32 per sequence and layer.
        assert_eq!(kv_slots_on(&p, &wl, Tier::Host), 114);
        assert_eq!(
            host_kv_tier_bytes(&p, &wl, 32, slot, budget),
            114 * 4 * 32 * slot
        );
        // Never above the budget.
        assert_eq!(host_kv_tier_bytes(&p, &wl, 32, slot, 1 << 20), 1 << 20);
        // Hidden states take slots too, each kind in whole blocks: with half the older tokens
        // stored as hidden states, 128 + 1749.6 tokens of KV and 1749.6 of hidden states.
        p.recompute.host = 0.5;
        p.recompute.disk = 0.5;
        assert_eq!(kv_slots_on(&p, &wl, Tier::Host), 59 + 55);
        // Nearly all on disk: two slots per sequence and layer at least.
        p.recompute = PerTier::default();
        p.kv.hot_window_tokens = 0;
        p.kv.cold = TierSplit {
            gpu: 0.0,
            host: 0.001,
            disk: 0.999,
        };
        assert_eq!(
            host_kv_tier_bytes(&p, &wl, 32, slot, budget),
            2 * 4 * 32 * slot
        );
        // No KV on disk: the whole budget (nothing would spill).
        p.kv.cold = TierSplit::all_on(Tier::Host);
        assert_eq!(host_kv_tier_bytes(&p, &wl, 32, slot, budget), budget);
    }

    /// A step more than 20% off names the timed stream furthest off its prediction, or says
    /// that none is and where the time went.
    /// The check reports the median step beside the mean: three 10 ms steps and one of 50 ms
    /// average 20 ms, but the median says the run's usual step was 10 ms. Without step times
    /// (an older caller) the median is the mean.
    #[test]
    fn the_check_reports_the_median_step_beside_the_mean() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let spec = model_spec(
            "synthetic:llama-3-8b",
            &crate::model::synthetic::config("llama-3-8b").unwrap(),
        );
        let wl = strata_planner::Workload {
            batch: 8,
            prompt_len: 512,
            gen_len: 5,
        };
        let hw = strata_planner::HardwareProfile::h100_reference();
        let prediction = strata_planner::predict(&spec, &wl, &gpu_only(), &hw);
        let mut stats = JobStats {
            decode_steps: 4,
            decode_seconds: 0.08,
            decode_step_seconds: vec![0.01, 0.05, 0.01, 0.01],
            ..JobStats::default()
        };
        let c = check(&gpu_only(), &prediction, &stats, 32);
        let p = prediction.decode_step.total_s;
        assert!((c.measured_decode_step_s - 0.02).abs() < 1e-12);
        assert!((c.measured_decode_step_median_s - 0.01).abs() < 1e-12);
        assert!((c.decode_step_median_ratio - 0.01 / p).abs() < 1e-9);
        assert!(
            c.report().contains("median step 10.00 ms"),
            "{}",
            c.report()
        );
        stats.decode_step_seconds.clear();
        let c = check(&gpu_only(), &prediction, &stats, 32);
        assert_eq!(c.measured_decode_step_median_s, c.measured_decode_step_s);
    }

    #[test]
    fn a_missed_prediction_names_the_stream_furthest_off() {
        let row = |stream, predicted_s, measured_s| StreamCheck {
            stream,
            predicted_s,
            measured_s,
            measured_as: "",
        };
        let streams = [
            row("gpu compute", 1.0, None),
            row("host→device", 1.0, Some(1.1)),
            row("host compute", 0.7, Some(1.5)),
            row("disk read", 2.0, Some(1.0)),
        ];
        assert_eq!(prediction_miss(1.1, 0.1, &streams), None);
        assert_eq!(prediction_miss(0.85, -0.2, &streams), None);
        let slow = prediction_miss(2.0, 2.0, &streams).unwrap();
        assert!(
            slow.contains("host compute") && slow.contains("+0.800 s of the job's +2.000 s"),
            "{slow}"
        );
        let fast = prediction_miss(0.6, -1.5, &streams).unwrap();
        assert!(
            fast.contains("disk read") && fast.contains("-1.000"),
            "{fast}"
        );
        // A stream over its prediction by less than a quarter of the job's miss explains little.
        let small = prediction_miss(2.0, 4.0, &streams).unwrap();
        assert!(small.contains("no timed stream accounts"), "{small}");
        let on_time = [
            row("gpu compute", 1.0, None),
            row("host→device", 1.0, Some(0.9)),
        ];
        let hidden = prediction_miss(1.6, 0.5, &on_time).unwrap();
        assert!(
            hidden.contains("no timed stream accounts") && hidden.contains("in turn"),
            "{hidden}"
        );
        let overlapped = prediction_miss(0.5, -3.0, &on_time).unwrap();
        assert!(overlapped.contains("overlapped"), "{overlapped}");
    }

    #[test]
    fn runnable_policies_map_to_settings_and_the_rest_name_their_field() {
        let p = gpu_only();
        assert_eq!(
            executable(&p, 32),
            Ok(Executable {
                residency: Residency::Resident,
                block_tokens: 32,
                batch_size: 8,
                exec: ExecSettings::default(),
            })
        );
        let staged = Policy {
            weights: TierSplit::all_on(Tier::Host),
            ..p
        };
        assert_eq!(
            executable(&staged, 32).unwrap().residency,
            Residency::Staged
        );
        let mut fetch = p;
        fetch.kv.cold = TierSplit::all_on(Tier::Disk);
        fetch.attention_disk = Attention::FetchToGpu;
        fetch.attention_host = Attention::Split {
            near_fraction: 0.25,
        };
        fetch.recompute.disk = 0.5;
        let run = executable(&fetch, 32).unwrap();
        assert_eq!(
            (run.exec.routes.host_near, run.exec.routes.disk_near),
            (0.25, 0.0)
        );
        assert_eq!(run.exec.recompute, 0.5);
        let mut bad = fetch;
        bad.kv.cold = TierSplit {
            gpu: 0.0,
            host: 0.5,
            disk: 0.5,
        };
        assert!(executable(&bad, 32).unwrap_err().contains("recompute.disk"));
        let blocks = Policy {
            gpu_batch_size: 2,
            num_gpu_batches: 4,
            ..p
        };
        let run = executable(&blocks, 32).unwrap();
        assert_eq!((run.batch_size, run.exec.gpu_batches), (8, 4));
        let bad = Policy {
            num_gpu_batches: 0,
            ..p
        };
        assert!(
            executable(&bad, 32)
                .unwrap_err()
                .contains("num_gpu_batches")
        );
        let mut split = p;
        split.weights = TierSplit {
            gpu: 0.62,
            host: 0.38,
            disk: 0.0,
        };
        assert_eq!(
            executable(&split, 32).unwrap().residency,
            Residency::Split {
                resident_layers: 20,
                host_mlp_share: 0.0,
                disk_layers: 0,
            }
        );
        let mut disk = p;
        disk.weights = TierSplit {
            gpu: 0.5,
            host: 0.25,
            disk: 0.25,
        };
        disk.host_mlp_share = 0.3;
        assert_eq!(
            executable(&disk, 32).unwrap().residency,
            Residency::Split {
                resident_layers: 16,
                host_mlp_share: 0.3,
                disk_layers: 8,
            }
        );
        // All of it on disk; and shares that round past the layers never give more than all.
        disk.weights = TierSplit::all_on(Tier::Disk);
        disk.host_mlp_share = 0.0;
        assert_eq!(
            executable(&disk, 32).unwrap().residency,
            Residency::Split {
                resident_layers: 0,
                host_mlp_share: 0.0,
                disk_layers: 32,
            }
        );
        disk.weights = TierSplit {
            gpu: 0.51,
            host: 0.0,
            disk: 0.49,
        };
        let Residency::Split {
            resident_layers,
            disk_layers,
            ..
        } = executable(&disk, 3).unwrap().residency
        else {
            panic!("a split")
        };
        assert_eq!((resident_layers, disk_layers), (2, 1));
    }
}

#[cfg(test)]
mod runnable_tests {
    use super::*;
    use crate::gpu_budget::tests::workload;
    use crate::model::synthetic;
    use strata_planner::{HardwareProfile, plan, plan_with};

    /// With the executor's check in the search, every plan is one `generate --policy` runs, even
    /// where the unrestricted search would choose what it does not run well (KV fetched during
    /// decode, recompute beside a GPU KV tier).
    #[test]
    fn plans_under_the_executor_search_space_are_runnable() {
        let hw = HardwareProfile::h100_reference();
        let cases = [
            ("llama-3-8b", 8u64, 2048u64, 12u64, 8u64),
            ("llama-3-8b", 16, 4096, 24, 64),
            ("opt-6.7b", 32, 512, 8, 16),
        ];
        let mut restricted_somewhere = false;
        for (name, batch, prompt, gpu_gib, host_gib) in cases {
            let cfg = synthetic::config(name).expect("preset");
            let spec = model_spec(name, &cfg);
            let (wl, budgets) = workload(batch, prompt, gpu_gib, host_gib, 500);
            let free = plan(&spec, &wl, &budgets, &hw);
            let Ok(ours) = plan_with(&spec, &wl, &budgets, &hw, &search_space()) else {
                continue;
            };
            assert!(
                runnable(&ours.policy, &spec),
                "{name}: {:?}",
                executable(&ours.policy, cfg.layers)
            );
            if free.is_ok_and(|f| !runnable(&f.policy, &spec)) {
                restricted_somewhere = true;
            }
        }
        assert!(
            restricted_somewhere,
            "no case needed the restriction: the test no longer exercises it"
        );
    }
}
