//! `CudaBackend::linear` on Llama-3-8B's projection shapes, in both GEMM precision modes and on
//! both GEMM libraries, to line up against `bench/torch/matmul.py` (PyTorch bf16 `x @ w.T`, same
//! shapes, same table and JSON).
//!
//! - **What is timed**: one `Backend::linear` call, f32 activation `x: [m, k]`, bf16 weight
//!   `w: [n, k]`, f32 output `[m, n]`: for m > 8 the activation conversion (split or round, unless
//!   the input is shared) and the GEMM call(s); for m ≤ 8 the GEMV kernel (the same in every mode
//!   and library). Output allocation is stream-ordered and included, as in the forward pass.
//! - **GEMM libraries** (`--gemm`, `gemmex,lt` by default, measured one after the other in that
//!   order for each shape, m and mode, in the same process): `gemmex`, cuBLAS GemmEx with
//!   `CUBLAS_GEMM_DEFAULT` (what `STRATA_GEMM=gemmex` selects), and `lt` (strata's default): for
//!   m of at least 512, the fastest of cuBLASLt's candidate algorithms and GemmEx, timed on the
//!   problem's first call (which falls in the warm-up reps; with `--warmup 0` it lands in the
//!   first timed rep) or restored from the machine's tuning record; up to 16 rows, cuBLASLt
//!   with its heuristic's first pick, untimed; between, GemmEx. Without libcublasLt, `lt` is
//!   left out, with a note.
//! - **How**: CUDA events around `calls` back-to-back calls; a rep's time per call is the
//!   events' span divided by `calls`; the table shows the median of `--reps` reps after
//!   `--warmup` untimed ones. Calls rotate over enough copies of the weight (≥ 256 MiB together)
//!   that the 50 MiB L2 cache never serves one call's weight from the previous call.
//! - **Columns**: the library (`gemm`: `lt` or `gemmex`, empty for the GEMV); ms per call;
//!   TFLOP/s = 2·m·n·k / time; for m ≤ 8, GB/s of weight bytes read (n·k·2 B / time; the
//!   activation and output are negligible there); on `lt` rows when both libraries run, `Lt vs
//!   GemmEx` = GemmEx ms / Lt ms (above 1: cuBLASLt faster) and `Lt algorithm`, what the tuning
//!   picked (its rank among the heuristic's candidates, and its time against the heuristic's first
//!   pick as the tuning measured them) or why the problem fell back to GemmEx. The JSON rows carry
//!   the same as `gemm`, `lt_vs_gemmex`, `lt_algorithm` and `lt_tuned_vs_first_pick`.
//! - **Modes**: `split` (the default: activation split into bf16 hi + lo, two GEMMs) and
//!   `rounded` (activation rounded once to bf16, one GEMM; what PyTorch's bf16 matmul computes,
//!   with its activation already in bf16).
//!
//! `gpu-gemm [--reps 20] [--warmup 3] [--m 1,16,64,512,2048,16384] [--gemm gemmex,lt]
//! [--json FILE]` (needs an NVIDIA GPU; without one it says why and exits with status 2).

use std::fmt::Write as _;

use clap::Parser;
use rayon::prelude::*;
use strata_kernels::cuda::GemmChoice;
use strata_kernels::testing::SplitMix;
use strata_kernels::{
    Backend, CudaBackend, CudaTensor, CudaWeight, DType, GemmBackend, GemmPrecision, HostWeight,
    KernelError, WeightData,
};

