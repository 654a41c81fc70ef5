//! Paged prefill attention on the GPU against the scalar reference (f64) and the CPU kernel
//! (`attend_partial`), on random inputs fresh per run (the seed is printed; `STRATA_TEST_SEED`
//! replays one), with every output poisoned (NaN) before the kernel that must write it, and NaN
//! in every KV slot a kernel must not read: the unused slots of a sequence's last block, the
//! blocks a table does not list, and spare pool blocks.
//!
//! Shapes: head_dim 64 and 128 (tensor cores) and 80, 96 (generic kernel); GQA groups 1, 4 and
//! 8; blocks of 16 and 32 tokens; several sequences of different lengths (not multiples of the
//! tile or the block) in one call, in shuffled order; chunks that start mid-sequence; tables
//! that list a non-contiguous subset of a sequence's blocks, or none; f16, bf16 and f32 pools.
//! Every kernel the pool allows runs (each tensor-core kernel shape, the wgmma kernels on Hopper,
//! the generic kernel, the automatic choice).
//!
//! Tolerances: `o` relative to the largest |value| of the row's expected output (all heads),
//! `lse` relative to max(1, |lse|).
//! - Tensor-core kernel: q (scaled) and the softmax weights P are rounded to the pool's dtype
//!   for the mma (K and V are exact: they are stored in that dtype). A rounding is at most 2⁻⁹
//!   relative (bf16) or 2⁻¹² (f16); a score `s = Σ q_i k_i` then moves by about
//!   `2⁻⁹ · |q||k| / √3` (≈ 1e-3 here, 5e-3 in the worst of a run's millions), which moves a
//!   softmax weight by the same relative amount, and o by that times |v| in the worst case of a
//!   row dominated by one key. Bounds: bf16 1e-2 (o) and 1e-2 (lse); f16 2e-3 and 2e-3.
//! - Generic kernel (f32 math on the stored values): 1e-5 (f32 pool) and 1e-4 (f16/bf16) against
//!   the reference, 2e-5 against the CPU kernel, as the decode kernel.
//!
//! Without a GPU (or driver, NVRTC, cuBLAS) every test prints `skipped: <reason>` and passes.

#![allow(clippy::unwrap_used)]

use std::ops::Range;

use rayon::prelude::*;
use strata_kernels::attention::attend_partial;
use strata_kernels::cuda::{DevicePartial, KvBlockShape, KvPool, PrefillKernel, SeqBlocks};
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

/// One sequence: `len` tokens, of which the GPU table lists the blocks `listed` (block indices,
/// increasing; `None`: all), and query rows at positions `q`.
#[derive(Clone, Debug)]
struct Seq {
    len: usize,
    listed: Option<Vec<usize>>,
    q: Range<usize>,
}

fn full(len: usize) -> Seq {
    Seq {
        len,
        listed: None,
        q: 0..len,
    }
}

/// A pool holding a batch of sequences in shuffled blocks, their tables, and query rows.
struct Case {
    dtype: DType,
    g: AttentionGeometry,
    seqs: Vec<Seq>,
    /// Per sequence, the pool block of each of its block indices.
    blocks: Vec<Vec<u32>>,
    /// `[n_blocks, 2, kv_heads, bt, hd]`, as stored on the device (widened to f32).
    host: Vec<f32>,
    pool: KvPool,
    tables: Vec<SeqBlocks>,
    /// `(sequence, position)` per row.
    rows: Vec<(u32, u32)>,
    /// `[rows, n_heads * head_dim]`.
    q: Vec<f32>,
}

