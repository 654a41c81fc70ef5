//! Paged decode attention and the partial merge on the GPU against the scalar reference (f64)
//! and the CPU kernel (`attend_partial`), on random inputs fresh per run (the seed is printed;
//! `STRATA_TEST_SEED` replays one), with every output poisoned (NaN) before the kernel that must
//! write it, and the unused token slots of each sequence's last block set to NaN (a kernel that
//! reads past a sequence's length fails).
//!
//! Shapes: head_dim 64 and 128 (specialised) and 96 (generic kernel); GQA groups 1, 4, 8 and 16
//! (two CTAs per group); blocks of 16, 32 and 24 tokens; lengths 0, 1, 17, a block exactly, 1000,
//! 4096; batch 1 and ragged batches of 3; f32, f16 and bf16 pools; 1 to 300 splits.
//!
//! Tolerances: `o` relative to the largest |value| of the expected output, `lse` relative to
//! max(1, |lse|):
//! - f32 pool: 1e-5 against the reference;
//! - f16 / bf16 pool: 1e-4 against the reference computed on the rounded K and V (the kernel
//!   does f32 math on exactly those values);
//! - every pool: 2e-5 against the CPU kernel on the same (rounded) values.
//!
//! Without a GPU (or driver, NVRTC, cuBLAS) every test prints `skipped: <reason>` and passes.

#![allow(clippy::unwrap_used)]

use rayon::prelude::*;
use strata_kernels::attention::attend_partial;
use strata_kernels::cuda::{DeviceBlockTables, DevicePartial, KvBlockShape, KvPool};
use strata_kernels::testing::{SplitMix as Rng, test_gpu, test_seed};
use strata_kernels::{
    AttentionGeometry, Backend, CudaBackend, DType, KvBlockView, Partial, reference,
};

/// (query heads, KV heads, head_dim, block tokens).
type Dims = (usize, usize, usize, usize);

fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

/// A pool holding a batch of sequences in shuffled blocks, and its host copy (rounded values).
struct Case {
    g: AttentionGeometry,
    lens: Vec<usize>,
    tables: Vec<Vec<u32>>,
    /// `[n_blocks, 2, kv_heads, bt, hd]`, as stored on the device (widened to f32).
    host: Vec<f32>,
    q: Vec<f32>,
    pool: KvPool,
    dev_tables: DeviceBlockTables,
}

impl Case {
    fn new(
        gpu: &CudaBackend,
        rng: &mut Rng,
        dtype: DType,
        (n_heads, n_kv_heads, head_dim, block_tokens): (usize, usize, usize, usize),
        lens: &[usize],
    ) -> Case {
        let g = AttentionGeometry {
            n_heads,
            n_kv_heads,
            head_dim,
            block_tokens,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let shape = KvBlockShape {
            kv_heads: n_kv_heads,
            block_tokens,
            head_dim,
        };
        let need: Vec<usize> = lens.iter().map(|l| l.div_ceil(block_tokens)).collect();
        let n_blocks = need.iter().sum::<usize>() + 3; // a few blocks nobody uses
        let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
        rng.shuffle(&mut ids);
        let mut tables = Vec::new();
        let mut next = 0;
        for &n in &need {
            tables.push(ids[next..next + n].to_vec());
            next += n;
        }
        let be = shape.block_elems();
        let mut host: Vec<f32> = rng
            .vec_scaled(n_blocks * be, 1.0)
            .into_iter()
            .map(|x| round(x, dtype))
            .collect();
        // NaN in the unused slots of each last block: they must never be read.
        for (t, &len) in tables.iter().zip(lens) {
            let used = len % block_tokens;
            if let (Some(&last), true) = (t.last(), used > 0) {
                for kv in 0..2 {
                    for h in 0..n_kv_heads {
                        let at = last as usize * be + kv * shape.half_elems();
                        let row = at + (h * block_tokens + used) * head_dim;
                        let end = at + (h + 1) * block_tokens * head_dim;
                        host[row..end].fill(f32::NAN);
                    }
                }
            }
        }
        let mut pool = gpu.kv_pool(dtype, shape, n_blocks).unwrap();
        gpu.kv_pool_write(&mut pool, 0, &host).unwrap();
        let dev_tables = gpu
            .upload_block_tables(&tables, lens, block_tokens)
            .unwrap();
        let q = rng.vec_scaled(lens.len() * n_heads * head_dim, 2.0);
        Case {
            g,
            lens: lens.to_vec(),
            tables,
            host,
            q,
            pool,
            dev_tables,
        }
    }

    /// The views of sequence `i`'s blocks `from..to`.
    fn views(&self, i: usize, from: usize, to: usize) -> Vec<KvBlockView<'_>> {
        let (bt, be) = (self.g.block_tokens, 2 * self.g.block_elems());
        let half = be / 2;
        self.tables[i][from..to]
            .iter()
            .enumerate()
            .map(|(j, &id)| {
                let at = id as usize * be;
                let start = (from + j) * bt;
                KvBlockView {
                    k: (&self.host[at..at + half]).into(),
                    v: (&self.host[at + half..at + be]).into(),
                    start_pos: start,
                    len: bt.min(self.lens[i] - start),
                }
            })
            .collect()
    }

