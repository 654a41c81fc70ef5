//! Placement equivalence with the GPU tier in play: the golden fixtures run on the GPU with their
//! KV all in HBM, with a GPU tier so small that most blocks spill to host memory, and with GPU,
//! host and disk tiers all holding part of it; with weights resident, staged in page-locked
//! host memory (fetched layer by layer on the copy stream), and read from disk for every pass
//! into page-locked staging buffers. Every placement gives the greedy
//! tokens of transformers and of the CPU, and logits within the golden tolerance; each tier stays
//! within its budget and the spills really happened. Without a usable GPU the tests say they skipped.

#![allow(clippy::unwrap_used)]

use strata_kernels::{CudaBackend, DType, testing::test_gpu};
use strata_runtime::forward::Residency;
use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{AttentionRoutes, GpuTierConfig, IoEngine, KvMetrics};
use strata_runtime::model::{self, Model};
use strata_tests::{
    Engine, Placement, fixture, json_f64s, json_u32s, max_rel_err, read_json, scratch_disk,
};

const LOGIT_REL_TOL: f64 = 1e-4;
const FIXTURES: [&str; 4] = ["llama-gqa", "llama-gqa-bf16", "qwen2-tied", "opt"];
const BLOCK_TOKENS: usize = 4;

struct Expected {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    last_logits: Vec<Vec<f64>>,
}

fn golden_model(name: &str) -> Model {
    model::open(fixture(&format!("golden/{name}")).to_str().unwrap()).unwrap()
}

/// Whether the KV cache can keep `m`'s hidden states for recompute: they fit where its K and V
/// would (MHA); a GQA model's hidden state is larger than its K and V, and the cache refuses it.
fn stores_hidden_states(m: &Model) -> bool {
    m.config.hidden <= 2 * m.config.kv_dim()
}

fn expected(name: &str) -> Expected {
    let e = read_json(&fixture(&format!("golden/{name}/expected.json")));
    let cases = e["cases"].as_array().unwrap();
    Expected {
        prompts: cases.iter().map(|c| json_u32s(&c["input_ids"])).collect(),
        greedy: cases.iter().map(|c| json_u32s(&c["greedy_ids"])).collect(),
        last_logits: cases.iter().map(|c| json_f64s(&c["last_logits"])).collect(),
    }
}

fn gpu_tier(gpu: &CudaBackend, m: &Model, blocks: usize, dtype: DType) -> GpuTierConfig {
    with_scratch(gpu, m, blocks, 0, dtype)
}

/// A GPU tier of `blocks` KV blocks plus `scratch` scratch blocks.
fn with_scratch(
    gpu: &CudaBackend,
    m: &Model,
    blocks: usize,
    scratch: usize,
    dtype: DType,
) -> GpuTierConfig {
    let c = &m.config;
    let block_bytes = 2 * c.kv_dim() * BLOCK_TOKENS * dtype.size_bytes();
    GpuTierConfig {
        backend: gpu.clone(),
        bytes: ((blocks + scratch) * block_bytes) as u64,
        dtype,
        scratch_blocks: scratch,
    }
}

/// A GPU tier that holds about half the ragged batch's blocks but always the writable block of
/// every sequence and layer plus one layer's prefill: (its blocks, the writable blocks).
fn small_gpu_tier(m: &Model, e: &Expected) -> (usize, usize) {
    let layers = m.config.layers;
    let n = e.greedy.iter().map(Vec::len).min().unwrap();
    let blocks = |len: usize| len.div_ceil(BLOCK_TOKENS);
    let total: usize = e.prompts.iter().map(|p| blocks(p.len() + n)).sum::<usize>() * layers;
    let one_layer_prefill: usize = e.prompts.iter().map(|p| blocks(p.len())).sum();
    let tails = e.prompts.len() * layers;
    let small = (total / 2).max(tails + one_layer_prefill);
    assert!(small < total, "the fixture is too short to force a spill");
    (small, tails)
}

/// Each prompt alone, then all of them as one ragged batch: (last logits, greedy tokens) each.
fn run(engine: &mut Engine<'_, CudaBackend>, e: &Expected) -> Vec<(Vec<f32>, Vec<u32>)> {
    let n = e.greedy.iter().map(Vec::len).min().unwrap();
    let mut out: Vec<_> = e
        .prompts
        .iter()
        .map(|p| engine.greedy_batch(std::slice::from_ref(p), n).remove(0))
        .collect();
    out.extend(engine.greedy_batch(&e.prompts, n));
    out
}

