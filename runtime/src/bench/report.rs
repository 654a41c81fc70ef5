//! The report of `strata bench`: its data (serialised as JSON, schema [`SCHEMA`]), the Markdown
//! tables printed after a run, the SVG plot (end-to-end throughput against context length, one
//! line per policy; hand-written SVG) and the dated entry for `bench/RESULTS.md`.
//!
//! Units: seconds, bytes, tokens per second. Measured end-to-end throughput is generated tokens
//! over prefill plus decode seconds (model loading and one-time GEMM tuning, `gemm_tuning_s`,
//! excluded), FlexGen's definition; a `ratios`
//! entry is this run's end-to-end throughput over another policy's in the same configuration.
//! Each configuration lists the [`targets`](super::targets) that apply to it, met or not.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize};
use strata_planner::{Budgets, FlexGenPolicy, Policy, TierBytes};

use strata_runtime::units::format_size as human_bytes;

use super::targets::{self, Target};

/// `/2`: each configuration has `kv_bytes`, `weight_bytes` and `targets` (and, added since
/// without a bump, each measured run `gemm_tuning_s`, and the report `gpu_gemm`).
pub const SCHEMA: &str = "strata-bench/2";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `2026-11-23 14:05 UTC`.
    pub date: String,
    /// The command line, as run.
    pub command: String,
    /// `--gpu-gemm` of every policy's run (and of the planner's predictions): `split` or
    /// `rounded`.
    pub gpu_gemm: String,
    pub machine: Machine,
    pub profile: ProfileInfo,
    pub preset: Option<String>,
    pub budgets: Budgets,
    pub policies: Vec<String>,
    /// Every configuration gave the same tokens under every policy that ran (None: fewer than
    /// two ran anywhere).
    pub exact: Option<bool>,
    pub configs: Vec<ConfigReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpu_cores: usize,
    pub memory_bytes: u64,
    /// The GPU computed on, or None (CPU).
    pub gpu: Option<String>,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProfileInfo {
    pub file: Option<String>,
    pub machine: String,
    /// A built-in reference profile, not a measurement of this machine.
    pub reference: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigReport {
    pub model: String,
    pub prompt_len: u64,
    pub gen_len: u64,
    pub batch: u64,
    /// `prompt_len + gen_len`.
    pub context: u64,
    /// KV of the whole job at its final length: batch × context × layers × KV bytes per token
    /// per layer, in the model's KV dtype.
    pub kv_bytes: u64,
    /// The model's weights (every layer, the embedding and the LM head), which share the GPU and
    /// host budgets with the KV.
    pub weight_bytes: u64,
    pub note: Option<String>,
    /// Same tokens under every policy that ran here (None: fewer than two ran).
    pub exact: Option<bool>,
    /// Policies whose tokens differ from the first policy that ran.
    pub mismatches: Vec<String>,
    /// For each of `mismatches`, how far its tokens differ: rounding (host and GPU attention
    /// sum in different orders) flips a near-tied greedy choice now and then, and from there
    /// on that sequence goes its own way; a wrong result tends to show in most sequences.
    #[serde(default)]
    pub divergences: Vec<Divergence>,
    pub runs: Vec<RunReport>,
    /// The targets that apply here, each met, missed or not measured (judged again when a
    /// report is resumed).
    #[serde(skip_deserializing)]
    pub targets: Vec<Target>,
    /// Set when this configuration was not run by this bench but carried over from an earlier
    /// report (`--resume`): that report's file, date and GPU.
    #[serde(default)]
    pub carried_from: Option<String>,
}

/// Where a policy's tokens part from the first policy's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub policy: String,
    /// Sequences whose generated tokens differ, of `sequences`.
    pub sequences_differing: u64,
    pub sequences: u64,
    /// The earliest generated token (0-based) at which any sequence differs.
    pub first_differing_token: u64,
    /// Generated tokens equal at the same position, of `tokens`.
    pub tokens_equal: u64,
    pub tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Ran to the end; `measured` is set.
    Ok,
    /// The executor cannot run this policy yet (`reason` names the field).
    NotRunnable,
    /// The policy does not fit the budgets (`reason` names the tier).
    DoesNotFit,
    /// The run failed (`reason`).
    Failed,
    /// Stopped at `--run-timeout` (`reason`).
    TimedOut,
    /// `--dry-run`: planned, not run (or not run yet, in a report written while the bench ran).
    NotRun,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotRunnable => "not runnable",
            Status::DoesNotFit => "does not fit",
            Status::Failed => "failed",
            Status::TimedOut => "timed out",
            Status::NotRun => "not run",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub policy: String,
    pub status: Status,
    pub reason: Option<String>,
    /// How the policy was chosen (`planner`, `FlexGen search`, `FlexGen published, scaled`, …).
    pub source: String,
    /// The FlexGen policy and its flags (flexgen only).
    pub flexgen: Option<FlexGenPolicy>,
    pub flexgen_flags: Option<String>,
    /// The strata policy that ran.
    pub plan: Option<Policy>,
    pub predicted: Option<Predicted>,
    pub measured: Option<Measured>,
    /// Measured time over predicted time (prefill, decode step, whole job).
    pub measured_over_predicted: Option<TimeRatios>,
    /// This run's end-to-end throughput over each other policy's that ran here.
    #[serde(deserialize_with = "ratios_nan_if_null")]
    pub ratios: BTreeMap<String, f64>,
    /// What the run does not reproduce exactly, and how the policy was adjusted.
    pub notes: Vec<String>,
    /// The `strata generate` command line the run is equivalent to.
    pub generate_command: Option<String>,
}

