//! Models: what a `--model` argument names (a Hugging Face folder, a `.gguf` file, or
//! `synthetic:<preset>`), turned into a normalised [`ModelConfig`], a [`WeightSource`] that loads
//! tensors on demand, and a tokenizer when the model has one.

pub mod config;
pub mod gguf;
mod gguf_model;
pub mod gguf_tokenizer;
pub mod hf;
pub mod synthetic;
pub mod weights;

use std::path::Path;

pub use config::{Family, ModelConfig};
pub use weights::{LayerTensor, WeightName, WeightSource};

use crate::error::{ModelError, ModelResult};
use crate::tokenizer::TextTokenizer;

pub struct Model {
    /// The `--model` argument, as given.
    pub spec: String,
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Option<TextTokenizer>,
}

/// Opens whatever `spec` names. Only headers and metadata are read here; tensors load later.
pub fn open(spec: &str) -> ModelResult<Model> {
    if let Some(preset) = spec.strip_prefix("synthetic:") {
        let config = synthetic::config(preset)?;
        let weights = Box::new(synthetic::SyntheticSource::new(config.clone()));
        return Ok(Model {
            spec: spec.to_string(),
            config,
            weights,
            tokenizer: None,
        });
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(ModelError::spec(
            spec,
            "no such file or folder (expected a Hugging Face model folder, a .gguf file, or synthetic:<preset>)",
        ));
    }
    if path.is_dir() {
        let mut config = hf::parse_config(path)?;
        let weights = Box::new(hf::SafetensorsSource::open(path, &config)?);
        let tokenizer = TextTokenizer::from_hf_dir(path)?;
        if config.eos_token_ids.is_empty()
            && let Some(id) = tokenizer
                .as_ref()
                .and_then(|t| t.eos_token().and_then(|e| t.token_id(e)))
        {
            config.eos_token_ids.push(id);
        }
        return Ok(Model {
            spec: spec.to_string(),
            config,
            weights,
            tokenizer,
        });
    }
    let (config, weights, tokenizer) = gguf_model::open(path)?;
    Ok(Model {
        spec: spec.to_string(),
        config,
        weights: Box::new(weights),
        tokenizer: Some(tokenizer),
    })
}
