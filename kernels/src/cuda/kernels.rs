//! The table of compiled kernels (looked up once, when the backend starts) and the launch
//! geometry each kind of kernel expects. Names follow the `extern "C"` entry points of the `.cu`
//! files, `{op}_{weight dtype}` where a kernel reads weights.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};

macro_rules! kernel_table {
    ($($name:ident),* $(,)?) => {
        pub(crate) struct Kernels {
            $(pub(crate) $name: CudaFunction,)*
        }

        impl Kernels {
            pub(crate) fn bind(module: &Arc<CudaModule>) -> Result<Self, String> {
                Ok(Self {
                    $($name: module
                        .load_function(stringify!($name))
                        .map_err(|e| format!("kernel `{}` missing: {e}", stringify!($name)))?,)*
                })
            }
        }
    };
}

kernel_table!(
    embedding_f32,
    embedding_f16,
    embedding_bf16,
    split_f16,
    split_bf16,
    bias_add,
    add_inplace,
    relu_inplace,
    swiglu,
    rms_norm,
    layer_norm,
    softmax_inplace,
    rope_inplace,
    gemv_f16,
    gemv_bf16,
);

/// Threads per block of the elementwise (grid-stride) kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// Blocks launched at most for a grid-stride kernel: enough to fill any current GPU many times
/// over; larger inputs loop.
const MAX_BLOCKS: usize = 1 << 16;
/// Threads per block of the row kernels; `ROW_THREADS` in common.cuh.
const ROW_THREADS: u32 = 256;
/// Rows a GEMV kernel handles at once; `GEMV_MAX_ROWS` in gemv.cu.
pub(crate) const GEMV_MAX_ROWS: usize = 8;
/// Warps (output columns in flight) per GEMV block.
const GEMV_WARPS: u32 = 8;

/// A grid-stride launch over `n > 0` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row; `rows` must be in `1..=i32::MAX` (the caller checks).
pub(crate) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per output column, grid-stride over `n > 0` columns.
pub(crate) fn gemv(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(GEMV_WARPS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (GEMV_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}