/// Seconds per stream over the whole job (prefill plus every decode step).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PredictedStreams {
    pub gpu_compute_s: f64,
    pub h2d_s: f64,
    pub d2h_s: f64,
    pub host_attention_s: f64,
    pub disk_read_s: f64,
    pub disk_write_s: f64,
    /// The host memory those streams share (a floor, not a stream of its own).
    pub host_memory_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Predicted {
    pub prefill_s: f64,
    pub decode_step_s: f64,
    pub total_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub end_to_end_tokens_per_s: f64,
    pub bound_by: String,
    pub streams: PredictedStreams,
    /// Peak bytes per tier.
    pub memory_bytes: TierBytes,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Links {
    /// Host → GPU on the copy stream (weights, fetched KV, queries); 0 on the CPU.
    pub h2d_bytes: u64,
    /// GPU → host on the copy stream (spills, partials); 0 on the CPU.
    pub d2h_bytes: u64,
    /// Weight bytes fetched from host memory to the GPU.
    pub weights_h2d_bytes: u64,
    /// KV moved from the GPU tier to the host tier.
    pub kv_gpu_to_host_bytes: u64,
    /// KV spilled from host memory to disk.
    pub kv_host_to_disk_bytes: u64,
    /// KV read from disk by the storage attention engine.
    pub kv_disk_to_host_bytes: u64,
    /// Weights of the layers placed on disk, read back for every pass.
    pub weights_disk_to_host_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MeasuredStreams {
    pub h2d_s: f64,
    pub d2h_s: f64,
    pub host_attention_s: f64,
    pub storage_attention_s: f64,
    pub disk_write_s: f64,
    /// Seconds passes waited for layers read from disk (their reads not hidden by compute).
    pub weights_disk_wait_s: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PeakBytes {
    pub gpu_kv: u64,
    pub host_kv: u64,
    pub disk_kv: u64,
    pub host_rss: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decode_step_s: f64,
    /// One-time GEMM tuning in this run (shapes new to the machine), left out of `prefill_s`
    /// and `decode_s`: otherwise the policy run first would pay for shapes the others find
    /// tuned.
    pub gemm_tuning_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub end_to_end_tokens_per_s: f64,
    pub links: Links,
    pub streams: MeasuredStreams,
    pub peak: PeakBytes,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct TimeRatios {
    #[serde(deserialize_with = "nan_if_null")]
    pub prefill: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub decode_step: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub total: f64,
}

/// serde_json writes a ratio that is not a number (a zero time below it) as `null`; a report
/// read back by `--resume` gets NaN there again.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn ratios_nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn bytes(b: u64) -> String {
    if b == 0 { "0".into() } else { human_bytes(b) }
}

/// What a run spent on GEMM tuning, when it spent any.
fn tuning_line(m: &Measured) -> Option<String> {
    (m.gemm_tuning_s > 0.0).then(|| {
        format!(
            "{:.2} s of GEMM tuning (shapes new to this machine), left out of its times",
            m.gemm_tuning_s
        )
    })
}

/// The Markdown tables: a line on the targets, then per configuration, throughput and ratios,
/// then links, streams and memory, then what did not run and why, exactness and the targets.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}\n", targets::summary(&r.configs));
    for c in &r.configs {
        let _ = writeln!(
            s,
            "### {}: batch {}, prompt {}, generate {} (context {})\n",
            c.model, c.batch, c.prompt_len, c.gen_len, c.context
        );
        if let Some(n) = &c.note {
            let _ = writeln!(s, "**Note:** {n}.\n");
        }
        if let Some(f) = &c.carried_from {
            let _ = writeln!(s, "**Carried over** from {f}, not run again.\n");
        }
        let others: Vec<&str> = r.policies.iter().map(String::as_str).collect();
        let _ = write!(
            s,
            "| policy | status | prefill tok/s | decode tok/s | end-to-end tok/s |"
        );
        for o in &others {
            let _ = write!(s, " vs {o} |");
        }
        let _ = writeln!(
            s,
            " predicted end-to-end tok/s | measured / predicted time | bound by (predicted) |"
        );
        let _ = writeln!(s, "|{}", "---|".repeat(8 + others.len()));
        for run in &c.runs {
            let m = run.measured.as_ref();
            let cell = |f: fn(&Measured) -> f64| m.map_or("–".into(), |m| num(f(m)));
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} |",
                run.policy,
                run.status.label(),
                cell(|m| m.prefill_tokens_per_s),
                cell(|m| m.decode_tokens_per_s),
                cell(|m| m.end_to_end_tokens_per_s)
            );
            for o in &others {
                let v = run
                    .ratios
                    .get(*o)
                    .map_or("–".into(), |x| format!("{x:.2}×"));
                let _ = write!(s, " {v} |");
            }
            let p = run.predicted.as_ref();
            let _ = writeln!(
                s,
                " {} | {} | {} |",
                p.map_or("–".into(), |p| num(p.end_to_end_tokens_per_s)),
                run.measured_over_predicted
                    .map_or("–".into(), |t| format!("{:.2}×", t.total)),
                p.map_or("–".into(), |p| p.bound_by.clone())
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| policy | host→GPU | GPU→host | weights fetched | weights disk→host | \
             KV host→disk | KV disk→host | host attention s | storage attention s | disk write s \
             | peak GPU KV | peak host KV | peak disk KV | peak RSS | \
             predicted memory GPU / host / disk |"
        );
        let _ = writeln!(s, "|{}", "---|".repeat(15));
        for run in &c.runs {
            let mem = run.predicted.as_ref().map_or("–".into(), |p| {
                format!(
                    "{} / {} / {}",
                    bytes(p.memory_bytes.gpu),
                    bytes(p.memory_bytes.host),
                    bytes(p.memory_bytes.disk)
                )
            });
            let Some(m) = &run.measured else {
                let _ = writeln!(s, "| {} |{} {mem} |", run.policy, " – |".repeat(13));
                continue;
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {mem} |",
                run.policy,
                bytes(m.links.h2d_bytes),
                bytes(m.links.d2h_bytes),
                bytes(m.links.weights_h2d_bytes),
                bytes(m.links.weights_disk_to_host_bytes),
                bytes(m.links.kv_host_to_disk_bytes),
                bytes(m.links.kv_disk_to_host_bytes),
                num(m.streams.host_attention_s),
                num(m.streams.storage_attention_s),
                num(m.streams.disk_write_s),
                bytes(m.peak.gpu_kv),
                bytes(m.peak.host_kv),
                bytes(m.peak.disk_kv),
                bytes(m.peak.host_rss)
            );
        }
        let _ = writeln!(s);
        for run in &c.runs {
            let flags = run
                .flexgen_flags
                .as_deref()
                .map_or(String::new(), |f| format!(" (`{f}`)"));
            let _ = writeln!(s, "- **{}**: {}{flags}", run.policy, run.source);
            if let Some(reason) = &run.reason {
                let _ = writeln!(s, "  - {}: {reason}", run.status.label());
            }
            if let Some(line) = run.measured.as_ref().and_then(tuning_line) {
                let _ = writeln!(s, "  - {line}");
            }
            for n in &run.notes {
                let _ = writeln!(s, "  - {n}");
            }
        }
        let _ = match c.exact {
            Some(true) => writeln!(
                s,
                "- exactness: the same tokens under every policy that ran"
            ),
            Some(false) => {
                let how: Vec<String> = c
                    .divergences
                    .iter()
                    .map(|d| {
                        format!(
                            "{}: {} of {} sequences, from generated token {}; {} of {} tokens \
                             equal",
                            d.policy,
                            d.sequences_differing,
                            d.sequences,
                            d.first_differing_token,
                            d.tokens_equal,
                            d.tokens
                        )
                    })
                    .collect();
                let how = if how.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", how.join("; "))
                };
                writeln!(
                    s,
                    "- exactness: **TOKENS DIFFER** under {}{how}",
                    c.mismatches.join(", ")
                )
            }
            None => writeln!(s, "- exactness: fewer than two policies ran"),
        };
        for t in &c.targets {
            let _ = writeln!(s, "{}", targets::markdown_line(t));
        }
        let _ = writeln!(s);
    }
    s
}

