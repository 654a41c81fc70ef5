//! `synthetic:<preset>` models: the real shapes of well-known models with deterministic random
//! weights made on demand, one tensor at a time (FlexGen calls these dummy weights). Nothing is
//! read from disk and nothing is kept: a model larger than memory is regenerated layer by layer.
//!
//! Spec syntax: `synthetic:<preset>[:layers=N][:intermediate=N][:vocab=N]`; `layers=N` keeps the
//! first N layers, for quick measurements of a big model's per-layer cost; `intermediate` and
//! `vocab` (multiples of 8) change the MLP's width and the vocabulary.

use rayon::prelude::*;
use strata_kernels::{DType, HostWeight, RopeScaling, WeightData};

use super::config::{Family, ModelConfig};
use super::weights::{LayerTensor, WeightName, WeightSource};
use crate::error::{ModelError, ModelResult};

struct Preset {
    name: &'static str,
    family: Family,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    max_context: usize,
}

const fn opt(name: &'static str, hidden: usize, layers: usize, heads: usize) -> Preset {
    Preset {
        name,
        family: Family::Opt,
        hidden,
        layers,
        heads,
        kv_heads: heads,
        intermediate: 4 * hidden,
        vocab: 50272,
        max_context: 2048,
    }
}

const PRESETS: &[Preset] = &[
    opt("opt-125m", 768, 12, 12),
    opt("opt-1.3b", 2048, 24, 32),
    opt("opt-6.7b", 4096, 32, 32),
    opt("opt-13b", 5120, 40, 40),
    opt("opt-30b", 7168, 48, 56),
    opt("opt-66b", 9216, 64, 72),
    opt("opt-175b", 12288, 96, 96),
    Preset {
        name: "llama-2-7b",
        family: Family::Llama,
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        intermediate: 11008,
        vocab: 32000,
        max_context: 4096,
    },
    Preset {
        name: "llama-3-8b",
        family: Family::Llama,
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 128256,
        max_context: 131072,
    },
    Preset {
        name: "qwen2.5-7b",
        family: Family::Qwen2,
        hidden: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        intermediate: 18944,
        vocab: 152064,
        max_context: 32768,
    },
    Preset {
        name: "tiny-llama",
        family: Family::Llama,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        vocab: 256,
        max_context: 1024,
    },
    Preset {
        name: "tiny-qwen2",
        family: Family::Qwen2,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        vocab: 256,
        max_context: 1024,
    },
    // Long-context tiering runs on a CPU: a small model whose KV still reaches 100K+ tokens.
    Preset {
        name: "tiny-long",
        family: Family::Llama,
        hidden: 256,
        layers: 2,
        heads: 4,
        kv_heads: 1,
        intermediate: 512,
        vocab: 512,
        max_context: 131072,
    },
    Preset {
        name: "tiny-opt",
        family: Family::Opt,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 4,
        intermediate: 256,
        vocab: 256,
        max_context: 1024,
    },
];

pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// Parses `<preset>[:layers=N][:intermediate=N][:vocab=N]` (the part after `synthetic:`) into a
/// config: the preset with fewer layers, or another MLP width or vocabulary (`strata calibrate`
/// times the host's work per decode layer on Llama-3-8B's attention with a small MLP and
/// vocabulary, so the GPU's share stays small).
pub fn config(spec: &str) -> ModelResult<ModelConfig> {
    let full = format!("synthetic:{spec}");
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or_default();
    let p = PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        ModelError::spec(
            &full,
            format!(
                "unknown preset `{name}` (known: {})",
                preset_names().join(", ")
            ),
        )
    })?;
    let mut layers = p.layers;
    let (mut intermediate, mut vocab) = (p.intermediate, p.vocab);
    let positive = |key: &str, n: &str| {
        n.parse::<usize>()
            .ok()
            .filter(|&n| n >= 8 && n.is_multiple_of(8))
            .ok_or_else(|| {
                ModelError::spec(
                    &full,
                    format!("`{key}={n}` must be a multiple of 8, at least 8"),
                )
            })
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("intermediate", n)) => intermediate = positive("intermediate", n)?,
            Some(("vocab", n)) => vocab = positive("vocab", n)?,
            Some(("layers", n)) => {
                layers = n
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1 && n <= p.layers)
                    .ok_or_else(|| {
                        ModelError::spec(
                            &full,
                            format!("`layers={n}` must be between 1 and {}", p.layers),
                        )
                    })?;
            }
            _ => {
                return Err(ModelError::spec(
                    &full,
                    format!("unknown option `{opt}` (known: layers=N, intermediate=N, vocab=N)"),
                ));
            }
        }
    }
    let tiny = name.starts_with("tiny-");
    let (theta, scaling, eps) = match (p.family, name) {
        (Family::Opt, _) => (0.0, RopeScaling::None, 1e-5),
        (_, "llama-3-8b") => (
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
            1e-5,
        ),
        (_, "qwen2.5-7b") => (1_000_000.0, RopeScaling::None, 1e-6),
        _ => (10000.0, RopeScaling::None, 1e-5),
    };
    let dtype = match (tiny, p.family) {
        (true, _) => DType::F32,
        (false, Family::Opt) => DType::F16,
        (false, _) => DType::BF16,
    };
    Ok(ModelConfig {
        family: p.family,
        model_type: format!("synthetic:{name}"),
        hidden: p.hidden,
        layers,
        heads: p.heads,
        kv_heads: p.kv_heads,
        head_dim: p.hidden / p.heads,
        intermediate,
        vocab,
        max_context: p.max_context,
        max_context_source: format!("{full}: preset context"),
        norm_eps: eps,
        rope_theta: theta,
        rope_scaling: scaling,
        tie_embeddings: p.family == Family::Opt,
        qkv_bias: p.family != Family::Llama,
        o_bias: p.family == Family::Opt,
        dtype,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}

pub struct SyntheticSource {
    cfg: ModelConfig,
}

impl SyntheticSource {
    pub fn new(cfg: ModelConfig) -> Self {
        Self { cfg }
    }

    fn shape(&self, name: WeightName) -> (usize, usize, Fill) {
        let c = &self.cfg;
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.intermediate);
        use LayerTensor::*;
        match name {
            WeightName::Embed | WeightName::LmHead => (c.vocab, h, Fill::Uniform(1.0)),
            WeightName::PosEmbed => (c.max_context + 2, h, Fill::Uniform(0.5)),
            WeightName::FinalNorm => (1, h, Fill::One),
            WeightName::FinalNormBias => (1, h, Fill::Uniform(0.02)),
            WeightName::Layer(_, t) => match t {
                AttnNorm | MlpNorm => (1, h, Fill::One),
                AttnNormBias | MlpNormBias | OBias | Fc2Bias => (1, h, Fill::Uniform(0.02)),
                Q => (q, h, Fill::fan_in(h)),
                K | V => (kv, h, Fill::fan_in(h)),
                O => (h, q, Fill::fan_in(q)),
                QBias => (1, q, Fill::Uniform(0.02)),
                KBias | VBias => (1, kv, Fill::Uniform(0.02)),
                Gate | Up | Fc1 => (f, h, Fill::fan_in(h)),
                Fc1Bias => (1, f, Fill::Uniform(0.02)),
                Down | Fc2 => (h, f, Fill::fan_in(f)),
            },
        }
    }
}

#[derive(Clone, Copy)]
enum Fill {
    One,
    /// Uniform in `[-a, a]`.
    Uniform(f32),
}

impl Fill {
    /// Keeps each projection's output at roughly unit scale, so deep stacks stay finite.
    fn fan_in(n: usize) -> Fill {
        Fill::Uniform((3.0 / n as f32).sqrt())
    }
}

