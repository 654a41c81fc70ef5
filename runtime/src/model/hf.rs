//! Hugging Face model folders: `config.json`, `model.safetensors` or a sharded set listed in
//! `model.safetensors.index.json`, `tokenizer.json`, and `generation_config.json` when present.
//! Safetensors files are memory-mapped; a tensor is copied out only when it is loaded.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use strata_kernels::{DType, HostWeight, WeightData};

use super::config::{Family, Fields, ModelConfig, parse_dtype, parse_rope};
use super::weights::{LayerTensor, WeightName, WeightSource};
use crate::error::{ModelError, ModelResult};

pub(crate) fn read_json(path: &Path) -> ModelResult<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        ModelError::file(
            path,
            format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Parses `config.json` (and `generation_config.json` beside it for EOS ids).
pub fn parse_config(dir: &Path) -> ModelResult<ModelConfig> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    let f = Fields {
        path: &path,
        obj: &json,
        prefix: "",
    };
    let model_type = f
        .str("model_type")?
        .ok_or_else(|| ModelError::field(&path, "model_type", "missing"))?
        .to_string();
    let mut cfg = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" => parse_llama_like(&f, &model_type)?,
        "opt" => parse_opt(&f)?,
        other => {
            return Err(ModelError::field(
                &path,
                "model_type",
                format!(
                    "model type `{other}` is not supported (supported: llama, mistral, qwen2, opt)"
                ),
            ));
        }
    };
    cfg.bos_token_id = f.ids("bos_token_id")?.first().copied();
    cfg.eos_token_ids = f.ids("eos_token_id")?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let gen_json = read_json(&gen_path)?;
        let g = Fields {
            path: &gen_path,
            obj: &gen_json,
            prefix: "",
        };
        let eos = g.ids("eos_token_id")?;
        if !eos.is_empty() {
            cfg.eos_token_ids = eos;
        }
        if let Some(b) = g.ids("bos_token_id")?.first() {
            cfg.bos_token_id = Some(*b);
        }
    }
    cfg.validate(&path)?;
    Ok(cfg)
}

