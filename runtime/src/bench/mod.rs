//! `strata bench`: several policies on one workload, one command, on the same model, kernels
//! and machine minutes apart (each run a child `strata generate`), reported side by side with
//! their ratios.
//!
//! Flow: resolve the workloads (flags or a [`presets`] preset) and the budgets; for each
//! workload, choose every policy (`strata`: the planner; `flexgen`: FlexGen's flags, its
//! published policy scaled to the budgets, or the best of its space under strata's cost model;
//! `layerwise`; `gpu-only`) and predict it; then run each one the executor accepts through the
//! very path of `strata generate --policy FILE` (a generate command line parsed and run in this
//! process), on the same JSONL of prompt token ids; then compare tokens (the exactness contract:
//! every policy must give the same tokens), compute ratios, judge the [`targets`] that apply, and
//! write the [`report`].
//!
//! A policy the executor cannot run yet is reported as `not runnable` with the executor's reason,
//! one that does not fit the budgets as `does not fit` with the short tier, a failed run as
//! `failed`, one stopped at `--run-timeout` as `timed out`: nothing is faked and nothing stops
//! the other policies. The JSON and SVG reports are written again after every run (the runs not
//! reached yet marked `not run`), so a bench stopped from outside keeps what it finished.
//! Working files (prompts, policies, outputs, stats) live in a temporary directory removed at
//! the end.

mod presets;
mod report;
mod resume;
mod targets;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use strata_planner::flexgen::{self, FlexGenSpace};
use strata_planner::{
    Budgets, FlexGenPolicy, HardwareProfile, ModelSpec, PlanError, Policy, Prediction, Tier,
    Workload,
};
use strata_runtime::calibrate::{self, CalibrateOptions, DeviceChoice, ProfileOptions};
use strata_runtime::{model, policy_exec};

use crate::{BenchArgs, Cli, Command, Device};
use report::{
    ConfigReport, Links, Machine, Measured, MeasuredStreams, PeakBytes, Predicted,
    PredictedStreams, ProfileInfo, Report, RunReport, Status, TimeRatios,
};

/// KV block tokens of the baselines (FlexGen moves a layer's cache per GPU batch as one tensor;
/// 64 tokens of an OPT-30B layer is 1.8 MiB, a large transfer).
const BASELINE_BLOCK_TOKENS: u64 = 64;

