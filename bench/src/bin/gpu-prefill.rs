//! `CudaBackend::prefill_attention` on Llama-3-8B's attention geometry, to line up against
//! `bench/torch/sdpa.py` (PyTorch `scaled_dot_product_attention(is_causal=True)` on the flash
//! backend, same shapes, same table and JSON).
//!
//! - **What is timed**: one `prefill_attention` call: every row of `batch` prompts of `seq`
//!   tokens (positions 0..seq) attends causally over its prompt's KV, paged in a pool of
//!   `--block-tokens`-token blocks (block ids shuffled); f32 `q: [batch·seq, 32·128]`, f32
//!   outputs `o` (same shape) and `lse: [batch·seq, 32]`. Output allocation is stream-ordered
//!   and included, as in the forward pass (a hit in the stream's memory pool: see `median_ms`);
//!   the upload of the tables and rows (once per forward call, shared by every layer) is not.
//! - **How**: CUDA events around `--calls` back-to-back calls; a rep's time per call is the
//!   events' span divided by the calls; the median of `--reps` reps after `--warmup` untimed
//!   ones.
//! - **FLOPs**: causal, the FlashAttention convention: `4 · heads · head_dim · Σ visible keys`
//!   (`Σ = batch · seq (seq + 1) / 2`), i.e. QKᵀ and PV over the keys each row sees.
//! - **Geometry**: 32 query heads, 8 KV heads, head_dim 128; bf16 and f16 pools; shapes
//!   (batch, seq) = (64, 512), (16, 2048), (4, 8192), (1, 16384).
//!
//! `gpu-prefill [--reps 10] [--warmup 2] [--calls 3] [--shapes 64:512,16:2048,4:8192,1:16384]
//! [--dtypes bf16,f16] [--kernels auto] [--block-tokens 32] [--json FILE]` (`--kernels` takes
//! `auto`, `mma64`, `mma128`, `wgmma64`, `wgmma64k32` and `wgmma128` (Hopper), `generic`;
//! needs an NVIDIA GPU; without one it says why and exits with status 2).

use std::fmt::Write as _;

use clap::Parser;
use rayon::prelude::*;
use strata_kernels::cuda::{DevicePartial, KvBlockShape, KvPool, PrefillKernel, SeqBlocks};
use strata_kernels::testing::SplitMix;
use strata_kernels::{Backend, CudaBackend, DType, KernelError};

const N_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Parser)]
struct Args {
    /// Timed repetitions per (dtype, shape, kernel); the median is reported.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Back-to-back calls per rep.
    #[arg(long, default_value_t = 3)]
    calls: usize,
    /// `batch:seq` pairs, comma-separated.
    #[arg(
        long,
        default_value = "64:512,16:2048,4:8192,1:16384",
        value_delimiter = ','
    )]
    shapes: Vec<String>,
    /// Pool dtypes, comma-separated (bf16, f16).
    #[arg(long, default_value = "bf16,f16", value_delimiter = ',')]
    dtypes: Vec<String>,
    /// Kernels, comma-separated: auto, mma64, mma128, wgmma64, wgmma64k32, wgmma128 (the wgmma
    /// kernels on Hopper only), generic.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    kernels: Vec<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 32)]
    block_tokens: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Row {
    dtype: &'static str,
    batch: usize,
    seq: usize,
    kernel: String,
    ms: f64,
    tflops: f64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("gpu-prefill: {e}");
        std::process::exit(2);
    }
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (b, n) = s
        .split_once(':')
        .ok_or_else(|| format!("shape `{s}`: expected batch:seq"))?;
    let p = |x: &str| x.parse::<usize>().map_err(|e| format!("shape `{s}`: {e}"));
    Ok((p(b)?, p(n)?))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        _ => Err(format!("dtype `{s}`: expected bf16, f16 or f32")),
    }
}

fn parse_kernel(s: &str) -> Result<PrefillKernel, String> {
    match s {
        "auto" => Ok(PrefillKernel::Auto),
        "mma64" => Ok(PrefillKernel::Mma64),
        "mma128" => Ok(PrefillKernel::Mma128),
        "wgmma64" => Ok(PrefillKernel::Wgmma64),
        "wgmma64k32" => Ok(PrefillKernel::Wgmma64K32),
        "wgmma128" => Ok(PrefillKernel::Wgmma128),
        "generic" => Ok(PrefillKernel::Generic),
        _ => Err(format!(
            "kernel `{s}`: expected auto, mma64, mma128, wgmma64, wgmma64k32, wgmma128 or generic"
        )),
    }
}