fn check(name: &str, what: &str, e: &Expected, got: &[(Vec<f32>, Vec<u32>)], tol: f64) {
    let cases = e.prompts.len();
    for (i, (logits, tokens)) in got.iter().enumerate() {
        let c = i % cases;
        let n = tokens.len();
        assert_eq!(
            tokens[..],
            e.greedy[c][..n],
            "{name} {what}: case {c} tokens"
        );
        let err = max_rel_err(logits, &e.last_logits[c]);
        assert!(
            err <= tol,
            "{name} {what}: case {c} logits rel err {err:.2e} > {tol:.0e}"
        );
    }
}

/// Runs `engine` over the fixture's prompts, checks transformers' tokens and logits (the golden
/// tolerance) and the tier budgets, and returns the cache's metrics.
fn run_golden(
    engine: &mut Engine<'_, CudaBackend>,
    name: &str,
    what: &str,
    e: &Expected,
) -> KvMetrics {
    let got = run(engine, e);
    check(name, what, e, &got, LOGIT_REL_TOL);
    let k = engine.kv.metrics();
    within_budgets(name, what, &k);
    k
}

fn within_budgets(name: &str, what: &str, k: &KvMetrics) {
    assert!(
        k.gpu_blocks_peak <= k.gpu_capacity_blocks,
        "{name} {what}: {k:?}"
    );
    assert!(
        k.host_blocks_peak <= k.host_capacity_blocks,
        "{name} {what}: {k:?}"
    );
    assert!(
        k.disk_blocks_peak <= k.disk_capacity_blocks,
        "{name} {what}: {k:?}"
    );
}

#[test]
fn golden_fixtures_give_the_same_tokens_in_every_placement_with_a_gpu_tier() {
    let Some(gpu) = test_gpu() else { return };
    for name in FIXTURES {
        let m = golden_model(name);
        let e = expected(name);
        let (small, tails) = small_gpu_tier(&m, &e);
        let placements = [
            ("GPU only", 4096, None, None, Residency::Resident),
            (
                "GPU only, staged weights",
                4096,
                None,
                None,
                Residency::Staged,
            ),
            (
                "GPU only, one layer resident, one staged",
                4096,
                None,
                None,
                Residency::Split {
                    resident_layers: 1,
                    host_mlp_share: 0.0,
                    disk_layers: 0,
                },
            ),
            (
                "GPU only, staged weights, half of each MLP on the host",
                4096,
                None,
                None,
                Residency::Split {
                    resident_layers: 0,
                    host_mlp_share: 0.5,
                    disk_layers: 0,
                },
            ),
            ("GPU + host", small, None, None, Residency::Resident),
            (
                "GPU + host, one layer staged with a quarter of its MLP on the host",
                small,
                None,
                None,
                Residency::Split {
                    resident_layers: 1,
                    host_mlp_share: 0.25,
                    disk_layers: 0,
                },
            ),
            (
                "GPU only, one layer read from disk, one resident",
                4096,
                None,
                None,
                Residency::Split {
                    resident_layers: 1,
                    host_mlp_share: 0.0,
                    disk_layers: 1,
                },
            ),
            (
                "GPU + host + disk, every layer read from disk",
                small,
                Some(tails + 4),
                Some(scratch_disk("gpu-tiers-wd", name, IoEngine::Sync)),
                Residency::Split {
                    resident_layers: 0,
                    host_mlp_share: 0.0,
                    disk_layers: m.config.layers,
                },
            ),
            (
                "GPU + host + disk",
                small,
                Some(tails + 4),
                Some(scratch_disk("gpu-tiers", name, IoEngine::Sync)),
                Residency::Staged,
            ),
        ];
        let runs = placements.into_iter().flat_map(|p| {
            // Staged layers also with their copies two layers ahead (a policy's prefetch depth
            // of 2): the same tokens.
            let aheads: &[usize] = if p.4 == Residency::Resident {
                &[1]
            } else {
                &[1, 2]
            };
            aheads.iter().map(move |&ahead| (p.clone(), ahead))
        });
        for ((what, gpu_blocks, host_blocks, disk, residency), ahead) in runs {
            let what = if ahead > 1 {
                format!("{what}, copies {ahead} layers ahead")
            } else {
                what.to_string()
            };
            let what = what.as_str();
            let placement = Placement {
                host_blocks,
                disk,
                kv_dtype: None,
                gpu: Some(gpu_tier(gpu, &m, gpu_blocks, DType::F32)),
                policy: SinkAndRecent {
                    sink_blocks: 1,
                    recent_blocks: 1,
                },
            };
            let weights_disk = match residency {
                Residency::Split { disk_layers, .. } if disk_layers > 0 => Some(scratch_disk(
                    "gpu-tiers-weights",
                    &format!("{name}-{disk_layers}"),
                    IoEngine::Auto,
                )),
                _ => None,
            };
            let mut engine = Engine::with_weights_disk(
                gpu.clone(),
                &m,
                BLOCK_TOKENS,
                residency,
                placement,
                weights_disk.as_ref(),
            );
            engine.tf.set_weight_lookahead(ahead);
            let got = run(&mut engine, &e);
            if weights_disk.is_some() {
                let w = engine.tf.disk_weight_stats().unwrap();
                assert!(w.layer_reads > 0, "{name} {what}: no layer read from disk");
            }
            if residency != Residency::Resident {
                assert!(
                    engine.tf.timings.weight_bytes_fetched > 0,
                    "{name} {what}: no fetches"
                );
            }
            check(name, what, &e, &got, LOGIT_REL_TOL);
            if what.contains("MLP on the host") {
                assert!(
                    engine.tf.timings.host_mlp_bytes > 0,
                    "{name} {what}: the host computed no MLP neurons"
                );
            }
            let k = engine.kv.metrics();
            within_budgets(name, what, &k);
            eprintln!(
                "{name} {what}: gpu peak {}/{} blocks, {} spilled to host, host peak {}, disk peak {}",
                k.gpu_blocks_peak,
                k.gpu_capacity_blocks,
                k.gpu_spilled_blocks,
                k.host_blocks_peak,
                k.disk_blocks_peak
            );
            if !what.starts_with("GPU only") {
                assert!(k.gpu_spilled_blocks > 0, "{name} {what}: nothing spilled");
            }
            if what.starts_with("GPU + host + disk") {
                assert!(
                    k.spilled_blocks > 0,
                    "{name} {what}: nothing reached the disk"
                );
            }
        }
    }
}

