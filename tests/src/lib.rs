//! Helpers shared by the end-to-end tests in `tests/tests/`: locating fixtures, running a model's
//! forward pass directly (prefill, greedy decode, logits at every position), and comparing logits.

pub mod kv_tiers;

use std::path::PathBuf;

use strata_kernels::{CpuBackend, DType};
use strata_runtime::forward::{Residency, Row, RuntimeBackend, Transformer};
use strata_runtime::kv::policy::SinkAndRecent;
use strata_runtime::kv::{
    DiskTierConfig, GpuTierConfig, IoEngine, KvCache, KvCacheConfig, KvGeometry, SeqId,
};
use strata_runtime::model::Model;
use strata_runtime::sampling::argmax;

/// The repository root: `STRATA_REPO` when set (test binaries copied to another machine), else
/// where this crate was built.
pub fn workspace_root() -> PathBuf {
    match std::env::var_os("STRATA_REPO") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

/// A 64 MiB disk tier in a scratch folder of the temp dir, unique to this process, `suite` and
/// `tag` (the folder is created; the store removes its files when it drops).
pub fn scratch_disk(suite: &str, tag: &str, engine: IoEngine) -> DiskTierConfig {
    let dir = std::env::temp_dir().join(format!("strata-{suite}-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch disk folder");
    DiskTierConfig {
        dir,
        bytes: 64 << 20,
        engine,
        queue_depth: 8,
        faults: None,
    }
}

pub fn fixture(rel: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(rel)
}

/// The SmolLM2 GGUF that `scripts/get-smollm2.sh` fetches, or `None` after printing that the
/// test skipped; a missing file fails instead when `STRATA_REQUIRE_SMOLLM2=1` (as in CI).
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = workspace_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return Some(path);
    }
    if std::env::var("STRATA_REQUIRE_SMOLLM2").is_ok_and(|v| v == "1") {
        panic!("{} is missing; run scripts/get-smollm2.sh", path.display());
    }
    eprintln!(
        "skipped: {} is missing (run scripts/get-smollm2.sh)",
        path.display()
    );
    None
}

/// A golden fixture's model path, its cases' prompts (token ids) and the tokens each case
/// generates.
pub fn golden_case(name: &str) -> (String, Vec<Vec<u32>>, usize) {
    let dir = fixture(&format!("golden/{name}"));
    let e = read_json(&dir.join("expected.json"));
    let prompts = e["cases"]
        .as_array()
        .expect("golden cases")
        .iter()
        .map(|c| json_u32s(&c["input_ids"]))
        .collect();
    let n = e["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
    (dir.to_string_lossy().into_owned(), prompts, n)
}

/// The prompts (token ids) of SmolLM2's reference cases.
pub fn smollm2_prompts() -> Vec<Vec<u32>> {
    read_json(&fixture("smollm2/reference.json"))["cases"]
        .as_array()
        .expect("reference cases")
        .iter()
        .map(|c| json_u32s(&c["input_ids"]))
        .collect()
}

/// Where the KV cache lives in a test: host only, or a small host tier over a disk tier, with a
/// GPU tier above them when computing on a GPU.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Host KV budget in blocks (`None`: plenty).
    pub host_blocks: Option<usize>,
    pub disk: Option<DiskTierConfig>,
    pub gpu: Option<GpuTierConfig>,
    pub policy: SinkAndRecent,
    /// The host and disk tiers' K and V dtype (`None`: the GPU tier's when there is one, else
    /// f32, as `strata generate` on a GPU with a GPU tier and on the CPU).
    pub kv_dtype: Option<DType>,
}

/// A model with an empty KV cache, ready to run sequences through.
pub struct Engine<'m, B: RuntimeBackend = CpuBackend> {
    pub tf: Transformer<'m, B>,
    pub kv: KvCache,
    /// Prompt rows per forward pass in [`Engine::greedy_batch`] (as `generate --prefill-chunk`):
    /// a chunk attends the earlier chunks' KV wherever it has gone by then.
    pub prefill_chunk: usize,
    /// Whether each chunk names the next ([`Transformer::expect_next_pass`], as `generate`
    /// does), so its last layer reads the next chunk's first disk blocks ahead.
    pub expect_next_chunk: bool,
    next_seq: u64,
}

impl<'m> Engine<'m, CpuBackend> {
    pub fn new(model: &'m Model, block_tokens: usize) -> Self {
        Self::with_placement(model, block_tokens, true, Placement::default())
    }

    /// `resident = false` loads each layer's weights from the source on every forward pass.
    pub fn with_residency(model: &'m Model, block_tokens: usize, resident: bool) -> Self {
        Self::with_placement(model, block_tokens, resident, Placement::default())
    }

    pub fn with_placement(
        model: &'m Model,
        block_tokens: usize,
        resident: bool,
        placement: Placement,
    ) -> Self {
        let residency = if resident {
            Residency::Resident
        } else {
            Residency::Streamed
        };
        Engine::with_backend(CpuBackend::new(), model, block_tokens, residency, placement)
    }
}

