//! The overlap-aware cost model and the memory footprint of a policy.
//!
//! Notation: `N` batch, `k` GPU batches, `L` layers, `W` weight bytes per layer, `kvb` KV bytes
//! per token per layer, `hb` hidden-state bytes per token, `w_t` weight fraction on tier `t`.
//!
//! **Token split.** A sequence of `c` tokens has `min(window, c)` hot tokens on the hot tier and
//! `cold = c − hot` tokens split by `kv.cold`; of tier `t`'s cold tokens a share `r_t` is stored as
//! hidden states (recompute), the rest as KV. A tier's KV tokens are attended near the data for a
//! fraction `a_t` (host: host threads; disk: the storage engine, which reads them to the host) and
//! fetched to the GPU for the rest; GPU-resident and regenerated KV are attended on the GPU.
//!
//! **Decode step, per layer, whole batch**, at the mean decode context `c = s + (n+1)/2`:
//! - weights: `h2d = (w_host + w_disk)·W`, `disk_read = w_disk·W` (once per layer: the block
//!   schedule reuses them across the `k` GPU batches); HBM reads `k·W`; FLOPs `2·params·N`.
//! - fetched KV (`(1−a_t)` of host/disk KV tokens): `h2d += kv·kvb`, disk adds `disk_read`.
//! - attend-near KV: `host_attention += kv·kvb` (disk also `disk_read += kv·kvb`); only `q`
//!   (`N·q_width` activations) crosses down and `(o, lse)` (`N·heads·(head_dim+1)·4`) up.
//! - recompute tokens: `hb` each over `h2d` (and `disk_read` from disk), then
//!   `2·hidden·kv_width` FLOPs to regenerate K, V and HBM `hb + 2·kvb` (read h, write and read KV).
//! - GPU attention: `4·q_width` FLOPs and `kvb` HBM bytes per (query, key) pair on the GPU.
//! - host MLP share `μ` (`host_mlp_share`) with `Wm` MLP bytes per layer: `μ·w_host·Wm` of the
//!   weights stay in host memory (off `h2d` and the GPU's HBM and FLOPs) and are read by host
//!   threads once per GPU batch: `k·μ·w_host·Wm` bytes at the rate the profile measured for a
//!   layer's share at a GPU batch's rows (`host_mlp_layer_gbps`, decode-sized calls after the
//!   threads idle). Profiles without that table: those bytes at host attention's calibrated rate
//!   or `2·N·μ·w_host·Wm / dtype` FLOPs at the matrix-vector FLOP rate, whichever takes longer.
//!   Each GPU batch's MLP input goes down and the host's partial output comes up
//!   (`N·hidden·4` each way).
//! - new tokens: `N` tokens' KV land on the hot tier and `N` age into the cold split (KV from the
//!   hot tier, hidden states from the GPU): `d2h` when leaving the GPU, `disk_write` into disk.
//!
//! **Prefill, per layer**: the same weight traffic once; FLOPs `2·params·N·s + 2·s(s+1)·q_width·N`
//! (causal); every prompt token's KV or hidden state written to its tier (`d2h`, `disk_write`).
//! A prompt longer than a GPU batch's `r` rows runs in `C = ⌈s/r⌉` chunks, and chunk `c` attends
//! the `c·r` tokens before it, so each sequence reads back `r·C(C−1)/2` tokens; those the split
//! keeps off the GPU come up through scratch (`h2d`; from disk also `disk_read`), hidden states
//! regenerated as in decode.
//!
//! **Between the GEMMs**, per token and layer, norms, RoPE, the KV append, residual adds and the
//! MLP's activation move `a` bytes of f32 activations and half-precision operands through HBM
//! ([`ModelSpec::activation_bytes_per_token_per_layer`]), `N·a` in a decode step and `N·s·a` in
//! a prefill.
//!
//! **Stream times** = bytes / bandwidth; `gpu_compute = max(FLOPs / GEMM rate, HBM time) +
//! activation bytes / HBM bandwidth + k · layer overhead` (the kernels between the GEMMs run in
//! turn with them). HBM time charges a decode step's weights at the rate the GPU's projections
//! stream them at a GPU batch's rows ([`HardwareProfile::gpu_weight_bps`]) and its GPU-attended
//! KV at the decode kernel's rate plus its fixed cost per launch, one per GPU batch
//! ([`HardwareProfile::gpu_decode_attention_s`]), both calibrated; every other byte at the
//! device copy's rate. A decode step adds the LM head once per GPU batch at the projections'
//! rate ([`PhaseTime::head_s`]). Where the profile measured the host's time to issue a decode
//! layer at a GPU batch's sequences ([`HardwareProfile::decode_issue_s`]), a decode layer's
//! GPU time is the longer of that and its kernels' (the bytes and FLOPs above plus the
//! calibrated extra of a decode layer in a stream, [`HardwareProfile::decode_layer_extra_s`],
//! or [`DECODE_SMALL_KERNELS_S`] without it) per GPU batch: the GPU cannot run ahead of the
//! host issuing its work, and on the machines measured either can be the longer. Host
//! attention = its KV bytes at the profile's rate for the policy's block size
//! ([`HardwareProfile::host_attention_bps`])
//! plus one call's fixed cost per GPU batch; host compute (that and the host MLP share) runs at
//! the profile's `host_attention_beside_copies` fraction of its rate for as long as the layer's
//! host→device copies run beside it (`alone + min(alone, h2d)·(1/f − 1)`). Disk bandwidth
//! depends on request size (weights: 4 MiB chunks; KV: one block of one sequence in one layer),
//! see [`HardwareProfile::disk_read_bps`].
//! **Host memory** is shared: host attention reads it, every host→device copy reads it, and
//! device→host copies and disk reads write into it (disk writes read it). Each stream's own
//! rate was calibrated alone, so `host_memory = (host_attention + h2d + d2h + disk_read +
//! disk_write bytes) / host memory bandwidth` ([`HardwareProfile::host_memory_bps`]) is a floor
//! on the layer that no single stream shows.
//! **The disk** is one device: its reads and writes take turns, so `disk_read + disk_write` is
//! a floor on the layer too (it matters where both are large: a long prompt's chunks written to
//! disk and read back).
//! **Overlap**: streams run concurrently, so a layer costs the max over streams and the two
//! floors — except that near-data attention of a GPU batch must finish before that
//! batch's output projection (and the host's MLP share before its next layer), so host compute
//! overlaps GPU compute only across GPU batches:
//! that pair costs `max(g, a) + min(g, a)/k`, and with `k > 1` the host side of that max also
//! carries the cost of issuing the layer's GPU work (`launches ·` layer overhead), because the
//! thread that attends is the one that issues it: `max(g, a + issue) + min(g, a)/k`. The layer's
//! copies run while the host attends (the next layer's weights are prefetched as a layer starts),
//! so they share the memory with it: `a = max(host_attention, host_memory)`. A phase costs
//! `L · layer + fill`, where the pipeline fill/drain
//! `fill = (Σ streams − max stream) / prefetch_depth` is paid once per step.
//!
//! **Memory** (at the final length `s + n`, tokens rounded up to whole blocks per tier): weights
//! per tier + embeddings and LM head on the GPU; KV / hidden states per tier (the runtime's
//! tiers have one slot size, a KV block's, and a block of hidden states takes a whole slot, so
//! it counts `max(kvb, hb)` a token: recompute saves bytes moved, never capacity); GPU working
//! buffers
//! `(depth+1)·(streamed weights of a layer + fetched/regenerated KV of one GPU batch in one layer)`,
//! the workspace of a prefill GPU batch of `r = min(g·s, PREFILL_ROWS)` rows (one GPU batch's
//! prompts) and the logits, plus the residual stream of the pass's other `k − 1` GPU batches
//! ([`prefill_workspace_bytes`], the runtime's own sizing: a prefill pass runs the block
//! schedule over `k` GPU batches of `r` rows, so the prefill runs `⌈N·s / (k·r)⌉` passes, each
//! streaming the weights it does not keep once);
//! pinned host staging `(depth+1)·(disk KV bytes of one layer, one GPU batch)`, and two whole
//! layers of weights when any layer's weights are on disk (the executor's staging buffers).
//!
//! Not modelled yet: layer 0 recomputed from token ids, prefix sharing, jitter between layers.