fn parse_llama_like(f: &Fields<'_>, model_type: &str) -> ModelResult<ModelConfig> {
    let path = f.path;
    if let Some(act) = f.str("hidden_act")?
        && act != "silu"
    {
        return Err(ModelError::field(
            path,
            "hidden_act",
            format!("activation `{act}` is not supported (silu)"),
        ));
    }
    if f.bool_or("mlp_bias", false)? {
        return Err(ModelError::field(
            path,
            "mlp_bias",
            "MLP biases are not supported",
        ));
    }
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let max_pos = f.usize("max_position_embeddings")?;
    let (theta, scaling) = parse_rope(f)?;
    let attention_bias = f.bool_or("attention_bias", false)?;
    let qwen = model_type == "qwen2";
    // A sliding window narrower than the sequence changes the math; we do not implement it, so
    // sequences are confined to the window (checked per item, naming this field).
    let window = match model_type {
        "mistral" => f.get("sliding_window").and_then(Value::as_u64),
        "qwen2" if f.bool_or("use_sliding_window", false)? => {
            f.get("sliding_window").and_then(Value::as_u64)
        }
        _ => None,
    };
    let (max_context, source) = match window {
        Some(w) if (w as usize) < max_pos => {
            (w as usize, format!("{}: sliding_window", path.display()))
        }
        _ => (
            max_pos,
            format!("{}: max_position_embeddings", path.display()),
        ),
    };
    Ok(ModelConfig {
        family: if qwen { Family::Qwen2 } else { Family::Llama },
        model_type: model_type.to_string(),
        hidden,
        layers: f.usize("num_hidden_layers")?,
        heads,
        kv_heads: f.usize_or("num_key_value_heads", heads)?,
        head_dim: f.usize_or("head_dim", hidden / heads.max(1))?,
        intermediate: f.usize("intermediate_size")?,
        vocab: f.usize("vocab_size")?,
        max_context,
        max_context_source: source,
        norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
        rope_theta: theta,
        rope_scaling: scaling,
        tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
        qkv_bias: qwen || attention_bias,
        o_bias: !qwen && attention_bias,
        dtype: parse_dtype(f)?.unwrap_or(DType::F32),
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}

fn parse_opt(f: &Fields<'_>) -> ModelResult<ModelConfig> {
    let path = f.path;
    if !f.bool_or("do_layer_norm_before", true)? {
        return Err(ModelError::field(
            path,
            "do_layer_norm_before",
            "post-LayerNorm OPT (opt-350m style) is not supported; only pre-LayerNorm OPT models",
        ));
    }
    let hidden = f.usize("hidden_size")?;
    let proj = f.usize_or("word_embed_proj_dim", hidden)?;
    if proj != hidden {
        return Err(ModelError::field(
            path,
            "word_embed_proj_dim",
            format!(
                "{proj} differs from hidden_size {hidden}; projected embeddings are not supported"
            ),
        ));
    }
    if let Some(act) = f.str("activation_function")?
        && act != "relu"
    {
        return Err(ModelError::field(
            path,
            "activation_function",
            format!("activation `{act}` is not supported (relu)"),
        ));
    }
    if !f.bool_or("enable_bias", true)? || !f.bool_or("layer_norm_elementwise_affine", true)? {
        return Err(ModelError::field(
            path,
            "enable_bias",
            "OPT without biases or affine LayerNorms is not supported",
        ));
    }
    let heads = f.usize("num_attention_heads")?;
    let max_pos = f.usize("max_position_embeddings")?;
    Ok(ModelConfig {
        family: Family::Opt,
        model_type: "opt".into(),
        hidden,
        layers: f.usize("num_hidden_layers")?,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads.max(1),
        intermediate: f.usize("ffn_dim")?,
        vocab: f.usize("vocab_size")?,
        max_context: max_pos,
        max_context_source: format!("{}: max_position_embeddings", path.display()),
        norm_eps: 1e-5,
        rope_theta: 0.0,
        rope_scaling: strata_kernels::RopeScaling::None,
        tie_embeddings: f.bool_or("tie_word_embeddings", true)?,
        qkv_bias: true,
        o_bias: true,
        dtype: parse_dtype(f)?.unwrap_or(DType::F16),
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// The tensors of a Hugging Face folder, memory-mapped, looked up by checkpoint name.
pub struct SafetensorsSource {
    family: Family,
    tie_embeddings: bool,
    shards: Vec<Shard>,
    /// checkpoint tensor name → index into `shards`.
    index: HashMap<String, usize>,
    /// `model.` for causal-LM checkpoints, empty for bare base-model checkpoints.
    prefix: String,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, cfg: &ModelConfig) -> ModelResult<Self> {
        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path)
                .map_err(|e| ModelError::file(&path, format!("cannot open: {e}")))?;
            // SAFETY: the map is read-only and lives as long as `Shard`; a file truncated by
            // another process while mapped would fault, which is the accepted contract of
            // memory-mapped model loading (the same one torch and candle make).
            let mmap = unsafe { Mmap::map(&file) }
                .map_err(|e| ModelError::file(&path, format!("cannot map: {e}")))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::file(
                    &path,
                    format!("not a valid safetensors file ({e}); is it truncated?"),
                )
            })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push(Shard { path, mmap });
        }
        let probe = if cfg.family == Family::Opt {
            "decoder.embed_tokens.weight"
        } else {
            "embed_tokens.weight"
        };
        let prefix = if index.contains_key(&format!("model.{probe}")) {
            "model."
        } else {
            ""
        }
        .to_string();
        Ok(Self {
            family: cfg.family,
            tie_embeddings: cfg.tie_embeddings,
            shards,
            index,
            prefix,
        })
    }

    fn tensor_name(&self, name: WeightName) -> String {
        let p = &self.prefix;
        let opt = self.family == Family::Opt;
        match name {
            WeightName::Embed if opt => format!("{p}decoder.embed_tokens.weight"),
            WeightName::Embed => format!("{p}embed_tokens.weight"),
            WeightName::PosEmbed => format!("{p}decoder.embed_positions.weight"),
            WeightName::FinalNorm if opt => format!("{p}decoder.final_layer_norm.weight"),
            WeightName::FinalNormBias => format!("{p}decoder.final_layer_norm.bias"),
            WeightName::FinalNorm => format!("{p}norm.weight"),
            WeightName::LmHead
                if self.tie_embeddings || (opt && !self.index.contains_key("lm_head.weight")) =>
            {
                self.tensor_name(WeightName::Embed)
            }
            WeightName::LmHead => "lm_head.weight".to_string(),
            WeightName::Layer(i, t) if opt => {
                format!("{p}decoder.layers.{i}.{}", opt_layer_name(t))
            }
            WeightName::Layer(i, t) => format!("{p}layers.{i}.{}", llama_layer_name(t)),
        }
    }
}

