//! The transformer forward pass, top to bottom, for every supported family, written against the
//! [`Backend`] trait. One call processes a set of rows — each row one token of one sequence at
//! one position — so a prefill (many rows of one sequence) and a decode step (one row for each of
//! many ragged sequences) are the same code. Each layer appends the rows' K and V to the block
//! table first, then attends every row over its own sequence's blocks (causally, by position) as
//! mergeable partials.
//!
//! Weights are resident when they fit; otherwise each layer is loaded from its source, used and
//! dropped (synthetic models of any size run this way).
//!
//! The schedule is FlexGen's block schedule, in one loop: the rows split into GPU batches of
//! whole sequences ([`Transformer::set_gpu_batches`]); each layer's weights are loaded (or
//! fetched, the next layer's copy enqueued first) once per forward pass and serve every GPU
//! batch before the next layer. Within a layer the host attends batch `g` (host tier, far
//! blocks, the storage engine streaming the disk tier) while the device runs batch `g`'s own
//! attention and batch `g - 1`'s output projection and MLP (`Transformer::layer`). One GPU
//! batch is the plain layer-by-layer pass, its host attention overlapping only its device
//! attention and the next layer's weight copy.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::IsTerminal;
use std::ops::Range;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use strata_kernels::cuda::{DevicePartial, Fetched, PendingDownload, PinnedWeight};
use strata_kernels::{
    AttentionGeometry, Backend, CpuBackend, CpuTensor, CudaBackend, CudaTensor, CudaWeight, DType,
    HostWeight, Partial, RopeTable, WeightData,
};

type KernelResult<T> = strata_kernels::Result<T>;
use tracing::debug_span;

use crate::disk_weights::{DiskWeightStats, DiskWeights};
use crate::error::{ModelError, ModelResult};
use crate::far_attention::{KvProjection, Regenerate, attend_far, recompute};
use crate::kv::{
    DiskTierConfig, FarBlock, KvCache, KvError, SeqId, StorageAttending, TierAttention, TierQuery,
};
use crate::model::{Family, LayerTensor, Model, ModelConfig, WeightName, WeightSource};
use strata_planner::HOST_MLP_MAX_ROWS;

/// One token of one sequence at one position.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub seq: SeqId,
    pub pos: usize,
    pub token: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    #[error(transparent)]
    Kernel(#[from] strata_kernels::KernelError),
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// An MLP, or a share of its neurons: the MLP is a sum over its neurons, so two shares' outputs
/// add up to the whole's (the output bias goes with one of them).
#[derive(Clone)]
enum Mlp<W> {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu { gate: W, up: W, down: W },
    /// `fc2(relu(fc1(x) + b1)) + b2`.
    Relu {
        fc1: W,
        fc1_b: W,
        fc2: W,
        fc2_b: Option<W>,
    },
}

impl<W> Mlp<W> {
    fn as_ref(&self) -> Mlp<&W> {
        match self {
            Mlp::SwiGlu { gate, up, down } => Mlp::SwiGlu { gate, up, down },
            Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b: fc2_b.as_ref(),
            },
        }
    }

    fn try_into_map<V, E>(self, f: &mut impl FnMut(W) -> Result<V, E>) -> Result<Mlp<V>, E> {
        Ok(match self {
            Mlp::SwiGlu { gate, up, down } => Mlp::SwiGlu {
                gate: f(gate)?,
                up: f(up)?,
                down: f(down)?,
            },
            Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => Mlp::Relu {
                fc1: f(fc1)?,
                fc1_b: f(fc1_b)?,
                fc2: f(fc2)?,
                fc2_b: fc2_b.map(&mut *f).transpose()?,
            },
        })
    }

    fn map<V>(self, mut f: impl FnMut(W) -> V) -> Mlp<V> {
        match self.try_into_map(&mut |w| Ok::<V, std::convert::Infallible>(f(w))) {
            Ok(m) => m,
            Err(never) => match never {},
        }
    }
}

impl Mlp<HostWeight> {
    /// Splits off the last `host` neurons: `(the first ones, with the output bias; the last
    /// ones)`.
    fn split_neurons(self, host: usize) -> KernelResult<(Mlp<HostWeight>, Mlp<HostWeight>)> {
        Ok(match self {
            Mlp::SwiGlu { gate, up, down } => {
                let at = gate.rows.saturating_sub(host);
                let (gate, gate_h) = gate.split_rows(at)?;
                let (up, up_h) = up.split_rows(at)?;
                let (down, down_h) = down.split_cols(at)?;
                (
                    Mlp::SwiGlu { gate, up, down },
                    Mlp::SwiGlu {
                        gate: gate_h,
                        up: up_h,
                        down: down_h,
                    },
                )
            }
            Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => {
                let at = fc1.rows.saturating_sub(host);
                let (fc1, fc1_h) = fc1.split_rows(at)?;
                let (fc1_b, fc1_b_h) = fc1_b.split_cols(at)?;
                let (fc2, fc2_h) = fc2.split_cols(at)?;
                (
                    Mlp::Relu {
                        fc1,
                        fc1_b,
                        fc2,
                        fc2_b,
                    },
                    Mlp::Relu {
                        fc1: fc1_h,
                        fc1_b: fc1_b_h,
                        fc2: fc2_h,
                        fc2_b: None,
                    },
                )
            }
        })
    }
}

impl Mlp<&HostWeight> {
    fn bytes(&self) -> u64 {
        let size = |w: &HostWeight| w.size_bytes() as u64;
        match *self {
            Mlp::SwiGlu { gate, up, down } => size(gate) + size(up) + size(down),
            Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => size(fc1) + size(fc1_b) + size(fc2) + fc2_b.map_or(0, size),
        }
    }
}

/// The MLP (or a share of its neurons) of `h: [rows, hidden]`.
fn mlp<B: Backend + ?Sized>(b: &B, h: &B::Tensor, m: &Mlp<&B::Weight>) -> KernelResult<B::Tensor> {
    Ok(match *m {
        Mlp::SwiGlu { gate, up, down } => {
            let act = b.swiglu(&b.linear(h, gate, None)?, &b.linear(h, up, None)?)?;
            b.linear(&act, down, None)?
        }
        Mlp::Relu {
            fc1,
            fc1_b,
            fc2,
            fc2_b,
        } => {
            let mut a = b.linear(h, fc1, Some(fc1_b))?;
            b.relu_inplace(&mut a)?;
            b.linear(&a, fc2, fc2_b)?
        }
    })
}

#[derive(Clone)]
struct LayerWeights<W> {
    attn_norm: W,
    attn_norm_b: Option<W>,
    q: W,
    k: W,
    v: W,
    o: W,
    q_b: Option<W>,
    k_b: Option<W>,
    v_b: Option<W>,
    o_b: Option<W>,
    mlp_norm: W,
    mlp_norm_b: Option<W>,
    mlp: Mlp<W>,
    /// The neurons that host threads compute in decode passes (staged layers under a host MLP
    /// share); `mlp` holds the rest. Fetched to the GPU only for passes with many rows.
    host_mlp: Option<Mlp<W>>,
}

/// Where the layers' weights live between forward passes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Residency {
    /// On the backend for the whole run.
    Resident,
    /// Staged in (page-locked) host memory once, fetched layer by layer with the next layer's
    /// copy overlapping this layer's compute. Backends that do not stage stream instead.
    Staged,
    /// Loaded from the weight source (file or generator) for every use.
    Streamed,
    /// `resident_layers` layers resident, the rest staged (FlexGen's weight split across GPU
    /// and host, by whole layers). The staged layers are spread evenly through the stack
    /// ([`layer_is_resident`]), so each one's copy overlaps the resident layers before it.
    /// A share `host_mlp_share` of each staged layer's MLP neurons is computed by host threads
    /// in passes of at most [`HOST_MLP_MAX_ROWS`] rows per GPU batch (decode steps), straight
    /// from the staged copy, so only the rest crosses PCIe; larger passes fetch it all.
    /// `disk_layers` of the layers that are not resident are read from disk for every pass
    /// (`--disk-dir`; see [`crate::disk_weights`]), spread evenly among them
    /// ([`layers_on_disk`]), and fetched from there as staged layers are.
    Split {
        resident_layers: usize,
        host_mlp_share: f64,
        disk_layers: usize,
    },
}

/// A staged layer on its way to the device: its weights, the mark to wait for, its bytes.
type FetchedLayer<B> = (
    LayerWeights<<B as Backend>::Weight>,
    <B as RuntimeBackend>::Fetched,
    u64,
);

/// One layer's weights between forward passes.
enum LayerSlot<W, S> {
    Resident(LayerWeights<W>),
    Staged(LayerWeights<S>),
    Streamed,
    /// Read from the disk weights for every pass.
    OnDisk,
}

/// The layers on disk, and the shape that rebuilds a layer from its staging buffers.
type DiskLayers<B> = (
    RefCell<DiskWeights<<B as RuntimeBackend>::Staged>>,
    LayerWeights<()>,
);

/// A layer's weights on their way to the device, and the staging buffers they came from when
/// they were read from disk (given back once the copy is done).
struct NextLayer<B: RuntimeBackend> {
    layer: usize,
    fetched: FetchedLayer<B>,
    from_disk: Option<Vec<<B as RuntimeBackend>::Staged>>,
}

