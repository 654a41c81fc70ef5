//! Placement equivalence over the planner's policy space, on the CPU: every executor setting a
//! `--policy` can ask for gives the same greedy tokens as the all-in-memory run, and
//! last-prompt-position logits within 1e-5 relative (float rounding of the LSE merges).
//!
//! Grid covered, on the golden fixtures `llama-gqa`, `qwen2-tied` and `opt` (4 ragged prompts run
//! one at a time and then as one batch; KV blocks of 4 tokens):
//! - `num_gpu_batches` 1, 2, 3 and 4 (FlexGen's block schedule), with all KV in host memory
//!   and with a 10-block host budget over a disk tier (most KV on disk);
//! - weights streamed layer by layer: one load per layer per forward pass whatever the number
//!   of GPU batches.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{DiskTierConfig, IoEngine};
use strata_runtime::model;
use strata_tests::{Engine, Placement, fixture};

/// Last-prompt-position logits and greedy tokens of one sequence.
type Greedy = (Vec<f32>, Vec<u32>);

const FIXTURES: [&str; 3] = ["llama-gqa", "qwen2-tied", "opt"];

/// One point of the grid: the executor's settings and where the KV lives.
#[derive(Clone, Copy, Debug)]
struct Point {
    gpu_batches: usize,
    /// Host KV budget in blocks, over a disk tier (`None`: everything in host memory).
    host_blocks: Option<usize>,
}

fn disk(tag: &str) -> DiskTierConfig {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("strata-grid-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    DiskTierConfig {
        dir,
        bytes: 64 << 20,
        engine: IoEngine::Sync,
        queue_depth: 8,
        faults: None,
    }
}

fn prompts_of(name: &str) -> (String, Vec<Vec<u32>>, usize) {
    let dir = fixture(&format!("golden/{name}"));
    let e = strata_tests::read_json(&dir.join("expected.json"));
    let prompts = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| strata_tests::json_u32s(&c["input_ids"]))
        .collect();
    let n = e["max_new_tokens"].as_u64().unwrap() as usize;
    (dir.to_str().unwrap().to_string(), prompts, n)
}

/// Greedy results of `prompts` one at a time, then as one batch, at `point`.
fn run(spec: &str, prompts: &[Vec<u32>], n: usize, point: Point, tag: &str) -> Vec<Greedy> {
    let m = model::open(spec).unwrap();
    let placement = Placement {
        host_blocks: point.host_blocks,
        disk: point.host_blocks.map(|_| disk(tag)),
        gpu: None,
        policy: SinkAndRecent {
            sink_blocks: 1,
            recent_blocks: 1,
        },
    };
    let mut e = Engine::with_placement(&m, 4, true, placement);
    e.tf.set_gpu_batches(point.gpu_batches);
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
    out
}

fn assert_same(reference: &[Greedy], got: &[Greedy], what: &str) {
    for (i, ((l0, t0), (l1, t1))) in reference.iter().zip(got).enumerate() {
        assert_eq!(t0, t1, "{what}: run {i}: greedy tokens differ");
        let scale = l0.iter().fold(1e-6f32, |a, b| a.max(b.abs()));
        let err = l0
            .iter()
            .zip(l1)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        assert!(err < 1e-5, "{what}: run {i}: logits differ by {err:e}");
    }
}

/// Runs `points` on every fixture against the all-in-memory, one-GPU-batch run.
fn check_grid(points: &[Point]) {
    for name in FIXTURES {
        let (spec, prompts, n) = prompts_of(name);
        let all_in_memory = Point {
            gpu_batches: 1,
            host_blocks: None,
        };
        let reference = run(&spec, &prompts, n, all_in_memory, name);
        for (i, &p) in points.iter().enumerate() {
            let tag = format!("{name}-{i}");
            let got = run(&spec, &prompts, n, p, &tag);
            assert_same(&reference, &got, &format!("{name} {p:?}"));
        }
    }
}

#[test]
fn gpu_batches_give_the_same_tokens_in_memory_and_on_disk() {
    let mut points = Vec::new();
    for gpu_batches in [1, 2, 3, 4] {
        for host_blocks in [None, Some(10)] {
            points.push(Point {
                gpu_batches,
                host_blocks,
            });
        }
    }
    check_grid(&points);
}

#[test]
fn a_layer_is_loaded_once_per_step_whatever_the_gpu_batches() {
    let (spec, prompts, _) = prompts_of("llama-gqa");
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
