//! Disk reads queued one gather ahead (`KvCache::prefetch_far`), through the KV cache's own
//! interface: a gather takes the blocks read ahead and they are bit for bit the blocks a plain
//! gather reads; blocks freed after the read-ahead (their slots reused by another sequence) are
//! read again, never served stale; a failed spill write is still reported by the gather
//! that follows a read-ahead, with both IO engines; and a prompt run in chunks reads each
//! chunk's first disk blocks ahead once the chunk before names it, with the same logits.

#![allow(clippy::unwrap_used)]

use strata_kernels::testing::{SplitMix as Rng, test_seed};
use strata_kernels::{DType, KvBuf};
use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{AttentionRoutes, FarBlock, IoEngine, KvCache, KvGeometry, SeqId};
use strata_runtime::model;
use strata_tests::kv_tiers::{fill, filled_bits, host_and_disk, io_engines};
use strata_tests::{Engine, Placement, scratch_disk};

const G: KvGeometry = KvGeometry {
    layers: 3,
    kv_heads: 2,
    head_dim: 32,
    block_tokens: 8,
};

/// Every host and disk block far: gathers read all of them back.
const ALL_FAR: AttentionRoutes = AttentionRoutes {
    host_near: 0.0,
    disk_near: 0.0,
};

/// A host tier of 8 blocks over a disk tier: sequences of 45 tokens spill most of their blocks.
fn cache(engine: IoEngine, tag: &str, faults: Option<&str>) -> KvCache {
    let mut disk = scratch_disk("read-ahead", tag, engine);
    disk.faults = faults.map(str::to_string);
    let mut kv = host_and_disk(G, DType::F16, 8, disk);
    kv.set_executor(ALL_FAR, 0.0, 0).unwrap();
    kv
}

/// A gathered block's sequence, first position, length and K and V bits.
fn key(f: &FarBlock) -> (u64, usize, usize, Vec<u32>) {
    let bits = f
        .data
        .as_slice()
        .to_f32_vec()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    (f.seq.0, f.start_pos, f.len, bits)
}

#[test]
fn a_gather_takes_the_blocks_read_ahead_and_they_are_the_blocks_stored() {
    let seed = test_seed();
    for engine in io_engines() {
        let what = format!("seed {seed}, {engine:?}");
        let mut rng = Rng(seed);
        let mut kv = cache(engine, "same", None);
        let seqs = [SeqId(0), SeqId(1)];
        for &s in &seqs {
            fill(&mut kv, G, &mut rng, s, 45);
        }
        let on_disk = kv.disk_blocks_in_use() as u64;
        assert!(on_disk > 0, "{what}: nothing spilled to disk");
        let rows: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
        for layer in 0..G.layers {
            let plain: Vec<_> = kv
                .gather_far(layer, &rows)
                .unwrap()
                .iter()
                .map(key)
                .collect();
            let before = kv.metrics().disk_blocks_read_ahead;
            kv.prefetch_far(layer, &rows).unwrap();
            let ahead: Vec<_> = kv
                .gather_far(layer, &rows)
                .unwrap()
                .iter()
                .map(key)
                .collect();
            assert!(
                kv.metrics().disk_blocks_read_ahead > before,
                "{what}: layer {layer}: the gather read its disk blocks again"
            );
            assert_eq!(
                ahead, plain,
                "{what}: layer {layer}: blocks read ahead differ"
            );
            assert_eq!(plain.len(), 2 * 6, "{what}: layer {layer}: blocks gathered");
        }
        // Each disk block lives in one layer of one sequence, all far: each was read ahead once.
        assert_eq!(kv.metrics().disk_blocks_read_ahead, on_disk, "{what}");
        // A gather of another layer than the one read ahead reads its own blocks.
        kv.prefetch_far(0, &rows).unwrap();
        let before = kv.metrics().disk_blocks_read_ahead;
        kv.gather_far(1, &rows).unwrap();
        assert_eq!(kv.metrics().disk_blocks_read_ahead, before, "{what}");
    }
}