fn llama_layer_name(t: LayerTensor) -> &'static str {
    use LayerTensor::*;
    match t {
        AttnNorm => "input_layernorm.weight",
        Q => "self_attn.q_proj.weight",
        K => "self_attn.k_proj.weight",
        V => "self_attn.v_proj.weight",
        O => "self_attn.o_proj.weight",
        QBias => "self_attn.q_proj.bias",
        KBias => "self_attn.k_proj.bias",
        VBias => "self_attn.v_proj.bias",
        OBias => "self_attn.o_proj.bias",
        MlpNorm => "post_attention_layernorm.weight",
        Gate => "mlp.gate_proj.weight",
        Up => "mlp.up_proj.weight",
        Down => "mlp.down_proj.weight",
        AttnNormBias | MlpNormBias | Fc1 | Fc1Bias | Fc2 | Fc2Bias => "<not in llama checkpoints>",
    }
}

fn opt_layer_name(t: LayerTensor) -> &'static str {
    use LayerTensor::*;
    match t {
        AttnNorm => "self_attn_layer_norm.weight",
        AttnNormBias => "self_attn_layer_norm.bias",
        Q => "self_attn.q_proj.weight",
        K => "self_attn.k_proj.weight",
        V => "self_attn.v_proj.weight",
        O => "self_attn.out_proj.weight",
        QBias => "self_attn.q_proj.bias",
        KBias => "self_attn.k_proj.bias",
        VBias => "self_attn.v_proj.bias",
        OBias => "self_attn.out_proj.bias",
        MlpNorm => "final_layer_norm.weight",
        MlpNormBias => "final_layer_norm.bias",
        Fc1 => "fc1.weight",
        Fc1Bias => "fc1.bias",
        Fc2 => "fc2.weight",
        Fc2Bias => "fc2.bias",
        Gate | Up | Down => "<not in opt checkpoints>",
    }
}

fn shard_files(dir: &Path) -> ModelResult<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(ModelError::file(
            dir,
            "no model.safetensors or model.safetensors.index.json in this folder",
        ));
    }
    let index = read_json(&index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::field(&index_path, "weight_map", "missing or not an object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.exists() {
            return Err(ModelError::field(
                &index_path,
                "weight_map",
                format!("lists {} which does not exist", p.display()),
            ));
        }
    }
    Ok(paths)
}

impl WeightSource for SafetensorsSource {
    fn load(&self, name: WeightName) -> ModelResult<HostWeight> {
        let tname = self.tensor_name(name);
        let shard = self
            .index
            .get(&tname)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| {
                ModelError::spec(
                    "safetensors",
                    format!("tensor `{tname}` is missing from the checkpoint"),
                )
            })?;
        let st = SafeTensors::deserialize(&shard.mmap)
            .map_err(|e| ModelError::file(&shard.path, format!("invalid safetensors: {e}")))?;
        let view = st
            .tensor(&tname)
            .map_err(|e| ModelError::file(&shard.path, format!("tensor `{tname}`: {e}")))?;
        let shape = view.shape();
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => {
                return Err(ModelError::file(
                    &shard.path,
                    format!("tensor `{tname}` has shape {shape:?}; expected 1 or 2 dimensions"),
                ));
            }
        };
        let bytes = view.data();
        let data = match view.dtype() {
            StDtype::F32 => WeightData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            StDtype::F16 => WeightData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            StDtype::BF16 => WeightData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            other => {
                return Err(ModelError::file(
                    &shard.path,
                    format!("tensor `{tname}` has dtype {other:?}; supported: F32, F16, BF16"),
                ));
            }
        };
        Ok(HostWeight::new(rows, cols, data)?)
    }

    fn describe(&self) -> String {
        format!("safetensors, {} file(s)", self.shards.len())
    }
}
