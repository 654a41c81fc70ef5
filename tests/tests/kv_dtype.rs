//! The host and disk tiers in half precision, through the KV cache's own interface (no model):
//! appends are rounded to nearest even and stored in the dtype (host slots and disk blocks half
//! the size of f32); blocks spilled to disk and read back are bit for bit what was stored; and
//! the host engine and the storage engine attend them, merged, like the scalar reference over the
//! rounded values (2e-5 absolute on `o` and `lse`), with both IO engines. The same holds for f32,
//! which must equal the unrounded values exactly.

#![allow(clippy::unwrap_used)]
// Layers index tables of sequences of layers: a range reads better than enumerate here.
#![allow(clippy::needless_range_loop)]

use strata_kernels::testing::{SplitMix as Rng, test_seed};
use strata_kernels::{AttentionGeometry, DType, KvBlockView, KvBuf, Partial, reference};
use strata_runtime::kv::{AttentionRoutes, IoEngine, KvCache, KvGeometry, SeqId, TierQuery};
use strata_tests::kv_tiers::{self, io_engines};
use strata_tests::scratch_disk;

const G: KvGeometry = KvGeometry {
    layers: 2,
    kv_heads: 2,
    head_dim: 64,
    block_tokens: 8,
};
const N_HEADS: usize = 6;

fn geometry() -> AttentionGeometry {
    AttentionGeometry::new(N_HEADS, G.kv_heads, G.head_dim, G.block_tokens)
}

/// A cache whose host tier holds `host_blocks` blocks over a disk tier.
fn cache(dtype: DType, host_blocks: usize, engine: IoEngine, tag: &str) -> KvCache {
    kv_tiers::host_and_disk(G, dtype, host_blocks, scratch_disk("kv-dtype", tag, engine))
}

fn fill(kv: &mut KvCache, rng: &mut Rng, seq: SeqId, tokens: usize) -> Vec<Vec<Vec<f32>>> {
    kv_tiers::fill(kv, G, rng, seq, tokens)
}

fn rounded(dtype: DType, x: &[f32]) -> Vec<f32> {
    KvBuf::from_f32(dtype, x).as_slice().to_f32_vec()
}

#[test]
fn host_to_disk_and_back_is_bit_exact_in_every_dtype() {
    let seed = test_seed();
    for engine in io_engines() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let what = format!("seed {seed}: {dtype:?} {engine:?}");
            let mut rng = Rng(seed);
            // 2 layers x 2 sequences need 4 writable blocks; 6 leaves two for the rest.
            let mut kv = cache(dtype, 6, engine, &format!("rt-{}", dtype.name()));
            let seqs = [SeqId(0), SeqId(1)];
            let want: Vec<_> = seqs
                .iter()
                .map(|&s| fill(&mut kv, &mut rng, s, 45))
                .collect();
            let m = kv.metrics();
            assert_eq!(m.kv_dtype, dtype.name());
            assert_eq!(m.bytes_per_block, G.bytes_per_block(dtype));
            assert!(
                m.spilled_blocks > 0 && kv.disk_blocks_in_use() > 0,
                "{what}"
            );
            assert_eq!(
                m.bytes_host_to_disk,
                m.spilled_blocks * G.bytes_per_block(dtype) as u64,
                "{what}: spilled bytes are not blocks of the dtype"
            );
            // Everything far: every host and disk block comes back whole, in the stored dtype.
            let all_far = AttentionRoutes {
                host_near: 0.0,
                disk_near: 0.0,
            };
            kv.set_executor(all_far, 0.0, 0).unwrap();
            for layer in 0..G.layers {
                let rows: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
                let far = kv.gather_far(layer, &rows).unwrap();
                assert_eq!(far.len(), 2 * 6, "{what}: layer {layer}: blocks gathered");
                for f in &far {
                    let w = &want[f.seq.0 as usize][layer][f.start_pos / G.block_tokens];
                    assert_eq!(f.data.dtype(), dtype, "{what}");
                    assert_eq!(f.data.size_bytes(), G.bytes_per_block(dtype), "{what}");
                    assert_eq!(
                        kv_tiers::filled_bits(G, &f.data.as_slice().to_f32_vec(), f.len),
                        kv_tiers::filled_bits(G, &rounded(dtype, w), f.len),
                        "{what}: layer {layer} block at {} of {:?} changed",
                        f.start_pos,
                        f.seq
                    );
                }
            }
        }
    }
}

