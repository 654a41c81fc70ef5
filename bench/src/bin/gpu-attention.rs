//! Paged decode attention on the GPU, measured against the bandwidth of HBM in the same run.
//!
//! - **Attention**: KV bytes one decode step reads (`batch × context × 2 × kv_heads × head_dim ×
//!   2 B`, f16) divided by the GPU time of `decode_attention` (split kernel + merge, timed with
//!   CUDA events over many back-to-back steps; best of 3 trials). Consecutive steps read
//!   different blocks (the tables rotate over ≥ 512 MiB of the pool), so the L2 cache (50 MiB
//!   on an H100) never serves a step from the previous one.
//! - **Copy**: `memcpy_dtod` of 1 GiB, reported as bytes copied per second and as bytes read +
//!   written per second (twice that): attention only reads, so "r+w" is the HBM traffic a
//!   copy sustains and the fair ceiling; the ratio column divides by it.
//!
//! Geometry: Llama-3-8B (32 query heads, 8 KV heads, head_dim 128), f16 KV, blocks of 32 tokens,
//! block ids shuffled (paged). Combinations that do not fit in device memory are skipped.
//!
//! `cargo run --release -p strata-bench --bin gpu-attention` (needs an NVIDIA GPU; without one it
//! says why and exits with status 2).

use strata_kernels::cuda::{DeviceBlockTables, KvBlockShape};
use strata_kernels::testing::SplitMix;
use strata_kernels::{AttentionGeometry, Backend, CudaBackend, DType, KernelError};

const BATCHES: [usize; 4] = [1, 8, 32, 64];
const CONTEXTS: [usize; 3] = [4096, 32 * 1024, 128 * 1024];
const GIB: usize = 1 << 30;
/// The tables of consecutive steps rotate over at least this much KV.
const ROTATE_BYTES: usize = 512 << 20;

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu-attention: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let gpu = CudaBackend::new(0).map_err(|e| format!("no GPU: {e}"))?;
    let info = gpu.device_info().clone();
    println!("GPU: {info}; kernels {}", gpu.kernel_origin());
    let g = AttentionGeometry {
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        block_tokens: 32,
        scale: 1.0 / (128f32).sqrt(),
    };
    let shape = KvBlockShape {
        kv_heads: g.n_kv_heads,
        block_tokens: g.block_tokens,
        head_dim: g.head_dim,
    };
    let block_bytes = shape.block_elems() * DType::F16.size_bytes();
    let ke = |e: KernelError| e.to_string();

    let copy_ms = gpu.copy_time_ms(GIB, 10, 3).map_err(ke)?;
    let copied = GIB as f64 / (copy_ms * 1e-3) / 1e9;
    println!(
        "memcpy_dtod 1 GiB: {copy_ms:.3} ms = {copied:.0} GB/s copied = {:.0} GB/s read+written",
        2.0 * copied
    );

    // One pool for every combination: the largest step, or what fits next to 2 GiB of headroom.
    let (free, _) = gpu.memory_info().map_err(ke)?;
    let largest = BATCHES[3] * CONTEXTS[2] / g.block_tokens * block_bytes;
    let want = largest.max(ROTATE_BYTES * 2);
    let pool_bytes = want.min(free.saturating_sub(2 * GIB));
    let n_blocks = pool_bytes / block_bytes;
    let mut pool = gpu.kv_pool(DType::F16, shape, n_blocks).map_err(ke)?;
    let mut rng = SplitMix(0x5eed);
    let seed_blocks = 64.min(n_blocks);
    let data: Vec<f32> = (0..seed_blocks * shape.block_elems())
        .map(|_| rng.next_f32())
        .collect();
    gpu.kv_pool_write(&mut pool, 0, &data).map_err(ke)?;
    gpu.kv_pool_tile(&mut pool, seed_blocks).map_err(ke)?;
    gpu.synchronize().map_err(ke)?;
    println!(
        "KV pool: {n_blocks} blocks of {} KiB = {:.1} GiB (f16)",
        block_bytes >> 10,
        pool.bytes() as f64 / GIB as f64
    );

    println!();
    println!(
        "| batch | context | KV read / step | splits | time / step | attention GB/s | vs copy r+w | vs copied |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ctx in CONTEXTS {
        for batch in BATCHES {
            let blocks_per_seq = ctx / g.block_tokens;
            let step_blocks = batch * blocks_per_seq;
            let step_bytes = step_blocks * block_bytes;
            if step_blocks > n_blocks {
                println!(
                    "| {batch} | {ctx} | {:.2} GiB | | skipped: does not fit | | | |",
                    step_bytes as f64 / GIB as f64
                );
                continue;
            }
            let rotations = ROTATE_BYTES
                .div_ceil(step_bytes)
                .clamp(1, n_blocks / step_blocks);
            let tables = rotated_tables(
                &gpu,
                &mut rng,
                batch,
                blocks_per_seq,
                rotations,
                ctx,
                g.block_tokens,
            )
            .map_err(ke)?;
            let q: Vec<f32> = (0..batch * g.n_heads * g.head_dim)
                .map(|_| rng.next_f32())
                .collect();
            let q = gpu.tensor(batch, g.n_heads * g.head_dim, q).map_err(ke)?;
            let splits = gpu.decode_splits(&tables[0], &pool, &g);
            let steps = (4 * GIB).div_ceil(step_bytes).clamp(3 * rotations, 2000);
            // Warm-up: every table once.
            for t in &tables {
                gpu.decode_attention(&q, &pool, t, &g).map_err(ke)?;
            }
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let (ms, ()) = gpu
                    .time_ms(|| {
                        for i in 0..steps {
                            gpu.decode_attention(&q, &pool, &tables[i % tables.len()], &g)?;
                        }
                        Ok(())
                    })
                    .map_err(ke)?;
                best = best.min(ms / steps as f64);
            }
            let gbps = step_bytes as f64 / (best * 1e-3) / 1e9;
            println!(
                "| {batch} | {}K | {:.1} MiB | {splits} | {:.1} µs | {gbps:.0} | {:.0}% | {:.0}% |",
                ctx / 1024,
                step_bytes as f64 / (1 << 20) as f64,
                best * 1e3,
                100.0 * gbps / (2.0 * copied),
                100.0 * gbps / copied
            );
        }
    }
    Ok(())
}

/// `rotations` block tables for `batch` sequences of `ctx` tokens, each over its own shuffled
/// blocks of the pool.
fn rotated_tables(
    gpu: &CudaBackend,
    rng: &mut SplitMix,
    batch: usize,
    blocks_per_seq: usize,
    rotations: usize,
    ctx: usize,
    block_tokens: usize,
) -> Result<Vec<DeviceBlockTables>, KernelError> {
    let step = batch * blocks_per_seq;
    let mut ids: Vec<u32> = (0..(rotations * step) as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    ids.chunks_exact(step)
        .map(|r| {
            let tables: Vec<&[u32]> = r.chunks_exact(blocks_per_seq).collect();
            gpu.upload_block_tables(&tables, &vec![ctx; batch], block_tokens)
        })
        .collect()
}
