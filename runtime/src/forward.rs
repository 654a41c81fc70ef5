//! The transformer forward pass, top to bottom, for every supported family, written against the
//! [`Backend`] trait. One call processes a set of rows — each row one token of one sequence at
//! one position — so a prefill (many rows of one sequence) and a decode step (one row for each of
//! many ragged sequences) are the same code. Each layer appends the rows' K and V to the block
//! table first, then attends every row over its own sequence's blocks (causally, by position) as
//! mergeable partials.
//!
//! Weights are resident when they fit; otherwise each layer is loaded from its source, used and
//! dropped (synthetic models of any size run this way).

use std::time::Instant;

use strata_kernels::{AttentionGeometry, Backend, RopeTable};
use tracing::debug_span;

use crate::error::ModelResult;
use crate::kv::{KvCache, KvError, SeqId, TierQuery};
use crate::model::{Family, LayerTensor, Model, ModelConfig, WeightName, WeightSource};

/// One token of one sequence at one position.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub seq: SeqId,
    pub pos: usize,
    pub token: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    #[error(transparent)]
    Kernel(#[from] strata_kernels::KernelError),
    #[error(transparent)]
    Kv(#[from] KvError),
}

enum Mlp<W> {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu { gate: W, up: W, down: W },
    /// `fc2(relu(fc1(x) + b1)) + b2`.
    Relu { fc1: W, fc1_b: W, fc2: W, fc2_b: W },
}

struct LayerWeights<W> {
    attn_norm: W,
    attn_norm_b: Option<W>,
    q: W,
    k: W,
    v: W,
    o: W,
    q_b: Option<W>,
    k_b: Option<W>,
    v_b: Option<W>,
    o_b: Option<W>,
    mlp_norm: W,
    mlp_norm_b: Option<W>,
    mlp: Mlp<W>,
}

/// Weights resident for the whole run, or loaded per use.
enum Layers<W> {
    Resident(Vec<LayerWeights<W>>),
    Streamed,
}

pub struct Transformer<'m, B: Backend> {
    backend: B,
    cfg: ModelConfig,
    source: &'m dyn WeightSource,
    layers: Layers<B::Weight>,
    embed: B::Weight,
    pos_embed: Option<B::Weight>,
    final_norm: B::Weight,
    final_norm_b: Option<B::Weight>,
    /// `None` when tied to `embed`.
    lm_head: Option<B::Weight>,
    rope: RopeTable,
    attention: AttentionGeometry,
    pub timings: LayerTimings,
}

/// Seconds spent loading streamed weights (zero when resident).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerTimings {
    pub weight_load_s: f64,
}

fn upload<B: Backend>(b: &B, src: &dyn WeightSource, name: WeightName) -> ModelResult<B::Weight> {
    Ok(b.upload_weight(src.load(name)?)?)
}

fn load_layer<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    i: usize,
) -> ModelResult<LayerWeights<B::Weight>> {
    use LayerTensor::*;
    let w = |t| upload(b, src, WeightName::Layer(i, t));
    let opt = cfg.family == Family::Opt;
    let maybe = |on: bool, t| if on { w(t).map(Some) } else { Ok(None) };
    let mlp = if opt {
        Mlp::Relu {
            fc1: w(Fc1)?,
            fc1_b: w(Fc1Bias)?,
            fc2: w(Fc2)?,
            fc2_b: w(Fc2Bias)?,
        }
    } else {
        Mlp::SwiGlu {
            gate: w(Gate)?,
            up: w(Up)?,
            down: w(Down)?,
        }
    };
    Ok(LayerWeights {
        attn_norm: w(AttnNorm)?,
        attn_norm_b: maybe(opt, AttnNormBias)?,
        q: w(Q)?,
        k: w(K)?,
        v: w(V)?,
        o: w(O)?,
        q_b: maybe(cfg.qkv_bias, QBias)?,
        k_b: maybe(cfg.qkv_bias, KBias)?,
        v_b: maybe(cfg.qkv_bias, VBias)?,
        o_b: maybe(cfg.o_bias, OBias)?,
        mlp_norm: w(MlpNorm)?,
        mlp_norm_b: maybe(opt, MlpNormBias)?,
        mlp,
    })
}

