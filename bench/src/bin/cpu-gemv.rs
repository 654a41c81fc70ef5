//! The host's share of a decode step's MLP: `CpuBackend::linear` over bf16 weights with a few
//! activation rows, as weight bytes read per second, against a multi-threaded memcpy of the
//! same bytes in the same run (the memory's own pace).
//!
//! `cargo run --release -p strata-bench --bin cpu-gemv -- --rows 1,2,6,8,16`
//! The default shapes are OPT-30B's MLP (hidden 7168, 28672 neurons) with 5/8 of its neurons:
//! what host threads compute for one layer under a host MLP share of 0.625.
//!
//! On a GPU machine, `--pinned` computes from page-locked weights (as the runtime stages them)
//! and `--copy-beside` keeps copying page-locked memory to the GPU meanwhile (as the weight
//! stream of a decode step does), to see what each costs the other: the copy's rate is counted
//! inside each timed window, and alone before the first. `--threads 4,8,16` repeats every row
//! count with that many host threads (the host's share may leave the copies memory bandwidth by
//! using fewer cores).

use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use strata_bench::best;

use strata_kernels::cuda::PinnedWeight;
use strata_kernels::testing::SplitMix;
use strata_kernels::{Backend, CpuBackend, CudaBackend, DType, HostWeight};

#[derive(Parser)]
struct Args {
    /// Activation rows (sequences in a decode GPU batch), comma-separated.
    #[arg(long, default_value = "1,2,6,8,16,32", value_delimiter = ',')]
    rows: Vec<usize>,
    /// Model width (the MLP's input and output).
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Neurons the host computes.
    #[arg(long, default_value_t = 17920)]
    neurons: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Weight dtype: bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Page-lock the weights with the GPU first (needs a GPU).
    #[arg(long)]
    pinned: bool,
    /// Copy page-locked memory to the GPU on another thread while timing (needs a GPU).
    #[arg(long)]
    copy_beside: bool,
    /// Host thread counts to time each row count with, comma-separated (default: all cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Seconds each (rows, threads) cell repeats its product for (the copy's rate beside it is
    /// counted over this window).
    #[arg(long, default_value_t = 0.5)]
    window: f64,
    /// GiB of page-locked memory the copies beside cycle over, in 64 MiB blocks (a model's
    /// weights are gigabytes that the copies walk once per step, not one block read again).
    #[arg(long, default_value_t = 1)]
    copy_gib: usize,
}

enum Weights {
    Plain(HostWeight, HostWeight),
    Pinned(PinnedWeight, PinnedWeight),
}