    fn q_of(&self, i: usize) -> &[f32] {
        let w = self.g.n_heads * self.g.head_dim;
        &self.q[i * w..(i + 1) * w]
    }

    /// Per sequence: (reference, CPU kernel).
    fn expected(&self) -> Vec<(Partial, Partial)> {
        (0..self.lens.len())
            .into_par_iter()
            .map(|i| {
                let len = self.lens[i];
                let views = self.views(i, 0, self.tables[i].len());
                let pos = len.saturating_sub(1);
                (
                    reference::attention(self.q_of(i), pos, &views, &self.g),
                    attend_partial(self.q_of(i), pos, &views, &self.g),
                )
            })
            .collect()
    }

    fn run(&self, gpu: &CudaBackend, splits: Option<usize>) -> Partial {
        let q = gpu
            .tensor(
                self.lens.len(),
                self.g.n_heads * self.g.head_dim,
                self.q.clone(),
            )
            .unwrap();
        let p = match splits {
            Some(s) => {
                gpu.decode_attention_with_splits(&q, &self.pool, &self.dev_tables, &self.g, s)
            }
            None => gpu.decode_attention(&q, &self.pool, &self.dev_tables, &self.g),
        }
        .unwrap();
        download(gpu, &p)
    }
}

fn download(gpu: &CudaBackend, p: &DevicePartial) -> Partial {
    Partial {
        o: gpu.to_host(&p.o).unwrap(),
        lse: gpu.to_host(&p.lse).unwrap(),
    }
}

fn o_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |a, &b| a.max(b.abs()));
    got.iter().zip(want).fold(0.0f32, |a, (g, w)| {
        let e = (g - w).abs() / scale;
        if e.is_nan() { f32::INFINITY } else { a.max(e) }
    })
}

fn lse_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).fold(0.0f32, |a, (&g, &w)| {
        if g == f32::NEG_INFINITY && w == f32::NEG_INFINITY {
            return a;
        }
        let e = (g - w).abs() / w.abs().max(1.0);
        if e.is_nan() { f32::INFINITY } else { a.max(e) }
    })
}

/// The errors of one GPU result against per-sequence expectations: (reference, CPU).
fn errors(case: &Case, got: &Partial, want: &[(Partial, Partial)]) -> (f32, f32) {
    let w = case.g.n_heads * case.g.head_dim;
    let nh = case.g.n_heads;
    let (mut e_ref, mut e_cpu) = (0.0f32, 0.0f32);
    for (i, (r, c)) in want.iter().enumerate() {
        let o = &got.o[i * w..(i + 1) * w];
        let lse = &got.lse[i * nh..(i + 1) * nh];
        e_ref = e_ref.max(o_err(o, &r.o)).max(lse_err(lse, &r.lse));
        e_cpu = e_cpu.max(o_err(o, &c.o)).max(lse_err(lse, &c.lse));
    }
    (e_ref, e_cpu)
}

fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 { 1e-5 } else { 1e-4 }
}
const CPU_TOL: f32 = 2e-5;

