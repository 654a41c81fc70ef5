//! Every CUDA op against the scalar reference (f64) and the CPU backend, on random inputs fresh
//! per run (the seed is printed; `STRATA_TEST_SEED` replays one), several shapes including odd
//! sizes and sizes that straddle a block (256 threads), a warp (32) and the GEMV/GEMM switch
//! (8 rows), with every output poisoned (NaN) before the kernel that must write it.
//!
//! Tolerances, relative to the largest |value| of the expected output:
//! - `linear`, f32 weights (cuBLAS SGEMM) and f16/bf16 weights up to 8 rows (GEMV kernel, f32
//!   activations): 1e-5 against the f64 reference.
//! - `linear`, f16/bf16 weights over 8 rows (activation split into two half-precision terms,
//!   two GEMMs on cuBLASLt, autotuned, or cuBLAS GemmEx, f32 output): 2e-5 against the f64
//!   reference, on both libraries.
//! - `linear` in `GemmPrecision::Rounded` (activation rounded once to the weight dtype, one
//!   GEMM): 2e-5 against the CPU backend fed the same rounded activation; against the CPU
//!   backend fed the f32 activation, per element `|Δ| ≤ (u + 2k·2⁻²⁴) · Σᵢ|xᵢ·wⱼᵢ|` with
//!   `u = 2⁻⁸` (bf16) or `2⁻¹¹` (f16), the bound of one rounding plus f32 accumulation.
//!
//! Measured on an H100 (CUDA 13.0): f32 2.7e-7; f16/bf16 GEMV 1.0e-7; f16 split GEMM 9.6e-7,
//! bf16 split GEMM 2.3e-6; RoPE 1.8e-7 against the CPU backend.
//! - RMSNorm, LayerNorm: 1e-5; SwiGLU, softmax: 1e-6; RoPE: 2e-6 against the CPU backend (the
//!   same f32 angle; only cosf/sinf ulps differ) and 1e-3 against the f64 reference, as on the
//!   CPU; embedding, gather_rows, ReLU and add: exact.
//!
//! Without a GPU (or driver, NVRTC, cuBLAS) every test prints `skipped: <reason>` and passes.

#![allow(clippy::unwrap_used)]

use strata_kernels::cuda::{GemmChoice, GemmTuning, KernelOrigin, LT_MIN_ROWS, LtFallback};
use strata_kernels::testing::{
    SplitMix as Rng, max_rel_err, rope_scalings, same_bits, test_gpu, test_seed,
};
use strata_kernels::{
    Backend, CpuBackend, CudaBackend, DType, GemmBackend, GemmPrecision, HostWeight, RopeScaling,
    RopeTable, WeightData, reference,
};

fn up(gpu: &CudaBackend, rows: usize, cols: usize, data: &[f32]) -> strata_kernels::CudaTensor {
    gpu.tensor(rows, cols, data.to_vec()).unwrap()
}

#[test]
fn linear_matches_reference_for_every_dtype_path_and_shape() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (mut worst_gemv, mut worst_gemm) = (0.0f32, 0.0f32);
        for (m, k, n) in [
            (1, 1, 1),
            (1, 64, 63),
            (3, 37, 129),
            (8, 100, 33),
            // The GEMV's 16-byte path (k a multiple of 8) at every column grouping, and a split k.
            (2, 264, 65),
            (3, 264, 65),
            (5, 1024, 97),
            (8, 4096, 130),
            (9, 96, 65),
            (17, 96, 64),
            (33, 255, 257),
            (64, 512, 384),
        ] {
            for with_bias in [false, true] {
                let w = rng.weight(n, k, dtype);
                let b = HostWeight::vector(WeightData::F32(rng.vec(n)).cast(dtype));
                let x = rng.vec(m * k);
                let bias = with_bias.then_some(&b);
                let want = reference::linear(&x, m, &w, bias);
                let (wg, bg) = (
                    gpu.upload_weight(w.clone()).unwrap(),
                    gpu.upload_weight(b.clone()).unwrap(),
                );
                let got = gpu
                    .linear(&up(gpu, m, k, &x), &wg, with_bias.then_some(&bg))
                    .unwrap();
                assert_eq!(gpu.shape(&got), (m, n));
                let err = max_rel_err(&gpu.to_host(&got).unwrap(), &want);
                let (tol, worst) = if dtype == DType::F32 || m <= 8 {
                    (1e-5, &mut worst_gemv)
                } else {
                    (2e-5, &mut worst_gemm)
                };
                *worst = worst.max(err);
                assert!(
                    err < tol,
                    "{dtype:?} m={m} k={k} n={n} bias={with_bias}: rel err {err:.2e} (tol {tol:.0e})"
                );
            }
        }
        if dtype == DType::F32 {
            eprintln!("linear F32: max rel err {worst_gemv:.2e} (SGEMM)");
        } else {
            eprintln!(
                "linear {dtype:?}: max rel err {worst_gemv:.2e} (≤ 8 rows, GEMV), \
                 {worst_gemm:.2e} (> 8 rows, split GEMM on {})",
                gpu.gemm_backend()
            );
        }
    }
}