impl Case {
    fn new(gpu: &CudaBackend, rng: &mut Rng, dtype: DType, dims: Dims, seqs: &[Seq]) -> Case {
        let (n_heads, n_kv_heads, head_dim, bt) = dims;
        let g = AttentionGeometry {
            n_heads,
            n_kv_heads,
            head_dim,
            block_tokens: bt,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let shape = KvBlockShape {
            kv_heads: n_kv_heads,
            block_tokens: bt,
            head_dim,
        };
        let need: Vec<usize> = seqs.iter().map(|s| s.len.div_ceil(bt)).collect();
        let n_blocks = need.iter().sum::<usize>() + 3; // a few blocks nobody uses
        let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
        rng.shuffle(&mut ids);
        let mut blocks = Vec::new();
        let mut next = 0;
        for &n in &need {
            blocks.push(ids[next..next + n].to_vec());
            next += n;
        }
        let be = shape.block_elems();
        let half = shape.half_elems();
        let mut host: Vec<f32> = rng
            .vec_scaled(n_blocks * be, 1.0)
            .into_iter()
            .map(|x| round(x, dtype))
            .collect();
        // NaN wherever no kernel may read: spare blocks, blocks not listed, unused slots.
        let mut listed_ids = vec![false; n_blocks];
        let mut tables = Vec::new();
        for (s, bl) in seqs.iter().zip(&blocks) {
            let idx: Vec<usize> = s.listed.clone().unwrap_or_else(|| (0..bl.len()).collect());
            for &k in &idx {
                listed_ids[bl[k] as usize] = true;
            }
            tables.push(SeqBlocks {
                ids: idx.iter().map(|&k| bl[k]).collect(),
                starts: idx.iter().map(|&k| (k * bt) as u32).collect(),
                last_len: idx.last().map_or(0, |&k| bt.min(s.len - k * bt)),
            });
            let used = s.len % bt;
            if let (Some(&last), true) = (bl.last(), used > 0) {
                for kv in 0..2 {
                    for h in 0..n_kv_heads {
                        let at = last as usize * be + kv * half + h * bt * head_dim;
                        host[at + used * head_dim..at + bt * head_dim].fill(f32::NAN);
                    }
                }
            }
        }
        for (id, _) in listed_ids.iter().enumerate().filter(|(_, l)| !**l) {
            host[id * be..(id + 1) * be].fill(f32::NAN);
        }
        let mut pool = gpu.kv_pool(dtype, shape, n_blocks).unwrap();
        gpu.kv_pool_write(&mut pool, 0, &host).unwrap();

        // Rows: sequences in shuffled order, each a run of increasing positions.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        rng.shuffle(&mut order);
        let rows: Vec<(u32, u32)> = order
            .iter()
            .flat_map(|&b| seqs[b].q.clone().map(move |p| (b as u32, p as u32)))
            .collect();
        let q = rng.vec_scaled(rows.len() * n_heads * head_dim, 2.0);
        Case {
            dtype,
            g,
            seqs: seqs.to_vec(),
            blocks,
            host,
            pool,
            tables,
            rows,
            q,
        }
    }

    /// The views of the blocks sequence `b`'s table lists.
    fn views(&self, b: usize) -> Vec<KvBlockView<'_>> {
        let (bt, be) = (self.g.block_tokens, 2 * self.g.block_elems());
        let t = &self.tables[b];
        t.ids
            .iter()
            .zip(&t.starts)
            .map(|(&id, &start)| {
                let at = id as usize * be;
                let start = start as usize;
                KvBlockView {
                    k: (&self.host[at..at + be / 2]).into(),
                    v: (&self.host[at + be / 2..at + be]).into(),
                    start_pos: start,
                    len: bt.min(self.seqs[b].len - start),
                }
            })
            .collect()
    }

    fn q_row(&self, r: usize) -> &[f32] {
        let w = self.g.n_heads * self.g.head_dim;
        &self.q[r * w..(r + 1) * w]
    }

    /// Per row: (reference, CPU kernel).
    fn expected(&self) -> Vec<(Partial, Partial)> {
        let views: Vec<Vec<KvBlockView<'_>>> =
            (0..self.seqs.len()).map(|b| self.views(b)).collect();
        (0..self.rows.len())
            .into_par_iter()
            .map(|r| {
                let (b, pos) = self.rows[r];
                let v = &views[b as usize];
                let q = self.q_row(r);
                (
                    reference::attention(q, pos as usize, v, &self.g),
                    attend_partial(q, pos as usize, v, &self.g),
                )
            })
            .collect()
    }