impl<'m, B: Backend> Transformer<'m, B> {
    /// Loads the model's global tensors, and every layer too when `resident`.
    pub fn new(
        backend: B,
        model: &'m Model,
        block_tokens: usize,
        resident: bool,
    ) -> ModelResult<Self> {
        let cfg = model.config.clone();
        let src = model.weights.as_ref();
        let opt = cfg.family == Family::Opt;
        let layers = if resident {
            Layers::Resident(
                (0..cfg.layers)
                    .map(|i| load_layer(&backend, &cfg, src, i))
                    .collect::<ModelResult<_>>()?,
            )
        } else {
            Layers::Streamed
        };
        let embed = upload(&backend, src, WeightName::Embed)?;
        check_shape(&backend, &embed, cfg.vocab, cfg.hidden, "embedding table")?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(upload(&backend, src, WeightName::LmHead)?)
        };
        let attention = AttentionGeometry {
            n_heads: cfg.heads,
            n_kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_tokens,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
        };
        Ok(Self {
            pos_embed: if opt {
                Some(upload(&backend, src, WeightName::PosEmbed)?)
            } else {
                None
            },
            final_norm: upload(&backend, src, WeightName::FinalNorm)?,
            final_norm_b: if opt {
                Some(upload(&backend, src, WeightName::FinalNormBias)?)
            } else {
                None
            },
            rope: RopeTable::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling),
            backend,
            cfg,
            source: src,
            layers,
            embed,
            lm_head,
            attention,
            timings: LayerTimings::default(),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs `rows` through the model, appending their KV, and returns the logits `[vocab]` of the
    /// rows listed in `logit_rows` (indices into `rows`), in that order.
    pub fn forward(
        &mut self,
        rows: &[Row],
        logit_rows: &[usize],
        kv: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let b = &self.backend;
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        // x: [rows, hidden]
        let mut x = b.embedding(&self.embed, &tokens)?;
        if let Some(pe) = &self.pos_embed {
            // OPT's learned positions start at offset 2.
            let ids: Vec<u32> = rows.iter().map(|r| (r.pos + 2) as u32).collect();
            let p = b.embedding(pe, &ids)?;
            b.add_inplace(&mut x, &p)?;
        }
        for i in 0..self.cfg.layers {
            let _span = debug_span!("layer", i).entered();
            match &self.layers {
                Layers::Resident(ls) => x = self.layer(&ls[i], i, x, rows, kv)?,
                Layers::Streamed => {
                    let t0 = Instant::now();
                    let lw = load_layer(b, &self.cfg, self.source, i)?;
                    self.timings.weight_load_s += t0.elapsed().as_secs_f64();
                    x = self.layer(&lw, i, x, rows, kv)?;
                }
            }
        }
        let _span = debug_span!("logits").entered();
        let last = b.gather_rows(&x, logit_rows)?;
        let h = self.norm(&last, &self.final_norm, self.final_norm_b.as_ref())?;
        let logits = b.linear(&h, self.lm_head.as_ref().unwrap_or(&self.embed), None)?;
        let flat = b.to_host(&logits)?;
        Ok(flat
            .chunks_exact(self.cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn norm(
        &self,
        x: &B::Tensor,
        w: &B::Weight,
        bias: Option<&B::Weight>,
    ) -> Result<B::Tensor, ForwardError> {
        Ok(match bias {
            Some(bias) => self.backend.layer_norm(x, w, bias, self.cfg.norm_eps)?,
            None => self.backend.rms_norm(x, w, self.cfg.norm_eps)?,
        })
    }

    fn layer(
        &self,
        w: &LayerWeights<B::Weight>,
        layer: usize,
        mut x: B::Tensor,
        rows: &[Row],
        kv: &mut KvCache,
    ) -> Result<B::Tensor, ForwardError> {
        let b = &self.backend;
        let cfg = &self.cfg;
        // Attention block.
        let h = self.norm(&x, &w.attn_norm, w.attn_norm_b.as_ref())?;
        let mut q = b.linear(&h, &w.q, w.q_b.as_ref())?; // [rows, heads * head_dim]
        let mut k = b.linear(&h, &w.k, w.k_b.as_ref())?; // [rows, kv_heads * head_dim]
        let v = b.linear(&h, &w.v, w.v_b.as_ref())?;
        if cfg.family != Family::Opt {
            let positions: Vec<usize> = rows.iter().map(|r| r.pos).collect();
            b.rope(&mut q, cfg.heads, &positions, &self.rope)?;
            b.rope(&mut k, cfg.kv_heads, &positions, &self.rope)?;
        }
        let (qh, kh, vh) = (b.to_host(&q)?, b.to_host(&k)?, b.to_host(&v)?);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        for (r, row) in rows.iter().enumerate() {
            kv.append(
                row.seq,
                layer,
                row.pos,
                &kh[r * kvd..(r + 1) * kvd],
                &vh[r * kvd..(r + 1) * kvd],
            )?;
        }
        let queries: Vec<TierQuery<'_>> = rows
            .iter()
            .enumerate()
            .map(|(r, row)| TierQuery {
                seq: row.seq,
                pos: row.pos,
                q: &qh[r * qd..(r + 1) * qd],
            })
            .collect();
        let attn: Vec<f32> = kv
            .attend(layer, &queries, &self.attention)?
            .into_iter()
            .flat_map(|p| p.o)
            .collect();
        let attn = b.tensor(rows.len(), qd, attn)?;
        let o = b.linear(&attn, &w.o, w.o_b.as_ref())?;
        b.add_inplace(&mut x, &o)?;
        // MLP block.
        let h = self.norm(&x, &w.mlp_norm, w.mlp_norm_b.as_ref())?;
        let out = match &w.mlp {
            Mlp::SwiGlu { gate, up, down } => {
                let act = b.swiglu(&b.linear(&h, gate, None)?, &b.linear(&h, up, None)?)?;
                b.linear(&act, down, None)?
            }
            Mlp::Relu {
                fc1,
                fc1_b,
                fc2,
                fc2_b,
            } => {
                let mut a = b.linear(&h, fc1, Some(fc1_b))?;
                b.relu_inplace(&mut a)?;
                b.linear(&a, fc2, Some(fc2_b))?
            }
        };
        b.add_inplace(&mut x, &out)?;
        Ok(x)
    }
}

fn check_shape<B: Backend>(
    b: &B,
    w: &B::Weight,
    rows: usize,
    cols: usize,
    what: &str,
) -> ModelResult<()> {
    let (r, c) = b.weight_shape(w);
    if (r, c) != (rows, cols) {
        return Err(crate::error::ModelError::spec(
            what,
            format!("has shape [{r}, {c}] but the config implies [{rows}, {cols}]"),
        ));
    }
    Ok(())
}

/// Bytes the model's weights take in their stored dtype (for the resident-or-streamed choice).
pub fn weight_bytes(cfg: &ModelConfig) -> u64 {
    cfg.param_count() * cfg.dtype.size_bytes() as u64
}