#[test]
fn linear_edge_shapes_and_errors() {
    let Some(gpu) = test_gpu() else { return };
    let w = gpu
        .upload_weight(HostWeight::new(2, 3, WeightData::F32(vec![1.0; 6])).unwrap())
        .unwrap();
    let x = gpu.tensor(1, 4, vec![0.0; 4]).unwrap();
    assert!(gpu.linear(&x, &w, None).is_err(), "k mismatch");
    let empty = gpu.tensor(0, 3, vec![]).unwrap();
    let out = gpu.linear(&empty, &w, None).unwrap();
    assert_eq!(gpu.shape(&out), (0, 2));
    assert!(gpu.to_host(&out).unwrap().is_empty());
    // k = 0: the product is empty, the output is the bias.
    let w0 = gpu
        .upload_weight(HostWeight::new(2, 0, WeightData::BF16(vec![])).unwrap())
        .unwrap();
    let b = gpu
        .upload_weight(HostWeight::vector(WeightData::F32(vec![1.5, -2.0])))
        .unwrap();
    let out = gpu
        .linear(&gpu.tensor(3, 0, vec![]).unwrap(), &w0, Some(&b))
        .unwrap();
    assert_eq!(
        gpu.to_host(&out).unwrap(),
        [1.5, -2.0, 1.5, -2.0, 1.5, -2.0]
    );
    assert!(gpu.deferred_error().is_none());
}

#[test]
fn norms_activations_softmax_match_reference() {
    let Some(gpu) = test_gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng(test_seed());
    for (rows, cols) in [(1, 1), (1, 7), (4, 64), (9, 576), (3, 4097), (300, 33)] {
        for wdtype in [DType::F32, DType::BF16] {
            let x = rng.vec(rows * cols);
            let w = HostWeight::vector(WeightData::F32(rng.vec(cols)).cast(wdtype));
            let b = HostWeight::vector(WeightData::F32(rng.vec(cols)).cast(wdtype));
            let (wf, bf) = (w.data.to_f32_vec(), b.data.to_f32_vec());
            let (wg, bg) = (
                gpu.upload_weight(w.clone()).unwrap(),
                gpu.upload_weight(b.clone()).unwrap(),
            );
            let t = up(gpu, rows, cols, &x);
            let what = format!("[{rows}, {cols}] {wdtype:?}");

            let got = gpu.to_host(&gpu.rms_norm(&t, &wg, 1e-5).unwrap()).unwrap();
            let err = max_rel_err(&got, &reference::rms_norm(&x, cols, &wf, 1e-5));
            assert!(err < 1e-5, "rms_norm {what}: {err:.2e}");
            let got = gpu
                .to_host(&gpu.layer_norm(&t, &wg, &bg, 1e-5).unwrap())
                .unwrap();
            let err = max_rel_err(&got, &reference::layer_norm(&x, cols, &wf, &bf, 1e-5));
            assert!(err < 1e-5, "layer_norm {what}: {err:.2e}");
        }
        let x = rng.vec(rows * cols);
        let u = rng.vec(rows * cols);
        let (t, ut) = (up(gpu, rows, cols, &x), up(gpu, rows, cols, &u));
        let got = gpu.to_host(&gpu.swiglu(&t, &ut).unwrap()).unwrap();
        let err = max_rel_err(&got, &reference::swiglu(&x, &u));
        assert!(err < 1e-6, "swiglu [{rows}, {cols}]: {err:.2e}");

        let mut r = up(gpu, rows, cols, &x);
        gpu.relu_inplace(&mut r).unwrap();
        assert_eq!(gpu.to_host(&r).unwrap(), reference::relu(&x), "relu");

        let mut a = up(gpu, rows, cols, &x);
        gpu.add_inplace(&mut a, &ut).unwrap();
        let want: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + b).collect();
        assert_eq!(gpu.to_host(&a).unwrap(), want, "add");

        // Softmax over logits of realistic spread.
        let logits: Vec<f32> = x.iter().map(|v| v * 20.0).collect();
        let mut s = up(gpu, rows, cols, &logits);
        gpu.softmax_inplace(&mut s).unwrap();
        let err = max_rel_err(
            &gpu.to_host(&s).unwrap(),
            &reference::softmax(&logits, cols),
        );
        assert!(err < 1e-6, "softmax [{rows}, {cols}]: {err:.2e}");

        // The CPU backend agrees too (same formulas, different summation order).
        let ct = cpu.tensor(rows, cols, x.clone()).unwrap();
        let cw = HostWeight::vector(WeightData::F32(vec![1.0; cols]));
        let want = cpu.rms_norm(&ct, &cw, 1e-6).unwrap().data;
        let got = gpu
            .rms_norm(&t, &gpu.upload_weight(cw).unwrap(), 1e-6)
            .unwrap();
        assert!(max_rel_err(&gpu.to_host(&got).unwrap(), &want) < 1e-5);
    }
    let t = gpu.tensor(2, 3, vec![0.0; 6]).unwrap();
    let short = gpu
        .upload_weight(HostWeight::vector(WeightData::F32(vec![1.0; 2])))
        .unwrap();
    assert!(gpu.rms_norm(&t, &short, 1e-5).is_err(), "weight length");
    let mut a = gpu.tensor(2, 3, vec![0.0; 6]).unwrap();
    assert!(
        gpu.add_inplace(&mut a, &gpu.tensor(1, 3, vec![0.0; 3]).unwrap())
            .is_err()
    );
    assert!(gpu.deferred_error().is_none());
}

