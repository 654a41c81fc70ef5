//! strata's runtime: models and weights ([`model`]), the KV block table ([`kv`]), the forward
//! pass ([`forward`]), sampling, tokenization and the offline batch job ([`generate`]) behind the
//! `strata` binary, and the machine calibration behind `strata calibrate` ([`calibrate`]).

pub mod calibrate;
pub mod disk_weights;
pub mod error;
mod far_attention;
pub mod forward;
pub mod generate;
pub mod gpu_budget;
pub mod jobio;
pub mod kv;
pub mod model;
pub mod policy_exec;
pub mod sampling;
pub mod tokenizer;
pub mod units;

pub use far_attention::{KvProjection, Regenerate};

/// Memory the OS says is available now (`MemAvailable`), in bytes; `None` off Linux.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Threads for host compute (host attention, the host MLP share, CPU kernels): every core on
/// the CPU; with a GPU, one core fewer (at least one), left to the thread that drives the GPU.
/// That thread launches the kernels and spins in CUDA's waits, and a host attention split over
/// every core waits for the share of the core it shares: on an H100 machine with 16 cores, a
/// decode step of 8 × 4K tokens with half its KV attended on the host took 114-129 ms with 16
/// threads and 95-99 ms with 15 (`bench/RESULTS.md`, 2026-11-23).
pub fn host_threads(gpu: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if gpu && cores > 2 { cores - 1 } else { cores }
}

/// Whether to keep every layer's weights in memory (else they are loaded layer by layer on each
/// forward pass): yes when they take at most 70% of the memory available now.
pub fn weights_fit_in_memory(cfg: &model::ModelConfig) -> bool {
    let bytes = forward::weight_bytes(cfg);
    mem_available_bytes().is_none_or(|avail| bytes <= avail / 10 * 7)
}