    fn run(&self, gpu: &CudaBackend, kernel: PrefillKernel, tables: &[SeqBlocks]) -> Partial {
        let dev_tables = gpu.upload_paged_tables(&self.pool, tables).unwrap();
        let dev_rows = gpu.upload_query_rows(&self.rows).unwrap();
        let w = self.g.n_heads * self.g.head_dim;
        let q = gpu.tensor(self.rows.len(), w, self.q.clone()).unwrap();
        let p = gpu
            .prefill_attention_with(
                &self.pool,
                &dev_tables,
                &q,
                &dev_rows,
                self.g.n_heads,
                self.g.scale,
                kernel,
            )
            .unwrap();
        download(gpu, &p)
    }

    /// The kernels this pool can run: tensor-core tiles where allowed (wgmma on Hopper), the
    /// generic kernel, and the automatic choice.
    fn kernels(&self, gpu: &CudaBackend) -> Vec<PrefillKernel> {
        let mut k = vec![PrefillKernel::Generic, PrefillKernel::Auto];
        if self.dtype != DType::F32 && [64, 128].contains(&self.g.head_dim) {
            k.extend([PrefillKernel::Mma64, PrefillKernel::Mma128]);
            if gpu.device_info().compute_capability == (9, 0) {
                k.extend([
                    PrefillKernel::Wgmma64,
                    PrefillKernel::Wgmma64K32,
                    PrefillKernel::Wgmma128,
                ]);
            }
        }
        k
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

/// Max errors of a GPU result against per-row expectations: (o, lse) against the reference,
/// and the larger of the two against the CPU kernel.
fn errors(case: &Case, got: &Partial, want: &[(Partial, Partial)]) -> (f32, f32, f32) {
    let w = case.g.n_heads * case.g.head_dim;
    let nh = case.g.n_heads;
    let (mut eo, mut el, mut ec) = (0.0f32, 0.0f32, 0.0f32);
    for (r, (rf, c)) in want.iter().enumerate() {
        let o = &got.o[r * w..(r + 1) * w];
        let lse = &got.lse[r * nh..(r + 1) * nh];
        eo = eo.max(o_err(o, &rf.o));
        el = el.max(lse_err(lse, &rf.lse));
        ec = ec.max(o_err(o, &c.o)).max(lse_err(lse, &c.lse));
    }
    (eo, el, ec)
}

/// (o, lse, CPU) tolerances of `kernel` on a pool of `dtype`.
fn tolerance(kernel: PrefillKernel, case: &Case) -> (f32, f32, f32) {
    let mma = kernel != PrefillKernel::Generic
        && case.dtype != DType::F32
        && [64, 128].contains(&case.g.head_dim);
    match (mma, case.dtype) {
        (true, DType::BF16) => (1e-2, 1e-2, 1e-2),
        (true, _) => (2e-3, 2e-3, 2e-3),
        (false, DType::F32) => (1e-5, 1e-5, 2e-5),
        (false, _) => (1e-4, 1e-4, 2e-5),
    }
}

/// The worst errors seen by a test, per (dtype, tensor cores or not).
#[derive(Default)]
struct Worst(Vec<(String, [f32; 3])>);

impl Worst {
    fn add(&mut self, key: String, e: (f32, f32, f32)) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, w)) => *w = [w[0].max(e.0), w[1].max(e.1), w[2].max(e.2)],
            None => self.0.push((key, [e.0, e.1, e.2])),
        }
    }
    fn print(&self, test: &str) {
        for (k, w) in &self.0 {
            eprintln!(
                "{test}: {k}: max err o {:.2e}, lse {:.2e} vs reference; {:.2e} vs CPU kernel",
                w[0], w[1], w[2]
            );
        }
    }
}

/// Runs every kernel the pool allows on `case` (with its own tables) and checks them.
fn check_case(gpu: &CudaBackend, case: &Case, worst: &mut Worst) {
    let want = case.expected();
    for kernel in case.kernels(gpu) {
        let got = case.run(gpu, kernel, &case.tables);
        let e = errors(case, &got, &want);
        let tol = tolerance(kernel, case);
        let what = format!(
            "{:?} {kernel:?} (heads, kv_heads, head_dim, block) {:?} seqs {:?}",
            case.dtype,
            (
                case.g.n_heads,
                case.g.n_kv_heads,
                case.g.head_dim,
                case.g.block_tokens
            ),
            case.seqs
        );
        assert!(
            e.0 < tol.0 && e.1 < tol.1 && e.2 < tol.2,
            "{what}: errors (o, lse, cpu) {e:?} over tolerance {tol:?}"
        );
        let tc = if tol.0 > 1e-4 {
            "tensor cores"
        } else {
            "generic"
        };
        worst.add(format!("{:?} pool, {tc}", case.dtype), e);
    }
}