/// Escapes text for SVG.
fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// End-to-end throughput against context length: one line per policy (and per model and batch
/// when the report has several), log-scaled axes when the values span a wide range.
pub fn svg(r: &Report) -> String {
    let models: std::collections::BTreeSet<&str> =
        r.configs.iter().map(|c| c.model.as_str()).collect();
    let batches: std::collections::BTreeSet<u64> = r.configs.iter().map(|c| c.batch).collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for c in &r.configs {
        for run in &c.runs {
            let Some(m) = &run.measured else { continue };
            let mut key = run.policy.clone();
            if models.len() > 1 {
                key += &format!(" {}", c.model.trim_start_matches("synthetic:"));
            }
            if batches.len() > 1 {
                key += &format!(" b={}", c.batch);
            }
            series
                .entry(key)
                .or_default()
                .push((c.context as f64, m.end_to_end_tokens_per_s));
        }
    }
    let (w, h) = (760.0, 440.0);
    let (l, rgt, top, bot) = (70.0, 220.0, 40.0, 50.0);
    let pts: Vec<(f64, f64)> = series.values().flatten().copied().collect();
    let range = |f: fn(&(f64, f64)) -> f64| {
        let lo = pts.iter().map(f).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() && lo > 0.0 {
            (lo, hi)
        } else {
            (1.0, 10.0)
        }
    };
    let axis = |(lo, hi): (f64, f64)| {
        let log = hi / lo > 20.0;
        let (a, b) = if log {
            (lo.log10().floor(), hi.log10().ceil())
        } else if hi > lo {
            (0.0, hi * 1.1)
        } else {
            (0.0, hi * 2.0)
        };
        (log, a, b.max(a + 1e-9))
    };
    let (xlog, x0, x1) = axis(range(|p| p.0));
    let (ylog, y0, y1) = axis(range(|p| p.1));
    let pw = w - l - rgt;
    let ph = h - top - bot;
    let sx = |x: f64| {
        let v = if xlog { x.log10() } else { x };
        l + (v - x0) / (x1 - x0) * pw
    };
    let sy = |y: f64| {
        let v = if ylog { y.max(1e-12).log10() } else { y };
        top + ph - (v - y0) / (y1 - y0) * ph
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
    );
    let title = format!(
        "strata bench{}: end-to-end tokens/s vs context",
        r.preset
            .as_deref()
            .map_or(String::new(), |p| format!(" {p}"))
    );
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="22" font-size="15">{}</text>"#,
        esc(&title)
    );
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for (log, a, b, is_x) in [(xlog, x0, x1, true), (ylog, y0, y1, false)] {
        for i in 0..=4 {
            let v = a + (b - a) * i as f64 / 4.0;
            let value = if log { 10f64.powf(v) } else { v };
            let label = esc(&num(value));
            if is_x {
                let x = sx(value);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
                    top + ph,
                    top + ph + 16.0
                );
            } else {
                let y = sy(value);
                let _ = writeln!(
                    s,
                    r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
                    l + pw,
                    l - 6.0,
                    y + 4.0
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">context length (prompt + generated tokens{})</text>"#,
        l + pw / 2.0,
        h - 12.0,
        if xlog { ", log scale" } else { "" }
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">end-to-end tokens/s{}</text>"#,
        top + ph / 2.0,
        if ylog { " (log scale)" } else { "" }
    );
    for (i, (name, pts)) in series.iter_mut().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(x, y) in pts.iter() {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                sx(x),
                sy(y)
            );
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = l + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            esc(name)
        );
    }
    if series.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no policy ran</text>"#,
            l + pw / 2.0,
            top + ph / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The dated `bench/RESULTS.md` entry: machine, GPU, command, then the tables.
