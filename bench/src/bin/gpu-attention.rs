//! Paged decode attention on the GPU, measured against the bandwidth of HBM in the same run.
//!
//! - **Attention**: KV bytes one decode step reads (`batch × context × 2 × kv_heads × head_dim ×
//!   2 B`, f16) divided by the GPU time of one `decode_attention` call, timed two ways:
//!   - **loop**: CUDA events around many back-to-back calls (best of 3 trials), what a decode
//!     step sees when the host enqueues ahead of the GPU. Also reported: the host's time to
//!     enqueue one call (wall clock of the loop / calls); when it exceeds the GPU time, the loop
//!     is host-bound.
//!   - **single call**: events around one call on an idle stream, the stream synchronised before
//!     each (median of `SINGLE_CALLS`): the host's enqueue cost plus the GPU's time.
//!
//!   Consecutive calls read different blocks (the tables rotate over ≥ 512 MiB of the pool), so
//!   the L2 cache (50 MiB on an H100) never serves a call from the previous one.
//! - **Copy**: `memcpy_dtod` of 1 GiB, reported as bytes copied per second and as bytes read +
//!   written per second (twice that): attention only reads, so "r+w" is the HBM traffic a
//!   copy sustains and the fair ceiling; the ratio columns divide by it.
//! - **Floor**: the same two timings of a call that reads one block: the fixed cost per call.
//! - **Same-size floors** (diagnostics beside the target, never instead of it), for every cell of
//!   at most `FLOOR_MAX_BYTES`, loop-timed like the attention over the same rotation:
//!   - **read**: a pure streaming-read kernel over exactly the cell's bytes (16-byte loads, a
//!     grid that fills every SM), the fastest any kernel that reads those bytes once per call
//!     could be;
//!   - **copy**: a device-to-device copy of the cell's bytes, its r+w rate against the 1 GiB one.
//! - **Splits sweep**: loop time per call of the small cells at forced split counts
//!   (`decode_attention_with_splits`), the one `decode_splits` picks marked `*`.
//!
//! Geometry: Llama-3-8B (32 query heads, 8 KV heads unless `--kv-heads` says otherwise, head_dim
//! 128), f16 KV, blocks of 32 tokens, block ids shuffled (paged). Combinations that do not fit in device memory are skipped.
//!
//! `cargo run --release -p strata-bench --bin gpu-attention [-- --cells 8x4096,1x32768]` (needs an
//! NVIDIA GPU; without one it says why and exits with status 2). `--cells` keeps only the named
//! batch × context cells (and skips the per-call floor), for quick comparisons of two builds.

use clap::Parser;
use std::time::Instant;
use strata_kernels::cuda::{DeviceBlockTables, KvBlockShape, KvPool};
use strata_kernels::testing::SplitMix;
use strata_kernels::{AttentionGeometry, Backend, CudaBackend, CudaTensor, DType, KernelError};

const BATCHES: [usize; 4] = [1, 8, 32, 64];
const CONTEXTS: [usize; 3] = [4096, 32 * 1024, 128 * 1024];
const GIB: usize = 1 << 30;
/// The tables of consecutive steps rotate over at least this much KV.
const ROTATE_BYTES: usize = 512 << 20;
/// Isolated calls timed per cell (their median is reported).
const SINGLE_CALLS: usize = 25;
/// (batch, context) cells of the splits sweep, and the split counts it tries.
const SWEEP_CELLS: [(usize, usize); 4] = [(1, 4096), (8, 4096), (1, 32 * 1024), (1, 128 * 1024)];
const SWEEP_SPLITS: [usize; 10] = [1, 2, 4, 8, 16, 32, 33, 64, 128, 256];
/// Cells up to this size get the same-size read and copy floors.
const FLOOR_MAX_BYTES: usize = GIB;

#[derive(Parser)]
#[command(about = "Paged decode attention's HBM bandwidth against a device copy in the same run")]
struct Args {
    /// Only these cells, as BATCHxCONTEXT (e.g. `8x4096,1x32768`); by default every batch of
    /// 1, 8, 32, 64 at every context of 4K, 32K, 128K, and the per-call floor.
    #[arg(long, value_delimiter = ',', value_parser = parse_cell)]
    cells: Vec<(usize, usize)>,
    /// KV heads beside the 32 query heads: 8 is Llama-3-8B (groups of 4), 32 multi-head
    /// attention (OPT), 4 groups of 8.
    #[arg(long, default_value_t = 8, value_parser = parse_kv_heads)]
    kv_heads: usize,
}