#[test]
fn prefill_matches_reference_over_shapes() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let mut worst = Worst::default();
    for dtype in [DType::BF16, DType::F16] {
        for hd in [64, 128] {
            for (nh, kvh) in [(4, 4), (8, 2), (16, 2)] {
                for bt in [16, 32] {
                    // Lengths off the tile (64/128) and block sizes; one exactly a block.
                    let seqs = [full(1), full(17), full(bt), full(100), full(300)];
                    let case = Case::new(gpu, &mut rng, dtype, (nh, kvh, hd, bt), &seqs);
                    check_case(gpu, &case, &mut worst);
                }
            }
        }
    }
    worst.print("shapes");
    assert!(gpu.deferred_error().is_none());
}

#[test]
fn prefill_long_prompts_and_mid_sequence_chunks() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let mut worst = Worst::default();
    for dtype in [DType::BF16, DType::F16] {
        for bt in [16, 32] {
            // Queries at 100..164 over blocks holding 0..164; a 1500-token prompt; a chunk of
            // 500..700 of a 700-token sequence.
            let seqs = [
                Seq {
                    len: 164,
                    listed: None,
                    q: 100..164,
                },
                full(1500),
                Seq {
                    len: 700,
                    listed: None,
                    q: 500..700,
                },
            ];
            let case = Case::new(gpu, &mut rng, dtype, (8, 1, 128, bt), &seqs);
            check_case(gpu, &case, &mut worst);
        }
    }
    worst.print("long/chunks");
}

