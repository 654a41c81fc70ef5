//! Scalar reference kernels: the slow, obviously correct versions the fast kernels are tested
//! against. They accumulate in f64 and follow the textbook formula, one loop per idea.

use crate::attention::{AttentionGeometry, KvBlockView, Partial};
use crate::{HostWeight, RopeTable};

/// `x: [m, k]`, `w: [n, k]` → `[m, n]`.
pub fn linear(x: &[f32], m: usize, w: &HostWeight, bias: Option<&HostWeight>) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let wf = w.data.to_f32_vec();
    let bf = bias.map(|b| b.data.to_f32_vec());
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * wf[j * k + p] as f64;
            }
            if let Some(b) = &bf {
                s += b[j] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

pub fn rms_norm(x: &[f32], cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (v as f64 * inv) as f32 * g),
        );
    }
    out
}

pub fn layer_norm(x: &[f32], cols: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for i in 0..cols {
            out.push((((row[i] as f64 - mean) * inv) as f32) * w[i] + b[i]);
        }
    }
    out
}

/// Rotate-half RoPE on `x: [rows, heads * head_dim]`, angles in f64.
pub fn rope(x: &[f32], positions: &[usize], table: &RopeTable) -> Vec<f32> {
    let hd = table.head_dim;
    let half = hd / 2;
    let cols = x.len() / positions.len();
    let mut out = x.to_vec();
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..cols / hd {
            let base = r * cols + h * hd;
            for i in 0..half {
                let angle = pos as f64 * table.inv_freq[i] as f64;
                let (s, c) = angle.sin_cos();
                let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                out[base + i] = (x1 * c - x2 * s) as f32;
                out[base + i + half] = (x2 * c + x1 * s) as f32;
            }
        }
    }
    out
}

pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

pub fn relu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

pub fn softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        out.extend(row.iter().map(|&v| ((v as f64 - m).exp() / sum) as f32));
    }
    out
}

pub fn embedding(table: &HostWeight, ids: &[u32]) -> Vec<f32> {
    let wf = table.data.to_f32_vec();
    let d = table.cols;
    ids.iter()
        .flat_map(|&id| wf[id as usize * d..(id as usize + 1) * d].to_vec())
        .collect()
}

/// Attention of one query over all visible tokens of `blocks`, by the two-pass textbook softmax
/// over the gathered scores (no streaming, no blocking), in f64.
pub fn attention(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    let hd = g.head_dim;
    let mut out = Partial::empty(g.n_heads, hd);
    for h in 0..g.n_heads {
        let kvh = h / (g.n_heads / g.n_kv_heads);
        let mut scores = Vec::new();
        let mut values = Vec::new();
        for b in blocks {
            let (bk, bv) = (b.k.to_f32_vec(), b.v.to_f32_vec());
            for t in 0..b.len {
                if b.start_pos + t > q_pos {
                    continue;
                }
                let off = kvh * g.block_tokens * hd + t * hd;
                let s: f64 = (0..hd)
                    .map(|i| q[h * hd + i] as f64 * bk[off + i] as f64)
                    .sum();
                scores.push(s * g.scale as f64);
                values.push(bv[off..off + hd].to_vec());
            }
        }
        if scores.is_empty() {
            continue;
        }
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for i in 0..hd {
            let o: f64 = scores
                .iter()
                .zip(&values)
                .map(|(s, v)| (s - m).exp() * v[i] as f64)
                .sum::<f64>();
            out.o[h * hd + i] = (o / sum) as f32;
        }
        out.lse[h] = (m + sum.ln()) as f32;
    }
    out
}