/// Llama-3-8B's linear layers: (name, n = out features, k = in features).
const SHAPES: [(&str, usize, usize); 5] = [
    ("q/o", 4096, 4096),
    ("k/v", 1024, 4096),
    ("gate/up", 14336, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
];
/// Rows up to which `linear` uses the GEMV kernel (and the table reports weight GB/s).
const DECODE_ROWS: usize = 8;
/// Weight copies rotate over at least this many bytes, several times the L2 cache.
const ROTATE_BYTES: usize = 256 << 20;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Parser)]
struct Args {
    /// Timed repetitions per (shape, m, mode); the median is reported.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Activation rows, comma-separated.
    #[arg(long, default_value = "1,16,64,512,2048,16384", value_delimiter = ',')]
    m: Vec<usize>,
    /// GEMM libraries for m > 8, comma-separated, timed in this order: `gemmex` (cuBLAS
    /// GemmEx, the default), `lt` (cuBLASLt autotuned against GemmEx from 512 rows, its
    /// heuristic's first pick up to 16, GemmEx between).
    #[arg(long, default_value = "gemmex,lt", value_delimiter = ',',
          value_parser = ["gemmex", "lt"])]
    gemm: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Row {
    name: &'static str,
    n: usize,
    k: usize,
    m: usize,
    mode: &'static str,
    /// `lt` or `gemmex`; `None` for the GEMV (m ≤ 8).
    gemm: Option<&'static str>,
    ms: f64,
    tflops: f64,
    /// Weight bytes read per second, for m ≤ 8.
    gbps: Option<f64>,
    /// On `lt` rows after a `gemmex` one: GemmEx ms / Lt ms.
    lt_vs_gemmex: Option<f64>,
    /// On `lt` rows: what the tuning chose.
    lt_choice: Option<GemmChoice>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("gpu-gemm: {e}");
        std::process::exit(2);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let gpu = CudaBackend::new(0).map_err(|e| format!("no GPU: {e}"))?;
    let ke = |e: KernelError| e.to_string();
    let device = gpu.device_info().to_string();
    println!("GPU: {device}; kernels {}", gpu.kernel_origin());
    println!(
        "linear: f32 x [m, k] · bf16 w [n, k]ᵀ → f32 [m, n]; median of {} reps ({} warm-up)",
        a.reps, a.warmup
    );
    let libraries = libraries(&gpu, &a.gemm);
    let names: Vec<&str> = libraries.iter().map(|b| b.name()).collect();
    println!("GEMM libraries (m > 8): {}", names.join(", "));
    println!();
    println!(
        "| shape | n | k | m | mode | gemm | ms | TFLOP/s | weight GB/s | Lt vs GemmEx | \
         Lt algorithm |"
    );
    println!("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    let mut seed = 0x5eed_u64;
    for (name, n, k) in SHAPES {
        seed += 1;
        let w = random_weight(n, k, seed);
        let copies = ROTATE_BYTES.div_ceil(w.size_bytes()).clamp(1, 64);
        let ws = (0..copies)
            .map(|_| gpu.upload_weight(w.clone()))
            .collect::<Result<Vec<CudaWeight>, _>>()
            .map_err(ke)?;
        drop(w);
        for &m in &a.m {
            let (free, _) = gpu.memory_info().map_err(ke)?;
            // x (f32) + hi/lo (bf16) + out (f32), with 1 GiB to spare.
            let need = m * k * (4 + 2 + 2) + m * n * 4 + (1 << 30);
            if need > free {
                println!(
                    "| {name} | {n} | {k} | {m} | | | skipped: needs {:.0} MiB, {:.0} free \
                     | | | | |",
                    need as f64 / MIB,
                    free as f64 / MIB
                );
                continue;
            }
            let mut x = gpu
                .tensor(m, k, random_vec(m * k, seed ^ m as u64))
                .map_err(ke)?;
            // (mode, label, convert the input on every call). "rounded, shared input" is what
            // the second and third projections of one input (k and v after q; up after gate)
            // pay: the converted operand is cached on the tensor.
            let modes: &[(GemmPrecision, &str, bool)] = if m <= DECODE_ROWS {
                // One GEMV path for both modes: time it once.
                &[(GemmPrecision::Split, "gemv", true)]
            } else {
                &[
                    (GemmPrecision::Split, "split", true),
                    (GemmPrecision::Rounded, "rounded", true),
                    (GemmPrecision::Rounded, "rounded, shared input", false),
                ]
            };
            let gemv = m <= DECODE_ROWS;
            // The GEMV is the same kernel under either library: time it once.
            let libs: &[GemmBackend] = if gemv {
                &[GemmBackend::GemmEx]
            } else {
                &libraries
            };
            for &(mode, label, convert) in modes {
                gpu.set_gemm_precision(mode);
                let mut measured = Vec::new();
                for &lib in libs {
                    gpu.set_gemm_backend(lib);
                    let ms = median_ms(&gpu, &mut x, &ws, a.warmup, a.reps, convert).map_err(ke)?;
                    let is_lt = !gemv && lib == GemmBackend::LtAutotuned;
                    let flops = 2.0 * (m * n * k) as f64;
                    let row = Row {
                        name,
                        n,
                        k,
                        m,
                        mode: label,
                        gemm: (!gemv).then_some(lib.name()),
                        ms,
                        tflops: flops / (ms * 1e-3) / 1e12,
                        gbps: gemv.then(|| (n * k * 2) as f64 / (ms * 1e-3) / 1e9),
                        lt_vs_gemmex: None,
                        lt_choice: is_lt.then(|| lt_choice(&gpu, m, n, k, mode)).flatten(),
                    };
                    measured.push(row);
                }
                let gemm_ex_ms = measured
                    .iter()
                    .find(|r| r.gemm == Some(GemmBackend::GemmEx.name()))
                    .map(|r| r.ms);
                for mut row in measured {
                    if row.gemm == Some(GemmBackend::LtAutotuned.name()) {
                        row.lt_vs_gemmex = gemm_ex_ms.map(|g| g / row.ms);
                    }
                    print_row(&row);
                    rows.push(row);
                }
            }
            gpu.set_gemm_precision(GemmPrecision::Split);
        }
    }
    if let Some(path) = &a.json {
        let json = to_json(&device, a, &libraries, gpu.lt_unavailable(), &rows);
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// The libraries `--gemm` names that this backend can run, in order; `lt` is dropped, with a
/// note, where cuBLASLt is unavailable.
fn libraries(gpu: &CudaBackend, names: &[String]) -> Vec<GemmBackend> {
    let mut libs: Vec<GemmBackend> = Vec::new();
    for name in names {
        let lib = match name.as_str() {
            "lt" => GemmBackend::LtAutotuned,
            _ => GemmBackend::GemmEx,
        };
        if lib == GemmBackend::LtAutotuned
            && let Some(why) = gpu.lt_unavailable()
        {
            println!("note: cuBLASLt unavailable ({why}); timing GemmEx only");
            continue;
        }
        if !libs.contains(&lib) {
            libs.push(lib);
        }
    }
    if libs.is_empty() {
        libs.push(GemmBackend::GemmEx);
    }
    libs
}

/// What cuBLASLt's tuning chose for this problem (bf16), once it has run.
fn lt_choice(
    gpu: &CudaBackend,
    m: usize,
    n: usize,
    k: usize,
    mode: GemmPrecision,
) -> Option<GemmChoice> {
    gpu.gemm_tunings()
        .into_iter()
        .find(|t| (t.m, t.n, t.k, t.dtype, t.precision) == (m, n, k, DType::BF16, mode))
        .map(|t| t.choice)
}

/// The tuned algorithm's time against the heuristic's first pick, as the tuning measured them
/// (above 1: tuning found a faster one).
fn tuned_vs_first_pick(c: &GemmChoice) -> Option<f64> {
    match c {
        GemmChoice::Lt {
            ms,
            first_ms: Some(first),
            ..
        } if *ms > 0.0 => Some(first / ms),
        _ => None,
    }
}

fn print_row(r: &Row) {
    let algorithm = r
        .lt_choice
        .as_ref()
        .map(|c| match tuned_vs_first_pick(c) {
            Some(x) => format!("{c} ({x:.2}× first pick)"),
            None => c.to_string(),
        })
        .unwrap_or_default();
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.4} | {:.1} | {} | {} | {algorithm} |",
        r.name,
        r.n,
        r.k,
        r.m,
        r.mode,
        r.gemm.unwrap_or_default(),
        r.ms,
        r.tflops,
        r.gbps.map(|g| format!("{g:.0}")).unwrap_or_default(),
        r.lt_vs_gemmex
            .map(|x| format!("{x:.3}×"))
            .unwrap_or_default(),
    );
}

/// Median milliseconds per `linear` call: each rep times one call per weight copy (at least 4
/// calls) between two CUDA events. With `convert`, every call converts `x` again (its cached
/// operands are dropped first), as the first projection of a fresh activation does.
fn median_ms(
    gpu: &CudaBackend,
    x: &mut CudaTensor,
    ws: &[CudaWeight],
    warmup: usize,
    reps: usize,
    convert: bool,
) -> Result<f64, KernelError> {
    let calls = ws.len().max(4);
    let mut rep = || {
        gpu.time_ms(|| {
            for i in 0..calls {
                if convert {
                    x.forget_operands();
                }
                gpu.linear(x, &ws[i % ws.len()], None)?;
            }
            Ok(())
        })
    };
    for _ in 0..warmup {
        rep()?;
    }
    let mut times = (0..reps.max(1))
        .map(|_| rep().map(|(ms, ())| ms / calls as f64))
        .collect::<Result<Vec<f64>, _>>()?;
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

/// A `[n, k]` bf16 weight of uniform values scaled like a trained projection (±√(3/k)).
fn random_weight(n: usize, k: usize, seed: u64) -> HostWeight {
    let scale = (3.0 / k as f32).sqrt();
    let mut v = random_vec(n * k, seed);
    v.par_iter_mut().for_each(|x| *x *= scale);
    HostWeight {
        rows: n,
        cols: k,
        data: WeightData::F32(v).cast(DType::BF16),
    }
}

/// The schema `bench/torch/matmul.py` writes too, plus the GEMM library fields (`gemm_libraries`
/// and `lt_unavailable` at the top, `gemm`, `lt_vs_gemmex`, `lt_algorithm` and
/// `lt_tuned_vs_first_pick` per row).
fn to_json(
    device: &str,
    a: &Args,
    libraries: &[GemmBackend],
    lt_unavailable: Option<&str>,
    rows: &[Row],
) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let libs: Vec<String> = libraries
        .iter()
        .map(|l| format!("\"{}\"", l.name()))
        .collect();
    let lt_unavailable = lt_unavailable.map_or("null".to_string(), |w| format!("\"{}\"", esc(w)));
    let mut s = String::new();
    let _ = write!(
        s,
        "{{\n  \"tool\": \"strata\",\n  \"device\": \"{}\",\n  \"activation\": \"f32\",\n  \
         \"weight\": \"bf16\",\n  \"output\": \"f32\",\n  \"reps\": {},\n  \"warmup\": {},\n  \
         \"gemm_libraries\": [{}],\n  \"lt_unavailable\": {lt_unavailable},\n  \"results\": [",
        esc(device),
        a.reps,
        a.warmup,
        libs.join(", ")
    );
    let null = || "null".to_string();
    for (i, r) in rows.iter().enumerate() {
        let gbps = r.gbps.map_or_else(null, |g| format!("{g:.1}"));
        let gemm = r.gemm.map_or_else(null, |g| format!("\"{g}\""));
        let vs = r.lt_vs_gemmex.map_or_else(null, |x| format!("{x:.4}"));
        let algorithm = r
            .lt_choice
            .as_ref()
            .map_or_else(null, |c| format!("\"{}\"", esc(&c.to_string())));
        let vs_first = r
            .lt_choice
            .as_ref()
            .and_then(tuned_vs_first_pick)
            .map_or_else(null, |x| format!("{x:.4}"));
        let _ = write!(
            s,
            "{}\n    {{\"shape\": \"{}\", \"n\": {}, \"k\": {}, \"m\": {}, \"mode\": \"{}\", \
             \"ms\": {:.6}, \"tflops\": {:.2}, \"weight_gbps\": {gbps}, \"gemm\": {gemm}, \
             \"lt_vs_gemmex\": {vs}, \"lt_algorithm\": {algorithm}, \
             \"lt_tuned_vs_first_pick\": {vs_first}}}",
            if i == 0 { "" } else { "," },
            r.name,
            r.n,
            r.k,
            r.m,
            r.mode,
            r.ms,
            r.tflops
        );
    }
    s.push_str("\n  ]\n}\n");
    s
}