/// SplitMix64's step between states: the state after `k` values is the seed plus `k` of them.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: tiny, fast, and good enough for dummy weights and sampling.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(SPLITMIX_GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_seed(name: WeightName) -> u64 {
    // FNV-1a over the Debug form: stable across runs and platforms.
    format!("{name:?}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}

const CHUNK: usize = 1 << 16;

/// `n` values of `fill`, deterministic in `seed`, each chunk from its own stream (so the result
/// does not depend on how rayon splits the work), converted by `conv`. SplitMix64 is a counter
/// hashed, so each value is computed on its own and rayon writes them straight into the vector
/// from every thread: the pages of a multi-GiB tensor are first touched in parallel too.
fn fill_values<T: Send + Copy>(
    n: usize,
    seed: u64,
    fill: Fill,
    conv: impl Fn(f32) -> T + Sync + Send,
) -> Vec<T> {
    (0..n)
        .into_par_iter()
        .with_min_len(CHUNK)
        .map(|j| {
            conv(match fill {
                Fill::One => 1.0,
                Fill::Uniform(a) => {
                    let chunk = (j / CHUNK) as u64;
                    // The state after the value's place in its chunk's stream.
                    let mut s = (seed ^ chunk.wrapping_mul(0xA24B_AED4_963E_E407))
                        .wrapping_add(((j % CHUNK) as u64).wrapping_mul(SPLITMIX_GAMMA));
                    ((splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
                }
            })
        })
        .collect()
}

impl WeightSource for SyntheticSource {
    fn load(&self, name: WeightName) -> ModelResult<HostWeight> {
        // A tied model's head is its embedding table.
        let name = if name == WeightName::LmHead && self.cfg.tie_embeddings {
            WeightName::Embed
        } else {
            name
        };
        let (rows, cols, fill) = self.shape(name);
        let seed = name_seed(name);
        let n = rows * cols;
        // Generated straight into the stored dtype, chunk by chunk: no f32 copy of the whole tensor.
        let data = match self.cfg.dtype {
            DType::F32 => WeightData::F32(fill_values(n, seed, fill, |x| x)),
            DType::F16 => WeightData::F16(fill_values(n, seed, fill, half::f16::from_f32)),
            DType::BF16 => WeightData::BF16(fill_values(n, seed, fill, half::bf16::from_f32)),
        };
        Ok(HostWeight::new(rows, cols, data)?)
    }

    fn describe(&self) -> String {
        format!(
            "synthetic weights ({}), generated on demand",
            self.cfg.dtype.name()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::config;

    /// Every value is the one its chunk's sequential SplitMix64 stream gives at its place, so
    /// the weights do not depend on how the work is split (nor changed when the fill went
    /// parallel); chunks start fresh streams.
    #[test]
    fn filled_values_follow_each_chunks_sequential_stream() {
        use super::{CHUNK, Fill, fill_values, splitmix64};
        let (n, seed, a) = (CHUNK + CHUNK / 2 + 3, 0x5eed_u64, 0.25f32);
        let got = fill_values(n, seed, Fill::Uniform(a), |x| x);
        let mut want = Vec::with_capacity(n);
        for (i, len) in [(0u64, CHUNK), (1, n - CHUNK)] {
            let mut s = seed ^ i.wrapping_mul(0xA24B_AED4_963E_E407);
            for _ in 0..len {
                want.push(
                    ((splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a,
                );
            }
        }
        assert_eq!(got, want);
        assert!(got.iter().all(|v| v.abs() <= a));
        assert!(
            fill_values(5, seed, Fill::One, |x| x)
                .iter()
                .all(|&v| v == 1.0)
        );
    }

    #[test]
    fn options_change_layers_mlp_width_and_vocabulary() {
        let c = config("llama-3-8b:layers=4:intermediate=256:vocab=512").unwrap();
        assert_eq!((c.layers, c.intermediate, c.vocab), (4, 256, 512));
        assert_eq!(
            (c.hidden, c.heads, c.kv_heads, c.head_dim),
            (4096, 32, 8, 128)
        );
        for bad in [
            "llama-3-8b:vocab=7",
            "llama-3-8b:intermediate=0",
            "llama-3-8b:depth=2",
        ] {
            let e = config(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("synthetic:{bad}")), "{e}");
        }
    }
}