/// Checks one case with the default split count and returns (reference, CPU) errors.
fn check(
    gpu: &CudaBackend,
    rng: &mut Rng,
    dtype: DType,
    dims: (usize, usize, usize, usize),
    lens: &[usize],
) -> (f32, f32) {
    let case = Case::new(gpu, rng, dtype, dims, lens);
    let got = case.run(gpu, None);
    let (e_ref, e_cpu) = errors(&case, &got, &case.expected());
    let splits = gpu.decode_splits(&case.dev_tables, &case.pool, &case.g);
    let what = format!(
        "{dtype:?} (heads, kv_heads, head_dim, block) {dims:?} lens {lens:?} splits {splits}"
    );
    assert!(
        e_ref < tolerance(dtype),
        "{what}: {e_ref:.2e} against the reference"
    );
    assert!(
        e_cpu < CPU_TOL,
        "{what}: {e_cpu:.2e} against the CPU kernel"
    );
    (e_ref, e_cpu)
}

#[test]
fn decode_matches_reference_and_cpu_over_shapes() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    for dtype in [DType::F32, DType::F16] {
        let (mut w_ref, mut w_cpu) = (0.0f32, 0.0f32);
        for hd in [64, 128] {
            for (nh, kvh) in [(4, 4), (32, 8), (16, 2)] {
                for bt in [16, 32] {
                    let len_sets: [&[usize]; 7] = [
                        &[1],
                        &[17],
                        &[bt],
                        &[2 * bt],
                        &[1000],
                        &[4096],
                        &[1000, 17, 4096 - 5],
                    ];
                    for lens in len_sets {
                        let (a, b) = check(gpu, &mut rng, dtype, (nh, kvh, hd, bt), lens);
                        w_ref = w_ref.max(a);
                        w_cpu = w_cpu.max(b);
                    }
                }
            }
        }
        eprintln!(
            "decode {dtype:?} pool: max err {w_ref:.2e} vs reference, {w_cpu:.2e} vs CPU kernel"
        );
    }
    assert!(gpu.deferred_error().is_none());
}

#[test]
fn decode_generic_kernel_wide_groups_bf16_and_empty_sequences() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let mut worst = (0.0f32, 0.0f32);
    let cases: [(DType, Dims, &[usize]); 13] = [
        (DType::F32, (8, 2, 96, 16), &[1000, 3, 16]), // generic head_dim
        (DType::F16, (8, 2, 96, 32), &[4096, 1, 33]), // generic head_dim
        (DType::F16, (32, 2, 128, 32), &[1000, 17]),  // group of 16: four CTAs of 4
        (DType::F16, (12, 4, 64, 16), &[700]),        // group of 3 (runs as 4)
        (DType::BF16, (32, 8, 128, 32), &[4096, 100, 1]), // bf16 pool
        (DType::F16, (32, 8, 128, 24), &[1000, 24, 47]), // block of 24 (not a power of 2)
        (DType::F16, (32, 8, 128, 32), &[0, 33, 5]),  // an empty sequence
        (DType::F32, (4, 4, 64, 16), &[0]),           // only empty
        (DType::F16, (32, 8, 128, 64), &[1000, 64, 65]), // blocks of 64 tokens
        (DType::BF16, (32, 8, 64, 48), &[700, 5]),    // bf16, head_dim 64, block of 48
        (DType::F16, (32, 8, 64, 24), &[700, 23]),    // a warp step of 16 tokens spans blocks of 24
        (DType::BF16, (16, 8, 64, 32), &[900, 31]),   // group of 2, head_dim 64: transposed sums
        (DType::F16, (12, 4, 128, 32), &[500, 9]),    // group of 3 on the transposed path
    ];
    for (dtype, dims, lens) in cases {
        let (a, b) = check(gpu, &mut rng, dtype, dims, lens);
        worst = (worst.0.max(a), worst.1.max(b));
    }
    eprintln!(
        "decode generic/wide/bf16/empty: max err {:.2e} vs reference, {:.2e} vs CPU",
        worst.0, worst.1
    );
}