/// What the forward pass needs from a backend beyond [`Backend`]'s ops:
/// - where a layer meets the KV cache: append the rows' K and V, then attend each row over its
///   sequence. The default keeps K, V and attention in the host and disk tiers (the CPU backend's
///   way, and the GPU's when the cache has no GPU tier); the CUDA backend appends into and
///   attends over its GPU tier on the device;
/// - weights that do not stay resident: a backend that computes away from host memory stages
///   them there once (page-locked) and fetches each layer per pass, overlapping the next layer's
///   copy with this layer's compute; the CPU streams them from their source instead;
/// - layers on disk: every backend makes staging buffers that disk reads refill for each pass
///   ([`RuntimeBackend::staging_buffer`]), fetched from there as staged layers are.
pub trait RuntimeBackend: Backend {
    /// A weight staged in host memory for fast fetches.
    type Staged: Send + Sync + 'static;
    /// A mark on the fetches enqueued so far.
    type Fetched;
    /// The partials `(o, lse)` of the attention computed on the device (the GPU tier's).
    type DevicePart;
    /// A tensor on its way to host memory.
    type Download;

    /// Stages `w` for per-pass fetches, or `None` when this backend does not stage.
    fn stage_weight(&self, w: HostWeight) -> KernelResult<Option<Self::Staged>>;
    /// Starts fetching a staged weight; usable once [`RuntimeBackend::wait_fetched`] has been
    /// called on a later mark.
    fn fetch_weight(&self, w: &Self::Staged) -> KernelResult<Self::Weight>;
    fn fetched(&self) -> KernelResult<Self::Fetched>;
    fn wait_fetched(&self, mark: &Self::Fetched) -> KernelResult<()>;
    fn staged_bytes(&self, w: &Self::Staged) -> u64;
    /// The staged values, where host threads can compute with them.
    fn staged_host(w: &Self::Staged) -> &HostWeight;
    /// A staging buffer holding `w`, which disk reads refill in place for every pass (weights
    /// on disk): page-locked on a GPU; plain host memory on the CPU, whose fetch is a copy.
    /// Unlike [`RuntimeBackend::stage_weight`], every backend makes one.
    fn staging_buffer(&self, w: HostWeight) -> KernelResult<Self::Staged>;
    /// A staging buffer's values as bytes, to refill in place (shape and dtype unchanged).
    fn staged_bytes_mut(w: &mut Self::Staged) -> &mut [u8];
    /// Blocks this thread until the fetches behind `mark` have read their staging buffers,
    /// which may then be refilled.
    fn wait_fetched_host(&self, mark: &Self::Fetched) -> KernelResult<()>;

    /// Seconds spent so far on one-time GEMM tuning (see `CudaBackend::gemm_tuning_seconds`),
    /// which a run takes out of the phase it fell in.
    fn gemm_tuning_seconds(&self) -> f64 {
        0.0
    }

    /// Appends the rows' K and V (`[rows, kv_heads * head_dim]`) to `layer` of the cache, with
    /// the layer's input `x: [rows, hidden]` when the cache stores hidden states for recompute.
    fn append_kv(
        &self,
        kv: &mut KvCache,
        layer: usize,
        rows: &[Row],
        k: &Self::Tensor,
        v: &Self::Tensor,
        x: Option<&Self::Tensor>,
    ) -> Result<(), ForwardError> {
        host_append(self, kv, layer, rows, k, v, x)
    }

    /// Starts copying a tensor to host memory (a batch's queries for the tiers attended there,
    /// the MLP input of the host's share): the copy waits for the kernels that made it, not for
    /// later ones.
    fn start_download(&self, t: &Self::Tensor) -> KernelResult<Self::Download>;
    /// Waits for [`RuntimeBackend::start_download`]'s copy.
    fn finish_download(&self, d: Self::Download) -> KernelResult<Vec<f32>>;

    /// Launches the attention of each row (`q: [rows, n_heads * head_dim]`) over the blocks of
    /// its sequence in `layer` that the device holds, and over the far blocks it can take (see
    /// [`KvCache::gather_far`]: K and V fetched from the host and disk tiers, recomputed already
    /// where they were hidden states in hand; hidden states still in host slots are copied up
    /// and regenerated with `regen`). Returns the device's partials, still being computed, and
    /// the far blocks left to the host. Without a device tier (the default) it launches nothing.
    #[allow(clippy::too_many_arguments)]
    fn launch_device_attention(
        &self,
        _kv: &mut KvCache,
        _layer: usize,
        _rows: &[Row],
        _q: &Self::Tensor,
        _ag: &AttentionGeometry,
        far: Vec<FarBlock>,
        _regen: &Regenerate<'_, Self::Weight>,
    ) -> Result<(Option<Self::DevicePart>, Vec<FarBlock>), ForwardError> {
        Ok((None, far))
    }

    /// The attention output `[rows, width]` from the device's partials and the host's (one per
    /// row), either of which may be missing.
    fn merge_attention(
        &self,
        device: Option<Self::DevicePart>,
        host: Option<Vec<Partial>>,
        rows: usize,
        width: usize,
    ) -> Result<Self::Tensor, ForwardError>;
}

/// One GPU batch's attention in flight. [`Transformer::begin_layer`] launches the device's part
/// and starts the queries' copy to the host; [`Transformer::attend_host`] attends the host tier
/// and ships the disk tier's queries to the storage engine; [`Transformer::finish_layer`] waits
/// for the storage engine and merges everything. [`Transformer::layer`] orders the phases so the
/// host attends one GPU batch while the device works on another.
struct Attending<B: RuntimeBackend + ?Sized> {
    layer: usize,
    device: Option<B::DevicePart>,
    host: HostHalf<B::Download>,
    rows: usize,
}

impl<B: RuntimeBackend + ?Sized> Attending<B> {
    /// Whether the storage engine is (or may still be) attending for this batch.
    fn storage_in_flight(&self) -> bool {
        match &self.host {
            HostHalf::Running { near, .. } => near.storage_in_flight(),
            HostHalf::Shipped { storage, .. } => storage.is_some(),
            HostHalf::Idle | HostHalf::Queued { .. } => false,
        }
    }
}

enum HostHalf<Q> {
    /// Every block the rows see is on the device.
    Idle,
    /// The queries on their way to the host, each row's `(seq, pos)`, and the far blocks the
    /// device left to the host.
    Queued {
        q: Q,
        at: Vec<(SeqId, usize)>,
        far: Vec<FarBlock>,
    },
    /// The queries on the host and their disk-tier part shipped to the storage engine
    /// ([`Transformer::ship_to_storage`]); the host tier and the far blocks still to attend.
    Shipped {
        q: Vec<f32>,
        at: Vec<(SeqId, usize)>,
        far: Vec<FarBlock>,
        storage: Option<StorageAttending>,
    },
    /// Host partials done (near blocks and far ones), the storage engine's maybe still streaming.
    Running {
        near: TierAttention,
        far: Vec<Partial>,
    },
}

impl RuntimeBackend for CpuBackend {
    type Staged = HostWeight;
    type Fetched = ();
    type DevicePart = std::convert::Infallible;
    type Download = Vec<f32>;

    fn stage_weight(&self, _: HostWeight) -> KernelResult<Option<HostWeight>> {
        Ok(None)
    }
    fn fetch_weight(&self, w: &HostWeight) -> KernelResult<HostWeight> {
        Ok(w.clone())
    }
    fn fetched(&self) -> KernelResult<()> {
        Ok(())
    }
    fn wait_fetched(&self, _: &()) -> KernelResult<()> {
        Ok(())
    }
    fn staged_host(w: &HostWeight) -> &HostWeight {
        w
    }
    fn staged_bytes(&self, w: &HostWeight) -> u64 {
        (w.data.len() * w.data.dtype().size_bytes()) as u64
    }
    fn staging_buffer(&self, w: HostWeight) -> KernelResult<HostWeight> {
        Ok(w)
    }
    fn staged_bytes_mut(w: &mut HostWeight) -> &mut [u8] {
        w.data.as_bytes_mut()
    }
    fn wait_fetched_host(&self, _: &()) -> KernelResult<()> {
        Ok(())
    }
    fn start_download(&self, t: &CpuTensor) -> KernelResult<Vec<f32>> {
        self.to_host(t)
    }
    fn finish_download(&self, d: Vec<f32>) -> KernelResult<Vec<f32>> {
        Ok(d)
    }
    fn merge_attention(
        &self,
        device: Option<std::convert::Infallible>,
        host: Option<Vec<Partial>>,
        rows: usize,
        width: usize,
    ) -> Result<CpuTensor, ForwardError> {
        if let Some(never) = device {
            match never {}
        }
        Ok(match host {
            Some(parts) => {
                self.tensor(rows, width, parts.into_iter().flat_map(|p| p.o).collect())?
            }
            None => self.zeros(rows, width)?,
        })
    }
}

impl RuntimeBackend for CudaBackend {
    type Staged = PinnedWeight;
    type Fetched = Fetched;
    type DevicePart = DevicePartial;
    type Download = PendingDownload;

    fn stage_weight(&self, w: HostWeight) -> KernelResult<Option<PinnedWeight>> {
        self.pin_weight(w).map(Some)
    }
    fn gemm_tuning_seconds(&self) -> f64 {
        CudaBackend::gemm_tuning_seconds(self)
    }
    fn fetch_weight(&self, w: &PinnedWeight) -> KernelResult<CudaWeight> {
        CudaBackend::fetch_weight(self, w)
    }
    fn fetched(&self) -> KernelResult<Fetched> {
        CudaBackend::fetched(self)
    }
    fn wait_fetched(&self, mark: &Fetched) -> KernelResult<()> {
        CudaBackend::wait_fetched(self, mark)
    }
    fn staged_host(w: &PinnedWeight) -> &HostWeight {
        w.host()
    }
    fn staged_bytes(&self, w: &PinnedWeight) -> u64 {
        w.bytes() as u64
    }
    fn staging_buffer(&self, w: HostWeight) -> KernelResult<PinnedWeight> {
        self.pin_weight(w)
    }
    fn staged_bytes_mut(w: &mut PinnedWeight) -> &mut [u8] {
        w.host_bytes_mut()
    }
    fn wait_fetched_host(&self, mark: &Fetched) -> KernelResult<()> {
        CudaBackend::wait_fetched_host(self, mark)
    }

