//! What the planner knows of a model and of a job.
//!
//! Per layer, with `h` = hidden, `q` = heads·head_dim, `kv` = kv_heads·head_dim, `f` = intermediate:
//! - parameters: attention `h·q + 2·h·kv + q·h`; MLP `3·h·f` (gated: gate, up, down) or `2·h·f`
//!   (plain: fc1, fc2); plus biases and norms (`q + 2·kv + 2·h + f + 4·h` for plain/OPT, `2·h`
//!   for gated/Llama). Weight bytes = parameters × weight dtype bytes.
//! - GEMM FLOPs per token = 2·parameters; attention FLOPs per token = 4·ctx·heads·head_dim
//!   (Q·Kᵀ and P·V, 2 FLOPs per multiply-add).
//! - KV bytes per token = `kv_width · kv_dtype_bytes` with `kv_width = 2·kv_heads·head_dim` (K and V).
//! - hidden-state bytes per token = `hidden · 4`: the runtime keeps activations and the hidden
//!   states a recompute tier stores instead of KV in f32, so recomputed K and V equal the
//!   appended ones exactly. Recompute therefore halves the bytes of an MHA model's KV only when
//!   the KV is f32 too; with bf16 KV the two are the same size.
//! - regenerating K and V from a stored hidden state costs `2·hidden·kv_width` FLOPs per token.
//!
//! Invariants (checked by [`ModelSpec::validate`] and [`Workload::validate`]): every dimension and
//! the batch are non-zero; `prompt_len + gen_len ≥ 1`.

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// Llama, Mistral, Qwen2: SwiGLU (gate, up, down), RMSNorm, no biases.
    Gated,
    /// OPT: fc1/fc2 with ReLU, LayerNorm, biases everywhere.
    Plain,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// For messages only (`synthetic:opt-30b`).
    pub name: String,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    /// Bytes per weight element (2 for f16/bf16); activations and hidden states use it too.
    pub weight_dtype_bytes: u64,
    /// Bytes per K or V element in the cache.
    pub kv_dtype_bytes: u64,
    pub mlp: MlpKind,
    /// Times the GPU runs each GEMM of more than [`GEMV_MAX_ROWS`] rows over half-precision
    /// weights: 2 under `--gpu-gemm split` (the f32 activation as two half-precision terms, each
    /// multiplied by the whole weight), 1 under `rounded`. The profile's GEMM and projection
    /// rates are one pass's. Absent in older files: 1.
    #[serde(default = "one_pass")]
    pub gemm_passes: u64,
}

/// Rows up to which the GPU multiplies by a GEMV kernel with f32 activations, once, whatever
/// `--gpu-gemm` says (the runtime's decode path).
pub const GEMV_MAX_ROWS: u64 = 8;

fn one_pass() -> u64 {
    1
}

impl ModelSpec {
    /// The same model with its KV cache stored in another dtype (`--kv-dtype`).
    pub fn with_kv_dtype_bytes(mut self, bytes: u64) -> Self {
        self.kv_dtype_bytes = bytes;
        self
    }

    /// The same model run with `passes` GEMM passes (see [`ModelSpec::gemm_passes`]).
    pub fn with_gemm_passes(mut self, passes: u64) -> Self {
        self.gemm_passes = passes;
        self
    }

    /// Passes of one GEMM of `rows` rows over this model's weights: 1 for the GEMV kernel's rows
    /// and for f32 weights, else [`ModelSpec::gemm_passes`].
    pub fn gemm_passes_at(&self, rows: u64) -> f64 {
        if rows <= GEMV_MAX_ROWS || self.weight_dtype_bytes != 2 {
            1.0
        } else {
            self.gemm_passes as f64
        }
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        let dims = [
            ("model layers", self.layers),
            ("model hidden size", self.hidden),
            ("model heads", self.heads),
            ("model kv_heads", self.kv_heads),
            ("model head_dim", self.head_dim),
            ("model intermediate size", self.intermediate),
            ("model vocabulary", self.vocab),
            ("model weight dtype bytes", self.weight_dtype_bytes),
            ("model kv dtype bytes", self.kv_dtype_bytes),
            ("model GEMM passes", self.gemm_passes),
        ];
        for (field, v) in dims {
            if v == 0 {
                return Err(PlanError::InvalidInput {
                    field,
                    reason: "must be non-zero".into(),
                });
            }
        }
        Ok(())
    }

