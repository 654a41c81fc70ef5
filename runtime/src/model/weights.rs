//! Weights by role, independent of any file format. A [`WeightSource`] maps each
//! [`WeightName`] to its checkpoint's tensor and returns it as a [`HostWeight`] in its stored
//! dtype (GGUF block formats already dequantized). Sources load on demand, one tensor at a time,
//! so a model that does not fit in memory can be streamed layer by layer.

use strata_kernels::HostWeight;

use crate::error::ModelResult;

/// A tensor's role in one transformer layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
    AttnNormBias,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    MlpNorm,
    MlpNormBias,
    /// SwiGLU gate projection `[intermediate, hidden]`.
    Gate,
    /// SwiGLU up projection `[intermediate, hidden]`.
    Up,
    /// SwiGLU down projection `[hidden, intermediate]`.
    Down,
    /// OPT `fc1` `[ffn, hidden]` and its bias.
    Fc1,
    Fc1Bias,
    /// OPT `fc2` `[hidden, ffn]` and its bias.
    Fc2,
    Fc2Bias,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightName {
    /// `[vocab, hidden]`.
    Embed,
    /// OPT learned positions `[max_positions + 2, hidden]`.
    PosEmbed,
    FinalNorm,
    FinalNormBias,
    /// `[vocab, hidden]`; sources of tied models return the embedding table.
    LmHead,
    Layer(usize, LayerTensor),
}

pub trait WeightSource: Send + Sync {
    /// Loads one tensor. Errors name the file and the tensor.
    fn load(&self, name: WeightName) -> ModelResult<HostWeight>;
    /// A short description for `strata info` (format, files).
    fn describe(&self) -> String;
}