use serde::{Deserialize, Serialize};

use crate::model::{ModelSpec, Workload};
use crate::policy::{PerTier, Policy, Tier, weight_layers};
use crate::profile::HardwareProfile;

/// Bytes per tier.
pub type TierBytes = PerTier<u64>;

/// GPU time of a decode layer's small kernels (norms, RoPE, the KV append, residual adds, the
/// MLP's activation, small uploads and operand conversions), per GPU batch: 37 µs at 1
/// sequence and 44 µs at 16 on an H100 (Llama-3-8B, Nsight Compute, 2026-11-23). Charged with
/// a measured host issue time ([`HardwareProfile::decode_issue_s`]), which replaces the fixed
/// overhead that stood for both, where the profile has no measured extra per decode layer
/// ([`HardwareProfile::decode_layer_extra_s`]): in a stream a layer takes more than its kernels
/// timed alone (at 16 rows on an H100, 359 µs against 296; 2026-11-23).
pub const DECODE_SMALL_KERNELS_S: f64 = 40e-6;

/// Rows (prompt tokens over the whole batch) of one prefill forward pass: the runtime's default
/// `--prefill-chunk`; the GPU workspace is sized for it.
pub const PREFILL_ROWS: u64 = 8192;

/// GPU workspace of one forward pass over `rows` rows with `logit_rows` rows of logits: the f32
/// tensors alive at once in a layer (the residual, norm output, q, k, v, attention output and
/// partials, projections; the MLP's gate, up and activation; half-precision GEMM operands), the
/// logits, plus cuBLAS's workspace and allocator slack, with a 1.5× margin. The runtime splits
/// `--gpu-mem` with this same function, so the planner's GPU memory and the run's agree.
pub fn gpu_workspace_bytes(m: &ModelSpec, rows: u64, logit_rows: u64) -> u64 {
    let h = m.hidden.max(m.heads * m.head_dim);
    let per_row = 8 * h + 3 * m.intermediate + 2 * m.intermediate.max(m.hidden);
    let act = rows * per_row * 4 + logit_rows * m.vocab * 4;
    act * 3 / 2 + (512 << 20)
}

