//! The GPU KV tier's data movement against plain host arithmetic, on random inputs fresh per run
//! (`STRATA_TEST_SEED` replays one): appends land in the right slot of the right block, rounded
//! to nearest even for f16 / bf16 and bit-exact for f32; exports copy every block out in the
//! pool's dtype bit for bit (the host tier's bytes are the GPU tier's), or widened to f32
//! exactly, and refuse to narrow; argmax picks the first maximum of each row; host memory read in
//! place by a kernel, or copied beside the compute stream, arrives bit for bit.
//! Without a GPU every test prints `skipped: <reason>` and passes.

#![allow(clippy::unwrap_used)]

use strata_kernels::cuda::KvBlockShape;
use strata_kernels::testing::{SplitMix as Rng, same_bits, test_gpu, test_seed};
use strata_kernels::{Backend, DType};

/// The first `n` values of `words` (as the export wrote their bytes) in `dtype`, widened.
fn widen(words: &[u32], dtype: DType, n: usize) -> Vec<f32> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match dtype {
        DType::F32 => bytes[..4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes[..2 * n]
            .chunks_exact(2)
            .map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes[..2 * n]
            .chunks_exact(2)
            .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

#[test]
fn appends_land_in_their_slots_and_exports_copy_them_exactly() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (kv_heads, head_dim, bt) in [(2, 64, 16), (1, 96, 5), (8, 128, 32)] {
            let shape = KvBlockShape {
                kv_heads,
                block_tokens: bt,
                head_dim,
            };
            let n_blocks = 7;
            let mut pool = gpu.kv_pool(dtype, shape, n_blocks).unwrap();
            // Fill every slot of every block, in shuffled order over three append calls.
            let mut slots: Vec<u32> = (0..(n_blocks * bt) as u32).collect();
            rng.shuffle(&mut slots);
            let width = kv_heads * head_dim;
            let mut want = vec![f32::NAN; n_blocks * shape.block_elems()];
            for part in slots.chunks(slots.len().div_ceil(3)) {
                let k = rng.vec_scaled(part.len() * width, 4.0);
                let v = rng.vec_scaled(part.len() * width, 4.0);
                let kt = gpu.tensor(part.len(), width, k.clone()).unwrap();
                let vt = gpu.tensor(part.len(), width, v.clone()).unwrap();
                gpu.kv_append(&mut pool, &kt, &vt, part).unwrap();
                for (r, &slot) in part.iter().enumerate() {
                    let (b, t) = (slot as usize / bt, slot as usize % bt);
                    for h in 0..kv_heads {
                        for d in 0..head_dim {
                            let at = b * shape.block_elems() + (h * bt + t) * head_dim + d;
                            want[at] = round(k[r * width + h * head_dim + d], dtype);
                            want[at + shape.half_elems()] =
                                round(v[r * width + h * head_dim + d], dtype);
                        }
                    }
                }
            }
            // Export in a shuffled block order into separate host buffers, in the pool's dtype
            // and widened to f32.
            let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
            rng.shuffle(&mut ids);
            for to in [dtype, DType::F32] {
                let block_bytes = shape.block_elems() * to.size_bytes();
                // u32 words keep every buffer aligned for the f32 case.
                let mut host: Vec<Vec<u32>> = ids
                    .iter()
                    .map(|_| vec![0x7fc0_7fc0; block_bytes.div_ceil(4)])
                    .collect();
                let dst: Vec<*mut u8> = host.iter_mut().map(|h| h.as_mut_ptr().cast()).collect();
                // SAFETY: the buffers outlive the ticket, which is waited on before they are read.
                let ticket = unsafe { gpu.kv_export_async(&pool, &ids, &dst, to) }.unwrap();
                assert_eq!(ticket.bytes(), n_blocks * block_bytes);
                ticket.wait().unwrap();
                for (h, &id) in host.iter().zip(&ids) {
                    let e = shape.block_elems();
                    let w = &want[id as usize * e..(id as usize + 1) * e];
                    let got = widen(h, to, e);
                    let same = same_bits(&got, w);
                    assert!(
                        same,
                        "seed {seed}: {dtype:?} pool exported as {to:?}: {shape:?}: block {id} \
                         differs after append + export"
                    );
                }
            }
        }
    }
    eprintln!("seed {seed}: append + export exact for f32, f16, bf16 pools");
}

