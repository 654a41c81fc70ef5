//! The hardware profile: what the cost model knows of a machine. `strata calibrate` measures it
//! and writes it as JSON (this module defines the format, [`PROFILE_VERSION`]); the reference
//! profiles below stand in where no measurement is wanted, and every consumer must say so to the
//! user.
//!
//! Units: bandwidths in GB/s (10⁹ bytes per second, each byte counted once, except `hbm_gbps`:
//! read + written), GEMM rates in TFLOP/s, capacities in bytes. Invariants (checked on load):
//! every rate is finite and > 0; `version == PROFILE_VERSION`. A calibration that measured no
//! disk keeps placeholder disk rates (> 0, so the cost model stays finite), `disk_bytes = 0`
//! and `disk_measured = false`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ProfileError;

/// Bumped whenever a field is removed or changes meaning, or is added without a default that
/// keeps older files' meaning (`disk_measured` defaults to true: older files' disk figures were
/// all meant as figures).
pub const PROFILE_VERSION: u32 = 1;

/// Per-core GFLOP/s assumed for the host MLP share when a profile has no measurement: what
/// `strata calibrate` measured on the 16-core host of an H100 machine (about 480 GFLOP/s at
/// 16–32 rows over f16 weights, 2026-11-22).
pub const FALLBACK_HOST_MLP_GFLOPS_PER_CORE: f64 = 30.0;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GemmTflops {
    pub f32: f64,
    pub f16: f64,
    pub bf16: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub version: u32,
    /// What was measured (`NVIDIA H100 80GB HBM3, 16-core Xeon, virtio disk`).
    pub machine: String,
    /// When (ISO 8601), or `reference: …` for a built-in profile.
    pub measured_at: String,
    /// True for a built-in reference profile, not a measurement of this machine.
    pub reference: bool,
    /// False when "GPU" means the CPU itself (GPU tier = the compute device's working memory).
    pub has_gpu: bool,
    /// Dense GEMM throughput per weight dtype.
    pub gemm_tflops: GemmTflops,
    /// GPU memory bandwidth (bytes read + written).
    pub hbm_gbps: f64,
    /// Host → device from pinned memory.
    pub h2d_gbps: f64,
    /// Device → host into pinned memory.
    pub d2h_gbps: f64,
    /// Host DRAM copy bandwidth (all cores), in bytes copied: the memory moved twice as many
    /// (see [`HardwareProfile::host_memory_bps`]).
    pub host_mem_gbps: f64,
    /// KV bytes per second the host attention engine reads while attending (all cores), in the
    /// dtype the host tier holds on a GPU run (`strata calibrate` measures bf16 blocks).
    pub host_attention_gbps: f64,
    /// Disk read through the chosen IO engine at a large request size.
    pub disk_read_gbps: f64,
    pub disk_write_gbps: f64,
    /// False when no disk was measured (`strata calibrate` without `--disk-dir`): the disk
    /// rates are then placeholders and `disk_bytes` is 0. Absent in older files: true.
    #[serde(default = "default_true")]
    pub disk_measured: bool,
    /// Request size at which the disk reaches half its bandwidth: effective bandwidth at request
    /// size `r` is `disk_gbps · r / (r + disk_half_bandwidth_request_bytes)`.
    pub disk_half_bandwidth_request_bytes: u64,
    /// Fixed GPU cost per layer per GPU batch (kernel launches, syncs), microseconds.
    pub gpu_layer_overhead_us: f64,
    /// Causal prefill attention on the GPU (half-precision KV), TFLOP/s: an attention kernel
    /// runs well below the GEMM peak. Absent (older files, no GPU): the GEMM rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_attention_tflops: Option<f64>,
    /// Causal prefill attention over f32 KV (`--kv-dtype f32`), TFLOP/s: the GPU's generic
    /// kernel, since the tensor-core ones take half-precision blocks only, and far slower.
    /// Absent (older files, no GPU): the f32 GEMM rate, an optimistic stand-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_attention_f32_tflops: Option<f64>,
    /// Bytes per second the host's memory served to host threads scanning it (host attention)
    /// and to host→device copies at the same time, both counted. Measured because the two
    /// contend: the sum is well below what each gets alone. Absent (older files, no GPU):
    /// estimated from the copy and scan rates ([`HardwareProfile::host_memory_bps`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory_shared_gbps: Option<f64>,
    /// GFLOP/s host threads sustain on matrix-vector products of [`HOST_MLP_MAX_ROWS`] rows over
    /// half-precision weights: the host MLP share's rate once its rows make it compute-bound.
    /// Absent (older files): [`FALLBACK_HOST_MLP_GFLOPS_PER_CORE`] per core.
    ///
    /// [`HOST_MLP_MAX_ROWS`]: crate::HOST_MLP_MAX_ROWS
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mlp_gflops: Option<f64>,
    /// The host MLP share as a decode step runs it: `[rows, GB/s]` pairs, rows ascending, each
    /// the weight bytes per second that one layer's share (gate, up and down over bf16 weights)
    /// streamed at that many rows, timed call by call after the threads went idle. Where
    /// present the planner charges the share at the rate of its GPU batch's rows
    /// ([`HardwareProfile::host_mlp_weight_bps`]) rather than the attention scan's bandwidth
    /// and `host_mlp_gflops`. Absent (older files): that estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mlp_layer_gbps: Option<Vec<[f64; 2]>>,
    /// Host attention as a decode step calls it, per KV block size: `[block tokens, GB/s]`
    /// pairs, block tokens ascending, each the KV bytes per second beyond a fixed cost per call
    /// (`host_attention_call_us`), fitted over decode-sized calls (32 to 256 MiB) over blocks
    /// of that many tokens. Small blocks cost more per byte (per-block
    /// setup and online-softmax rescaling over fewer tokens). Where present the planner
    /// charges a policy's host KV at the rate of its block size
    /// ([`HardwareProfile::host_attention_bps`]); absent (older files): `host_attention_gbps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_attention_layer_gbps: Option<Vec<[f64; 2]>>,
    /// Fixed cost of one host attention call (waking the threads, splitting, merging, joining),
    /// microseconds: the intercept of the fit above (the median over the block sizes). A decode
    /// step makes one call per GPU batch per layer. Absent (older files): 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_attention_call_us: Option<f64>,
    /// The fraction of its own rate host attention keeps while host→device copies run (the
    /// scan beside copies over the same scan alone, both measured by `strata calibrate`): the
    /// copy engines' reads of host memory slow the threads' reads. Host compute that runs
    /// while a layer's copies do is charged at this fraction of its rate. Absent (older files,
    /// no GPU): 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_attention_beside_copies: Option<f64>,
    /// Weights as the GPU's `linear` streams them in a decode step: `[rows, GB/s]` pairs, rows
    /// ascending, each the weight bytes per second of bf16 projections at that many rows (the
    /// GEMV kernel up to 8 rows, cuBLAS above, `--gpu-gemm rounded`), launches included. Where
    /// present the planner charges a decode step's GPU weights at its GPU batch's rows
    /// ([`HardwareProfile::gpu_weight_bps`]); absent (older files, no GPU): `hbm_gbps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_weight_gbps: Option<Vec<[f64; 2]>>,
    /// GPU decode attention as a line through its launches: the KV bytes per second the
    /// split-KV decode kernel reads once its fixed cost per launch
    /// (`gpu_decode_attention_call_us`) is paid, both fitted to launches over 1 to 64
    /// sequences of 4,096 tokens (bf16, 16-token blocks, Llama-3-8B heads). Where present the
    /// planner charges a decode step's GPU-attended KV at this rate plus one launch per GPU
    /// batch ([`HardwareProfile::gpu_decode_attention_s`]); absent (older files, no GPU):
    /// `hbm_gbps`, no fixed cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_decode_attention_gbps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_decode_attention_call_us: Option<f64>,
    /// Host time a decode step spends per layer issuing the GPU's work: `[sequences, µs]`
    /// pairs, sequences ascending, measured by running a decode whose GPU work is small (the
    /// launches, uploads and per-sequence KV bookkeeping of one GPU batch's layer). Where
    /// present the planner takes a decode layer's GPU time as the longer of its kernels'
    /// time and this ([`HardwareProfile::decode_issue_s`]): the GPU cannot run ahead of the
    /// host that issues its work. Absent (older files, no GPU): `gpu_layer_overhead_us` added
    /// to the kernels' time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_issue_us: Option<Vec<[f64; 2]>>,
    /// GPU time per decode layer beyond its weights and KV at the calibrated rates (the small
    /// kernels and the gaps a stream leaves between kernels): `[sequences, µs]` pairs,
    /// sequences ascending, each a Llama-3-8B-shaped decode layer's measured time less what
    /// the model charges its weights and KV. Where present the planner adds it to a decode
    /// layer's kernels in place of [`crate::DECODE_SMALL_KERNELS_S`]
    /// ([`HardwareProfile::decode_layer_extra_s`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_layer_extra_us: Option<Vec<[f64; 2]>>,
    /// Time a decode layer spends per GPU batch, beyond its kernels, issue and host attention as
    /// modelled, when it attends KV in host memory: the turns the GPU and the issuing thread
    /// take there (the queries come down, the host attends, its partials go up and merge), in
    /// which neither hides the other's work. `[sequences, µs]` pairs, sequences ascending,
    /// measured by running a decode of Llama-3-8B's layers whose older KV is in host memory and
    /// attended there, less its measured host attention and the model's prediction of the rest.
    /// Where present the planner adds it to every decode layer that attends on the host
    /// ([`HardwareProfile::host_tier_issue_s`]). Absent (older files, no GPU): 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_tier_issue_us: Option<Vec<[f64; 2]>>,
    pub gpu_bytes: u64,
    pub host_bytes: u64,
    pub disk_bytes: u64,
    pub cpu_cores: u32,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn default_true() -> bool {
    true
}

impl HardwareProfile {
    /// The H100 machine measured on 2026-11-22 (the project's GPU notes, §7 "Measured numbers").
    /// Where two runs differ, the lower figure is used.
    pub fn h100_reference() -> Self {
        HardwareProfile {
            version: PROFILE_VERSION,
            machine: "NVIDIA H100 80GB HBM3 (PCIe Gen5 x16), 16-core Xeon, virtio disk".into(),
            measured_at: "reference: H100 machine measured 2026-11-22, not this machine".into(),
            reference: true,
            has_gpu: true,
            gemm_tflops: GemmTflops {
                // Not measured: FP32 through TF32 tensor cores is far below bf16; a guess.
                f32: 200.0,
                // cuBLAS 4096³: f16 718 / 728, bf16 728 / 750 TFLOP/s.
                f16: 718.0,
                bf16: 728.0,
            },
            // d2d copy 1487 GB/s copied = 2975 GB/s read + written.
            hbm_gbps: 2975.0,
            // Pinned 1 GiB copies: H2D 52.6 / 54.8, D2H 53.9 / 55.1 GB/s.
            h2d_gbps: 52.6,
            d2h_gbps: 53.9,
            // Rust copy_from_slice, 16 threads: 41.3 / 28.0 GB/s copied.
            host_mem_gbps: 28.0,
            // Not measured yet: assumed equal to the host copy bandwidth (a read-only scan).
            host_attention_gbps: 28.0,
            // io_uring O_DIRECT QD32 × 1 MiB: 1.41 / 1.52 GB/s (QD128 × 4 MiB: 1.69 / 1.57);
            // write 8 MiB + fsync 1.68 / 1.44. The figures here are large-request asymptotes:
            // with half bandwidth at 64 KiB, 1 MiB requests get 94% (1.41 / 0.94 = 1.5).
            disk_read_gbps: 1.5,
            disk_write_gbps: 1.53,
            disk_measured: true,
            disk_half_bandwidth_request_bytes: 64 * 1024,
            gpu_layer_overhead_us: 40.0,
            // `gpu-prefill`, bf16, 4 × 8K tokens (bench/RESULTS.md).
            prefill_attention_tflops: Some(285.0),
            prefill_attention_f32_tflops: None,
            host_memory_shared_gbps: None,
            host_mlp_gflops: None,
            host_mlp_layer_gbps: None,
            host_attention_layer_gbps: None,
            host_attention_call_us: None,
            host_attention_beside_copies: None,
            gpu_weight_gbps: None,
            gpu_decode_attention_gbps: None,
            gpu_decode_attention_call_us: None,
            decode_issue_us: None,
            host_tier_issue_us: None,
            decode_layer_extra_us: None,
            // 79.18 GiB HBM; 125 GiB RAM; 64 GiB free disk.
            gpu_bytes: (79.18 * GIB) as u64,
            host_bytes: (125.0 * GIB) as u64,
            disk_bytes: (64.0 * GIB) as u64,
            cpu_cores: 16,
        }
    }

    /// A small machine with no GPU: the "GPU" tier is the CPU's working memory, so host ↔ GPU
    /// transfers are DRAM copies. Order-of-magnitude figures for a few cores, not measurements.
    pub fn cpu_only_reference() -> Self {
        HardwareProfile {
            version: PROFILE_VERSION,
            machine: "CPU only (a few cores, DDR4/5, NVMe)".into(),
            measured_at: "reference: order-of-magnitude figures, not this machine".into(),
            reference: true,
            has_gpu: false,
            gemm_tflops: GemmTflops {
                f32: 0.2,
                f16: 0.1,
                bf16: 0.1,
            },
            hbm_gbps: 20.0,
            h2d_gbps: 10.0,
            d2h_gbps: 10.0,
            host_mem_gbps: 10.0,
            host_attention_gbps: 10.0,
            disk_read_gbps: 2.0,
            disk_write_gbps: 1.0,
            disk_measured: true,
            disk_half_bandwidth_request_bytes: 128 * 1024,
            gpu_layer_overhead_us: 5.0,
            prefill_attention_tflops: None,
            prefill_attention_f32_tflops: None,
            host_memory_shared_gbps: None,
            host_mlp_gflops: None,
            host_mlp_layer_gbps: None,
            host_attention_layer_gbps: None,
            host_attention_call_us: None,
            host_attention_beside_copies: None,
            gpu_weight_gbps: None,
            gpu_decode_attention_gbps: None,
            gpu_decode_attention_call_us: None,
            decode_issue_us: None,
            host_tier_issue_us: None,
            decode_layer_extra_us: None,
            gpu_bytes: (8.0 * GIB) as u64,
            host_bytes: (16.0 * GIB) as u64,
            disk_bytes: (64.0 * GIB) as u64,
            cpu_cores: 2,
        }
    }

    /// Prefill attention FLOP/s for a weight dtype of `bytes` bytes: the measured rate, else
    /// the GEMM rate.
    pub fn prefill_attention_flops(&self, kv_bytes: u64) -> f64 {
        let measured = if kv_bytes >= 4 {
            self.prefill_attention_f32_tflops
        } else {
            self.prefill_attention_tflops
        };
        measured.map_or_else(|| self.gemm_flops(kv_bytes), |t| t * 1e12)
    }

    /// GEMM FLOP/s for a weight dtype of `bytes` bytes (2 → the slower of f16 and bf16).
    pub fn gemm_flops(&self, bytes: u64) -> f64 {
        let tflops = if bytes >= 4 {
            self.gemm_tflops.f32
        } else {
            self.gemm_tflops.f16.min(self.gemm_tflops.bf16)
        };
        tflops * 1e12
    }

    /// Bytes per second the host's memory serves, reads and writes together, to everything that
    /// shares it (host attention and the host's MLP share, the copy engines' DMA, disk IO): the
    /// measured shared rate when there is one. Else an estimate: `host_mem_gbps` counts a copy's
    /// bytes once, but a copy reads each byte and writes it (and with ordinary stores also reads
    /// the destination line first), so the memory sustained at least twice that; the host
    /// attention figure is a read-only scan the memory also sustained, so it is a floor.
    pub fn host_memory_bps(&self) -> f64 {
        let estimate = (2.0 * self.host_mem_gbps).max(self.host_attention_gbps);
        self.host_memory_shared_gbps.unwrap_or(estimate) * 1e9
    }

    /// Weight bytes per second the host MLP share streams at `rows` rows, from the measured
    /// `host_mlp_layer_gbps` (seconds per byte interpolated linearly in rows between the
    /// measured row counts, the nearest measurement's outside them); `None` without one.
    pub fn host_mlp_weight_bps(&self, rows: f64) -> Option<f64> {
        interpolated_bps(self.host_mlp_layer_gbps.as_deref()?, rows)
    }

    /// KV bytes per second host attention reads over blocks of `block_tokens` tokens: from the
    /// measured `host_attention_layer_gbps` where there is one (interpolated as
    /// [`HardwareProfile::host_mlp_weight_bps`] is), else `host_attention_gbps`.
    pub fn host_attention_bps(&self, block_tokens: f64) -> f64 {
        self.host_attention_layer_gbps
            .as_deref()
            .and_then(|pts| interpolated_bps(pts, block_tokens))
            .unwrap_or(self.host_attention_gbps * 1e9)
    }

    /// Weight bytes per second a decode step's GPU projections stream at `rows` rows: the
    /// measured `gpu_weight_gbps` (interpolated as [`HardwareProfile::host_mlp_weight_bps`]
    /// is), else `hbm_gbps`.
    pub fn gpu_weight_bps(&self, rows: f64) -> f64 {
        self.gpu_weight_gbps
            .as_deref()
            .and_then(|pts| interpolated_bps(pts, rows))
            .unwrap_or(self.hbm_gbps * 1e9)
    }

    /// Seconds the GPU's decode attention takes over `bytes` of KV in `launches` launches:
    /// the fitted `gpu_decode_attention_gbps` and `gpu_decode_attention_call_us`, else the
    /// bytes at `hbm_gbps`.
    pub fn gpu_decode_attention_s(&self, bytes: f64, launches: f64) -> f64 {
        match self.gpu_decode_attention_gbps {
            Some(gbps) => {
                bytes / (gbps * 1e9)
                    + launches * self.gpu_decode_attention_call_us.unwrap_or(0.0) * 1e-6
            }
            None => bytes / (self.hbm_gbps * 1e9),
        }
    }

    /// Seconds the host takes to issue one decode layer of a GPU batch of `sequences`, from the
    /// measured `decode_issue_us` ([`along_sequences`]), never less than at the fewest
    /// sequences measured; `None` without one.
    pub fn decode_issue_s(&self, sequences: f64) -> Option<f64> {
        let pts = self.decode_issue_us.as_deref()?;
        let least = pts.first()?[1] * 1e-6;
        Some(along_sequences(pts, sequences)?.max(least))
    }

    /// Seconds a decode layer of a GPU batch of `sequences` spends on the turns around its host
    /// attention (queries down, partials up, the merge), from the measured
    /// `host_tier_issue_us` ([`along_sequences`], never negative); 0 without one.
    pub fn host_tier_issue_s(&self, sequences: f64) -> f64 {
        self.host_tier_issue_us
            .as_deref()
            .and_then(|pts| along_sequences(pts, sequences))
            .map_or(0.0, |s| s.max(0.0))
    }

    /// GPU seconds a decode layer of a GPU batch of `sequences` takes beyond its weights and KV,
    /// from the measured `decode_layer_extra_us` ([`along_sequences`], never negative); `None`
    /// without one.
    pub fn decode_layer_extra_s(&self, sequences: f64) -> Option<f64> {
        Some(along_sequences(self.decode_layer_extra_us.as_deref()?, sequences)?.max(0.0))
    }

    /// FLOP/s of the host MLP share's matrix-vector products (see `host_mlp_gflops`).
    pub fn host_mlp_flops(&self) -> f64 {
        self.host_mlp_gflops
            .unwrap_or(FALLBACK_HOST_MLP_GFLOPS_PER_CORE * self.cpu_cores.max(1) as f64)
            * 1e9
    }

    /// Effective disk read bandwidth in bytes/s at request size `request_bytes`.
    pub fn disk_read_bps(&self, request_bytes: u64) -> f64 {
        self.disk_read_gbps * 1e9 * disk_efficiency(request_bytes, self)
    }

    pub fn disk_write_bps(&self, request_bytes: u64) -> f64 {
        self.disk_write_gbps * 1e9 * disk_efficiency(request_bytes, self)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ProfileError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let err = |source| ProfileError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let v: VersionOnly = serde_json::from_str(text).map_err(err)?;
        if v.version != PROFILE_VERSION {
            return Err(ProfileError::Version {
                path: path.to_path_buf(),
                found: v.version,
                expected: PROFILE_VERSION,
            });
        }
        let p: HardwareProfile = serde_json::from_str(text).map_err(err)?;
        p.validate(path)?;
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let text = self.to_json();
        std::fs::write(path, text + "\n").map_err(|source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn to_json(&self) -> String {
        // A struct of numbers and strings always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self, path: &Path) -> Result<(), ProfileError> {
        let rates = [
            ("gemm_tflops.f32", self.gemm_tflops.f32),
            ("gemm_tflops.f16", self.gemm_tflops.f16),
            ("gemm_tflops.bf16", self.gemm_tflops.bf16),
            ("hbm_gbps", self.hbm_gbps),
            ("h2d_gbps", self.h2d_gbps),
            ("d2h_gbps", self.d2h_gbps),
            ("host_mem_gbps", self.host_mem_gbps),
            ("host_attention_gbps", self.host_attention_gbps),
            ("disk_read_gbps", self.disk_read_gbps),
            ("disk_write_gbps", self.disk_write_gbps),
            (
                "prefill_attention_tflops",
                self.prefill_attention_tflops.unwrap_or(1.0),
            ),
            (
                "prefill_attention_f32_tflops",
                self.prefill_attention_f32_tflops.unwrap_or(1.0),
            ),
            (
                "host_memory_shared_gbps",
                self.host_memory_shared_gbps.unwrap_or(1.0),
            ),
            ("host_mlp_gflops", self.host_mlp_gflops.unwrap_or(1.0)),
            (
                "gpu_decode_attention_gbps",
                self.gpu_decode_attention_gbps.unwrap_or(1.0),
            ),
        ];
        for (field, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return Err(ProfileError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    reason: "a finite number > 0",
                });
            }
        }
        // `[x, value]` tables: x ≥ 1 ascending, values > 0 (≥ 0 where 0 is a measurement: the
        // decode layer's extra is measured less modelled, so it may be 0, never negative).
        let tables = [
            (
                "host_mlp_layer_gbps",
                &self.host_mlp_layer_gbps,
                "[rows, GB/s] pairs with rows ≥ 1 ascending and GB/s > 0",
                false,
            ),
            (
                "host_attention_layer_gbps",
                &self.host_attention_layer_gbps,
                "[block tokens, GB/s] pairs with block tokens ≥ 1 ascending and GB/s > 0",
                false,
            ),
            (
                "gpu_weight_gbps",
                &self.gpu_weight_gbps,
                "[rows, GB/s] pairs with rows ≥ 1 ascending and GB/s > 0",
                false,
            ),
            (
                "decode_issue_us",
                &self.decode_issue_us,
                "[sequences, µs] pairs with sequences ≥ 1 ascending and µs > 0",
                false,
            ),
            (
                "decode_layer_extra_us",
                &self.decode_layer_extra_us,
                "[sequences, µs] pairs with sequences ≥ 1 ascending and µs ≥ 0",
                true,
            ),
            (
                "host_tier_issue_us",
                &self.host_tier_issue_us,
                "[sequences, µs] pairs with sequences ≥ 1 ascending and µs ≥ 0",
                true,
            ),
        ];
        for (field, table, reason, zero_ok) in tables {
            let Some(pts) = table else { continue };
            let ok = pts.iter().all(|[x, v]| {
                x.is_finite() && *x >= 1.0 && v.is_finite() && (*v > 0.0 || zero_ok && *v == 0.0)
            }) && pts.windows(2).all(|w| w[0][0] < w[1][0]);
            if !ok {
                return Err(ProfileError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    reason,
                });
            }
        }
        if let Some(f) = self.host_attention_beside_copies
            && !(f.is_finite() && f > 0.0 && f <= 1.0)
        {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                field: "host_attention_beside_copies",
                reason: "a fraction in (0, 1]",
            });
        }
        for (field, us) in [
            ("host_attention_call_us", self.host_attention_call_us),
            (
                "gpu_decode_attention_call_us",
                self.gpu_decode_attention_call_us,
            ),
        ] {
            if let Some(us) = us
                && !(us.is_finite() && us >= 0.0)
            {
                return Err(ProfileError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    reason: "a finite number ≥ 0",
                });
            }
        }
        if !(self.gpu_layer_overhead_us.is_finite() && self.gpu_layer_overhead_us >= 0.0) {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                field: "gpu_layer_overhead_us",
                reason: "a finite number ≥ 0",
            });
        }
        Ok(())
    }
}