/// GPU workspace of a prefill pass in `gpu_batches` GPU batches of at most `batch_rows` rows:
/// one batch's [`gpu_workspace_bytes`], and the other batches' residual stream (f32, with the
/// same margin), which waits on the GPU while each layer serves every batch in turn.
pub fn prefill_workspace_bytes(
    m: &ModelSpec,
    batch_rows: u64,
    gpu_batches: u64,
    logit_rows: u64,
) -> u64 {
    let others = gpu_batches.saturating_sub(1) * batch_rows * m.hidden * 4;
    gpu_workspace_bytes(m, batch_rows, logit_rows) + others * 3 / 2
}
const WEIGHT_REQUEST_BYTES: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    GpuCompute,
    H2d,
    D2h,
    /// Host threads: attention near the data, and the host's share of the MLP.
    HostAttention,
    DiskRead,
    DiskWrite,
    /// The host's memory, which host attention, the copies and disk IO share: its bytes are
    /// those of other streams, so it is a floor on a layer, not a stream of its own.
    HostMemory,
}

impl Stream {
    /// Everything the cost model times, as `strata plan` lists it.
    pub const ALL: [Stream; 7] = [
        Stream::GpuCompute,
        Stream::H2d,
        Stream::D2h,
        Stream::HostAttention,
        Stream::DiskRead,
        Stream::DiskWrite,
        Stream::HostMemory,
    ];

    /// The streams that each move or compute bytes of their own: sums and maxima over them count
    /// every byte once ([`Stream::HostMemory`] counts bytes of four of them again).
    pub const INDEPENDENT: [Stream; 6] = [
        Stream::GpuCompute,
        Stream::H2d,
        Stream::D2h,
        Stream::HostAttention,
        Stream::DiskRead,
        Stream::DiskWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stream::GpuCompute => "gpu compute",
            Stream::H2d => "host→device",
            Stream::D2h => "device→host",
            Stream::HostAttention => "host compute",
            Stream::DiskRead => "disk read",
            Stream::DiskWrite => "disk write",
            Stream::HostMemory => "host memory",
        }
    }
}

/// Seconds per stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamTimes {
    pub gpu_compute_s: f64,
    pub h2d_s: f64,
    pub d2h_s: f64,
    /// Host threads: attention near the data and the host's MLP share.
    pub host_attention_s: f64,
    pub disk_read_s: f64,
    pub disk_write_s: f64,
    /// All host-memory bytes of the other streams over the host memory's bandwidth.
    pub host_memory_s: f64,
    /// The host MLP share's part of `host_attention_s` (not a stream of its own: the same
    /// threads run it), so a run's two host timers can each be set beside their prediction.
    #[serde(default)]
    pub host_mlp_s: f64,
    /// The host-side cost of issuing the layer's GPU work (`launches ×` the profile's layer
    /// overhead or measured issue time; in a decode layer that attends on the host, plus the
    /// turns around that attention once per GPU batch, `host_tier_issue_us`), part of
    /// `gpu_compute_s`: the thread that issues it also runs host attention, so the two take
    /// turns.
    #[serde(default)]
    pub gpu_issue_s: f64,
}

impl StreamTimes {
    pub fn get(&self, s: Stream) -> f64 {
        match s {
            Stream::GpuCompute => self.gpu_compute_s,
            Stream::H2d => self.h2d_s,
            Stream::D2h => self.d2h_s,
            Stream::HostAttention => self.host_attention_s,
            Stream::DiskRead => self.disk_read_s,
            Stream::DiskWrite => self.disk_write_s,
            Stream::HostMemory => self.host_memory_s,
        }
    }

    /// The slowest independent stream and its time (the first of equals, in
    /// [`Stream::INDEPENDENT`] order).
    pub fn max(&self) -> (Stream, f64) {
        let mut best = (Stream::GpuCompute, self.gpu_compute_s);
        for s in Stream::INDEPENDENT {
            if self.get(s) > best.1 {
                best = (s, self.get(s));
            }
        }
        best
    }

    /// The independent streams' times added up (each byte once).
    pub fn sum(&self) -> f64 {
        Stream::INDEPENDENT.iter().map(|&s| self.get(s)).sum()
    }

    /// How long the host attention of a layer lasts while the layer's copies and disk IO share
    /// the host's memory with it (0 without host attention).
    fn host_attention_shared_s(&self) -> f64 {
        if self.host_attention_s > 0.0 {
            self.host_attention_s.max(self.host_memory_s)
        } else {
            0.0
        }
    }
}

/// One phase (a decode step, or the prefill): per-layer stream times and the phase's total.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub per_layer: StreamTimes,
    pub bound_by: Stream,
    /// One layer, streams overlapped.
    pub layer_s: f64,
    /// Pipeline fill and drain, paid once per phase.
    pub pipeline_fill_s: f64,
    /// The LM head, once per GPU batch (decode: every row's logits; prefill: only the last
    /// rows', left out): its weights read at the rate the GPU's projections reach at the GPU
    /// batch's rows ([`HardwareProfile::gpu_weight_bps`]).
    #[serde(default)]
    pub head_s: f64,
    /// `layers · layer_s + pipeline_fill_s + head_s`.
    pub total_s: f64,
    /// The calibrated lower bound: `layers ·` the slowest stream's time per layer (host memory
    /// included), as if every stream overlapped every other perfectly with nothing to fill. No
    /// schedule of this policy's bytes and FLOPs on this machine can beat it; the distance from
    /// it to `total_s` is what the model charges the schedule.
    #[serde(default)]
    pub floor_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// One decode step (one token for every sequence) at the mean decode context.
    pub decode_step: PhaseTime,
    pub prefill: PhaseTime,
    /// What bounds the decode step.
    pub bound_by: Stream,
    /// `batch / decode_step.total_s`.
    pub decode_tokens_per_s: f64,
    /// Generated tokens over the whole job: `batch·gen_len / total_s`.
    pub tokens_per_s: f64,
    /// `prefill.total_s + gen_len · decode_step.total_s`.
    pub total_s: f64,
    /// Peak bytes per tier (see the module header).
    pub memory: TierBytes,
}