/// A block imported in the pool's dtype (a far block fetched from a bf16 host tier) lands bit for
/// bit; one imported as f32 is rounded to nearest even on the way.
#[test]
fn imports_in_the_pool_dtype_land_as_they_are() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    let shape = KvBlockShape {
        kv_heads: 2,
        block_tokens: 8,
        head_dim: 64,
    };
    let e = shape.block_elems();
    for dtype in [DType::F16, DType::BF16] {
        let mut pool = gpu.kv_pool(dtype, shape, 3).unwrap();
        let wide = rng.vec_scaled(2 * e, 4.0);
        let stored = strata_kernels::KvBuf::from_f32(dtype, &wide[..e]);
        gpu.kv_pool_write_kv(&mut pool, 1, stored.as_slice())
            .unwrap();
        gpu.kv_pool_write(&mut pool, 2, &wide[e..]).unwrap();
        let mut host = vec![0u32; e];
        let dst = [host.as_mut_ptr().cast::<u8>()];
        for (id, src) in [(1u32, &wide[..e]), (2, &wide[e..])] {
            // SAFETY: the buffer outlives the ticket, waited on before it is read.
            unsafe { gpu.kv_export_async(&pool, &[id], &dst, dtype) }
                .unwrap()
                .wait()
                .unwrap();
            let got = widen(&host, dtype, e);
            let same = got
                .iter()
                .zip(src)
                .all(|(g, w)| g.to_bits() == round(*w, dtype).to_bits());
            assert!(
                same,
                "seed {seed}: {dtype:?}: block {id} differs after import"
            );
        }
    }
}

/// Rows read by the SMs straight from page-locked host memory mapped for the device (hidden
/// states in host slots), bit for bit and in the order asked, at any row offset; memory that is
/// not mapped has no device address, and an address that is not an f32's is refused.
#[test]
fn rows_gathered_from_mapped_host_memory_are_exact() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    let (width, rows) = (96, 40);
    let mut host = rng.vec_scaled(width * rows + 7, 4.0);
    let base = host.as_mut_ptr().cast::<u8>();
    assert_eq!(gpu.mapped_device_ptr(base), None, "not registered yet");
    // SAFETY: `host` is owned here, outlives the registration, and is not written while
    // registered.
    let reg = unsafe { gpu.register_host(base, std::mem::size_of_val(host.as_slice())) }.unwrap();
    let dev = gpu.mapped_device_ptr(base).unwrap();
    // Rows 16-byte aligned (read 16 bytes a load): every other row, last first. Then the same
    // with one row 7 values in (read a value a load).
    let skip = (0..4).find(|s| (dev + 4 * s) % 16 == 0).unwrap() as usize;
    let mut at: Vec<usize> = (0..rows - 1)
        .rev()
        .step_by(2)
        .map(|r| skip + r * width)
        .collect();
    for odd in [false, true] {
        if odd {
            at.push(7);
        }
        let addrs: Vec<u64> = at.iter().map(|&i| dev + 4 * i as u64).collect();
        // SAFETY: each row lies inside the registered, mapped `host`, read before it is dropped.
        let got = unsafe { gpu.gather_rows_f32(&addrs, width) }.unwrap();
        let got = gpu.to_host(&got).unwrap();
        for (r, &i) in at.iter().enumerate() {
            assert!(
                same_bits(&got[r * width..(r + 1) * width], &host[i..i + width]),
                "seed {seed}: row {r} (value {i}, odd {odd}) differs"
            );
        }
    }
    // SAFETY: refused before anything is read.
    assert!(unsafe { gpu.gather_rows_f32(&[dev + 2], width) }.is_err());
    drop(reg);
}

