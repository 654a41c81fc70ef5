//! Placement equivalence over the planner's policy space, on the CPU: every executor setting a
//! `--policy` can ask for gives the same greedy tokens as the all-in-memory run, and
//! last-prompt-position logits within 1e-5 relative (float rounding of the LSE merges; recompute
//! regenerates K and V in a batch of a different shape).
//!
//! Grid covered, on the golden fixtures `llama-gqa`, `qwen2-tied` and `opt` (4 ragged prompts run
//! one at a time and then as one batch; KV blocks of 4 tokens), every combination of:
//! - `num_gpu_batches` 1, 2 and 4 (FlexGen's block schedule);
//! - KV all in host memory, or a 10-block host budget over a disk tier (most KV on disk);
//! - cold KV attended near the data, fetched to the compute device, or split half and half
//!   (`attention_host` = `attention_disk`);
//! - recompute shares 0, 0.5 and 1 (hidden states stored instead of K and V).
//!
//! The same again with the host and disk tiers in bf16 (as on a GPU run), against the bf16
//! all-in-memory run: 1 and 2 GPU batches, host only or mostly on disk, near, fetched and split,
//! and recompute 0.5 where f32 hidden states fit a bf16 block (`opt`); logits within 5e-4 (a
//! merge's rounding can move a later layer's K or V across a bf16 rounding boundary).
//!
//! Plus: SmolLM2-135M (when present) with 2 GPU batches, KV mostly on disk, fetch and split; its
//! hidden states outgrow K and V (GQA), so recompute is refused naming the field. And weights
//! streamed layer by layer load once per layer per step whatever the number of GPU batches.

#![allow(clippy::unwrap_used)]

use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{AttentionRoutes, DType, IoEngine};
use strata_runtime::model;
use strata_tests::{Engine, Placement, golden_case, scratch_disk};

/// Last-prompt-position logits and greedy tokens of one sequence.
type Greedy = (Vec<f32>, Vec<u32>);

const FIXTURES: [&str; 3] = ["llama-gqa", "qwen2-tied", "opt"];

/// One point of the grid: the executor's settings and where the KV lives.
#[derive(Clone, Copy, Debug)]
struct Point {
    gpu_batches: usize,
    /// Host KV budget in blocks, over a disk tier (`None`: everything in host memory).
    host_blocks: Option<usize>,
    /// Fraction of host and disk KV attended near the data (the rest fetched).
    near: f64,
    recompute: f64,
    /// The host and disk tiers' K and V dtype.
    kv_dtype: DType,
}

const ALL_IN_MEMORY: Point = Point {
    gpu_batches: 1,
    host_blocks: None,
    near: 1.0,
    recompute: 0.0,
    kv_dtype: DType::F32,
};

/// Greedy results of `prompts` one at a time, then as one batch, at `point`.
fn run(
    spec: &str,
    prompts: &[Vec<u32>],
    n: usize,
    bt: usize,
    point: Point,
    tag: &str,
) -> Vec<Greedy> {
    let m = model::open(spec).unwrap();
    let placement = Placement {
        host_blocks: point.host_blocks,
        disk: point
            .host_blocks
            .map(|_| scratch_disk("grid", tag, IoEngine::Sync)),
        kv_dtype: Some(point.kv_dtype),
        gpu: None,
        policy: SinkAndRecent {
            sink_blocks: 1,
            recent_blocks: 1,
        },
    };
    let mut e = Engine::with_placement(&m, bt, true, placement);
    e.tf.set_gpu_batches(point.gpu_batches);
    let routes = AttentionRoutes {
        host_near: point.near,
        disk_near: point.near,
    };
    e.kv.set_executor(routes, point.recompute, m.config.hidden)
        .unwrap();
    let mut out: Vec<_> = prompts
        .iter()
        .map(|p| e.greedy_batch(std::slice::from_ref(p), n).remove(0))
        .collect();
    out.extend(e.greedy_batch(prompts, n));
    let k = e.kv.metrics();
    assert!(
        k.host_blocks_peak <= k.host_capacity_blocks
            && k.disk_blocks_peak <= k.disk_capacity_blocks,
        "{tag}: budgets exceeded"
    );
    if point.host_blocks.is_some() {
        assert!(k.spilled_blocks > 0, "{tag}: nothing reached the disk tier");
    }
    // Each mechanism ran (the grid would prove nothing if a setting were ignored).
    if point.near < 1.0 && point.recompute < 1.0 {
        // (At recompute 1 every full block holds hidden states: no KV is left to fetch.)
        assert!(k.fetched_blocks > 0, "{tag} {point:?}: nothing was fetched");
    }
    if point.host_blocks.is_some() && (point.near < 1.0 || point.recompute > 0.0) {
        // Disk blocks gathered for the next layer (or GPU batch) were read while this one ran.
        assert!(
            k.disk_blocks_read_ahead > 0,
            "{tag} {point:?}: no disk block was read ahead"
        );
    }
    if point.recompute > 0.0 {
        assert!(
            k.hidden_blocks_stored > 0 && k.recomputed_tokens > 0 && k.bytes_hidden_read > 0,
            "{tag} {point:?}: nothing was recomputed ({k:?})"
        );
    } else {
        assert_eq!(k.hidden_blocks_stored, 0);
    }
    out
}