#[test]
fn decode_gives_the_same_result_for_any_split_count() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    // Splits are runs of 16 tokens: with 32- and 24-token blocks most of them start and end
    // mid-block.
    for (dtype, bt) in [
        (DType::F32, 16),
        (DType::F16, 16),
        (DType::F16, 32),
        (DType::F32, 24),
    ] {
        let case = Case::new(gpu, &mut rng, dtype, (32, 8, 128, bt), &[1000, 40, 4096]);
        let want = case.expected();
        let mut worst = 0.0f32;
        for splits in [1, 2, 3, 33, 37, 300] {
            let got = case.run(gpu, Some(splits));
            let (e_ref, e_cpu) = errors(&case, &got, &want);
            assert!(
                e_ref < tolerance(dtype),
                "{dtype:?} blocks of {bt}, {splits} splits: {e_ref:.2e}"
            );
            assert!(
                e_cpu < CPU_TOL,
                "{dtype:?} blocks of {bt}, {splits} splits: {e_cpu:.2e} vs CPU"
            );
            worst = worst.max(e_ref);
        }
        eprintln!(
            "decode {dtype:?}, blocks of {bt}, 1..300 splits: max err {worst:.2e} vs reference"
        );
    }
}

/// A context split into parts (three GPU parts over different blocks, an empty part, and a host
/// partial from the CPU kernel, uploaded) merges on the GPU into the whole.
#[test]
fn merge_of_parts_equals_the_whole() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let (nh, kvh, hd, bt) = (32, 8, 128, 16);
    let lens = [2000usize, 333];
    let case = Case::new(gpu, &mut rng, DType::F16, (nh, kvh, hd, bt), &lens);
    let whole = case.run(gpu, None);
    let want = case.expected();

    // Parts by block index: [0, a), [a, b), [b, c) on the GPU, [c, end) on the host.
    let cuts: Vec<[usize; 3]> = case
        .tables
        .iter()
        .map(|t| [t.len() / 4, t.len() / 2, t.len() * 3 / 4])
        .collect();
    let mut gpu_parts = Vec::new();
    for k in 0..3 {
        let mut tables = Vec::new();
        let mut part_lens = Vec::new();
        for (i, t) in case.tables.iter().enumerate() {
            let from = if k == 0 { 0 } else { cuts[i][k - 1] };
            let to = cuts[i][k];
            tables.push(t[from..to].to_vec());
            part_lens.push(((to - from) * bt).min(lens[i].saturating_sub(from * bt)));
        }
        let dt = gpu.upload_block_tables(&tables, &part_lens, bt).unwrap();
        let q = gpu.tensor(lens.len(), nh * hd, case.q.clone()).unwrap();
        gpu_parts.push(gpu.decode_attention(&q, &case.pool, &dt, &case.g).unwrap());
    }
    let empty_tables = gpu
        .upload_block_tables(&[vec![], vec![]], &[0, 0], bt)
        .unwrap();
    let q = gpu.tensor(lens.len(), nh * hd, case.q.clone()).unwrap();
    gpu_parts.push(
        gpu.decode_attention(&q, &case.pool, &empty_tables, &case.g)
            .unwrap(),
    );
    let host: Vec<Partial> = (0..lens.len())
        .map(|i| {
            let views = case.views(i, cuts[i][2], case.tables[i].len());
            attend_partial(case.q_of(i), lens[i] - 1, &views, &case.g)
        })
        .collect();
    let host_dev = DevicePartial {
        o: gpu
            .tensor(
                lens.len(),
                nh * hd,
                host.iter().flat_map(|p| p.o.clone()).collect(),
            )
            .unwrap(),
        lse: gpu
            .tensor(
                lens.len(),
                nh,
                host.iter().flat_map(|p| p.lse.clone()).collect(),
            )
            .unwrap(),
    };
    let mut refs: Vec<&DevicePartial> = gpu_parts.iter().collect();
    refs.push(&host_dev);
    let merged = download(gpu, &gpu.merge_partials(&refs).unwrap());

    let (e_ref, e_cpu) = errors(&case, &merged, &want);
    let e_whole = o_err(&merged.o, &whole.o).max(lse_err(&merged.lse, &whole.lse));
    // The same parts merged on the CPU.
    let mut cpu_merged = Partial {
        o: Vec::new(),
        lse: Vec::new(),
    };
    for i in 0..lens.len() {
        let parts: Vec<Partial> = refs
            .iter()
            .map(|p| {
                let d = download(gpu, p);
                Partial {
                    o: d.o[i * nh * hd..(i + 1) * nh * hd].to_vec(),
                    lse: d.lse[i * nh..(i + 1) * nh].to_vec(),
                }
            })
            .collect();
        let m = Partial::merge(&parts, nh, hd);
        cpu_merged.o.extend(m.o);
        cpu_merged.lse.extend(m.lse);
    }
    let e_cpu_merge = o_err(&merged.o, &cpu_merged.o).max(lse_err(&merged.lse, &cpu_merged.lse));
    eprintln!(
        "merge of 5 parts: {e_ref:.2e} vs reference, {e_cpu:.2e} vs CPU kernel, {e_whole:.2e} vs \
         the whole on the GPU, {e_cpu_merge:.2e} vs Partial::merge"
    );
    assert!(e_ref < 1e-4 && e_cpu < CPU_TOL && e_whole < 1e-5 && e_cpu_merge < 1e-6);

    // Two parts take the launch without pointer arrays: the same formula.
    let two = download(gpu, &gpu.merge_partials(&[refs[0], &host_dev]).unwrap());
    let (d0, d1) = (download(gpu, refs[0]), download(gpu, &host_dev));
    let mut cpu_two = Partial {
        o: Vec::new(),
        lse: Vec::new(),
    };
    for i in 0..lens.len() {
        let part = |d: &Partial| Partial {
            o: d.o[i * nh * hd..(i + 1) * nh * hd].to_vec(),
            lse: d.lse[i * nh..(i + 1) * nh].to_vec(),
        };
        let m = Partial::merge(&[part(&d0), part(&d1)], nh, hd);
        cpu_two.o.extend(m.o);
        cpu_two.lse.extend(m.lse);
    }
    let e_two = o_err(&two.o, &cpu_two.o).max(lse_err(&two.lse, &cpu_two.lse));
    assert!(
        e_two < 1e-6,
        "merge of 2 parts: {e_two:.2e} vs Partial::merge"
    );

    // Merging only empty parts gives an empty partial.
    let empty = download(
        gpu,
        &gpu.merge_partials(&[&gpu_parts[3], &gpu_parts[3]]).unwrap(),
    );
    assert!(empty.lse.iter().all(|&l| l == f32::NEG_INFINITY));
    assert!(empty.o.iter().all(|&x| x == 0.0));
}