/// A per-layer time measured at a few sequence counts (`[sequences, µs]`, ascending), in seconds
/// at `sequences`: linear between the measured counts, along the last two measurements' line
/// past the largest (the per-sequence work goes on growing), the smallest's below it. `None`
/// for an empty table.
fn along_sequences(pts: &[[f64; 2]], sequences: f64) -> Option<f64> {
    let last = pts.len().checked_sub(1)?;
    let at = |i: usize, j: usize| {
        let ([x0, y0], [x1, y1]) = (pts[i], pts[j]);
        y0 + (sequences - x0) * (y1 - y0) / (x1 - x0)
    };
    let us = if last == 0 || sequences <= pts[0][0] {
        pts[0][1]
    } else {
        let i = (1..=last).find(|&i| sequences <= pts[i][0]).unwrap_or(last);
        at(i - 1, i)
    };
    Some(us * 1e-6)
}

/// Bytes per second at `x` from `[x, GB/s]` points (x ascending): seconds per byte interpolated
/// linearly in `x` between the points, the nearest point's rate outside them; `None` without
/// points.
fn interpolated_bps(pts: &[[f64; 2]], x: f64) -> Option<f64> {
    let spb = |i: usize| 1.0 / (pts[i][1] * 1e9);
    let last = pts.len().checked_sub(1)?;
    if x <= pts[0][0] {
        return Some(1.0 / spb(0));
    }
    for i in 0..last {
        let (x0, x1) = (pts[i][0], pts[i + 1][0]);
        if x <= x1 {
            let f = (x - x0) / (x1 - x0);
            return Some(1.0 / (spb(i) + f * (spb(i + 1) - spb(i))));
        }
    }
    Some(1.0 / spb(last))
}

fn disk_efficiency(request_bytes: u64, p: &HardwareProfile) -> f64 {
    let r = request_bytes.max(1) as f64;
    r / (r + p.disk_half_bandwidth_request_bytes as f64)
}
