//! The KV cache: fixed-size token blocks spread over tiers, plus the block table that says where
//! each block lives (vLLM's design, with tiers).
//!
//! - A block holds `block_tokens` tokens of one sequence in one layer: K then V, each
//!   `[kv_heads, block_tokens, head_dim]`. The GPU tier stores them in its pool's dtype; the
//!   host and disk tiers in the cache's KV dtype ([`KvCacheConfig::kv_dtype`]): the model's
//!   dtype (bf16 / f16) when computing on a GPU, the same values the GPU tier holds, moved
//!   between tiers as they are; f32 on the CPU backend. Attention widens them to f32 as it reads.
//! - [`KvCache`] is the tier manager. It keeps the block table, enforces each tier's budget,
//!   places new blocks in the host tier (the hottest tier on a CPU-only machine), and spills
//!   blocks to the disk tier when the host budget is full. Which blocks stay hot is a
//!   [`policy::PlacementPolicy`]. Spilled bytes move in the background: the disk worker owns the
//!   block store and writes while compute goes on.
//! - Attention runs where the blocks are. The host engine (rayon threads) attends over
//!   host-resident blocks. The storage attention engine, on the disk worker, streams disk blocks
//!   and attends as they arrive. Each tier returns `(o, lse)` partials per query, and the partials
//!   are merged exactly.
//!
//! - Cold blocks may instead be fetched to the compute device and attended there, or store the
//!   layer's input hidden states for K and V to be recomputed ([`far`]); the executor sets this
//!   from a planner policy with [`KvCache::set_executor`].
//!
//! Invariants:
//! - Block `j` of `(seq, layer)` holds positions `j*B .. j*B + filled`, filled in order.
//! - The last (writable) block of every `(seq, layer)` is always in the host tier.
//! - Blocks in use never exceed a tier's capacity (`metrics` records the peaks; tests assert
//!   them).

mod cache;
mod disk;
pub mod far;
mod gpu;
mod pin;
pub mod policy;
mod stored;

pub use cache::{KvCache, KvCacheConfig, KvMetrics, StorageAttending, TierAttention, TierQuery};
pub use disk::DiskTierConfig;
pub use far::{AttentionRoutes, FarBlock};
pub use gpu::GpuTierConfig;
pub(crate) use stored::slot_kv;
pub use strata_kernels::DType;
pub use strata_storage::IoEngine;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

impl KvGeometry {
    /// The KV cache of a model of config `cfg` in blocks of `block_tokens` tokens.
    pub fn of_model(cfg: &crate::model::ModelConfig, block_tokens: usize) -> Self {
        Self {
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_tokens,
        }
    }

    /// Values in one block's K (and again in its V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_tokens * self.head_dim
    }
    /// Bytes of one block, K and V, stored in `dtype`.
    pub fn bytes_per_block(&self, dtype: DType) -> usize {
        2 * self.block_elems() * dtype.size_bytes()
    }

    /// Bytes of one host tier slot (a block, aligned for O_DIRECT).
    pub fn host_slot_bytes(&self, dtype: DType) -> u64 {
        self.bytes_per_block(dtype)
            .next_multiple_of(strata_storage::MIN_ARENA_ALIGN) as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(
        "the host KV budget is full ({blocks} blocks of {bytes_per_block} bytes) and there is no disk tier; raise --host-mem or give --disk-dir"
    )]
    HostFull {
        blocks: usize,
        bytes_per_block: usize,
    },
    #[error(
        "--host-mem holds {capacity} KV blocks, but the running sequences need at least {needed} (one writable block per sequence and layer); raise --host-mem or lower --batch-size"
    )]
    HostTooSmall { capacity: usize, needed: usize },
    #[error(
        "the disk KV budget is full ({blocks} blocks of {bytes_per_block} bytes); raise --disk-mem"
    )]
    DiskFull {
        blocks: usize,
        bytes_per_block: usize,
    },
    #[error(
        "--gpu-mem holds {capacity} KV blocks of {bytes_per_block} bytes, but this step needs {needed} at once (the writable block of every sequence and layer, plus the blocks of one prefill chunk); raise --gpu-mem, or lower --batch-size or --prefill-chunk"
    )]
    GpuTooSmall {
        capacity: usize,
        needed: usize,
        bytes_per_block: usize,
    },
    /// A policy setting the cache cannot run, naming the policy field.
    #[error("{0}")]
    Unsupported(String),
    #[error("GPU KV tier: {0}")]
    Gpu(String),
    #[error("disk tier: {0}")]
    Storage(#[from] strata_storage::StorageError),
    /// A storage attention that shared a failed read stream with another (which got the
    /// storage error itself).
    #[error("disk tier: {0}")]
    StorageStream(String),
    #[error("the disk worker stopped unexpectedly")]
    WorkerGone,
    #[error("sequence {0:?} is not in the block table")]
    UnknownSequence(SeqId),
    #[error("position {pos} of sequence {seq:?} written out of order (next is {next})")]
    OutOfOrder { seq: SeqId, pos: usize, next: usize },
}
