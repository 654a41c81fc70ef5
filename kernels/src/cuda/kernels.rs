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
    round_f16,
    round_bf16,
    bias_add,
    add_inplace,
    copy_from_host,
    relu_inplace,
    swiglu,
    swiglu_ops_f16,
    swiglu_ops_bf16,
    rms_norm,
    rms_norm_ops_f16,
    rms_norm_ops_bf16,
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
/// Warps per GEMV block; `GEMV_WARPS` in gemv.cu.
const GEMV_WARPS: usize = 8;
/// Warps a GEMV launch aims for: about 16 per SM of a 132-SM H100, each lane with eight 16-byte
/// weight loads in flight (≈ 8 MiB over the GPU), well past what hides HBM latency. Outputs too
/// narrow to give one warp per column group that many split k instead.
const GEMV_TARGET_WARPS: usize = 2048;
/// Fewest weights of a row a k-slice gets when k is split (2 chunks of 8 per lane at 8 slices).
const GEMV_MIN_SLICE: usize = 512;

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

/// Threads per block of `argmax_rows`; `ARGMAX_THREADS` in kvtier.cu.
const ARGMAX_THREADS: u32 = 1024;

/// `argmax_rows`: one block of [`ARGMAX_THREADS`] per row; `rows` as in [`per_row`].
pub(crate) fn argmax_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ARGMAX_THREADS, 1, 1),
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

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for `m` in `1..=GEMV_MAX_ROWS`, `k, n > 0`: blocks of
/// `(32, S, G)` threads, `G = GEMV_WARPS / S` column groups of `C` adjacent columns (`C` from
/// `m`, as `gemv_cols` in gemv.cu), each group's k range split into `S` slices (a warp each), one
/// block per tile of `G · C` columns, grid-stride past `MAX_BLOCKS`. `S` (1, 2, 4 or 8) grows
/// while the launch has fewer than `GEMV_TARGET_WARPS` warps and each slice keeps at least
/// `GEMV_MIN_SLICE` weights. The kernel is correct for any such geometry; this only tunes it.
pub(crate) fn gemv(m: usize, k: usize, n: usize) -> LaunchConfig {
    let cols_per_warp = match m {
        0..=2 => 1,
        3..=4 => 2,
        _ => 4,
    };
    let column_warps = n.div_ceil(cols_per_warp);
    let mut slices = 1;
    while slices < GEMV_WARPS
        && column_warps * slices < GEMV_TARGET_WARPS
        && k / (slices * 2) >= GEMV_MIN_SLICE
    {
        slices *= 2;
    }
    let groups = GEMV_WARPS / slices;
    let blocks = n.div_ceil(groups * cols_per_warp).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32, slices as u32, groups as u32),
        shared_mem_bytes: 0,
    }
}
