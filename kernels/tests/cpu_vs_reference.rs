//! Every CPU kernel against its scalar reference on random inputs, several shapes (odd sizes,
//! sizes that straddle the GEMM tile and the KV block), with stated tolerances:
//! f32 weights 1e-5 relative (to the largest output), f16/bf16 weights the same after widening
//! (the reference widens the same stored values), attention 2e-5 absolute on `o` and `lse`;
//! attention over f16/bf16 KV blocks the same against the reference on the rounded values, and
//! bit for bit equal to the f32 kernel over those values widened (widening is exact, and the
//! arithmetic after it is the same).

use half::{bf16, f16};
use strata_kernels::attention::{
    AttentionQuery, HostKernel, attend_batch, attend_partial, attend_partial_with,
};
use strata_kernels::testing::{SplitMix as Rng, max_rel_err, rope_scalings, test_seed};
use strata_kernels::{
    AttentionGeometry, Backend, CpuBackend, DType, HostWeight, KvBlockView, KvBuf, Partial,
    RopeTable, WeightData, reference,
};

#[test]
fn linear_matches_reference_for_every_dtype_and_shape() {
    let mut rng = Rng(test_seed());
    let cpu = CpuBackend::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 64, 63),
            (3, 37, 129),
            (17, 96, 64),
            (5, 200, 65),
            // Register tiles for every group of rows up to 6, several groups, partial tiles.
            (2, 16, 8),
            (4, 24, 16),
            (8, 64, 136),
            (32, 128, 24),
            // Past the matrix-vector rows: sgemm.
            (40, 32, 16),
        ] {
            let w = rng.weight(n, k, dtype);
            let b = HostWeight::vector(WeightData::F32(rng.vec(n)).cast(dtype));
            let x = rng.vec(m * k);
            let want = reference::linear(&x, m, &w, Some(&b));
            let xt = cpu.tensor(m, k, x).expect("x");
            let got = cpu.linear(&xt, &w, Some(&b)).expect("linear");
            let err = max_rel_err(&got.data, &want);
            assert!(err < 1e-5, "{dtype:?} m={m} k={k} n={n}: rel err {err}");
        }
    }
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let cpu = CpuBackend::new();
    let w = HostWeight::new(2, 3, WeightData::F32(vec![0.0; 6])).expect("w");
    let x = cpu.tensor(1, 4, vec![0.0; 4]).expect("x");
    assert!(cpu.linear(&x, &w, None).is_err());
}

#[test]
fn norms_activations_softmax_and_embedding_match_reference() {
    let mut rng = Rng(test_seed());
    let cpu = CpuBackend::new();
    for (rows, cols) in [(1, 7), (4, 64), (9, 576)] {
        let x = rng.vec(rows * cols);
        let w = rng.vec(cols);
        let b = rng.vec(cols);
        let t = cpu.tensor(rows, cols, x.clone()).expect("t");
        let wv = HostWeight::vector(WeightData::F32(w.clone()));
        let bv = HostWeight::vector(WeightData::F32(b.clone()));

        let got = cpu.rms_norm(&t, &wv, 1e-5).expect("rms");
        assert!(max_rel_err(&got.data, &reference::rms_norm(&x, cols, &w, 1e-5)) < 1e-5);
        let got = cpu.layer_norm(&t, &wv, &bv, 1e-5).expect("ln");
        assert!(max_rel_err(&got.data, &reference::layer_norm(&x, cols, &w, &b, 1e-5)) < 1e-5);

        let up = rng.vec(rows * cols);
        let upt = cpu.tensor(rows, cols, up.clone()).expect("up");
        let got = cpu.swiglu(&t, &upt).expect("swiglu");
        assert!(max_rel_err(&got.data, &reference::swiglu(&x, &up)) < 1e-6);

        let mut r = t.clone();
        cpu.relu_inplace(&mut r).expect("relu");
        assert_eq!(r.data, reference::relu(&x));

        let mut s = t.clone();
        cpu.softmax_inplace(&mut s).expect("softmax");
        assert!(max_rel_err(&s.data, &reference::softmax(&x, cols)) < 1e-6);
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let table = rng.weight(50, 24, dtype);
        let ids = [0u32, 49, 7, 7];
        let got = cpu.embedding(&table, &ids).expect("embedding");
        assert_eq!(got.data, reference::embedding(&table, &ids));
    }
    let table = rng.weight(5, 4, DType::F32);
    assert!(
        cpu.embedding(&table, &[5]).is_err(),
        "out-of-range id is an error"
    );
}

