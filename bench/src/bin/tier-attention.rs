//! Attention where the KV lives, measured against the bandwidth of the memory it lives in, in
//! one run:
//! - **host**: KV bytes attended per second by the host engine (all threads, split-KV) against
//!   a multi-threaded memcpy of the same size;
//! - **storage**: KV bytes attended per second by the storage attention engine (stream blocks,
//!   attend as they arrive) against plain streaming reads of the same blocks from the same store.
//!
//! `cargo run --release -p strata-bench --bin tier-attention -- --dir /nvme/tmp --kv-mem 1GiB`
//! The KV geometry is Llama-3-8B's (8 KV heads, head dim 128, 32 query heads), one decode query.

use clap::Parser;
use rayon::prelude::*;
use strata_bench::best;
use strata_kernels::attention::{AttentionQuery, attend_batch, attend_partial};
use strata_kernels::{AttentionGeometry, KvBlockView, Partial};
use strata_storage::{
    ArenaSlots, BlockStore, BlockStoreConfig, DiskSlot, IoEngine, StorageError, f32_view,
};

#[derive(Parser)]
struct Args {
    /// Directory for the disk tier's file (use the disk you want to measure).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// KV bytes to attend over, e.g. 1GiB.
    #[arg(long, default_value = "1GiB")]
    kv_mem: String,
    /// Tokens per block.
    #[arg(long, default_value_t = 32)]
    block_tokens: usize,
    #[arg(long, default_value = "auto")]
    io_engine: String,
    #[arg(long, default_value_t = 32)]
    queue_depth: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let g = AttentionGeometry {
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        block_tokens: a.block_tokens,
        scale: 1.0 / 128f32.sqrt(),
    };
    let e = g.block_elems();
    let bpb = 2 * e * 4;
    let blocks = (strata_runtime::units::parse_size(&a.kv_mem)? as usize / bpb).max(1);
    let kv_bytes = (blocks * bpb) as f64;
    let tokens = blocks * a.block_tokens;
    println!(
        "KV: {blocks} blocks of {} KiB = {:.2} GiB ({tokens} tokens of one layer)",
        bpb / 1024,
        kv_bytes / (1u64 << 30) as f64
    );

    // Host tier: the blocks in an arena, filled with deterministic values.
    let mut host = ArenaSlots::with_slots(blocks, bpb)?;
    let ids: Vec<_> = (0..blocks)
        .map(|_| host.alloc().ok_or("arena too small"))
        .collect::<Result<_, _>>()?;
    for (b, id) in ids.iter().enumerate() {
        for (i, x) in host.slot_f32_mut(*id).iter_mut().enumerate() {
            *x = (((b * 31 + i * 7) % 1000) as f32 / 500.0) - 1.0;
        }
    }
    let q: Vec<f32> = (0..g.n_heads * g.head_dim)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect();
    let views: Vec<KvBlockView<'_>> = ids
        .iter()
        .enumerate()
        .map(|(b, id)| {
            let d = host.slot_f32(*id);
            KvBlockView {
                k: (&d[..e]).into(),
                v: (&d[e..2 * e]).into(),
                start_pos: b * a.block_tokens,
                len: a.block_tokens,
            }
        })
        .collect();

    let src = vec![1u8; kv_bytes as usize];
    let mut dst = vec![0u8; kv_bytes as usize];
    let chunk = (src.len() / rayon::current_num_threads().max(1) / 8).max(1 << 20);
    let (t_copy, _) = best(a.reps, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let chunk_blocks = blocks.div_ceil(2 * rayon::current_num_threads().max(1));
    let query = [AttentionQuery {
        q: &q,
        pos: tokens,
        blocks: &views,
    }];
    let (t_host, host_p) = best(a.reps, || attend_batch(&query, &g, chunk_blocks).remove(0));
    let copy_gbps = kv_bytes / t_copy / 1e9;
    let host_gbps = kv_bytes / t_host / 1e9;
    println!("\n| engine | KV bytes/s | baseline (same run) | baseline bytes/s | ratio |");
    println!("|---|---|---|---|---|");
    println!(
        "| host attention ({} threads) | {host_gbps:.2} GB/s | memcpy, {} threads (bytes copied) | {copy_gbps:.2} GB/s | {:.0}% |",
        rayon::current_num_threads(),
        rayon::current_num_threads(),
        100.0 * host_gbps / copy_gbps
    );

    // Disk tier: the same blocks in a block store, read back with and without attention.
    let mut cfg = BlockStoreConfig::new(&a.dir, (blocks * bpb.next_multiple_of(4096)) as u64, bpb);
    cfg.engine = a.io_engine.parse::<IoEngine>()?;
    cfg.queue_depth = a.queue_depth;
    let mut store = BlockStore::open(cfg)?;
    let slots: Vec<DiskSlot> = (0..blocks)
        .map(|_| store.alloc_slot())
        .collect::<Result<_, _>>()?;
    for (chunk_ids, chunk_slots) in ids.chunks(64).zip(slots.chunks(64)) {
        let items: Vec<(DiskSlot, &[u8])> = chunk_slots
            .iter()
            .zip(chunk_ids)
            .map(|(s, id)| (*s, &host.slot(*id)[..bpb]))
            .collect();
        store.write_blocks(&items)?;
    }
    let (t_read, _) = best(a.reps, || {
        store.read_blocks(&slots, |_, _| Ok::<(), StorageError>(()))
    });
    let (t_storage, disk_p) = best(a.reps, || {
        let mut acc = Partial::empty(g.n_heads, g.head_dim);
        let r = store.read_blocks(&slots, |i, bytes| {
            let f = f32_view(&bytes[..bpb]);
            let v = KvBlockView {
                k: (&f[..e]).into(),
                v: (&f[e..2 * e]).into(),
                start_pos: i * a.block_tokens,
                len: a.block_tokens,
            };
            let p = attend_partial(&q, tokens, std::slice::from_ref(&v), &g);
            acc.merge_in(p);
            Ok::<(), StorageError>(())
        });
        r.map(|()| acc)
    });
    let disk_p = disk_p?;
    let read_gbps = kv_bytes / t_read / 1e9;
    let storage_gbps = kv_bytes / t_storage / 1e9;
    println!(
        "| storage attention ({}, QD {}) | {storage_gbps:.2} GB/s | streaming reads of the same blocks | {read_gbps:.2} GB/s | {:.0}% |",
        store.engine_name(),
        a.queue_depth,
        100.0 * storage_gbps / read_gbps
    );
    let max_diff = host_p
        .o
        .iter()
        .zip(&disk_p.o)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    println!(
        "\nhost vs storage partials: max |Δo| = {max_diff:e} (must be ~1e-6: same math, different order)"
    );
    println!(
        "storage attention returned {} bytes of (o, lse) instead of {:.0} MB of KV",
        g.n_heads * (g.head_dim + 1) * 4,
        kv_bytes / 1e6
    );
    Ok(())
}
