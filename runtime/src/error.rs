//! Errors a user can cause — bad files, bad flags, bad input lines — each carrying the file,
//! field, flag or line they need to fix it.

use std::path::Path;

use crate::model::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error("model `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Kernel(#[from] strata_kernels::KernelError),
    #[error("weights on disk: {0}")]
    DiskWeights(String),
}

impl ModelError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self::File {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
    pub fn field(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            path: path.display().to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn spec(spec: &str, message: impl Into<String>) -> Self {
        Self::Spec {
            spec: spec.to_string(),
            message: message.into(),
        }
    }
}

pub type ModelResult<T> = std::result::Result<T, ModelError>;