/// Pieces of page-locked host memory a pitch apart (hidden states of full blocks, a slot apart)
/// copied beside the compute stream land one after another, bit for bit, for the compute stream
/// once it is ordered after the copy; pieces that would overlap are refused.
#[test]
fn host_pieces_copied_beside_the_compute_stream_are_exact() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    let (width, piece_rows) = (64, 4);
    let piece = width * piece_rows;
    let mut host = rng.vec_scaled(piece * 20, 4.0);
    let base = host.as_mut_ptr().cast::<u8>();
    // SAFETY: `host` is owned here, outlives the registration, and is not written while
    // registered.
    let reg = unsafe { gpu.register_host(base, std::mem::size_of_val(host.as_slice())) }.unwrap();
    // Pieces 2, 5, 8 (3 pieces apart), then 19 alone, then 10 and 11 (adjacent).
    let at = |p: usize| base.wrapping_add(4 * p * piece).cast_const();
    let runs = [
        (at(2), 3 * 4 * piece, 3),
        (at(19), 4 * piece, 1),
        (at(10), 4 * piece, 2),
    ];
    // SAFETY: every piece lies in the registered `host`, which is read before it is dropped.
    let got = unsafe { gpu.copy_host_pieces_beside(&runs, piece_rows, width) }.unwrap();
    let x = gpu.to_host(got.ready().unwrap()).unwrap();
    for (i, p) in [2, 5, 8, 19, 10, 11].into_iter().enumerate() {
        assert!(
            same_bits(
                &x[i * piece..(i + 1) * piece],
                &host[p * piece..(p + 1) * piece]
            ),
            "seed {seed}: piece {i} (host piece {p}) differs"
        );
    }
    drop(got);
    let overlapping = [(at(0), 4 * piece - 4, 2)];
    // SAFETY: refused before anything is read.
    assert!(unsafe { gpu.copy_host_pieces_beside(&overlapping, piece_rows, width) }.is_err());
    drop(reg);
}

#[test]
fn bad_slots_and_shapes_are_errors() {
    let Some(gpu) = test_gpu() else { return };
    let shape = KvBlockShape {
        kv_heads: 2,
        block_tokens: 4,
        head_dim: 8,
    };
    let mut pool = gpu.kv_pool(DType::BF16, shape, 2).unwrap();
    let k = gpu.tensor(1, 16, vec![1.0; 16]).unwrap();
    let err = gpu.kv_append(&mut pool, &k, &k, &[8]).unwrap_err();
    assert!(err.to_string().contains("past the pool"), "{err}");
    let short = gpu.tensor(1, 8, vec![1.0; 8]).unwrap();
    let err = gpu.kv_append(&mut pool, &short, &short, &[0]).unwrap_err();
    assert!(err.to_string().contains("expected [1, 16]"), "{err}");
    let mut buf = vec![0f32; shape.block_elems()];
    let dst = [buf.as_mut_ptr().cast::<u8>()];
    // SAFETY: the buffer outlives the calls (which fail before copying anything).
    let err = unsafe { gpu.kv_export_async(&pool, &[2], &dst, DType::BF16) }.unwrap_err();
    assert!(err.to_string().contains("past the pool"), "{err}");
    // A bf16 pool does not narrow to f16 on the way out.
    let err = unsafe { gpu.kv_export_async(&pool, &[0], &dst, DType::F16) }.unwrap_err();
    assert!(err.to_string().contains("not f16"), "{err}");
}

#[test]
fn argmax_picks_the_first_maximum_of_each_row() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    for (rows, cols) in [(1, 1), (3, 7), (64, 128_256), (5, 1000)] {
        let mut x = rng.vec(rows * cols);
        // Ties: copy each row's maximum to a later and an earlier column.
        for r in 0..rows {
            let row = &mut x[r * cols..(r + 1) * cols];
            let (at, &m) = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap();
            row[cols - 1] = m;
            row[at / 2] = m;
            // A NaN elsewhere never wins (not in the first column, where the CPU's scan
            // starts: it keeps a NaN found there).
            if let Some(j) = (1..cols).find(|&j| j != at && j != at / 2 && j != cols - 1) {
                row[j] = f32::NAN;
            }
        }
        let t = gpu.tensor(rows, cols, x.clone()).unwrap();
        let got = gpu.argmax_rows(&t).unwrap();
        let want = strata_kernels::CpuBackend::new()
            .argmax_rows(
                &strata_kernels::CpuBackend::new()
                    .tensor(rows, cols, x)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(got, want, "seed {seed}: [{rows}, {cols}]");
    }
}