    pub fn q_width(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// `2·kv_heads·head_dim`: K and V elements per token per layer.
    pub fn kv_width(&self) -> u64 {
        2 * self.kv_heads * self.head_dim
    }

    pub fn params_per_layer(&self) -> u64 {
        let (h, q, kv, f) = (
            self.hidden,
            self.q_width(),
            self.kv_heads * self.head_dim,
            self.intermediate,
        );
        let attn = h * q + 2 * h * kv + q * h;
        match self.mlp {
            MlpKind::Gated => attn + 3 * h * f + 2 * h,
            MlpKind::Plain => attn + 2 * h * f + (q + 2 * kv + 2 * h + f) + 4 * h,
        }
    }

    pub fn weight_bytes_per_layer(&self) -> u64 {
        self.params_per_layer() * self.weight_dtype_bytes
    }

    /// Bytes of a layer's MLP matrices (gate, up, down or fc1, fc2; biases left out): the part
    /// whose neurons a policy can split between the GPU and host threads.
    pub fn mlp_bytes_per_layer(&self) -> u64 {
        let mats = match self.mlp {
            MlpKind::Gated => 3,
            MlpKind::Plain => 2,
        };
        mats * self.hidden * self.intermediate * self.weight_dtype_bytes
    }

    /// Token embedding plus LM head, counted as two matrices (an upper bound when tied): kept on
    /// the GPU by every policy.
    pub fn embedding_bytes(&self) -> u64 {
        2 * self.vocab * self.hidden * self.weight_dtype_bytes
    }

    pub fn gemm_flops_per_token_per_layer(&self) -> f64 {
        2.0 * self.params_per_layer() as f64
    }

    pub fn attention_flops_per_token_per_layer(&self, ctx: f64) -> f64 {
        4.0 * ctx * self.q_width() as f64
    }

    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        self.kv_width() * self.kv_dtype_bytes
    }

    /// Bytes one token moves through HBM per layer in the kernels between the GEMMs, which run
    /// one after another with them on the compute stream. Activations are f32 between kernels
    /// and GEMM operands are converted once to the weight dtype (`o` bytes a value):
    /// - each norm reads its input and writes its f32 output and the operands: `(8 + o)·h`;
    /// - RoPE rewrites q and k: `8·(q + kv)` (Llama family; OPT has learned positions);
    /// - the KV append reads k and v and writes them in the KV dtype: `2·kv·(4 + kvb)`;
    /// - the attention output becomes the output projection's operands: `(4 + o)·q`;
    /// - two residual adds, each reading two tensors and writing one: `2 · 12·h`;
    /// - the MLP's activation: SwiGLU reads gate and up and writes one (`12·i`), ReLU rewrites
    ///   its input in place (`8·i`); then it becomes the down projection's operands:
    ///   `(4 + o)·i`.
    ///
    /// The GEMMs' own reads and writes are theirs (a prefill's GEMMs are bound by FLOPs, a
    /// decode step's by weights), and attention's K, V and queries are charged to attention.
    pub fn activation_bytes_per_token_per_layer(&self) -> u64 {
        // `kv`: K's width (V's is the same).
        let (h, q, kv, i) = (
            self.hidden,
            self.q_width(),
            self.kv_width() / 2,
            self.intermediate,
        );
        let o = self.weight_dtype_bytes;
        let norms = 2 * (8 + o) * h;
        // Keyed on the MLP: the gated (Llama) family uses RoPE, the plain one (OPT) learned
        // positions.
        let rope = match self.mlp {
            MlpKind::Gated => 8 * (q + kv),
            MlpKind::Plain => 0,
        };
        let append = 2 * kv * (4 + self.kv_dtype_bytes);
        let act = match self.mlp {
            MlpKind::Gated => 12 * i,
            MlpKind::Plain => 8 * i,
        };
        norms + rope + append + (4 + o) * q + 24 * h + act + (4 + o) * i
    }

    /// f32 hidden states (see the module header).
    pub fn hidden_bytes_per_token(&self) -> u64 {
        self.hidden * 4
    }

    /// FLOPs to regenerate one token's K and V in one layer from its stored hidden state.
    pub fn recompute_flops_per_token_per_layer(&self) -> f64 {
        2.0 * self.hidden as f64 * self.kv_width() as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Sequences in flight.
    pub batch: u64,
    pub prompt_len: u64,
    pub gen_len: u64,
}

impl Workload {
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.batch == 0 {
            return Err(PlanError::InvalidInput {
                field: "batch",
                reason: "must be at least 1".into(),
            });
        }
        if self.prompt_len + self.gen_len == 0 {
            return Err(PlanError::InvalidInput {
                field: "prompt and generation lengths",
                reason: "at least one token is needed".into(),
            });
        }
        Ok(())
    }

    /// Tokens per sequence at the end: what memory is sized for.
    pub fn final_len(&self) -> u64 {
        self.prompt_len + self.gen_len
    }

    /// Mean context attended by a decode step: step `j` (1-based) attends `prompt_len + j` tokens.
    pub fn mean_decode_context(&self) -> f64 {
        self.prompt_len as f64 + (self.gen_len as f64 + 1.0) / 2.0
    }
}

/// What the user lets strata use, per tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    pub gpu_bytes: u64,
    pub host_bytes: u64,
    pub disk_bytes: u64,
}

impl Budgets {
    /// Whether memory of `mem` bytes per tier ([`crate::memory`]) fits in every tier.
    pub fn hold(&self, mem: &crate::cost::TierBytes) -> bool {
        mem.gpu <= self.gpu_bytes && mem.host <= self.host_bytes && mem.disk <= self.disk_bytes
    }
}