    fn append_kv(
        &self,
        kv: &mut KvCache,
        layer: usize,
        rows: &[Row],
        k: &Self::Tensor,
        v: &Self::Tensor,
        x: Option<&Self::Tensor>,
    ) -> Result<(), ForwardError> {
        let at: Vec<(SeqId, usize)> = rows.iter().map(|r| (r.seq, r.pos)).collect();
        if kv.has_gpu_tier() {
            return Ok(kv.append_device(layer, &at, k, v)?);
        }
        // A prompt pass over host KV stays on the GPU for its attention, and goes down whole.
        if kv.append_through_scratch(layer, &at, k, v, x)? {
            return Ok(());
        }
        // Decode rows land in host memory in the background, before anything reads them.
        if kv.append_deferred(layer, &at, k, v, x)? {
            return Ok(());
        }
        host_append(self, kv, layer, rows, k, v, x)
    }

    fn start_download(&self, t: &CudaTensor) -> KernelResult<PendingDownload> {
        self.download_async(t)
    }
    fn finish_download(&self, d: PendingDownload) -> KernelResult<Vec<f32>> {
        self.wait_download(d)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_device_attention(
        &self,
        kv: &mut KvCache,
        layer: usize,
        rows: &[Row],
        q: &CudaTensor,
        ag: &AttentionGeometry,
        far: Vec<FarBlock>,
        regen: &Regenerate<'_, CudaWeight>,
    ) -> Result<(Option<DevicePartial>, Vec<FarBlock>), ForwardError> {
        if !kv.has_gpu_pool() {
            return Ok((None, far));
        }
        let at: Vec<(SeqId, usize)> = rows.iter().map(|r| (r.seq, r.pos)).collect();
        let regen_kv = |x: &CudaTensor, positions: &[usize]| regen.kv(self, x, positions);
        Ok(kv.attend_device(layer, &at, q, ag, far, &regen_kv)?)
    }

    fn merge_attention(
        &self,
        device: Option<DevicePartial>,
        host: Option<Vec<Partial>>,
        rows: usize,
        width: usize,
    ) -> Result<CudaTensor, ForwardError> {
        let Some(parts) = host else {
            return Ok(match device {
                Some(d) => d.o,
                None => self.zeros(rows, width)?,
            });
        };
        let heads = parts.first().map_or(0, |p| p.lse.len());
        let mut o = Vec::with_capacity(rows * width);
        let mut lse = Vec::with_capacity(rows * heads);
        for p in parts {
            o.extend_from_slice(&p.o);
            lse.extend_from_slice(&p.lse);
        }
        let Some(d) = device else {
            return Ok(self.upload(rows, width, &o)?);
        };
        let host = DevicePartial {
            o: self.upload(rows, width, &o)?,
            lse: self.upload(rows, heads, &lse)?,
        };
        Ok(self.merge_partials(&[&d, &host])?.o)
    }
}

fn host_append<B: Backend + ?Sized>(
    b: &B,
    kv: &mut KvCache,
    layer: usize,
    rows: &[Row],
    k: &B::Tensor,
    v: &B::Tensor,
    x: Option<&B::Tensor>,
) -> Result<(), ForwardError> {
    // Time here is the device still computing k and v (and what it waits for before them).
    let _span = debug_span!("host_append").entered();
    let (kh, vh) = debug_span!("wait_kv")
        .in_scope(|| Ok::<_, ForwardError>((b.to_host(k)?, b.to_host(v)?)))?;
    let xh = x.map(|x| b.to_host(x)).transpose()?;
    let n = rows.len().max(1);
    let (kvd, xd) = (kh.len() / n, xh.as_ref().map_or(0, |x| x.len() / n));
    if xh.is_none() {
        let at: Vec<(SeqId, usize)> = rows.iter().map(|r| (r.seq, r.pos)).collect();
        return Ok(kv.append_rows(layer, &at, &kh, &vh)?);
    }
    for (r, row) in rows.iter().enumerate() {
        kv.append_with_hidden(
            row.seq,
            layer,
            row.pos,
            &kh[r * kvd..(r + 1) * kvd],
            &vh[r * kvd..(r + 1) * kvd],
            xh.as_ref().map(|x| &x[r * xd..(r + 1) * xd]),
        )?;
    }
    Ok(())
}

pub struct Transformer<'m, B: RuntimeBackend> {
    backend: B,
    cfg: ModelConfig,
    source: &'m dyn WeightSource,
    layers: Vec<LayerSlot<B::Weight, B::Staged>>,
    embed: B::Weight,
    pos_embed: Option<B::Weight>,
    final_norm: B::Weight,
    final_norm_b: Option<B::Weight>,
    /// `None` when tied to `embed`.
    lm_head: Option<B::Weight>,
    rope: RopeTable,
    attention: AttentionGeometry,
    /// GPU batches per step (FlexGen's `num_gpu_batches`); 1 runs the whole batch as one.
    gpu_batches: usize,
    /// Staged layers whose copies are under way ahead of the one computing (a policy's
    /// `prefetch_depth`; [`Transformer::set_weight_lookahead`]).
    lookahead: usize,
    /// Rows of one GPU batch at most.
    batch_rows: usize,
    /// The sequences (with their rows) of the first GPU batch of the pass after the next one
    /// ([`Transformer::expect_next_pass`]).
    next_pass: Option<Vec<(SeqId, usize)>>,
    /// The layers on disk and the shape that rebuilds one from its staging buffers.
    disk: Option<DiskLayers<B>>,
    pub timings: LayerTimings,
    /// Host MLP seconds of the pass under way (`mlp_with_host` borrows `self` immutably).
    host_mlp_s: Cell<f64>,
}

/// Seconds spent loading streamed weights (zero when resident), and bytes fetched from staging.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerTimings {
    pub weight_load_s: f64,
    pub weight_bytes_fetched: u64,
    /// Layers whose weights were loaded or fetched (once per layer per forward pass, whatever
    /// the number of GPU batches).
    pub layer_loads: u64,
    /// Weight bytes host threads read to compute the host MLP share (once per GPU batch).
    pub host_mlp_bytes: u64,
    /// Seconds host threads computed the host MLP share (the device's part runs meanwhile).
    pub host_mlp_s: f64,
    /// Seconds passes waited for a fetched layer's copy to land before computing it: the copy
    /// time that compute did not hide.
    pub weight_wait_s: f64,
}

fn upload<B: Backend>(b: &B, src: &dyn WeightSource, name: WeightName) -> ModelResult<B::Weight> {
    Ok(b.upload_weight(src.load(name)?)?)
}

fn load_layer<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    i: usize,
) -> ModelResult<LayerWeights<B::Weight>> {
    layer_with(cfg, i, |name| upload(b, src, name))
}

/// A layer's tensors, each made by `make` from its name (the set depends on the family).
fn layer_with<W, E>(
    cfg: &ModelConfig,
    i: usize,
    mut make: impl FnMut(WeightName) -> Result<W, E>,
) -> Result<LayerWeights<W>, E> {
    use LayerTensor::*;
    let mut w = |t| make(WeightName::Layer(i, t));
    let opt = cfg.family == Family::Opt;
    let mlp = if opt {
        Mlp::Relu {
            fc1: w(Fc1)?,
            fc1_b: w(Fc1Bias)?,
            fc2: w(Fc2)?,
            fc2_b: Some(w(Fc2Bias)?),
        }
    } else {
        Mlp::SwiGlu {
            gate: w(Gate)?,
            up: w(Up)?,
            down: w(Down)?,
        }
    };
    let (qkv_b, o_b) = (cfg.qkv_bias, cfg.o_bias);
    Ok(LayerWeights {
        attn_norm: w(AttnNorm)?,
        attn_norm_b: if opt { Some(w(AttnNormBias)?) } else { None },
        q: w(Q)?,
        k: w(K)?,
        v: w(V)?,
        o: w(O)?,
        q_b: if qkv_b { Some(w(QBias)?) } else { None },
        k_b: if qkv_b { Some(w(KBias)?) } else { None },
        v_b: if qkv_b { Some(w(VBias)?) } else { None },
        o_b: if o_b { Some(w(OBias)?) } else { None },
        mlp_norm: w(MlpNorm)?,
        mlp_norm_b: if opt { Some(w(MlpNormBias)?) } else { None },
        mlp,
        host_mlp: None,
    })
}

impl<W> LayerWeights<W> {
    /// The layer by reference, with its host MLP share only when `host_mlp`.
    fn as_ref(&self, host_mlp: bool) -> LayerWeights<&W> {
        LayerWeights {
            attn_norm: &self.attn_norm,
            attn_norm_b: self.attn_norm_b.as_ref(),
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            q_b: self.q_b.as_ref(),
            k_b: self.k_b.as_ref(),
            v_b: self.v_b.as_ref(),
            o_b: self.o_b.as_ref(),
            mlp_norm: &self.mlp_norm,
            mlp_norm_b: self.mlp_norm_b.as_ref(),
            mlp: self.mlp.as_ref(),
            host_mlp: self.host_mlp.as_ref().filter(|_| host_mlp).map(Mlp::as_ref),
        }
    }

