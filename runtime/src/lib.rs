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

/// Memory the OS says is available now (`MemAvailable`), in bytes; `None` off Linux.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether to keep every layer's weights in memory (else they are loaded layer by layer on each
/// forward pass): yes when they take at most 70% of the memory available now.
pub fn weights_fit_in_memory(cfg: &model::ModelConfig) -> bool {
    let bytes = forward::weight_bytes(cfg);
    mem_available_bytes().is_none_or(|avail| bytes <= avail / 10 * 7)
}
