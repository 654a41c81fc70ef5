//! The `strata` command line.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use strata_kernels::{CpuBackend, CudaBackend, DType, GemmPrecision};
use strata_runtime::calibrate::{self, CalibrateOptions, DeviceChoice, ProfileOptions};
use strata_runtime::forward::Residency;
use strata_runtime::generate::{self, GenerateOptions};
use strata_runtime::gpu_budget;
use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{DiskTierConfig, GpuTierConfig};
use strata_runtime::model::{self, Family};
use strata_runtime::policy_exec;
use strata_runtime::units::format_size as human_bytes;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Run large language models on one machine: offline batch inference over JSONL files of prompts."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate continuations for every item of a JSONL file of prompts.
    ///
    /// Each input line is {"id": .., "prompt": "text"} or {"id": .., "input_ids": [..]}, with
    /// optional per-line "max_new_tokens", "temperature", "top_p", "seed" and "stop". Each result
    /// is appended to OUT as soon as its sequence finishes. Exit status: 0 when every item
    /// succeeded, 3 when some items have error records in OUT, 1 when the job could not run.
    Generate(Box<GenerateArgs>),
    /// Print the GPU strata would use (or why none), and with --model a model's architecture,
    /// parameter count, dtypes and KV bytes per token.
    Info {
        /// A Hugging Face model folder, a .gguf file, or synthetic:<preset>[:layers=N].
        #[arg(long)]
        model: Option<String>,
    },
    /// Choose a policy for a workload and budgets, and predict its time per stream.
    ///
    /// Prints the chosen placement of weights and KV, where attention runs, what is recomputed,
    /// the block schedule, the predicted time per decode step and per prefill broken down by
    /// stream, what bounds it, and the throughput it implies.
    Plan(PlanArgs),
    /// Measure this machine and write the hardware profile the planner uses: GEMM TFLOP/s per
    /// dtype, GPU memory, host <-> GPU, host memory, host attention and disk bandwidth, and
    /// capacities. Under a minute (--quick: a few seconds).
    Calibrate(CalibrateArgs),
    /// Run several policies on one workload in this process and compare them: `strata` (the
    /// planner's choice), `flexgen` (FlexGen's policy space and rules), `layerwise` (each
    /// layer's weights and KV fetched synchronously) and `gpu-only` (when it fits).
    ///
    /// Prints a Markdown table (tokens/s for prefill, decode and end to end, the ratio to each
    /// baseline, bytes per link, time per stream, predicted vs measured, peak memory per tier)
    /// and checks that every policy produced the same tokens.
    Bench(Box<BenchArgs>),
}