const POLICY_NAMES: &[&str] = &["strata", "flexgen", "layerwise", "gpu-only"];

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let policies = parse_policies(&a.policies)?;
    let (workloads, preset) = resolve_workloads(a)?;
    let gpu = crate::open_gpu(a.device)?;
    let (device, gpu_name) = match (&gpu, a.device) {
        (None, _) => ("cpu".to_string(), None),
        (Some(g), d) => (
            format!("cuda:{}", if let Device::Cuda(n) = d { n } else { 0 }),
            Some(g.device_info().name.clone()),
        ),
    };
    let has_gpu = gpu.is_some();
    drop(gpu);
    let work = WorkDir::new()?;
    let source = ProfileOptions {
        profile: a.profile.clone(),
        calibrate: CalibrateOptions {
            device: match a.device {
                Device::Auto => DeviceChoice::Auto,
                Device::Cpu => DeviceChoice::Cpu,
                Device::Cuda(n) => DeviceChoice::Cuda(n),
            },
            ..CalibrateOptions::default()
        },
    };
    let profile = calibrate::load_or_calibrate(&source)?;
    let profile_file = match source.path().filter(|p| p.exists()) {
        Some(p) => p,
        None => {
            let p = work.0.join("profile.json");
            profile.save(&p)?;
            p
        }
    };
    if preset.needs_disk && a.disk_dir.is_none() {
        bail!(
            "--disk-dir: this preset keeps what does not fit in GPU and host memory on disk; give \
             a directory on a fast disk"
        );
    }
    let gpu_mem = a.gpu_mem.or(preset.gpu_bytes);
    let host_mem = a.host_mem.or(preset.host_bytes);
    let budgets = Budgets {
        gpu_bytes: gpu_mem.unwrap_or(profile.gpu_bytes),
        host_bytes: host_mem.unwrap_or(profile.host_bytes),
        disk_bytes: match &a.disk_dir {
            Some(_) => a.disk_mem.unwrap_or(profile.disk_bytes),
            None => 0,
        },
    };
    if profile.reference {
        eprintln!(
            "note: the profile is a reference profile ({}), not this machine: predictions are \
             for that machine",
            profile.machine
        );
    }
    let ctx = Ctx {
        a,
        budgets,
        profile: &profile,
        profile_file: &profile_file,
        device: &device,
        has_gpu,
        gpu_mem,
        work: &work.0,
    };
    let mut configs = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        configs.push(plan_config(&ctx, w, &policies, i)?);
    }
    carry_over(a, &budgets, &policies, &mut configs)?;
    let to_run: usize = configs
        .iter()
        .flat_map(|c| &c.runs)
        .filter(|r| r.policy.is_some())
        .count();
    let predicted_s: f64 = configs
        .iter()
        .flat_map(|c| &c.runs)
        .filter(|r| r.policy.is_some())
        .filter_map(|r| r.report.predicted.as_ref().map(|p| p.total_s))
        .sum::<f64>()
        .max(0.0);
    if !a.dry_run {
        eprintln!(
            "bench: {} configuration(s), {to_run} run(s); predicted generation time {:.0} s \
             (model loading not included)",
            configs.len(),
            predicted_s
        );
    }
    if !a.dry_run {
        warm_up(&ctx, &configs)?;
    }
    let report_of = |configs: Vec<ConfigReport>| {
        let exact = configs.iter().filter_map(|c| c.exact).reduce(|x, y| x && y);
        Report {
            schema: report::SCHEMA,
            date: report::utc_date(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
            command: command_line(),
            gpu_gemm: a.gpu_gemm.clone(),
            machine: machine(gpu_name.clone(), &device),
            profile: ProfileInfo {
                file: Some(profile_file.display().to_string()),
                machine: profile.machine.clone(),
                reference: profile.reference,
            },
            preset: a.preset.clone(),
            budgets,
            policies: policies.iter().map(|s| s.to_string()).collect(),
            exact,
            configs,
        }
    };
    let bar = progress(if a.dry_run { 0 } else { to_run });
    let mut done = 0;
    for ci in 0..configs.len() {
        if a.dry_run {
            break;
        }
        for ri in 0..configs[ci].runs.len() {
            let c = &mut configs[ci];
            let r = &mut c.runs[ri];
            let Some(policy) = r.policy else { continue };
            done += 1;
            say(
                &bar,
                format!(
                    "bench [{done}/{to_run}] {} batch {} prompt {} gen {}: {}",
                    c.report.model, c.report.batch, c.report.prompt_len, c.report.gen_len, r.name
                ),
            );
            let outcome =
                bar.suspend(|| execute(&ctx, &c.report, &c.spec, &c.input, &r.name, &policy));
            match outcome {
                Ok((measured, tokens, cmd)) => {
                    r.report.measured = Some(measured);
                    r.report.generate_command = Some(cmd);
                    r.tokens = Some(tokens);
                    say(
                        &bar,
                        format!(
                            "  done: prefill {:.1} tok/s, decode {:.2} tok/s, end to end {:.2} tok/s",
                            measured.prefill_tokens_per_s,
                            measured.decode_tokens_per_s,
                            measured.end_to_end_tokens_per_s
                        ),
                    );
                }
                Err(e) => {
                    r.report.status = match e.downcast_ref::<RunTimedOut>() {
                        Some(_) => Status::TimedOut,
                        None => Status::Failed,
                    };
                    r.report.reason = Some(format!("{e:#}"));
                    say(&bar, format!("  {}: {e:#}", r.report.status.label()));
                }
            }
            bar.inc(1);
            let partial = configs
                .iter()
                .map(|c| finish_config(written_so_far(c), &budgets));
            write_files(a, &report_of(partial.collect()))?;
        }
    }
    bar.finish_and_clear();
    let report = report_of(
        configs
            .into_iter()
            .map(|c| finish_config(c, &budgets))
            .collect(),
    );
    write_outputs(a, &report)?;
    if report.exact == Some(false) {
        eprintln!("error: policies gave different tokens (see `exactness` above)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `c` as a report written while the bench runs has it: the runs still to come are `not run`.
fn written_so_far(c: &PlannedConfig) -> PlannedConfig {
    let mut c = c.clone();
    for r in &mut c.runs {
        if r.policy.is_some() && r.report.measured.is_none() && r.report.status == Status::Ok {
            r.report.status = Status::NotRun;
            r.report.reason = Some("not run yet when this report was written".into());
        }
    }
    c
}

/// The report files (`--json`, `--plot`), written after every run and at the end, each whole
/// or not at all (a temporary file beside it, renamed over it), so a reader never sees half.
fn write_files(a: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    let write = |flag: &str, path: &Path, text: String| {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("{flag} {}", path.display()))
    };
    if let Some(p) = &a.json {
        write("--json", p, serde_json::to_string_pretty(report)? + "\n")?;
    }
    if let Some(p) = &a.plot {
        write("--plot", p, report::svg(report))?;
    }
    Ok(())
}

fn write_outputs(a: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    println!("{}", report::markdown(report));
    write_files(a, report)?;
    if a.append_results {
        let path = Path::new("bench/RESULTS.md");
        if !path.parent().is_some_and(Path::is_dir) {
            bail!(
                "--append-results: no bench/ directory here; run from the repository root \
                 (it appends to bench/RESULTS.md)"
            );
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--append-results {}", path.display()))?;
        f.write_all(report::results_entry(report).as_bytes())?;
        eprintln!("note: appended this run to {}", path.display());
    }
    Ok(())
}

fn parse_policies(names: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let mut out: Vec<&'static str> = Vec::new();
    for n in names {
        let n = n.trim();
        let Some(&known) = POLICY_NAMES.iter().find(|k| **k == n) else {
            bail!(
                "--policies: unknown policy `{n}` (known: {})",
                POLICY_NAMES.join(", ")
            );
        };
        if !out.contains(&known) {
            out.push(known);
        }
    }
    if out.is_empty() {
        bail!(
            "--policies: name at least one of {}",
            POLICY_NAMES.join(", ")
        );
    }
    Ok(out)
}

fn resolve_workloads(a: &BenchArgs) -> anyhow::Result<(Vec<presets::Workload>, presets::Preset)> {
    if let Some(name) = &a.preset {
        let n = presets::Narrowing {
            model: a.model.as_deref(),
            prompt_len: a.prompt_len,
            gen_len: a.gen_len,
            batch: a.batch,
        };
        let p = presets::resolve(name, &n).map_err(anyhow::Error::msg)?;
        return Ok((p.workloads.clone(), p));
    }
    let missing = |flag: &str| {
        anyhow::anyhow!(
            "{flag} is required without --preset (presets: {})",
            presets::NAMES.join(", ")
        )
    };
    let w = presets::Workload {
        model: a.model.clone().ok_or_else(|| missing("--model"))?,
        prompt_len: a.prompt_len.ok_or_else(|| missing("--prompt-len"))?,
        gen_len: a.gen_len.ok_or_else(|| missing("--gen-len"))?,
        batch: Some(a.batch.ok_or_else(|| missing("--batch"))?),
        note: None,
    };
    if w.gen_len == 0 {
        bail!("--gen-len must be at least 1");
    }
    if w.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    Ok((vec![w], presets::Preset::default()))
}

/// What every configuration's planning and runs share.
struct Ctx<'a> {
    a: &'a BenchArgs,
    budgets: Budgets,
    profile: &'a HardwareProfile,
    profile_file: &'a Path,
    /// `cpu` or `cuda:N`.
    device: &'a str,
    has_gpu: bool,
    gpu_mem: Option<u64>,
    work: &'a Path,
}

#[derive(Clone)]
struct PlannedRun {
    name: String,
    /// Set when the run is to happen (chosen, fits, runnable).
    policy: Option<Policy>,
    report: RunReport,
    /// Output ids per item id, once run.
    tokens: Option<BTreeMap<u64, Vec<u32>>>,
}

#[derive(Clone)]
struct PlannedConfig {
    report: ConfigReport,
    spec: ModelSpec,
    vocab: usize,
    input: PathBuf,
    runs: Vec<PlannedRun>,
}

fn empty_run(name: &str) -> RunReport {
    RunReport {
        policy: name.to_string(),
        status: Status::Ok,
        reason: None,
        source: String::new(),
        flexgen: None,
        flexgen_flags: None,
        plan: None,
        predicted: None,
        measured: None,
        measured_over_predicted: None,
        ratios: BTreeMap::new(),
        notes: Vec::new(),
        generate_command: None,
    }
}

fn predicted(p: &Prediction, m: &ModelSpec, wl: &Workload) -> Predicted {
    let layers = m.layers as f64;
    let n = wl.gen_len as f64;
    let job = |s: strata_planner::Stream| {
        layers * (p.prefill.per_layer.get(s) + n * p.decode_step.per_layer.get(s))
    };
    use strata_planner::Stream as S;
    let rate = |tokens: f64, s: f64| if s > 0.0 { tokens / s } else { 0.0 };
    Predicted {
        prefill_s: p.prefill.total_s,
        decode_step_s: p.decode_step.total_s,
        total_s: p.total_s,
        prefill_tokens_per_s: rate((wl.batch * wl.prompt_len) as f64, p.prefill.total_s),
        decode_tokens_per_s: p.decode_tokens_per_s,
        end_to_end_tokens_per_s: p.tokens_per_s,
        bound_by: p.bound_by.name().to_string(),
        streams: PredictedStreams {
            gpu_compute_s: job(S::GpuCompute),
            h2d_s: job(S::H2d),
            d2h_s: job(S::D2h),
            host_attention_s: job(S::HostAttention),
            disk_read_s: job(S::DiskRead),
            disk_write_s: job(S::DiskWrite),
            host_memory_s: job(S::HostMemory),
        },
        memory_bytes: p.memory,
    }
}

/// The FlexGen policy for this configuration and how it was chosen.
fn flexgen_policy(
    ctx: &Ctx<'_>,
    w: &presets::Workload,
    spec: &ModelSpec,
    wl: &Workload,
) -> anyhow::Result<Result<(FlexGenPolicy, String), PlanError>> {
    let a = ctx.a;
    if let Some(pct) = &a.percent {
        let ngb = a.num_gpu_batches.unwrap_or(1);
        let gbs = match a.gpu_batch_size {
            Some(g) => g,
            None if ngb > 0 && wl.batch.is_multiple_of(ngb) => wl.batch / ngb,
            None => bail!(
                "--num-gpu-batches {ngb} does not divide the batch {}; give --gpu-batch-size",
                wl.batch
            ),
        };
        let fp = FlexGenPolicy::from_flags(pct, gbs, ngb, a.cpu_cache_compute)?;
        if fp.batch() != wl.batch {
            bail!(
                "--gpu-batch-size {gbs} × --num-gpu-batches {ngb} = {} sequences, but the batch \
                 is {}",
                fp.batch(),
                wl.batch
            );
        }
        return Ok(Ok((fp, "FlexGen's flags as given".into())));
    }
    if w.batch.is_none()
        && let Some(pp) = flexgen::published(&w.model, w.prompt_len)
    {
        let scaled = pp.policy.scaled_to(
            spec,
            w.prompt_len,
            w.gen_len,
            &ctx.budgets,
            BASELINE_BLOCK_TOKENS,
        );
        return Ok(scaled.map(|fp| {
            (
                fp,
                format!(
                    "FlexGen's published policy for {} at prompt {} (`{}`), scaled to the budgets",
                    pp.model,
                    pp.prompt_len,
                    pp.policy.flags()
                ),
            )
        }));
    }
    let space = FlexGenSpace {
        kv_block_tokens: BASELINE_BLOCK_TOKENS,
        ..FlexGenSpace::default()
    };
    Ok(
        flexgen::search(spec, wl, &ctx.budgets, ctx.profile, &space).map(|plan| {
            (
                plan.flexgen,
                format!(
                    "the best of FlexGen's policy space under strata's cost model ({} policies, {} fit)",
                    plan.considered, plan.feasible
                ),
            )
        }),
    )
}

fn plan_config(
    ctx: &Ctx<'_>,
    w: &presets::Workload,
    policies: &[&str],
    index: usize,
) -> anyhow::Result<PlannedConfig> {
    let m = model::open(&w.model)?;
    let c = &m.config;
    let spec =
        policy_exec::model_spec(&w.model, c).with_gemm_passes(crate::gemm_passes(&ctx.a.gpu_gemm));
    let len = w.prompt_len + w.gen_len;
    if len > c.max_context as u64 {
        bail!(
            "--prompt-len {} + --gen-len {} = {len} tokens is beyond {}'s context of {} ({})",
            w.prompt_len,
            w.gen_len,
            w.model,
            c.max_context,
            c.max_context_source
        );
    }
    if w.prompt_len == 0 {
        bail!("--prompt-len must be at least 1");
    }
    // The batch: given, or that of FlexGen's published policy scaled to the budgets.
    let mut setup_error = None;
    let batch = match w.batch {
        Some(b) => b,
        None => {
            let pp = flexgen::published(&w.model, w.prompt_len).ok_or_else(|| {
                anyhow::anyhow!(
                    "no FlexGen policy published for {} at prompt {}",
                    w.model,
                    w.prompt_len
                )
            })?;
            match pp.policy.scaled_to(
                &spec,
                w.prompt_len,
                w.gen_len,
                &ctx.budgets,
                BASELINE_BLOCK_TOKENS,
            ) {
                Ok(fp) => fp.batch(),
                Err(e) => {
                    setup_error = Some(format!(
                        "FlexGen's published policy fits no batch within the budgets: {e}"
                    ));
                    0
                }
            }
        }
    };
    let wl = Workload {
        batch,
        prompt_len: w.prompt_len,
        gen_len: w.gen_len,
    };
    let input = ctx.work.join(format!("prompts-{index}.jsonl"));
    if batch > 0 {
        write_prompts(&input, batch, w.prompt_len, c.vocab)?;
    }
    let mut runs = Vec::new();
    for &name in policies {
        let mut r = empty_run(name);
        let mut policy = None;
        if let Some(e) = &setup_error {
            r.status = Status::DoesNotFit;
            r.reason = Some(e.clone());
            runs.push(PlannedRun {
                name: name.into(),
                policy,
                report: r,
                tokens: None,
            });
            continue;
        }
        let chosen: Result<(Policy, Prediction), PlanError> = match name {
            "strata" => strata_planner::plan_with(
                &spec,
                &wl,
                &ctx.budgets,
                ctx.profile,
                &crate::policy_exec::search_space(),
            )
            .map(|p| {
                r.source = format!(
                    "the planner's choice ({} policies, {} fit)",
                    p.considered, p.feasible
                );
                (p.policy, p.prediction)
            }),
            "flexgen" => flexgen_policy(ctx, w, &spec, &wl)?.map(|(fp, source)| {
                r.source = source;
                r.flexgen_flags = Some(fp.flags());
                r.flexgen = Some(fp);
                r.notes.extend(fp.notes());
                let seqs = fp.kv_sequences();
                if seqs.gpu.max(seqs.host).max(seqs.disk) < fp.gpu_batch_size {
                    r.notes.push(
                        "FlexGen splits the KV by sequence; the executor's tiers place blocks \
                         by position, with the same bytes per tier"
                            .into(),
                    );
                }
                let p = fp.to_strata(BASELINE_BLOCK_TOKENS);
                (p, strata_planner::predict(&spec, &wl, &p, ctx.profile))
            }),
            "layerwise" => {
                strata_planner::layerwise(&spec, &wl, &ctx.budgets, BASELINE_BLOCK_TOKENS).map(
                    |p| {
                        r.source = "weights and KV off the GPU, fetched layer by layer before \
                                    each layer runs; predicted with nothing overlapped"
                            .into();
                        let pred = strata_planner::predict(&spec, &wl, &p, ctx.profile);
                        (p, strata_planner::serial(&pred, &spec, &wl))
                    },
                )
            }
            _ => {
                strata_planner::gpu_only(&spec, &wl, &ctx.budgets, BASELINE_BLOCK_TOKENS).map(|p| {
                    r.source = "weights and KV all on the GPU".into();
                    (p, strata_planner::predict(&spec, &wl, &p, ctx.profile))
                })
            }
        };
        match chosen {
            Ok((p, pred)) => {
                r.plan = Some(p);
                r.predicted = Some(predicted(&pred, &spec, &wl));
                let mem = pred.memory;
                let b = &ctx.budgets;
                if mem.gpu > b.gpu_bytes || mem.host > b.host_bytes || mem.disk > b.disk_bytes {
                    r.status = Status::DoesNotFit;
                    r.reason = Some(over_budget(&mem, b));
                } else {
                    match policy_exec::executable(&p, c.layers) {
                        Err(why) => {
                            r.status = Status::NotRunnable;
                            r.reason = Some(why);
                        }
                        Ok(_) if ctx.a.dry_run => {
                            r.status = Status::NotRun;
                            r.reason = Some("--dry-run: planned and predicted, not run".into());
                        }
                        Ok(_) => {
                            if name == "layerwise" {
                                r.notes.push(
                                    "measured on strata's executor, which fetches the next \
                                     layer's weights while this one computes: faster than a \
                                     synchronous runtime"
                                        .into(),
                                );
                            }
                            policy = Some(p);
                        }
                    }
                }
            }
            Err(e @ PlanError::NothingFits { .. }) => {
                r.status = Status::DoesNotFit;
                r.reason = Some(e.to_string());
            }
            Err(e) => {
                r.status = Status::Failed;
                r.reason = Some(e.to_string());
            }
        }
        runs.push(PlannedRun {
            name: name.into(),
            policy,
            report: r,
            tokens: None,
        });
    }
    Ok(PlannedConfig {
        report: ConfigReport {
            model: w.model.clone(),
            prompt_len: w.prompt_len,
            gen_len: w.gen_len,
            batch,
            context: len,
            kv_bytes: batch * len * spec.layers * spec.kv_bytes_per_token_per_layer(),
            weight_bytes: spec.layers * spec.weight_bytes_per_layer() + spec.embedding_bytes(),
            note: w.note.clone(),
            exact: None,
            mismatches: Vec::new(),
            divergences: Vec::new(),
            runs: Vec::new(),
            targets: Vec::new(),
            carried_from: None,
        },
        spec,
        vocab: c.vocab,
        input,
        runs,
    })
}

fn over_budget(mem: &strata_planner::TierBytes, b: &Budgets) -> String {
    use strata_runtime::units::format_size;
    Tier::ALL
        .iter()
        .filter_map(|&t| {
            let (need, have) = match t {
                Tier::Gpu => (mem.gpu, b.gpu_bytes),
                Tier::Host => (mem.host, b.host_bytes),
                Tier::Disk => (mem.disk, b.disk_bytes),
            };
            (need > have).then(|| {
                format!(
                    "{} memory needs {}, budget {}",
                    t.name(),
                    format_size(need),
                    format_size(have)
                )
            })
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `batch` items of `prompt_len` deterministic pseudo-random token ids below `vocab`.
fn write_prompts(path: &Path, batch: u64, prompt_len: u64, vocab: usize) -> anyhow::Result<()> {
    let mut state = 0x5eed_u64;
    let mut text = String::new();
    for id in 0..batch {
        let ids: Vec<String> = (0..prompt_len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % vocab.max(1) as u64).to_string()
            })
            .collect();
        text += &format!("{{\"id\": {id}, \"input_ids\": [{}]}}\n", ids.join(","));
    }
    std::fs::write(path, text).with_context(|| format!("{}", path.display()))
}

/// KV bytes the policy keeps on the GPU for the whole job (its hot window and GPU share).
/// The host KV arena for a run (`--host-mem` of generate, allocated at start): the policy's
/// host share of the KV (on the CPU, where there is no GPU tier, its GPU share too) in the host
/// tier's f32 blocks, plus the writable block every sequence needs in every layer; at most the
/// host budget (the rest spills to disk, or the run fails saying so), at least those blocks.
fn host_arena_bytes(
    p: &Policy,
    spec: &ModelSpec,
    wl: &Workload,
    has_gpu: bool,
    budget: u64,
) -> u64 {
    let len = wl.final_len() as f64;
    let hot = (p.kv.hot_window_tokens as f64).min(len);
    let cold = len - hot;
    let mut tokens = cold * p.kv.cold.host;
    if p.kv.hot_tier == Tier::Host {
        tokens += hot;
    }
    if !has_gpu {
        tokens += cold * p.kv.cold.gpu + if p.kv.hot_tier == Tier::Gpu { hot } else { 0.0 };
    }
    let block = p.kv_block_tokens;
    let block_bytes = spec.kv_width() * 4 * block;
    let blocks_per_seq_layer = (tokens / block as f64).ceil() as u64 + 1;
    let minimum = wl.batch * spec.layers * block_bytes;
    (wl.batch * spec.layers * blocks_per_seq_layer * block_bytes)
        .min(budget)
        .max(minimum)
}

type Tokens = BTreeMap<u64, Vec<u32>>;

/// How `other`'s generated tokens part from `first`'s (sequences by item id; a sequence one
/// of them lacks counts as differing from token 0).
fn divergence(policy: &str, first: &Tokens, other: &Tokens) -> report::Divergence {
    let mut d = report::Divergence {
        policy: policy.to_string(),
        sequences_differing: 0,
        sequences: 0,
        first_differing_token: u64::MAX,
        tokens_equal: 0,
        tokens: 0,
    };
    let empty = Vec::new();
    let ids: std::collections::BTreeSet<&u64> = first.keys().chain(other.keys()).collect();
    for id in ids {
        let a = first.get(id).unwrap_or(&empty);
        let b = other.get(id).unwrap_or(&empty);
        d.sequences += 1;
        d.tokens += a.len().max(b.len()) as u64;
        d.tokens_equal += a.iter().zip(b).filter(|(x, y)| x == y).count() as u64;
        if a != b {
            d.sequences_differing += 1;
            let at = a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64;
            d.first_differing_token = d.first_differing_token.min(at);
        }
    }
    d
}

/// Runs one policy through `strata generate --policy FILE`, in a child process.
fn execute(
    ctx: &Ctx<'_>,
    r: &ConfigReport,
    spec: &ModelSpec,
    input: &Path,
    name: &str,
    p: &Policy,
) -> anyhow::Result<(Measured, Tokens, String)> {
    let tag = format!(
        "{}-{name}",
        input.file_stem().and_then(|s| s.to_str()).unwrap_or("run")
    );
    let policy_file = ctx.work.join(format!("{tag}.policy.json"));
    let output = ctx.work.join(format!("{tag}.out.jsonl"));
    let stats_file = ctx.work.join(format!("{tag}.stats.json"));
    std::fs::write(&policy_file, p.to_json() + "\n")?;
    let _ = std::fs::remove_file(&output);
    let wl = Workload {
        batch: r.batch,
        prompt_len: r.prompt_len,
        gen_len: r.gen_len,
    };
    let path = |p: &Path| p.display().to_string();
    let mut argv: Vec<String> = [
        "strata",
        "generate",
        "--model",
        &r.model,
        "--input",
        &path(input),
        "--output",
        &path(&output),
        "--max-new-tokens",
        &r.gen_len.to_string(),
        "--ignore-eos",
        "--batch-size",
        &r.batch.to_string(),
        "--policy",
        &path(&policy_file),
        "--profile",
        &path(ctx.profile_file),
        "--stats-json",
        &path(&stats_file),
        "--device",
        ctx.device,
        "--gpu-gemm",
        &ctx.a.gpu_gemm,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut flag = |f: &str, v: String| {
        argv.push(f.to_string());
        argv.push(v);
    };
    if ctx.has_gpu {
        // `generate --policy` sizes the GPU KV tier from the policy, and keeps the room left
        // for the scratch blocks that attend prompts over host KV on the GPU.
        if let Some(g) = ctx.gpu_mem {
            flag("--gpu-mem", g.to_string());
        }
    }
    flag(
        "--host-mem",
        host_arena_bytes(p, spec, &wl, ctx.has_gpu, ctx.budgets.host_bytes).to_string(),
    );
    if let Some(d) = &ctx.a.disk_dir {
        flag("--disk-dir", path(d));
        flag("--disk-mem", ctx.budgets.disk_bytes.to_string());
    }
    let cmd = argv.join(" ");
    // Checked here, so a bad command line is this bench's error, not a child's exit status.
    let cli = Cli::try_parse_from(&argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Command::Generate(_) = cli.command else {
        bail!("internal: not a generate command line");
    };
    // Each run in a process of its own: it starts from a clean device and host (nothing pinned,
    // registered or cached by the previous policy's run), as a user's `strata generate` would.
    let exe = std::env::current_exe().context("locating the strata executable")?;
    let mut child = std::process::Command::new(&exe)
        .args(&argv[1..])
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let status = match ctx.a.run_timeout {
        None => child.wait()?,
        Some(limit) => wait_at_most(&mut child, limit)?,
    };
    if !status.success() {
        bail!("`{cmd}` failed ({status}); its error is above");
    }
    let stats: Value = serde_json::from_str(
        &std::fs::read_to_string(&stats_file).with_context(|| path(&stats_file))?,
    )?;
    if stats["items_failed"].as_u64().unwrap_or(0) > 0 {
        bail!(
            "{} item(s) failed (error records in the output)",
            stats["items_failed"]
        );
    }
    let tokens = read_tokens(&output)?;
    Ok((measured(&stats), tokens, cmd))
}

/// A run stopped at `--run-timeout`.
#[derive(Debug)]
struct RunTimedOut(f64);

impl std::fmt::Display for RunTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped after {} s (--run-timeout), before it finished; nothing of it is measured",
            self.0
        )
    }
}

impl std::error::Error for RunTimedOut {}

/// Waits for `child` at most `limit` seconds; past that, kills it and says so.
fn wait_at_most(
    child: &mut std::process::Child,
    limit: f64,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs_f64(limit);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let now = Instant::now();
        if now >= deadline {
            // Killed, then reaped: no zombie, and its disk files are left-overs the next run's
            // disk tier removes before it checks the free space.
            let _ = child.kill();
            child.wait()?;
            return Err(RunTimedOut(limit).into());
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

fn read_tokens(path: &Path) -> anyhow::Result<Tokens> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(e) = v.get("error") {
            bail!("item {}: {e}", v["id"]);
        }
        let id = v["id"]
            .as_u64()
            .context("output record without a numeric id")?;
        let ids = v["output_ids"]
            .as_array()
            .context("output record without output_ids")?
            .iter()
            .map(|x| x.as_u64().unwrap_or(u64::MAX) as u32)
            .collect();
        out.insert(id, ids);
    }
    Ok(out)
}

fn measured(s: &Value) -> Measured {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let kv = &s["kv"];
    let gc = &s["gpu_copies"];
    let (prefill_s, decode_s) = (f(&s["prefill_seconds"]), f(&s["decode_seconds"]));
    let generated = u(&s["generated_tokens"]);
    let steps = u(&s["decode_steps"]).max(1);
    let total = prefill_s + decode_s;
    Measured {
        prompt_tokens: u(&s["prompt_tokens"]),
        generated_tokens: generated,
        prefill_s,
        decode_s,
        decode_step_s: decode_s / steps as f64,
        gemm_tuning_s: f(&s["gemm_tuning_seconds"]),
        prefill_tokens_per_s: f(&s["prefill_tokens_per_s"]),
        decode_tokens_per_s: f(&s["decode_tokens_per_s"]),
        end_to_end_tokens_per_s: if total > 0.0 {
            generated as f64 / total
        } else {
            0.0
        },
        links: Links {
            h2d_bytes: u(&gc["h2d_bytes"]),
            d2h_bytes: u(&gc["d2h_bytes"]),
            weights_h2d_bytes: u(&s["weight_bytes_fetched"]),
            kv_gpu_to_host_bytes: u(&kv["bytes_gpu_to_host"]),
            kv_host_to_disk_bytes: u(&kv["bytes_host_to_disk"]),
            kv_disk_to_host_bytes: u(&kv["bytes_disk_to_host"]),
            weights_disk_to_host_bytes: u(&s["disk_weights"]["bytes_read"]),
        },
        streams: MeasuredStreams {
            h2d_s: f(&gc["h2d_seconds"]),
            d2h_s: f(&gc["d2h_seconds"]),
            host_attention_s: f(&kv["host_attention_seconds"]),
            storage_attention_s: f(&kv["storage_attention_seconds"]),
            disk_write_s: f(&kv["disk_write_seconds"]),
            weights_disk_wait_s: f(&s["disk_weights"]["wait_seconds"]),
        },
        peak: PeakBytes {
            gpu_kv: u(&kv["gpu_blocks_peak"]) * u(&kv["gpu_bytes_per_block"]),
            host_kv: u(&kv["host_blocks_peak"]) * u(&kv["bytes_per_block"]),
            disk_kv: u(&kv["disk_blocks_peak"]) * u(&kv["bytes_per_block"]),
            host_rss: u(&s["peak_rss_bytes"]),
        },
    }
}

/// `--resume`: each configuration an earlier report (the first of the files that has it)
/// finished is taken from there and not run again.
fn carry_over(
    a: &BenchArgs,
    budgets: &Budgets,
    policies: &[&str],
    configs: &mut [PlannedConfig],
) -> anyhow::Result<()> {
    let mut earlier = Vec::new();
    for path in &a.resume {
        if path.exists() {
            earlier.push(resume::load(path, budgets, &a.gpu_gemm)?);
        } else {
            eprintln!("bench: --resume {}: no report there yet", path.display());
        }
    }
    if a.resume.is_empty() {
        return Ok(());
    }
    let mut n = 0;
    for c in configs.iter_mut() {
        let r = &c.report;
        let Some(done) = earlier
            .iter()
            .find_map(|e| e.take(&r.model, r.batch, r.prompt_len, r.gen_len, policies))
        else {
            continue;
        };
        c.report = done;
        for run in &mut c.runs {
            run.policy = None;
        }
        n += 1;
    }
    eprintln!(
        "bench: {n} of {} configuration(s) carried over (finished in an earlier report); the \
         rest run now",
        configs.len()
    );
    Ok(())
}

/// Exactness, ratios, measured-over-predicted and targets for one configuration run under
/// `budgets`.
fn finish_config(c: PlannedConfig, budgets: &Budgets) -> ConfigReport {
    let mut report = c.report;
    if report.carried_from.is_some() {
        report.targets = targets::evaluate(&report, budgets);
        return report;
    }
    let ran: Vec<(&str, &Tokens)> = c
        .runs
        .iter()
        .filter_map(|r| r.tokens.as_ref().map(|t| (r.name.as_str(), t)))
        .collect();
    if ran.len() >= 2 {
        let (_, first) = ran[0];
        for (name, tokens) in &ran[1..] {
            if *tokens != first {
                report.mismatches.push(name.to_string());
                report.divergences.push(divergence(name, first, tokens));
            }
        }
        report.exact = Some(report.mismatches.is_empty());
    }
    let e2e: BTreeMap<String, f64> = c
        .runs
        .iter()
        .filter_map(|r| {
            r.report
                .measured
                .map(|m| (r.name.clone(), m.end_to_end_tokens_per_s))
        })
        .collect();
    for mut r in c.runs {
        if let (Some(m), Some(p)) = (&r.report.measured, &r.report.predicted) {
            let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
            r.report.measured_over_predicted = Some(TimeRatios {
                prefill: ratio(m.prefill_s, p.prefill_s),
                decode_step: ratio(m.decode_step_s, p.decode_step_s),
                total: ratio(m.prefill_s + m.decode_s, p.total_s),
            });
            for (other, &tps) in &e2e {
                if *other != r.name && tps > 0.0 {
                    r.report
                        .ratios
                        .insert(other.clone(), m.end_to_end_tokens_per_s / tps);
                }
            }
        }
        report.runs.push(r.report);
    }
    report.targets = targets::evaluate(&report, budgets);
    report
}

/// Prompt tokens of the warm-up run at most: enough for the prompt passes of FlexGen's settings
/// (512 and 256 tokens) to run the shapes the measured runs do, few enough to keep a
/// long-context warm-up short.
const WARM_UP_PROMPT_TOKENS: u64 = 2048;

/// One short untimed run before the measured ones (the first runnable policy of the first
/// configuration, its batch, its prompt length up to [`WARM_UP_PROMPT_TOKENS`], 2 new tokens),
/// so that one-time costs (thread pools, GPU context, kernel compilation, first allocations,
/// and tuning the GEMM shapes of the prompt's passes and of decode, with the first launches of
/// their kernels) land on no policy's figures. With a 16-token prompt the first measured run
/// tuned its prompt's shapes itself, and its prefill, with the tuning left out, measured half
/// the same placement's under the next policy (likely one-time costs inside the tuning).
fn warm_up(ctx: &Ctx<'_>, configs: &[PlannedConfig]) -> anyhow::Result<()> {
    let Some((c, r, p)) = configs
        .iter()
        .find_map(|c| c.runs.iter().find_map(|r| r.policy.map(|p| (c, r, p))))
    else {
        return Ok(());
    };
    let mut short = c.report.clone();
    short.prompt_len = short.prompt_len.min(WARM_UP_PROMPT_TOKENS);
    short.gen_len = 2;
    let input = ctx.work.join("warm-up.jsonl");
    write_prompts(&input, short.batch, short.prompt_len, c.vocab)?;
    eprintln!("bench: warm-up run ({}, not measured)", r.name);
    if let Err(e) = execute(ctx, &short, &c.spec, &input, &r.name, &p) {
        eprintln!("note: the warm-up run failed ({e:#}); measuring anyway");
    }
    Ok(())
}

fn progress(len: usize) -> ProgressBar {
    if len == 0 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "bench {bar:30} {pos}/{len} runs  [{elapsed_precise}, eta {eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// A progress line above the bar (or on stderr when there is no bar).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine(gpu: Option<String>, device: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    Machine {
        cpu,
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        gpu,
        device: device.to_string(),
    }
}

/// The bench's working directory, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        let d = std::env::temp_dir().join(format!("strata-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("{}", d.display()))?;
        Ok(WorkDir(d))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_divergence_counts_sequences_and_tokens_and_finds_the_earliest_difference() {
        let first: Tokens = [
            (0, vec![1, 2, 3, 4]),
            (1, vec![5, 6, 7, 8]),
            (2, vec![9, 9]),
        ]
        .into_iter()
        .collect();
        let mut other = first.clone();
        other.insert(1, vec![5, 6, 0, 0]);
        other.insert(2, vec![9, 9]);
        let d = divergence("layerwise", &first, &other);
        assert_eq!(
            (d.sequences_differing, d.sequences, d.first_differing_token),
            (1, 3, 2)
        );
        assert_eq!((d.tokens_equal, d.tokens), (8, 10));
        // A sequence one side lacks differs from its first token.
        other.remove(&0);
        let d = divergence("layerwise", &first, &other);
        assert_eq!((d.sequences_differing, d.first_differing_token), (2, 0));
        assert_eq!((d.tokens_equal, d.tokens), (4, 10));
    }
}
