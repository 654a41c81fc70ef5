//! Rotary position embeddings: the inverse-frequency table (default, linear and Llama-3 scaling)
//! in the rotate-half layout of Hugging Face checkpoints (dims `i` and `i + head_dim/2` pair up).
//! GGUF loaders un-permute Q/K weights into this layout, so one RoPE serves every format.

/// How the base frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (`rope_type: "linear"`).
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// `inv_freq: [head_dim / 2] f32`, the per-pair rotation speed in radians per position.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let inv_freq = base
            .into_iter()
            .map(|f| scale_frequency(f, scaling) as f32)
            .collect();
        Self { head_dim, inv_freq }
    }

    /// `(cos, sin)` of the angle for pair `i` at `pos`, computed as Hugging Face does: the angle
    /// is an f32 product, its cosine and sine are taken in f32.
    #[inline]
    pub fn cos_sin(&self, pos: usize, i: usize) -> (f32, f32) {
        let angle = pos as f32 * self.inv_freq[i];
        (angle.cos(), angle.sin())
    }
}

fn scale_frequency(f: f64, scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::None => f,
        RopeScaling::Linear { factor } => f / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth =
                    (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

/// Rotates one row `x: [heads * head_dim]` at position `pos`.
pub(crate) fn rotate_row(x: &mut [f32], pos: usize, table: &RopeTable) {
    let hd = table.head_dim;
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        for i in 0..half {
            let (c, s) = table.cos_sin(pos, i);
            let x1 = head[i];
            let x2 = head[i + half];
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = RopeTable::new(128, 500000.0, &RopeScaling::None);
        let scaled = RopeTable::new(128, 500000.0, &s);
        // The fastest pair (wavelength 2π) is far below the high-frequency cut: unchanged.
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        // The slowest pair has a wavelength far above 8192: divided by the factor.
        let last = plain.inv_freq.len() - 1;
        let ratio = plain.inv_freq[last] / scaled.inv_freq[last];
        assert!((ratio - 8.0).abs() < 1e-4, "ratio {ratio}");
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let t = RopeTable::new(8, 10000.0, &RopeScaling::None);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.37 - 2.0).collect();
        let before: Vec<f32> = x.clone();
        rotate_row(&mut x, 17, &t);
        for h in 0..2 {
            for i in 0..4 {
                let a = h * 8 + i;
                let b = a + 4;
                let n0 = before[a].hypot(before[b]);
                let n1 = x[a].hypot(x[b]);
                assert!((n0 - n1).abs() < 1e-5);
            }
        }
        let mut y = before.clone();
        rotate_row(&mut y, 0, &t);
        assert_eq!(y, before, "position 0 is the identity");
    }
}