#[derive(Args)]
struct BenchArgs {
    /// A Hugging Face model folder, a .gguf file, or synthetic:<preset>[:layers=N]. With
    /// --preset: keeps only that model of the preset (or replaces its model).
    #[arg(long)]
    model: Option<String>,
    /// Prompt tokens per sequence (with --preset: keeps only that prompt length).
    #[arg(long)]
    prompt_len: Option<u64>,
    /// Tokens generated per sequence (with --preset: a shorter generation, labelled so in the
    /// report).
    #[arg(long)]
    gen_len: Option<u64>,
    /// Sequences in flight (with --preset long-context: keeps only that batch).
    #[arg(long)]
    batch: Option<u64>,
    /// Policies to run, comma-separated: strata, flexgen, layerwise, gpu-only.
    #[arg(
        long,
        default_value = "strata,flexgen,layerwise,gpu-only",
        value_delimiter = ','
    )]
    policies: Vec<String>,
    /// A workload preset: flexgen-suite (OPT-6.7B/30B/175B, prompts 512 and 256, 32 new tokens,
    /// FlexGen's published policies scaled to the budgets), long-context (synthetic:llama-3-8b at
    /// 8K/32K/128K, batch 1-32, a 24 GiB GPU and 64 GiB of host memory, the rest on --disk-dir),
    /// smollm2 (the real SmolLM2-135M).
    #[arg(long)]
    preset: Option<String>,
    /// GPU memory the policies may use (default: the profile's GPU capacity).
    #[arg(long, value_parser = parse_size_arg)]
    gpu_mem: Option<u64>,
    /// Host memory the policies may use (default: the profile's host capacity).
    #[arg(long, value_parser = parse_size_arg)]
    host_mem: Option<u64>,
    /// Directory on a fast disk for the disk tier; without it nothing goes to disk.
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Disk space the policies may use in --disk-dir (default: the profile's disk capacity).
    #[arg(long, value_parser = parse_size_arg, requires = "disk_dir")]
    disk_mem: Option<u64>,
    /// FlexGen's placement for the flexgen policy, as FlexGen takes it: w_gpu w_cpu c_gpu c_cpu
    /// a_gpu a_cpu (percentages of the weights, KV cache and activations on the GPU and the
    /// CPU; the disk gets the rest). Without it FlexGen's space is searched with strata's cost
    /// model (flexgen-suite: FlexGen's published policy, scaled to the budgets).
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"])]
    percent: Option<Vec<f64>>,
    /// FlexGen's GPU batch size (with --percent; default: the batch over --num-gpu-batches).
    #[arg(long, requires = "percent")]
    gpu_batch_size: Option<u64>,
    /// FlexGen's number of GPU batches in its block schedule (with --percent; default 1).
    #[arg(long, requires = "percent")]
    num_gpu_batches: Option<u64>,
    /// FlexGen's "cpu cache compute": attend over the CPU and disk KV on the CPU instead of
    /// fetching it to the GPU (with --percent).
    #[arg(long, requires = "percent")]
    cpu_cache_compute: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw end-to-end throughput against context length (one line per policy) as SVG here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Append a dated entry (machine, GPU, command, table) to bench/RESULTS.md.
    #[arg(long)]
    append_results: bool,
    /// Carry over the configurations an earlier bench finished: FILE is its --json report.
    /// A configuration (a workload with every policy) that report ran to an end under the same
    /// budgets, --gpu-gemm and policies is taken from it, not run again; the rest run. A preset
    /// too long for one sitting is finished by running the same command again with `--resume
    /// FILE --json FILE` (no FILE yet: everything runs): the report, table and plot then cover
    /// all of it. A configuration stopped part way runs again whole, so its ratios always come
    /// from one machine.
    /// Give it more than once to carry from several reports (say, one per sitting that ran a
    /// narrowed part of a preset); the first that finished a configuration is used.
    #[arg(long, value_name = "FILE")]
    resume: Vec<PathBuf>,
    /// Plan and predict every policy, run none.
    #[arg(long)]
    dry_run: bool,
    /// Stop any one run (a policy on a workload) after this many seconds, model loading
    /// included, and report it as timed out; the other runs go on. Default: no limit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_run_timeout)]
    run_timeout: Option<f64>,
    /// Where to compute: auto, cpu, cuda or cuda:N (as for generate).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// GPU GEMMs with half-precision weights, for every policy, as `generate --gpu-gemm` takes
    /// it: split or rounded. The planner predicts the one given.
    #[arg(long, default_value = "split", value_parser = ["split", "rounded"])]
    gpu_gemm: String,
    /// Hardware profile (default: the calibrated one; calibrates first if none).
    #[arg(long)]
    profile: Option<PathBuf>,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Directory on the disk to measure (for the disk KV tier: your fastest NVMe). A temporary
    /// file (1 GiB; 256 MiB with --quick) is written, read and removed. Without it the disk is
    /// not measured.
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Where to write the profile. Default: $XDG_CACHE_HOME/strata/profile.json (else
    /// ~/.cache/strata/profile.json), which `strata plan` uses.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Smaller sizes, a few seconds: what `plan` runs when it finds no profile.
    #[arg(long)]
    quick: bool,
    /// Disk IO engine to measure: auto, uring or sync (as for generate).
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    io_engine: String,
    /// Disk reads and writes in flight at once.
    #[arg(long, default_value_t = 32)]
    io_queue_depth: usize,
    /// The GPU to measure: auto (GPU 0 when usable), cuda:N, or cpu (no GPU).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// Host threads to measure host attention, host memory and the host MLP share with: give
    /// the `--threads` your runs use (default: what `generate` uses by default, all cores, or
    /// all but one with a GPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

#[derive(Args)]
struct PlanArgs {
    /// A Hugging Face model folder, a .gguf file, or synthetic:<preset>[:layers=N].
    #[arg(long)]
    model: String,
    /// Sequences in flight.
    #[arg(long)]
    batch: u64,
    /// Prompt tokens per sequence.
    #[arg(long)]
    prompt_len: u64,
    /// Tokens generated per sequence.
    #[arg(long)]
    gen_len: u64,
    /// GPU memory strata may use (default: the profile's GPU capacity).
    #[arg(long, value_parser = parse_size_arg)]
    gpu_mem: Option<u64>,
    /// Host memory strata may use (default: the profile's host capacity).
    #[arg(long, value_parser = parse_size_arg)]
    host_mem: Option<u64>,
    /// Disk space strata may use (default: the profile's disk capacity).
    #[arg(long, value_parser = parse_size_arg)]
    disk_mem: Option<u64>,
    /// The KV cache's storage type, as `generate --kv-dtype` takes it: auto (the model's dtype
    /// when it is f16 or bf16, else f32), f32, f16 or bf16. It sets the KV bytes per token the
    /// plan moves and stores, and so whether recomputing K and V from stored (f32) hidden
    /// states reads fewer bytes than fetching them.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    kv_dtype: String,
    /// How the run would multiply half-precision weights, as `generate --gpu-gemm` takes it:
    /// split (the default there too) runs every GEMM of more than 8 rows twice, rounded once.
    /// It sets the GEMM time the plan charges; `strata calibrate` measures one pass.
    #[arg(long, default_value = "split", value_parser = ["split", "rounded"])]
    gpu_gemm: String,
    /// Hardware profile (JSON). Default: this machine's, as `strata calibrate` wrote it in
    /// the cache directory; when there is none, a quick calibration runs first and writes it.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Also list the alternatives considered and why they lost.
    #[arg(long)]
    explain: bool,
    /// Print JSON (profile, workload, budgets, policy, prediction, alternatives) instead.
    #[arg(long)]
    json: bool,
    /// Predict this policy (a JSON file: a policy, or `plan --json` output, or a run's
    /// `--stats-json` `policy_check`) instead of searching: what the cost model says a policy
    /// of your own, or one a run used, costs on this profile. There are no alternatives to
    /// explain then.
    #[arg(long, value_name = "FILE")]
    policy: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model folder, a .gguf file, or synthetic:<preset>[:layers=N].
    #[arg(long)]
    model: String,
    /// JSONL file of prompts.
    #[arg(long)]
    input: PathBuf,
    /// JSONL file of results (appended; refused if it exists, unless --resume).
    #[arg(long)]
    output: PathBuf,
    /// Tokens to generate per item unless the line says otherwise.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed for sampling, used by every item that has no "seed" of its own.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Wrap each text prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Sequences in flight at once.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Continue an interrupted job: skip ids already present in OUT.
    #[arg(long)]
    resume: bool,
    /// Write a JSON run summary (tokens, seconds, tokens/s, peak memory) here.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Tokens per KV cache block (the unit of placement and of disk IO).
    #[arg(long, default_value_t = 32)]
    kv_block_tokens: usize,
    /// Host memory for the KV cache (e.g. 8GiB). Default: half the memory available at start.
    /// When it fills, the coldest blocks spill to --disk-dir (or the job stops with an error
    /// saying so, when there is no disk tier).
    #[arg(long, value_parser = parse_size_arg)]
    host_mem: Option<u64>,
    /// Directory on a fast disk for the disk KV tier (preallocated files, removed at exit).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Disk space for the KV cache in --disk-dir (e.g. 64GiB). Default: half the free space,
    /// at most 64GiB. Checked against the free space at start.
    #[arg(long, value_parser = parse_size_arg, requires = "disk_dir")]
    disk_mem: Option<u64>,
    /// Disk IO engine: io_uring, a pread/pwrite thread pool, or auto (io_uring when the kernel
    /// allows it; STRATA_IO_ENGINE=sync forces the pool).
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    io_engine: String,
    /// Disk reads and writes in flight at once.
    #[arg(long, default_value_t = 32)]
    io_queue_depth: usize,
    /// KV blocks at the start of each sequence kept in the fastest tier (attention sinks).
    #[arg(long, default_value_t = 1)]
    kv_sink_blocks: usize,
    /// Most recent KV blocks of each sequence kept in the fastest tier (GPU, else host memory).
    #[arg(long, default_value_t = 4)]
    kv_recent_blocks: usize,
    /// CPU threads for host compute (default: all cores; with a GPU, all but one, which is
    /// left to the thread that drives the GPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute: cuda (GPU 0, or cuda:N), cpu, or auto (the GPU when one is usable,
    /// else the CPU, with a note saying why).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// GPU memory strata may use (weights, activations and the GPU KV tier), e.g. 24GiB.
    /// Default: 92% of the memory free on the GPU at start. The weights stay on the GPU when
    /// they fit with room for KV; otherwise they stream layer by layer from host memory. What
    /// is left after weights and activations holds KV blocks; colder blocks spill to host
    /// memory (--host-mem) and then to --disk-dir.
    #[arg(long, value_parser = parse_size_arg)]
    gpu_mem: Option<u64>,
    /// GPU memory for KV blocks (the GPU tier), e.g. 8GiB. Default: what --gpu-mem leaves after
    /// the weights and activations. Must fit in that.
    #[arg(long, value_parser = parse_size_arg)]
    gpu_kv_mem: Option<u64>,
    /// Storage type of KV blocks on a GPU: auto (the model's dtype when it is f16 or bf16, else
    /// f32), f32, f16 or bf16. The GPU tier, and on a GPU the host and disk tiers too, store K
    /// and V in it (blocks move between tiers as they are); the CPU backend keeps f32.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    kv_dtype: String,
    /// Prompt tokens per forward pass during prefill: long prompts (or many at once) run in
    /// chunks of this many tokens, which bounds activation memory. Under a policy with several
    /// GPU batches it is the rows of one GPU batch (at most its prompts), and a pass runs every
    /// GPU batch, so streamed weights are copied once per pass.
    #[arg(long, default_value_t = strata_planner::PREFILL_ROWS as usize)]
    prefill_chunk: usize,
    /// GPU GEMMs with half-precision weights: `split` carries the f32 activation as two
    /// half-precision terms (two tensor-core GEMMs, close to f32 results), `rounded` rounds it
    /// once to the weight dtype (one GEMM, what PyTorch does in bf16; about twice as fast for
    /// prefill).
    #[arg(long, default_value = "split", value_parser = ["split", "rounded"])]
    gpu_gemm: String,
    /// Run a planner policy: `auto` plans one for this job (batch, mean prompt length,
    /// --max-new-tokens, the memory flags, the calibrated profile), FILE reads one (a policy,
    /// or the output of `strata plan --json`). The policy sets the weights' placement, the KV
    /// block size, the batch size and its split into GPU batches (FlexGen's block schedule),
    /// where host and disk KV is attended (near the data, fetched to the compute device, or
    /// split), and the share of KV blocks stored as hidden states and recomputed; after the run
    /// its predicted times are printed beside the measured ones (and written to --stats-json).
    /// Weights the policy places on disk are written to --disk-dir when the model loads and
    /// read back for every pass (--disk-mem holds them and the disk KV tier together).
    /// Policies the executor cannot run yet (different recompute shares for tiers that all hold
    /// cold KV; recompute with a GPU KV tier, or where hidden states outgrow K and V) are
    /// refused, naming the field.
    #[arg(long)]
    policy: Option<String>,
    /// Hardware profile for --policy (default: the calibrated one; calibrates first if none).
    #[arg(long, requires = "policy")]
    profile: Option<PathBuf>,
}

/// The `--device` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Auto,
    Cpu,
    Cuda(usize),
}

fn parse_run_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{s}`")),
    }
}

/// Opens the GPU `device` asks for: `None` means the CPU. Says once when cuBLASLt (the default
/// GEMM library) is asked for and cannot be used.
fn open_gpu(device: Device) -> anyhow::Result<Option<CudaBackend>> {
    if device != Device::Cpu {
        strata_kernels::GemmBackend::check_env().map_err(anyhow::Error::msg)?;
    }
    let gpu = match device {
        Device::Cpu => None,
        Device::Cuda(n) => {
            Some(CudaBackend::new(n).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?)
        }
        Device::Auto => match CudaBackend::new(0) {
            Ok(gpu) => Some(gpu),
            Err(e) => {
                eprintln!("note: no usable GPU ({e}); computing on the CPU");
                None
            }
        },
    };
    if let Some(gpu) = &gpu
        && strata_kernels::GemmBackend::from_env() == strata_kernels::GemmBackend::LtAutotuned
        && let Some(why) = gpu.lt_unavailable()
    {
        eprintln!("note: {why}; f16/bf16 GEMMs run on cuBLAS GemmEx");
    }
    Ok(gpu)
}

/// The library the GPU's f16/bf16 GEMMs run on, for `strata info`.
fn gemm_library(gpu: &CudaBackend) -> String {
    match gpu.lt_unavailable() {
        Some(why) => format!("{} ({why})", strata_kernels::GemmBackend::GemmEx),
        None => format!(
            "{} ({}=gemmex or lt selects)",
            gpu.gemm_backend(),
            strata_kernels::GemmBackend::ENV
        ),
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    strata_runtime::units::parse_size(s)
}

fn main() -> ExitCode {
    // With STRATA_LOG=strata_runtime=debug every span (layer, GPU batch, host attention, the
    // storage engine's join) is logged when it closes, with its busy and idle time.
    tracing_subscriber::fmt()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => run_generate(*args),
        Command::Info { model } => run_info(model.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => run_plan(&args).map(|()| ExitCode::SUCCESS),
        Command::Calibrate(args) => run_calibrate(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(&args),
    };
    result.unwrap_or_else(|e| {
        // Our error messages already carry their causes; print each once.
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

/// The fewest rows a prefill GPU batch is cut to so that GPU scratch blocks fit.
const MIN_PREFILL_BATCH_ROWS: usize = 256;

fn run_generate(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if a.kv_block_tokens == 0 {
        anyhow::bail!("--kv-block-tokens must be at least 1");
    }
    if a.prefill_chunk == 0 {
        anyhow::bail!("--prefill-chunk must be at least 1");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 {
        anyhow::bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let gpu = open_gpu(a.device)?;
    // Before anything uses the pool (loading a model does). The default is a preference: if
    // something already started the pool, it keeps its size; `--threads` must take effect.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(
            a.threads
                .unwrap_or_else(|| strata_runtime::host_threads(gpu.is_some()))
                .max(1),
        )
        .build_global();
    if let (Err(e), Some(t)) = (pool, a.threads) {
        anyhow::bail!("--threads {t}: {e}");
    }
    let model = model::open(&a.model)?;
    let mut a = a;
    let planned = match &a.policy {
        None => None,
        Some(arg) => {
            let (policy, prediction, workload) = policy_for_job(arg, &a, &model)?;
            let run = policy_exec::executable(&policy, model.config.layers)
                .map_err(|e| anyhow::anyhow!("--policy {arg}: cannot run this policy: {e}"))?;
            eprintln!(
                "note: --policy {arg}: block {} tokens, batch {}, weights {:?}; predicted decode \
                 step {:.2} ms, prefill {:.3} s",
                run.block_tokens,
                run.batch_size,
                run.residency,
                prediction.decode_step.total_s * 1e3,
                prediction.prefill.total_s
            );
            if let Residency::Split { disk_layers, .. } = run.residency
                && disk_layers > 0
            {
                let Some(dir) = &a.disk_dir else {
                    anyhow::bail!(
                        "--policy {arg}: the policy places {disk_layers} of {} layers' weights \
                         on disk; give --disk-dir (and room for them in --disk-mem)",
                        model.config.layers
                    );
                };
                let layer_bytes =
                    policy_exec::model_spec(&a.model, &model.config).weight_bytes_per_layer();
                // Checked before anything is written: the layers go to disk as the model loads.
                let need = layer_bytes * disk_layers as u64 + generate::MIN_DISK_KV_BYTES;
                let budget = match a.disk_mem {
                    Some(b) => b,
                    None => default_disk_bytes(dir)?,
                };
                if budget < need {
                    anyhow::bail!(
                        "--disk-mem {}: the policy places about {} of weights on disk, and the KV \
                         cache's disk tier needs at least {} beside them; raise --disk-mem",
                        human_bytes(budget),
                        human_bytes(layer_bytes * disk_layers as u64),
                        human_bytes(generate::MIN_DISK_KV_BYTES)
                    );
                }
                eprintln!(
                    "note: --policy {arg}: {disk_layers} of {} layers' weights (about {}) are \
                     written to {} when the model loads and read back for every forward pass",
                    model.config.layers,
                    human_bytes(layer_bytes * disk_layers as u64),
                    dir.join("weights").display()
                );
            }
            a.kv_block_tokens = run.block_tokens;
            a.batch_size = run.batch_size.max(1);
            // A prefill pass runs the block schedule over the policy's GPU batches (the weights
            // stream once per pass), each of at most one GPU batch's prompts: the workspace the
            // planner counted.
            let rows = (policy.gpu_batch_size * workload.prompt_len).max(1);
            a.prefill_chunk = a.prefill_chunk.min(rows as usize) * run.exec.gpu_batches.max(1);
            Some((policy, prediction, run, workload))
        }
    };
    let mut gpu_tier = None;
    // Rows of one GPU batch of a prefill pass (all of a pass without a GPU).
    let mut prefill_batch_rows = a.prefill_chunk;
    // The host and disk tiers' K and V dtype: f32 on the CPU (it computes and is checked against
    // transformers in f32); on a GPU, the GPU tier's dtype (below).
    let mut host_kv_dtype = DType::F32;
    let residency = match &gpu {
        None => {
            if a.gpu_mem.is_some() || a.gpu_kv_mem.is_some() {
                anyhow::bail!("--gpu-mem / --gpu-kv-mem: no GPU in use (see `strata info`)");
            }
            if strata_runtime::weights_fit_in_memory(&model.config) {
                Residency::Resident
            } else {
                eprintln!(
                    "note: {} does not fit in memory; streaming its weights layer by layer",
                    a.model
                );
                Residency::Streamed
            }
        }
        Some(gpu) => {
            gpu.set_gemm_precision(gemm_precision(&a.gpu_gemm));
            let (free, total) = gpu.memory_info()?;
            let budget = match a.gpu_mem {
                Some(b) if b > total as u64 => anyhow::bail!(
                    "--gpu-mem {} is more than the GPU has ({})",
                    human_bytes(b),
                    human_bytes(total as u64)
                ),
                Some(b) => b,
                None => free as u64 / 100 * 92,
            };
            // The pass's GPU batches (rows of one are chosen below).
            let gpu_batches = planned.as_ref().map_or(1, |p| p.2.exec.gpu_batches.max(1));
            let resident_layers = match planned.as_ref().map(|p| p.2.residency) {
                Some(Residency::Split {
                    resident_layers, ..
                }) => Some(resident_layers),
                Some(Residency::Resident) => Some(model.config.layers),
                Some(Residency::Staged) => Some(0),
                _ => None,
            };
            let weight_lookahead = planned
                .as_ref()
                .map_or(1, |p| p.2.exec.weight_lookahead.max(1));
            let disk_layers = match planned.as_ref().map(|p| p.2.residency) {
                Some(Residency::Split { disk_layers, .. }) => disk_layers,
                _ => 0,
            };
            let kv_dtype = kv_dtype_arg(&a.kv_dtype, &model.config);
            let cfg = &model.config;
            let block_bytes = (2 * cfg.kv_dim() * a.kv_block_tokens * kv_dtype.size_bytes()) as u64;
            // A policy that keeps KV off the GPU attends prompts over it in GPU scratch blocks:
            // when one GPU batch's activations leave no room for them, smaller GPU batches
            // (more per pass) make it, rather than prefill attention on the CPU.
            let off_gpu = planned.as_ref().is_some_and(|(p, _, _, wl)| {
                use strata_planner::{Tier, kv_tokens_on};
                kv_tokens_on(p, wl, Tier::Host) + kv_tokens_on(p, wl, Tier::Disk) > 0
            });
            let pass_rows = a.prefill_chunk;
            let planned_rows = pass_rows.div_ceil(gpu_batches);
            let mut rows = planned_rows;
            let mut split = loop {
                let split = gpu_budget::split_with(
                    cfg,
                    budget,
                    (rows, pass_rows.div_ceil(rows)),
                    a.batch_size,
                    resident_layers,
                    weight_lookahead,
                );
                let scratch =
                    strata_planner::gpu_scratch_blocks(rows as u64, a.kv_block_tokens as u64)
                        * block_bytes;
                if !off_gpu || split.kv_bytes >= scratch || rows <= MIN_PREFILL_BATCH_ROWS {
                    break split;
                }
                rows = (rows / 2).max(MIN_PREFILL_BATCH_ROWS);
            };
            if rows < planned_rows {
                eprintln!(
                    "note: prefill GPU batches of {rows} rows, not {planned_rows}: the GPU \
                     scratch blocks that attend prompts over host KV fit beside their activations"
                );
            }
            prefill_batch_rows = rows;
            if let Some(kv) = a.gpu_kv_mem {
                if kv > split.kv_bytes {
                    anyhow::bail!(
                        "--gpu-kv-mem {} is more than the {} that --gpu-mem {} leaves after \
                         weights ({}) and activations ({})",
                        human_bytes(kv),
                        human_bytes(split.kv_bytes),
                        human_bytes(budget),
                        human_bytes(split.weight_bytes),
                        human_bytes(split.workspace_bytes)
                    );
                }
                split.kv_bytes = kv;
            }
            // K and V are rounded to this dtype on the GPU, so the host and disk tiers hold the
            // same values in it (spilled blocks move as they are; without a GPU tier, host
            // appends round to it alike).
            host_kv_dtype = kv_dtype;
            let room = split.kv_bytes;
            // Under a policy the GPU KV tier holds what the policy keeps there (its prediction
            // counts that), not whatever the budget leaves; `--gpu-kv-mem` still overrides.
            if let (Some((policy, _, _, workload)), None) = (&planned, a.gpu_kv_mem) {
                let (bytes, short) = policy_exec::gpu_kv_tier_bytes(
                    policy,
                    workload,
                    cfg.layers as u64,
                    block_bytes,
                    split.kv_bytes,
                );
                if let Some(note) = short {
                    eprintln!("note: {note}");
                }
                split.kv_bytes = bytes;
            }
            // Every sequence's writable block in every layer, plus one prefill chunk's blocks.
            let min_blocks = strata_planner::gpu_kv_min_blocks(
                a.batch_size as u64,
                cfg.layers as u64,
                rows as u64,
                a.kv_block_tokens as u64,
            );
            eprintln!(
                "note: GPU budget {}: weights {} ({}), activations {}, KV {}",
                human_bytes(budget),
                human_bytes(split.weight_bytes),
                match (resident_layers, disk_layers) {
                    _ if split.resident_weights => "resident".to_string(),
                    (Some(n), d) if n > 0 || d > 0 => format!(
                        "{n} of {} layers resident, {d} read from disk for every pass, the rest \
                         fetched from host memory",
                        cfg.layers
                    ),
                    _ => "fetched from host memory layer by layer".to_string(),
                },
                human_bytes(split.workspace_bytes),
                human_bytes(split.kv_bytes)
            );
            // Scratch blocks, to attend host and disk KV on the GPU (a prompt's spilled earlier
            // chunks, fetched blocks): from the room the policy leaves, else from the tier.
            let bt = a.kv_block_tokens;
            let room_blocks = (room / block_bytes) as usize;
            let tier_blocks = (split.kv_bytes / block_bytes) as usize;
            let want = strata_planner::gpu_scratch_blocks(rows as u64, bt as u64) as usize;
            let spare = room_blocks.saturating_sub(tier_blocks);
            let scratch = want.min(spare.max(tier_blocks / 8)).min(room_blocks);
            let kv_blocks = match (tier_blocks + scratch).min(room_blocks) - scratch {
                0 => {
                    eprintln!(
                        "note: no GPU KV tier: {}",
                        if planned.is_some() {
                            "the policy keeps no KV on the GPU"
                        } else {
                            "the weights and activations leave no room"
                        }
                    );
                    0
                }
                n if n < min_blocks as usize => {
                    eprintln!(
                        "note: no GPU KV tier: {} of KV room holds {n} blocks of {}, fewer than \
                         the {min_blocks} this batch needs; KV stays in host memory and decode \
                         attention runs on the CPU",
                        human_bytes(n as u64 * block_bytes),
                        human_bytes(block_bytes),
                    );
                    0
                }
                n => n,
            };
            if kv_blocks == 0 && scratch > 0 {
                eprintln!(
                    "note: {scratch} GPU scratch blocks ({}) attend prompts over host and disk KV",
                    human_bytes(scratch as u64 * block_bytes)
                );
            }
            if kv_blocks + scratch > 0 {
                gpu_tier = Some(GpuTierConfig {
                    backend: gpu.clone(),
                    bytes: (kv_blocks + scratch) as u64 * block_bytes,
                    dtype: kv_dtype,
                    scratch_blocks: scratch,
                });
            }
            if split.resident_weights {
                Residency::Resident
            } else if strata_runtime::weights_fit_in_memory(&model.config) {
                Residency::Staged
            } else {
                eprintln!(
                    "note: {} fits neither the GPU budget nor host memory; streaming its weights \
                     from their source layer by layer",
                    a.model
                );
                Residency::Streamed
            }
        }
    };
    let host_budget = a.host_mem.unwrap_or_else(default_host_kv_bytes);
    let host_kv_bytes = match &planned {
        Some((policy, _, _, workload)) if a.disk_dir.is_some() => {
            let geometry =
                strata_runtime::kv::KvGeometry::of_model(&model.config, a.kv_block_tokens);
            policy_exec::host_kv_tier_bytes(
                policy,
                workload,
                geometry.layers as u64,
                geometry.host_slot_bytes(host_kv_dtype),
                host_budget,
            )
        }
        _ => host_budget,
    };
    if host_kv_bytes < host_budget {
        eprintln!(
            "note: host KV tier {}: the KV the policy keeps in host memory (its host weights \
             share the budget); older blocks go to disk as planned",
            human_bytes(host_kv_bytes)
        );
    }
    let opts = GenerateOptions {
        input: a.input,
        output: a.output,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        chat: a.chat,
        batch_size: a.batch_size,
        resume: a.resume,
        block_tokens: a.kv_block_tokens,
        host_kv_bytes,
        kv_dtype: host_kv_dtype,
        disk: match a.disk_dir {
            None => None,
            Some(dir) => Some(DiskTierConfig {
                bytes: match a.disk_mem {
                    Some(b) => b,
                    None => default_disk_bytes(&dir)?,
                },
                dir,
                engine: a.io_engine.parse()?,
                queue_depth: a.io_queue_depth.max(1),
                faults: std::env::var("STRATA_FAULTS").ok(),
            }),
        },
        exec: planned.as_ref().map_or_else(Default::default, |p| p.2.exec),
        hot_policy: SinkAndRecent {
            sink_blocks: a.kv_sink_blocks,
            recent_blocks: a.kv_recent_blocks,
        },
        gpu: gpu_tier,
        prefill_chunk: a.prefill_chunk,
        prefill_batch_rows,
    };
    let residency = match planned.as_ref().map(|p| p.2.residency) {
        None => residency,
        // On the CPU, GPU and host memory are the same memory: every layer not on disk stays
        // resident (staging one would only reload it from its source for every pass).
        Some(Residency::Split { disk_layers, .. }) if gpu.is_none() => Residency::Split {
            resident_layers: model.config.layers - disk_layers.min(model.config.layers),
            host_mlp_share: 0.0,
            disk_layers,
        },
        Some(r) => r,
    };
    let mut stats = match gpu {
        None => generate::run(&model, CpuBackend::new(), residency, &opts)?,
        Some(gpu) => {
            eprintln!("note: computing on {}", gpu.device_info());
            let mut stats = generate::run(&model, gpu.clone(), residency, &opts)?;
            if let Some(e) = gpu.deferred_error() {
                anyhow::bail!("the GPU failed during the job: {e}");
            }
            stats.gpu_copies = Some(gpu.copy_stats()?.into());
            stats
        }
    };
    if let Some((policy, prediction, _, _)) = &planned {
        let check = policy_exec::check(policy, prediction, &stats, model.config.layers as u64);
        eprintln!("{}", check.report());
        stats.policy_check = Some(check);
    }
    if stats.gemm_tuning_seconds > 0.0 {
        eprintln!(
            "note: {:.2} s went to tuning GEMM shapes new to this machine, left out of the \
             prefill and decode times (`gemm_tuning_seconds` in --stats-json); later runs \
             restore them from the tuning record (`strata info`)",
            stats.gemm_tuning_seconds
        );
    }
    if let Some(path) = a.stats_json {
        let text = serde_json::to_string_pretty(&stats)?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| anyhow::anyhow!("{}: cannot write stats: {e}", path.display()))?;
    }
    eprintln!(
        "done: {} ok, {} failed, {} skipped (already in output); prefill {:.1} tok/s, decode {:.2} tok/s",
        stats.items_ok,
        stats.items_failed,
        stats.items_skipped_resume,
        stats.prefill_tokens_per_s,
        stats.decode_tokens_per_s
    );
    Ok(if stats.items_failed > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Half the memory available now, at least 64 MiB.
fn default_host_kv_bytes() -> u64 {
    strata_runtime::mem_available_bytes()
        .map_or(4 << 30, |b| b / 2)
        .max(64 << 20)
}

/// Half the free space of `dir`, at most 64 GiB.
fn default_disk_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("--disk-dir {}: {e}", dir.display()))?;
    // Files a killed run left count as free: the tier removes them when it opens.
    strata_storage::remove_leftovers(dir)?;
    let free = strata_storage::free_bytes(dir)?;
    Ok((free / 2).min(64 << 30))
}

/// The `gpu:` lines of `strata info`: the device strata would use, or why there is none.
fn print_gpu() {
    match CudaBackend::new(0) {
        Ok(gpu) => {
            println!("gpu:              {}", gpu.device_info());
            if let Ok((free, _)) = gpu.memory_info() {
                println!(
                    "gpu memory free:  {:.2} GiB",
                    free as f64 / (1u64 << 30) as f64
                );
            }
            println!("gpu kernels:      {}", gpu.kernel_origin());
            println!("gpu gemm:         {}", gemm_library(&gpu));
            if let Some(r) = gpu.gemm_record() {
                let at = r.path.map_or("kept in memory only".into(), |p| {
                    format!("in {}", p.display())
                });
                let state = r.problem.map_or(String::new(), |p| format!("; {p}"));
                println!(
                    "gemm tunings:     {} problems recorded {at}{state}",
                    r.entries
                );
            }
        }
        Err(e) => println!("gpu:              none usable ({e}); computing on the CPU"),
    }
}

fn run_info(spec: Option<&str>) -> anyhow::Result<()> {
    let Some(spec) = spec else {
        print_gpu();
        return Ok(());
    };
    let m = model::open(spec)?;
    let c = &m.config;
    let params = c.param_count();
    println!("model:            {}", m.spec);
    println!(
        "architecture:     {} (family {})",
        c.model_type,
        c.family.name()
    );
    println!("parameters:       {params} ({:.2} B)", params as f64 / 1e9);
    println!(
        "weights:          {} — {}",
        c.dtype.name(),
        m.weights.describe()
    );
    println!("layers:           {}", c.layers);
    println!("hidden size:      {}", c.hidden);
    println!(
        "attention heads:  {} query, {} key/value, head dim {}",
        c.heads, c.kv_heads, c.head_dim
    );
    println!("mlp size:         {}", c.intermediate);
    println!("vocabulary:       {}", c.vocab);
    println!(
        "context:          {} tokens ({})",
        c.max_context, c.max_context_source
    );
    if c.family != Family::Opt {
        println!(
            "rope:             theta {} scaling {:?}",
            c.rope_theta, c.rope_scaling
        );
    }
    println!("tied embeddings:  {}", c.tie_embeddings);
    println!(
        "kv bytes/token:   {} (f32 K and V, all layers)",
        c.kv_bytes_per_token()
    );
    match &m.tokenizer {
        Some(t) => println!(
            "tokenizer:        {} tokens, chat template: {}",
            t.vocab_size(),
            if t.has_chat_template() { "yes" } else { "no" }
        ),
        None => println!("tokenizer:        none (give input_ids)"),
    }
    println!("eos token ids:    {:?}", c.eos_token_ids);
    print_gpu();
    Ok(())
}

fn calibrate_options(a: &CalibrateArgs) -> anyhow::Result<CalibrateOptions> {
    Ok(CalibrateOptions {
        quick: a.quick,
        disk_dir: a.disk_dir.clone(),
        io_engine: a.io_engine.parse()?,
        queue_depth: a.io_queue_depth.max(1),
        threads: a.threads.map(|t| t as usize),
        device: match a.device {
            Device::Auto => DeviceChoice::Auto,
            Device::Cpu => DeviceChoice::Cpu,
            Device::Cuda(n) => DeviceChoice::Cuda(n),
        },
    })
}

fn run_calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    calibrate::run_cli(&calibrate_options(&a)?, a.profile)?;
    Ok(())
}

fn run_plan(a: &PlanArgs) -> anyhow::Result<()> {
    use strata_planner::{Budgets, Tier, Workload};
    use strata_runtime::units::format_size;

    let m = model::open(&a.model)?;
    let c = &m.config;
    let workload = Workload {
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
    };
    let len = workload.final_len();
    if len > c.max_context as u64 {
        anyhow::bail!(
            "--prompt-len {} + --gen-len {} = {len} tokens is beyond {}'s context of {} ({})",
            a.prompt_len,
            a.gen_len,
            a.model,
            c.max_context,
            c.max_context_source
        );
    }
    let spec = policy_exec::model_spec(&a.model, c)
        .with_kv_dtype_bytes(kv_dtype_arg(&a.kv_dtype, c).size_bytes() as u64)
        .with_gemm_passes(gemm_passes(&a.gpu_gemm));
    let source = ProfileOptions {
        profile: a.profile.clone(),
        calibrate: CalibrateOptions::default(),
    };
    let profile = calibrate::load_or_calibrate(&source)?;
    let profile_file = source.path();
    let budgets = Budgets {
        gpu_bytes: a.gpu_mem.unwrap_or(profile.gpu_bytes),
        host_bytes: a.host_mem.unwrap_or(profile.host_bytes),
        disk_bytes: a.disk_mem.unwrap_or(profile.disk_bytes),
    };
    let searching = std::time::Instant::now();
    let plan = match &a.policy {
        Some(file) => {
            let policy = read_policy_file(file, &workload)?;
            let fits = budgets.hold(&strata_planner::memory(&spec, &workload, &policy));
            if !fits {
                eprintln!(
                    "note: --policy {file} needs more memory than the budgets give (see \
                     memory: below); predicted as if it fit"
                );
            }
            strata_planner::Plan {
                prediction: strata_planner::predict(&spec, &workload, &policy, &profile),
                policy,
                alternatives: Vec::new(),
                considered: 1,
                feasible: fits as u64,
            }
        }
        None => strata_planner::plan_with(
            &spec,
            &workload,
            &budgets,
            &profile,
            &policy_exec::search_space(),
        )?,
    };
    let search_s = searching.elapsed().as_secs_f64();
    if a.json {
        let out = serde_json::json!({
            "model": spec,
            "workload": workload,
            "budgets": budgets,
            "profile": {
                "machine": profile.machine,
                "measured_at": profile.measured_at,
                "reference": profile.reference,
                "file": profile_file,
            },
            "policy": plan.policy,
            "prediction": plan.prediction,
            "alternatives": plan.alternatives,
            "considered": plan.considered,
            "feasible": plan.feasible,
            "search_seconds": search_s,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let p = &plan.policy;
    let pred = &plan.prediction;
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
    let split = |s: &strata_planner::TierSplit| {
        format!(
            "gpu {} / host {} / disk {}",
            pct(s.gpu),
            pct(s.host),
            pct(s.disk)
        )
    };
    println!(
        "model:      {} ({} layers, {} per layer in {}; KV {} and hidden state {} per token per layer)",
        a.model,
        spec.layers,
        format_size(spec.weight_bytes_per_layer()),
        c.dtype.name(),
        format_size(spec.kv_bytes_per_token_per_layer()),
        format_size(spec.hidden_bytes_per_token())
    );
    println!(
        "workload:   batch {}, prompt {} tokens, generate {} tokens",
        a.batch, a.prompt_len, a.gen_len
    );
    println!(
        "budgets:    gpu {}, host {}, disk {}",
        format_size(budgets.gpu_bytes),
        format_size(budgets.host_bytes),
        format_size(budgets.disk_bytes)
    );
    let file = profile_file
        .as_deref()
        .map_or("(not saved)".into(), |p| p.display().to_string());
    if profile.reference {
        println!(
            "profile:    {file} — a reference profile ({}), NOT a measurement of this machine",
            profile.machine
        );
    } else {
        println!(
            "profile:    {file} ({}, measured {})",
            profile.machine, profile.measured_at
        );
    }
    if !profile.disk_measured && budgets.disk_bytes > 0 {
        println!(
            "note:       the profile's disk figures are placeholders (calibrated without \
             --disk-dir); run `strata calibrate --disk-dir DIR` to measure the disk"
        );
    }
    println!("policy:");
    println!("  weights:    {}", split(&p.weights));
    if p.host_mlp_share > 0.0 {
        println!(
            "  host MLP:   in decode steps host threads compute {:.1}% of each host-resident \
             layer's MLP neurons from host memory; the GPU fetches only the rest",
            p.host_mlp_share * 100.0
        );
    }
    println!(
        "  kv cache:   newest {} tokens of each sequence on {}; older tokens {}",
        p.kv.hot_window_tokens,
        p.kv.hot_tier.name(),
        split(&p.kv.cold)
    );
    println!(
        "  recompute:  share of older tokens stored as hidden states: {}",
        split(&p.recompute)
    );
    let attention = |t: Tier| {
        if p.kv.cold.get(t) * (1.0 - p.recompute.get(t)) > 0.0 || p.kv.hot_tier == t {
            p.attention(t).describe()
        } else {
            "no KV there".to_string()
        }
    };
    println!(
        "  attention:  gpu KV on the GPU; host KV: {}; disk KV: {}",
        attention(Tier::Host),
        attention(Tier::Disk)
    );
    println!(
        "  schedule:   {} GPU batch(es) of {} sequences, KV blocks of {} tokens, prefetch depth {}",
        p.num_gpu_batches, p.gpu_batch_size, p.kv_block_tokens, p.prefetch_depth
    );
    println!(
        "memory:     gpu {}, host {}, disk {}",
        format_size(pred.memory.gpu),
        format_size(pred.memory.host),
        format_size(pred.memory.disk)
    );
    let (d, f) = (&pred.decode_step, &pred.prefill);
    println!("prediction, per layer (ms)   decode step   prefill");
    for s in strata_planner::Stream::ALL {
        println!(
            "  {:<26} {:>11.3}  {:>8.3}",
            s.name(),
            d.per_layer.get(s) * 1e3,
            f.per_layer.get(s) * 1e3
        );
        if s == strata_planner::Stream::GpuCompute {
            // The host's time issuing that work: a decode layer takes the longer of it and its
            // kernels where `calibrate` measured it, else it is added to them.
            println!(
                "  {:<26} {:>11.3}  {:>8.3}",
                "  host issuing it",
                d.per_layer.gpu_issue_s * 1e3,
                f.per_layer.gpu_issue_s * 1e3
            );
        }
    }
    println!(
        "  {:<26} {:>11.3}  {:>8.3}",
        "layer, streams overlapped",
        d.layer_s * 1e3,
        f.layer_s * 1e3
    );
    println!(
        "  {:<26} {:>11.3}  {:>8.3}",
        "LM head (per step)",
        d.head_s * 1e3,
        f.head_s * 1e3
    );
    println!(
        "  {:<26} {:>11.3}  {:>8.3}",
        "whole model (+ fill, head)",
        d.total_s * 1e3,
        f.total_s * 1e3
    );
    println!(
        "  {:<26} {:>11}  {:>8}",
        "bound by",
        d.bound_by.name(),
        f.bound_by.name()
    );
    println!(
        "  {:<26} {:>11.3}  {:>8.3}",
        "lower bound (all overlap)",
        d.floor_s * 1e3,
        f.floor_s * 1e3
    );
    println!(
        "throughput: decode {:.1} tokens/s; whole job {:.1} generated tokens/s ({:.2} s: prefill {:.2} s + {} steps × {:.2} ms)",
        pred.decode_tokens_per_s,
        pred.tokens_per_s,
        pred.total_s,
        f.total_s,
        a.gen_len,
        d.total_s * 1e3
    );
    match &a.policy {
        Some(file) => println!("searched:   none (the policy in {file})"),
        None => println!(
            "searched:   {} policies, {} within the budgets, in {:.0} ms",
            plan.considered,
            plan.feasible,
            search_s * 1e3
        ),
    }
    if a.explain && a.policy.is_none() {
        println!("alternatives (best of each kind that lost):");
        for alt in &plan.alternatives {
            println!("  - {}", alt.label);
            println!("      {}", alt.why);
        }
    }
    Ok(())
}

/// The GPU GEMM precision a `--gpu-gemm` value names (`split` or `rounded`, as clap checked).
fn gemm_precision(gpu_gemm: &str) -> GemmPrecision {
    match gpu_gemm {
        "rounded" => GemmPrecision::Rounded,
        _ => GemmPrecision::Split,
    }
}

/// The planner's GEMM passes for a `--gpu-gemm` value (see `ModelSpec::gemm_passes`).
pub(crate) fn gemm_passes(gpu_gemm: &str) -> u64 {
    match gemm_precision(gpu_gemm) {
        GemmPrecision::Split => 2,
        GemmPrecision::Rounded => 1,
    }
}

/// The KV dtype `--kv-dtype` names (`auto`: the model's when it is f16 or bf16, else f32).
fn kv_dtype_arg(arg: &str, cfg: &model::ModelConfig) -> DType {
    match arg {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => gpu_budget::auto_kv_dtype(cfg),
    }
}

/// The policy `--policy ARG` names (planned for this job when ARG is `auto`, else read from the
/// file) and its prediction for this job on the calibrated profile.
fn policy_for_job(
    arg: &str,
    a: &GenerateArgs,
    model: &model::Model,
) -> anyhow::Result<(
    strata_planner::Policy,
    strata_planner::Prediction,
    strata_planner::Workload,
)> {
    use strata_planner::{Budgets, Workload};
    let items: Vec<_> = strata_runtime::jobio::read_input(&a.input)?
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    if items.is_empty() {
        anyhow::bail!(
            "--policy {arg}: {} has no valid items to plan for",
            a.input.display()
        );
    }
    let mut tokens = 0usize;
    for item in &items {
        tokens += match &item.input {
            strata_runtime::jobio::ItemInput::Ids(ids) => ids.len(),
            strata_runtime::jobio::ItemInput::Prompt(text) => match &model.tokenizer {
                Some(t) => t.encode(text, true).map_or(0, |v| v.len()),
                None => 0,
            },
        };
    }
    let workload = Workload {
        batch: a.batch_size.min(items.len()) as u64,
        prompt_len: (tokens / items.len()).max(1) as u64,
        gen_len: a.max_new_tokens.max(1) as u64,
    };
    let spec = policy_exec::model_spec(&a.model, &model.config)
        .with_kv_dtype_bytes(kv_dtype_arg(&a.kv_dtype, &model.config).size_bytes() as u64)
        .with_gemm_passes(gemm_passes(&a.gpu_gemm));
    let source = ProfileOptions {
        profile: a.profile.clone(),
        calibrate: CalibrateOptions::default(),
    };
    let profile = calibrate::load_or_calibrate(&source)?;
    let policy = if arg == "auto" {
        let budgets = Budgets {
            gpu_bytes: a.gpu_mem.unwrap_or(profile.gpu_bytes),
            host_bytes: a.host_mem.unwrap_or(profile.host_bytes),
            disk_bytes: if a.disk_dir.is_some() {
                a.disk_mem.unwrap_or(profile.disk_bytes)
            } else {
                0
            },
        };
        strata_planner::plan_with(
            &spec,
            &workload,
            &budgets,
            &profile,
            &policy_exec::search_space(),
        )
        .map_err(|e| anyhow::anyhow!("--policy auto: {e}"))?
        .policy
    } else {
        read_policy_file(arg, &workload)?
    };
    let prediction = strata_planner::predict(&spec, &workload, &policy, &profile);
    Ok((policy, prediction, workload))
}

/// A policy file (a policy, or any JSON with a `policy` field: `strata plan --json`'s output, a
/// run's `--stats-json`'s `policy_check`), valid for `workload`.
fn read_policy_file(
    arg: &str,
    workload: &strata_planner::Workload,
) -> anyhow::Result<strata_planner::Policy> {
    let text = std::fs::read_to_string(arg)
        .map_err(|e| anyhow::anyhow!("--policy {arg}: cannot read: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--policy {arg}: not JSON: {e}"))?;
    let v = v
        .pointer("/policy_check/policy")
        .or_else(|| v.get("policy"))
        .cloned()
        .unwrap_or(v);
    let p: strata_planner::Policy = serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("--policy {arg}: not a policy: {e}"))?;
    p.validate(workload)
        .map_err(|e| anyhow::anyhow!("--policy {arg}: {e}"))?;
    Ok(p)
}