/// With bf16 KV in the GPU tier, blocks spilled to host and disk keep exactly the bf16 values (the
/// host and disk tiers store bf16 and spills copy the pool's bytes; or f32, widened exactly), so
/// every run gives the tokens of the GPU-only run, and logits equal within the float rounding of
/// the LSE merge: GPU + host + disk in bf16 and in f32, bf16 blocks fetched back into the pool as
/// they are, and a bf16 host tier with no GPU tier (host appends round as the GPU tier does, also
/// with K and V recomputed from hidden states on the MHA fixture).
#[test]
fn half_precision_kv_is_the_same_in_every_tier() {
    let Some(gpu) = test_gpu() else { return };
    let bf16 = Some(DType::BF16);
    for name in FIXTURES {
        let m = golden_model(name);
        // f32 hidden states fit a bf16 KV block when d_model <= kv_heads * head_dim.
        let mha = m.config.hidden <= m.config.kv_dim();
        let e = expected(name);
        let (small, tails) = small_gpu_tier(&m, &e);
        let disk = |tag: &str| {
            Some(scratch_disk(
                "gpu-tiers",
                &format!("{name}-bf16-{tag}"),
                IoEngine::Sync,
            ))
        };
        // (what, GPU tier blocks, host blocks, disk, host dtype, near, recompute)
        let mut runs = vec![
            ("GPU only", Some(4096), None, None, bf16, 1.0, 0.0),
            (
                "GPU + host + disk",
                Some(small),
                Some(tails + 4),
                disk("a"),
                bf16,
                1.0,
                0.0,
            ),
            (
                "GPU + f32 host + f32 disk",
                Some(small),
                Some(tails + 4),
                disk("b"),
                Some(DType::F32),
                1.0,
                0.0,
            ),
            (
                "GPU + host, fetched",
                Some(small),
                None,
                None,
                bf16,
                0.0,
                0.0,
            ),
            (
                "host + disk, no GPU tier",
                None,
                Some(tails + small / 4),
                disk("c"),
                bf16,
                0.5,
                0.0,
            ),
        ];
        if mha {
            runs.push(("host, recomputed", None, None, None, bf16, 1.0, 0.5));
            // Hidden states read straight from their host slots and regenerated in bf16 scratch
            // blocks, read one gather ahead where the scratch holds a whole gather.
            runs.push((
                "host, recomputed in GPU scratch",
                Some(0),
                None,
                None,
                bf16,
                1.0,
                0.5,
            ));
        }
        let mut reference = None;
        for (what, gpu_blocks, host_blocks, disk, kv_dtype, near, recompute) in runs {
            let placement = Placement {
                host_blocks,
                disk,
                kv_dtype,
                // 0: no GPU KV tier, scratch blocks only.
                gpu: gpu_blocks.map(|b| match b {
                    0 => with_scratch(gpu, &m, 0, 64, DType::BF16),
                    b => gpu_tier(gpu, &m, b, DType::BF16),
                }),
                policy: SinkAndRecent::default(),
            };
            let mut engine = routed_engine(gpu, &m, placement, near, recompute);
            let got = run(&mut engine, &e);
            let k = engine.kv.metrics();
            if recompute > 0.0 {
                assert!(k.recomputed_tokens > 0, "{name} {what}: nothing recomputed");
            }
            if gpu_blocks == Some(0) {
                assert!(
                    k.recomputed_tokens_read_ahead > 0,
                    "{name} {what}: no hidden states were read ahead"
                );
                assert!(
                    k.rows_appended_in_background > 0,
                    "{name} {what}: no decode row came down in the background"
                );
            }
            within_budgets(name, what, &k);
            let host_dtype = kv_dtype.unwrap_or(DType::BF16);
            assert_eq!(k.kv_dtype, host_dtype.name(), "{name} {what}");
            // Prompt passes over host KV come down through the scratch in whole blocks, and
            // under recompute with their f32 hidden states.
            let hidden_bytes = k.hidden_rows_through_scratch * (m.config.hidden * 4) as u64;
            assert_eq!(
                k.bytes_gpu_to_host,
                (k.gpu_spilled_blocks + k.blocks_through_scratch) * k.bytes_per_block as u64
                    + hidden_bytes,
                "{name} {what}: spilled bytes are not the host tier's blocks"
            );
            if gpu_blocks == Some(small) {
                assert!(k.gpu_spilled_blocks > 0, "{name} {what}: nothing spilled");
            }
            if near < 1.0 {
                assert!(k.fetched_blocks > 0, "{name} {what}: nothing was fetched");
                assert_eq!(
                    k.bytes_fetched,
                    k.fetched_blocks * k.bytes_per_block as u64,
                    "{name} {what}: fetched blocks were widened"
                );
            }
            let Some(reference) = &reference else {
                reference = Some(got);
                continue;
            };
            let reference: &Vec<(Vec<f32>, Vec<u32>)> = reference;
            for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
                assert_eq!(
                    a.1, b.1,
                    "{name}: bf16 KV, {what}, sequence {i}: tokens differ from the GPU-only run"
                );
                let want: Vec<f64> = a.0.iter().map(|&x| x as f64).collect();
                let err = max_rel_err(&b.0, &want);
                // Spilled blocks attended on the host (as before bf16 host tiers): the merge's
                // rounding only. Attention split differently between GPU and host can move a
                // later layer's K or V across a bf16 rounding boundary (one step is 2^-8), and
                // recomputed K and V come from a GEMM of another shape: both move logits more.
                let tol = match what {
                    "GPU + host + disk" | "GPU + f32 host + f32 disk" => 1e-5,
                    _ if recompute > 0.0 => 1e-3,
                    _ => 5e-4,
                };
                assert!(
                    err <= tol,
                    "{name}: bf16 KV, {what}, sequence {i}: logits rel err {err:.2e}"
                );
            }
            eprintln!("{name}: bf16 KV: GPU only and {what} agree");
        }
    }
}

