//! Placement equivalence: the KV cache's placement must not change results. The golden fixtures
//! and SmolLM2 give identical greedy tokens, and logits equal within float rounding of the LSE
//! merge, with all KV in host memory and with a host budget so small that most blocks live on
//! disk. This holds for both IO engines, and each tier's accounting stays within its budget. With
//! the host and disk tiers in bf16 (as on a GPU run), the tiered runs give the tokens and logits of
//! the bf16 all-in-memory run the same way, and disk blocks are half the bytes of f32.

#![allow(clippy::unwrap_used)]

use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{DType, IoEngine};
use strata_runtime::model;
use strata_tests::{Engine, Placement, fixture, scratch_disk};

/// Last-prompt-position logits and greedy tokens of one sequence.
type Greedy = (Vec<f32>, Vec<u32>);

fn engines() -> Vec<IoEngine> {
    let mut e = vec![IoEngine::Sync];
    match strata_storage::probe_io_uring() {
        Ok(()) => e.push(IoEngine::Uring),
        Err(err) => {
            eprintln!("io_uring placement runs skipped: io_uring is unavailable here ({err})")
        }
    }
    e
}

/// Greedy tokens and last logits of `prompts` (run one at a time and as one batch) under
/// `placement`; returns them plus (host peak, host capacity, disk peak, disk capacity).
fn run(
    spec: &str,
    prompts: &[Vec<u32>],
    n: usize,
    bt: usize,
    placement: Placement,
) -> (Vec<Greedy>, [usize; 5]) {
    run_chunked(spec, prompts, n, bt, placement, usize::MAX)
}

/// [`run`] with prompts prefilled `chunk` rows per forward pass.
fn run_chunked(
    spec: &str,
    prompts: &[Vec<u32>],
    n: usize,
    bt: usize,
    placement: Placement,
    chunk: usize,
) -> (Vec<Greedy>, [usize; 5]) {
    let m = model::open(spec).unwrap();
    let mut e = Engine::with_placement(&m, bt, true, placement);
    e.prefill_chunk = chunk;
    let mut out: Vec<_> = prompts
        .iter()
        .map(|p| e.greedy_batch(std::slice::from_ref(p), n).remove(0))
        .collect();
    out.extend(e.greedy_batch(prompts, n));
    let k = e.kv.metrics();
    (
        out,
        [
            k.host_blocks_peak,
            k.host_capacity_blocks,
            k.disk_blocks_peak,
            k.disk_capacity_blocks,
            k.spilled_blocks as usize,
        ],
    )
}

fn prompts_of(dir: &std::path::Path) -> (Vec<Vec<u32>>, usize) {
    let e = strata_tests::read_json(&dir.join("expected.json"));
    let cases = e["cases"].as_array().unwrap();
    let prompts = cases
        .iter()
        .map(|c| strata_tests::json_u32s(&c["input_ids"]))
        .collect();
    (prompts, e["max_new_tokens"].as_u64().unwrap() as usize)
}

/// Logits of a tiered run against the all-in-memory run: float rounding of the LSE merge.
const LOGIT_TOL: f32 = 1e-5;
/// The same with bf16 KV: a merge's rounding can move a later layer's K or V across a bf16
/// rounding boundary (one bf16 step is 2^-8 relative), which moves logits by more.
const LOGIT_TOL_BF16: f32 = 5e-4;

fn assert_same(reference: &[Greedy], tiered: &[Greedy], what: &str) {
    assert_close(reference, tiered, LOGIT_TOL, what);
}

fn assert_close(reference: &[Greedy], tiered: &[Greedy], tol: f32, what: &str) {
    for (i, ((l0, t0), (l1, t1))) in reference.iter().zip(tiered).enumerate() {
        assert_eq!(t0, t1, "{what}: run {i}: greedy tokens differ");
        let scale = l0.iter().fold(1e-6f32, |a, b| a.max(b.abs()));
        let err = l0
            .iter()
            .zip(l1)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        assert!(
            err < tol,
            "{what}: run {i}: logits differ by {err:e} (relative)"
        );
    }
}

#[test]
fn golden_models_give_identical_tokens_with_most_kv_on_disk() {
    for name in ["llama-gqa", "qwen2-tied", "opt"] {
        let dir = fixture(&format!("golden/{name}"));
        let spec = dir.to_str().unwrap();
        let (prompts, n) = prompts_of(&dir);
        // Block of 4 tokens: a 40-token prompt plus 12 new tokens spans 13 blocks per layer.
        let (reference, _) = run(spec, &prompts, n, 4, Placement::default());
        for engine in engines() {
            for policy in [
                SinkAndRecent {
                    sink_blocks: 1,
                    recent_blocks: 1,
                },
                SinkAndRecent {
                    sink_blocks: 0,
                    recent_blocks: 0,
                },
            ] {
                // 2 layers x 4 sequences need 8 writable blocks; 10 leaves almost nothing else.
                let placement = Placement {
                    host_blocks: Some(10),
                    disk: Some(scratch_disk("placement", name, engine)),
                    kv_dtype: None,
                    gpu: None,
                    policy,
                };
                let (tiered, [hp, hc, dp, dc, spilled]) = run(spec, &prompts, n, 4, placement);
                assert_same(
                    &reference,
                    &tiered,
                    &format!("{name} {engine:?} {policy:?}"),
                );
                assert!(
                    hp <= hc && dp <= dc,
                    "{name}: budgets exceeded: host {hp}/{hc}, disk {dp}/{dc}"
                );
                assert!(
                    spilled > 0 && dp > hp,
                    "{name}: most KV should have lived on disk (host {hp}, disk {dp})"
                );
            }
        }
    }
}