/// Bytes and FLOPs of one layer of one phase.
#[derive(Default)]
struct Traffic {
    flops: f64,
    /// Causal prefill attention, charged at its own rate: the tensor-core kernel's over
    /// half-precision KV, the generic kernel's over f32 KV.
    attention_flops: f64,
    hbm: f64,
    /// Of `hbm`, a decode step's weights read by its projections and its KV read by the GPU's
    /// decode attention: each charged at its kernel's calibrated rate instead of the copy's
    /// ([`HardwareProfile::gpu_weight_bps`], [`HardwareProfile::gpu_decode_attention_s`]).
    decode_weights: f64,
    decode_kv: f64,
    /// A decode step's traffic: its layers are charged the host's measured issue time
    /// ([`HardwareProfile::decode_issue_s`]) where the profile has it.
    decode: bool,
    /// Bytes the kernels between the GEMMs move through HBM (see
    /// [`ModelSpec::activation_bytes_per_token_per_layer`]): they run in turn with the GEMMs,
    /// so their time adds to the GEMMs' instead of hiding under it.
    elementwise: f64,
    h2d: f64,
    d2h: f64,
    host_attention: f64,
    /// MLP weight bytes host threads read (the host's MLP share), and the FLOPs they compute.
    host_mlp: f64,
    host_mlp_flops: f64,
    disk_read_weights: f64,
    disk_read_kv: f64,
    disk_read_hidden: f64,
    disk_write: f64,
    launches: f64,
}

impl Traffic {
    /// Stored bytes moving between tiers.
    fn move_bytes(&mut self, from: Tier, to: Tier, bytes: f64) {
        match (from, to) {
            (a, b) if a == b => {}
            (Tier::Gpu, _) => self.d2h += bytes,
            (_, Tier::Gpu) => self.h2d += bytes,
            _ => {}
        }
        if to == Tier::Disk && from != Tier::Disk {
            self.disk_write += bytes;
        }
    }
}

/// Per-sequence tokens per tier at context `c`: (stored as KV, stored as hidden states).
/// KV tokens (hidden states not included) of each sequence that `p` keeps on `tier` at the job's
/// final length, in whole blocks: what [`memory`] counts there.
pub fn kv_tokens_on(p: &Policy, wl: &Workload, tier: Tier) -> u64 {
    let kv = split_tokens(p, wl.final_len() as f64).get(tier).0;
    whole_blocks(kv, p.kv_block_tokens) as u64
}

/// KV block slots of each sequence, per layer, that `p` fills on `tier` at the job's final
/// length: its KV and its hidden states (a recomputed block's hidden states sit in the block's
/// own slot), each in whole blocks, as [`memory`] counts them.
pub fn kv_slots_on(p: &Policy, wl: &Workload, tier: Tier) -> u64 {
    let (kv, hidden) = split_tokens(p, wl.final_len() as f64).get(tier);
    let block = p.kv_block_tokens.max(1);
    (whole_blocks(kv, block) + whole_blocks(hidden, block)) as u64 / block
}

/// `tokens` rounded up to whole blocks of `block` tokens (a hair of float error kept below one).
fn whole_blocks(tokens: f64, block: u64) -> f64 {
    let block = block.max(1) as f64;
    (tokens / block - 1e-9).ceil().max(0.0) * block
}

fn split_tokens(p: &Policy, c: f64) -> PerTier<(f64, f64)> {
    let hot = (p.kv.hot_window_tokens as f64).min(c);
    let cold = c - hot;
    let per = |t: Tier| {
        let cold_t = cold * p.kv.cold.get(t);
        let r = p.recompute.get(t);
        let hot_t = if p.kv.hot_tier == t { hot } else { 0.0 };
        (cold_t * (1.0 - r) + hot_t, cold_t * r)
    };
    PerTier {
        gpu: per(Tier::Gpu),
        host: per(Tier::Host),
        disk: per(Tier::Disk),
    }
}

struct Sizes {
    w: f64,
    kvb: f64,
    hb: f64,
    n: f64,
    k: f64,
}

fn sizes(m: &ModelSpec, wl: &Workload, p: &Policy) -> Sizes {
    Sizes {
        w: m.weight_bytes_per_layer() as f64,
        kvb: m.kv_bytes_per_token_per_layer() as f64,
        hb: m.hidden_bytes_per_token() as f64,
        n: wl.batch as f64,
        k: p.num_gpu_batches as f64,
    }
}

/// A decode step's weights: each GPU batch's projections read them `gemm_passes` times.
fn weight_traffic(t: &mut Traffic, p: &Policy, z: &Sizes, gemm_passes: f64) {
    t.h2d += (p.weights.host + p.weights.disk) * z.w;
    t.disk_read_weights += p.weights.disk * z.w;
    t.hbm += z.k * z.w * gemm_passes;
    t.decode_weights += z.k * z.w * gemm_passes;
    t.launches += z.k;
}