/// Tables that list a subset of each sequence's blocks (the rest on other tiers): gaps in
/// positions, rows that see nothing, a sequence with no block on the GPU. Also checks the
/// partial contract: the subset's partial merged with its complement's equals the whole.
#[test]
fn prefill_over_block_subsets_and_merge_with_the_rest() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let mut worst = Worst::default();
    for dtype in [DType::BF16, DType::F16] {
        for (hd, bt) in [(128, 16), (64, 32)] {
            let nb = |len: usize| len.div_ceil(bt);
            let seqs = [
                // Blocks 0, 1, 3, 6, 7, ... (gaps), queries over the second half.
                Seq {
                    len: 300,
                    listed: Some((0..nb(300)).filter(|k| k % 3 != 2 && *k != 4).collect()),
                    q: 150..300,
                },
                // Only blocks from position 4 * bt on: earlier rows see nothing.
                Seq {
                    len: 200,
                    listed: Some((4..nb(200)).collect()),
                    q: 0..200,
                },
                // Only the first two blocks: the last listed block is full, rows go past it.
                Seq {
                    len: 90,
                    listed: Some(vec![0, 1]),
                    q: 10..90,
                },
                // Nothing on the GPU.
                Seq {
                    len: 50,
                    listed: Some(vec![]),
                    q: 0..50,
                },
            ];
            let case = Case::new(gpu, &mut rng, dtype, (16, 4, hd, bt), &seqs);
            check_case(gpu, &case, &mut worst);

            // The complement of each subset, attended separately, merged on the GPU.
            let complement: Vec<SeqBlocks> = case
                .seqs
                .iter()
                .enumerate()
                .map(|(b, s)| {
                    let listed = s.listed.clone().unwrap_or_default();
                    let rest: Vec<usize> = (0..nb(s.len)).filter(|k| !listed.contains(k)).collect();
                    SeqBlocks {
                        ids: rest.iter().map(|&k| case.blocks[b][k]).collect(),
                        starts: rest.iter().map(|&k| (k * bt) as u32).collect(),
                        last_len: rest.last().map_or(0, |&k| bt.min(s.len - k * bt)),
                    }
                })
                .collect();
            // The complement's blocks hold NaN in this case's pool; give them data.
            let mut host = case.host.clone();
            let be = 2 * case.g.block_elems();
            for (t, s) in complement.iter().zip(&case.seqs) {
                for (&id, &start) in t.ids.iter().zip(&t.starts) {
                    let used = bt.min(s.len - start as usize);
                    let vals = rng.vec_scaled(be, 1.0);
                    let at = id as usize * be;
                    for kv in 0..2 {
                        for h in 0..case.g.n_kv_heads {
                            let row = at + kv * be / 2 + h * bt * hd;
                            for i in 0..used * hd {
                                host[row + i] = round(vals[row - at + i], dtype);
                            }
                        }
                    }
                }
            }
            let mut pool = gpu
                .kv_pool(dtype, case.pool.shape(), case.pool.n_blocks())
                .unwrap();
            gpu.kv_pool_write(&mut pool, 0, &host).unwrap();
            let whole_case = Case {
                dtype,
                g: case.g,
                seqs: case
                    .seqs
                    .iter()
                    .map(|s| Seq {
                        listed: None,
                        ..s.clone()
                    })
                    .collect(),
                blocks: case.blocks.clone(),
                host,
                pool,
                tables: Vec::new(),
                rows: case.rows.clone(),
                q: case.q.clone(),
            };
            let whole_case = Case {
                tables: (0..seqs.len())
                    .map(|b| {
                        SeqBlocks::contiguous(&whole_case.blocks[b], whole_case.seqs[b].len, bt)
                            .unwrap()
                    })
                    .collect(),
                ..whole_case
            };
            let w = case.g.n_heads * hd;
            let dev = |tables: &[SeqBlocks]| {
                let t = gpu.upload_paged_tables(&whole_case.pool, tables).unwrap();
                let r = gpu.upload_query_rows(&whole_case.rows).unwrap();
                let q = gpu.tensor(case.rows.len(), w, case.q.clone()).unwrap();
                gpu.prefill_attention(&whole_case.pool, &t, &q, &r, case.g.n_heads, case.g.scale)
                    .unwrap()
            };
            let a = dev(&case.tables);
            let b = dev(&complement);
            let merged = download(gpu, &gpu.merge_partials(&[&a, &b]).unwrap());
            let want = whole_case.expected();
            let e = errors(&whole_case, &merged, &want);
            let tol = tolerance(PrefillKernel::Auto, &whole_case);
            assert!(
                e.0 < tol.0 && e.1 < tol.1 && e.2 < tol.2,
                "{dtype:?} subset + complement merged: {e:?} over {tol:?}"
            );
            worst.add(format!("{dtype:?} pool, subset + complement merged"), e);
        }
    }
    worst.print("subsets");
}

#[test]
fn prefill_generic_head_dims_and_f32_pools() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let mut worst = Worst::default();
    let subset = Seq {
        len: 130,
        listed: Some(vec![0, 2, 3]),
        q: 40..130,
    };
    let cases: [(DType, Dims); 6] = [
        (DType::F16, (8, 2, 80, 16)),
        (DType::BF16, (8, 1, 96, 32)),
        (DType::F16, (4, 4, 96, 16)),
        (DType::F32, (8, 2, 64, 16)),
        (DType::F32, (16, 2, 128, 32)),
        (DType::F32, (4, 4, 80, 32)),
    ];
    for (dtype, dims) in cases {
        let seqs = [full(77), subset.clone(), full(5)];
        let case = Case::new(gpu, &mut rng, dtype, dims, &seqs);
        check_case(gpu, &case, &mut worst);
    }
    worst.print("generic");
}