/// The scalar reference over `blocks` (f32, already rounded) for `q` at `pos`.
fn reference_partial(q: &[f32], pos: usize, blocks: &[Vec<f32>], tokens: usize) -> Partial {
    let (e, bt) = (G.block_elems(), G.block_tokens);
    let views: Vec<KvBlockView<'_>> = blocks
        .iter()
        .enumerate()
        .map(|(b, d)| KvBlockView {
            k: (&d[..e]).into(),
            v: (&d[e..]).into(),
            start_pos: b * bt,
            len: bt.min(tokens - b * bt),
        })
        .collect();
    reference::attention(q, pos, &views, &geometry())
}

/// Each row `(sequence, position)` with its query.
fn tier_queries<'a>(rows: &[(usize, usize)], qs: &'a [Vec<f32>]) -> Vec<TierQuery<'a>> {
    rows.iter()
        .zip(qs)
        .map(|(&(s, pos), q)| TierQuery {
            seq: SeqId(s as u64),
            pos,
            q,
        })
        .collect()
}

/// Asserts `p` is the scalar reference for `q` at `pos` over `blocks` (f32, as filled) rounded
/// to `dtype`, within 2e-5 on `o` and `lse`.
fn assert_reference(
    p: &Partial,
    q: &[f32],
    pos: usize,
    blocks: &[Vec<f32>],
    tokens: usize,
    dtype: DType,
    what: &str,
) {
    let rounded_blocks: Vec<Vec<f32>> = blocks.iter().map(|b| rounded(dtype, b)).collect();
    let r = reference_partial(q, pos, &rounded_blocks, tokens);
    for (a, b) in p.o.iter().chain(&p.lse).zip(r.o.iter().chain(&r.lse)) {
        assert!((a - b).abs() < 2e-5, "{what} at {pos}: {a} vs {b}");
    }
}

#[test]
fn host_and_storage_engines_attend_half_precision_blocks() {
    let seed = test_seed();
    let ag = geometry();
    for engine in io_engines() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let what = format!("seed {seed}: {dtype:?} {engine:?}");
            let mut rng = Rng(seed ^ 0x5eed);
            let mut kv = cache(dtype, 6, engine, &format!("attend-{}", dtype.name()));
            let tokens = [37, 50];
            let want: Vec<_> = tokens
                .iter()
                .enumerate()
                .map(|(i, &n)| fill(&mut kv, &mut rng, SeqId(i as u64), n))
                .collect();
            for layer in 0..G.layers {
                // The newest token of each sequence, and an older one (a prefill row).
                let rows = [(0usize, 36usize), (1, 49), (1, 20)];
                let qs: Vec<Vec<f32>> =
                    rows.iter().map(|_| rng.vec(N_HEADS * G.head_dim)).collect();
                let queries = tier_queries(&rows, &qs);
                let got = kv.attend(layer, &queries, &ag).unwrap();
                for ((&(s, pos), q), p) in rows.iter().zip(&qs).zip(&got) {
                    let at = format!("{what}: layer {layer}, seq {s}");
                    assert_reference(p, q, pos, &want[s][layer], tokens[s], dtype, &at);
                }
            }
            let m = kv.metrics();
            assert!(
                m.bytes_disk_to_host > 0,
                "{what}: the storage engine read nothing: {m:?}"
            );
            assert_eq!(
                m.bytes_disk_to_host % G.bytes_per_block(dtype) as u64,
                0,
                "{what}: the storage engine read blocks of another size"
            );
        }
    }
}