#[test]
fn rope_matches_reference_with_and_without_llama3_scaling() {
    let mut rng = Rng(test_seed());
    let cpu = CpuBackend::new();
    let scalings = rope_scalings();
    for scaling in &scalings {
        for (heads, hd) in [(1, 2), (3, 16), (4, 64)] {
            let table = RopeTable::new(hd, 10000.0, scaling);
            let positions = [0usize, 1, 5, 1000, 4097];
            let x = rng.vec(positions.len() * heads * hd);
            let mut t = cpu
                .tensor(positions.len(), heads * hd, x.clone())
                .expect("t");
            cpu.rope(&mut t, heads, &positions, &table).expect("rope");
            let want = reference::rope(&x, &positions, &table);
            // f32 angles at position 4097 carry ~2.4e-4 rad of rounding, as in transformers.
            let err = max_rel_err(&t.data, &want);
            assert!(err < 1e-3, "{scaling:?} heads={heads} hd={hd}: {err}");
        }
    }
}

struct KvFixture {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    lens: Vec<usize>,
}

impl KvFixture {
    fn new(rng: &mut Rng, g: &AttentionGeometry, tokens: usize) -> Self {
        let nblocks = tokens.div_ceil(g.block_tokens);
        let mut f = KvFixture {
            k: vec![],
            v: vec![],
            lens: vec![],
        };
        for b in 0..nblocks {
            // Poison the unfilled tail so a kernel reading past `len` shows up.
            let len = g.block_tokens.min(tokens - b * g.block_tokens);
            let mut k = rng.vec(g.block_elems());
            let mut v = rng.vec(g.block_elems());
            for h in 0..g.n_kv_heads {
                for t in len..g.block_tokens {
                    for i in 0..g.head_dim {
                        k[(h * g.block_tokens + t) * g.head_dim + i] = f32::NAN;
                        v[(h * g.block_tokens + t) * g.head_dim + i] = f32::NAN;
                    }
                }
            }
            f.k.push(k);
            f.v.push(v);
            f.lens.push(len);
        }
        f
    }
    fn views(&self, g: &AttentionGeometry) -> Vec<KvBlockView<'_>> {
        (0..self.k.len())
            .map(|b| KvBlockView {
                k: (&self.k[b]).into(),
                v: (&self.v[b]).into(),
                start_pos: b * g.block_tokens,
                len: self.lens[b],
            })
            .collect()
    }
}

fn assert_partials_close(got: &Partial, want: &Partial, tol: f32, what: &str) {
    for (g, w) in got.lse.iter().zip(&want.lse) {
        assert!(
            (g - w).abs() < tol || (g.is_infinite() && w.is_infinite()),
            "{what}: lse {g} vs {w}"
        );
    }
    for (g, w) in got.o.iter().zip(&want.o) {
        assert!((g - w).abs() < tol, "{what}: o {g} vs {w}");
    }
}

#[test]
fn block_attention_and_merge_match_the_reference() {
    let mut rng = Rng(test_seed());
    for (n_heads, n_kv, hd, bt, tokens) in [
        (4, 4, 16, 4, 1),
        (4, 2, 16, 4, 9),
        (9, 3, 64, 16, 100),
        (8, 1, 32, 8, 64),
    ] {
        let g = AttentionGeometry::new(n_heads, n_kv, hd, bt);
        let kv = KvFixture::new(&mut rng, &g, tokens);
        let views = kv.views(&g);
        let q = rng.vec(n_heads * hd);
        for pos in [0, tokens / 2, tokens - 1] {
            let want = reference::attention(&q, pos, &views, &g);
            let whole = attend_partial(&q, pos, &views, &g);
            assert_partials_close(&whole, &want, 2e-5, "single pass");
            // Split at every block boundary, attend each part alone, merge: same answer.
            let parts: Vec<Partial> = views
                .iter()
                .map(|b| attend_partial(&q, pos, std::slice::from_ref(b), &g))
                .collect();
            let merged = Partial::merge(&parts, n_heads, hd);
            assert_partials_close(&merged, &want, 2e-5, "merged per block");
            let batch = attend_batch(
                &[AttentionQuery {
                    q: &q,
                    pos,
                    blocks: &views,
                }],
                &g,
                2,
            );
            assert_partials_close(&batch[0], &want, 2e-5, "batched split-KV");
        }
    }
}