/// New tokens (`tokens` in all, across the batch) entering the cache: their KV goes to the hot
/// tier and an equal number age from it into the cold split.
fn write_traffic(t: &mut Traffic, p: &Policy, z: &Sizes, tokens: f64) {
    let src = if p.kv.hot_window_tokens > 0 {
        t.move_bytes(Tier::Gpu, p.kv.hot_tier, tokens * z.kvb);
        p.kv.hot_tier
    } else {
        Tier::Gpu
    };
    for tier in Tier::ALL {
        let share = tokens * p.kv.cold.get(tier);
        let r = p.recompute.get(tier);
        t.move_bytes(src, tier, share * (1.0 - r) * z.kvb);
        t.move_bytes(Tier::Gpu, tier, share * r * z.hb);
    }
}

fn decode_traffic(m: &ModelSpec, wl: &Workload, p: &Policy) -> Traffic {
    let z = sizes(m, wl, p);
    let mut t = Traffic {
        decode: true,
        ..Traffic::default()
    };
    // Under `--gpu-gemm split`, GPU batches of more than GEMV_MAX_ROWS rows run every
    // projection twice (see ModelSpec::gemm_passes).
    let gp = m.gemm_passes_at(p.gpu_batch_size);
    weight_traffic(&mut t, p, &z, gp);
    t.flops += m.gemm_flops_per_token_per_layer() * z.n * gp;
    t.elementwise += m.activation_bytes_per_token_per_layer() as f64 * z.n;
    let split = split_tokens(p, wl.mean_decode_context());
    let attn_flops_per_key = m.attention_flops_per_token_per_layer(1.0);
    for tier in Tier::ALL {
        let (kv_seq, hid_seq) = split.get(tier);
        let (kv, hid) = (kv_seq * z.n, hid_seq * z.n);
        let near = kv * p.attention(tier).near_fraction();
        let on_gpu = kv - near;
        t.flops += attn_flops_per_key * (on_gpu + hid);
        let recompute_rows = (hid_seq * p.gpu_batch_size as f64) as u64;
        t.flops += m.recompute_flops_per_token_per_layer() * hid * m.gemm_passes_at(recompute_rows);
        t.hbm += on_gpu * z.kvb + hid * (z.hb + 2.0 * z.kvb);
        t.decode_kv += (on_gpu + hid) * z.kvb;
        if tier == Tier::Gpu {
            continue;
        }
        t.h2d += on_gpu * z.kvb + hid * z.hb;
        t.host_attention += near * z.kvb;
        if tier == Tier::Disk {
            t.disk_read_kv += kv * z.kvb;
            t.disk_read_hidden += hid * z.hb;
        }
        if near > 0.0 {
            let ab = m.weight_dtype_bytes as f64;
            t.h2d += z.n * m.q_width() as f64 * ab;
            t.d2h += z.n * (m.heads * (m.head_dim + 1) * 4) as f64;
        }
    }
    host_mlp_traffic(&mut t, m, p, &z, gp);
    write_traffic(&mut t, p, &z, z.n);
    t
}

/// The host's MLP share of a decode step: its weights stay in host memory and are read there
/// once per GPU batch; the MLP input goes down and the partial output comes back. What it
/// takes off the GPU is what the GPU's `gemm_passes` would have read and computed.
fn host_mlp_traffic(t: &mut Traffic, m: &ModelSpec, p: &Policy, z: &Sizes, gemm_passes: f64) {
    let kept = p.host_mlp_share * p.weights.host * m.mlp_bytes_per_layer() as f64;
    if kept <= 0.0 {
        return;
    }
    // Every row of the batch multiplies every kept weight once.
    let flops = 2.0 * z.n * kept / m.weight_dtype_bytes as f64;
    t.h2d -= kept;
    t.hbm -= z.k * kept * gemm_passes;
    t.decode_weights -= z.k * kept * gemm_passes;
    t.flops -= flops * gemm_passes;
    t.host_mlp += z.k * kept;
    t.host_mlp_flops += flops;
    let act = z.n * (m.hidden * 4) as f64;
    t.d2h += act;
    t.h2d += act;
}

/// GPU KV blocks (`block_tokens` tokens of one sequence in one layer each) the runtime needs
/// before it keeps any KV on the GPU: every sequence's writable block in every layer, one
/// prefill GPU batch's new blocks (`batch_rows` rows), and one more per sequence. A policy with
/// less GPU KV than that gets this much.
pub fn gpu_kv_min_blocks(batch: u64, layers: u64, batch_rows: u64, block_tokens: u64) -> u64 {
    batch * layers + batch_rows.div_ceil(block_tokens.max(1)) + batch
}

/// Bytes of the runtime's smallest GPU KV tier for `p` ([`gpu_kv_min_blocks`] in `p`'s blocks).
pub(crate) fn gpu_kv_min_bytes(m: &ModelSpec, wl: &Workload, p: &Policy) -> u64 {
    let rows = prefill_batch_rows(p, wl);
    gpu_kv_min_blocks(wl.batch, m.layers, rows, p.kv_block_tokens)
        * p.kv_block_tokens
        * m.kv_bytes_per_token_per_layer()
}