/// Storage attention over many more disk blocks than the storage engine has staging buffers
/// (8): a decode step's rows (attended on the thread pool as reads complete, buffers held until
/// their math is done) and a prompt chunk's 9 rows of one sequence (attended where each read
/// completes, rows in parallel) match the reference; and the decode rows' partials, merged in
/// block order, repeat bit for bit whatever order the reads complete in.
#[test]
fn storage_attention_over_more_blocks_than_buffers_matches_and_repeats() {
    let seed = test_seed();
    let ag = geometry();
    for engine in io_engines() {
        let what = format!("seed {seed}: {engine:?}");
        let mut rng = Rng(seed ^ 0xb10c);
        let mut kv = cache(DType::BF16, 6, engine, "many-blocks");
        let tokens = [300, 250];
        let want: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &n)| fill(&mut kv, &mut rng, SeqId(i as u64), n))
            .collect();
        let decode = vec![(0usize, 299usize), (1, 249)];
        let chunk: Vec<(usize, usize)> = (0..9).map(|i| (1, 240 + i)).collect();
        for layer in 0..G.layers {
            for rows in [&decode, &chunk] {
                let qs: Vec<Vec<f32>> =
                    rows.iter().map(|_| rng.vec(N_HEADS * G.head_dim)).collect();
                let queries = tier_queries(rows, &qs);
                let got = kv.attend(layer, &queries, &ag).unwrap();
                for ((&(s, pos), q), p) in rows.iter().zip(&qs).zip(&got) {
                    let at = format!("{what}: layer {layer}, seq {s}");
                    assert_reference(p, q, pos, &want[s][layer], tokens[s], DType::BF16, &at);
                }
                if rows.len() == decode.len() {
                    for _ in 0..3 {
                        let again = kv.attend(layer, &queries, &ag).unwrap();
                        for (a, b) in got.iter().zip(&again) {
                            let bits = |p: &Partial| -> Vec<u32> {
                                p.o.iter().chain(&p.lse).map(|v| v.to_bits()).collect()
                            };
                            assert_eq!(bits(a), bits(b), "{what}: layer {layer}: not repeated");
                        }
                    }
                }
            }
        }
        let m = kv.metrics();
        let blocks_on_disk = kv.disk_blocks_in_use();
        assert!(
            blocks_on_disk > 8 * 4,
            "{what}: {blocks_on_disk} disk blocks, want many more than the 8 buffers"
        );
        assert!(
            m.storage_attention_math_seconds > 0.0 && m.storage_attention_math_seconds.is_finite(),
            "{what}: {m:?}"
        );
    }
}

/// Decode commands queued back to back (the executor ships a GPU batch's queries while the one
/// before still streams) share one read stream of the storage engine: each gets its own
/// partials, as the reference gives them. When that stream fails (every read corrupt), every
/// command queued on it is answered with an error rather than left waiting.
#[test]
fn queued_decode_commands_share_a_stream_and_a_failure_answers_all() {
    let seed = test_seed();
    let ag = geometry();
    for engine in io_engines() {
        for corrupt in [false, true] {
            let what = format!("seed {seed}: {engine:?}, corrupt reads {corrupt}");
            let mut disk = scratch_disk("kv-dtype", &format!("stream-{corrupt}"), engine);
            if corrupt {
                disk.faults = Some("seed=3,corrupt=1.0".into());
            }
            let mut kv = kv_tiers::host_and_disk(G, DType::BF16, 24, disk);
            let mut rng = Rng(seed ^ 0x57ea);
            let tokens = [200, 180, 150, 220];
            let want: Vec<_> = tokens
                .iter()
                .enumerate()
                .map(|(i, &n)| fill(&mut kv, &mut rng, SeqId(i as u64), n))
                .collect();
            for layer in 0..G.layers {
                let qs: Vec<Vec<f32>> = tokens
                    .iter()
                    .map(|_| rng.vec(N_HEADS * G.head_dim))
                    .collect();
                let rows: Vec<(usize, usize)> = tokens
                    .iter()
                    .enumerate()
                    .map(|(s, &n)| (s, n - 1))
                    .collect();
                let queries = tier_queries(&rows, &qs);
                // One command per sequence, all shipped before any is joined.
                let shipped: Vec<_> = queries
                    .iter()
                    .map(|q| {
                        kv.ship_to_storage(layer, std::slice::from_ref(q), &ag)
                            .unwrap()
                    })
                    .collect();
                assert!(
                    shipped.iter().all(Option::is_some),
                    "{what}: nothing shipped"
                );
                for (s, (q, storage)) in queries.iter().zip(shipped).enumerate() {
                    let got = kv
                        .attend_host_tier(layer, std::slice::from_ref(q), &ag, storage)
                        .unwrap()
                        .join();
                    if corrupt {
                        assert!(got.is_err(), "{what}: layer {layer}, seq {s}: {got:?}");
                        continue;
                    }
                    let p = &got.unwrap()[0];
                    let at = format!("{what}: layer {layer}, seq {s}");
                    assert_reference(p, q.q, q.pos, &want[s][layer], tokens[s], DType::BF16, &at);
                }
            }
        }
    }
}