/// Uploads of every size class arrive bit for bit: under 16 bytes (the copy kernel's byte tail
/// only), odd sizes, and either side of the size past which a copy engine takes over; 40 of them
/// in flight at once, so the staging ring wraps around while earlier copies may still be queued.
#[test]
fn uploads_arrive_exact_at_every_size() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    let sizes = [1usize, 3, 4, 5, 17, 1000, 1 << 18, (1 << 18) + 1];
    let mut sent = Vec::new();
    for i in 0..40 {
        let n = sizes[i % sizes.len()];
        let x = rng.vec(n);
        sent.push((gpu.tensor(1, n, x.clone()).unwrap(), x));
    }
    for (t, x) in &sent {
        let got = gpu.to_host(t).unwrap();
        assert!(same_bits(&got, x), "upload of {} values", x.len());
    }
    // Small weights take the same path; f16 of odd length ends mid-word.
    let w = rng.weight(3, 5, DType::F16);
    let wg = gpu.upload_weight(w.clone()).unwrap();
    let rows = gpu.embedding(&wg, &[2, 0, 1]).unwrap();
    assert_eq!(
        gpu.to_host(&rows).unwrap(),
        reference::embedding(&w, &[2, 0, 1])
    );
}

#[test]
fn embedding_and_gather_rows_are_exact() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng(test_seed());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (vocab, dim) in [(50, 24), (1000, 577), (3, 1)] {
            let table = rng.weight(vocab, dim, dtype);
            let ids: Vec<u32> = (0..37).map(|i| (i * 7919 % vocab) as u32).collect();
            let tg = gpu.upload_weight(table.clone()).unwrap();
            let got = gpu.embedding(&tg, &ids).unwrap();
            assert_eq!(gpu.shape(&got), (ids.len(), dim));
            assert_eq!(
                gpu.to_host(&got).unwrap(),
                reference::embedding(&table, &ids),
                "{dtype:?}"
            );
            assert!(
                matches!(
                    gpu.embedding(&tg, &[vocab as u32]),
                    Err(strata_kernels::KernelError::TokenOutOfRange { .. })
                ),
                "out-of-range id is an error"
            );
        }
    }
    let x = rng.vec(9 * 13);
    let t = up(gpu, 9, 13, &x);
    let rows = [8usize, 0, 3, 3];
    let got = gpu.gather_rows(&t, &rows).unwrap();
    let want: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * 13..(r + 1) * 13].to_vec())
        .collect();
    assert_eq!(gpu.to_host(&got).unwrap(), want);
    assert!(gpu.gather_rows(&t, &[9]).is_err());
    assert_eq!(gpu.shape(&gpu.gather_rows(&t, &[]).unwrap()), (0, 13));
}