/// The fixture's blocks stored in `dtype` (rounded to nearest even), and the same stored values
/// widened back to f32.
fn stored(kv: &KvFixture, dtype: DType) -> (Vec<(KvBuf, KvBuf)>, KvFixture) {
    let bufs: Vec<(KvBuf, KvBuf)> =
        kv.k.iter()
            .zip(&kv.v)
            .map(|(k, v)| (KvBuf::from_f32(dtype, k), KvBuf::from_f32(dtype, v)))
            .collect();
    let wide = KvFixture {
        k: bufs.iter().map(|b| b.0.as_slice().to_f32_vec()).collect(),
        v: bufs.iter().map(|b| b.1.as_slice().to_f32_vec()).collect(),
        lens: kv.lens.clone(),
    };
    (bufs, wide)
}

fn same_bits(a: &Partial, b: &Partial) -> bool {
    let bits =
        |p: &Partial| -> Vec<u32> { p.o.iter().chain(&p.lse).map(|x| x.to_bits()).collect() };
    bits(a) == bits(b)
}

#[test]
fn attention_over_half_precision_blocks_matches_f32_over_the_rounded_values() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    for (n_heads, n_kv, hd, bt, tokens) in [
        (4, 4, 16, 4, 1),
        (4, 2, 16, 4, 9),
        (9, 3, 64, 16, 100),
        (32, 8, 128, 32, 200),
        (8, 1, 40, 8, 61),
    ] {
        let g = AttentionGeometry::new(n_heads, n_kv, hd, bt);
        let kv = KvFixture::new(&mut rng, &g, tokens);
        let q = rng.vec(n_heads * hd);
        for dtype in [DType::BF16, DType::F16] {
            let what = format!("seed {seed}: {dtype:?} {g:?}");
            let (bufs, wide) = stored(&kv, dtype);
            let half_views: Vec<KvBlockView<'_>> = bufs
                .iter()
                .enumerate()
                .map(|(b, (k, v))| KvBlockView {
                    k: k.as_slice(),
                    v: v.as_slice(),
                    start_pos: b * bt,
                    len: kv.lens[b],
                })
                .collect();
            assert!(half_views.iter().all(|v| v.k.dtype() == dtype));
            let wide_views = wide.views(&g);
            for pos in [0, tokens / 2, tokens - 1] {
                let want = reference::attention(&q, pos, &wide_views, &g);
                let got = attend_partial(&q, pos, &half_views, &g);
                assert_partials_close(&got, &want, 2e-5, &format!("{what}: single pass"));
                let f32_kernel = attend_partial(&q, pos, &wide_views, &g);
                assert!(
                    same_bits(&got, &f32_kernel),
                    "{what}: pos {pos}: half blocks differ from f32 blocks of the same values"
                );
                let batch = attend_batch(
                    &[AttentionQuery {
                        q: &q,
                        pos,
                        blocks: &half_views,
                    }],
                    &g,
                    2,
                );
                assert_partials_close(&batch[0], &want, 2e-5, &format!("{what}: batched"));
            }
            // Rounding K and V moves the answer away from the unrounded one, but only by about
            // the dtype's precision: a check that the rounded values are the ones attended.
            let exact = reference::attention(&q, tokens - 1, &kv.views(&g), &g);
            let got = attend_partial(&q, tokens - 1, &half_views, &g);
            let tol = if dtype == DType::BF16 { 5e-2 } else { 5e-3 };
            assert_partials_close(&got, &exact, tol, &format!("{what}: vs unrounded"));
        }
    }
}

#[test]
fn merge_ignores_empty_partials() {
    let p = Partial {
        o: vec![1.0, 2.0],
        lse: vec![0.5],
    };
    let merged = Partial::merge(
        &[Partial::empty(1, 2), p.clone(), Partial::empty(1, 2)],
        1,
        2,
    );
    assert_partials_close(&merged, &p, 1e-7, "empty parts");
    let none = Partial::merge(&[], 1, 2);
    assert!(none.lse[0].is_infinite());
    let _ = (f16::ONE, bf16::ONE);
}

/// `kv`'s blocks stored in `dtype`, as views.
fn half_views<'a>(
    bufs: &'a [(KvBuf, KvBuf)],
    kv: &KvFixture,
    g: &AttentionGeometry,
) -> Vec<KvBlockView<'a>> {
    bufs.iter()
        .enumerate()
        .map(|(b, (k, v))| KvBlockView {
            k: k.as_slice(),
            v: v.as_slice(),
            start_pos: b * g.block_tokens,
            len: kv.lens[b],
        })
        .collect()
}