#[test]
fn blocks_freed_after_their_read_ahead_are_never_served_stale() {
    let seed = test_seed();
    for engine in io_engines() {
        let what = format!("seed {seed}, {engine:?}");
        let mut rng = Rng(seed);
        let mut kv = cache(engine, "freed", None);
        fill(&mut kv, G, &mut rng, SeqId(0), 45);
        kv.prefetch_far(0, &[(SeqId(0), 1)]).unwrap();
        // Sequence 0's disk slots go back to the tier, and sequence 1's spills reuse them.
        kv.remove_sequence(SeqId(0)).unwrap();
        let want = fill(&mut kv, G, &mut rng, SeqId(1), 45);
        assert!(
            kv.disk_blocks_in_use() > 0,
            "{what}: nothing spilled to disk"
        );
        let far = kv.gather_far(0, &[(SeqId(1), 1)]).unwrap();
        assert_eq!(kv.metrics().disk_blocks_read_ahead, 0, "{what}");
        assert_eq!(far.len(), 6, "{what}");
        for f in &far {
            let stored = &want[0][f.start_pos / G.block_tokens];
            let rounded = KvBuf::from_f32(DType::F16, stored).as_slice().to_f32_vec();
            assert!(
                filled_bits(G, &f.data.as_slice().to_f32_vec(), f.len)
                    == filled_bits(G, &rounded, f.len),
                "{what}: the block at {} is not sequence 1's",
                f.start_pos
            );
        }
    }
}

#[test]
fn a_failed_spill_write_is_reported_by_the_gather_after_a_read_ahead() {
    for engine in io_engines() {
        let mut rng = Rng(test_seed());
        let mut kv = cache(engine, "enospc", Some("enospc=1"));
        // Spills are queued, so the appends succeed; the failure waits for the next read.
        fill(&mut kv, G, &mut rng, SeqId(0), 45);
        assert!(
            kv.disk_blocks_in_use() > 0,
            "{engine:?}: nothing spilled to disk"
        );
        kv.prefetch_far(0, &[(SeqId(0), 1)]).unwrap();
        let err = kv.gather_far(0, &[(SeqId(0), 1)]).err();
        let msg = format!(
            "{:?}",
            err.expect("the gather must report the failed write")
        );
        assert!(
            msg.to_lowercase().contains("space") || msg.contains("ENOSPC") || msg.contains("28"),
            "{engine:?}: {msg}"
        );
    }
}

#[test]
fn a_chunk_naming_the_next_reads_its_first_disk_blocks_ahead() {
    let m = model::open("synthetic:tiny-llama").unwrap();
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|i| (0..40).map(|t| (t * 7 + i * 31) % 250).collect())
        .collect();
    let run = |expect: bool| {
        let tag = if expect { "named" } else { "unnamed" };
        let placement = Placement {
            host_blocks: Some(3 * m.config.layers + 4),
            disk: Some(scratch_disk("read-ahead", tag, IoEngine::Sync)),
            gpu: None,
            policy: SinkAndRecent {
                sink_blocks: 1,
                recent_blocks: 1,
            },
            kv_dtype: None,
        };
        let mut e = Engine::with_placement(&m, 4, true, placement);
        e.kv.set_executor(ALL_FAR, 0.0, m.config.hidden).unwrap();
        e.prefill_chunk = 16;
        e.expect_next_chunk = expect;
        let out = e.greedy_batch(&prompts, 2);
        (out, e.kv.metrics().disk_blocks_read_ahead)
    };
    let (named, ahead_named) = run(true);
    let (unnamed, ahead_unnamed) = run(false);
    assert!(named == unnamed, "reading ahead changed the results");
    assert!(
        ahead_named > ahead_unnamed,
        "the next chunk's first disk blocks were not read ahead ({ahead_named} against \
         {ahead_unnamed} blocks)"
    );
}
