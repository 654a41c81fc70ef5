//! strata's compute surface.
//!
//! - [`Backend`]: the ops a model's forward pass needs, over f32 activations and weights kept in
//!   their stored dtype. [`CpuBackend`] implements it today (multi-threaded with rayon, GEMMs
//!   through `matrixmultiply`); [`CudaBackend`] implements it on an NVIDIA GPU (cudarc with
//!   dynamic loading: the same binary runs with or without CUDA).
//! - [`attention`]: attention over KV *blocks* returning mergeable partials `(o, lse)` and the exact
//!   LSE merge. Every tier (GPU, host, storage) produces partials under this one contract.
//! - [`kv`]: K and V as the tiers store them (f32, f16, bf16), widened to f32 as attention reads.
//! - [`reference`]: plain scalar versions of every kernel, the oracles the fast ones are tested
//!   against.
//!
//! Shapes are row-major and named in comments, e.g. `x: [rows, hidden] f32`.

pub mod attention;
mod cpu;
pub mod cuda;
mod dtype;
pub mod kv;
pub mod reference;
mod rope;
mod simd;
pub mod testing;

pub use attention::{AttentionGeometry, KvBlockView, Partial};
pub use cpu::{CpuBackend, CpuTensor};
pub use cuda::{
    CudaBackend, CudaTensor, CudaUnavailable, CudaWeight, DeviceInfo, GemmBackend, GemmPrecision,
};
pub use dtype::{DType, HostWeight, WeightData};
pub use kv::{KvBuf, KvSlice, KvSliceMut};
pub use rope::{RopeScaling, RopeTable};

/// Errors a kernel call can return: shape mismatches are caller bugs that input could reach
/// (e.g. a checkpoint whose tensors disagree with its config), so they are errors, not panics.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("token id {id} is outside the vocabulary of {vocab} entries")]
    TokenOutOfRange { id: u32, vocab: usize },
    /// A GPU call failed (out of memory, a launch error, a lost device).
    #[error("CUDA error in {op}: {detail}")]
    Device { op: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape {
        op,
        detail: detail.into(),
    }
}

/// The compute surface a model's forward pass is written against. Activations are f32
/// `[rows, cols]` matrices owned by the backend; weights stay in their stored dtype and are
/// widened to f32 inside the kernels (f32 accumulation throughout).
pub trait Backend: Send + Sync {
    /// An f32 activation matrix `[rows, cols]`, resident wherever the backend computes.
    type Tensor: Send;
    /// A weight (matrix `[out, in]` or vector) resident wherever the backend computes.
    type Weight: Send + Sync;

    fn name(&self) -> &'static str;

    fn upload_weight(&self, w: HostWeight) -> Result<Self::Weight>;
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);
    /// Uploads `data: [rows, cols]`.
    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<Self::Tensor>;
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    /// `out[r] = table[ids[r]]`; `table: [vocab, dim]`, `out: [ids.len(), dim]`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `out = x · wᵀ (+ bias)`; `x: [m, k]`, `w: [n, k]`, `bias: [n]`, `out: [m, n]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor>;
    /// Row-wise RMSNorm with a learned scale `w: [cols]`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// Row-wise LayerNorm with scale `w` and shift `b`, both `[cols]`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// Rotates `x: [rows, heads * head_dim]` in place, row `r` at position `positions[r]`, with
    /// the rotate-half layout Hugging Face checkpoints use.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()>;
    /// `out = silu(gate) * up`, elementwise.
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    fn relu_inplace(&self, x: &mut Self::Tensor) -> Result<()>;
    /// `x += y`, elementwise.
    fn add_inplace(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// Row-wise softmax in place.
    fn softmax_inplace(&self, x: &mut Self::Tensor) -> Result<()>;
    /// Copies rows `rows` of `x` into a new tensor, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// The index of the largest value of each row (the first on ties): greedy sampling without
    /// moving whole logits rows to the host.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        let (_, cols) = self.shape(x);
        let flat = self.to_host(x)?;
        Ok(flat
            .chunks_exact(cols.max(1))
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }
}
