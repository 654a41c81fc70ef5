//! `strata bench --resume FILE`: carry the configurations an earlier bench finished into this
//! one instead of running them again, so that a preset longer than one sitting (the
//! `long-context` preset's disk-bound cells take hours) is finished by running the same command
//! again, and one report, table and plot cover the whole of it.
//!
//! A configuration (one workload, every policy) is the unit carried: it is taken from the
//! earlier report only when that report ran the same workload under the same policies to an end
//! (each run measured, refused, failed or timed out; none still `not run`), so a configuration's
//! ratios always come from one process on one machine. A bench stopped in the middle of a
//! configuration runs that configuration again whole. Budgets and `--gpu-gemm` must be the
//! earlier report's, or the two halves would not measure the same thing.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use strata_planner::Budgets;

use super::report::{ConfigReport, Machine, Status};
use strata_runtime::units::format_size;

/// The parts of an earlier report `--resume` reads.
#[derive(Deserialize)]
struct EarlierReport {
    schema: String,
    date: String,
    gpu_gemm: String,
    machine: Machine,
    budgets: Budgets,
    configs: Vec<ConfigReport>,
}

/// The finished configurations of an earlier report.
pub struct Carried {
    configs: Vec<ConfigReport>,
    /// `FILE (2026-11-24 21:40 UTC, NVIDIA H100 80GB HBM3)`.
    origin: String,
}

fn budgets_text(b: &Budgets) -> String {
    format!(
        "GPU {}, host {}, disk {}",
        format_size(b.gpu_bytes),
        format_size(b.host_bytes),
        format_size(b.disk_bytes)
    )
}

/// Reads `path` (a report this command wrote with `--json`), refusing one written under other
/// budgets or another `--gpu-gemm`, each refusal naming the flag.
pub fn load(path: &Path, budgets: &Budgets, gpu_gemm: &str) -> anyhow::Result<Carried> {
    let flag = format!("--resume {}", path.display());
    let text = std::fs::read_to_string(path).with_context(|| flag.clone())?;
    let earlier: EarlierReport = serde_json::from_str(&text)
        .with_context(|| format!("{flag}: not a report written by `strata bench --json`"))?;
    if !earlier.schema.starts_with("strata-bench/") {
        bail!(
            "{flag}: schema `{}` is not a strata bench report",
            earlier.schema
        );
    }
    if earlier.budgets != *budgets {
        bail!(
            "{flag}: that report ran with budgets {}, this bench has {}; give the same \
             --gpu-mem, --host-mem and --disk-mem (or leave --resume out)",
            budgets_text(&earlier.budgets),
            budgets_text(budgets)
        );
    }
    if earlier.gpu_gemm != gpu_gemm {
        bail!(
            "{flag}: that report ran with --gpu-gemm {}, this bench with {gpu_gemm}",
            earlier.gpu_gemm
        );
    }
    let gpu = earlier.machine.gpu.as_deref().unwrap_or("CPU");
    Ok(Carried {
        origin: format!("{} ({}, {gpu})", path.display(), earlier.date),
        configs: earlier.configs,
    })
}

impl Carried {
    /// The earlier report's configuration of this workload, when it ran exactly `policies` to
    /// an end; marked as carried over.
    pub fn take(
        &self,
        model: &str,
        batch: u64,
        prompt_len: u64,
        gen_len: u64,
        policies: &[&str],
    ) -> Option<ConfigReport> {
        let c = self.configs.iter().find(|c| {
            c.model == model
                && c.batch == batch
                && c.prompt_len == prompt_len
                && c.gen_len == gen_len
        })?;
        let mut ran: Vec<&str> = c.runs.iter().map(|r| r.policy.as_str()).collect();
        let mut wanted = policies.to_vec();
        ran.sort_unstable();
        wanted.sort_unstable();
        let finished = c.runs.iter().all(|r| r.status != Status::NotRun);
        (ran == wanted && finished).then(|| {
            let mut c = c.clone();
            // Carried twice (a merged report resumed again): the run's own origin stays.
            c.carried_from.get_or_insert_with(|| self.origin.clone());
            c
        })
    }
}