fn run(a: &Args) -> Result<(), String> {
    let shapes = a
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>, _>>()?;
    let dtypes = a
        .dtypes
        .iter()
        .map(|s| parse_dtype(s))
        .collect::<Result<Vec<_>, _>>()?;
    let kernels = a
        .kernels
        .iter()
        .map(|s| parse_kernel(s))
        .collect::<Result<Vec<_>, _>>()?;
    let gpu = CudaBackend::new(0).map_err(|e| format!("no GPU: {e}"))?;
    let ke = |e: KernelError| e.to_string();
    let device = gpu.device_info().to_string();
    println!("GPU: {device}; kernels {}", gpu.kernel_origin());
    println!(
        "prefill_attention: {N_HEADS} q heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, \
         blocks of {} tokens; f32 q/o; median of {} reps x {} calls ({} warm-up)",
        a.block_tokens, a.reps, a.calls, a.warmup
    );
    println!();
    println!("| dtype | batch | seq | kernel | ms | TFLOP/s |");
    println!("|---|---:|---:|---|---:|---:|");
    let mut rows = Vec::new();
    let bt = a.block_tokens;
    for &(batch, seq) in &shapes {
        let n_rows = batch * seq;
        let (free, _) = gpu.memory_info().map_err(ke)?;
        // q and o (f32), the pool (2 B), 1 GiB to spare.
        let need = 2 * n_rows * N_HEADS * HEAD_DIM * 4
            + batch * seq.div_ceil(bt) * bt * 2 * KV_HEADS * HEAD_DIM * 2
            + (1 << 30);
        if need > free {
            println!(
                "| | {batch} | {seq} | | skipped: needs {:.0} MiB, {:.0} free | |",
                need as f64 / MIB,
                free as f64 / MIB
            );
            continue;
        }
        let q = gpu
            .tensor(
                n_rows,
                N_HEADS * HEAD_DIM,
                random_vec(n_rows * N_HEADS * HEAD_DIM, (batch * seq) as u64),
            )
            .map_err(ke)?;
        let query_rows: Vec<(u32, u32)> = (0..batch as u32)
            .flat_map(|b| (0..seq as u32).map(move |p| (b, p)))
            .collect();
        let dev_rows = gpu.upload_query_rows(&query_rows).map_err(ke)?;
        for &dtype in &dtypes {
            let (pool, tables) = paged_pool(&gpu, dtype, batch, seq, bt).map_err(ke)?;
            let dev_tables = gpu.upload_paged_tables(&pool, &tables).map_err(ke)?;
            for &kernel in &kernels {
                let call = || {
                    gpu.prefill_attention_with(
                        &pool,
                        &dev_tables,
                        &q,
                        &dev_rows,
                        N_HEADS,
                        1.0 / (HEAD_DIM as f32).sqrt(),
                        kernel,
                    )
                };
                let ms = median_ms(&gpu, call, a).map_err(ke)?;
                let visible = (batch * seq * (seq + 1) / 2) as f64;
                let flops = 4.0 * (N_HEADS * HEAD_DIM) as f64 * visible;
                let label = match kernel {
                    PrefillKernel::Auto => format!(
                        "auto ({})",
                        kernel_name(gpu.prefill_kernel(&pool, &dev_rows, N_HEADS))
                    ),
                    k => kernel_name(k).to_string(),
                };
                let row = Row {
                    dtype: dtype.name(),
                    batch,
                    seq,
                    kernel: label,
                    ms,
                    tflops: flops / (ms * 1e-3) / 1e12,
                };
                println!(
                    "| {} | {batch} | {seq} | {} | {:.3} | {:.1} |",
                    row.dtype, row.kernel, row.ms, row.tflops
                );
                rows.push(row);
            }
        }
    }
    if let Some(path) = &a.json {
        std::fs::write(path, to_json(&device, a, &rows))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

fn kernel_name(k: PrefillKernel) -> &'static str {
    match k {
        PrefillKernel::Auto => "auto",
        PrefillKernel::Mma64 => "mma64",
        PrefillKernel::Mma128 => "mma128",
        PrefillKernel::Wgmma64 => "wgmma64",
        PrefillKernel::Wgmma64K32 => "wgmma64k32",
        PrefillKernel::Wgmma128 => "wgmma128",
        PrefillKernel::Generic => "generic",
    }
}

/// A pool holding `batch` prompts of `seq` tokens in shuffled blocks (random values, filled by
/// tiling 64 uploaded blocks), and each prompt's table.
fn paged_pool(
    gpu: &CudaBackend,
    dtype: DType,
    batch: usize,
    seq: usize,
    bt: usize,
) -> Result<(KvPool, Vec<SeqBlocks>), KernelError> {
    let shape = KvBlockShape {
        kv_heads: KV_HEADS,
        block_tokens: bt,
        head_dim: HEAD_DIM,
    };
    let per_seq = seq.div_ceil(bt);
    let n_blocks = batch * per_seq;
    let mut pool = gpu.kv_pool(dtype, shape, n_blocks)?;
    let seed_blocks = 64.min(n_blocks);
    gpu.kv_pool_write(
        &mut pool,
        0,
        &random_vec(seed_blocks * shape.block_elems(), 0x5eed),
    )?;
    gpu.kv_pool_tile(&mut pool, seed_blocks)?;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    let mut rng = SplitMix(0x7ab1e5);
    rng.shuffle(&mut ids);
    let tables = ids
        .chunks_exact(per_seq)
        .map(|c| SeqBlocks::contiguous(c, seq, bt))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pool, tables))
}