impl<'m, B: RuntimeBackend> Engine<'m, B> {
    pub fn with_backend(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        residency: Residency,
        placement: Placement,
    ) -> Self {
        Self::with_weights_disk(backend, model, block_tokens, residency, placement, None)
    }

    /// [`Engine::with_backend`], with the disk that a [`Residency::Split`]'s disk layers go to.
    pub fn with_weights_disk(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        residency: Residency,
        placement: Placement,
        weights_disk: Option<&DiskTierConfig>,
    ) -> Self {
        let c = &model.config;
        let tf = Transformer::with_placement(backend, model, block_tokens, residency, weights_disk)
            .expect("load model");
        let geometry = KvGeometry {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            block_tokens,
        };
        let kv_dtype = placement
            .kv_dtype
            .or(placement.gpu.as_ref().map(|g| g.dtype))
            .unwrap_or(DType::F32);
        let stride = geometry.bytes_per_block(kv_dtype).next_multiple_of(4096) as u64;
        let host_bytes = placement
            .host_blocks
            .map_or(256 << 20, |b| b as u64 * stride);
        let kv = KvCache::new(KvCacheConfig {
            geometry,
            host_bytes,
            kv_dtype,
            disk: placement.disk,
            gpu: placement.gpu,
            policy: Box::new(placement.policy),
        })
        .expect("KV cache");
        Self {
            tf,
            kv,
            prefill_chunk: usize::MAX,
            expect_next_chunk: true,
            next_seq: 0,
        }
    }

    fn new_seq(&mut self) -> SeqId {
        let s = SeqId(self.next_seq);
        self.next_seq += 1;
        self.kv.add_sequence(s);
        s
    }

    /// Logits `[vocab]` at every position of `ids` (one prefill), for a fresh sequence.
    pub fn all_logits(&mut self, ids: &[u32]) -> Vec<Vec<f32>> {
        let s = self.new_seq();
        let rows: Vec<Row> = ids
            .iter()
            .enumerate()
            .map(|(pos, &token)| Row { seq: s, pos, token })
            .collect();
        let want: Vec<usize> = (0..rows.len()).collect();
        let out = self
            .tf
            .forward(&rows, &want, &mut self.kv)
            .expect("forward");
        self.kv.remove_sequence(s).expect("free KV");
        out
    }

    /// Prefills each prompt (all in one forward), then decodes `n` greedy tokens for all of them
    /// together, one decode step per token. Returns the last prompt position's logits and the
    /// greedy tokens, per prompt. EOS does not stop generation.
    pub fn greedy_batch(&mut self, prompts: &[Vec<u32>], n: usize) -> Vec<(Vec<f32>, Vec<u32>)> {
        let seqs: Vec<SeqId> = prompts.iter().map(|_| self.new_seq()).collect();
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for (p, &s) in prompts.iter().zip(&seqs) {
            rows.extend(
                p.iter()
                    .enumerate()
                    .map(|(pos, &token)| Row { seq: s, pos, token }),
            );
            last.push(rows.len() - 1);
        }
        // Chunks of `prefill_chunk` rows, each giving the logits of the prompts that end in it.
        let mut first = Vec::with_capacity(prompts.len());
        let chunk = self.prefill_chunk.max(1);
        for start in (0..rows.len()).step_by(chunk) {
            let end = rows.len().min(start.saturating_add(chunk));
            if self.expect_next_chunk && end < rows.len() {
                let next = rows.len().min(end.saturating_add(chunk));
                self.tf.expect_next_pass(&rows[end..next]);
            }
            let ends: Vec<usize> = last
                .iter()
                .filter(|&&l| (start..end).contains(&l))
                .map(|&l| l - start)
                .collect();
            let logits = self
                .tf
                .forward(&rows[start..end], &ends, &mut self.kv)
                .expect("prefill");
            first.extend(logits);
        }
        let mut out: Vec<(Vec<f32>, Vec<u32>)> =
            first.iter().map(|l| (l.clone(), vec![argmax(l)])).collect();
        for step in 1..n {
            let rows: Vec<Row> = seqs
                .iter()
                .zip(prompts)
                .zip(&out)
                .map(|((&s, p), o)| Row {
                    seq: s,
                    pos: p.len() + step - 1,
                    token: o.1[step - 1],
                })
                .collect();
            let want: Vec<usize> = (0..rows.len()).collect();
            let logits = self.tf.forward(&rows, &want, &mut self.kv).expect("decode");
            for (o, l) in out.iter_mut().zip(&logits) {
                o.1.push(argmax(l));
            }
        }
        for s in seqs {
            self.kv.remove_sequence(s).expect("free KV");
        }
        out
    }
}

/// `max |got - want| / max |want|`.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "logit vector lengths differ");
    let scale = want.iter().fold(1e-12f64, |a, &b| a.max(b.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs() / scale))
}

pub fn json_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

pub fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
