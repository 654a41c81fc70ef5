//! A GGUF file of Llama architecture as a strata model: hyper-parameters from the `llama.*`
//! metadata, tensors by llama.cpp's names (dequantized at load), and Q/K projections un-permuted
//! from llama.cpp's interleaved RoPE layout back to the rotate-half layout our RoPE uses.

use std::path::{Path, PathBuf};

use strata_kernels::{DType, HostWeight, RopeScaling};

use super::config::{Family, ModelConfig};
use super::gguf::{GgufError, GgufFile, unpermute_qk};
use super::gguf_tokenizer;
use super::weights::{LayerTensor, WeightName, WeightSource};
use crate::error::{ModelError, ModelResult};
use crate::tokenizer::TextTokenizer;

pub struct GgufSource {
    file: GgufFile,
    path: PathBuf,
    heads: usize,
    kv_heads: usize,
}

pub fn open(path: &Path) -> ModelResult<(ModelConfig, GgufSource, TextTokenizer)> {
    let file = GgufFile::open(path)?;
    // Refuse unsupported tensor types now, before any work, rather than halfway through loading.
    if let Some(t) = file
        .tensor_infos()
        .iter()
        .find(|t| !t.ggml_type.is_supported())
    {
        return Err(GgufError::UnsupportedType {
            path: path.display().to_string(),
            name: t.name.clone(),
            type_name: t.ggml_type.name().into(),
            type_id: t.ggml_type.0,
        }
        .into());
    }
    let arch = file.get_str("general.architecture")?.to_string();
    if arch != "llama" {
        return Err(ModelError::field(
            path,
            "general.architecture",
            format!("architecture `{arch}` is not supported (supported: llama)"),
        ));
    }
    let u = |k: &str| -> ModelResult<usize> { Ok(file.get_u32(k)? as usize) };
    let hidden = u("llama.embedding_length")?;
    let heads = u("llama.attention.head_count")?;
    let kv_heads = if file.get("llama.attention.head_count_kv").is_some() {
        u("llama.attention.head_count_kv")?
    } else {
        heads
    };
    let theta = if file.get("llama.rope.freq_base").is_some() {
        file.get_f32("llama.rope.freq_base")? as f64
    } else {
        10000.0
    };
    if let Some(v) = file.get("llama.rope.scaling.type") {
        let kind = file.get_str("llama.rope.scaling.type")?;
        if kind != "none" {
            return Err(ModelError::field(
                path,
                "llama.rope.scaling.type",
                format!("RoPE scaling `{kind}` ({v:?}) is not supported in GGUF files"),
            ));
        }
    }
    let tok = gguf_tokenizer::from_gguf(&file)?;
    let vocab = match file.get("llama.vocab_size") {
        Some(_) => u("llama.vocab_size")?,
        None => tok.tokenizer.get_vocab_size(true),
    };
    let config = ModelConfig {
        family: Family::Llama,
        model_type: "llama (gguf)".into(),
        hidden,
        layers: u("llama.block_count")?,
        heads,
        kv_heads,
        head_dim: hidden / heads.max(1),
        intermediate: u("llama.feed_forward_length")?,
        vocab,
        max_context: u("llama.context_length")?,
        max_context_source: format!("{}: llama.context_length", path.display()),
        norm_eps: file.get_f32("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        tie_embeddings: !file.has_tensor("output.weight"),
        qkv_bias: false,
        o_bias: false,
        // Block formats are dequantized to f32 at load; F16 tensors stay f16.
        dtype: DType::F32,
        bos_token_id: tok.bos_id,
        eos_token_ids: tok.eos_id.into_iter().collect(),
    };
    config.validate(path)?;
    let tokenizer = TextTokenizer::new(
        tok.tokenizer.clone(),
        tok.chat_template.clone(),
        tok.bos_id.and_then(|id| tok.tokenizer.id_to_token(id)),
        tok.eos_id.and_then(|id| tok.tokenizer.id_to_token(id)),
        path.display().to_string(),
    );
    let source = GgufSource {
        file,
        path: path.to_path_buf(),
        heads,
        kv_heads,
    };
    Ok((config, source, tokenizer))
}

fn layer_tensor_name(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "attn_norm",
        Q => "attn_q",
        K => "attn_k",
        V => "attn_v",
        O => "attn_output",
        MlpNorm => "ffn_norm",
        Gate => "ffn_gate",
        Up => "ffn_up",
        Down => "ffn_down",
        _ => return None,
    })
}

impl WeightSource for GgufSource {
    fn load(&self, name: WeightName) -> ModelResult<HostWeight> {
        let tname = match name {
            WeightName::Embed => "token_embd.weight".to_string(),
            WeightName::FinalNorm => "output_norm.weight".to_string(),
            WeightName::LmHead if self.file.has_tensor("output.weight") => {
                "output.weight".to_string()
            }
            WeightName::LmHead => "token_embd.weight".to_string(),
            WeightName::Layer(i, t) => match layer_tensor_name(t) {
                Some(n) => format!("blk.{i}.{n}.weight"),
                None => {
                    return Err(ModelError::file(
                        &self.path,
                        format!("GGUF llama models have no {t:?} tensor"),
                    ));
                }
            },
            other => {
                return Err(ModelError::file(
                    &self.path,
                    format!("GGUF llama models have no {other:?} tensor"),
                ));
            }
        };
        let w = self.file.tensor(&tname)?;
        Ok(match name {
            WeightName::Layer(_, LayerTensor::Q) => unpermute_qk(w, self.heads)?,
            WeightName::Layer(_, LayerTensor::K) => unpermute_qk(w, self.kv_heads)?,
            _ => w,
        })
    }

    fn describe(&self) -> String {
        format!("GGUF {}", self.path.display())
    }
}