/// `host_blocks` of host memory over a scratch disk tier (`tag` names its folder), an optional
/// GPU tier, and the sink-and-recent policy keeping one block of each.
fn host_and_disk(tag: &str, host_blocks: usize, gpu: Option<GpuTierConfig>) -> Placement {
    Placement {
        host_blocks: Some(host_blocks),
        disk: Some(scratch_disk("gpu-tiers", tag, IoEngine::Sync)),
        kv_dtype: None,
        gpu,
        policy: SinkAndRecent {
            sink_blocks: 1,
            recent_blocks: 1,
        },
    }
}

/// An engine on `gpu` with resident weights whose host and disk KV is attended `near` near the
/// data (the rest fetched) and whose full blocks keep hidden states for a `recompute` share.
fn routed_engine<'m>(
    gpu: &CudaBackend,
    m: &'m Model,
    placement: Placement,
    near: f64,
    recompute: f64,
) -> Engine<'m, CudaBackend> {
    let mut engine =
        Engine::with_backend(gpu.clone(), m, BLOCK_TOKENS, Residency::Resident, placement);
    let routes = AttentionRoutes {
        host_near: near,
        disk_near: near,
    };
    engine
        .kv
        .set_executor(routes, recompute, m.config.hidden)
        .unwrap();
    engine
}