#[test]
fn rope_matches_cpu_with_and_without_scaling() {
    let Some(gpu) = test_gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng(test_seed());
    let scalings = rope_scalings();
    let mut worst = (0.0f32, 0.0f32);
    for scaling in &scalings {
        for (heads, hd) in [(1, 2), (3, 16), (4, 64), (9, 128)] {
            let table = RopeTable::new(hd, 10000.0, scaling);
            // Far positions are checked against the CPU only: their f32 angle is off by up to
            // half an ulp of the position (4e-3 rad at 131071) on both, as in transformers.
            for (positions, check_ref) in [
                (&[0usize, 1, 5, 1000, 4097][..], true),
                (&[65537usize, 131071][..], false),
            ] {
                let x = rng.vec(positions.len() * heads * hd);
                let mut g = up(gpu, positions.len(), heads * hd, &x);
                gpu.rope(&mut g, heads, positions, &table).unwrap();
                let got = gpu.to_host(&g).unwrap();
                let mut c = cpu.tensor(positions.len(), heads * hd, x.clone()).unwrap();
                cpu.rope(&mut c, heads, positions, &table).unwrap();
                let what = format!("{scaling:?} heads={heads} hd={hd} positions={positions:?}");
                let vs_cpu = max_rel_err(&got, &c.data);
                worst.0 = worst.0.max(vs_cpu);
                assert!(vs_cpu < 2e-6, "{what}: vs CPU {vs_cpu:.2e}");
                if check_ref {
                    let vs_ref = max_rel_err(&got, &reference::rope(&x, positions, &table));
                    worst.1 = worst.1.max(vs_ref);
                    assert!(vs_ref < 1e-3, "{what}: vs reference {vs_ref:.2e}");
                }
            }
        }
    }
    eprintln!(
        "rope: max rel err {:.2e} vs CPU, {:.2e} vs f64 reference",
        worst.0, worst.1
    );
    let table = RopeTable::new(8, 10000.0, &RopeScaling::None);
    let mut t = gpu.tensor(2, 16, vec![0.0; 32]).unwrap();
    assert!(gpu.rope(&mut t, 2, &[0], &table).is_err(), "positions");
    assert!(gpu.rope(&mut t, 3, &[0, 1], &table).is_err(), "heads");
}