#[test]
fn prefill_rejects_bad_inputs() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let case = Case::new(gpu, &mut rng, DType::F16, (8, 2, 64, 16), &[full(40)]);
    let pool = &case.pool;
    let good = &case.tables[0];
    let bad = |f: &dyn Fn(&mut SeqBlocks)| {
        let mut t = good.clone();
        f(&mut t);
        gpu.upload_paged_tables(pool, &[t]).is_err()
    };
    assert!(
        gpu.upload_paged_tables(pool, std::slice::from_ref(good))
            .is_ok()
    );
    let n = pool.n_blocks() as u32;
    assert!(bad(&|t| t.ids[0] = n)); // outside the pool
    assert!(bad(&|t| t.starts[1] = 17)); // not a multiple of the block
    assert!(bad(&|t| t.starts[1] = 0)); // not increasing
    assert!(bad(&|t| t.last_len = 0));
    assert!(bad(&|t| t.last_len = 17));
    assert!(bad(&|t| {
        t.starts.pop();
    }));
    assert!(bad(&|t| t.starts[2] = u32::MAX - 15)); // past u32 positions
    assert!(SeqBlocks::contiguous(&[0, 1], 40, 16).is_err());

    // Rows: a sequence's rows split in two runs, positions not increasing, the reserved one.
    assert!(gpu.upload_query_rows(&[(0, 1), (1, 0), (0, 2)]).is_err());
    assert!(gpu.upload_query_rows(&[(0, 3), (0, 3)]).is_err());
    assert!(gpu.upload_query_rows(&[(0, 5), (0, 4)]).is_err());
    assert!(gpu.upload_query_rows(&[(0, u32::MAX)]).is_err());
    assert!(gpu.upload_query_rows(&[(1, 0), (0, 0), (2, 7)]).is_ok());

    let tables = gpu.upload_paged_tables(pool, &case.tables).unwrap();
    let rows = gpu.upload_query_rows(&case.rows).unwrap();
    let w = 8 * 64;
    let q = gpu.tensor(case.rows.len(), w, case.q.clone()).unwrap();
    let run = |q: &_, rows: &_, n_heads: usize, kernel: PrefillKernel| {
        gpu.prefill_attention_with(pool, &tables, q, rows, n_heads, 0.125, kernel)
    };
    assert!(run(&q, &rows, 8, PrefillKernel::Auto).is_ok());
    assert!(run(&q, &rows, 7, PrefillKernel::Auto).is_err()); // heads over KV heads
    let q_short = gpu.tensor(1, w, vec![0.0; w]).unwrap();
    assert!(run(&q_short, &rows, 8, PrefillKernel::Auto).is_err());
    let rows_far = gpu.upload_query_rows(&[(1, 0)]).unwrap(); // sequence 1 of a batch of 1
    assert!(run(&q_short, &rows_far, 8, PrefillKernel::Auto).is_err());
    // Tables checked against another pool: bigger blocks, or fewer of them.
    let other = gpu
        .kv_pool(
            DType::F16,
            KvBlockShape {
                kv_heads: 2,
                block_tokens: 32,
                head_dim: 64,
            },
            64,
        )
        .unwrap();
    assert!(
        gpu.prefill_attention(&other, &tables, &q, &rows, 8, 0.125)
            .is_err()
    );
    let small = gpu.kv_pool(DType::F16, pool.shape(), 1).unwrap();
    assert!(
        gpu.prefill_attention(&small, &tables, &q, &rows, 8, 0.125)
            .is_err()
    );
    // A tensor-core kernel on an f32 pool, or for head_dim 80.
    let f32_pool = gpu
        .kv_pool(DType::F32, pool.shape(), pool.n_blocks())
        .unwrap();
    let f32_tables = gpu.upload_paged_tables(&f32_pool, &case.tables).unwrap();
    for kernel in [
        PrefillKernel::Mma64,
        PrefillKernel::Wgmma64,
        PrefillKernel::Wgmma64K32,
        PrefillKernel::Wgmma128,
    ] {
        assert!(
            gpu.prefill_attention_with(&f32_pool, &f32_tables, &q, &rows, 8, 0.1, kernel)
                .is_err()
        );
    }
    // wgmma anywhere but Hopper.
    if gpu.device_info().compute_capability != (9, 0) {
        for kernel in [
            PrefillKernel::Wgmma64,
            PrefillKernel::Wgmma64K32,
            PrefillKernel::Wgmma128,
        ] {
            assert!(
                gpu.prefill_attention_with(pool, &tables, &q, &rows, 8, 0.125, kernel)
                    .is_err()
            );
        }
    }
    // No rows: an empty partial.
    let none = gpu.upload_query_rows(&[]).unwrap();
    let q0 = gpu.tensor(0, w, Vec::new()).unwrap();
    let p = gpu
        .prefill_attention(pool, &tables, &q0, &none, 8, 0.125)
        .unwrap();
    assert_eq!(gpu.shape(&p.o), (0, w));
    assert!(gpu.deferred_error().is_none());
}
