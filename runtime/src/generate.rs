//! `strata generate`: an offline batch job over a JSONL file of prompts.
//!
//! The scheduler keeps up to `batch_size` sequences in flight. Newly admitted sequences are
//! prefilled together (one forward over all their prompt tokens), then every running sequence
//! advances one token per decode step; a sequence that finishes is written to OUT at once, its KV
//! blocks go back to the pool, and the next item takes its place (ragged, continuous batching).
//! Bad items become error records and the job goes on.

use std::collections::{HashSet, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

use crate::forward::{ForwardError, Residency, Row, RuntimeBackend, Transformer};
use crate::jobio::{
    BadLine, ErrorRecord, ItemInput, JobIoError, JobItem, OutputRecord, OutputWriter, id_key,
    read_input,
};
use crate::kv::policy::SinkAndRecent;
use crate::kv::{DiskTierConfig, KvCache, KvCacheConfig, KvError, KvGeometry, KvMetrics, SeqId};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use strata_kernels::DType;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub ignore_eos: bool,
    pub chat: bool,
    pub batch_size: usize,
    pub resume: bool,
    pub block_tokens: usize,
    /// Host KV tier budget in bytes.
    pub host_kv_bytes: u64,
    /// The dtype the host and disk tiers store K and V in ([`KvCacheConfig::kv_dtype`]). `strata
    /// generate` sets the GPU KV dtype (`--kv-dtype`, the model's by default) when computing on
    /// a GPU, so every tier holds the values the GPU tier rounds to, and f32 on the CPU.
    pub kv_dtype: DType,
    /// The disk KV tier, when `--disk-dir` is given.
    pub disk: Option<DiskTierConfig>,
    pub hot_policy: SinkAndRecent,
    /// The GPU KV tier, when computing on a GPU with `--gpu-mem` room for KV.
    pub gpu: Option<crate::kv::GpuTierConfig>,
    /// Prompt tokens per forward pass during prefill (a long prompt, or many, runs in chunks).
    pub prefill_chunk: usize,
    /// Rows of one GPU batch of a prefill pass at most (a pass runs more GPU batches than the
    /// policy's when they would be larger).
    pub prefill_batch_rows: usize,
    /// What a planner policy sets beyond the flags above (GPU batches per step, where cold KV is
    /// attended, the recompute share).
    pub exec: crate::policy_exec::ExecSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Io(#[from] JobIoError),
    #[error("forward pass failed: {0}")]
    Forward(#[from] ForwardError),
    #[error("{0}")]
    Usage(String),
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
}

/// The run summary `--stats-json` writes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobStats {
    pub model: String,
    pub backend: String,
    pub items_total: usize,
    pub items_ok: usize,
    pub items_failed: usize,
    pub items_skipped_resume: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Tokens produced by decode steps (each sequence's first token comes from its prefill).
    pub decode_tokens: usize,
    /// Decode steps run (each one token for every running sequence).
    pub decode_steps: usize,
    /// Prefill and decode time, without `gemm_tuning_seconds`.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Each decode step's seconds, in order (their sum is `decode_seconds`): where a slow
    /// stretch of a run went.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decode_step_seconds: Vec<f64>,
    /// One-time GEMM tuning (a shape's first call on a machine without it in its tuning
    /// record), taken out of the prefill and decode time it fell in: what those would cost on
    /// a tuned machine, which is what every later run there sees.
    pub gemm_tuning_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub wall_seconds: f64,
    pub weight_load_seconds: f64,
    /// Weight bytes copied from page-locked host memory to the GPU (staged weights, and
    /// layers read from disk).
    pub weight_bytes_fetched: u64,
    /// Layers placed on disk: bytes written at load, bytes read back, and the seconds passes
    /// waited for those reads (`None` without any).
    pub disk_weights: Option<crate::disk_weights::DiskWeightStats>,
    /// Weight bytes host threads read to compute the host MLP share (`host_mlp_share`).
    pub host_mlp_bytes: u64,
    /// Seconds host threads spent computing that share.
    pub host_mlp_seconds: f64,
    /// Seconds passes waited for a layer's weights to land on the device (copies that compute
    /// did not hide; 0 when every layer is resident).
    pub weight_wait_seconds: f64,
    pub peak_rss_bytes: u64,
    pub peak_kv_bytes: usize,
    pub batch_size: usize,
    pub kv_block_tokens: usize,
    /// Blocks per tier, bytes per link, seconds per attention engine.
    pub kv: KvMetrics,
    /// GPU runs: bytes and timed seconds per direction (weight fetches, spills to the host tier,
    /// queries and partials of host and disk attention, every other upload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_copies: Option<GpuCopies>,
    /// With `--policy`: the policy, its prediction and the measured times beside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_check: Option<crate::policy_exec::PolicyCheck>,
}

/// [`strata_kernels::cuda::CopyStats`] for `--stats-json`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct GpuCopies {
    pub h2d_bytes: u64,
    pub h2d_seconds: f64,
    pub h2d_gbps: f64,
    pub d2h_bytes: u64,
    pub d2h_seconds: f64,
    pub d2h_gbps: f64,
    /// Small uploads (under 64 KiB: block tables, KV slots) on the compute stream, untimed and
    /// not in `h2d_bytes`.
    pub h2d_small_bytes: u64,
}

impl From<strata_kernels::cuda::CopyStats> for GpuCopies {
    fn from(c: strata_kernels::cuda::CopyStats) -> Self {
        let gbps = |b: u64, s: f64| if s > 0.0 { b as f64 / s / 1e9 } else { 0.0 };
        Self {
            h2d_bytes: c.h2d_bytes,
            h2d_seconds: c.h2d_seconds,
            h2d_gbps: gbps(c.h2d_bytes, c.h2d_seconds),
            d2h_bytes: c.d2h_bytes,
            d2h_seconds: c.d2h_seconds,
            d2h_gbps: gbps(c.d2h_bytes, c.d2h_seconds),
            h2d_small_bytes: c.h2d_small_bytes,
        }
    }
}

/// A sequence in flight.
struct Running {
    item: JobItem,
    seq: SeqId,
    sampler: Sampler,
    prompt_len: usize,
    /// Prompt ids, emptied once prefill has consumed them.
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_new: usize,
    /// The token sampled last, not yet fed through the model.
    next: u32,
}

struct Job<'a, 'm, B: RuntimeBackend> {
    model: &'m Model,
    tf: Transformer<'m, B>,
    opts: &'a GenerateOptions,
    kv: KvCache,
    out: OutputWriter,
    stats: JobStats,
    next_seq: u64,
    progress: ProgressBar,
}

/// The least the KV cache's disk tier keeps of `--disk-mem` when weights are on disk too.
pub const MIN_DISK_KV_BYTES: u64 = 64 << 20;

/// Runs the job; returns its statistics (`items_failed > 0` means some items have error records).
pub fn run<B: RuntimeBackend>(
    model: &Model,
    backend: B,
    residency: Residency,
    opts: &GenerateOptions,
) -> Result<JobStats, GenerateError> {
    let started = Instant::now();
    if opts.chat
        && model
            .tokenizer
            .as_ref()
            .is_none_or(|t| !t.has_chat_template())
    {
        return Err(GenerateError::Usage(format!(
            "--chat: model `{}` has no chat template",
            model.spec
        )));
    }
    let lines = read_input(&opts.input)?;
    let (out, done) = OutputWriter::open(&opts.output, opts.resume)?;
    let mut tf = Transformer::with_placement(
        backend,
        model,
        opts.block_tokens,
        residency,
        opts.disk.as_ref(),
    )
    .map_err(|e| GenerateError::Forward(ForwardError::Model(e)))?;
    // `--disk-mem` holds the weights placed on disk and the KV cache's disk tier together.
    let weights_on_disk = tf.disk_weight_bytes();
    let kv_disk = match opts.disk.clone() {
        Some(mut d) if weights_on_disk > 0 => {
            if d.bytes < weights_on_disk + MIN_DISK_KV_BYTES {
                return Err(GenerateError::Usage(format!(
                    "--disk-mem {}: the layers placed on disk take {} of it, leaving less than \
                     {} for the KV cache's disk tier; raise --disk-mem",
                    strata_planner::human_bytes(d.bytes),
                    strata_planner::human_bytes(weights_on_disk),
                    strata_planner::human_bytes(MIN_DISK_KV_BYTES)
                )));
            }
            d.bytes -= weights_on_disk;
            Some(d)
        }
        other => other,
    };
    tf.set_gpu_batches(opts.exec.gpu_batches);
    tf.set_weight_lookahead(opts.exec.weight_lookahead);
    tf.set_batch_rows(opts.prefill_batch_rows);
    let cfg = &model.config;
    let geometry = KvGeometry::of_model(cfg, opts.block_tokens);
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(lines.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} items  {msg}  [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut job = Job {
        model,
        tf,
        opts,
        kv: KvCache::new(KvCacheConfig {
            geometry,
            host_bytes: opts.host_kv_bytes,
            kv_dtype: opts.kv_dtype,
            disk: kv_disk,
            gpu: opts.gpu.clone(),
            policy: Box::new(opts.hot_policy),
        })?,
        out,
        stats: JobStats {
            model: model.spec.clone(),
            batch_size: opts.batch_size,
            kv_block_tokens: opts.block_tokens,
            items_total: lines.len(),
            ..JobStats::default()
        },
        next_seq: 0,
        progress,
    };
    job.kv
        .set_executor(opts.exec.routes, opts.exec.recompute, cfg.hidden)?;
    job.stats.backend = job.tf.backend_name().to_string();
    let pending = job.skip_done(lines, &done)?;
    job.schedule(pending)?;
    job.out.sync()?;
    job.progress.finish_and_clear();
    let s = &mut job.stats;
    s.wall_seconds = started.elapsed().as_secs_f64();
    s.prefill_tokens_per_s = rate(s.prompt_tokens, s.prefill_seconds);
    s.decode_tokens_per_s = rate(s.decode_tokens, s.decode_seconds);
    s.weight_load_seconds = job.tf.timings.weight_load_s;
    s.weight_bytes_fetched = job.tf.timings.weight_bytes_fetched;
    s.host_mlp_bytes = job.tf.timings.host_mlp_bytes;
    s.host_mlp_seconds = job.tf.timings.host_mlp_s;
    s.weight_wait_seconds = job.tf.timings.weight_wait_s;
    s.disk_weights = job.tf.disk_weight_stats();
    s.peak_rss_bytes = peak_rss_bytes();
    s.kv = job.kv.metrics();
    s.peak_kv_bytes = (s.kv.host_blocks_peak + s.kv.disk_blocks_peak) * s.kv.bytes_per_block
        + s.kv.gpu_blocks_peak * s.kv.gpu_bytes_per_block;
    Ok(job.stats)
}

fn reject(item: JobItem, error: impl Into<String>) -> BadLine {
    BadLine {
        line: item.line,
        id: item.id,
        error: error.into(),
    }
}

/// A phase's time less the tuning timed within it (never below zero, whatever the rounding).
fn net_of_tuning(elapsed_s: f64, tuning_s: f64) -> f64 {
    (elapsed_s - tuning_s).max(0.0)
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Peak resident set size of this process (Linux `ru_maxrss`, KiB → bytes).
pub fn peak_rss_bytes() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer we pass, which points at zeroed,
    // properly aligned storage of the right type that outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: getrusage returned 0, so it initialised the struct.
    let usage = unsafe { usage.assume_init() };
    usage.ru_maxrss.max(0) as u64 * 1024
}

impl<'a, 'm, B: RuntimeBackend> Job<'a, 'm, B> {
    /// Writes error records for bad lines, drops items already in OUT, returns the rest.
    fn skip_done(
        &mut self,
        lines: Vec<Result<JobItem, BadLine>>,
        done: &HashSet<String>,
    ) -> Result<VecDeque<JobItem>, GenerateError> {
        let mut pending = VecDeque::new();
        let mut seen = HashSet::new();
        for l in lines {
            match l {
                Ok(item) => {
                    let key = id_key(&item.id);
                    if done.contains(&key) {
                        self.stats.items_skipped_resume += 1;
                        self.progress.inc(1);
                    } else if !seen.insert(key) {
                        self.fail(
                            &item.id,
                            item.line,
                            "duplicate id: an earlier line has the same id",
                        )?;
                    } else {
                        pending.push_back(item);
                    }
                }
                Err(bad) => {
                    if done.contains(&id_key(&bad.id)) && !bad.id.is_null() {
                        self.stats.items_skipped_resume += 1;
                        self.progress.inc(1);
                    } else {
                        self.fail(&bad.id, bad.line, &bad.error)?;
                    }
                }
            }
        }
        Ok(pending)
    }

    fn fail(&mut self, id: &Value, line: usize, error: &str) -> Result<(), GenerateError> {
        self.out.write(&ErrorRecord { id, error, line })?;
        self.stats.items_failed += 1;
        self.progress.inc(1);
        Ok(())
    }

    fn schedule(&mut self, mut pending: VecDeque<JobItem>) -> Result<(), GenerateError> {
        let mut running: Vec<Running> = Vec::new();
        loop {
            let mut admitted = Vec::new();
            while running.len() + admitted.len() < self.opts.batch_size.max(1) {
                let Some(item) = pending.pop_front() else {
                    break;
                };
                match self.prepare(item) {
                    Ok(r) if r.max_new == 0 => self.write_done(&r, "length")?,
                    Ok(r) => {
                        self.kv.add_sequence(r.seq);
                        admitted.push(r);
                    }
                    Err(bad) => self.fail(&bad.id, bad.line, &bad.error)?,
                }
            }
            if !admitted.is_empty() {
                self.prefill(&mut admitted)?;
                for r in admitted {
                    self.finish_or_keep(r, &mut running)?;
                }
            }
            if running.is_empty() {
                if pending.is_empty() {
                    return Ok(());
                }
                continue;
            }
            self.decode_step(&mut running)?;
            for r in std::mem::take(&mut running) {
                self.finish_or_keep(r, &mut running)?;
            }
        }
    }

    /// Tokenizes and checks one item.
    fn prepare(&mut self, item: JobItem) -> Result<Running, BadLine> {
        let cfg = &self.model.config;
        let ids = match &item.input {
            ItemInput::Ids(ids) => ids.clone(),
            ItemInput::Prompt(text) => {
                let Some(tok) = &self.model.tokenizer else {
                    return Err(reject(
                        item,
                        format!(
                            "model `{}` has no tokenizer: give `input_ids` instead of `prompt`",
                            self.model.spec
                        ),
                    ));
                };
                let encoded = if self.opts.chat {
                    tok.render_chat(text).and_then(|t| tok.encode(&t, false))
                } else {
                    tok.encode(text, true)
                };
                match encoded {
                    Ok(ids) => ids,
                    Err(e) => return Err(reject(item, e)),
                }
            }
        };
        if ids.is_empty() {
            return Err(reject(item, "empty prompt: it has no tokens"));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab) {
            return Err(reject(
                item,
                format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab
                ),
            ));
        }
        if ids.len() >= cfg.max_context {
            return Err(reject(
                item,
                format!(
                    "prompt has {} tokens; the model's context is {} ({})",
                    ids.len(),
                    cfg.max_context,
                    cfg.max_context_source
                ),
            ));
        }
        if !item.stop.is_empty() && self.model.tokenizer.is_none() {
            return Err(reject(
                item,
                "`stop` strings need a tokenizer; this model has none",
            ));
        }
        let max_new = item
            .max_new_tokens
            .unwrap_or(self.opts.max_new_tokens)
            .min(cfg.max_context - ids.len());
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        let params = SamplingParams {
            temperature: item.temperature.unwrap_or(self.opts.temperature),
            top_p: item.top_p.unwrap_or(self.opts.top_p),
            seed: item.seed.unwrap_or(self.opts.seed),
        };
        Ok(Running {
            seq,
            sampler: Sampler::new(params),
            prompt_len: ids.len(),
            prompt: ids,
            generated: Vec::new(),
            max_new,
            next: 0,
            item,
        })
    }

    fn prefill(&mut self, batch: &mut [Running]) -> Result<(), GenerateError> {
        let _span = tracing::info_span!("prefill", sequences = batch.len()).entered();
        let t0 = Instant::now();
        let tuned0 = self.tf.gemm_tuning_seconds();
        let mut rows = Vec::new();
        // (sequence index in `batch`, row index in `rows`) of each prompt's last token.
        let mut last = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            rows.extend(r.prompt.iter().enumerate().map(|(pos, &token)| Row {
                seq: r.seq,
                pos,
                token,
            }));
            last.push((i, rows.len() - 1));
        }
        // Chunks of at most `prefill_chunk` rows; a prompt may straddle two chunks (its KV is
        // appended in order either way). Each chunk samples the prompts that end in it.
        let chunk = self.opts.prefill_chunk.max(1);
        let mut start = 0;
        let mut ends = last.iter().peekable();
        while start < rows.len() {
            let end = (start + chunk).min(rows.len());
            let mut here = Vec::new();
            while let Some(&&(i, row)) = ends.peek() {
                if row >= end {
                    break;
                }
                here.push((i, row - start));
                ends.next();
            }
            let logit_rows: Vec<usize> = here.iter().map(|h| h.1).collect();
            if end < rows.len() {
                self.tf
                    .expect_next_pass(&rows[end..(end + chunk).min(rows.len())]);
            }
            let picks = self.sample(batch, &here, &rows[start..end], &logit_rows)?;
            for (&(i, _), t) in here.iter().zip(picks) {
                batch[i].next = t;
            }
            start = end;
        }
        for r in batch.iter_mut() {
            r.prompt = Vec::new();
        }
        self.stats.prompt_tokens += rows.len();
        self.stats.prefill_seconds += self.untuned_seconds(t0, tuned0);
        Ok(())
    }

    /// Runs `rows` and samples the next token of `seqs[j].0` (an index into `running`) from the
    /// logits of row `logit_rows[j]`: greedy picks are made by the backend, where the logits are.
    fn sample(
        &mut self,
        running: &mut [Running],
        seqs: &[(usize, usize)],
        rows: &[Row],
        logit_rows: &[usize],
    ) -> Result<Vec<u32>, GenerateError> {
        if seqs.iter().all(|&(i, _)| running[i].sampler.is_greedy()) {
            return Ok(self.tf.forward_greedy(rows, logit_rows, &mut self.kv)?);
        }
        let logits = self.tf.forward(rows, logit_rows, &mut self.kv)?;
        Ok(seqs
            .iter()
            .zip(&logits)
            .map(|(&(i, _), l)| running[i].sampler.sample(l))
            .collect())
    }

    fn decode_step(&mut self, running: &mut [Running]) -> Result<(), GenerateError> {
        let _span = tracing::debug_span!("decode", sequences = running.len()).entered();
        let t0 = Instant::now();
        let tuned0 = self.tf.gemm_tuning_seconds();
        let rows: Vec<Row> = running
            .iter()
            .map(|r| Row {
                seq: r.seq,
                pos: r.prompt_len + r.generated.len() - 1,
                token: r.next,
            })
            .collect();
        let wanted: Vec<usize> = (0..rows.len()).collect();
        let seqs: Vec<(usize, usize)> = wanted.iter().map(|&i| (i, i)).collect();
        let picks = self.sample(running, &seqs, &rows, &wanted)?;
        for (r, t) in running.iter_mut().zip(picks) {
            r.next = t;
        }
        self.stats.decode_tokens += rows.len();
        self.stats.decode_steps += 1;
        let step = self.untuned_seconds(t0, tuned0);
        self.stats.decode_seconds += step;
        self.stats.decode_step_seconds.push(step);
        Ok(())
    }

    /// Seconds since `t0` less the GEMM tuning since then (the backend's total was `tuned0` at
    /// `t0`), which goes to `gemm_tuning_seconds`.
    fn untuned_seconds(&mut self, t0: Instant, tuned0: f64) -> f64 {
        let tuning = (self.tf.gemm_tuning_seconds() - tuned0).max(0.0);
        self.stats.gemm_tuning_seconds += tuning;
        net_of_tuning(t0.elapsed().as_secs_f64(), tuning)
    }

    /// Takes `r.next` as generated, then either finishes `r` (writing its record) or keeps it.
    fn finish_or_keep(
        &mut self,
        mut r: Running,
        running: &mut Vec<Running>,
    ) -> Result<(), GenerateError> {
        let cfg = &self.model.config;
        let is_eos = cfg.eos_token_ids.contains(&r.next) && !self.opts.ignore_eos;
        let reason = if is_eos {
            Some("eos")
        } else {
            r.generated.push(r.next);
            self.stats.generated_tokens += 1;
            if self.hits_stop(&r) {
                Some("stop")
            } else if r.generated.len() >= r.max_new {
                Some("length")
            } else {
                None
            }
        };
        match reason {
            None => running.push(r),
            Some(reason) => {
                self.write_done(&r, reason)?;
                self.kv.remove_sequence(r.seq).map_err(ForwardError::Kv)?;
            }
        }
        Ok(())
    }

    fn hits_stop(&self, r: &Running) -> bool {
        if r.item.stop.is_empty() {
            return false;
        }
        let Some(tok) = &self.model.tokenizer else {
            return false;
        };
        tok.decode(&r.generated)
            .is_ok_and(|text| r.item.stop.iter().any(|s| text.contains(s.as_str())))
    }

    fn write_done(&mut self, r: &Running, reason: &str) -> Result<(), GenerateError> {
        let text = match &self.model.tokenizer {
            Some(tok) => {
                let mut t = tok.decode(&r.generated).unwrap_or_default();
                if reason == "stop"
                    && let Some(cut) = r.item.stop.iter().filter_map(|s| t.find(s.as_str())).min()
                {
                    t.truncate(cut);
                }
                Some(t)
            }
            None => None,
        };
        self.out.write(&OutputRecord {
            id: &r.item.id,
            output_ids: &r.generated,
            text: text.as_deref(),
            prompt_tokens: r.prompt_len,
            generated_tokens: r.generated.len(),
            finish_reason: reason,
        })?;
        self.stats.items_ok += 1;
        self.progress.inc(1);
        let tps = rate(
            self.stats.generated_tokens,
            self.stats.decode_seconds + self.stats.prefill_seconds,
        );
        self.progress.set_message(format!("{tps:.1} tok/s"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::net_of_tuning;

    #[test]
    fn tuning_time_comes_out_of_the_phase_it_fell_in() {
        assert_eq!(net_of_tuning(1.5, 0.0), 1.5);
        assert_eq!(net_of_tuning(1.5, 0.25), 1.25);
        // The tuning is timed inside the phase; a rounding slip never makes it negative.
        assert_eq!(net_of_tuning(0.1, 0.2), 0.0);
    }
}