#[test]
fn bf16_host_and_disk_kv_give_identical_tokens_with_most_kv_on_disk() {
    for name in ["llama-gqa", "qwen2-tied", "opt"] {
        let dir = fixture(&format!("golden/{name}"));
        let spec = dir.to_str().unwrap();
        let (prompts, n) = prompts_of(&dir);
        let bf16 = Placement {
            kv_dtype: Some(DType::BF16),
            ..Placement::default()
        };
        let (reference, _) = run(spec, &prompts, n, 4, bf16.clone());
        let (f32_run, _) = run(spec, &prompts, n, 4, Placement::default());
        for engine in engines() {
            let placement = Placement {
                host_blocks: Some(10),
                disk: Some(scratch_disk("placement", &format!("{name}-bf16"), engine)),
                policy: SinkAndRecent {
                    sink_blocks: 1,
                    recent_blocks: 1,
                },
                ..bf16.clone()
            };
            let (tiered, [hp, hc, dp, dc, spilled]) = run(spec, &prompts, n, 4, placement);
            assert_close(
                &reference,
                &tiered,
                LOGIT_TOL_BF16,
                &format!("{name} bf16 {engine:?}"),
            );
            assert!(
                hp <= hc && dp <= dc,
                "{name}: budgets exceeded: host {hp}/{hc}, disk {dp}/{dc}"
            );
            assert!(
                spilled > 0 && dp > hp,
                "{name}: most KV should have lived on disk (host {hp}, disk {dp})"
            );
        }
        // Rounding K and V to bf16 is a real change (the runs are not secretly f32), small
        // enough that the golden prompts keep their greedy tokens.
        let moved = reference
            .iter()
            .zip(&f32_run)
            .any(|((a, _), (b, _))| a.iter().zip(b).any(|(x, y)| x != y));
        assert!(moved, "{name}: bf16 KV gave the f32 logits bit for bit");
        for ((_, a), (_, b)) in reference.iter().zip(&f32_run) {
            assert_eq!(a, b, "{name}: bf16 KV changed the greedy tokens");
        }
    }
}

/// Prompts prefilled 3 rows at a time (chunks split blocks and straddle prompts), most KV on
/// disk by the time later chunks attend the earlier ones: the tokens and logits of one
/// all-in-memory prefill per prompt.
#[test]
fn chunked_prefill_over_spilled_chunks_gives_identical_tokens() {
    for name in ["llama-gqa", "opt"] {
        let dir = fixture(&format!("golden/{name}"));
        let spec = dir.to_str().unwrap();
        let (prompts, n) = prompts_of(&dir);
        let (reference, _) = run(spec, &prompts, n, 4, Placement::default());
        let placement = Placement {
            host_blocks: Some(10),
            disk: Some(scratch_disk(
                "placement",
                &format!("{name}-chunked"),
                IoEngine::Sync,
            )),
            kv_dtype: None,
            gpu: None,
            policy: SinkAndRecent {
                sink_blocks: 1,
                recent_blocks: 1,
            },
        };
        let (chunked, [.., spilled]) = run_chunked(spec, &prompts, n, 4, placement, 3);
        assert_same(&reference, &chunked, &format!("{name} chunks of 3"));
        assert!(spilled > 0, "{name}: nothing reached the disk");
    }
}

#[test]
fn a_host_budget_too_small_for_the_writable_blocks_is_a_clear_error() {
    let m = model::open(fixture("golden/llama-gqa").to_str().unwrap()).unwrap();
    let placement = Placement {
        host_blocks: Some(1),
        disk: Some(scratch_disk("placement", "tiny", IoEngine::Sync)),
        kv_dtype: None,
        gpu: None,
        policy: SinkAndRecent::default(),
    };
    let mut e = Engine::with_placement(&m, 4, true, placement);
    let s = strata_runtime::kv::SeqId(0);
    e.kv.add_sequence(s);
    let rows: Vec<_> = (0..3)
        .map(|pos| strata_runtime::forward::Row {
            seq: s,
            pos,
            token: 5,
        })
        .collect();
    let err =
        e.tf.forward(&rows, &[2], &mut e.kv)
            .unwrap_err()
            .to_string();
    assert!(err.contains("--host-mem"), "{err}");
}

#[test]
fn smollm2_gives_identical_tokens_with_most_kv_on_disk() {
    let Some(path) = strata_tests::smollm2_gguf() else {
        return;
    };
    let spec = path.to_str().unwrap();
    let prompts = strata_tests::smollm2_prompts();
    let (host_only, _) = run(spec, &prompts, 8, 8, Placement::default());
    for engine in engines() {
        // 30 layers x 4 sequences = 120 writable blocks; 130 keeps most of the rest on disk.
        let placement = Placement {
            host_blocks: Some(130),
            disk: Some(scratch_disk("placement", "smollm2", engine)),
            kv_dtype: None,
            gpu: None,
            policy: SinkAndRecent::default(),
        };
        let (tiered, [hp, hc, dp, dc, _]) = run(spec, &prompts, 8, 8, placement);
        assert_same(&host_only, &tiered, &format!("smollm2 {engine:?}"));
        assert!(
            hp <= hc && dp <= dc && dp > 0,
            "host {hp}/{hc}, disk {dp}/{dc}"
        );
    }
}