/// Median milliseconds per call: each rep times `calls` calls between two CUDA events.
///
/// The last call's outputs are kept until just before the next call, which then reuses their
/// memory from the stream-ordered pool. Dropped earlier, they would sit free in the pool at the
/// rep's synchronisation, which returns free memory to the driver, and the next rep's first call
/// would time the driver mapping fresh memory (hundreds of MiB of outputs) rather than the kernel.
fn median_ms(
    gpu: &CudaBackend,
    call: impl Fn() -> Result<DevicePartial, KernelError>,
    a: &Args,
) -> Result<f64, KernelError> {
    let calls = a.calls.max(1);
    let mut held: Option<DevicePartial> = None;
    let mut rep = || {
        gpu.time_ms(|| {
            for _ in 0..calls {
                drop(held.take());
                held = Some(call()?);
            }
            Ok(())
        })
    };
    for _ in 0..a.warmup {
        rep()?;
    }
    let mut times = Vec::with_capacity(a.reps.max(1));
    for _ in 0..a.reps.max(1) {
        times.push(rep()?.0 / calls as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Uniform values in [-1, 1), generated in parallel chunks of a seeded stream.
fn random_vec(len: usize, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let mut v = vec![0.0f32; len];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = SplitMix(seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64));
        c.iter_mut().for_each(|x| *x = rng.next_f32());
    });
    v
}

/// The schema `bench/torch/sdpa.py` writes too.
fn to_json(device: &str, a: &Args, rows: &[Row]) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut s = String::new();
    let _ = write!(
        s,
        "{{\n  \"tool\": \"strata\",\n  \"device\": \"{}\",\n  \"heads\": {N_HEADS},\n  \
         \"kv_heads\": {KV_HEADS},\n  \"head_dim\": {HEAD_DIM},\n  \"block_tokens\": {},\n  \
         \"q\": \"f32\",\n  \"o\": \"f32\",\n  \"reps\": {},\n  \"warmup\": {},\n  \
         \"results\": [",
        esc(device),
        a.block_tokens,
        a.reps,
        a.warmup
    );
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            s,
            "{}\n    {{\"dtype\": \"{}\", \"batch\": {}, \"seq\": {}, \"kernel\": \"{}\", \
             \"ms\": {:.6}, \"tflops\": {:.2}}}",
            if i == 0 { "" } else { "," },
            r.dtype,
            r.batch,
            r.seq,
            esc(&r.kernel),
            r.ms,
            r.tflops
        );
    }
    s.push_str("\n  ]\n}\n");
    s
}