#[test]
fn copies_on_the_copy_stream_round_trip_and_are_counted() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    // A small upload (counted, untimed) and one past TIMED_UPLOAD_MIN (timed), both through
    // the upload ring, its slots reused many times over.
    for cols in [1000, 30_000] {
        let before = gpu.copy_stats().unwrap();
        let mut last = None;
        for _ in 0..40 {
            let data = rng.vec(3 * cols);
            let t = gpu.upload(3, cols, &data).unwrap();
            // A kernel on the compute stream reads the uploaded tensor: it must see the values.
            let mut doubled = gpu.zeros(3, cols).unwrap();
            gpu.add_inplace(&mut doubled, &t).unwrap();
            gpu.add_inplace(&mut doubled, &t).unwrap();
            last = Some((doubled, data));
        }
        let (doubled, data) = last.unwrap();
        let back = gpu.download(&doubled).unwrap();
        let want: Vec<f32> = data.iter().map(|x| x + x).collect();
        assert_eq!(back, want);
        let after = gpu.copy_stats().unwrap();
        let bytes = 40 * 12 * cols as u64;
        // At least: the tests of this binary share one backend, and others upload meanwhile.
        if 12 * cols < strata_kernels::cuda::TIMED_UPLOAD_MIN {
            assert!(
                after.h2d_small_bytes >= before.h2d_small_bytes + bytes,
                "{after:?}"
            );
        } else {
            assert!(after.h2d_bytes >= before.h2d_bytes + bytes, "{after:?}");
            assert!(after.h2d_seconds > before.h2d_seconds, "{after:?}");
        }
        assert!(
            after.d2h_bytes >= before.d2h_bytes + 12 * cols as u64,
            "{after:?}"
        );
        assert!(after.d2h_seconds > before.d2h_seconds, "{after:?}");
    }
}

/// Blocks written without waiting, one slice each, in pieces through the upload staging ring
/// (over 8 MiB here, so more than one piece), land bit for bit where the synchronous write puts
/// them; blocks in another dtype than the pool's are rounded on the way, as the synchronous write
/// rounds them; a block of the wrong size is refused.
#[test]
fn asynchronous_imports_land_like_synchronous_ones() {
    let Some(gpu) = test_gpu() else { return };
    let seed = test_seed();
    let mut rng = Rng(seed);
    let shape = KvBlockShape {
        kv_heads: 8,
        block_tokens: 32,
        head_dim: 128,
    };
    let e = shape.block_elems();
    let n = 80;
    for dtype in [DType::F16, DType::BF16] {
        let mut sync_pool = gpu.kv_pool(dtype, shape, n + 3).unwrap();
        let mut async_pool = gpu.kv_pool(dtype, shape, n + 3).unwrap();
        let wide = rng.vec_scaled(n * e, 4.0);
        let stored = strata_kernels::KvBuf::from_f32(dtype, &wide);
        assert!(stored.size_bytes() > 8 << 20, "one piece only");
        gpu.kv_pool_write_kv(&mut sync_pool, 2, stored.as_slice())
            .unwrap();
        let blocks: Vec<_> = (0..n)
            .map(|i| stored.as_slice().slice(i * e..(i + 1) * e))
            .collect();
        gpu.kv_pool_write_blocks_async(&mut async_pool, 2, &blocks)
            .unwrap();
        drop(blocks);
        drop(stored);
        // A block of f32 values into the pool's dtype: the synchronous path, rounded.
        let f32_block = strata_kernels::KvBuf::from_f32(DType::F32, &wide[..e]);
        gpu.kv_pool_write_kv(&mut sync_pool, n + 2, f32_block.as_slice())
            .unwrap();
        gpu.kv_pool_write_blocks_async(&mut async_pool, n + 2, &[f32_block.as_slice()])
            .unwrap();
        let short = f32_block.as_slice().slice(0..e - 8);
        assert!(
            gpu.kv_pool_write_blocks_async(&mut async_pool, 0, &[short])
                .is_err()
        );
        let ids: Vec<u32> = (2..n as u32 + 3).collect();
        // Each block's bytes in the pool's dtype, one after another.
        let words = e * dtype.size_bytes() / 4;
        let mut got = [vec![0u32; ids.len() * words], vec![0u32; ids.len() * words]];
        for (pool, host) in [&sync_pool, &async_pool].into_iter().zip(&mut got) {
            let dst: Vec<*mut u8> = host
                .chunks_mut(words)
                .map(|b| b.as_mut_ptr().cast::<u8>())
                .collect();
            // SAFETY: the buffers outlive the ticket, waited on before they are read.
            unsafe { gpu.kv_export_async(pool, &ids, &dst, dtype) }
                .unwrap()
                .wait()
                .unwrap();
        }
        let bits = |h: &[u32]| {
            widen(h, dtype, ids.len() * e)
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert!(
            bits(&got[0]) == bits(&got[1]),
            "seed {seed}: {dtype:?}: blocks written without waiting differ"
        );
        let want: Vec<u32> = wide[..n * e]
            .iter()
            .chain(&wide[..e])
            .map(|w| round(*w, dtype).to_bits())
            .collect();
        assert!(
            bits(&got[1]) == want,
            "seed {seed}: {dtype:?}: blocks are not the values written"
        );
    }
}
