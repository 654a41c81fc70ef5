//! Host decode attention ([`attend_partial`] on one thread, [`attend_batch`] on all of them) over
//! KV blocks stored in f32, bf16 and f16: KV bytes and tokens attended per second.
//!
//! `cargo bench -p strata-kernels --bench host_attention -- [--tokens N] [--block-tokens N]
//! [--reps N] [--geometry llama3-8b|opt-30b]`
//!
//! One decode query at the last position over `tokens` tokens of one layer (default 32768 of
//! Llama-3-8B: 32 query heads, 8 KV heads, head dim 128, 32-token blocks). The best of `reps`
//! runs is reported. Bytes count K and V once each, in the stored dtype; the FLOP column counts
//! `q·k` and `p·v` (4 · n_heads · head_dim per token).

use std::time::Instant;

use strata_kernels::attention::{AttentionQuery, attend_batch, attend_partial};
use strata_kernels::{AttentionGeometry, DType, testing};

struct Args {
    tokens: usize,
    block_tokens: usize,
    reps: usize,
    geometry: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        tokens: 32768,
        block_tokens: 32,
        reps: 5,
        geometry: "llama3-8b".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let number = |s: String| s.parse::<usize>().map_err(|e| format!("{s}: {e}"));
        match flag.as_str() {
            "--tokens" => a.tokens = number(value("--tokens")?)?,
            "--block-tokens" => a.block_tokens = number(value("--block-tokens")?)?,
            "--reps" => a.reps = number(value("--reps")?)?,
            "--geometry" => a.geometry = value("--geometry")?,
            // `cargo bench` passes `--bench`; ignore it and anything else it adds.
            _ => {}
        }
    }
    Ok(a)
}

fn geometry(name: &str, block_tokens: usize) -> Result<AttentionGeometry, String> {
    let (n_heads, n_kv_heads) = match name {
        "llama3-8b" => (32, 8),
        "opt-30b" => (56, 56),
        other => return Err(format!("unknown geometry {other} (llama3-8b, opt-30b)")),
    };
    Ok(AttentionGeometry::new(
        n_heads,
        n_kv_heads,
        128,
        block_tokens,
    ))
}

fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm: pages faulted in, thread pool started
    (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), String> {
    let a = parse_args()?;
    let g = geometry(&a.geometry, a.block_tokens)?;
    let blocks = a.tokens.div_ceil(g.block_tokens);
    let tokens = blocks * g.block_tokens;
    let e = g.block_elems();
    println!(
        "{}: {} heads, {} KV heads, head dim {}, {}-token blocks; {tokens} tokens ({blocks} \
         blocks), one decode query; best of {}",
        a.geometry, g.n_heads, g.n_kv_heads, g.head_dim, g.block_tokens, a.reps
    );
    println!(
        "{:<5} {:>8} {:>12} {:>10} {:>12} {:>10}",
        "dtype", "threads", "KV MB", "GB/s", "Mtok/s", "GFLOP/s"
    );
    let q = testing::bench_query(&g);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // [blocks][K then V: kv_heads, block_tokens, head_dim] in `dtype`
        let kv = testing::synthetic_kv_blocks(dtype, blocks, e);
        let views = testing::full_block_views(&kv, &g);
        let bytes = blocks * 2 * e * dtype.size_bytes();
        let pos = tokens - 1;
        let threads = rayon::current_num_threads();
        let one = best_secs(a.reps, || {
            std::hint::black_box(attend_partial(&q, pos, &views, &g));
        });
        let query = [AttentionQuery {
            q: &q,
            pos,
            blocks: &views,
        }];
        let chunk_blocks = blocks.div_ceil(2 * threads.max(1));
        let all = best_secs(a.reps, || {
            std::hint::black_box(attend_batch(&query, &g, chunk_blocks));
        });
        for (n, secs) in [(1, one), (threads, all)] {
            println!(
                "{:<5} {:>8} {:>12.1} {:>10.2} {:>12.2} {:>10.1}",
                format!("{dtype:?}").to_lowercase(),
                n,
                bytes as f64 / 1e6,
                bytes as f64 / secs / 1e9,
                tokens as f64 / secs / 1e6,
                (4 * g.n_heads * g.head_dim * tokens) as f64 / secs / 1e9,
            );
        }
    }
    Ok(())
}