    /// The same layer with every tensor mapped by `f`.
    fn try_into_map<V, E>(
        self,
        mut f: impl FnMut(W) -> Result<V, E>,
    ) -> Result<LayerWeights<V>, E> {
        let f = &mut f;
        let opt = |w: Option<W>, f: &mut dyn FnMut(W) -> Result<V, E>| w.map(f).transpose();
        Ok(LayerWeights {
            attn_norm: f(self.attn_norm)?,
            attn_norm_b: opt(self.attn_norm_b, f)?,
            q: f(self.q)?,
            k: f(self.k)?,
            v: f(self.v)?,
            o: f(self.o)?,
            q_b: opt(self.q_b, f)?,
            k_b: opt(self.k_b, f)?,
            v_b: opt(self.v_b, f)?,
            o_b: opt(self.o_b, f)?,
            mlp_norm: f(self.mlp_norm)?,
            mlp_norm_b: opt(self.mlp_norm_b, f)?,
            mlp: self.mlp.try_into_map(f)?,
            host_mlp: self.host_mlp.map(|m| m.try_into_map(f)).transpose()?,
        })
    }

    /// The tensors in a fixed order, and the layer's shape that [`LayerWeights::rebuild`]
    /// rebuilds it with.
    fn into_parts(self) -> (LayerWeights<()>, Vec<W>) {
        let mut parts = Vec::new();
        let shape = self.try_into_map(|w| {
            parts.push(w);
            Ok::<_, Infallible>(())
        });
        (shape.unwrap_or_else(|e| match e {}), parts)
    }
}

impl LayerWeights<()> {
    fn rebuild<W>(&self, parts: Vec<W>) -> Result<LayerWeights<W>, ModelError> {
        let n = parts.len();
        let mut it = parts.into_iter();
        self.clone().try_into_map(|()| {
            it.next().ok_or_else(|| {
                ModelError::DiskWeights(format!("a layer read back with {n} tensors, too few"))
            })
        })
    }
}

/// Staging buffer sets for layers on disk: one in use while the next layer is read into the
/// other.
const DISK_STAGING_SETS: usize = 2;

/// Which layers of `layers` are on disk: `disk` of those that are not among the `resident`
/// ones ([`layer_is_resident`]), spread evenly among them.
pub fn layers_on_disk(layers: usize, resident: usize, disk: usize) -> Vec<bool> {
    let off: Vec<usize> = (0..layers)
        .filter(|&i| !layer_is_resident(i, layers, resident))
        .collect();
    let n = off.len();
    let mut out = vec![false; layers];
    for (k, &i) in off.iter().enumerate() {
        out[i] = !layer_is_resident(k, n, n - disk.min(n));
    }
    out
}

impl<'m, B: RuntimeBackend> Transformer<'m, B> {
    /// Loads the model's global tensors, and every layer too when `resident` (else layers are
    /// streamed from their source).
    pub fn new(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        resident: bool,
    ) -> ModelResult<Self> {
        let residency = if resident {
            Residency::Resident
        } else {
            Residency::Streamed
        };
        Self::with_residency(backend, model, block_tokens, residency)
    }

    pub fn with_residency(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        residency: Residency,
    ) -> ModelResult<Self> {
        Self::with_placement(backend, model, block_tokens, residency, None)
    }

