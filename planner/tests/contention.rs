//! The cost model's shared host memory, on Llama-3-8B shapes and the H100 reference profile.

#![allow(clippy::unwrap_used)]

mod common;

use common::{GIB, llama_3_8b, streamed_policy, wl};

use strata_planner::{Budgets, HardwareProfile, Stream, Tier, TierSplit, plan, predict};

/// The reference H100 profile with host attention at 74 GB/s (as `strata calibrate` measured it
/// on that host) and a host copy of `gbps`.
fn with_host_memory(gbps: f64) -> HardwareProfile {
    HardwareProfile {
        host_mem_gbps: gbps,
        host_attention_gbps: 74.0,
        ..HardwareProfile::h100_reference()
    }
}

/// Host attention over 3/4 of the KV while an eighth of the weights streams up: with a host copy
/// of 28 GB/s (so 56 GB/s read + written) the two together need the
/// host memory longer than either alone, so the layer costs the host memory time plus the GPU
/// work that waits for the attention, and the decode step is slower than with ample bandwidth.
#[test]
fn host_attention_and_weight_copies_share_the_host_memory() {
    let m = llama_3_8b();
    let w = wl(8, 4096);
    let p = streamed_policy(
        8,
        TierSplit {
            gpu: 0.25,
            host: 0.75,
            disk: 0.0,
        },
    );
    let shared = with_host_memory(28.0);
    let pred = predict(&m, &w, &p, &shared);
    let d = pred.decode_step;
    let st = d.per_layer;
    let bytes = st.host_attention_s * shared.host_attention_gbps
        + st.h2d_s * shared.h2d_gbps
        + st.d2h_s * shared.d2h_gbps;
    let expected = bytes * 1e9 / shared.host_memory_bps();
    assert!((st.host_memory_s - expected).abs() < 1e-12 * expected.max(1.0));
    assert!(
        st.host_memory_s > st.host_attention_s.max(st.h2d_s),
        "{st:?}"
    );
    assert_eq!(d.bound_by, Stream::HostMemory);
    assert_eq!(pred.bound_by, Stream::HostMemory);
    // One GPU batch: the GPU's output projection and MLP wait for the attention.
    assert!((d.layer_s - (st.host_memory_s + st.gpu_compute_s)).abs() < 1e-12);

    let ample = predict(&m, &w, &p, &with_host_memory(1e6)).decode_step;
    assert_eq!(ample.per_layer.host_attention_s, st.host_attention_s);
    assert!(
        d.total_s > ample.total_s * 1.05,
        "{} vs {}",
        d.total_s,
        ample.total_s
    );
}

/// The host memory figure only ever adds a floor: more of it never predicts a slower policy or
/// plan.
#[test]
fn more_host_memory_bandwidth_never_predicts_slower() {
    let m = llama_3_8b();
    let w = wl(8, 4096);
    let cold = [
        TierSplit::all_on(Tier::Host),
        TierSplit {
            gpu: 0.5,
            host: 0.25,
            disk: 0.25,
        },
    ];
    let budgets = Budgets {
        gpu_bytes: 20 * GIB,
        host_bytes: 64 * GIB,
        disk_bytes: 200 * GIB,
    };
    let mut last: Option<(Vec<f64>, f64)> = None;
    for gbps in [5.0, 15.0, 28.0, 50.0, 100.0, 400.0] {
        let hw = with_host_memory(gbps);
        let fixed: Vec<f64> = cold
            .iter()
            .map(|&c| predict(&m, &w, &streamed_policy(8, c), &hw).total_s)
            .collect();
        let planned = plan(&m, &w, &budgets, &hw).unwrap().prediction.total_s;
        if let Some((before, planned_before)) = &last {
            for (now, then) in fixed.iter().zip(before) {
                assert!(
                    now <= &(then * (1.0 + 1e-12)),
                    "{gbps} GB/s: {now} > {then}"
                );
            }
            assert!(planned <= planned_before * (1.0 + 1e-12), "{gbps} GB/s");
        }
        last = Some((fixed, planned));
    }
}

/// The runtime prefills in passes of every GPU batch, each GPU batch at most its prompt rows and
/// 8192, each pass streaming the weights it does not keep: 8 prompts of 32K tokens run 32
/// passes, 8 prompts of 1K run one, and so do 8 prompts of 1K in 4 GPU batches of 2 (the block
/// schedule: each layer serves the 4 in turn). The streamed eighth of the weights costs that
/// many one-pass times (nothing else crosses PCIe here).
#[test]
fn prefill_streams_the_weights_once_per_pass() {
    let m = llama_3_8b();
    let hw = HardwareProfile::h100_reference();
    let p = streamed_policy(
        8,
        TierSplit {
            gpu: 1.0,
            host: 0.0,
            disk: 0.0,
        },
    );
    let one_pass_s = 0.125 * m.weight_bytes_per_layer() as f64 / (hw.h2d_gbps * 1e9);
    let four_batches = strata_planner::Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 4,
        ..p
    };
    for (prompt, p, passes) in [(32768, p, 32.0), (1024, p, 1.0), (1024, four_batches, 1.0)] {
        let st = predict(&m, &wl(8, prompt), &p, &hw).prefill.per_layer;
        let want = passes * one_pass_s;
        assert!(
            (st.h2d_s - want).abs() <= 1e-3 * want,
            "prompt {prompt}: h2d {} s, want {want} s",
            st.h2d_s
        );
    }
}