/// `append_rows` (blocks taken first, values written by several threads) stores exactly what
/// row-by-row appends store, for rows of several sequences in any order (a prefill chunk, decode
/// rows interleaved, one sequence's rows split by another's), also when the host tier is too
/// small for the new blocks and it falls back to row by row (spilling to disk); and a row out of
/// order is an error that leaves the rows before it appended.
#[test]
fn bulk_appends_store_what_row_appends_store() {
    let seed = test_seed();
    let width = G.kv_heads * G.head_dim;
    let (s0, s1, s2) = (SeqId(0), SeqId(1), SeqId(2));
    let chunk: Vec<(SeqId, usize)> = (0..21)
        .map(|p| (s0, p))
        .chain((0..9).map(|p| (s1, p)))
        .chain((0..17).map(|p| (s2, p)))
        .collect();
    let calls = [
        chunk,
        vec![(s2, 17), (s0, 21), (s1, 9)],
        vec![(s0, 22), (s1, 10), (s0, 23)],
    ];
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        // 64 host blocks hold everything; 8 do not, and spill.
        for host_blocks in [64, 8] {
            let what = format!("seed {seed}: {dtype:?}, {host_blocks} host blocks");
            let tag = format!("bulk-{}-{host_blocks}", dtype.name());
            let mut rng = Rng(seed);
            let mut by_row = cache(dtype, host_blocks, IoEngine::Sync, &format!("{tag}-r"));
            let mut bulk = cache(dtype, host_blocks, IoEngine::Sync, &format!("{tag}-b"));
            for s in [s0, s1, s2] {
                by_row.add_sequence(s);
                bulk.add_sequence(s);
            }
            for at in &calls {
                for layer in 0..G.layers {
                    let k = rng.vec_scaled(at.len() * width, 3.0);
                    let v = rng.vec_scaled(at.len() * width, 3.0);
                    for (r, &(seq, pos)) in at.iter().enumerate() {
                        let row = r * width..(r + 1) * width;
                        by_row
                            .append(seq, layer, pos, &k[row.clone()], &v[row])
                            .unwrap();
                    }
                    bulk.append_rows(layer, at, &k, &v).unwrap();
                }
            }
            let all_far = AttentionRoutes {
                host_near: 0.0,
                disk_near: 0.0,
            };
            for kv in [&mut by_row, &mut bulk] {
                kv.set_executor(all_far, 0.0, 0).unwrap();
            }
            for layer in 0..G.layers {
                let rows = [(s0, 1), (s1, 1), (s2, 1)];
                let (a, b) = (
                    by_row.gather_far(layer, &rows).unwrap(),
                    bulk.gather_far(layer, &rows).unwrap(),
                );
                assert_eq!(a.len(), b.len(), "{what}: layer {layer}");
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!((x.seq, x.start_pos, x.len), (y.seq, y.start_pos, y.len));
                    assert_eq!(
                        kv_tiers::filled_bits(G, &x.data.as_slice().to_f32_vec(), x.len),
                        kv_tiers::filled_bits(G, &y.data.as_slice().to_f32_vec(), y.len),
                        "{what}: layer {layer}: block at {} of {:?}",
                        x.start_pos,
                        x.seq
                    );
                }
            }
        }
    }
    // Out of order: s1's row skips position 1; s0's rows before it are in.
    let mut kv = cache(DType::F16, 64, IoEngine::Sync, "bulk-order");
    kv.add_sequence(s0);
    kv.add_sequence(s1);
    let at = [(s0, 0), (s0, 1), (s1, 1), (s0, 2)];
    let (k, v) = (vec![0.5; at.len() * width], vec![0.25; at.len() * width]);
    assert!(kv.append_rows(0, &at, &k, &v).is_err());
    assert_eq!((kv.len(s0, 0), kv.len(s1, 0)), (2, 0));
    assert!(
        kv.append_rows(0, &at[..1], &k, &v).is_err(),
        "shape mismatch"
    );
}