/// GPU scratch blocks the runtime keeps, when KV lives off the GPU, to attend it there (a
/// prompt pass's blocks and its earlier chunks, fetched blocks): twice one prefill GPU batch's
/// blocks, at least 16.
pub fn gpu_scratch_blocks(batch_rows: u64, block_tokens: u64) -> u64 {
    (2 * batch_rows.div_ceil(block_tokens.max(1))).max(16)
}

/// Rows of one GPU batch of a prefill pass: at most one GPU batch's prompts, and at most
/// [`PREFILL_ROWS`] (the runtime's `--prefill-chunk` under a policy).
pub fn prefill_batch_rows(p: &Policy, wl: &Workload) -> u64 {
    (p.gpu_batch_size * wl.prompt_len.max(1)).min(PREFILL_ROWS)
}

/// Rows of one prefill forward pass: every GPU batch, so the weights stream once per pass.
fn prefill_pass_rows(p: &Policy, wl: &Workload) -> u64 {
    prefill_batch_rows(p, wl) * p.num_gpu_batches.max(1)
}

fn prefill_traffic(m: &ModelSpec, wl: &Workload, p: &Policy) -> Traffic {
    let z = sizes(m, wl, p);
    let s = wl.prompt_len as f64;
    let mut t = Traffic::default();
    // Every forward pass streams the weights it does not keep, so a long prompt batch run in
    // many passes streams them many times.
    let passes = (wl.batch * wl.prompt_len)
        .div_ceil(prefill_pass_rows(p, wl))
        .max(1) as f64;
    // Under `--gpu-gemm split` every GEMM of a chunk runs twice (see ModelSpec::gemm_passes).
    let gp = m.gemm_passes_at(prefill_batch_rows(p, wl));
    t.h2d += passes * (p.weights.host + p.weights.disk) * z.w;
    t.disk_read_weights += passes * p.weights.disk * z.w;
    t.hbm += passes.max(z.k) * z.w * gp;
    t.launches += passes.max(z.k);
    t.flops += m.gemm_flops_per_token_per_layer() * z.n * s * gp;
    t.attention_flops += 2.0 * s * (s + 1.0) * m.q_width() as f64 * z.n;
    t.elementwise += m.activation_bytes_per_token_per_layer() as f64 * z.n * s;
    let split = split_tokens(p, s);
    for tier in Tier::ALL {
        let (kv, hid) = split.get(tier);
        t.move_bytes(Tier::Gpu, tier, kv * z.n * z.kvb + hid * z.n * z.hb);
    }
    chunk_reread_traffic(&mut t, m, wl, p, &z);
    t
}

/// A chunked prompt's attention over its earlier chunks (see the module header): each tier's
/// share of the tokens read back, at the prompt's split, comes up from where it lives.
fn chunk_reread_traffic(t: &mut Traffic, m: &ModelSpec, wl: &Workload, p: &Policy, z: &Sizes) {
    let (s, r) = (wl.prompt_len as f64, prefill_batch_rows(p, wl) as f64);
    if s <= r || r <= 0.0 {
        return;
    }
    let chunks = (s / r).ceil();
    let reread = r * chunks * (chunks - 1.0) / 2.0 * z.n;
    let split = split_tokens(p, s);
    for tier in [Tier::Host, Tier::Disk] {
        let (kv, hid) = split.get(tier);
        let (kv, hid) = (reread * kv / s, reread * hid / s);
        t.h2d += kv * z.kvb + hid * z.hb;
        t.flops += m.recompute_flops_per_token_per_layer() * hid * m.gemm_passes_at(r as u64);
        t.hbm += hid * 2.0 * z.kvb;
        if tier == Tier::Disk {
            t.disk_read_kv += kv * z.kvb;
            t.disk_read_hidden += hid * z.hb;
        }
    }
}

