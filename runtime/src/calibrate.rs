//! `strata calibrate`: measures this machine and writes the planner's [`HardwareProfile`].
//!
//! What is measured, and how (every rate is the best of a few timed repetitions after a warm-up):
//! - **GPU** (when one is usable; [`DeviceCalibrator`], CUDA events): cuBLAS GEMM of `[n, n]`
//!   matrices per dtype, a device-to-device copy (HBM), and copies between page-locked host
//!   memory and the device (H2D, D2H). Capacity: the GPU's total memory.
//!   Through the runtime's own kernels (`CudaBackend`, NVRTC-compiled on first use): causal
//!   prefill attention, one 8192-token prompt on Llama-3-8B's heads over bf16 KV; and a decode
//!   step's two big readers, the weights `linear` streams at 1 to 256 rows (one Llama-3-8B
//!   layer's seven bf16 projections, `--gpu-gemm rounded`: `gpu_weight_gbps`) and the KV the
//!   split-KV decode kernel reads for 1 to 64 sequences of 4,096 tokens, fitted as a fixed cost
//!   per launch plus a rate (`gpu_decode_attention_call_us`, `gpu_decode_attention_gbps`).
//!   And the host's time to issue a decode layer at 1, 16 and 64 sequences
//!   (`decode_issue_us`): `strata generate` in a process of its own on a model whose GPU work
//!   is small (Llama-3-8B's attention, a small MLP and vocabulary); and, the same way on
//!   Llama-3-8B's real layers, what a decode layer takes on the GPU beyond what the planner
//!   charges its weights and KV at the rates above (`decode_layer_extra_us`: the small kernels
//!   and the stream's gaps between kernels).
//! - **Host**: a multi-threaded memcpy (rayon), and the host attention engine
//!   ([`attend_batch`]) over bf16 KV blocks (what the host tier stores on a GPU run) of
//!   Llama-3-8B's geometry, one decode query, and per block size (16 to 128 tokens) in calls
//!   of 32 to 256 MiB, 8 and 16 sequences, every (size, call) taking turns over the same blocks,
//!   fitted as a fixed cost per call plus a rate (`host_attention_layer_gbps`,
//!   `host_attention_call_us`). With a GPU, that scan again while another thread
//!   keeps copying page-locked memory to the device: the two contend for the host's memory, and
//!   the sum of both rates is the profile's `host_memory_shared_gbps`, and the scan's rate
//!   there over its rate alone is `host_attention_beside_copies`. And the CPU backend's
//!   matrix-vector products at 32 rows over bf16 weights (`host_mlp_gflops`: the host MLP
//!   share's rate where its rows make it compute-bound), and one layer's host MLP share timed
//!   as a decode step calls it at 1 to 32 rows (`host_mlp_layer_gbps`, which the planner
//!   charges the share at). The host attention calls and the host MLP calls each read other
//!   data, rotating through 16 times the last-level cache (`past_the_cache_bytes`), as a
//!   run's do: it finds none of its KV or weights cached.
//!   Capacity: `MemAvailable`.
//! - **Disk** (only with a directory): a temporary file written then read with O_DIRECT through
//!   the chosen IO engine, at 1 MiB requests, and read again at 64 KiB requests; the two reads fit
//!   the profile's request-size model (`bw(r) = B·r / (r + h)`, `h` clamped to [4 KiB, 1 MiB]).
//!   The file is removed afterwards, also on error. Capacity: the directory's free space.
//!
//! Conventions (the planner's, see `planner/src/profile.rs`): GB = 10⁹ bytes; `hbm_gbps` counts
//! bytes read + written (a copy of `n` bytes moves `2n`), every other bandwidth counts each byte
//! once. Without a GPU the "GPU" is the CPU, as in [`HardwareProfile::cpu_only_reference`]: GEMM
//! rates are the CPU backend's `linear`, HBM is host memory (read + written), host ↔ device
//! copies are memcpy, and the available memory is split evenly between the two tiers. Without a
//! disk directory the disk rates are placeholders, `disk_bytes = 0`, `disk_measured = false`.
//! `gpu_layer_overhead_us` is [`DECODE_OPS_PER_LAYER`] (a fitted count) times the measured fixed
//! cost of one small op (allocate its output, launch, free) on the GPU; without a GPU it keeps the CPU reference
//! profile's value.
//!
//! `quick` scales every size down (about a quarter), for the calibration `plan` runs on first use.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use strata_kernels::attention::{AttentionQuery, attend_batch, split_chunk_blocks};
use strata_kernels::cuda::calibrate::DeviceCalibrator;
use strata_kernels::{
    AttentionGeometry, Backend, CpuBackend, DType, HostWeight, KernelError, KvBlockView,
    WeightData, testing,
};
use strata_planner::HOST_MLP_MAX_ROWS;
use strata_planner::{GemmTflops, HardwareProfile, PROFILE_VERSION, ProfileError};
use strata_storage::{
    ArenaSlots, FileIdx, IoBackend, IoBufPool, IoDir, IoEngine, SlotId, open_backend, open_direct,
};

use crate::kv::slot_kv;
use crate::units::format_size;

const MIB: usize = 1 << 20;
/// Disk request sizes: large (the asymptote) and small (the fit of the half-bandwidth size).
const DISK_LARGE: usize = MIB;
const DISK_SMALL: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("--disk-dir {}: {reason}", path.display())]
    DiskDir { path: PathBuf, reason: String },
    #[error("disk measurement in {}: {detail}", path.display())]
    Disk { path: PathBuf, detail: String },
    #[error("--device cuda:{device}: {reason}")]
    NoGpu { device: usize, reason: String },
    #[error("GPU measurement ({what}) failed: {source}")]
    Gpu {
        what: &'static str,
        source: KernelError,
    },
    #[error("CPU GEMM measurement failed: {0}")]
    Cpu(KernelError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("cannot create {}: {source}", path.display())]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cache directory for the hardware profile (neither XDG_CACHE_HOME nor HOME is set); pass --profile FILE"
    )]
    NoCacheDir,
    #[error("host memory for the host attention measurement ({bytes} bytes): {reason}")]
    HostMemory { bytes: usize, reason: String },
}

/// Which device to measure: `Auto` uses GPU 0 when it is usable, else the CPU (saying why).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// Smaller sizes: a few seconds (2 s on the H100 machine and on a 2-core box).
    pub quick: bool,
    /// Directory on the disk to measure; `None` leaves the disk unmeasured.
    pub disk_dir: Option<PathBuf>,
    pub io_engine: IoEngine,
    pub queue_depth: usize,
    pub device: DeviceChoice,
    /// Host threads to measure the host's figures with (`generate --threads`); `None`: the
    /// default a run on this device uses ([`crate::host_threads`]).
    pub threads: Option<usize>,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            quick: false,
            disk_dir: None,
            io_engine: IoEngine::Auto,
            queue_depth: 32,
            device: DeviceChoice::Auto,
            threads: None,
        }
    }
}

/// Where a consumer (`plan`, later `generate` and `bench`) gets its profile.
#[derive(Clone, Debug, Default)]
pub struct ProfileOptions {
    /// A given profile file; `None`: the calibrated one in the cache directory.
    pub profile: Option<PathBuf>,
    /// How to calibrate when the cache has none (`quick` is forced on).
    pub calibrate: CalibrateOptions,
}

impl ProfileOptions {
    /// The file the profile comes from (or is written to): the given one, else the default.
    pub fn path(&self) -> Option<PathBuf> {
        self.profile.clone().or_else(default_profile_path)
    }
}

/// `$XDG_CACHE_HOME/strata/profile.json`, else `~/.cache/strata/profile.json`: the folder that
/// also holds the PTX cache.
pub fn default_profile_path() -> Option<PathBuf> {
    let ptx = strata_kernels::cuda::default_ptx_cache_dir()?;
    Some(ptx.parent()?.join("profile.json"))
}

/// Rough duration of a quick calibration, for the first-use note (measured: 1.7 s on the H100
/// machine, 2.4 s on a busy 2-core box).
pub const QUICK_SECONDS: u32 = 5;

/// The given profile; else the one in the cache directory; else a quick calibration of this
/// machine (announced on stderr), written to the cache directory when there is one.
pub fn load_or_calibrate(opts: &ProfileOptions) -> Result<HardwareProfile, CalibrateError> {
    if let Some(path) = &opts.profile {
        return Ok(HardwareProfile::load(path)?);
    }
    let path = default_profile_path();
    if let Some(p) = path.as_deref().filter(|p| p.exists()) {
        return Ok(HardwareProfile::load(p)?);
    }
    let shown = path
        .as_deref()
        .map_or("(no cache directory)".into(), |p| p.display().to_string());
    eprintln!(
        "note: no hardware profile at {shown}; calibrating this machine (about {QUICK_SECONDS} s; \
         run `strata calibrate` to redo it)"
    );
    let quick = CalibrateOptions {
        quick: true,
        ..opts.calibrate.clone()
    };
    let cal = calibrate(&quick)?;
    for n in &cal.notes {
        eprintln!("note: {n}");
    }
    match &path {
        Some(p) => {
            save_profile(&cal.profile, p)?;
            eprintln!("note: wrote hardware profile {}", p.display());
        }
        None => eprintln!("note: neither XDG_CACHE_HOME nor HOME is set: the profile is not saved"),
    }
    Ok(cal.profile)
}

/// `strata calibrate`: measures, writes the profile to `profile` (default: the cache directory),
/// prints the summary on stdout. Returns the path written.
pub fn run_cli(
    opts: &CalibrateOptions,
    profile: Option<PathBuf>,
) -> Result<PathBuf, CalibrateError> {
    let path = profile
        .or_else(default_profile_path)
        .ok_or(CalibrateError::NoCacheDir)?;
    let cal = calibrate(opts)?;
    save_profile(&cal.profile, &path)?;
    cal.print_summary();
    println!(
        "wrote {} ({:.1} s{})",
        path.display(),
        cal.seconds,
        if opts.quick { ", --quick" } else { "" }
    );
    Ok(path)
}