    /// [`Transformer::with_residency`], with the disk that a [`Residency::Split`]'s disk layers
    /// go to (its directory gets a `weights` folder; its byte budget is not used: the layers
    /// take what they need, [`Transformer::disk_weight_bytes`]).
    pub fn with_placement(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        residency: Residency,
        disk: Option<&DiskTierConfig>,
    ) -> ModelResult<Self> {
        let cfg = model.config.clone();
        let src = model.weights.as_ref();
        let opt = cfg.family == Family::Opt;
        let (resident_layers, host_neurons, disk_layers) = match residency {
            Residency::Resident => (cfg.layers, 0, 0),
            Residency::Staged | Residency::Streamed => (0, 0, 0),
            Residency::Split {
                resident_layers,
                host_mlp_share,
                disk_layers,
            } => (
                resident_layers.min(cfg.layers),
                host_mlp_neurons(cfg.intermediate, host_mlp_share),
                disk_layers,
            ),
        };
        let on_disk = layers_on_disk(cfg.layers, resident_layers, disk_layers);
        let mut layers = Vec::with_capacity(cfg.layers);
        // Once the backend declines to stage (the CPU), the other layers stream without asking.
        let mut stream = residency == Residency::Streamed;
        for (i, &disk_layer) in on_disk.iter().enumerate() {
            let slot = if layer_is_resident(i, cfg.layers, resident_layers) {
                LayerSlot::Resident(load_layer(&backend, &cfg, src, i)?)
            } else if disk_layer {
                LayerSlot::OnDisk
            } else if stream {
                LayerSlot::Streamed
            } else {
                stage_layer(&backend, &cfg, src, i, host_neurons)?
            };
            stream |= matches!(slot, LayerSlot::Streamed);
            layers.push(slot);
        }
        let order: Vec<usize> = (0..cfg.layers).filter(|&i| on_disk[i]).collect();
        let disk = if order.is_empty() {
            None
        } else {
            let dir = disk.ok_or_else(|| {
                ModelError::DiskWeights(format!(
                    "{} layers are placed on disk, and no disk directory is given \
                     (--disk-dir)",
                    order.len()
                ))
            })?;
            Some(write_disk_layers(&backend, &cfg, src, dir, order)?)
        };
        let embed = upload(&backend, src, WeightName::Embed)?;
        check_shape(&backend, &embed, cfg.vocab, cfg.hidden, "embedding table")?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(upload(&backend, src, WeightName::LmHead)?)
        };
        let attention = AttentionGeometry::new(cfg.heads, cfg.kv_heads, cfg.head_dim, block_tokens);
        Ok(Self {
            pos_embed: if opt {
                Some(upload(&backend, src, WeightName::PosEmbed)?)
            } else {
                None
            },
            final_norm: upload(&backend, src, WeightName::FinalNorm)?,
            final_norm_b: if opt {
                Some(upload(&backend, src, WeightName::FinalNormBias)?)
            } else {
                None
            },
            rope: RopeTable::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling),
            backend,
            cfg,
            source: src,
            layers,
            embed,
            lm_head,
            attention,
            gpu_batches: 1,
            lookahead: 1,
            batch_rows: usize::MAX,
            next_pass: None,
            disk,
            timings: LayerTimings::default(),
            host_mlp_s: Cell::new(0.0),
        })
    }

    /// What the layers on disk have read and waited for so far (`None` without any).
    pub fn disk_weight_stats(&self) -> Option<DiskWeightStats> {
        self.disk.as_ref().map(|(d, _)| d.borrow().stats)
    }

    /// Bytes of disk the layers on disk take (0 without any).
    pub fn disk_weight_bytes(&self) -> u64 {
        self.disk
            .as_ref()
            .map_or(0, |(d, _)| d.borrow().store_bytes())
    }

    /// Runs each forward pass as `n` GPU batches of whole sequences (at least 1).
    pub fn set_gpu_batches(&mut self, n: usize) {
        self.gpu_batches = n.max(1);
    }

    /// Keeps the copies of the next `n` staged layers under way (at least 1) while a layer
    /// computes: with 1, a staged layer's copy is enqueued when the staged layer before it
    /// starts, so it has that layer and the resident ones between to land in; with more, it
    /// starts further ahead, at the cost of `n + 1` layers' weights on the GPU instead of 2.
    /// Layers read from disk stay one ahead (their staging buffers are few).
    pub fn set_weight_lookahead(&mut self, n: usize) {
        self.lookahead = n.max(1);
    }

    /// Caps a GPU batch at `rows` rows (at least 1): a prefill pass larger than `n` such batches
    /// runs more of them.
    pub fn set_batch_rows(&mut self, rows: usize) {
        self.batch_rows = rows.max(1);
    }

    /// Names the rows of the pass that follows the next one (a prompt's next chunk): the next
    /// pass's last layer then reads the disk blocks of that pass's first gather ahead, as each
    /// gather reads the next one's ([`KvCache::prefetch_far`]). Without it a pass's first
    /// gather reads its disk blocks on the spot.
    pub fn expect_next_pass(&mut self, rows: &[Row]) {
        self.next_pass = gpu_batches(rows, self.gpu_batches, self.batch_rows)
            .first()
            .map(|r| rows_per_seq(&rows[r.clone()]));
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// [`RuntimeBackend::gemm_tuning_seconds`] of the backend the model runs on.
    pub fn gemm_tuning_seconds(&self) -> f64 {
        self.backend.gemm_tuning_seconds()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs `rows` through the model, appending their KV, and returns the logits `[vocab]` of the
    /// rows listed in `logit_rows` (indices into `rows`), in that order.
    pub fn forward(
        &mut self,
        rows: &[Row],
        logit_rows: &[usize],
        kv: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let (parts, order) = self.forward_batches(rows, logit_rows, kv)?;
        let mut flat = Vec::new();
        for l in &parts {
            flat.extend(self.backend.to_host(l)?);
        }
        let rows: Vec<&[f32]> = flat.chunks_exact(self.cfg.vocab).collect();
        Ok(order.iter().map(|&i| rows[i].to_vec()).collect())
    }

    /// [`Transformer::forward`] for greedy decoding: the argmax of each logits row, computed
    /// where the logits are (only the token ids come back to the host).
    pub fn forward_greedy(
        &mut self,
        rows: &[Row],
        logit_rows: &[usize],
        kv: &mut KvCache,
    ) -> Result<Vec<u32>, ForwardError> {
        let (parts, order) = self.forward_batches(rows, logit_rows, kv)?;
        let mut picks = Vec::new();
        for l in &parts {
            picks.extend(self.backend.argmax_rows(l)?);
        }
        Ok(order.iter().map(|&i| picks[i]).collect())
    }

    /// The logits `[logit_rows.len(), vocab]`, left on the backend (gathered through the host
    /// when the rows ran as several GPU batches).
    pub fn forward_logits(
        &mut self,
        rows: &[Row],
        logit_rows: &[usize],
        kv: &mut KvCache,
    ) -> Result<B::Tensor, ForwardError> {
        let (mut parts, order) = self.forward_batches(rows, logit_rows, kv)?;
        if parts.len() == 1 && order.iter().enumerate().all(|(j, &i)| i == j) {
            return Ok(parts.remove(0));
        }
        let logits = self.forward_logits_host(&parts, &order)?;
        Ok(self.backend.tensor(order.len(), self.cfg.vocab, logits)?)
    }

    fn forward_logits_host(
        &self,
        parts: &[B::Tensor],
        order: &[usize],
    ) -> Result<Vec<f32>, ForwardError> {
        let mut flat = Vec::new();
        for l in parts {
            flat.extend(self.backend.to_host(l)?);
        }
        let v = self.cfg.vocab;
        Ok(order
            .iter()
            .flat_map(|&i| flat[i * v..(i + 1) * v].iter().copied())
            .collect())
    }

    /// Runs every layer over the GPU batches of `rows` (FlexGen's block schedule: one layer's
    /// weights serve every GPU batch before the next layer's). Returns each GPU batch's logits
    /// `[its logit rows, vocab]` and, for each entry of `logit_rows`, its row in those batches
    /// laid end to end.
    fn forward_batches(
        &mut self,
        rows: &[Row],
        logit_rows: &[usize],
        kv: &mut KvCache,
    ) -> Result<(Vec<B::Tensor>, Vec<usize>), ForwardError> {
        let batches = gpu_batches(rows, self.gpu_batches, self.batch_rows);
        let next_pass = self.next_pass.take();
        // Passes of decode-sized GPU batches leave staged layers' host MLP share to host
        // threads; larger ones fetch it with the rest of the layer.
        let host_mlp = batches.iter().all(|r| r.len() as u64 <= HOST_MLP_MAX_ROWS);
        let b = &self.backend;
        // xs[g]: [rows of GPU batch g, hidden]
        let mut xs = Vec::with_capacity(batches.len());
        for r in &batches {
            let tokens: Vec<u32> = rows[r.clone()].iter().map(|r| r.token).collect();
            let mut x = b.embedding(&self.embed, &tokens)?;
            if let Some(pe) = &self.pos_embed {
                // OPT's learned positions start at offset 2.
                let ids: Vec<u32> = rows[r.clone()].iter().map(|r| (r.pos + 2) as u32).collect();
                let p = b.embedding(pe, &ids)?;
                b.add_inplace(&mut x, &p)?;
            }
            xs.push(x);
        }
        // Staged layers: the copies of the next `lookahead` staged layers are enqueued as soon
        // as the one before them is in use, so each overlaps every layer in between (with 1,
        // double buffering: at most two staged layers on the device at a time), once per step
        // whatever the number of GPU batches.
        // Layers on disk join the same chain: the next one is taken from its staging buffers
        // (waiting for its read) and its copy enqueued like a staged layer's.
        let mut ahead = VecDeque::new();
        self.fetch_ahead(&mut ahead, None, host_mlp)?;
        let (mut fetched_bytes, mut loads, mut host_mlp_bytes) = (0, 0, 0);
        let mut weight_wait_s = 0.0;
        for i in 0..self.cfg.layers {
            let _span = debug_span!("layer", i).entered();
            xs = match &self.layers[i] {
                LayerSlot::Resident(lw) => {
                    self.layer(lw, None, i, xs, &batches, rows, next_pass.as_deref(), kv)?
                }
                LayerSlot::OnDisk => {
                    let ((lw, mark, bytes), from_disk) = match ahead.pop_front() {
                        Some(n) if n.layer == i => (n.fetched, n.from_disk),
                        other => {
                            self.give_back(other)?;
                            self.give_back_all(&mut ahead)?;
                            let n = self.fetch_from_disk(i)?;
                            (n.fetched, n.from_disk)
                        }
                    };
                    let t0 = Instant::now();
                    b.wait_fetched(&mark)?;
                    weight_wait_s += t0.elapsed().as_secs_f64();
                    if let Some(bufs) = from_disk {
                        // The buffers go to the next read once the copy out of them is done.
                        b.wait_fetched_host(&mark)?;
                        self.give_back_buffers(bufs)?;
                    }
                    fetched_bytes += bytes;
                    loads += 1;
                    self.fetch_ahead(&mut ahead, Some(i), host_mlp)?;
                    self.layer(&lw, None, i, xs, &batches, rows, next_pass.as_deref(), kv)?
                }
                LayerSlot::Staged(ls) => {
                    let (lw, mark, bytes) = match ahead.pop_front() {
                        Some(n) if n.layer == i => n.fetched,
                        other => {
                            self.give_back(other)?;
                            self.give_back_all(&mut ahead)?;
                            self.fetch(ls, host_mlp)?
                        }
                    };
                    let t0 = Instant::now();
                    b.wait_fetched(&mark)?;
                    weight_wait_s += t0.elapsed().as_secs_f64();
                    fetched_bytes += bytes;
                    loads += 1;
                    self.fetch_ahead(&mut ahead, Some(i), host_mlp)?;
                    let on_host = match &ls.host_mlp {
                        Some(m) if host_mlp => Some(m.as_ref().map(|w| B::staged_host(w))),
                        _ => None,
                    };
                    if let Some(m) = &on_host {
                        host_mlp_bytes += m.bytes() * batches.len() as u64;
                    }
                    self.layer(
                        &lw,
                        on_host.as_ref(),
                        i,
                        xs,
                        &batches,
                        rows,
                        next_pass.as_deref(),
                        kv,
                    )?
                }
                LayerSlot::Streamed => {
                    let t0 = Instant::now();
                    let lw = load_layer(b, &self.cfg, self.source, i)?;
                    self.timings.weight_load_s += t0.elapsed().as_secs_f64();
                    loads += 1;
                    self.layer(&lw, None, i, xs, &batches, rows, next_pass.as_deref(), kv)?
                }
            };
        }
        self.timings.weight_bytes_fetched += fetched_bytes;
        self.timings.layer_loads += loads;
        self.timings.host_mlp_bytes += host_mlp_bytes;
        self.timings.host_mlp_s += self.host_mlp_s.take();
        self.timings.weight_wait_s += weight_wait_s;
        let _span = debug_span!("logits").entered();
        let mut parts = Vec::with_capacity(batches.len());
        let mut order = vec![0; logit_rows.len()];
        let mut done = 0;
        for (x, r) in xs.iter().zip(&batches) {
            let mine: Vec<(usize, usize)> = logit_rows
                .iter()
                .enumerate()
                .filter(|(_, l)| r.contains(l))
                .map(|(j, &l)| (j, l - r.start))
                .collect();
            if mine.is_empty() {
                continue;
            }
            for (k, &(j, _)) in mine.iter().enumerate() {
                order[j] = done + k;
            }
            done += mine.len();
            let local: Vec<usize> = mine.iter().map(|m| m.1).collect();
            let last = b.gather_rows(x, &local)?;
            let h = self.norm(&last, &self.final_norm, self.final_norm_b.as_ref())?;
            parts.push(b.linear(&h, self.lm_head.as_ref().unwrap_or(&self.embed), None)?);
        }
        Ok((parts, order))
    }

    /// Tops `ahead` up to `lookahead` fetches under way: the staged or on-disk layers after
    /// the last one queued (after `after` when none is; from the first layer when that is
    /// `None`). A layer on disk is fetched only while no other is queued (its staging buffers
    /// are few): the chain waits there until the one queued is used.
    fn fetch_ahead(
        &self,
        ahead: &mut VecDeque<NextLayer<B>>,
        after: Option<usize>,
        host_mlp: bool,
    ) -> Result<(), ForwardError> {
        while ahead.len() < self.lookahead {
            let from = ahead.back().map_or(after, |n| Some(n.layer));
            let disk_ok = ahead.iter().all(|n| n.from_disk.is_none());
            match self.fetch_staged_after(from, host_mlp, disk_ok)? {
                Some(n) => ahead.push_back(n),
                None => break,
            }
        }
        Ok(())
    }

    /// Starts fetching the first staged or on-disk layer after `after` (from the first layer
    /// when `None`), if there is one, and when it is on disk only if `disk_ok`. `host_mlp`:
    /// the host computes a staged layer's host MLP share (it stays in host memory).
    fn fetch_staged_after(
        &self,
        after: Option<usize>,
        host_mlp: bool,
        disk_ok: bool,
    ) -> Result<Option<NextLayer<B>>, ForwardError> {
        let from = after.map_or(0, |i| i + 1);
        for (j, slot) in self.layers.iter().enumerate().skip(from) {
            match slot {
                LayerSlot::Staged(ls) => {
                    return Ok(Some(NextLayer {
                        layer: j,
                        fetched: self.fetch(ls, host_mlp)?,
                        from_disk: None,
                    }));
                }
                LayerSlot::OnDisk if disk_ok => return Ok(Some(self.fetch_from_disk(j)?)),
                LayerSlot::OnDisk => return Ok(None),
                LayerSlot::Resident(_) | LayerSlot::Streamed => {}
            }
        }
        Ok(None)
    }

    /// Takes layer `i` from the disk weights (waiting for its read) and starts fetching it.
    fn fetch_from_disk(&self, i: usize) -> Result<NextLayer<B>, ForwardError> {
        let (disk, shape) = self.disk.as_ref().ok_or_else(|| {
            ModelError::DiskWeights(format!("layer {i} is on disk, and no disk is open"))
        })?;
        let bufs = {
            let _span = debug_span!("disk_weights_wait", layer = i).entered();
            disk.borrow_mut().take(i)?
        };
        let staged = shape.rebuild(bufs)?;
        let fetched = self.fetch(&staged, false)?;
        Ok(NextLayer {
            layer: i,
            fetched,
            from_disk: Some(staged.into_parts().1),
        })
    }

    /// Returns a fetched layer's staging buffers, if it came from disk, once its copy is done
    /// (a layer fetched ahead and not used: a pass that stopped early).
    fn give_back(&self, next: Option<NextLayer<B>>) -> Result<(), ForwardError> {
        if let Some(NextLayer {
            fetched: (_, mark, _),
            from_disk: Some(bufs),
            ..
        }) = next
        {
            self.backend.wait_fetched_host(&mark)?;
            self.give_back_buffers(bufs)?;
        }
        Ok(())
    }

    /// [`Transformer::give_back`] for every fetch still queued (a chain out of step).
    fn give_back_all(&self, ahead: &mut VecDeque<NextLayer<B>>) -> Result<(), ForwardError> {
        while let Some(n) = ahead.pop_front() {
            self.give_back(Some(n))?;
        }
        Ok(())
    }

    fn give_back_buffers(&self, bufs: Vec<B::Staged>) -> Result<(), ForwardError> {
        if let Some((disk, _)) = &self.disk {
            disk.borrow_mut().give_back(bufs)?;
        }
        Ok(())
    }

    /// Starts fetching a staged layer (without its host MLP share when `host_mlp`); returns it
    /// and the mark to wait for before using it.
    fn fetch(
        &self,
        staged: &LayerWeights<B::Staged>,
        host_mlp: bool,
    ) -> Result<FetchedLayer<B>, ForwardError> {
        let mut bytes = 0u64;
        let lw = staged.as_ref(!host_mlp).try_into_map(|w| {
            bytes += self.backend.staged_bytes(w);
            self.backend.fetch_weight(w)
        })?;
        Ok((lw, self.backend.fetched()?, bytes))
    }

    fn norm(
        &self,
        x: &B::Tensor,
        w: &B::Weight,
        bias: Option<&B::Weight>,
    ) -> Result<B::Tensor, ForwardError> {
        Ok(match bias {
            Some(bias) => self.backend.layer_norm(x, w, bias, self.cfg.norm_eps)?,
            None => self.backend.rms_norm(x, w, self.cfg.norm_eps)?,
        })
    }

    /// One layer over every GPU batch with weights `w`, ordered so the host attends one GPU
    /// batch while the device computes another: batch `g` is launched (its projections, KV
    /// append and device attention enqueued, its queries copied down), then batch `g - 1` is
    /// finished (its output projection and MLP enqueued), then the host attends batch `g` while
    /// the device runs all that. The storage engine streams batch `g`'s disk blocks from then
    /// until `g` is finished, after `g + 1` is launched. While `g - 1`'s storage attention is
    /// still streaming, batch `g`'s disk queries are shipped before waiting for it, so the
    /// storage engine goes from one batch to the next without idling. `next_pass`: the first
    /// GPU batch of the pass after this one, whose first gather the last layer's last batch
    /// reads ahead.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        w: &LayerWeights<B::Weight>,
        host_mlp: Option<&Mlp<&HostWeight>>,
        layer: usize,
        xs: Vec<B::Tensor>,
        batches: &[Range<usize>],
        rows: &[Row],
        next_pass: Option<&[(SeqId, usize)]>,
        kv: &mut KvCache,
    ) -> Result<Vec<B::Tensor>, ForwardError> {
        let mut out = Vec::with_capacity(xs.len());
        let mut pending: Option<(B::Tensor, Attending<B>)> = None;
        for (g, (x, r)) in xs.into_iter().zip(batches).enumerate() {
            let _span = debug_span!("gpu_batch", rows = r.len()).entered();
            // The gather after this one: the next GPU batch's, the next layer's first, or the
            // next pass's first.
            let next = match batches.get(g + 1) {
                Some(n) => Some((layer, rows_per_seq(&rows[n.clone()]))),
                None if layer + 1 < self.cfg.layers => {
                    Some((layer + 1, rows_per_seq(&rows[batches[0].clone()])))
                }
                None => next_pass.map(|s| (0, s.to_vec())),
            };
            let mut attending = self.begin_layer(w, layer, &x, &rows[r.clone()], next, kv)?;
            if let Some((x, a)) = pending.take() {
                if a.storage_in_flight() {
                    self.ship_to_storage(&mut attending, kv)?;
                }
                out.push(self.finish_layer(w, host_mlp, x, a, kv)?);
            }
            self.attend_host(&mut attending, kv)?;
            pending = Some((x, attending));
        }
        if let Some((x, a)) = pending {
            out.push(self.finish_layer(w, host_mlp, x, a, kv)?);
        }
        Ok(out)
    }

    /// The attention block up to the attention itself: projections, RoPE, KV append, the
    /// device's attention launched and the queries on their way to the host. `next`: the layer
    /// and sequences of the gather that follows this one, whose disk reads start here.
    fn begin_layer(
        &self,
        w: &LayerWeights<B::Weight>,
        layer: usize,
        x: &B::Tensor,
        rows: &[Row],
        next: Option<(usize, Vec<(SeqId, usize)>)>,
        kv: &mut KvCache,
    ) -> Result<Attending<B>, ForwardError> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let project = debug_span!("project").entered();
        let h = self.norm(x, &w.attn_norm, w.attn_norm_b.as_ref())?;
        let mut q = b.linear(&h, &w.q, w.q_b.as_ref())?; // [rows, heads * head_dim]
        let mut k = b.linear(&h, &w.k, w.k_b.as_ref())?; // [rows, kv_heads * head_dim]
        let v = b.linear(&h, &w.v, w.v_b.as_ref())?;
        if cfg.family != Family::Opt {
            let positions: Vec<usize> = rows.iter().map(|r| r.pos).collect();
            b.rope(&mut q, cfg.heads, &positions, &self.rope)?;
            b.rope(&mut k, cfg.kv_heads, &positions, &self.rope)?;
        }
        drop(project);
        let hidden = kv.wants_hidden().then_some(x);
        debug_span!("append_kv").in_scope(|| b.append_kv(kv, layer, rows, &k, &v, hidden))?;
        // Far blocks: fetched KV, and hidden states turned back into K and V here.
        let seqs = rows_per_seq(rows);
        let mut far = debug_span!("gather_far").in_scope(|| kv.gather_far(layer, &seqs))?;
        if let Some((layer, seqs)) = next {
            kv.prefetch_far(layer, &seqs)?;
        }
        let regen = Regenerate {
            w: KvProjection {
                norm: &w.attn_norm,
                norm_b: w.attn_norm_b.as_ref(),
                k: &w.k,
                k_b: w.k_b.as_ref(),
                v: &w.v,
                v_b: w.v_b.as_ref(),
            },
            cfg,
            rope: &self.rope,
        };
        let bt = self.attention.block_tokens;
        let tokens = recompute(b, &regen, bt, &mut far)?;
        kv.note_recomputed(tokens);
        // The copy down is enqueued before the device's attention, so it waits only for q.
        let queries = if kv.fetch_overflows(far.len()) || kv.host_attends(layer, &seqs)? {
            Some(b.start_download(&q)?)
        } else {
            None
        };
        let (device, far) = debug_span!("device_attention").in_scope(|| {
            b.launch_device_attention(kv, layer, rows, &q, &self.attention, far, &regen)
        })?;
        let host = match queries {
            Some(q) => HostHalf::Queued {
                q,
                at: rows.iter().map(|r| (r.seq, r.pos)).collect(),
                far,
            },
            None => HostHalf::Idle,
        };
        Ok(Attending {
            layer,
            device,
            host,
            rows: rows.len(),
        })
    }

    /// Ships a launched attention's disk-tier queries to the storage engine now, waiting for the
    /// queries to come down (a no-op unless they are still on their way);
    /// [`Transformer::attend_host`] does the rest. [`Transformer::layer`]
    /// calls it before it waits for the previous GPU batch's storage attention, so the engine's
    /// next command is queued while it works on this one and the disk never idles between
    /// them. (Done in `attend_host` after that wait, it left the disk idle for a query download
    /// and a batch's issue at every call: 0.5 ms a call at the median, 8% of W7's storage
    /// attention time on an H100 host.)
    fn ship_to_storage(&self, a: &mut Attending<B>, kv: &mut KvCache) -> Result<(), ForwardError> {
        let (q, at, far) = match std::mem::replace(&mut a.host, HostHalf::Idle) {
            HostHalf::Queued { q, at, far } => (q, at, far),
            other => {
                a.host = other;
                return Ok(());
            }
        };
        let qh = debug_span!("wait_queries").in_scope(|| self.backend.finish_download(q))?;
        let storage = kv.ship_to_storage(
            a.layer,
            &tier_queries(&at, &qh, &self.attention),
            &self.attention,
        )?;
        a.host = HostHalf::Shipped {
            q: qh,
            at,
            far,
            storage,
        };
        Ok(())
    }

    /// The host's part of a launched attention: waits for the queries, ships the disk tier's
    /// to the storage engine (unless [`Transformer::ship_to_storage`] did), and attends the host
    /// tier and the far blocks the device left.
    fn attend_host(&self, a: &mut Attending<B>, kv: &mut KvCache) -> Result<(), ForwardError> {
        let ag = &self.attention;
        let _span = debug_span!("host_attention", rows = a.rows).entered();
        // Time waiting for the queries here is the device still computing them (or the copy
        // stream still landing this layer's weights before them).
        self.ship_to_storage(a, kv)?;
        let (qh, at, far, storage) = match std::mem::replace(&mut a.host, HostHalf::Idle) {
            HostHalf::Shipped {
                q,
                at,
                far,
                storage,
            } => (q, at, far, storage),
            done_or_idle => {
                a.host = done_or_idle;
                return Ok(());
            }
        };
        let queries = tier_queries(&at, &qh, ag);
        a.host = HostHalf::Running {
            near: kv.attend_host_tier(a.layer, &queries, ag, storage)?,
            far: attend_far(&queries, &far, ag),
        };
        Ok(())
    }

    /// The attention output `[rows, n_heads * head_dim]` of a batch whose host part has run.
    fn merge_attention(
        &self,
        mut a: Attending<B>,
        kv: &mut KvCache,
    ) -> Result<B::Tensor, ForwardError> {
        let width = self.attention.n_heads * self.attention.head_dim;
        self.attend_host(&mut a, kv)?; // a no-op unless the caller skipped it
        let host = match a.host {
            HostHalf::Idle | HostHalf::Queued { .. } | HostHalf::Shipped { .. } => None,
            HostHalf::Running { near, far } => {
                let _span = debug_span!("join_storage").entered();
                let mut partials = near.join()?;
                for (p, f) in partials.iter_mut().zip(far) {
                    p.merge_in(f);
                }
                Some(partials)
            }
        };
        if a.device.is_some() && host.is_some() {
            let (rows, heads) = (a.rows as u64, self.attention.n_heads as u64);
            kv.note_host_round_trip(rows * width as u64 * 4, rows * (width as u64 + heads) * 4);
        }
        let _span = debug_span!("merge").entered();
        self.backend.merge_attention(a.device, host, a.rows, width)
    }

    /// The rest of the layer once the attention is in: the storage engine's partials joined,
    /// everything merged, output projection and MLP (`host_mlp`: the share host threads
    /// compute).
    fn finish_layer(
        &self,
        w: &LayerWeights<B::Weight>,
        host_mlp: Option<&Mlp<&HostWeight>>,
        mut x: B::Tensor,
        attending: Attending<B>,
        kv: &mut KvCache,
    ) -> Result<B::Tensor, ForwardError> {
        let b = &self.backend;
        let attn = self.merge_attention(attending, kv)?;
        let _span = debug_span!("out_mlp").entered();
        let o = b.linear(&attn, &w.o, w.o_b.as_ref())?;
        b.add_inplace(&mut x, &o)?;
        // MLP block.
        let h = self.norm(&x, &w.mlp_norm, w.mlp_norm_b.as_ref())?;
        let out = match host_mlp {
            Some(on_host) => self.mlp_with_host(&h, &w.mlp, on_host)?,
            None => {
                let mut out = mlp(b, &h, &w.mlp.as_ref())?;
                // A host share fetched with the layer (a pass with many rows) runs here too.
                if let Some(share) = &w.host_mlp {
                    b.add_inplace(&mut out, &mlp(b, &h, &share.as_ref())?)?;
                }
                out
            }
        };
        b.add_inplace(&mut x, &out)?;
        Ok(x)
    }

    /// The MLP of `h` with host threads computing the `on_host` neurons from their staged
    /// weights while the device computes the rest: `h` goes down, the host's partial output
    /// comes back and adds to the device's.
    fn mlp_with_host(
        &self,
        h: &B::Tensor,
        on_device: &Mlp<B::Weight>,
        on_host: &Mlp<&HostWeight>,
    ) -> Result<B::Tensor, ForwardError> {
        let b = &self.backend;
        let _span = debug_span!("host_mlp").entered();
        let down = b.start_download(h)?;
        let mut out = mlp(b, h, &on_device.as_ref())?;
        let (rows, cols) = b.shape(h);
        // Time waiting here is the device still computing the input (or the copy stream still
        // landing this layer's weights before it).
        let data = debug_span!("wait_mlp_input").in_scope(|| b.finish_download(down))?;
        let x = CpuTensor { rows, cols, data };
        let t0 = Instant::now();
        let part = debug_span!("host_mlp_compute").in_scope(|| mlp(&CpuBackend, &x, on_host))?;
        self.host_mlp_s
            .set(self.host_mlp_s.get() + t0.elapsed().as_secs_f64());
        b.add_inplace(&mut out, &b.tensor(rows, cols, part.data)?)?;
        Ok(out)
    }
}