#[test]
fn decode_and_merge_reject_bad_inputs() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let case = Case::new(gpu, &mut rng, DType::F16, (8, 2, 64, 16), &[40]);
    let q = gpu.tensor(1, 8 * 64, case.q.clone()).unwrap();
    // Geometry that does not match the pool.
    let mut g = case.g;
    g.block_tokens = 32;
    assert!(
        gpu.decode_attention(&q, &case.pool, &case.dev_tables, &g)
            .is_err()
    );
    let mut g = case.g;
    g.n_heads = 7;
    assert!(
        gpu.decode_attention(&q, &case.pool, &case.dev_tables, &g)
            .is_err()
    );
    // A block id past the pool, a table too short, lengths that do not match.
    let far = gpu
        .upload_block_tables(&[vec![0, 1, case.pool.n_blocks() as u32]], &[40], 16)
        .unwrap();
    assert!(gpu.decode_attention(&q, &case.pool, &far, &case.g).is_err());
    assert!(gpu.upload_block_tables(&[vec![0, 1]], &[40], 16).is_err());
    assert!(
        gpu.upload_block_tables(&[vec![0, 1, 2]], &[40, 1], 16)
            .is_err()
    );
    // q of the wrong shape; zero or too many splits.
    let q2 = gpu
        .tensor(2, 8 * 64, [case.q.clone(), case.q.clone()].concat())
        .unwrap();
    assert!(
        gpu.decode_attention(&q2, &case.pool, &case.dev_tables, &case.g)
            .is_err()
    );
    for s in [0, 5000] {
        assert!(
            gpu.decode_attention_with_splits(&q, &case.pool, &case.dev_tables, &case.g, s)
                .is_err()
        );
    }
    // Merging nothing, or partials of different shapes.
    assert!(gpu.merge_partials(&[]).is_err());
    let a = gpu
        .decode_attention(&q, &case.pool, &case.dev_tables, &case.g)
        .unwrap();
    let b = DevicePartial {
        o: gpu.tensor(1, 4, vec![0.0; 4]).unwrap(),
        lse: gpu.tensor(1, 1, vec![0.0]).unwrap(),
    };
    assert!(gpu.merge_partials(&[&a, &b]).is_err());
    assert!(gpu.deferred_error().is_none());
}