/// The executor's routes on the CUDA backend, KV in host memory and on disk (no GPU KV tier):
/// far blocks fetched (all, or half with the rest attended near the data), KV regenerated from
/// stored hidden states (the MHA fixture; GQA models refuse it, their hidden states being larger
/// than K and V), and two GPU batches. Every point gives transformers' tokens and logits within
/// the golden tolerance, and the mechanism it names really ran. Then fetch with a GPU KV tier:
/// fetched blocks are imported into free pool blocks, or attended on the host when it is full.
#[test]
fn fetched_split_and_recomputed_kv_on_the_gpu_give_the_golden_tokens() {
    let Some(gpu) = test_gpu() else { return };
    for name in FIXTURES {
        let m = golden_model(name);
        let e = expected(name);
        let mha = stores_hidden_states(&m);
        let (small, tails) = small_gpu_tier(&m, &e);
        for (near, recompute, gpu_batches) in
            [(0.0, 0.0, 1), (0.5, 0.0, 2), (1.0, 0.5, 1), (0.0, 1.0, 2)]
        {
            if recompute > 0.0 && !mha {
                continue;
            }
            let what = format!("near {near}, recompute {recompute}, {gpu_batches} GPU batches");
            let placement = host_and_disk(&format!("{name}-routes"), tails + small / 4, None);
            let mut engine = routed_engine(gpu, &m, placement, near, recompute);
            engine.tf.set_gpu_batches(gpu_batches);
            let k = run_golden(&mut engine, name, &what, &e);
            assert!(
                k.spilled_blocks > 0,
                "{name} {what}: nothing reached the disk"
            );
            if near < 1.0 && recompute < 1.0 {
                assert!(k.fetched_blocks > 0, "{name} {what}: nothing was fetched");
            }
            if recompute > 0.0 {
                assert!(
                    k.recomputed_tokens > 0,
                    "{name} {what}: nothing was recomputed"
                );
            }
            eprintln!(
                "{name} {what}: fetched {} blocks, recomputed {} tokens, disk peak {}",
                k.fetched_blocks, k.recomputed_tokens, k.disk_blocks_peak
            );
        }
        // With a GPU KV tier: fetched blocks go into free pool blocks and are attended by the GPU
        // kernels; when the tier is full, the rest are attended on the host. Same tokens.
        for (near, gpu_blocks) in [(0.0, small), (0.5, small), (0.0, small + small / 2)] {
            let what = format!("GPU tier of {gpu_blocks} blocks, near {near}");
            let placement = Placement {
                host_blocks: None,
                disk: None,
                kv_dtype: None,
                gpu: Some(gpu_tier(gpu, &m, gpu_blocks, DType::F32)),
                policy: SinkAndRecent {
                    sink_blocks: 1,
                    recent_blocks: 1,
                },
            };
            let mut engine = routed_engine(gpu, &m, placement, near, 0.0);
            let k = run_golden(&mut engine, name, &what, &e);
            assert!(k.gpu_spilled_blocks > 0, "{name} {what}: nothing spilled");
            assert!(k.fetched_blocks > 0, "{name} {what}: nothing was fetched");
            eprintln!(
                "{name} {what}: fetched {} blocks, {} of them attended on the host (pool full)",
                k.fetched_blocks, k.fetched_attended_on_host
            );
        }
    }
}