fn stream_times(t: &Traffic, m: &ModelSpec, p: &Policy, hw: &HardwareProfile) -> StreamTimes {
    let block = p.kv_block_tokens;
    let kv_request = m.kv_bytes_per_token_per_layer() * block;
    let hidden_request = m.hidden_bytes_per_token() * block;
    let compute = t.flops / hw.gemm_flops(m.weight_dtype_bytes)
        + t.attention_flops / hw.prefill_attention_flops(m.kv_dtype_bytes);
    // A decode step's weights at the rate the projections reach at a GPU batch's rows, its KV
    // at the decode kernel's (one launch per GPU batch); the rest of HBM's traffic at the
    // copy's.
    let rows = p.gpu_batch_size.max(1) as f64;
    let attention_launches = if t.decode_kv > 0.0 {
        p.num_gpu_batches.max(1) as f64
    } else {
        0.0
    };
    let memory = (t.hbm - t.decode_weights - t.decode_kv) / (hw.hbm_gbps * 1e9)
        + t.decode_weights / hw.gpu_weight_bps(rows)
        + hw.gpu_decode_attention_s(t.decode_kv, attention_launches);
    // Every upload leaves from host memory (weights and KV live there; disk bytes are staged
    // there), downloads and disk reads land in it, disk writes leave from it.
    let disk_read = t.disk_read_weights + t.disk_read_kv + t.disk_read_hidden;
    let host_memory = t.host_attention + t.host_mlp + t.h2d + t.d2h + disk_read + t.disk_write;
    let elementwise = t.elementwise / (hw.hbm_gbps * 1e9);
    // The share runs on one GPU batch's rows at a time, reading its weights once per batch.
    let host_mlp_s = match hw.host_mlp_weight_bps(p.gpu_batch_size as f64) {
        Some(bps) => t.host_mlp / bps,
        None => (t.host_mlp / (hw.host_attention_gbps * 1e9))
            .max(t.host_mlp_flops / hw.host_mlp_flops()),
    };
    // Host compute alone, then slowed where the layer's copies run beside it: the copy engines
    // read the same memory, so for as long as both run the threads keep only the calibrated
    // fraction of their rate.
    let h2d_s = t.h2d / (hw.h2d_gbps * 1e9);
    let alone = host_attention_s(t, p, hw) + host_mlp_s;
    let kept = hw
        .host_attention_beside_copies
        .unwrap_or(1.0)
        .clamp(1e-3, 1.0);
    let slowed = alone + alone.min(h2d_s) * (1.0 / kept - 1.0);
    let scale = if alone > 0.0 { slowed / alone } else { 1.0 };
    let (host_attention, host_mlp_s) = (scale * (alone - host_mlp_s), scale * host_mlp_s);
    // A decode layer's GPU time is the longer of its kernels' time and the host's time to
    // issue them, where that was measured; else a fixed overhead added to the kernels'.
    let kernels = compute.max(memory) + elementwise;
    let issue = t.decode.then(|| hw.decode_issue_s(rows)).flatten();
    let (gpu_compute_s, gpu_issue_s) = match issue {
        Some(issue) => {
            let issue_s = t.launches * issue;
            let extra = hw
                .decode_layer_extra_s(rows)
                .unwrap_or(DECODE_SMALL_KERNELS_S);
            let small = t.launches * extra;
            ((kernels + small).max(issue_s), issue_s)
        }
        _ => {
            let issue_s = t.launches * hw.gpu_layer_overhead_us * 1e-6;
            (kernels + issue_s, issue_s)
        }
    };
    // A decode layer that attends on the host waits, once per GPU batch, for its queries to
    // come down and for its partials to go up and merge: the GPU and the issuing thread take
    // turns there, so it adds to both rather than hiding under either.
    let tier_s = if t.decode && t.host_attention > 0.0 {
        p.num_gpu_batches.max(1) as f64 * hw.host_tier_issue_s(rows)
    } else {
        0.0
    };
    let (gpu_compute_s, gpu_issue_s) = (gpu_compute_s + tier_s, gpu_issue_s + tier_s);
    StreamTimes {
        gpu_compute_s,
        h2d_s,
        d2h_s: t.d2h / (hw.d2h_gbps * 1e9),
        host_attention_s: host_attention + host_mlp_s,
        disk_read_s: t.disk_read_weights / hw.disk_read_bps(WEIGHT_REQUEST_BYTES)
            + t.disk_read_kv / hw.disk_read_bps(kv_request)
            + t.disk_read_hidden / hw.disk_read_bps(hidden_request),
        disk_write_s: t.disk_write / hw.disk_write_bps(kv_request.min(hidden_request)),
        host_memory_s: host_memory / hw.host_memory_bps(),
        host_mlp_s,
        gpu_issue_s,
    }
}

/// Host attention of one layer: its KV bytes at the rate measured for the policy's block size,
/// and one call's fixed cost per GPU batch (each GPU batch attends its host KV in one call).
fn host_attention_s(t: &Traffic, p: &Policy, hw: &HardwareProfile) -> f64 {
    if t.host_attention <= 0.0 {
        return 0.0;
    }
    let calls = p.num_gpu_batches.max(1) as f64;
    t.host_attention / hw.host_attention_bps(p.kv_block_tokens as f64)
        + calls * hw.host_attention_call_us.unwrap_or(0.0) * 1e-6
}

fn phase(st: StreamTimes, m: &ModelSpec, p: &Policy) -> PhaseTime {
    let (mut bound_by, mut layer_s) = st.max();
    if st.host_memory_s > layer_s {
        (bound_by, layer_s) = (Stream::HostMemory, st.host_memory_s);
    }
    let disk = st.disk_read_s + st.disk_write_s;
    if disk > layer_s {
        layer_s = disk;
        bound_by = if st.disk_read_s >= st.disk_write_s {
            Stream::DiskRead
        } else {
            Stream::DiskWrite
        };
    }
    // Host attention of GPU batch b overlaps GPU work only on other GPU batches, and the
    // thread that attends is the one that issues the GPU work: while it attends, no GPU work
    // is issued, so the issue cost adds to the host's side.
    let (g, a) = (st.gpu_compute_s, st.host_attention_shared_s());
    let k = p.num_gpu_batches.max(1) as f64;
    let coupled = if a > 0.0 && k > 1.0 {
        g.max(a + st.gpu_issue_s) + g.min(a) / k
    } else {
        g.max(a) + g.min(a) / k
    };
    if coupled > layer_s {
        layer_s = coupled;
        bound_by = if g >= a {
            Stream::GpuCompute
        } else if a > st.host_attention_s {
            Stream::HostMemory
        } else {
            Stream::HostAttention
        };
    }
    let pipeline_fill_s = (st.sum() - st.max().1) / p.prefetch_depth as f64;
    PhaseTime {
        per_layer: st,
        bound_by,
        layer_s,
        pipeline_fill_s,
        head_s: 0.0,
        total_s: m.layers as f64 * layer_s + pipeline_fill_s,
        floor_s: m.layers as f64 * st.max().1.max(st.host_memory_s),
    }
}