/// Checks the profile (the same checks as loading it), then writes it through a temporary file
/// and a rename, so a killed calibration never leaves a torn profile.
pub fn save_profile(p: &HardwareProfile, path: &Path) -> Result<(), CalibrateError> {
    HardwareProfile::from_json(&p.to_json(), path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CalibrateError::CacheDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    p.save(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ProfileError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(())
}

/// A measured profile, with the table `strata calibrate` prints.
#[derive(Debug)]
pub struct Calibration {
    pub profile: HardwareProfile,
    /// `(what, value, how)` per measurement.
    pub rows: Vec<(String, String, String)>,
    /// What was not measured, and why.
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl Calibration {
    pub fn print_summary(&self) {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        println!("machine: {}", self.profile.machine);
        for (what, value, how) in &self.rows {
            println!("  {what:<w0$}  {value:>w1$}  {how}");
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

/// A decode layer's fixed cost in units of the probe op (allocate, one cuBLAS launch, free):
/// what a layer costs beyond its weights and KV read at their kernels' calibrated rates. A
/// layer issues about 17 device ops (RMSNorm, q/k/v, RoPE ×2, KV append, attention, output
/// projection, add, RMSNorm, gate, up, SwiGLU, down, add) plus the block-table and slot
/// uploads; the small ones take 2–5 µs of GPU time each, and the GPU waits between some of
/// them for the host to issue the next. Fitted on an H100 (2026-11-23, Llama-3-8B, 2K-token
/// prompts): kernel by kernel (Nsight Compute) the small kernels took 37 and 44 µs per layer at
/// batch 1 and 16, and the measured steps exceeded all kernel time by another 63 and 75 µs per
/// layer; 101–120 µs against a 12.7 µs probe, about 9 probe ops. The planner adds it to a
/// decode layer only where the profile has no measured issue time (`decode_issue_us`), and to
/// every prefill layer.
pub const DECODE_OPS_PER_LAYER: usize = 9;

/// The size of the CPU's last-level cache (Linux sysfs: the highest cache level of CPU 0), or
/// `None` where it cannot be read.
fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut best: Option<(u32, usize)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let read = |f: &str| std::fs::read_to_string(entry.path().join(f)).ok();
        let (Some(level), Some(size)) = (read("level"), read("size")) else {
            continue;
        };
        let (Ok(level), Some(bytes)) = (level.trim().parse::<u32>(), parse_cache_size(&size))
        else {
            continue;
        };
        if best.is_none_or(|(l, _)| level > l) {
            best = Some((level, bytes));
        }
    }
    best.map(|(_, bytes)| bytes)
}

/// A sysfs cache size: `32768K`, `300M`, or bytes.
fn parse_cache_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = digits.parse().ok()?;
    match unit.trim() {
        "" => Some(n),
        "K" | "KB" | "KiB" => Some(n << 10),
        "M" | "MB" | "MiB" => Some(n << 20),
        "G" | "GB" | "GiB" => Some(n << 30),
        _ => None,
    }
}

/// Bytes a host measurement rotates through so that cache hits cannot lift it: 16 times the
/// last-level cache (at most 1/16 of its reads can hit), within 1 to 8 GiB; 1 GiB when the cache
/// size is unknown. A run's host KV and weights are tens of GiB read once per step, so a
/// calibration over a buffer the cache can partly hold (1 GiB beside a 300 MiB L3, as on some
/// H100 hosts) overstates the rate the run gets.
fn past_the_cache_bytes(llc: Option<usize>) -> usize {
    llc.map_or(1 << 30, |b| (16 * b).clamp(1 << 30, 8 << 30))
}

/// Sizes of each measurement (bytes unless named otherwise).
struct Sizes {
    gpu_gemm_n: usize,
    prefill_tokens: usize,
    gpu_gemm_reps: usize,
    hbm: usize,
    pinned: usize,
    host_copy: usize,
    /// Bytes the host measurements rotate through: the host attention's KV, and the copies of
    /// the host MLP weights; many times the last-level cache, as a run's are.
    host_kv: usize,
    /// The CPU's last-level cache, where sysfs gives it.
    llc: Option<usize>,
    cpu_gemm_rows: usize,
    cpu_gemm_dim: usize,
    disk_file: u64,
    disk_small_read: u64,
    op_reps: usize,
    /// Rounds per timing of the decode projections and launches of the decode attention.
    decode_reps: usize,
    /// Whether to time decode layers (six `generate` runs):
    /// not in `--quick`.
    decode_issue: bool,
    trials: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        // Two host buffers of each kind at most: keep them within a quarter of what is free.
        let avail = crate::mem_available_bytes().unwrap_or(8 << 30) as usize;
        let host = |b: usize| b.min(avail / 8).max(16 * MIB);
        // `--quick` keeps to 1 GiB (a quarter of it), which a large last-level cache can
        // partly hold: quicker, and rougher on such machines.
        let llc = last_level_cache_bytes();
        let past_cache = if quick {
            1 << 30
        } else {
            past_the_cache_bytes(llc)
        };
        let s = if quick { 4 } else { 1 };
        Sizes {
            gpu_gemm_n: 4096,
            prefill_tokens: 8192 / s,
            gpu_gemm_reps: 20 / s,
            op_reps: 2000 / s,
            decode_reps: 10 / s.min(2),
            decode_issue: !quick,
            hbm: (1 << 30) / s,
            pinned: (1 << 30) / s,
            host_copy: host((1 << 30) / s),
            host_kv: host(past_cache / s),
            llc,
            cpu_gemm_rows: 512 / s,
            cpu_gemm_dim: 4096 / s.min(2),
            disk_file: (1 << 30) / s as u64,
            disk_small_read: (256 << 20) / s as u64,
            trials: if quick { 2 } else { 3 },
        }
    }
}

/// One progress step per measurement: a bar on a terminal, else one line each.
struct Steps(Option<ProgressBar>);

impl Steps {
    fn new(total: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Steps(None);
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("calibrating {bar:20} {pos}/{len} {msg} [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Steps(Some(bar))
    }
    fn step(&self, what: &str) {
        match &self.0 {
            Some(bar) => {
                bar.set_message(what.to_string());
                bar.inc(1);
            }
            None => eprintln!("calibrating: {what}"),
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Measures this machine (see the module header).
pub fn calibrate(opts: &CalibrateOptions) -> Result<Calibration, CalibrateError> {
    let t0 = Instant::now();
    let sz = Sizes::new(opts.quick);
    // Check the directory before measuring anything, so a bad flag fails at once.
    if let Some(dir) = &opts.disk_dir {
        check_disk_dir(dir)?;
    }
    let mut notes = Vec::new();
    let gpu = open_gpu(opts.device, &mut notes)?;
    // Host figures are measured with the threads a run on this device uses.
    let threads = opts
        .threads
        .unwrap_or_else(|| crate::host_threads(gpu.is_some()))
        .max(1);
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(|| measure(opts, &sz, gpu, notes, t0)),
        Err(_) => measure(opts, &sz, gpu, notes, t0),
    }
}

/// [`calibrate`]'s measurements, on the current thread pool.
fn measure(
    opts: &CalibrateOptions,
    sz: &Sizes,
    gpu: Option<DeviceCalibrator>,
    mut notes: Vec<String>,
    t0: Instant,
) -> Result<Calibration, CalibrateError> {
    let steps = Steps::new(if gpu.is_some() { 15 } else { 7 } + opts.disk_dir.is_some() as u64);
    let mut rows = Vec::new();
    let mut row = |what: &str, value: String, how: String| rows.push((what.into(), value, how));
    let threads = rayon::current_num_threads();

    steps.step("host memory copy");
    let host_copy = host_copy_gbps(sz.host_copy, sz.trials);
    row(
        "host memory",
        format!("{host_copy:.1} GB/s"),
        format!(
            "memcpy of {}, {threads} threads",
            format_size(sz.host_copy as u64)
        ),
    );
    steps.step("host attention");
    // Kept for the GPU's shared-memory measurement, which times the same scan beside copies.
    let scan = HostAttentionScan::new(sz.host_kv, DType::BF16, 32)?;
    let one_call = scan.gbps(sz.trials);
    // A run attends layer by layer in calls of tens of MiB; the planner gets what those reach.
    let calls_32 = scan.decode_layer_calls();
    let host_attention = calls_32.gbps().min(one_call);
    row(
        "host attention",
        format!("{host_attention:.1} GB/s"),
        format!(
            "KV bytes attended in decode-layer calls (8 sequences, {} per call, after idle, \
             rotating through {}; last-level cache {}), {threads} threads; one call over all of \
             it: {one_call:.1} GB/s",
            format_size(DECODE_LAYER_KV.min(sz.host_kv) as u64),
            format_size(sz.host_kv as u64),
            sz.llc.map_or("unknown".into(), |b| format_size(b as u64)),
        ),
    );
    steps.step("host attention per block size");
    let shapes = host_attention_call_shapes(sz.host_kv);
    let fits = host_attention_by_block(sz.host_kv)?;
    let by_block: Vec<[f64; 2]> = HOST_ATTENTION_BLOCKS
        .into_iter()
        .zip(&fits)
        .map(|(bt, f)| [bt as f64, f.gbps])
        .collect();
    // One fixed cost per call in the profile: the median of the sizes' fitted ones.
    let mut fixed: Vec<f64> = fits.iter().map(|f| f.call_us).collect();
    fixed.sort_by(f64::total_cmp);
    let call_us = fixed.get(fixed.len() / 2).copied().unwrap_or(0.0);
    row(
        "host attention call",
        format!("{call_us:.0} µs"),
        format!(
            "fixed cost of one call (median over the block sizes) and KV GB/s beyond it, \
             fitted per block size over the median calls of {} (after idle, each call reading the \
             next bytes of the buffer): {}",
            shapes
                .iter()
                .map(|(seqs, b)| format!("{seqs} sequences × {}", format_size((b / seqs) as u64)))
                .collect::<Vec<_>>()
                .join(", "),
            HOST_ATTENTION_BLOCKS
                .iter()
                .zip(&fits)
                .map(|(bt, f)| format!(
                    "{bt} tokens {:.1} GB/s + {:.0} µs (calls alone: {})",
                    f.gbps,
                    f.call_us,
                    f.by_shape
                        .iter()
                        .map(|g| format!("{g:.1}"))
                        .collect::<Vec<_>>()
                        .join(" / ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    steps.step("host MLP");
    let (host_mlp_gflops, how) = host_mlp_gflops(sz.trials)?;
    row("host MLP", format!("{host_mlp_gflops:.0} GFLOP/s"), how);
    let (host_mlp_layer, how) = host_mlp_layer_gbps(opts.quick, sz.host_kv)?;
    let at_8 = host_mlp_layer
        .iter()
        .find(|[r, _]| *r == 8.0)
        .map_or(0.0, |p| p[1]);
    row("host MLP layer", format!("{at_8:.1} GB/s at 8 rows"), how);
    let host_avail = crate::mem_available_bytes().unwrap_or(0);

    let mut p = HardwareProfile {
        version: PROFILE_VERSION,
        machine: String::new(),
        measured_at: utc_now_iso8601(),
        reference: false,
        has_gpu: gpu.is_some(),
        gemm_tflops: GemmTflops {
            f32: 0.0,
            f16: 0.0,
            bf16: 0.0,
        },
        hbm_gbps: 2.0 * host_copy,
        h2d_gbps: host_copy,
        d2h_gbps: host_copy,
        host_mem_gbps: host_copy,
        host_attention_gbps: host_attention,
        disk_read_gbps: HardwareProfile::cpu_only_reference().disk_read_gbps,
        disk_write_gbps: HardwareProfile::cpu_only_reference().disk_write_gbps,
        disk_measured: false,
        disk_half_bandwidth_request_bytes: HardwareProfile::cpu_only_reference()
            .disk_half_bandwidth_request_bytes,
        gpu_layer_overhead_us: HardwareProfile::cpu_only_reference().gpu_layer_overhead_us,
        prefill_attention_tflops: None,
        prefill_attention_f32_tflops: None,
        host_memory_shared_gbps: None,
        host_mlp_gflops: Some(host_mlp_gflops),
        host_mlp_layer_gbps: Some(host_mlp_layer),
        host_attention_layer_gbps: Some(by_block),
        host_attention_call_us: Some(call_us),
        host_attention_beside_copies: None,
        gpu_weight_gbps: None,
        gpu_decode_attention_gbps: None,
        gpu_decode_attention_call_us: None,
        decode_issue_us: None,
        decode_layer_extra_us: None,
        host_tier_issue_us: None,
        gpu_bytes: host_avail / 2,
        host_bytes: host_avail - host_avail / 2,
        disk_bytes: 0,
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let gpu_name = match &gpu {
        Some(cal) => {
            measure_gpu(cal, sz, &scan, one_call, &steps, &mut p, &mut row)?;
            let device = cal.device_info().ordinal;
            measure_gpu_kernels(device, sz, &steps, &mut p, &mut row, &mut notes)?;
            cal.device_info().name.clone()
        }
        None => {
            measure_cpu_gemm(sz, &steps, &mut p, &mut row)?;
            "no GPU (the CPU computes)".to_string()
        }
    };
    let disk = match &opts.disk_dir {
        Some(dir) => {
            steps.step("disk write and read");
            let d = measure_disk(dir, opts, sz)?;
            p.disk_read_gbps = d.read_asymptote_gbps;
            p.disk_write_gbps = d.write_asymptote_gbps;
            p.disk_half_bandwidth_request_bytes = d.half_bytes;
            p.disk_measured = true;
            p.disk_bytes = d.free_bytes;
            let how = format!(
                "{}, O_DIRECT{}, QD {}, {} file in {}",
                d.engine,
                if d.direct { "" } else { " refused: page cache" },
                opts.queue_depth,
                format_size(d.file_bytes),
                dir.display()
            );
            row(
                "disk write",
                format!("{:.2} GB/s", d.write_gbps),
                format!("1 MiB requests + fsync; {how}"),
            );
            row(
                "disk read",
                format!("{:.2} GB/s", d.read_gbps),
                format!(
                    "1 MiB requests ({:.2} GB/s at 64 KiB); profile: {:.2} GB/s large-request \
                     asymptote, half at {}",
                    d.small_read_gbps,
                    p.disk_read_gbps,
                    format_size(d.half_bytes)
                ),
            );
            if !d.direct {
                notes.push(format!(
                    "{} refuses O_DIRECT: disk figures include the page cache",
                    dir.display()
                ));
            }
            format!("disk {} ({})", dir.display(), d.engine)
        }
        None => {
            notes.push(
                "disk not measured (no --disk-dir): the profile's disk rates are placeholders \
                 and its disk capacity is 0; run `strata calibrate --disk-dir DIR` on the disk \
                 the KV cache will use"
                    .into(),
            );
            "disk not measured".to_string()
        }
    };
    drop(steps);
    let cap = |b: u64| format_size(b);
    let (gpu_cap, host_cap) = if p.has_gpu {
        ("GPU total memory", "MemAvailable")
    } else {
        (
            "no GPU: half of MemAvailable (the CPU's working memory)",
            "the other half of MemAvailable",
        )
    };
    row("GPU capacity", cap(p.gpu_bytes), gpu_cap.into());
    row("host capacity", cap(p.host_bytes), host_cap.into());
    row(
        "disk capacity",
        cap(p.disk_bytes),
        if p.disk_measured {
            "free space in --disk-dir".into()
        } else {
            "not measured".into()
        },
    );
    p.machine = format!(
        "{gpu_name}, {} CPU cores ({}), {disk}",
        p.cpu_cores,
        cpu_model()
    );
    Ok(Calibration {
        profile: p,
        rows,
        notes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn check_disk_dir(dir: &Path) -> Result<(), CalibrateError> {
    let bad = |reason: String| CalibrateError::DiskDir {
        path: dir.to_path_buf(),
        reason,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))
}

fn open_gpu(
    choice: DeviceChoice,
    notes: &mut Vec<String>,
) -> Result<Option<DeviceCalibrator>, CalibrateError> {
    match choice {
        DeviceChoice::Cpu => {
            notes.push("--device cpu: GPU not measured; the CPU is the compute device".into());
            Ok(None)
        }
        DeviceChoice::Cuda(device) => {
            DeviceCalibrator::new(device)
                .map(Some)
                .map_err(|e| CalibrateError::NoGpu {
                    device,
                    reason: e.to_string(),
                })
        }
        DeviceChoice::Auto => match DeviceCalibrator::new(0) {
            Ok(cal) => Ok(Some(cal)),
            Err(e) => {
                notes.push(format!(
                    "no GPU found ({e}): the profile's GPU fields describe the CPU \
                     (has_gpu = false)"
                ));
                Ok(None)
            }
        },
    }
}

type Row<'a> = dyn FnMut(&str, String, String) + 'a;

fn measure_gpu(
    cal: &DeviceCalibrator,
    sz: &Sizes,
    scan: &HostAttentionScan,
    scan_alone_gbps: f64,
    steps: &Steps,
    p: &mut HardwareProfile,
    row: &mut Row<'_>,
) -> Result<(), CalibrateError> {
    let err = |what| move |source| CalibrateError::Gpu { what, source };
    let (free, total) = cal.memory_info().map_err(err("memory info"))?;
    p.gpu_bytes = total as u64;
    let n = sz.gpu_gemm_n;
    let how = |reps| format!("cuBLAS {n}³, {reps} per timing, best of {}", sz.trials);
    let gemm = |dtype: DType, reps: usize| {
        steps.step(&format!("GPU GEMM {}", dtype.name()));
        cal.gemm_tflops(dtype, n, reps, sz.trials)
            .map_err(err("GEMM"))
    };
    p.gemm_tflops = GemmTflops {
        bf16: gemm(DType::BF16, sz.gpu_gemm_reps)?,
        f16: gemm(DType::F16, sz.gpu_gemm_reps)?,
        // SGEMM is ~15× slower: fewer repetitions.
        f32: gemm(DType::F32, 2)?,
    };
    let g = &p.gemm_tflops;
    row(
        "GEMM bf16",
        format!("{:.1} TFLOP/s", g.bf16),
        how(sz.gpu_gemm_reps),
    );
    row(
        "GEMM f16",
        format!("{:.1} TFLOP/s", g.f16),
        how(sz.gpu_gemm_reps),
    );
    row(
        "GEMM f32",
        format!("{:.1} TFLOP/s", g.f32),
        how(2) + " (SGEMM, no TF32)",
    );

    steps.step("GPU memory copy");
    let hbm_bytes = sz.hbm.min(free / 4).max(MIB);
    let copied = cal
        .dtod_copy_gbps(hbm_bytes, 5, sz.trials)
        .map_err(err("device copy"))?;
    p.hbm_gbps = 2.0 * copied;
    row(
        "HBM",
        format!("{:.0} GB/s", p.hbm_gbps),
        format!(
            "bytes read + written ({copied:.0} GB/s copied), device copy of {}",
            format_size(hbm_bytes as u64)
        ),
    );

    steps.step("host <-> GPU copies");
    let pinned = sz.pinned.min(free / 4).max(MIB);
    let (h2d, d2h) = cal
        .pinned_copy_gbps(pinned, 3, sz.trials)
        .map_err(err("pinned copies"))?;
    (p.h2d_gbps, p.d2h_gbps) = (h2d, d2h);
    let how = format!("page-locked host memory, {}", format_size(pinned as u64));
    row("host -> device", format!("{h2d:.1} GB/s"), how.clone());
    row("device -> host", format!("{d2h:.1} GB/s"), how);
    p.host_bytes = crate::mem_available_bytes().unwrap_or(0);

    steps.step("host memory shared with copies");
    let (scanned, copied) = cal
        .h2d_beside(pinned, || scan.gbps(sz.trials))
        .map_err(err("host memory shared with copies"))?;
    p.host_memory_shared_gbps = Some(scanned + copied);
    let kept = (scanned / scan_alone_gbps).clamp(1e-3, 1.0);
    p.host_attention_beside_copies = Some(kept);
    row(
        "host memory, shared",
        format!("{:.1} GB/s", scanned + copied),
        format!(
            "host attention {scanned:.1} GB/s ({:.0}% of its {scan_alone_gbps:.1} GB/s alone) \
             while host -> device copies ran at {copied:.1} GB/s",
            100.0 * kept
        ),
    );

    steps.step("fixed cost per op");
    let per_op = cal
        .op_overhead_us(sz.op_reps, sz.trials)
        .map_err(err("op overhead"))?;
    p.gpu_layer_overhead_us = DECODE_OPS_PER_LAYER as f64 * per_op;
    row(
        "layer overhead",
        format!("{:.0} µs", p.gpu_layer_overhead_us),
        format!(
            "{DECODE_OPS_PER_LAYER} × {per_op:.1} µs, the fixed cost of one small op (allocate, \
             launch, free)"
        ),
    );
    Ok(())
}

/// Rows at which `calibrate` times the GPU's decode projections (`gpu_weight_gbps`).
pub const GPU_WEIGHT_ROWS: [usize; 8] = [1, 4, 8, 16, 32, 64, 128, 256];
/// Sequences at which it times the GPU's decode attention (`gpu_decode_attention_gbps`,
/// `gpu_decode_attention_call_us`).
pub const GPU_DECODE_SEQUENCES: [usize; 4] = [1, 4, 16, 64];
/// Tokens per sequence of that measurement (16-token blocks).
const GPU_DECODE_CONTEXT: usize = 4096;

/// The rates of the runtime's own GPU kernels the planner charges (compiled through NVRTC
/// first if not cached): causal prefill attention, and a decode step's two big readers, the
/// projections' weights at decode rows and the decode attention's KV.
fn measure_gpu_kernels(
    device: usize,
    sz: &Sizes,
    steps: &Steps,
    p: &mut HardwareProfile,
    row: &mut Row<'_>,
    notes: &mut Vec<String>,
) -> Result<(), CalibrateError> {
    let err = |what| move |source| CalibrateError::Gpu { what, source };
    steps.step("GPU prefill attention");
    let gpu = strata_kernels::CudaBackend::new(device).map_err(|e| CalibrateError::NoGpu {
        device,
        reason: e.to_string(),
    })?;
    // f32 KV runs the generic kernel: a quarter of the prompt keeps the step short.
    let kinds = [
        (
            DType::BF16,
            sz.prefill_tokens,
            "prefill attention",
            "bf16 KV",
            1,
        ),
        (
            DType::F32,
            (sz.prefill_tokens / 4).max(64),
            "prefill attention f32",
            "f32 KV (the generic kernel)",
            2,
        ),
    ];
    for (dtype, tokens, name, kv, digits) in kinds {
        let tflops = gpu
            .prefill_attention_tflops(dtype, tokens, sz.trials)
            .map_err(err(name))?;
        match dtype {
            DType::F32 => p.prefill_attention_f32_tflops = Some(tflops),
            _ => p.prefill_attention_tflops = Some(tflops),
        }
        row(
            name,
            format!("{tflops:.digits$} TFLOP/s"),
            format!(
                "causal, one {tokens}-token prompt, Llama-3-8B heads, {kv}, best of {}",
                sz.trials
            ),
        );
    }

    steps.step("GPU decode projections");
    // What the planner's decode predictions assume a run uses (`--gpu-gemm rounded`; split
    // runs GEMMs of more than 8 rows twice).
    gpu.set_gemm_precision(strata_kernels::GemmPrecision::Rounded);
    let reps = sz.decode_reps;
    let rates = gpu
        .decode_linear_gbps(&GPU_WEIGHT_ROWS, reps, sz.trials)
        .map_err(err("decode projections"))?;
    let table: Vec<[f64; 2]> = GPU_WEIGHT_ROWS
        .iter()
        .zip(&rates)
        .map(|(&r, &g)| [r as f64, g])
        .collect();
    row(
        "decode projections",
        format!("{:.0} GB/s at 1 row", rates[0]),
        format!(
            "bf16 weights streamed by linear, one Llama-3-8B layer's seven projections (436 MB a \
             round, {reps} rounds, best of {}): {}",
            sz.trials,
            table_list(&table, "rows", "GB/s")
        ),
    );
    p.gpu_weight_gbps = Some(table);

    steps.step("GPU decode attention");
    let times = gpu
        .decode_attention_times(
            &GPU_DECODE_SEQUENCES,
            GPU_DECODE_CONTEXT,
            16,
            reps,
            sz.trials,
        )
        .map_err(err("decode attention"))?;
    let (gbps, call_us) = fit_launch_line(&times);
    row(
        "decode attention",
        format!("{gbps:.0} GB/s + {call_us:.1} µs"),
        format!(
            "bf16 KV read by the split-KV decode kernel, a line through its launches over \
             {GPU_DECODE_CONTEXT}-token sequences in 16-token blocks ({reps} launches, best of \
             {}): {}",
            sz.trials,
            GPU_DECODE_SEQUENCES
                .iter()
                .zip(&times)
                .map(|(b, (bytes, s))| format!(
                    "{b} sequences {:.1} µs ({:.0} GB/s)",
                    s * 1e6,
                    bytes / s / 1e9
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    p.gpu_decode_attention_gbps = Some(gbps);
    p.gpu_decode_attention_call_us = Some(call_us);
    drop(gpu);

    steps.step("decode layers: host issue, GPU extra");
    if !sz.decode_issue {
        notes.push(
            "--quick: a decode layer's host issue and GPU extra not measured; the planner charges \
             `gpu_layer_overhead_us` per layer instead (run `strata calibrate` for them)"
                .into(),
        );
        return Ok(());
    }
    let prompt = if p.gpu_bytes >= DECODE_ISSUE_LONG_GPU_BYTES {
        DECODE_ISSUE_PROMPT
    } else {
        DECODE_ISSUE_SHORT_PROMPT
    };
    let issue =
        time_decode_steps(device, DECODE_ISSUE_MODEL, prompt, DecodeKv::Gpu).and_then(|runs| {
            let layers = model_config(DECODE_ISSUE_MODEL)?.layers;
            Ok(runs
                .iter()
                .map(|r| [r.sequences as f64, r.step_s / layers as f64 * 1e6])
                .collect::<Vec<_>>())
        });
    match issue {
        Ok(table) => {
            row(
                "decode issue",
                format!("{:.0} µs a layer", table[0][1]),
                format!(
                    "host time per decode layer issuing the GPU's work ({DECODE_ISSUE_MODEL}, \
                     {prompt}-token prompts, {DECODE_ISSUE_TOKENS} new tokens, a process of its \
                     own): {}",
                    table_list(&table, "sequences", "µs")
                ),
            );
            p.decode_issue_us = Some(table);
        }
        Err(why) => notes.push(format!(
            "host issue per decode layer not measured ({why}): the planner charges \
             `gpu_layer_overhead_us` per layer instead"
        )),
    }
    // Real layer shapes: the GPU's time in a stream, less what the model charges the kernels.
    let model = DECODE_EXTRA_MODEL;
    let extra = time_decode_steps(device, model, prompt, DecodeKv::Gpu).and_then(|runs| {
        let spec = crate::policy_exec::model_spec(model, &model_config(model)?);
        runs.iter()
            .map(|r| {
                Ok([
                    r.sequences as f64,
                    decode_layer_extra_us(p, &spec, prompt, r)?,
                ])
            })
            .collect::<Result<Vec<_>, String>>()
    });
    match extra {
        Ok(table) => {
            row(
                "decode extra",
                format!("{:.0} µs a layer", table[0][1]),
                format!(
                    "GPU time per decode layer beyond its weights and KV at the rates above \
                     ({model}, {prompt}-token prompts, {DECODE_ISSUE_TOKENS} new tokens): {}",
                    table_list(&table, "sequences", "µs")
                ),
            );
            p.decode_layer_extra_us = Some(table);
        }
        Err(why) => notes.push(format!(
            "GPU extra per decode layer not measured ({why}): the planner charges {:.0} µs \
             of small kernels per layer instead",
            strata_planner::DECODE_SMALL_KERNELS_S * 1e6
        )),
    }
    if p.decode_issue_us.is_some() {
        // Llama-3-8B's layers with every token but the newest in host memory, attended there.
        // Short prompts: the host tier holds every sequence's older KV, and what is measured is
        // the time beside its attention, not the attention.
        let (model, prompt) = (DECODE_EXTRA_MODEL, DECODE_ISSUE_SHORT_PROMPT);
        let tier = time_decode_steps(device, model, prompt, DecodeKv::HostTier).and_then(|runs| {
            let spec = crate::policy_exec::model_spec(model, &model_config(model)?);
            runs.iter()
                .map(|r| {
                    let us = host_tier_issue_us(p, &spec, prompt, r)?;
                    Ok(([r.sequences as f64, us], r.host_attention_s))
                })
                .collect::<Result<Vec<_>, String>>()
        });
        match tier {
            Ok(runs) => {
                let table: Vec<[f64; 2]> = runs.iter().map(|r| r.0).collect();
                row(
                    "host-tier turns",
                    format!("{:.0} µs a layer", table[table.len() / 2][1]),
                    format!(
                        "time per decode layer around its host attention (queries down, \
                         partials up, merge) beyond what the model charges its kernels, issue \
                         and measured host attention ({model}, {prompt}-token prompts, all but \
                         the newest {HOST_TIER_HOT_TOKENS} tokens in host memory, attended \
                         there; host attention {} a step): {}",
                        runs.iter()
                            .map(|(_, h)| format!("{:.1} ms", h * 1e3))
                            .collect::<Vec<_>>()
                            .join(" / "),
                        table_list(&table, "sequences", "µs")
                    ),
                );
                p.host_tier_issue_us = Some(table);
            }
            Err(why) => notes.push(format!(
                "time around a decode layer's host attention not measured ({why}): the planner \
                 charges none"
            )),
        }
    }
    Ok(())
}

/// The line `seconds = call + bytes / rate` through `(bytes, seconds)` launches, least squares:
/// (rate in GB/s, call in µs). A fit that would make either negative (noise on a flat
/// measurement) keeps the rate of the largest launch and no fixed cost.
pub fn fit_launch_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(x, y) in points {
        sxx += (x - mx) * (x - mx);
        sxy += (x - mx) * (y - my);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let call = my - slope * mx;
    if slope > 0.0 && call >= 0.0 {
        return (1.0 / slope / 1e9, call * 1e6);
    }
    let &(x, y) = points
        .iter()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or(&(1.0, 1.0));
    (x / y / 1e9, 0.0)
}

/// Sequences at which `calibrate` times decode layers (`decode_issue_us`,
/// `decode_layer_extra_us`).
pub const DECODE_ISSUE_ROWS: [usize; 3] = [1, 16, 64];
/// The model whose decode step times the host's issue: Llama-3-8B's 32 layers and attention
/// (so the same kernels, launches and per-sequence bookkeeping), with an MLP and a vocabulary
/// small enough that the GPU's work per layer stays well under the host's.
const DECODE_ISSUE_MODEL: &str = "synthetic:llama-3-8b:intermediate=256:vocab=256";
/// The model whose decode step times a layer's GPU extra: Llama-3-8B's layers as they are (the
/// cuBLASLt kernels a decode picks depend on the shapes), 16 of them (7 GB of weights: quicker to
/// make than 32, and they fit a 24 GB GPU), and a small vocabulary. What a step
/// costs once (sampling, its setup) is spread over 16 layers here rather than a real run's
/// 32, so the extra carries a little more of it than a 32-layer model's layers do.
const DECODE_EXTRA_MODEL: &str = "synthetic:llama-3-8b:layers=16:vocab=256";
/// Prompt tokens per sequence: the per-sequence work grows with a sequence's blocks, so a
/// context of the size the runs have (2K: 64 sequences hold 16 GiB of KV), or 512 tokens on a
/// GPU of less than [`DECODE_ISSUE_LONG_GPU_BYTES`].
const DECODE_ISSUE_PROMPT: usize = 2048;
const DECODE_ISSUE_SHORT_PROMPT: usize = 512;
const DECODE_ISSUE_LONG_GPU_BYTES: u64 = 48 << 30;
/// New tokens: enough decode steps for a median (the first step carries one-time costs).
const DECODE_ISSUE_TOKENS: usize = 16;

/// One timed decode: `sequences` prompts, the median decode step, the KV block size it ran, and
/// its host attention per step (0 when its KV was all on the GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeRun {
    pub sequences: usize,
    pub step_s: f64,
    pub block_tokens: usize,
    pub host_attention_s: f64,
}

/// Where a timed decode keeps its KV: all on the GPU, or ([`DecodeKv::HostTier`]) the newest
/// [`HOST_TIER_HOT_TOKENS`] tokens on the GPU and the older ones in host memory, attended there.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DecodeKv {
    Gpu,
    HostTier,
}

/// Tokens of each sequence the host-tier decode keeps on the GPU (the newest): its layers
/// attend on both sides and merge, as a run's that splits its KV do.
const HOST_TIER_HOT_TOKENS: u64 = 128;

/// The policy of a [`DecodeKv::HostTier`] decode of `sequences` sequences: weights on the GPU,
/// one GPU batch, 32-token blocks, the newest [`HOST_TIER_HOT_TOKENS`] tokens on the GPU and
/// the rest in host memory, attended there.
fn host_tier_policy(sequences: usize) -> strata_planner::Policy {
    use strata_planner::{Attention, KvPlacement, POLICY_VERSION, PerTier, Policy, Tier};
    let only = |gpu: f64, host: f64| PerTier {
        gpu,
        host,
        disk: 0.0,
    };
    Policy {
        version: POLICY_VERSION,
        weights: only(1.0, 0.0),
        kv: KvPlacement {
            hot_window_tokens: HOST_TIER_HOT_TOKENS,
            hot_tier: Tier::Gpu,
            cold: only(0.0, 1.0),
        },
        recompute: only(0.0, 0.0),
        attention_host: Attention::AttendNear,
        attention_disk: Attention::FetchToGpu,
        gpu_batch_size: sequences as u64,
        num_gpu_batches: 1,
        kv_block_tokens: 32,
        prefetch_depth: 1,
        host_mlp_share: 0.0,
    }
}

/// What a host-tier decode layer took beyond the model ([`DecodeKv::HostTier`] `run` of `spec`'s
/// layers at `prompt`-token prompts): the measured step less its measured host attention, the
/// head and the pipeline's fill, over the layers, less the GPU side the planner charges such a
/// layer without this term (`profile` as calibrated so far), in µs, never negative.
pub fn host_tier_issue_us(
    profile: &HardwareProfile,
    spec: &strata_planner::ModelSpec,
    prompt: usize,
    run: &DecodeRun,
) -> Result<f64, String> {
    let wl = decode_workload(run.sequences, prompt);
    let policy = host_tier_policy(run.sequences);
    policy.validate(&wl).map_err(|e| e.to_string())?;
    let mut without = profile.clone();
    without.host_tier_issue_us = None;
    let step = strata_planner::predict(spec, &wl, &policy, &without).decode_step;
    Ok(beyond_model_us(
        run.step_s - run.host_attention_s,
        &step,
        spec.layers,
    ))
}

/// The workload of the calibration's timed decodes: `sequences` prompts of `prompt` tokens,
/// [`DECODE_ISSUE_TOKENS`] new ones.
fn decode_workload(sequences: usize, prompt: usize) -> strata_planner::Workload {
    strata_planner::Workload {
        batch: sequences as u64,
        prompt_len: prompt as u64,
        gen_len: DECODE_ISSUE_TOKENS as u64,
    }
}

/// What a measured decode step of `step_s` took per layer beyond the modelled `step`'s GPU
/// compute, once the LM head and the pipeline's fill are taken out, in µs, never negative.
fn beyond_model_us(step_s: f64, step: &strata_planner::PhaseTime, layers: u64) -> f64 {
    let measured = (step_s - step.head_s - step.pipeline_fill_s) / layers.max(1) as f64;
    ((measured - step.per_layer.gpu_compute_s) * 1e6).max(0.0)
}

/// The config of `model` (a synthetic spec: nothing is loaded).
fn model_config(model: &str) -> Result<crate::model::ModelConfig, String> {
    crate::model::open(model)
        .map(|m| m.config)
        .map_err(|e| e.to_string())
}

/// A decode at each of [`DECODE_ISSUE_ROWS`] sequences of `prompt` tokens, [`DECODE_ISSUE_TOKENS`]
/// new tokens: `strata generate` runs the synthetic `model` on the GPU in a process of its own,
/// as a user's run is, with everything on the GPU. Returns each run's median decode step, or
/// why it could not be timed.
fn time_decode_steps(
    device: usize,
    model: &str,
    prompt: usize,
    kv: DecodeKv,
) -> Result<Vec<DecodeRun>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating strata: {e}"))?;
    if exe.file_stem().and_then(|s| s.to_str()) != Some("strata") {
        return Err(format!("{} is not the strata binary", exe.display()));
    }
    let dir = std::env::temp_dir().join(format!("strata-calibrate-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _cleanup = TempDir(dir.clone());
    let mut runs = Vec::with_capacity(DECODE_ISSUE_ROWS.len());
    for b in DECODE_ISSUE_ROWS {
        let (input, output, stats) = (
            dir.join(format!("p{b}.jsonl")),
            dir.join(format!("o{b}.jsonl")),
            dir.join(format!("s{b}.json")),
        );
        let prompts: String = (0..b)
            .map(|i| {
                let ids: Vec<String> = (0..prompt)
                    .map(|j| ((i * 31 + j * 7) % 240 + 8).to_string())
                    .collect();
                format!("{{\"id\":{i},\"input_ids\":[{}]}}\n", ids.join(","))
            })
            .collect();
        std::fs::write(&input, prompts).map_err(|e| format!("{}: {e}", input.display()))?;
        let path = |p: &Path| p.display().to_string();
        let mut placement: Vec<String> = Vec::new();
        if kv == DecodeKv::HostTier {
            let policy = dir.join(format!("policy{b}.json"));
            let json = serde_json::to_string(&host_tier_policy(b)).map_err(|e| e.to_string())?;
            std::fs::write(&policy, json).map_err(|e| format!("{}: {e}", policy.display()))?;
            // Room for every token's KV twice over, and a block per sequence and layer.
            let cfg = model_config(model)?;
            let spec = crate::policy_exec::model_spec(model, &cfg);
            let tokens = (prompt + DECODE_ISSUE_TOKENS + 32) as u64;
            let host = 2 * b as u64 * tokens * spec.kv_bytes_per_token_per_layer() * spec.layers
                + (256 << 20);
            placement.extend(["--policy".into(), path(&policy)]);
            placement.extend(["--host-mem".into(), host.to_string()]);
        }
        let out = std::process::Command::new(&exe)
            .args(["generate", "--model", model])
            .args(&placement)
            .args([
                "--device",
                &format!("cuda:{device}"),
                "--gpu-gemm",
                "rounded",
            ])
            .args(["--batch-size", &b.to_string(), "--ignore-eos"])
            .args(["--max-new-tokens", &DECODE_ISSUE_TOKENS.to_string()])
            .args(["--input", &path(&input), "--output", &path(&output)])
            .args(["--stats-json", &path(&stats)])
            .output()
            .map_err(|e| format!("running {}: {e}", exe.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "`strata generate --model {model}` at {b} sequences failed: {}",
                err.lines().last().unwrap_or("no message")
            ));
        }
        let s: serde_json::Value = std::fs::read_to_string(&stats)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| format!("{}: no run statistics", stats.display()))?;
        // The median step: the first carries one-time costs (a new GEMM shape's setup, first
        // allocations) that on an H100 made it two to four times the steps after it.
        let steps: Vec<f64> = s["decode_step_seconds"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default();
        let step_s = crate::policy_exec::median(&steps).unwrap_or(0.0);
        if step_s <= 0.0 {
            return Err(format!("{}: no decode steps timed", stats.display()));
        }
        let host_attention = s["kv"]["host_attention_seconds"].as_f64().unwrap_or(0.0);
        runs.push(DecodeRun {
            sequences: b,
            step_s,
            block_tokens: s["kv_block_tokens"].as_u64().unwrap_or(0) as usize,
            host_attention_s: host_attention / steps.len().max(1) as f64,
        });
    }
    Ok(runs)
}

/// What a decode layer of `run` took on the GPU beyond what the planner charges its weights and
/// KV, in µs per layer (never negative): the measured step, less the LM head, over the layers,
/// less the layer's GPU compute in [`modelled_decode_step`].
pub fn decode_layer_extra_us(
    profile: &HardwareProfile,
    spec: &strata_planner::ModelSpec,
    prompt: usize,
    run: &DecodeRun,
) -> Result<f64, String> {
    let step = modelled_decode_step(profile, spec, prompt, run.sequences, run.block_tokens)?;
    Ok(beyond_model_us(run.step_s, &step, spec.layers))
}

/// The decode step the planner predicts for `sequences` prompts of `prompt` tokens (and
/// [`DECODE_ISSUE_TOKENS`] new ones) with everything on the GPU, in `block_tokens`-token
/// blocks, at `profile`'s rates with no per-layer overhead, issue time or extra: the weights
/// and KV alone.
fn modelled_decode_step(
    profile: &HardwareProfile,
    spec: &strata_planner::ModelSpec,
    prompt: usize,
    sequences: usize,
    block_tokens: usize,
) -> Result<strata_planner::PhaseTime, String> {
    let wl = decode_workload(sequences, prompt);
    let unbounded = strata_planner::Budgets {
        gpu_bytes: u64::MAX,
        host_bytes: u64::MAX,
        disk_bytes: u64::MAX,
    };
    let policy = strata_planner::gpu_only(spec, &wl, &unbounded, block_tokens.max(1) as u64)
        .map_err(|e| e.to_string())?;
    let mut kernels_only = profile.clone();
    kernels_only.gpu_layer_overhead_us = 0.0;
    kernels_only.decode_issue_us = None;
    kernels_only.decode_layer_extra_us = None;
    Ok(strata_planner::predict(spec, &wl, &policy, &kernels_only).decode_step)
}

/// Removes a directory and what it holds when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `1 rows 2650 GB/s, 4 rows …` for a calibration row's `[x, value]` table.
fn table_list(table: &[[f64; 2]], x_unit: &str, unit: &str) -> String {
    table
        .iter()
        .map(|[x, v]| format!("{x:.0} {x_unit} {v:.0} {unit}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// No GPU: the compute device is the CPU, so its GEMM rates are the CPU backend's `linear`.
fn measure_cpu_gemm(
    sz: &Sizes,
    steps: &Steps,
    p: &mut HardwareProfile,
    row: &mut Row<'_>,
) -> Result<(), CalibrateError> {
    let (m, k) = (sz.cpu_gemm_rows, sz.cpu_gemm_dim);
    let be = CpuBackend::new();
    let x = be
        .tensor(m, k, pseudo_random(m * k))
        .map_err(CalibrateError::Cpu)?;
    let rate = |dtype: DType| -> Result<f64, CalibrateError> {
        steps.step(&format!("CPU GEMM {}", dtype.name()));
        let w = HostWeight::new(k, k, WeightData::F32(pseudo_random(k * k)).cast(dtype))
            .and_then(|w| be.upload_weight(w))
            .map_err(CalibrateError::Cpu)?;
        be.linear(&x, &w, None).map_err(CalibrateError::Cpu)?;
        let secs = best_secs(sz.trials, || be.linear(&x, &w, None).map(drop))
            .map_err(CalibrateError::Cpu)?;
        Ok(2.0 * (m * k * k) as f64 / secs / 1e12)
    };
    p.gemm_tflops = GemmTflops {
        f32: rate(DType::F32)?,
        f16: rate(DType::F16)?,
        bf16: rate(DType::BF16)?,
    };
    let g = p.gemm_tflops;
    let how = format!("CPU backend linear, [{m}, {k}] x [{k}, {k}]");
    row("GEMM bf16", format!("{:.3} TFLOP/s", g.bf16), how.clone());
    row("GEMM f16", format!("{:.3} TFLOP/s", g.f16), how.clone());
    row("GEMM f32", format!("{:.3} TFLOP/s", g.f32), how);
    row(
        "HBM (no GPU)",
        format!("{:.1} GB/s", p.hbm_gbps),
        "host memory, bytes read + written".into(),
    );
    row(
        "host <-> device",
        format!("{:.1} GB/s", p.h2d_gbps),
        "no GPU: host memory copies".into(),
    );
    Ok(())
}

/// GFLOP/s of the CPU backend's matrix-vector products at [`HOST_MLP_MAX_ROWS`] rows over bf16
/// weights: the host MLP share at its most rows, where the cores (not the memory) bound it.
/// Returns the rate and how it was measured.
fn host_mlp_gflops(trials: usize) -> Result<(f64, String), CalibrateError> {
    let (m, n, k) = (HOST_MLP_MAX_ROWS as usize, 8192, 4096);
    let be = CpuBackend::new();
    let x = be
        .tensor(m, k, pseudo_random(m * k))
        .map_err(CalibrateError::Cpu)?;
    let w = HostWeight::new(
        n,
        k,
        WeightData::F32(pseudo_random(n * k)).cast(DType::BF16),
    )
    .map_err(CalibrateError::Cpu)?;
    be.linear(&x, &w, None).map_err(CalibrateError::Cpu)?;
    let secs =
        best_secs(trials, || be.linear(&x, &w, None).map(drop)).map_err(CalibrateError::Cpu)?;
    let how = format!(
        "CPU backend linear, [{m}, {k}] x bf16 [{n}, {k}], {} threads",
        rayon::current_num_threads()
    );
    Ok((2.0 * (m * n * k) as f64 / secs / 1e9, how))
}

/// Rows the host MLP share is timed at, as a decode step's GPU batches give it.
const HOST_MLP_ROWS: [usize; 5] = [1, 4, 8, 16, 32];

/// The host MLP share as a decode step runs it: one layer's share of Llama-3-8B's MLP (half its
/// neurons: gate and up `[7168, 4096]`, down `[4096, 7168]`, bf16; a quarter of them when
/// `quick`) through the CPU backend's `linear` and `swiglu`, as the run calls them, at each of
/// [`HOST_MLP_ROWS`] rows. Each call comes after a pause that lets the threads go idle (as they
/// do while the GPU computes between layers) and reads a different copy of the weights than the
/// one before, so none finds them in cache. Returns `[rows, weight GB/s]` pairs and how.
fn host_mlp_layer_gbps(
    quick: bool,
    working_set: usize,
) -> Result<(Vec<[f64; 2]>, String), CalibrateError> {
    const CALLS: usize = 6;
    let (hidden, neurons) = (4096, if quick { 1792 } else { 7168 });
    let be = CpuBackend::new();
    let weight = |rows: usize, cols: usize| {
        HostWeight::new(
            rows,
            cols,
            WeightData::F32(pseudo_random(rows * cols)).cast(DType::BF16),
        )
    };
    let bytes = (3 * neurons * hidden * DType::BF16.size_bytes()) as f64;
    // Each call reads another copy, through a set many times the cache (copies of the first:
    // the values do not matter, only that no call finds its weights cached).
    let n_copies = (working_set as f64 / bytes).ceil().max(2.0) as usize;
    let first = (
        weight(neurons, hidden).map_err(CalibrateError::Cpu)?,
        weight(neurons, hidden).map_err(CalibrateError::Cpu)?,
        weight(hidden, neurons).map_err(CalibrateError::Cpu)?,
    );
    let mut copies = vec![first];
    while copies.len() < n_copies {
        let c = copies[0].clone();
        copies.push(c);
    }
    let mut out = Vec::with_capacity(HOST_MLP_ROWS.len());
    let mut next = 0;
    for rows in HOST_MLP_ROWS {
        let x = be
            .tensor(rows, hidden, pseudo_random(rows * hidden))
            .map_err(CalibrateError::Cpu)?;
        let mut secs = 0.0;
        for call in 0..=CALLS {
            let (gate, up, down) = &copies[next % copies.len()];
            next += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
            let t = Instant::now();
            let act = (|| {
                let a = be.swiglu(&be.linear(&x, gate, None)?, &be.linear(&x, up, None)?)?;
                be.linear(&a, down, None)
            })()
            .map_err(CalibrateError::Cpu)?;
            std::hint::black_box(act);
            if call > 0 {
                secs += t.elapsed().as_secs_f64();
            }
        }
        out.push([rows as f64, bytes * CALLS as f64 / secs.max(1e-9) / 1e9]);
    }
    let how = format!(
        "one layer's share (gate, up, down: {} of bf16), decode-sized calls after idle, each \
         over another of {} copies ({}), {} threads: {}",
        format_size(bytes as u64),
        copies.len(),
        format_size((bytes as usize * copies.len()) as u64),
        rayon::current_num_threads(),
        out.iter()
            .map(|[r, g]| format!("{r:.0} rows {g:.1} GB/s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((out, how))
}

/// The shortest of `trials` runs of `f`, in seconds (at least 1 ns).
fn best_secs<E>(trials: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let mut best = f64::INFINITY;
    for _ in 0..trials.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best.max(1e-9))
}

/// Bytes copied per second by a memcpy split over all threads (each byte counted once).
fn host_copy_gbps(bytes: usize, trials: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let chunk = (bytes / rayon::current_num_threads().max(1) / 8).max(MIB);
    let mut copy = || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok::<(), ()>(())
    };
    let _ = copy(); // faults the destination's pages in
    let secs = best_secs(trials, copy).unwrap_or(f64::INFINITY);
    bytes as f64 / secs / 1e9
}

/// What host attention is timed on: one decode query over `bytes` of KV blocks in `dtype`
/// (Llama-3-8B: 32 query heads, 8 KV heads, head dim 128; 32-token blocks), split-KV over all
/// threads, as the host tier attends. The calibrator measures bf16, what the host tier holds on a
/// GPU run (the model's dtype, which the planner counts KV bytes in). Made once, timed alone and
/// again beside host→device copies.
struct HostAttentionScan {
    g: AttentionGeometry,
    kv: ArenaKv,
    q: Vec<f32>,
    block_bytes: usize,
}

impl HostAttentionScan {
    fn new(bytes: usize, dtype: DType, block_tokens: usize) -> Result<Self, CalibrateError> {
        let g = AttentionGeometry::new(32, 8, 128, block_tokens);
        let e = g.block_elems();
        let block_bytes = 2 * e * dtype.size_bytes();
        let blocks = (bytes / block_bytes).max(1);
        let kv = ArenaKv::new(dtype, blocks, e)?;
        let q = testing::bench_query(&g);
        Ok(Self {
            g,
            kv,
            q,
            block_bytes,
        })
    }

    /// KV bytes attended per second, the best of `trials` after one warm-up.
    fn gbps(&self, trials: usize) -> f64 {
        let (g, blocks) = (&self.g, self.kv.slots.len());
        let views = self.kv.views(g);
        let query = [AttentionQuery {
            q: &self.q,
            pos: blocks * g.block_tokens,
            blocks: &views,
        }];
        let chunk_blocks = split_chunk_blocks(blocks, 1, rayon::current_num_threads());
        let attend = || {
            std::hint::black_box(attend_batch(&query, g, chunk_blocks));
            Ok::<(), ()>(())
        };
        let _ = attend();
        let secs = best_secs(trials, attend).unwrap_or(f64::INFINITY);
        (blocks * self.block_bytes) as f64 / secs / 1e9
    }

    /// KV bytes attended per second in calls the size of a decode step's layer: 8 sequences
    /// over [`DECODE_LAYER_KV`] of blocks in all, split over the threads as the host tier splits
    /// them, each call after a pause that lets the threads go idle (as they do while the GPU
    /// computes between layers), moving through the whole buffer so no call finds its blocks
    /// in cache. Thread wake-up and the ends of the split count here, as they do in a run.
    fn decode_layer_calls(&self) -> LayerCalls {
        let views = self.kv.views(&self.g);
        let plan = LayerCallPlan::new(views.len(), self.block_bytes, 8, DECODE_LAYER_KV);
        let mut calls = calls_taking_turns(&[(self.g, views, plan)], &self.q, || self.gbps(1));
        calls.pop().unwrap_or(LayerCalls {
            bytes: 0,
            secs: Vec::new(),
        })
    }
}

/// Timed host attention calls of `bytes` of KV each ([`HostAttentionScan::decode_layer_calls`]).
struct LayerCalls {
    bytes: usize,
    secs: Vec<f64>,
}

impl LayerCalls {
    /// The median call's seconds (0 without calls).
    fn median_secs(&self) -> f64 {
        crate::policy_exec::median(&self.secs).unwrap_or(0.0)
    }

    /// KV bytes per second over the calls, each call's whole time.
    fn gbps(&self) -> f64 {
        let secs: f64 = self.secs.iter().sum();
        (self.bytes * self.secs.len()) as f64 / secs.max(1e-9) / 1e9
    }
}

/// Block sizes host attention is timed at: the planner's search space (`SearchSpace`).
const HOST_ATTENTION_BLOCKS: [usize; 4] = [16, 32, 64, 128];

/// The decode-layer calls of [`HostAttentionScan::decode_layer_calls`] over `blocks` blocks of
/// `block_bytes`: `seqs` sequences of `per_seq` blocks each (`call_bytes` in all at most),
/// moving window by window through the blocks twice (at least 4 calls).
struct LayerCallPlan {
    seqs: usize,
    per_seq: usize,
    calls: usize,
    block_bytes: usize,
    /// KV bytes one call attends.
    bytes: usize,
}

impl LayerCallPlan {
    /// Calls timed at most: enough for a stable sum, few enough that a dozen plans taking
    /// turns stay within a second or two.
    const MAX_CALLS: usize = 24;

    fn new(blocks: usize, block_bytes: usize, seqs: usize, call_bytes: usize) -> Self {
        let seqs = seqs.max(1);
        if blocks < seqs {
            return Self {
                seqs,
                per_seq: 0,
                calls: 4,
                block_bytes,
                bytes: blocks * block_bytes,
            };
        }
        let per_seq = (call_bytes / block_bytes / seqs).clamp(1, blocks / seqs);
        let windows = blocks / (per_seq * seqs);
        Self {
            seqs,
            per_seq,
            calls: (2 * windows).clamp(4, Self::MAX_CALLS),
            block_bytes,
            bytes: per_seq * seqs * block_bytes,
        }
    }

    /// Seconds of one call over `views` from view `first` on, after a 2 ms pause that lets
    /// the threads go idle; `whole` gives the one-call rate where there are too few blocks for
    /// the sequences.
    fn time(
        &self,
        first: usize,
        views: &[KvBlockView<'_>],
        g: &AttentionGeometry,
        q: &[f32],
        whole: impl Fn() -> f64,
    ) -> f64 {
        if self.per_seq == 0 {
            return self.bytes as f64 / (whole() * 1e9);
        }
        let (per_seq, seqs) = (self.per_seq, self.seqs);
        // The call's blocks in shuffled order, each sequence's numbered from position 0: a run
        // takes host slots as blocks are written, layer after layer and sequence after
        // sequence, so a sequence's next block is seldom in the next slot. In slot order, small
        // blocks read like large ones, and the calibration ranked 32-token blocks with 128-token
        // ones where a run attended them 1.5× slower.
        let mut window = views[first..first + per_seq * seqs].to_vec();
        shuffle(&mut window, first as u64);
        for seq in window.chunks_mut(per_seq) {
            for (j, v) in seq.iter_mut().enumerate() {
                v.start_pos = j * g.block_tokens;
            }
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk = split_chunk_blocks(per_seq, seqs, threads);
        let queries: Vec<AttentionQuery<'_>> = window
            .chunks(per_seq)
            .map(|blocks| AttentionQuery {
                q,
                pos: per_seq * g.block_tokens,
                blocks,
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let t = Instant::now();
        std::hint::black_box(attend_batch(&queries, g, chunk));
        t.elapsed().as_secs_f64()
    }
}

/// Whole blocks of `from_bt` tokens, each cut into blocks of `bt` tokens (`bt` divides it): each
/// block's K and V halves are cut alike, so every view has a block's layout
/// `[kv_heads, bt, head_dim]`, over synthetic values.
fn carved_views<'a>(whole: &[KvBlockView<'a>], from_bt: usize, bt: usize) -> Vec<KvBlockView<'a>> {
    let per = from_bt / bt;
    whole
        .iter()
        .flat_map(|w| (0..per).map(move |j| (w, j)))
        .enumerate()
        .map(|(i, (w, j))| {
            let e = w.k.len() / per;
            KvBlockView {
                k: w.k.slice(j * e..(j + 1) * e),
                v: w.v.slice(j * e..(j + 1) * e),
                start_pos: i * bt,
                len: bt,
            }
        })
        .collect()
}

/// KV blocks in one host arena, as the host tier keeps them (huge pages where the kernel grants
/// them: [`HostArena`](strata_storage::HostArena)), over synthetic values. Per-block heap
/// buffers, on 4 KiB pages, attended slower than a run's arena did.
struct ArenaKv {
    arena: ArenaSlots,
    slots: Vec<SlotId>,
    dtype: DType,
    /// K (and V) values of one block.
    elems: usize,
}

impl ArenaKv {
    fn new(dtype: DType, blocks: usize, elems: usize) -> Result<Self, CalibrateError> {
        let bytes = 2 * elems * dtype.size_bytes();
        let short = |e: strata_storage::StorageError| CalibrateError::HostMemory {
            bytes: blocks * bytes,
            reason: e.to_string(),
        };
        let mut arena = ArenaSlots::with_slots(blocks, bytes).map_err(short)?;
        let slots: Vec<SlotId> = (0..blocks).filter_map(|_| arena.alloc()).collect();
        let value = |b: usize, i: usize| (((b * 31 + i * 7) % 1000) as f32 / 500.0) - 1.0;
        let filled = match dtype {
            DType::F32 => arena.slots_f32_mut(&slots).map(|mut all| {
                all.par_iter_mut()
                    .enumerate()
                    .for_each(|(b, d)| d.iter_mut().enumerate().for_each(|(i, x)| *x = value(b, i)))
            }),
            DType::F16 | DType::BF16 => arena.slots_u16_mut(&slots).map(|mut all| {
                all.par_iter_mut().enumerate().for_each(|(b, d)| {
                    d.iter_mut().enumerate().for_each(|(i, x)| {
                        *x = match dtype {
                            DType::F16 => half::f16::from_f32(value(b, i)).to_bits(),
                            _ => half::bf16::from_f32(value(b, i)).to_bits(),
                        }
                    })
                })
            }),
        };
        filled.map_err(short)?;
        Ok(Self {
            arena,
            slots,
            dtype,
            elems,
        })
    }

    /// Every block whole, laid end to end from position 0.
    fn views(&self, g: &AttentionGeometry) -> Vec<KvBlockView<'_>> {
        let e = self.elems;
        self.slots
            .iter()
            .enumerate()
            .map(|(b, &slot)| {
                let s = slot_kv(&self.arena, slot, self.dtype);
                KvBlockView {
                    k: s.slice(0..e),
                    v: s.slice(e..2 * e),
                    start_pos: b * g.block_tokens,
                    len: g.block_tokens,
                }
            })
            .collect()
    }
}

/// Host attention at one block size, fitted over the median call of every shape in
/// [`host_attention_call_shapes`]: `seconds = call + bytes / rate`.
struct BlockSizeRate {
    gbps: f64,
    call_us: f64,
    /// Each shape's own rate, its bytes over its median call's time (fixed cost included).
    by_shape: Vec<f64>,
}

/// Calls (sequences, KV bytes) the per-block-size rates are fitted over, each at most a
/// quarter of the `bytes` rotated through. A long-context decode layer attends every sequence's
/// older blocks in one call: 16 sequences of 3,400 host tokens of Llama-3-8B's bf16 KV are
/// 223 MB. Timed only at 64 MiB, with a fixed cost from near-empty calls taken out, the rates
/// came out 20–40% above what such calls got in runs, and ranked the block sizes differently.
fn host_attention_call_shapes(bytes: usize) -> Vec<(usize, usize)> {
    let mut shapes: Vec<(usize, usize)> = [(8, 32 * MIB), (16, 128 * MIB), (16, 256 * MIB)]
        .into_iter()
        .map(|(seqs, call)| (seqs, call.min(bytes / 4)))
        .collect();
    shapes.dedup_by_key(|s| s.1);
    shapes
}

/// Host attention at each of [`HOST_ATTENTION_BLOCKS`] over the same `bytes` of KV
/// (128-token blocks cut to each size), in calls of each of [`host_attention_call_shapes`],
/// every (size, shape) taking turns call by call and each call reading the next bytes of the
/// buffer ([`calls_taking_turns`]). Timed one size after another, each over its own buffer,
/// the sizes drew different moments of a noisy host: on three H100 hosts their order changed
/// from host to host (64-token blocks at 0.89× the 32-token rate on one, 1.44× on another).
/// Taking turns, every size sees the same moments and the same pages.
fn host_attention_by_block(bytes: usize) -> Result<Vec<BlockSizeRate>, CalibrateError> {
    let base = HostAttentionScan::new(bytes, DType::BF16, 128)?;
    let shapes = host_attention_call_shapes(bytes);
    let mut plans: Vec<(AttentionGeometry, Vec<KvBlockView<'_>>, LayerCallPlan)> = Vec::new();
    for bt in HOST_ATTENTION_BLOCKS {
        let g = AttentionGeometry::new(32, 8, 128, bt);
        for &(seqs, call) in &shapes {
            let views = carved_views(&base.kv.views(&base.g), base.g.block_tokens, bt);
            let plan = LayerCallPlan::new(views.len(), base.block_bytes * bt / 128, seqs, call);
            plans.push((g, views, plan));
        }
    }
    let calls = calls_taking_turns(&plans, &base.q, || base.gbps(1));
    Ok(calls
        .chunks(shapes.len())
        .map(|per_shape| {
            // One point per call size, its median call: a few calls slowed by something else
            // on the host (one 256 MiB call took 2.6× the others on an H100 host) would tilt a
            // fit through every call, or flip its slope.
            let points: Vec<(f64, f64)> = per_shape
                .iter()
                .map(|c| (c.bytes as f64, c.median_secs()))
                .collect();
            let (gbps, call_us) = fit_launch_line(&points);
            BlockSizeRate {
                gbps,
                call_us,
                by_shape: points
                    .iter()
                    .map(|&(b, t)| b / t.max(1e-12) / 1e9)
                    .collect(),
            }
        })
        .collect())
}

/// The decode-layer calls of each `(geometry, views, plan)`, taking turns call by call; each
/// plan's first call warms it up and is left out. Every plan views the same buffer, and each
/// call reads the bytes after the last call's, wrapping at the end: a call never finds in cache
/// what another plan just read (sizes that read the same window one after another did: the
/// ones after the first got part of it from a 300 MiB last-level cache). `whole` gives the
/// one-call rate where a plan has too few blocks for its sequences.
fn calls_taking_turns(
    plans: &[(AttentionGeometry, Vec<KvBlockView<'_>>, LayerCallPlan)],
    q: &[f32],
    whole: impl Fn() -> f64,
) -> Vec<LayerCalls> {
    let mut calls: Vec<LayerCalls> = plans
        .iter()
        .map(|(_, _, plan)| LayerCalls {
            bytes: plan.bytes,
            secs: Vec::new(),
        })
        .collect();
    let rounds = plans.iter().map(|s| s.2.calls).max().unwrap_or(4);
    let mut cursor = CallCursor(0);
    for round in 0..rounds {
        for ((g, views, plan), c) in plans.iter().zip(&mut calls) {
            let at = cursor.take(plan.bytes, views.len() * plan.block_bytes);
            let secs = plan.time(at / plan.block_bytes.max(1), views, g, q, &whole);
            if round > 0 {
                c.secs.push(secs);
            }
        }
    }
    calls
}

/// Where the next call starts in a buffer the calls move through in turn: right after the last
/// call's bytes, or back at the start when the call would run past the end.
struct CallCursor(usize);

impl CallCursor {
    /// The byte offset of a call of `bytes` in a buffer of `total` bytes.
    fn take(&mut self, bytes: usize, total: usize) -> usize {
        if self.0 + bytes > total {
            self.0 = 0;
        }
        let at = self.0;
        self.0 += bytes;
        at
    }
}

/// KV bytes one layer of a decode step attends on the host in the calibration's decode-sized
/// calls (8 sequences of 4K tokens of Llama-3-8B's bf16 KV: 64 MiB).
const DECODE_LAYER_KV: usize = 64 * MIB;

struct DiskFigures {
    engine: &'static str,
    direct: bool,
    file_bytes: u64,
    free_bytes: u64,
    write_gbps: f64,
    read_gbps: f64,
    small_read_gbps: f64,
    read_asymptote_gbps: f64,
    write_asymptote_gbps: f64,
    half_bytes: u64,
}

/// Removes the file when dropped (after the backends that use it: declare it first).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn measure_disk(
    dir: &Path,
    opts: &CalibrateOptions,
    sz: &Sizes,
) -> Result<DiskFigures, CalibrateError> {
    let fail = |detail: String| CalibrateError::Disk {
        path: dir.to_path_buf(),
        detail,
    };
    let free = strata_storage::free_bytes(dir).map_err(|e| fail(e.to_string()))?;
    let large = DISK_LARGE as u64;
    let file_bytes = sz.disk_file.min(free / 2) / large * large;
    if file_bytes < 16 * large {
        return Err(CalibrateError::DiskDir {
            path: dir.to_path_buf(),
            reason: format!(
                "only {} free; calibration needs at least {} for a temporary file",
                format_size(free),
                format_size(32 * large)
            ),
        });
    }
    let tmp = TempFile(dir.join(format!("strata-calibrate-{}.tmp", std::process::id())));
    let (file, direct) = open_direct(&tmp.0, true).map_err(|e| fail(e.to_string()))?;
    file.set_len(file_bytes).map_err(|e| fail(e.to_string()))?;
    let handle = file.try_clone().map_err(|e| fail(e.to_string()))?;
    let drop_cache = || {
        if !direct {
            // SAFETY: posix_fadvise only reads its arguments; `handle` is an open descriptor.
            unsafe { libc::posix_fadvise(handle.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    };
    let qd = opts.queue_depth.max(1);

    let pool = IoBufPool::with_buffers(DISK_LARGE, qd, 4096).map_err(|e| fail(e.to_string()))?;
    {
        let mut bufs: Vec<_> = std::iter::from_fn(|| pool.take()).collect();
        for b in &mut bufs {
            b.as_mut_slice().fill(0x5a);
        }
    }
    let (mut be, _why) =
        open_backend(opts.io_engine, vec![file], qd, &pool).map_err(|e| fail(e.to_string()))?;
    let engine = be.name();
    let offsets: Vec<u64> = (0..file_bytes / large).map(|i| i * large).collect();
    let t = Instant::now();
    transfer(be.as_mut(), &pool, IoDir::Write, &offsets).map_err(&fail)?;
    handle.sync_all().map_err(|e| fail(format!("fsync: {e}")))?;
    let write_s = t.elapsed().as_secs_f64();
    drop_cache();
    let read_s =
        best_secs(1, || transfer(be.as_mut(), &pool, IoDir::Read, &offsets)).map_err(&fail)?;
    drop(be);

    // Small requests, in a shuffled order over the whole file (no request sits next to the last).
    let small = DISK_SMALL as u64;
    let pool = IoBufPool::with_buffers(DISK_SMALL, qd, 4096).map_err(|e| fail(e.to_string()))?;
    let (file, _) = open_direct(&tmp.0, false).map_err(|e| fail(e.to_string()))?;
    let (mut be, _) =
        open_backend(opts.io_engine, vec![file], qd, &pool).map_err(|e| fail(e.to_string()))?;
    let mut offsets: Vec<u64> = (0..file_bytes / small).map(|i| i * small).collect();
    shuffle(&mut offsets, 0);
    offsets.truncate((sz.disk_small_read / small).max(1) as usize);
    drop_cache();
    let small_s =
        best_secs(1, || transfer(be.as_mut(), &pool, IoDir::Read, &offsets)).map_err(&fail)?;
    drop(be);

    let gbps = |bytes: u64, s: f64| bytes as f64 / s.max(1e-9) / 1e9;
    let (read, write) = (gbps(file_bytes, read_s), gbps(file_bytes, write_s));
    let small_read = gbps(offsets.len() as u64 * small, small_s);
    let half = fit_half_bandwidth(small as f64, small_read, large as f64, read);
    let asymptote = |bw: f64| bw * (large as f64 + half) / large as f64;
    Ok(DiskFigures {
        engine,
        direct,
        file_bytes,
        free_bytes: free,
        write_gbps: write,
        read_gbps: read,
        small_read_gbps: small_read,
        read_asymptote_gbps: asymptote(read),
        write_asymptote_gbps: asymptote(write),
        half_bytes: half as u64,
    })
}

/// Runs one request of `pool.buf_bytes()` at each offset (file 0), keeping the pool's buffers all
/// in flight; every request must transfer in full.
fn transfer(
    be: &mut dyn IoBackend,
    pool: &IoBufPool,
    dir: IoDir,
    offsets: &[u64],
) -> Result<(), String> {
    let len = pool.buf_bytes();
    let mut next = 0;
    while next < offsets.len() || be.in_flight() > 0 {
        while next < offsets.len() {
            let Some(buf) = pool.take() else { break };
            be.submit(dir, FileIdx(0), offsets[next], buf, len, next as u64)
                .map_err(|e| e.error.to_string())?;
            next += 1;
        }
        for c in be.wait(1).map_err(|e| e.to_string())? {
            let off = offsets[c.tag as usize];
            match c.result {
                Ok(n) if n == len => {}
                Ok(n) => {
                    return Err(format!(
                        "short transfer at offset {off}: {n} of {len} bytes"
                    ));
                }
                Err(e) => return Err(format!("{dir:?} at offset {off}: {e}")),
            }
        }
    }
    Ok(())
}

/// The request size `h` at which the disk gives half its bandwidth, from bandwidths `b1`, `b2`
/// at request sizes `r1 < r2` under `bw(r) = B·r / (r + h)`; clamped to [4 KiB, r2] (beyond
/// `r2` the fit would extrapolate more than 2× past what was measured).
fn fit_half_bandwidth(r1: f64, b1: f64, r2: f64, b2: f64) -> f64 {
    let den = b1 * r2 - b2 * r1;
    let h = if den > 0.0 {
        r1 * r2 * (b2 - b1) / den
    } else {
        r2
    };
    h.clamp(4096.0, r2)
}

/// A deterministic Fisher–Yates shuffle (xorshift), one order per `seed`.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if state == 0 {
        state = 1;
    }
    for i in (1..v.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// `n` values in [-1, 1) (deterministic).
fn pseudo_random(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2048) as f32 / 1024.0 - 1.0)
        .collect()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Now, as `2026-11-22T10:04:05Z` (UTC).
fn utc_now_iso8601() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_measurements_rotate_through_many_times_the_cache() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("300M"), Some(300 << 20));
        assert_eq!(parse_cache_size("1048576"), Some(1 << 20));
        assert_eq!(parse_cache_size("12 parsecs"), None);
        // 16 times the cache, within 1 to 8 GiB; 1 GiB when unknown.
        assert_eq!(past_the_cache_bytes(Some(300 << 20)), 4800 << 20);
        assert_eq!(past_the_cache_bytes(Some(8 << 20)), 1 << 30);
        assert_eq!(past_the_cache_bytes(Some(1 << 30)), 8 << 30);
        assert_eq!(past_the_cache_bytes(None), 1 << 30);
        // This machine's, where sysfs has it: the largest level found is a real size.
        if let Some(b) = last_level_cache_bytes() {
            assert!(b >= 64 << 10, "{b}");
        }
    }

    #[test]
    fn every_block_size_is_cut_from_the_same_blocks_and_attends_like_whole_ones() {
        let from = AttentionGeometry::new(4, 2, 8, 16);
        let kv = testing::synthetic_kv_blocks(DType::BF16, 3, from.block_elems());
        let whole = testing::full_block_views(&kv, &from);
        for bt in [16, 8, 4] {
            let views = carved_views(&whole, 16, bt);
            let per = 16 / bt;
            assert_eq!(views.len(), 3 * per);
            // Each block's K half, then its V half, is cut in order, whole, into `per` pieces.
            for (b, d) in kv.iter().enumerate() {
                let whole: Vec<f32> = d.as_slice().to_f32_vec();
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for (j, w) in views[b * per..(b + 1) * per].iter().enumerate() {
                    assert_eq!((w.start_pos, w.len), ((b * per + j) * bt, bt));
                    k.extend(w.k.to_f32_vec());
                    v.extend(w.v.to_f32_vec());
                }
                let e = from.block_elems();
                assert_eq!(
                    (&k[..], &v[..]),
                    (&whole[..e], &whole[e..]),
                    "block {b}, {bt} tokens"
                );
            }
        }
        // Cut to its own size, a block set attends exactly as its whole blocks do.
        let g = from;
        let q = testing::bench_query(&g);
        let at = |views: &[KvBlockView<'_>]| {
            attend_batch(
                &[AttentionQuery {
                    q: &q,
                    pos: 47,
                    blocks: views,
                }],
                &g,
                1,
            )
        };
        assert_eq!(at(&carved_views(&whole, 16, 16)), at(&whole));
    }

    #[test]
    fn calls_in_turn_read_fresh_bytes_and_shapes_fit_the_buffer() {
        // Calls of three sizes taking turns: each starts where the last ended, so no call reads
        // what the one before it read, and none runs past the buffer.
        let total = 1000;
        let mut cursor = CallCursor(0);
        let mut last: Option<(usize, usize)> = None;
        for round in 0..20 {
            for bytes in [50, 200, 400] {
                let at = cursor.take(bytes, total);
                assert!(at + bytes <= total, "round {round}: {at} + {bytes}");
                if let Some((a, b)) = last {
                    assert!(
                        at >= a + b || at + bytes <= a,
                        "{at}+{bytes} overlaps {a}+{b}"
                    );
                }
                last = Some((at, bytes));
            }
        }
        // Call shapes: at most a quarter of the buffer each, no two of one size.
        let gib = 1 << 30;
        assert_eq!(
            host_attention_call_shapes(4 * gib),
            vec![(8, 32 * MIB), (16, 128 * MIB), (16, 256 * MIB)]
        );
        assert_eq!(
            host_attention_call_shapes(256 * MIB),
            vec![(8, 32 * MIB), (16, 64 * MIB)]
        );
    }

    #[test]
    fn half_bandwidth_fit_recovers_the_model() {
        let (b, h) = (2.0, 96.0 * 1024.0);
        let bw = |r: f64| b * r / (r + h);
        let (r1, r2) = (65_536.0, 1_048_576.0);
        let fit = fit_half_bandwidth(r1, bw(r1), r2, bw(r2));
        assert!((fit - h).abs() < 1.0, "{fit}");
        // A disk already saturated at small requests: the smallest h.
        assert_eq!(fit_half_bandwidth(r1, 2.0, r2, 1.9), 4096.0);
    }

    /// The extra is what a measured step spends per layer beyond the model's kernels: a step
    /// made of the kernel-only prediction plus 50 µs a layer gives back 50 µs, at each count of
    /// sequences; a step faster than the model gives 0, not a negative time.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn decode_layer_extra_is_the_step_beyond_the_modelled_kernels() {
        let model = DECODE_EXTRA_MODEL;
        let spec = crate::policy_exec::model_spec(model, &model_config(model).unwrap());
        let mut hw = HardwareProfile::h100_reference();
        // What a calibration has measured by then: the per-layer overhead and issue time must
        // not count in the model's kernels.
        hw.decode_issue_us = Some(vec![[1.0, 5000.0]]);
        hw.decode_layer_extra_us = Some(vec![[1.0, 7000.0]]);
        for sequences in DECODE_ISSUE_ROWS {
            let modelled =
                modelled_decode_step(&hw, &spec, DECODE_ISSUE_PROMPT, sequences, 16).unwrap();
            assert!(modelled.per_layer.gpu_compute_s > 0.0);
            // The issue time and the extra above (5 and 7 ms a layer) are left out of it.
            assert!(modelled.per_layer.gpu_compute_s < 5000e-6);
            let run = |step_s| DecodeRun {
                sequences,
                step_s,
                block_tokens: 16,
                host_attention_s: 0.0,
            };
            let slower = run(modelled.total_s + spec.layers as f64 * 50e-6);
            let extra = decode_layer_extra_us(&hw, &spec, DECODE_ISSUE_PROMPT, &slower).unwrap();
            assert!((extra - 50.0).abs() < 1e-6, "{sequences}: {extra}");
            let faster = run(modelled.total_s * 0.9);
            let extra = decode_layer_extra_us(&hw, &spec, DECODE_ISSUE_PROMPT, &faster).unwrap();
            assert_eq!(extra, 0.0, "{sequences}");
        }
    }

    /// A host-tier decode's time per layer beyond the model (its GPU side as the planner charges
    /// it, its measured host attention, the head and the fill) at each calibrated sequence
    /// count; a step faster than the model gives 0. The policy it runs is a valid one: weights
    /// on the GPU, the newest tokens there, the rest on the host attended there, one GPU batch.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn host_tier_turns_are_the_step_beyond_its_host_attention_and_the_model() {
        let model = DECODE_EXTRA_MODEL;
        let spec = crate::policy_exec::model_spec(model, &model_config(model).unwrap());
        let mut hw = HardwareProfile::h100_reference();
        hw.decode_issue_us = Some(vec![[1.0, 150.0], [16.0, 250.0], [64.0, 450.0]]);
        hw.decode_layer_extra_us = Some(vec![[1.0, 40.0], [64.0, 60.0]]);
        // An earlier measurement of the term itself must not count in the model it is taken from.
        hw.host_tier_issue_us = Some(vec![[1.0, 9000.0]]);
        let prompt = DECODE_ISSUE_SHORT_PROMPT;
        for sequences in DECODE_ISSUE_ROWS {
            let wl = strata_planner::Workload {
                batch: sequences as u64,
                prompt_len: prompt as u64,
                gen_len: DECODE_ISSUE_TOKENS as u64,
            };
            let p = host_tier_policy(sequences);
            assert_eq!((p.gpu_batch_size, p.num_gpu_batches), (sequences as u64, 1));
            assert_eq!((p.kv.cold.host, p.weights.gpu), (1.0, 1.0));
            assert_eq!(p.attention_host, strata_planner::Attention::AttendNear);
            let mut without = hw.clone();
            without.host_tier_issue_us = None;
            let step = strata_planner::predict(&spec, &wl, &p, &without).decode_step;
            // The modelled step with 300 µs a layer more, and 20 ms of measured host attention.
            let run = |layer_us: f64| DecodeRun {
                sequences,
                step_s: step.head_s
                    + step.pipeline_fill_s
                    + spec.layers as f64 * (step.per_layer.gpu_compute_s + layer_us * 1e-6)
                    + 20e-3,
                block_tokens: 32,
                host_attention_s: 20e-3,
            };
            let us = host_tier_issue_us(&hw, &spec, prompt, &run(300.0)).unwrap();
            assert!((us - 300.0).abs() < 1e-6, "{sequences}: {us}");
            // Faster than modelled (noise): none, never negative.
            let us = host_tier_issue_us(&hw, &spec, prompt, &run(-50.0)).unwrap();
            assert_eq!(us, 0.0, "{sequences}");
        }
    }

    #[test]
    fn launch_line_fit_recovers_the_rate_and_the_fixed_cost() {
        // 14 µs per launch plus 3,100 GB/s, at the four calibrated batch sizes.
        let line = |bytes: f64| 14e-6 + bytes / 3100e9;
        let pts: Vec<(f64, f64)> = [1.0, 4.0, 16.0, 64.0]
            .iter()
            .map(|b| (b * 4096.0 * 4096.0, line(b * 4096.0 * 4096.0)))
            .collect();
        let (gbps, us) = fit_launch_line(&pts);
        assert!(
            (gbps - 3100.0).abs() < 1e-6 && (us - 14.0).abs() < 1e-9,
            "{gbps} {us}"
        );
        // Time falling with bytes (noise on a flat measurement): the largest launch's rate.
        let (gbps, us) = fit_launch_line(&[(1e6, 2e-5), (4e6, 1e-5)]);
        assert!((gbps - 400.0).abs() < 1e-9 && us == 0.0, "{gbps} {us}");
    }

    #[test]
    fn dates_are_iso8601() {
        let s = utc_now_iso8601();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