/// A measured shared rate (`strata calibrate` scanning host memory while copies run) replaces
/// the estimate from the separate rates, and a profile written before the field existed reads
/// as having none.
#[test]
fn a_measured_shared_rate_replaces_the_estimate() {
    let estimate = with_host_memory(52.0);
    assert_eq!(estimate.host_memory_bps(), 104e9);
    let measured = HardwareProfile {
        host_memory_shared_gbps: Some(84.7),
        ..estimate.clone()
    };
    assert_eq!(measured.host_memory_bps(), 84.7e9);
    let m = llama_3_8b();
    let w = wl(8, 4096);
    let p = streamed_policy(8, TierSplit::all_on(Tier::Host));
    let (a, b) = (
        predict(&m, &w, &p, &estimate).decode_step.per_layer,
        predict(&m, &w, &p, &measured).decode_step.per_layer,
    );
    assert!((b.host_memory_s / a.host_memory_s - 104.0 / 84.7).abs() < 1e-9);
    let mut json: serde_json::Value = serde_json::from_str(&measured.to_json()).unwrap();
    assert_eq!(json["host_memory_shared_gbps"], 84.7);
    json.as_object_mut()
        .unwrap()
        .remove("host_memory_shared_gbps");
    let old = HardwareProfile::from_json(&json.to_string(), std::path::Path::new("old.json"));
    assert_eq!(old.unwrap().host_memory_shared_gbps, None);
}

/// A prompt longer than a GPU batch's rows runs in chunks of 8192, and each chunk attends the
/// chunks before it: 2 prompts of 32768 tokens read back 3·4/2 = 6 chunks each. Of those tokens
/// the share the split keeps on the host comes up over PCIe, and the disk's share is also read
/// from the disk; the GPU's share stays. A prompt of one chunk reads nothing back.
#[test]
fn chunked_prompts_read_their_earlier_chunks_back_from_where_they_live() {
    let m = llama_3_8b();
    let hw = HardwareProfile::h100_reference();
    let kvb = m.kv_bytes_per_token_per_layer() as f64;
    let on_gpu = TierSplit {
        gpu: 1.0,
        host: 0.0,
        disk: 0.0,
    };
    let spread = TierSplit {
        gpu: 0.2,
        host: 0.3,
        disk: 0.5,
    };
    let prefill = |prompt: u64, cold: TierSplit| {
        let mut p = streamed_policy(2, cold);
        p.weights = TierSplit::all_on(Tier::Gpu);
        predict(&m, &wl(2, prompt), &p, &hw).prefill.per_layer
    };
    let (s, hot) = (32768.0, 256.0);
    let reread = 8192.0 * 6.0 * 2.0;
    // The split of the prompt's tokens: the hot window on the GPU, the rest by `spread`.
    let (host, disk) = (0.3 * (s - hot) / s, 0.5 * (s - hot) / s);
    let (a, b) = (prefill(32768, on_gpu), prefill(32768, spread));
    assert_eq!(a.h2d_s, 0.0);
    assert_eq!(a.disk_read_s, 0.0);
    let want_h2d = reread * (host + disk) * kvb / (hw.h2d_gbps * 1e9);
    assert!((b.h2d_s - want_h2d).abs() <= 1e-9 * want_h2d, "{b:?}");
    let want_disk = reread * disk * kvb / hw.disk_read_bps(64 * m.kv_bytes_per_token_per_layer());
    assert!(
        (b.disk_read_s - want_disk).abs() <= 1e-9 * want_disk,
        "{b:?}"
    );
    let one_chunk = prefill(4096, spread);
    assert_eq!(one_chunk.h2d_s, 0.0);
    assert_eq!(one_chunk.disk_read_s, 0.0);
}