pub fn results_entry(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## {}: strata bench{}\n",
        r.date.split(' ').next().unwrap_or(&r.date),
        r.preset
            .as_deref()
            .map_or(String::new(), |p| format!(" --preset {p}"))
    );
    let _ = writeln!(
        s,
        "- **Machine**: {} ({} cores), {} of memory; GPU: {}; device `{}`.",
        r.machine.cpu,
        r.machine.cpu_cores,
        bytes(r.machine.memory_bytes),
        r.machine.gpu.as_deref().unwrap_or("none"),
        r.machine.device
    );
    let _ = writeln!(
        s,
        "- **GEMMs**: `--gpu-gemm {}` for every policy, and predicted so.",
        r.gpu_gemm
    );
    let _ = writeln!(
        s,
        "- **Profile**: {}{}.",
        r.profile.machine,
        if r.profile.reference {
            " (a reference profile, not a measurement of this machine)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "- **Budgets**: GPU {}, host {}, disk {}.",
        bytes(r.budgets.gpu_bytes),
        bytes(r.budgets.host_bytes),
        bytes(r.budgets.disk_bytes)
    );
    let _ = writeln!(s, "- **Run at**: {}.\n", r.date);
    let _ = writeln!(s, "```sh\n{}\n```\n", r.command);
    s.push_str(&markdown(r));
    s
}

/// `YYYY-MM-DD HH:MM UTC` for a Unix time (civil-from-days, proleptic Gregorian).
pub fn utc_date(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_tuned_gemms_says_how_long_and_that_its_times_leave_it_out() {
        let tuned = Measured {
            gemm_tuning_s: 0.094,
            ..Measured::default()
        };
        assert_eq!(
            tuning_line(&tuned).as_deref(),
            Some("0.09 s of GEMM tuning (shapes new to this machine), left out of its times")
        );
        assert_eq!(tuning_line(&Measured::default()), None);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
    }
}