/// Each row's query (`[n_heads * head_dim]` of `q`, rows in order) with its sequence and
/// position, for the KV cache's tiers.
fn tier_queries<'a>(
    at: &[(SeqId, usize)],
    q: &'a [f32],
    ag: &AttentionGeometry,
) -> Vec<TierQuery<'a>> {
    let qd = ag.n_heads * ag.head_dim;
    at.iter()
        .enumerate()
        .map(|(r, &(seq, pos))| TierQuery {
            seq,
            pos,
            q: &q[r * qd..(r + 1) * qd],
        })
        .collect()
}

/// Each sequence of `rows` (a sequence's rows are consecutive) with its number of rows.
fn rows_per_seq(rows: &[Row]) -> Vec<(SeqId, usize)> {
    let mut out: Vec<(SeqId, usize)> = Vec::new();
    for r in rows {
        match out.last_mut() {
            Some((seq, n)) if *seq == r.seq => *n += 1,
            _ => out.push((r.seq, 1)),
        }
    }
    out
}

/// Whether layer `i` of `layers` stays resident when `resident` of them do: the others are
/// spread evenly through the stack (one every `layers / staged` layers), not bunched at its end,
/// so each staged layer's copy overlaps the compute of the resident layers before it.
pub fn layer_is_resident(i: usize, layers: usize, resident: usize) -> bool {
    let staged = layers.saturating_sub(resident);
    layers == 0 || (i + 1) * staged / layers == i * staged / layers
}

