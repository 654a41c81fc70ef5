//! The model's hyper-parameters, normalised from whatever wrote them: Hugging Face `config.json`
//! (both the top-level `rope_theta`/`rope_scaling` keys of transformers 4 and the
//! `rope_parameters` block of transformers 5; `torch_dtype` or `dtype`), GGUF metadata, or a
//! synthetic preset. Anything that would change the math and is not implemented is refused here,
//! naming the file and field, so it can never be computed wrong in silence.

use std::path::Path;

use serde_json::Value;
use strata_kernels::{DType, RopeScaling};

use crate::error::{ModelError, ModelResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, Mistral: RMSNorm, RoPE, SwiGLU, no biases.
    Llama,
    /// Qwen2: Llama plus biases on Q, K and V.
    Qwen2,
    /// OPT (pre-LayerNorm): LayerNorm, learned positions offset by 2, ReLU, biases everywhere.
    Opt,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Opt => "opt",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// `model_type` as written by the checkpoint (`llama`, `mistral`, ...).
    pub model_type: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Longest sequence (prompt + generated) this model may run: `max_position_embeddings`,
    /// lowered to a sliding window when one is configured (we do not implement windowing, so
    /// sequences must stay inside it).
    pub max_context: usize,
    /// Where `max_context` came from, for error messages (`config.json: sliding_window`, ...).
    pub max_context_source: String,
    pub norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_embeddings: bool,
    /// Biases on the Q, K, V projections (Qwen2, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Dtype the weights are stored in.
    pub dtype: DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Bytes of KV cache one token occupies across all layers (K and V, f32 as strata stores it).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * 4
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Parameters per layer and in total (embeddings counted once when tied).
    pub fn param_count(&self) -> u64 {
        let (h, q, kv, f) = (
            self.hidden as u64,
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.intermediate as u64,
        );
        let attn = h * q + 2 * h * kv + q * h;
        let per_layer = match self.family {
            Family::Opt => attn + q + 2 * kv + h + 2 * h * f + f + h + 4 * h,
            Family::Llama | Family::Qwen2 => {
                let bias =
                    if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
                attn + bias + 3 * h * f + 2 * h
            }
        };
        let embed = self.vocab as u64 * h;
        let head = if self.tie_embeddings { 0 } else { embed };
        let extra = match self.family {
            Family::Opt => (self.max_context as u64 + 2) * h + 2 * h,
            _ => h,
        };
        per_layer * self.layers as u64 + embed + head + extra
    }

    pub(crate) fn validate(&self, path: &Path) -> ModelResult<()> {
        let bad = |field: &str, msg: String| Err(ModelError::field(path, field, msg));
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads cannot be grouped over {} KV heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("head dimension {} must be even and non-zero", self.head_dim),
            );
        }
        if self.layers == 0 || self.hidden == 0 || self.vocab == 0 {
            return bad(
                "num_hidden_layers",
                "layers, hidden size and vocabulary must be non-zero".into(),
            );
        }
        Ok(())
    }
}

/// Reads fields of one JSON object, turning absence or a wrong type into an error that names the
/// file and the key.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    pub obj: &'a Value,
    pub prefix: &'a str,
}

impl Fields<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    pub fn usize(&self, key: &str) -> ModelResult<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| ModelError::field(self.path, self.name(key), "missing"))?;
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            ModelError::field(
                self.path,
                self.name(key),
                format!("expected a non-negative integer, found {v}"),
            )
        })
    }
    pub fn usize_or(&self, key: &str, default: usize) -> ModelResult<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }
    pub fn f64(&self, key: &str) -> ModelResult<f64> {
        let v = self
            .get(key)
            .ok_or_else(|| ModelError::field(self.path, self.name(key), "missing"))?;
        v.as_f64().ok_or_else(|| {
            ModelError::field(
                self.path,
                self.name(key),
                format!("expected a number, found {v}"),
            )
        })
    }
    pub fn f64_or(&self, key: &str, default: f64) -> ModelResult<f64> {
        if self.get(key).is_some() {
            self.f64(key)
        } else {
            Ok(default)
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> ModelResult<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                ModelError::field(
                    self.path,
                    self.name(key),
                    format!("expected true or false, found {v}"),
                )
            }),
        }
    }
    pub fn str(&self, key: &str) -> ModelResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                ModelError::field(
                    self.path,
                    self.name(key),
                    format!("expected a string, found {v}"),
                )
            }),
        }
    }
    /// An integer or a list of integers (as `eos_token_id` may be).
    pub fn ids(&self, key: &str) -> ModelResult<Vec<u32>> {
        let err = |v: &Value| {
            ModelError::field(
                self.path,
                self.name(key),
                format!("expected a token id or a list of them, found {v}"),
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| x.as_u64().map(|i| i as u32).ok_or_else(|| err(x)))
                .collect(),
            Some(v) => v.as_u64().map(|i| vec![i as u32]).ok_or_else(|| err(v)),
        }
    }
}

/// RoPE settings from either generation of config: transformers 5's `rope_parameters` block, or
/// the older top-level `rope_theta` and `rope_scaling`.
pub(crate) fn parse_rope(f: &Fields<'_>) -> ModelResult<(f64, RopeScaling)> {
    if let Some(params) = f.get("rope_parameters") {
        let p = Fields {
            path: f.path,
            obj: params,
            prefix: "rope_parameters.",
        };
        let theta = p.f64_or("rope_theta", f.f64_or("rope_theta", 10000.0)?)?;
        return Ok((theta, parse_scaling(&p)?));
    }
    let theta = f.f64_or("rope_theta", 10000.0)?;
    match f.get("rope_scaling") {
        None => Ok((theta, RopeScaling::None)),
        Some(s) => Ok((
            theta,
            parse_scaling(&Fields {
                path: f.path,
                obj: s,
                prefix: "rope_scaling.",
            })?,
        )),
    }
}

fn parse_scaling(s: &Fields<'_>) -> ModelResult<RopeScaling> {
    let kind = match s.str("rope_type")? {
        Some(k) => k,
        None => s.str("type")?.unwrap_or("default"),
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: s.f64("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: s.f64("factor")?,
            low_freq_factor: s.f64("low_freq_factor")?,
            high_freq_factor: s.f64("high_freq_factor")?,
            original_max_position_embeddings: s.f64("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::field(
            s.path,
            format!("{}rope_type", s.prefix),
            format!("RoPE scaling `{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

pub(crate) fn parse_dtype(f: &Fields<'_>) -> ModelResult<Option<DType>> {
    let key = if f.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    match f.str(key)? {
        None => Ok(None),
        Some("float32") => Ok(Some(DType::F32)),
        Some("float16") => Ok(Some(DType::F16)),
        Some("bfloat16") => Ok(Some(DType::BF16)),
        Some(other) => Err(ModelError::field(
            f.path,
            key,
            format!("dtype `{other}` is not supported (float32, float16, bfloat16)"),
        )),
    }
}