/// Prompts prefilled in chunks of 3 rows (shorter than a block, so chunks split blocks and
/// prompts) whose earlier chunks have spilled: every chunk's attention over them runs on the GPU,
/// the host and disk blocks copied through scratch blocks a few at a time (many groups, merged
/// by LSE). With a small GPU KV tier over host and disk, and with no GPU KV at all (scratch
/// only; on the MHA fixture also with half the blocks kept as hidden states and recomputed).
/// Every case gives transformers' tokens and logits within the golden tolerance.
#[test]
fn chunked_prefill_attends_spilled_chunks_on_the_gpu_through_scratch() {
    let Some(gpu) = test_gpu() else { return };
    for name in FIXTURES {
        let m = golden_model(name);
        let e = expected(name);
        let mha = stores_hidden_states(&m);
        let (small, tails) = small_gpu_tier(&m, &e);
        for (kv_blocks, recompute) in [(small, 0.0), (0, 0.0), (0, 0.5)] {
            if recompute > 0.0 && !mha {
                continue;
            }
            let what = format!("GPU KV {kv_blocks} blocks + 2 scratch, recompute {recompute}");
            let tier = with_scratch(gpu, &m, kv_blocks, 2, DType::F32);
            let placement =
                host_and_disk(&format!("{name}-chunked"), tails + small / 4, Some(tier));
            let mut engine = routed_engine(gpu, &m, placement, 1.0, recompute);
            engine.prefill_chunk = 3;
            let k = run_golden(&mut engine, name, &what, &e);
            assert!(k.fetched_blocks > 0, "{name} {what}: nothing was fetched");
            if kv_blocks == 0 {
                assert!(k.scratch_groups > 0, "{name} {what}: one group only");
            }
            assert!(
                k.spilled_blocks > 0,
                "{name} {what}: nothing reached the disk"
            );
            eprintln!(
                "{name} {what}: fetched {} blocks in {} extra scratch groups, recomputed {} tokens",
                k.fetched_blocks, k.scratch_groups, k.recomputed_tokens
            );
        }
    }
}

/// Prompts over host KV with no GPU KV tier and a scratch that holds a pass: each prompt pass is
/// appended on the GPU into the scratch beside the blocks its sequences already hold, attended
/// there, and its blocks copied down to host memory whole (`KvCache::append_through_scratch`).
/// Whole prompts, and chunks of 5 rows (which end inside blocks, so a part-full tail goes up and
/// back down with the rows added to it; a chunk that holds one row of a prompt takes the host
/// path), over host memory alone and over a host tier small enough that earlier chunks reach the
/// disk. On the MHA fixture also with hidden states kept for recompute (half the full blocks, or
/// all): the pass's chosen blocks come down as hidden states, a part-full tail's earlier rows
/// joining them when the pass fills it, and a chunk whose earlier blocks are already hidden
/// states takes the host path. Every case gives transformers' tokens and logits, and passes
/// really went through the scratch.
#[test]
fn prompt_passes_over_host_kv_stay_in_scratch_and_go_down_whole() {
    let Some(gpu) = test_gpu() else { return };
    for name in FIXTURES {
        let m = golden_model(name);
        let e = expected(name);
        let mha = stores_hidden_states(&m);
        let (small, tails) = small_gpu_tier(&m, &e);
        for (chunk, disk, recompute) in [
            (usize::MAX, false, 0.0),
            (5, false, 0.0),
            (5, true, 0.0),
            (usize::MAX, false, 1.0),
            (5, false, 0.5),
            (5, true, 0.5),
        ] {
            if recompute > 0.0 && !mha {
                continue;
            }
            let what = format!(
                "scratch only, prompt chunks of {chunk} rows, disk {disk}, recompute {recompute}"
            );
            let tier = with_scratch(gpu, &m, 0, 64, DType::F32);
            let placement = if disk {
                host_and_disk(
                    &format!("{name}-through-scratch"),
                    tails + small / 4,
                    Some(tier),
                )
            } else {
                Placement {
                    gpu: Some(tier),
                    ..Placement::default()
                }
            };
            let mut engine = routed_engine(gpu, &m, placement, 1.0, recompute);
            engine.prefill_chunk = chunk;
            let k = run_golden(&mut engine, name, &what, &e);
            assert!(
                k.passes_through_scratch > 0 && k.blocks_through_scratch > 0,
                "{name} {what}: no pass went through the scratch: {k:?}"
            );
            if recompute > 0.0 {
                assert!(
                    k.hidden_blocks_stored > 0
                        && k.hidden_rows_through_scratch > 0
                        && k.recomputed_tokens > 0,
                    "{name} {what}: no hidden states kept or used: {k:?}"
                );
            }
            if chunk < usize::MAX {
                assert!(
                    k.fetched_blocks > 0,
                    "{name} {what}: no earlier chunk was fetched"
                );
            }
            if disk {
                assert!(
                    k.spilled_blocks > 0,
                    "{name} {what}: nothing reached the disk"
                );
            }
            eprintln!(
                "{name} {what}: {} passes, {} blocks through the scratch, {} fetched, {} hidden \
                 blocks stored",
                k.passes_through_scratch,
                k.blocks_through_scratch,
                k.fetched_blocks,
                k.hidden_blocks_stored
            );
        }
    }
}