/// Splits `rows` (a sequence's rows contiguous and in position order, in every caller) into
/// GPU batches of at most `⌈rows / n⌉` rows each (and at most `max_rows`), cut between
/// sequences where it can be: a decode step's `n` batches even in sequences, a prefill pass's
/// `n` batches of about one batch's prompts each. A sequence with more rows than that is cut
/// inside (after filling the batch before it): batch `g + 1` then attends over what batch `g`
/// appended in the same layer, as a later prompt chunk does. May give one batch more than `n`
/// when prompts straddle the pass.
fn gpu_batches(rows: &[Row], n: usize, max_rows: usize) -> Vec<Range<usize>> {
    let cap = rows.len().div_ceil(n.max(1)).min(max_rows).max(1);
    let mut out = Vec::new();
    let (mut start, mut end) = (0, 0);
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j].seq == rows[i].seq {
            j += 1;
        }
        if j - start > cap {
            if end > start && j - i <= cap {
                // Close the batch before this sequence, which fits in the next one.
                out.push(start..end);
                start = i;
            }
            while j - start > cap {
                out.push(start..start + cap);
                start += cap;
            }
        }
        end = j;
        i = j;
    }
    if end > start || out.is_empty() {
        out.push(start..end);
    }
    out
}

/// Neurons of an MLP of `intermediate` neurons that a host share of `share` gives the host: a
/// multiple of 8 (the GPU's vector loads want the rest to be one too), leaving the GPU at least
/// 8; none for MLPs too small to split.
pub fn host_mlp_neurons(intermediate: usize, share: f64) -> usize {
    if intermediate < 16 || share.is_nan() {
        return 0;
    }
    let n = (share.clamp(0.0, 1.0) * intermediate as f64 / 8.0).round() as usize * 8;
    n.min(intermediate - 8)
}

/// A tensor's values as the bytes written to disk.
struct WeightBytes(WeightData);

impl AsRef<[u8]> for WeightBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Writes the layers `order` to disk under `dir`, with staging buffer sets shaped and typed
/// ([`RuntimeBackend::staging_buffer`]) like the first of them, and starts reading the first
/// ones ahead of the first pass.
fn write_disk_layers<B: RuntimeBackend>(
    b: &B,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    dir: &DiskTierConfig,
    order: Vec<usize>,
) -> ModelResult<DiskLayers<B>> {
    let first = layer_with(cfg, order[0], |name| src.load(name))?;
    let staging = || first.clone().try_into_map(|w| b.staging_buffer(w));
    let (shape, set) = staging()?.into_parts();
    let mut sets = vec![set];
    for _ in 1..DISK_STAGING_SETS {
        sets.push(staging()?.into_parts().1);
    }
    // The first layer is written from the copy already loaded, not loaded again.
    let mut first = Some(first);
    // Each tensor is written in its staging buffer's dtype, so a read is a byte copy.
    let dtypes: Vec<DType> = sets[0]
        .iter()
        .map(|s| B::staged_host(s).data.dtype())
        .collect();
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(order.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} layers written to disk  [{elapsed}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut disk = DiskWeights::open(dir, order.clone(), sets, B::staged_bytes_mut)?;
    for &i in &order {
        let layer = match first.take() {
            Some(l) => l,
            None => layer_with(cfg, i, |name| src.load(name))?,
        };
        let (_, parts) = layer.into_parts();
        let data: Vec<WeightBytes> = parts
            .into_iter()
            .zip(&dtypes)
            .map(|(w, &d)| WeightBytes(w.data.cast(d)))
            .collect();
        disk.write_layer(i, data)?;
        progress.inc(1);
    }
    disk.finish_writes()?;
    progress.finish_and_clear();
    Ok((RefCell::new(disk), shape))
}

/// Stages layer `i` in host memory, its last `host_neurons` MLP neurons as a share of their own
/// (see [`Residency::Split`]), or streams it when the backend does not stage.
fn stage_layer<B: RuntimeBackend>(
    b: &B,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    i: usize,
    host_neurons: usize,
) -> ModelResult<LayerSlot<B::Weight, B::Staged>> {
    enum Stop {
        Declined,
        Failed(crate::error::ModelError),
    }
    let stage = |w: HostWeight| match b.stage_weight(w) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Stop::Declined),
        Err(e) => Err(Stop::Failed(e.into())),
    };
    let lw = if host_neurons == 0 {
        // Tensor by tensor: a backend that declines has loaded one tensor, not a layer.
        layer_with(cfg, i, |name| stage(src.load(name).map_err(Stop::Failed)?))
    } else {
        layer_with(cfg, i, |name| src.load(name))
            .map_err(Stop::Failed)
            .and_then(|mut lw| {
                let (gpu, host) = lw
                    .mlp
                    .split_neurons(host_neurons)
                    .map_err(|e| Stop::Failed(e.into()))?;
                lw.mlp = gpu;
                lw.host_mlp = Some(host);
                lw.try_into_map(stage)
            })
    };
    match lw {
        Ok(lw) => Ok(LayerSlot::Staged(lw)),
        Err(Stop::Declined) => Ok(LayerSlot::Streamed),
        Err(Stop::Failed(e)) => Err(e),
    }
}