/// The disk's reads and writes take turns: 2 prompts of 32K tokens whose older half goes to disk
/// write it there and read the earlier chunks back, and each layer of the prefill costs at
/// least both (more than any one stream here), bound by the larger.
#[test]
fn disk_reads_and_writes_share_the_disk() {
    let m = llama_3_8b();
    let hw = HardwareProfile::h100_reference();
    let mut p = streamed_policy(
        2,
        TierSplit {
            gpu: 0.0,
            host: 0.5,
            disk: 0.5,
        },
    );
    p.weights = TierSplit::all_on(Tier::Gpu);
    let ph = predict(&m, &wl(2, 32768), &p, &hw).prefill;
    let st = ph.per_layer;
    let disk = st.disk_read_s + st.disk_write_s;
    assert!(st.disk_read_s > 0.0 && st.disk_write_s > 0.0, "{st:?}");
    assert!(disk > st.max().1.max(st.host_memory_s), "{st:?}");
    assert!((ph.layer_s - disk).abs() <= 1e-12 * disk, "{ph:?}");
    let larger = if st.disk_read_s >= st.disk_write_s {
        Stream::DiskRead
    } else {
        Stream::DiskWrite
    };
    assert_eq!(ph.bound_by, larger);
}

/// The calibrated lower bound of a phase is the slowest stream's time over every layer (the host
/// memory floor included), never above the prediction: here a GPU-resident step, a step whose
/// host attention and weight copies share the host memory, and one reading KV from disk.
#[test]
fn the_lower_bound_is_the_slowest_stream_and_never_above_the_prediction() {
    let m = llama_3_8b();
    let hw = with_host_memory(28.0);
    let w = wl(8, 4096);
    let cases = [
        (
            "gpu",
            streamed_policy(
                8,
                TierSplit {
                    gpu: 1.0,
                    host: 0.0,
                    disk: 0.0,
                },
            ),
        ),
        (
            "host",
            streamed_policy(
                8,
                TierSplit {
                    gpu: 0.25,
                    host: 0.75,
                    disk: 0.0,
                },
            ),
        ),
        (
            "disk",
            streamed_policy(
                8,
                TierSplit {
                    gpu: 0.25,
                    host: 0.25,
                    disk: 0.5,
                },
            ),
        ),
    ];
    for (name, p) in cases {
        let pred = predict(&m, &w, &p, &hw);
        for (phase, d) in [("decode", pred.decode_step), ("prefill", pred.prefill)] {
            let st = d.per_layer;
            let slowest = Stream::ALL
                .iter()
                .map(|&s| st.get(s))
                .fold(0.0f64, f64::max);
            // The LM head runs once per step, after every layer.
            let want = m.layers as f64 * slowest + d.head_s;
            assert!(
                (d.floor_s - want).abs() <= 1e-12 * want,
                "{name} {phase}: {} vs {want}",
                d.floor_s
            );
            assert!(
                d.floor_s > 0.0 && d.floor_s <= d.total_s,
                "{name} {phase}: {d:?}"
            );
        }
        if name == "disk" {
            let st = pred.decode_step.per_layer;
            assert!(st.disk_read_s > 0.0, "{st:?}");
            assert!(pred.decode_step.floor_s >= m.layers as f64 * st.disk_read_s);
        }
    }
}

/// A prompt over f32 KV is attended by the GPU's generic kernel, so its attention FLOPs go at
/// the calibrated f32 rate; over half-precision KV at the tensor-core kernel's. A profile
/// without the f32 figure charges the f32 GEMM rate.
#[test]
fn f32_kv_prefill_attention_runs_at_the_generic_kernels_rate() {
    let half = llama_3_8b();
    let f32_kv = llama_3_8b().with_kv_dtype_bytes(4);
    let p = streamed_policy(
        1,
        TierSplit {
            gpu: 1.0,
            host: 0.0,
            disk: 0.0,
        },
    );
    let w = wl(1, 8192);
    // Causal attention FLOPs of one layer: 2·s(s+1)·q_width.
    let flops = 2.0 * 8192.0 * 8193.0 * half.q_width() as f64;
    let compute = |m: &strata_planner::ModelSpec, hw: &HardwareProfile| {
        predict(m, &w, &p, hw).prefill.per_layer.gpu_compute_s
    };
    let measured = HardwareProfile {
        prefill_attention_tflops: Some(400.0),
        prefill_attention_f32_tflops: Some(1.0),
        ..HardwareProfile::h100_reference()
    };
    let extra = compute(&f32_kv, &measured) - compute(&half, &measured);
    // The f32 KV adds f32-KV bytes between the GEMMs too; the attention term dominates.
    let want = flops / 1e12 - flops / 400e12;
    assert!(
        (extra - want).abs() <= 0.05 * want,
        "f32 KV adds {extra} s a layer, want about {want} s"
    );
    let older = HardwareProfile {
        prefill_attention_f32_tflops: None,
        ..measured
    };
    let f32_gemm = older.gemm_flops(4);
    let got = compute(&f32_kv, &older) - compute(&half, &older);
    let want = flops / f32_gemm - flops / 400e12;
    assert!(
        (got - want).abs() <= 0.05 * want.abs() + 1e-4,
        "without the f32 figure: {got} s, want about {want} s"
    );
}