/// Logits against the all-in-memory run: float rounding of the LSE merges, or with bf16 KV a
/// later layer's K or V moved across a bf16 rounding boundary by it (one step is 2^-8).
fn tolerance(kv_dtype: DType) -> f32 {
    if kv_dtype == DType::F32 { 1e-5 } else { 5e-4 }
}

fn assert_same(reference: &[Greedy], got: &[Greedy], what: &str) {
    assert_close(reference, got, 1e-5, what);
}

fn assert_close(reference: &[Greedy], got: &[Greedy], tol: f32, what: &str) {
    for (i, ((l0, t0), (l1, t1))) in reference.iter().zip(got).enumerate() {
        assert_eq!(t0, t1, "{what}: run {i}: greedy tokens differ");
        let scale = l0.iter().fold(1e-6f32, |a, b| a.max(b.abs()));
        let err = l0
            .iter()
            .zip(l1)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        assert!(err < tol, "{what}: run {i}: logits differ by {err:e}");
    }
}

/// Runs `points` on every fixture against the all-in-memory, one-GPU-batch run.
fn check_grid(points: &[Point]) {
    check_grid_against(ALL_IN_MEMORY, points);
}

/// Runs `points` on every fixture against `reference`, skipping recompute where the fixture's
/// f32 hidden states do not fit a block of the point's K and V dtype (the cache refuses it).
fn check_grid_against(reference: Point, points: &[Point]) {
    for name in FIXTURES {
        let (spec, prompts, n) = golden_case(name);
        let c = model::open(&spec).unwrap().config;
        let fits = |p: &Point| c.hidden * 4 <= 2 * c.kv_dim() * p.kv_dtype.size_bytes();
        let reference = run(&spec, &prompts, n, 4, reference, name);
        for (i, &p) in points.iter().enumerate() {
            if p.recompute > 0.0 && !fits(&p) {
                continue;
            }
            let tag = format!("{name}-{i}");
            let got = run(&spec, &prompts, n, 4, p, &tag);
            assert_close(
                &reference,
                &got,
                tolerance(p.kv_dtype),
                &format!("{name} {p:?}"),
            );
        }
    }
}

#[test]
fn every_policy_in_the_grid_gives_the_same_tokens() {
    let mut points = Vec::new();
    for gpu_batches in [1, 2, 4] {
        for host_blocks in [None, Some(10)] {
            for near in [1.0, 0.0, 0.5] {
                for recompute in [0.0, 0.5, 1.0] {
                    points.push(Point {
                        gpu_batches,
                        host_blocks,
                        near,
                        recompute,
                        kv_dtype: DType::F32,
                    });
                }
            }
        }
    }
    check_grid(&points);
}

#[test]
fn every_policy_with_bf16_host_and_disk_kv_gives_the_same_tokens() {
    let bf16 = Point {
        kv_dtype: DType::BF16,
        ..ALL_IN_MEMORY
    };
    let mut points = Vec::new();
    for gpu_batches in [1, 2] {
        for host_blocks in [None, Some(10)] {
            for near in [1.0, 0.0, 0.5] {
                for recompute in [0.0, 0.5] {
                    points.push(Point {
                        gpu_batches,
                        host_blocks,
                        near,
                        recompute,
                        ..bf16
                    });
                }
            }
        }
    }
    check_grid_against(bf16, &points);
}

#[test]
fn smollm2_gives_the_same_tokens_fetched_split_and_in_gpu_batches() {
    let Some(path) = strata_tests::smollm2_gguf() else {
        return;
    };
    let spec = path.to_str().unwrap();
    let prompts = strata_tests::smollm2_prompts();
    let want = run(spec, &prompts, 6, 8, ALL_IN_MEMORY, "smollm2");
    for near in [0.0, 0.5] {
        // 30 layers x 4 sequences = 120 writable blocks; 130 keeps most of the rest on disk.
        let p = Point {
            gpu_batches: 2,
            host_blocks: Some(130),
            near,
            recompute: 0.0,
            kv_dtype: DType::F32,
        };
        let got = run(spec, &prompts, 6, 8, p, &format!("smollm2-{near}"));
        assert_same(&want, &got, &format!("smollm2 {p:?}"));
    }
    let m = model::open(spec).unwrap();
    let mut e = Engine::new(&m, 8);
    let err =
        e.kv.set_executor(AttentionRoutes::default(), 0.5, m.config.hidden)
            .unwrap_err()
            .to_string();
    assert!(err.contains("recompute"), "{err}");
}

#[test]
fn a_layer_is_loaded_once_per_step_whatever_the_gpu_batches() {
    let (spec, prompts, _) = golden_case("llama-gqa");
    let m = model::open(&spec).unwrap();
    let layers = m.config.layers as u64;
    for gpu_batches in [1, 4] {
        let mut e = Engine::with_residency(&m, 4, false);
        e.tf.set_gpu_batches(gpu_batches);
        let steps = 3;
        let out = e.greedy_batch(&prompts, steps);
        assert_eq!(out.len(), prompts.len());
        assert_eq!(
            e.tf.timings.layer_loads,
            layers * steps as u64,
            "{gpu_batches} GPU batches: streamed layers must load once per layer per step"
        );
    }
}