fn check_shape<B: Backend>(
    b: &B,
    w: &B::Weight,
    rows: usize,
    cols: usize,
    what: &str,
) -> ModelResult<()> {
    let (r, c) = b.weight_shape(w);
    if (r, c) != (rows, cols) {
        return Err(crate::error::ModelError::spec(
            what,
            format!("has shape [{r}, {c}] but the config implies [{rows}, {cols}]"),
        ));
    }
    Ok(())
}

/// Bytes the model's weights take in their stored dtype (for the resident-or-streamed choice).
pub fn weight_bytes(cfg: &ModelConfig) -> u64 {
    cfg.param_count() * cfg.dtype.size_bytes() as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{
        Mlp, Range, Row, SeqId, gpu_batches, host_mlp_neurons, layer_is_resident, layers_on_disk,
        mlp,
    };
    use strata_kernels::testing::{SplitMix, max_rel_err, test_seed};
    use strata_kernels::{Backend, CpuBackend, DType, HostWeight};

    #[test]
    fn host_mlp_shares_round_to_whole_vectors_and_leave_the_gpu_some() {
        assert_eq!(host_mlp_neurons(28672, 0.625), 17920);
        assert_eq!(host_mlp_neurons(28672, 0.0), 0);
        assert_eq!(host_mlp_neurons(128, 0.25), 32);
        assert_eq!(host_mlp_neurons(100, 0.3), 32); // 30 rounds to 32
        assert_eq!(host_mlp_neurons(128, 1.0), 120);
        assert_eq!(host_mlp_neurons(8, 0.5), 0);
        assert_eq!(host_mlp_neurons(128, f64::NAN), 0);
    }

    /// The two shares of a split MLP add up to the whole MLP, for both kinds, whatever the
    /// split (none, some, all but one vector).
    #[test]
    fn an_mlp_split_by_neurons_sums_to_the_whole() {
        let seed = test_seed();
        let mut rng = SplitMix(seed);
        let cpu = CpuBackend::new();
        let (rows, hidden, f) = (3, 24, 40);
        let mut w = |r: usize, c: usize| rng.weight(r, c, DType::BF16);
        let kinds: Vec<Mlp<HostWeight>> = vec![
            Mlp::Relu {
                fc1: w(f, hidden),
                fc1_b: w(1, f),
                fc2: w(hidden, f),
                fc2_b: Some(w(1, hidden)),
            },
            Mlp::SwiGlu {
                gate: w(f, hidden),
                up: w(f, hidden),
                down: w(hidden, f),
            },
        ];
        let x = cpu
            .tensor(rows, hidden, SplitMix(seed ^ 1).vec(rows * hidden))
            .unwrap();
        for whole in kinds {
            let want = mlp(&cpu, &x, &whole.as_ref()).unwrap();
            for host in [0, 8, 16, 32] {
                let copy = whole.as_ref().map(HostWeight::clone);
                let (gpu, on_host) = copy.split_neurons(host).unwrap();
                let mut got = mlp(&cpu, &x, &gpu.as_ref()).unwrap();
                let part = mlp(&cpu, &x, &on_host.as_ref()).unwrap();
                cpu.add_inplace(&mut got, &part).unwrap();
                let err = max_rel_err(&got.data, &want.data);
                assert!(
                    err < 1e-5,
                    "seed {seed}, {host} neurons on the host: {err:e}"
                );
            }
        }
    }

    /// `(sequence, rows)` runs laid end to end as rows.
    fn runs(r: &[(u64, usize)]) -> Vec<Row> {
        r.iter()
            .flat_map(|&(seq, n)| {
                (0..n).map(move |pos| Row {
                    seq: SeqId(seq),
                    pos,
                    token: 0,
                })
            })
            .collect()
    }

    fn sizes(b: &[Range<usize>]) -> Vec<usize> {
        b.iter().map(Range::len).collect()
    }

    #[test]
    fn gpu_batches_cover_the_rows_in_order_within_a_batch_share() {
        // A decode step: even in sequences, as FlexGen's GPU batches.
        let step = |seqs: u64, n| {
            let r: Vec<(u64, usize)> = (0..seqs).map(|s| (s, 1)).collect();
            sizes(&gpu_batches(&runs(&r), n, usize::MAX))
        };
        assert_eq!(step(44, 4), vec![11; 4]);
        assert_eq!(step(45, 4), vec![12, 12, 12, 9]);
        assert_eq!(step(5, 4), vec![2, 2, 1]);
        assert_eq!(step(3, 1), vec![3]);
        // A prefill pass of 44 prompts of 256 in 4 GPU batches: 11 prompts each.
        let prompts: Vec<(u64, usize)> = (0..44).map(|s| (s, 256)).collect();
        let b = gpu_batches(&runs(&prompts), 4, usize::MAX);
        assert_eq!(sizes(&b), vec![11 * 256; 4]);
        // Prompts straddling the pass: cut between them, one batch more.
        let b = gpu_batches(
            &runs(&[(0, 100), (1, 256), (2, 256), (3, 256), (4, 156)]),
            4,
            usize::MAX,
        );
        assert_eq!(sizes(&b), vec![100, 256, 256, 256, 156]);
        // A prompt longer than a batch's share is cut inside it.
        assert_eq!(
            sizes(&gpu_batches(&runs(&[(0, 1000)]), 4, usize::MAX)),
            vec![250; 4]
        );
        let b = gpu_batches(&runs(&[(0, 100), (1, 1000)]), 2, usize::MAX);
        assert_eq!(sizes(&b), vec![550, 550]);
        assert_eq!(sizes(&gpu_batches(&[], 3, usize::MAX)), vec![0]);
        // Batches capped below the pass's share: more of them, cut between prompts.
        let b = gpu_batches(&runs(&prompts), 4, 5 * 256 + 10);
        assert_eq!(sizes(&b), [vec![5 * 256; 8], vec![4 * 256]].concat());
        // Always contiguous, in order, covering every row.
        for (r, n) in [
            (runs(&[(0, 7), (1, 3), (2, 9), (3, 1)]), 3),
            (runs(&prompts), 7),
        ] {
            let b = gpu_batches(&r, n, usize::MAX);
            assert_eq!(b[0].start, 0);
            assert_eq!(b.last().map(|x| x.end), Some(r.len()));
            assert!(b.windows(2).all(|w| w[0].end == w[1].start));
            assert!(b.iter().all(|x| x.len() <= r.len().div_ceil(n)), "{b:?}");
        }
    }

    #[test]
    fn staged_layers_are_spread_evenly_and_counted_exactly() {
        for layers in [1, 2, 7, 32, 48] {
            for resident in 0..=layers {
                let staged: Vec<usize> = (0..layers)
                    .filter(|&i| !layer_is_resident(i, layers, resident))
                    .collect();
                assert_eq!(
                    staged.len(),
                    layers - resident,
                    "{layers} layers, {resident}"
                );
                // Between two staged layers (and before the first) at most ceil(resident /
                // staged) resident ones: the copies are spread, not bunched.
                if let Some(gap) = resident.checked_div(staged.len()) {
                    let most = gap + 1;
                    let mut prev = None;
                    for &s in &staged {
                        let run = s - prev.map_or(0, |p: usize| p + 1);
                        assert!(run <= most, "{layers}/{resident}: run {run} before {s}");
                        prev = Some(s);
                    }
                }
            }
        }
        // 24 of 32 resident: every fourth layer staged.
        let staged: Vec<usize> = (0..32).filter(|&i| !layer_is_resident(i, 32, 24)).collect();
        assert_eq!(staged, vec![3, 7, 11, 15, 19, 23, 27, 31]);
    }

    #[test]
    fn disk_layers_are_taken_from_the_non_resident_ones_and_counted_exactly() {
        for layers in [1, 2, 7, 32, 96] {
            for resident in 0..=layers {
                for disk in [0, 1, (layers - resident) / 2, layers - resident, layers + 3] {
                    let on_disk = layers_on_disk(layers, resident, disk);
                    let want = disk.min(layers - resident);
                    assert_eq!(on_disk.iter().filter(|&&d| d).count(), want);
                    for (i, &d) in on_disk.iter().enumerate() {
                        assert!(
                            !(d && layer_is_resident(i, layers, resident)),
                            "{layers}/{resident}/{disk}: layer {i} resident and on disk"
                        );
                    }
                }
            }
        }
        // 16 of 32 resident, 8 on disk: every other staged layer goes to disk.
        let disk: Vec<usize> = (0..32).filter(|&i| layers_on_disk(32, 16, 8)[i]).collect();
        assert_eq!(disk, vec![3, 7, 11, 15, 19, 23, 27, 31]);
    }
}
