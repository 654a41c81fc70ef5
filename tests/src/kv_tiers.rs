//! A KV cache of host and disk tiers driven through its own interface (no model): built over a
//! scratch disk, and filled with random tokens whose blocks the tests know.

use strata_kernels::DType;
use strata_kernels::testing::SplitMix;
use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{DiskTierConfig, IoEngine, KvCache, KvCacheConfig, KvGeometry, SeqId};

/// The IO engines this machine can run: the synchronous one, and io_uring where the kernel
/// allows it.
pub fn io_engines() -> Vec<IoEngine> {
    let mut e = vec![IoEngine::Sync];
    if strata_storage::probe_io_uring().is_ok() {
        e.push(IoEngine::Uring);
    }
    e
}

/// A cache of geometry `g` whose host tier holds `host_blocks` blocks over the disk tier
/// `disk` (e.g. [`crate::scratch_disk`]); the first and the last block of each sequence stay
/// in host memory longest.
pub fn host_and_disk(
    g: KvGeometry,
    dtype: DType,
    host_blocks: usize,
    disk: DiskTierConfig,
) -> KvCache {
    let stride = g.bytes_per_block(dtype).next_multiple_of(4096) as u64;
    KvCache::new(KvCacheConfig {
        geometry: g,
        host_bytes: host_blocks as u64 * stride,
        kv_dtype: dtype,
        disk: Some(disk),
        gpu: None,
        policy: Box::new(SinkAndRecent {
            sink_blocks: 1,
            recent_blocks: 1,
        }),
    })
    .expect("a host and disk KV cache")
}

/// Adds `seq` and appends `tokens` random tokens to it in every layer. Returns, per layer, the
/// K and V blocks as the tiers should hold them: `[blocks][2 · block_elems]` f32, unfilled
/// slots zero.
pub fn fill(
    kv: &mut KvCache,
    g: KvGeometry,
    rng: &mut SplitMix,
    seq: SeqId,
    tokens: usize,
) -> Vec<Vec<Vec<f32>>> {
    let (e, hd, bt) = (g.block_elems(), g.head_dim, g.block_tokens);
    let width = g.kv_heads * hd;
    let mut want = vec![vec![vec![0.0f32; 2 * e]; tokens.div_ceil(bt)]; g.layers];
    kv.add_sequence(seq);
    for pos in 0..tokens {
        for (layer, blocks) in want.iter_mut().enumerate() {
            let k = rng.vec_scaled(width, 3.0);
            let v = rng.vec_scaled(width, 3.0);
            kv.append(seq, layer, pos, &k, &v).expect("append");
            let (b, t) = (pos / bt, pos % bt);
            for h in 0..g.kv_heads {
                let at = (h * bt + t) * hd;
                blocks[b][at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
                blocks[b][e + at..e + at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
            }
        }
    }
    want
}

/// The bits of the first `len` token rows of every head of K and V in `block` (`[2 ·
/// block_elems]`): a block's filled part, since the rest of a reused slot is stale.
pub fn filled_bits(g: KvGeometry, block: &[f32], len: usize) -> Vec<u32> {
    let (hd, bt) = (g.head_dim, g.block_tokens);
    block
        .chunks_exact(bt * hd)
        .flat_map(|head| &head[..len * hd])
        .map(|v| v.to_bits())
        .collect()
}