/// A cached kernel module is reused; a corrupted entry, or one the driver refuses, is compiled
/// again and rewritten.
#[test]
fn ptx_cache_hits_and_recovers_from_bad_entries() {
    let Some(_) = test_gpu() else { return };
    let dir = std::env::temp_dir().join(format!("strata-ptx-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || CudaBackend::with_ptx_cache(0, Some(dir.clone())).unwrap();
    let first = open();
    let KernelOrigin::Compiled {
        cached_at: Some(path),
        seconds,
    } = first.kernel_origin().clone()
    else {
        panic!(
            "first open must compile and cache: {}",
            first.kernel_origin()
        )
    };
    eprintln!("ptx cache: compiled + loaded in {seconds:.2} s");
    assert!(matches!(open().kernel_origin(), KernelOrigin::Cache { .. }));

    // Torn entry (checksum mismatch).
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(matches!(
        open().kernel_origin(),
        KernelOrigin::Compiled { .. }
    ));
    // An entry with a valid checksum but PTX the driver refuses.
    let bad = "this is not PTX\n";
    let header = text.split_once('\n').unwrap().0;
    let sum = format!("{:016x}", fnv1a64(bad.as_bytes()));
    let forged = format!("{}{sum}\n{bad}", &header[..header.len() - 16]);
    std::fs::write(&path, forged).unwrap();
    let again = open();
    assert!(matches!(
        again.kernel_origin(),
        KernelOrigin::Compiled { .. }
    ));
    // ...and the rewritten entry works.
    assert!(matches!(open().kernel_origin(), KernelOrigin::Cache { .. }));
    let x = again.tensor(1, 3, vec![-1.0, 0.0, 2.0]).unwrap();
    let mut y = again.tensor(1, 3, vec![0.5; 3]).unwrap();
    again.add_inplace(&mut y, &x).unwrap();
    assert_eq!(again.to_host(&y).unwrap(), [-0.5, 0.5, 2.5]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cache checksum (64-bit FNV-1a of the PTX), as `compile.rs` computes it for one part.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes.iter().chain(&[0xffu8]) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[test]
fn missing_devices_are_errors_not_panics() {
    match CudaBackend::new(usize::MAX) {
        Ok(_) => panic!("device usize::MAX cannot exist"),
        Err(e) => eprintln!("device usize::MAX: {e}"),
    }
    if let Some(gpu) = test_gpu() {
        let (free, total) = gpu.memory_info().unwrap();
        assert!(free <= total && total > 0);
    }
}

/// `GemmPrecision::Rounded` against the CPU backend: it is exactly the GEMM of the activation
/// rounded once to the weight dtype (round to nearest even), so against the f32 activation each
/// output stays within one rounding's bound, `u · Σᵢ|xᵢ·wⱼᵢ|` (bf16 `u = 2⁻⁸`, f16 `u = 2⁻¹¹`),
/// plus f32 accumulation on both sides (`2k · 2⁻²⁴ · Σᵢ|xᵢ·wⱼᵢ|`). `Split` stays within 2e-5 of
/// the f64 reference, and the GEMV path (≤ 8 rows) is the same in both modes.
#[test]
fn linear_rounded_mode_is_one_rounding_of_the_activation() {
    let Some(_) = test_gpu() else { return };
    // A backend of its own: the mode is per backend, and the shared one serves other tests in
    // parallel.
    let gpu = CudaBackend::new(0).unwrap();
    gpu.poison_outputs(true);
    assert_eq!(gpu.gemm_precision(), GemmPrecision::Split, "default");
    let cpu = CpuBackend::new();
    let mut rng = Rng(test_seed());
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let (mut worst_split, mut worst_same_x, mut worst_exact) = (0.0f32, 0.0f32, 0.0f32);
        let mut worst_of_bound = 0.0f64;
        for (m, k, n) in [
            (8, 100, 33),
            (9, 96, 65),
            (17, 96, 64),
            (33, 255, 257),
            (64, 512, 384),
            (200, 4096, 256),
        ] {
            let what = format!("{dtype:?} m={m} k={k} n={n}");
            let w = rng.weight(n, k, dtype);
            let x = rng.vec(m * k);
            let x_rounded = WeightData::F32(x.clone()).cast(dtype).to_f32_vec();
            let on_cpu = |x: &[f32]| {
                let t = cpu.tensor(m, k, x.to_vec()).unwrap();
                cpu.linear(&t, &w, None).unwrap().data
            };
            let (want, want_rounded) = (on_cpu(&x), on_cpu(&x_rounded));
            let wg = gpu.upload_weight(w.clone()).unwrap();
            let xg = up(&gpu, m, k, &x);
            let run = |p: GemmPrecision| {
                gpu.set_gemm_precision(p);
                assert_eq!(gpu.gemm_precision(), p);
                gpu.to_host(&gpu.linear(&xg, &wg, None).unwrap()).unwrap()
            };
            let split = run(GemmPrecision::Split);
            let rounded = run(GemmPrecision::Rounded);
            gpu.set_gemm_precision(GemmPrecision::Split);

            let err = max_rel_err(&split, &reference::linear(&x, m, &w, None));
            worst_split = worst_split.max(err);
            assert!(err < 2e-5, "{what}: Split rel err {err:.2e}");
            if m <= 8 {
                // GEMV: f32 activations in both modes.
                assert_eq!(rounded, split, "{what}: GEMV differs between modes");
                continue;
            }
            let err = max_rel_err(&rounded, &want_rounded);
            worst_same_x = worst_same_x.max(err);
            assert!(err < 2e-5, "{what}: Rounded vs CPU on rounded x: {err:.2e}");
            let err = max_rel_err(&rounded, &want);
            worst_exact = worst_exact.max(err);
            // The rounding really happens: one rounding is far coarser than Split's 2e-5.
            assert!(err > 2e-5, "{what}: Rounded looks unrounded ({err:.2e})");

            let wf = w.data.to_f32_vec();
            let acc = 2.0 * k as f64 * 2f64.powi(-24);
            for r in 0..m {
                for j in 0..n {
                    let xr = &x[r * k..(r + 1) * k];
                    let wr = &wf[j * k..(j + 1) * k];
                    let s: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let d = (rounded[r * n + j] as f64 - want[r * n + j] as f64).abs();
                    assert!(
                        d <= (u + acc) * s,
                        "{what} [{r}, {j}]: |Δ| {d:.3e} > bound {:.3e}",
                        (u + acc) * s
                    );
                    worst_of_bound = worst_of_bound.max(d / (u * s));
                }
            }
        }
        eprintln!(
            "linear {dtype:?} Rounded: {worst_same_x:.2e} vs CPU on the rounded activation, \
             {worst_exact:.2e} vs CPU on f32 (largest |Δ| = {worst_of_bound:.3} of u·Σ|x·w|); \
             Split {worst_split:.2e} vs f64 reference"
        );
    }
    assert!(gpu.deferred_error().is_none());
}

/// RMSNorm and SwiGLU write their output's GEMM operands in the same pass when f16/bf16 matrix
/// weights are in use and the output has more rows than the GEMV takes: the f32 outputs are
/// unchanged, and a `linear` over them gives bit-for-bit what it gives after converting the same
/// tensor itself (`forget_operands`), in both precision modes. At GEMV sizes nothing is written.
#[test]
fn producers_write_gemm_operands_identical_to_converting() {
    let Some(_) = test_gpu() else { return };
    // A backend of its own: the GEMM mode and the operand dtype are per backend.
    let gpu = CudaBackend::new(0).unwrap();
    gpu.poison_outputs(true);
    let mut rng = Rng(test_seed());
    for dtype in [DType::BF16, DType::F16] {
        for mode in [GemmPrecision::Rounded, GemmPrecision::Split] {
            gpu.set_gemm_precision(mode);
            for (m, k, n) in [(8, 96, 64), (9, 96, 65), (33, 255, 130), (200, 1024, 256)] {
                let what = format!("{dtype:?} {mode:?} m={m} k={k} n={n}");
                let w = gpu.upload_weight(rng.weight(n, k, dtype)).unwrap();
                let norm_host = HostWeight::vector(WeightData::F32(rng.vec(k)));
                let norm_w = gpu.upload_weight(norm_host.clone()).unwrap();
                let x = up(&gpu, m, k, &rng.vec(m * k));
                let (g, u) = (
                    up(&gpu, m, k, &rng.vec(m * k)),
                    up(&gpu, m, k, &rng.vec(m * k)),
                );
                for (name, mut y) in [
                    ("rms_norm", gpu.rms_norm(&x, &norm_w, 1e-5).unwrap()),
                    ("swiglu", gpu.swiglu(&g, &u).unwrap()),
                ] {
                    let fused = gpu.to_host(&gpu.linear(&y, &w, None).unwrap()).unwrap();
                    y.forget_operands();
                    let converted = gpu.to_host(&gpu.linear(&y, &w, None).unwrap()).unwrap();
                    assert!(
                        same_bits(&fused, &converted),
                        "{what}: {name}'s operands differ from converting its output"
                    );
                }
                let cpu = CpuBackend::new();
                let x_cpu = cpu.tensor(m, k, gpu.to_host(&x).unwrap()).unwrap();
                let norm_cpu = cpu.upload_weight(norm_host).unwrap();
                let want = cpu.rms_norm(&x_cpu, &norm_cpu, 1e-5).unwrap().data;
                let got = gpu
                    .to_host(&gpu.rms_norm(&x, &norm_w, 1e-5).unwrap())
                    .unwrap();
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-5, "{what}: rms_norm output {err:.2e} from the CPU");
            }
        }
    }
}

/// The f16/bf16 GEMM on cuBLASLt (autotuned on first use) and on cuBLAS GemmEx, in both precision
/// modes, on odd sizes: each within the tolerances above (Split against the f64 reference,
/// Rounded against the CPU backend on the rounded activation), and a second call of a tuned
/// shape bit-identical to the first (the tuning's timing runs leave nothing behind). Shapes whose
/// `k` is not a multiple of 8 fall back to GemmEx, and the tuning table says so; aligned ones run
/// on cuBLASLt or, where it timed faster, GemmEx; fewer than `LT_MIN_ROWS` rows are not tuned.
/// Without libcublasLt both runs are GemmEx, and the test says so.
#[test]
fn linear_lt_autotuned_and_gemmex_match_reference() {
    let Some(_) = test_gpu() else { return };
    // A backend of its own: the GEMM library and mode are per backend.
    let gpu = CudaBackend::new(0).unwrap();
    gpu.poison_outputs(true);
    let lt_available = match gpu.lt_unavailable() {
        None => true,
        Some(why) => {
            eprintln!("cuBLASLt unavailable ({why}): both runs use GemmEx");
            false
        }
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng(test_seed());
    // (m, k, n, aligned): k % 8 != 0 is the GemmEx fallback; n any. Fewer than LT_MIN_ROWS rows
    // run on GemmEx untuned.
    let shapes = [
        (17, 96, 65, true),
        (33, 4096, 130, true),
        (512, 256, 257, true),
        (600, 512, 1000, true),
        (600, 1024, 333, true),
        (1000, 4096, 130, true),
        (600, 100, 33, false),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for (m, k, n, aligned) in shapes {
            let w = rng.weight(n, k, dtype);
            let x = rng.vec(m * k);
            let x_rounded = WeightData::F32(x.clone()).cast(dtype).to_f32_vec();
            let want_split = reference::linear(&x, m, &w, None);
            let t = cpu.tensor(m, k, x_rounded).unwrap();
            let want_rounded = cpu.linear(&t, &w, None).unwrap().data;
            let wg = gpu.upload_weight(w).unwrap();
            let xg = up(&gpu, m, k, &x);
            for mode in [GemmPrecision::Split, GemmPrecision::Rounded] {
                gpu.set_gemm_precision(mode);
                let what = format!("{dtype:?} {mode:?} m={m} k={k} n={n}");
                let want = match mode {
                    GemmPrecision::Split => &want_split,
                    GemmPrecision::Rounded => &want_rounded,
                };
                let run = |b: GemmBackend| {
                    gpu.set_gemm_backend(b);
                    gpu.to_host(&gpu.linear(&xg, &wg, None).unwrap()).unwrap()
                };
                let gemm_ex = run(GemmBackend::GemmEx);
                assert_eq!(gpu.gemm_backend(), GemmBackend::GemmEx);
                let tuned_first = run(GemmBackend::LtAutotuned);
                let tuned_again = run(GemmBackend::LtAutotuned);
                for (lib, got) in [("GemmEx", &gemm_ex), ("cuBLASLt", &tuned_first)] {
                    let err = max_rel_err(got, want);
                    assert!(err < 2e-5, "{what} {lib}: rel err {err:.2e} (tol 2e-5)");
                }
                assert!(
                    same_bits(&tuned_first, &tuned_again),
                    "{what}: the tuned GEMM differs between its first and second call"
                );
                if !lt_available {
                    assert_eq!(gpu.gemm_backend(), GemmBackend::GemmEx);
                    continue;
                }
                assert_eq!(gpu.gemm_backend(), GemmBackend::LtAutotuned);
                let tuning = find_tuning(gpu.gemm_tunings(), m, n, k, dtype, mode);
                if m < LT_MIN_ROWS {
                    assert!(tuning.is_none(), "{what}: tuned below {LT_MIN_ROWS} rows");
                    continue;
                }
                let tuning = tuning.unwrap_or_else(|| panic!("{what}: no tuning recorded"));
                eprintln!("{what}: {}", tuning.choice);
                match (&tuning.choice, aligned) {
                    (GemmChoice::Lt { .. }, true) => {}
                    // GemmEx timed faster than every cuBLASLt candidate: both ran and were timed.
                    (GemmChoice::GemmEx(LtFallback::Faster { gemm_ex_ms, lt_ms }), true) => {
                        assert!(gemm_ex_ms < lt_ms, "{what}: {gemm_ex_ms} vs {lt_ms} ms");
                    }
                    // The heuristic may offer nothing for an f32 output of odd stride; it then
                    // falls back, which is what is checked here.
                    (GemmChoice::GemmEx(LtFallback::NoAlgorithm(_)), true) if n % 4 != 0 => {}
                    (GemmChoice::GemmEx(LtFallback::Unaligned), false) => {}
                    (other, _) => panic!("{what}: unexpected choice {other:?}"),
                }
            }
        }
    }
    gpu.set_gemm_backend(GemmBackend::default());
    assert!(gpu.deferred_error().is_none());
}

/// The GEMM tuning record: a backend that tunes a problem writes it to the record's file; a
/// backend opened on the same folder by another path (as a new process would: it reads the
/// file) restores the choice without timing, and computes the same bits; a record damaged on
/// disk is reported, tuned again and rewritten.
#[test]
fn gemm_tunings_are_recorded_and_restored_from_disk() {
    let Some(_) = test_gpu() else { return };
    let base = std::env::temp_dir().join(format!("strata-gemm-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("record");
    std::fs::create_dir_all(&dir).unwrap();
    let open = |name: &str| {
        // Each spelling of the folder is a record of its own in this process, so the second
        // and third backends read the file the first one wrote.
        let link = base.join(name);
        if name != "record" {
            std::os::unix::fs::symlink(&dir, &link).unwrap();
        }
        let gpu = CudaBackend::with_caches(0, None, Some(link)).unwrap();
        gpu.set_gemm_backend(GemmBackend::LtAutotuned);
        gpu.set_gemm_precision(GemmPrecision::Rounded);
        gpu
    };
    let first = open("record");
    if let Some(why) = first.lt_unavailable() {
        eprintln!("skipped: cuBLASLt unavailable ({why})");
        return;
    }
    let (m, k, n) = (640, 1024, 768);
    let mut rng = Rng(test_seed());
    let w = rng.weight(n, k, DType::BF16);
    let x = rng.vec(m * k);
    let run = |gpu: &CudaBackend| {
        let wg = gpu.upload_weight(w.clone()).unwrap();
        let out = gpu.linear(&up(gpu, m, k, &x), &wg, None).unwrap();
        let t = find_tuning(
            gpu.gemm_tunings(),
            m,
            n,
            k,
            DType::BF16,
            GemmPrecision::Rounded,
        )
        .expect("the problem was tuned");
        (gpu.to_host(&out).unwrap(), t)
    };
    let (want, tuned) = run(&first);
    assert!(!tuned.recorded, "the first backend times the problem");
    assert!(first.gemm_tuning_seconds() > 0.0, "the timing is counted");
    let info = first
        .gemm_record()
        .expect("a record once cuBLASLt is loaded");
    assert_eq!(info.problem, None);
    let path = info.path.clone().expect("kept on disk");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = format!("{m} {n} {k} bf16 rounded ");
    assert!(
        text.contains(&line),
        "{line:?} not in {}:\n{text}",
        path.display()
    );
    eprintln!("recorded: {} ({})", tuned.choice, path.display());

    let second = open("again");
    let (got, restored) = run(&second);
    assert!(restored.recorded, "restored from the file, not timed");
    assert_eq!(
        second.gemm_tuning_seconds(),
        0.0,
        "restoring costs no tuning time"
    );
    assert_eq!(restored.choice, tuned.choice);
    assert!(
        same_bits(&got, &want),
        "the restored algorithm computes other bits"
    );
    assert_eq!(second.gemm_record().unwrap().loaded, info.entries);

    // A torn file: the backend says why, times again and rewrites it whole.
    let recorded_path = second.gemm_record().unwrap().path.unwrap();
    std::fs::write(&recorded_path, &text[..text.len() - 3]).unwrap();
    let third = open("torn");
    assert!(third.lt_unavailable().is_none());
    let why = third
        .gemm_record()
        .unwrap()
        .problem
        .expect("the damage is reported");
    assert!(why.contains("checksum"), "{why}");
    let (again, retimed) = run(&third);
    assert!(!retimed.recorded, "a damaged record is not used");
    let max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = want
        .iter()
        .zip(&again)
        .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
        / max;
    assert!(err < 1e-5, "re-timed GEMM off by {err:.2e}");
    let after = third.gemm_record().unwrap();
    assert_eq!(after.problem, None, "rewritten after the new timing");
    assert!(
        std::fs::read_to_string(&recorded_path)
            .unwrap()
            .contains(&line)
    );
    assert!(first.deferred_error().is_none() && third.deferred_error().is_none());
    let _ = std::fs::remove_dir_all(&base);
}

fn find_tuning(
    tunings: Vec<GemmTuning>,
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    precision: GemmPrecision,
) -> Option<GemmTuning> {
    tunings
        .into_iter()
        .find(|t| (t.m, t.n, t.k, t.dtype, t.precision) == (m, n, k, dtype, precision))
}