/// `phase` with the LM head of a decode step added (see [`PhaseTime::head_s`]).
fn with_head(mut t: PhaseTime, m: &ModelSpec, p: &Policy, hw: &HardwareProfile) -> PhaseTime {
    let head_bytes = (m.vocab * m.hidden * m.weight_dtype_bytes) as f64;
    let rows = p.gpu_batch_size.max(1) as f64;
    let gp = m.gemm_passes_at(p.gpu_batch_size);
    t.head_s = p.num_gpu_batches.max(1) as f64 * gp * head_bytes / hw.gpu_weight_bps(rows);
    t.total_s += t.head_s;
    t.floor_s += t.head_s;
    t
}

/// Predicted times of `p` on `hw` (the policy is assumed valid for `wl`; see [`Policy::validate`]).
pub fn predict(m: &ModelSpec, wl: &Workload, p: &Policy, hw: &HardwareProfile) -> Prediction {
    let decode = with_head(
        phase(stream_times(&decode_traffic(m, wl, p), m, p, hw), m, p),
        m,
        p,
        hw,
    );
    let prefill = if wl.prompt_len == 0 {
        phase(StreamTimes::default(), m, p)
    } else {
        phase(stream_times(&prefill_traffic(m, wl, p), m, p, hw), m, p)
    };
    let n = wl.gen_len as f64;
    let total_s = prefill.total_s + n * decode.total_s;
    Prediction {
        decode_step: decode,
        prefill,
        bound_by: decode.bound_by,
        decode_tokens_per_s: wl.batch as f64 / decode.total_s,
        tokens_per_s: if total_s > 0.0 {
            wl.batch as f64 * n / total_s
        } else {
            0.0
        },
        total_s,
        memory: memory(m, wl, p),
    }
}

/// Peak bytes per tier of `p` (see the module header for what is counted).
pub fn memory(m: &ModelSpec, wl: &Workload, p: &Policy) -> TierBytes {
    let z = sizes(m, wl, p);
    let layers = m.layers as f64;
    let blocks = |tokens: f64| whole_blocks(tokens, p.kv_block_tokens);
    let split = split_tokens(p, wl.final_len() as f64);
    let slots = (p.prefetch_depth + 1) as f64;
    let g = p.gpu_batch_size as f64;

    let mut bytes = [0.0f64; 3];
    let mut fetched_per_batch = 0.0; // one layer, one GPU batch: bytes landing on the GPU
    let mut disk_per_batch = 0.0; // one layer, one GPU batch: bytes read from disk
    for (i, tier) in Tier::ALL.into_iter().enumerate() {
        let (kv, hid) = split.get(tier);
        bytes[i] += z.n * layers * (blocks(kv) * z.kvb + blocks(hid) * z.kvb.max(z.hb));
        bytes[i] += p.weights.get(tier) * z.w * layers;
        let fetched_kv = if tier == Tier::Gpu {
            0.0
        } else {
            kv * (1.0 - p.attention(tier).near_fraction())
        };
        fetched_per_batch += g * (fetched_kv * z.kvb + hid * (z.hb + z.kvb));
        if tier == Tier::Disk {
            disk_per_batch += g * (kv * z.kvb + hid * z.hb);
        }
    }
    // The runtime's GPU KV tier holds at least its minimum when it holds any, and scratch
    // blocks sit beside it when KV lives elsewhere.
    let gpu_kv = z.n * layers * blocks(split.gpu.0) * z.kvb;
    let min_tier = gpu_kv_min_bytes(m, wl, p) as f64;
    if gpu_kv > 0.0 && gpu_kv < min_tier {
        bytes[0] += min_tier - gpu_kv;
    }
    let block = p.kv_block_tokens as f64 * z.kvb;
    let rows = prefill_batch_rows(p, wl);
    let off_gpu = [split.host, split.disk]
        .iter()
        .any(|&(kv, hid)| kv + hid > 0.0);
    if off_gpu {
        bytes[0] += gpu_scratch_blocks(rows, p.kv_block_tokens) as f64 * block;
    }
    // The executor keeps whole layers resident (the GPU share rounded to the nearest layer) and
    // stages every other layer through `prefetch_depth + 1` layer-sized buffers, the one
    // computing and the copies ahead of it (`runtime/src/gpu_budget.rs`,
    // `policy_exec::executable`): count what it allocates, or the GPU KV tier the plan counts
    // on would not fit beside them.
    if p.weights.gpu < 1.0 {
        let resident = weight_layers(&p.weights, m.layers).gpu as f64;
        bytes[0] += (resident - p.weights.gpu * layers) * z.w + slots * z.w;
    }
    // A prefill pass: one GPU batch's working set, the other batches' residual stream.
    let activations = prefill_workspace_bytes(m, rows, p.num_gpu_batches, wl.batch) as f64;
    bytes[0] += m.embedding_bytes() as f64 + slots * fetched_per_batch + activations;
    if disk_per_batch > 0.0 {
        bytes[1] += slots * disk_per_batch;
    }
    // Layers on disk are read into two page-locked layer-sized staging buffers, whatever the
    // prefetch depth (`runtime/src/disk_weights.rs`).
    if weight_layers(&p.weights, m.layers).disk > 0 {
        bytes[1] += 2.0 * z.w;
    }
    PerTier {
        gpu: bytes[0].ceil() as u64,
        host: bytes[1].ceil() as u64,
        disk: bytes[2].ceil() as u64,
    }
}