impl Weights {
    fn get(&self) -> (&HostWeight, &HostWeight) {
        match self {
            Weights::Plain(a, b) => (a, b),
            Weights::Pinned(a, b) => (a.host(), b.host()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let cpu = CpuBackend::new();
    let gpu = if a.pinned || a.copy_beside {
        Some(
            CudaBackend::new(0)
                .map_err(|e| format!("--pinned and --copy-beside need a GPU: {e}"))?,
        )
    } else {
        None
    };
    let dtype = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(format!("--dtype {other}: expected bf16 or f16").into()),
    };
    let mut rng = SplitMix(1);
    // fc1 [neurons, hidden] then fc2 [hidden, neurons], as the MLP reads them.
    let fc1 = rng.weight(a.neurons, a.hidden, dtype);
    let fc2 = rng.weight(a.hidden, a.neurons, dtype);
    let bytes = (fc1.size_bytes() + fc2.size_bytes()) as f64;
    let weights = match &gpu {
        Some(g) if a.pinned => Weights::Pinned(g.pin_weight(fc1)?, g.pin_weight(fc2)?),
        _ => Weights::Plain(fc1, fc2),
    };
    let (fc1, fc2) = weights.get();
    // The memory's pace: every thread copying its share of a buffer of the same size.
    let src = vec![1u8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    let chunk = src.len().div_ceil(rayon::current_num_threads() * 4);
    let (copy_s, ()) = best(a.reps, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    println!(
        "{} threads; weights {:.1} MiB {} (fc1 [{}, {}], fc2 [{}, {}]){}; memcpy of the same \
         bytes {:.1} GB/s",
        rayon::current_num_threads(),
        bytes / (1 << 20) as f64,
        dtype.name(),
        a.neurons,
        a.hidden,
        a.hidden,
        a.neurons,
        if a.pinned { ", page-locked" } else { "" },
        bytes / copy_s / 1e9
    );
    let threads = if a.threads.is_empty() {
        vec![rayon::current_num_threads()]
    } else {
        a.threads.clone()
    };
    let stop = AtomicBool::new(false);
    let copied = AtomicU64::new(0);
    std::thread::scope(|scope| -> Result<(), Box<dyn std::error::Error>> {
        let beside = match (&gpu, a.copy_beside) {
            (Some(g), true) => {
                // 64 MiB per copy: fine enough to count inside a window of a few hundred ms.
                let blocks = (0..a.copy_gib.max(1) * 16)
                    .map(|i| {
                        g.pin_weight(SplitMix(2 + i as u64).weight(1 << 12, 1 << 13, DType::BF16))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let (stop, copied) = (&stop, &copied);
                Some(scope.spawn(move || -> strata_kernels::Result<()> {
                    for block in blocks.iter().cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let w = g.fetch_weight(block)?;
                        // The copy runs on the copy stream: make the compute stream wait for
                        // it, then wait for the compute stream.
                        g.wait_fetched(&g.fetched()?)?;
                        g.synchronize()?;
                        drop(w);
                        copied.fetch_add(block.bytes() as u64, Ordering::Relaxed);
                    }
                    Ok(())
                }))
            }
            _ => None,
        };
        // Bytes copied per second over `f`'s run.
        let copy_rate = |f: &mut dyn FnMut()| {
            let (c0, t0) = (copied.load(Ordering::Relaxed), Instant::now());
            f();
            (copied.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64()
        };
        if beside.is_some() {
            let alone = copy_rate(&mut || std::thread::sleep(std::time::Duration::from_secs(1)));
            println!("host→GPU copies alone: {:.1} GB/s", alone / 1e9);
            println!(
                "| rows | threads | ms | weight GB/s | vs memcpy | copies beside GB/s | together GB/s |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|");
        } else {
            println!("| rows | threads | ms | weight GB/s | vs memcpy |");
            println!("|---:|---:|---:|---:|---:|");
        }
        for &m in &a.rows {
            let x = cpu.tensor(m, a.hidden, rng.vec(m * a.hidden))?;
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t.max(1))
                    .build()?;
                let mut sink = 0.0f32;
                let mut product = || {
                    let h = cpu.linear(&x, fc1, None).expect("shapes match");
                    let y = cpu.linear(&h, fc2, None).expect("shapes match");
                    sink += y.data[0];
                };
                let (s, ()) = pool.install(|| best(a.reps, &mut product));
                let weight_gbps = bytes / s / 1e9;
                let mut cell = format!(
                    "| {m} | {t} | {:.2} | {weight_gbps:.1} | {:.2}× |",
                    s * 1e3,
                    copy_s / s
                );
                if beside.is_some() {
                    // Back-to-back products for the window, as the host's share runs beside
                    // a layer's weight copy.
                    let (mut calls, mut took) = (0u32, 0.0);
                    let window = a.window;
                    let rate = copy_rate(&mut || {
                        let t0 = Instant::now();
                        pool.install(|| {
                            while t0.elapsed().as_secs_f64() < window {
                                product();
                                calls += 1;
                            }
                        });
                        took = t0.elapsed().as_secs_f64();
                    });
                    let during = bytes * calls as f64 / took / 1e9;
                    cell += &format!(" {:.1} | {:.1} |", rate / 1e9, during + rate / 1e9);
                }
                std::hint::black_box(sink);
                println!("{cell}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = beside {
            h.join().expect("copy thread")?;
        }
        Ok(())
    })?;
    Ok(())
}