fn parse_kv_heads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 && 32 % n == 0 => Ok(n),
        _ => Err(format!(
            "`{s}`: must divide the 32 query heads (1, 2, 4, 8, 16 or 32)"
        )),
    }
}

fn parse_cell(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{s}`: expected BATCHxCONTEXT, e.g. 8x4096");
    let (b, c) = s.split_once('x').ok_or_else(bad)?;
    let (b, c): (usize, usize) = (b.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?);
    if b == 0 || c == 0 || c % 32 != 0 {
        return Err(format!(
            "`{s}`: batch and context must be positive, context a multiple of 32"
        ));
    }
    Ok((b, c))
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args.cells, args.kv_heads) {
        eprintln!("gpu-attention: {e}");
        std::process::exit(2);
    }
}

fn run(only: &[(usize, usize)], kv_heads: usize) -> Result<(), String> {
    let gpu = CudaBackend::new(0).map_err(|e| format!("no GPU: {e}"))?;
    let info = gpu.device_info().clone();
    println!("GPU: {info}; kernels {}", gpu.kernel_origin());
    println!(
        "geometry: 32 query heads, {kv_heads} KV heads, head_dim 128, f16 KV, blocks of 32 tokens"
    );
    let g = AttentionGeometry {
        n_heads: 32,
        n_kv_heads: kv_heads,
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
    let cells: Vec<(usize, usize)> = if only.is_empty() {
        CONTEXTS
            .iter()
            .flat_map(|&ctx| BATCHES.iter().map(move |&batch| (batch, ctx)))
            .collect()
    } else {
        only.to_vec()
    };
    let largest = cells
        .iter()
        .map(|&(batch, ctx)| batch * ctx.div_ceil(g.block_tokens) * block_bytes)
        .max()
        .unwrap_or(0);
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

    let rw = 2.0 * copied;
    let pct = |bytes: usize, ms: f64| 100.0 * bytes as f64 / (ms * 1e-3) / 1e9 / rw;

    if only.is_empty() {
        // The per-call floor: a call that reads almost nothing (one sequence of one block).
        let tiny = [gpu
            .upload_block_tables(&[[0u32]], &[g.block_tokens], g.block_tokens)
            .map_err(ke)?];
        let q1 = gpu
            .tensor(1, g.n_heads * g.head_dim, vec![0.5; g.n_heads * g.head_dim])
            .map_err(ke)?;
        let floor = Step {
            gpu: &gpu,
            q: &q1,
            pool: &pool,
            tables: &tiny,
            g: &g,
        };
        floor.run_loop(10, None).map_err(ke)?;
        let (floor_ms, floor_host_ms) = floor.time_loop(1000, None, 3).map_err(ke)?;
        let floor_single_ms = floor.time_single(SINGLE_CALLS).map_err(ke)?;
        println!(
            "per-call floor (batch 1, {} tokens, 1 split): loop {:.1} µs / call (host enqueue {:.1} \
             µs), single call {:.1} µs",
            g.block_tokens,
            floor_ms * 1e3,
            floor_host_ms * 1e3,
            floor_single_ms * 1e3
        );
    }
    println!();
    println!(
        "| batch | context | KV read / step | splits | loop: time / step | loop GB/s | loop vs copy \
         r+w | host enqueue / call | single call | single vs copy r+w | pure read, same bytes | \
         copy, same bytes (r+w vs 1 GiB copy) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut sweeps = Vec::new();
    let mut floors = std::collections::BTreeMap::new();
    for &(batch, ctx) in &cells {
        let blocks_per_seq = ctx / g.block_tokens;
        let step_blocks = batch * blocks_per_seq;
        let step_bytes = step_blocks * block_bytes;
        if step_blocks > n_blocks {
            println!(
                "| {batch} | {}K | {:.2} GiB | | skipped: does not fit | | | | | | | |",
                ctx / 1024,
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
        let step = Step {
            gpu: &gpu,
            q: &q,
            pool: &pool,
            tables: &tables,
            g: &g,
        };
        // Warm-up: every table once.
        step.run_loop(tables.len(), None).map_err(ke)?;
        let (loop_ms, host_ms) = step.time_loop(steps, None, 3).map_err(ke)?;
        let single_ms = step.time_single(SINGLE_CALLS).map_err(ke)?;
        let gbps = step_bytes as f64 / (loop_ms * 1e-3) / 1e9;
        let floor_cols = if step_bytes <= FLOOR_MAX_BYTES {
            let (read, copy) = match floors.get(&step_bytes) {
                Some(&f) => f,
                None => {
                    let f = same_size_floors(&gpu, step_bytes, steps).map_err(ke)?;
                    floors.insert(step_bytes, f);
                    f
                }
            };
            format!(
                "{:.1} µs ({:.0}%) | {:.1} µs ({:.0}%)",
                read * 1e3,
                pct(step_bytes, read),
                copy * 1e3,
                pct(2 * step_bytes, copy)
            )
        } else {
            "– | –".to_string()
        };
        println!(
            "| {batch} | {}K | {:.1} MiB | {splits} | {:.1} µs | {gbps:.0} | {:.0}% | {:.1} µs \
             | {:.1} µs | {:.0}% | {floor_cols} |",
            ctx / 1024,
            step_bytes as f64 / (1 << 20) as f64,
            loop_ms * 1e3,
            pct(step_bytes, loop_ms),
            host_ms * 1e3,
            single_ms * 1e3,
            pct(step_bytes, single_ms),
        );
        if SWEEP_CELLS.contains(&(batch, ctx)) {
            let mut row = format!("| {batch} × {}K |", ctx / 1024);
            for s in SWEEP_SPLITS {
                let (ms, _) = step.time_loop(steps, Some(s), 2).map_err(ke)?;
                let mark = if s == splits { "*" } else { "" };
                row += &format!(" {:.1}{mark} ({:.0}%) |", ms * 1e3, pct(step_bytes, ms));
            }
            sweeps.push(row);
        }
    }
    println!();
    println!("Splits sweep: loop time / call in µs (vs copy r+w); * = decode_splits' choice");
    println!();
    let heads: Vec<String> = SWEEP_SPLITS.iter().map(|s| s.to_string()).collect();
    println!("| batch × context | {} |", heads.join(" | "));
    println!("|---|{}", "---:|".repeat(SWEEP_SPLITS.len()));
    for row in sweeps {
        println!("{row}");
    }
    Ok(())
}

/// Milliseconds per pure read and per device-to-device copy of `bytes`, `reps` of each timed
/// back to back over a rotation of at least `ROTATE_BYTES`, best of 3.
fn same_size_floors(
    gpu: &CudaBackend,
    bytes: usize,
    reps: usize,
) -> Result<(f64, f64), KernelError> {
    let span = bytes.max(ROTATE_BYTES);
    let read = gpu.read_time_ms(bytes, span, reps, 3)?;
    let copy = gpu.copy_span_time_ms(bytes, span, reps, 3)?;
    Ok((read, copy))
}

/// One benchmark cell: decode calls over rotating tables.
struct Step<'a> {
    gpu: &'a CudaBackend,
    q: &'a CudaTensor,
    pool: &'a KvPool,
    tables: &'a [DeviceBlockTables],
    g: &'a AttentionGeometry,
}

impl Step<'_> {
    /// Call `i` (over table `i % tables`), with the default or a forced split count.
    fn call(&self, i: usize, splits: Option<usize>) -> Result<(), KernelError> {
        let t = &self.tables[i % self.tables.len()];
        match splits {
            None => self.gpu.decode_attention(self.q, self.pool, t, self.g),
            Some(s) => self
                .gpu
                .decode_attention_with_splits(self.q, self.pool, t, self.g, s),
        }
        .map(drop)
    }

    fn run_loop(&self, calls: usize, splits: Option<usize>) -> Result<(), KernelError> {
        (0..calls).try_for_each(|i| self.call(i, splits))
    }

    /// `calls` back-to-back calls between two events, best of `trials`: (GPU ms per call, host
    /// ms to enqueue one call).
    fn time_loop(
        &self,
        calls: usize,
        splits: Option<usize>,
        trials: usize,
    ) -> Result<(f64, f64), KernelError> {
        let (mut best, mut best_host) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..trials {
            let mut host = 0.0;
            let (ms, ()) = self.gpu.time_ms(|| {
                let t0 = Instant::now();
                let r = self.run_loop(calls, splits);
                host = t0.elapsed().as_secs_f64() * 1e3;
                r
            })?;
            best = best.min(ms / calls as f64);
            best_host = best_host.min(host / calls as f64);
        }
        Ok((best, best_host))
    }

    /// Median ms of `n` isolated calls, each timed by events on a synchronised stream.
    fn time_single(&self, n: usize) -> Result<f64, KernelError> {
        let mut ms = Vec::with_capacity(n);
        for i in 0..n {
            self.gpu.synchronize()?;
            ms.push(self.gpu.time_ms(|| self.call(i, None))?.0);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[n / 2])
    }
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