/// Every host attention kernel this CPU runs (the portable one always; AVX2+FMA with and without
/// F16C where the CPU has them) against the reference, 2e-5 absolute on `o` and `lse`, over the
/// shapes the register tiles treat differently: group sizes 1 (MHA), 2, 3, 4 and 8 (4-, 2- and
/// 1-head tiles), head dims 64 and 128 (and 40 and 24, which leave 8-column `p·v` tails, and 20,
/// which the AVX2 kernels hand to the portable one), block sizes and causal positions that leave
/// token counts that are not a multiple of any tile width (1..=7 tokens visible in the last
/// block), f32, bf16 and f16 blocks, and queries scaled up so the running max moves between
/// blocks. Half-precision blocks must also give the same bits as f32 blocks of the same values
/// under the same kernel.
#[test]
fn every_host_kernel_matches_the_reference_on_every_tile_shape() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    let kernels = HostKernel::available();
    eprintln!("host kernels: {kernels:?}");
    for (n_heads, n_kv, hd, bt, tokens, q_scale) in [
        (4, 4, 64, 32, 77, 1.0),
        (56, 56, 128, 16, 35, 1.0),
        (32, 8, 128, 32, 203, 1.0),
        (32, 8, 128, 128, 300, 6.0),
        (8, 2, 64, 13, 45, 3.0),
        (8, 1, 128, 64, 131, 1.0),
        (16, 2, 64, 7, 30, 8.0),
        (6, 3, 128, 8, 29, 2.0),
        (9, 3, 40, 8, 61, 1.0),
        (4, 2, 24, 5, 17, 1.0),
        (8, 2, 40, 6, 23, 2.0),
        (4, 1, 20, 4, 11, 1.0),
    ] {
        let g = AttentionGeometry::new(n_heads, n_kv, hd, bt);
        let kv = KvFixture::new(&mut rng, &g, tokens);
        let q = rng.vec_scaled(n_heads * hd, q_scale);
        // The first token; 1, 3, 5 and 7 tokens into the second-to-last block (where it has
        // that many); the last token.
        let last_block = (tokens - 1) / bt * bt;
        let mut positions = vec![0, tokens - 1];
        let inner = last_block.saturating_sub(bt);
        positions.extend(
            [0, 2, 4, 6]
                .iter()
                .map(|d| inner + d)
                .filter(|&p| p < tokens),
        );
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (bufs, wide) = stored(&kv, dtype);
            let views = half_views(&bufs, &kv, &g);
            let wide_views = wide.views(&g);
            for &pos in &positions {
                let want = reference::attention(&q, pos, &wide_views, &g);
                for &kernel in &kernels {
                    let what = format!("seed {seed}: {kernel:?} {dtype:?} {g:?} pos {pos}");
                    let got = attend_partial_with(kernel, &q, pos, &views, &g);
                    assert_partials_close(&got, &want, 2e-5, &what);
                    let f32_blocks = attend_partial_with(kernel, &q, pos, &wide_views, &g);
                    assert!(
                        same_bits(&got, &f32_blocks),
                        "{what}: blocks in {dtype:?} differ from f32 blocks of the same values"
                    );
                }
            }
        }
    }
}

/// The kernels see only what they are given: attending blocks one at a time and merging gives
/// the single-pass answer, for every kernel, including blocks with no visible token.
#[test]
fn every_host_kernel_merges_per_block_partials_to_the_single_pass_answer() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    let g = AttentionGeometry::new(32, 8, 128, 32);
    let tokens = 150;
    let kv = KvFixture::new(&mut rng, &g, tokens);
    let (bufs, _) = stored(&kv, DType::BF16);
    let views = half_views(&bufs, &kv, &g);
    let q = rng.vec_scaled(g.n_heads * g.head_dim, 4.0);
    let pos = 70; // 7 tokens into the third block; the last two blocks are not visible
    for kernel in HostKernel::available() {
        let whole = attend_partial_with(kernel, &q, pos, &views, &g);
        let parts: Vec<Partial> = views
            .iter()
            .map(|b| attend_partial_with(kernel, &q, pos, std::slice::from_ref(b), &g))
            .collect();
        assert!(parts[3].lse.iter().all(|l| *l == f32::NEG_INFINITY));
        assert!(parts[3].o.iter().all(|o| *o == 0.0));
        let merged = Partial::merge(&parts, g.n_heads, g.head_dim);
        assert_partials_close(&merged, &whole, 2e-5, &format!("seed {seed}: {kernel:?}"));
    }
}
