//! Rotary position embedding with YaRN (spec §4): interleaved pairs (2j, 2j+1), fp32 angles.

use crate::config::{ModelConfig, Yarn};

fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplier on cos/sin (1.0 for DeepSeek-V3; transformers' `attention_factor`).
    attention_factor: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.qk_rope_head_dim;
        let base = config.rope.theta as f32;
        // As transformers: base ** (arange(0, dim, 2) / dim) in fp32.
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|j| base.powf((2 * j) as f32 / dim as f32)).collect();
        let (inv_freq, attention_factor) = match &config.rope.yarn {
            None => (pos_freqs.iter().map(|f| 1.0 / f).collect(), 1.0),
            Some(yarn) => (
                yarn_inv_freq(yarn, &pos_freqs, dim, config.rope.theta),
                yarn_attention_factor(yarn),
            ),
        };
        Rope {
            inv_freq,
            attention_factor: attention_factor as f32,
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin of every pair's angle at `position`, each `dim/2` long.
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for (j, &f) in self.inv_freq.iter().enumerate() {
            let angle = p * f;
            cos[j] = angle.cos() * self.attention_factor;
            sin[j] = angle.sin() * self.attention_factor;
        }
    }

    /// Rotates consecutive pairs of `x` in place (checkpoint-native interleaved layout).
    pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (j, pair) in x.chunks_exact_mut(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos[j] - b * sin[j];
            pair[1] = a * sin[j] + b * cos[j];
        }
    }
}

fn yarn_inv_freq(yarn: &Yarn, pos_freqs: &[f32], dim: usize, base: f64) -> Vec<f32> {
    let correction_dim = |rotations: f64| {
        dim as f64 * (yarn.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let low = correction_dim(yarn.beta_fast).floor().max(0.0);
    let mut high = correction_dim(yarn.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    let factor = yarn.factor as f32;
    pos_freqs
        .iter()
        .enumerate()
        .map(|(j, &pf)| {
            let ramp = ((j as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            let extrapolation = 1.0 / pf;
            let interpolation = 1.0 / (factor * pf);
            interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
        })
        .collect()
}

fn yarn_attention_factor(yarn: &Yarn) -> f64 {
    match (yarn.mscale, yarn.mscale_all_dim) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
            yarn_get_mscale(yarn.factor, m) / yarn_get_mscale(yarn.factor, all)
        }
        _ => yarn_get_mscale(yarn.factor, 1.0),
    }
}

/// Softmax scale of MLA: `qk_head_dim^-1/2`, times `mscale²` when YaRN declares `mscale_all_dim`.
pub fn softmax_scale(config: &ModelConfig) -> f32 {
    let mut scale = (config.qk_head_dim() as f64).powf(-0.5);
    if let Some(yarn) = &config.rope.yarn {
        if let Some(all) = yarn.mscale_all_dim.filter(|&m| m != 0.0) {
            let m = yarn_get_mscale(yarn.factor, all);
            scale *= m * m;
        }
    }
    scale as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn v3_config() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,
            "num_hidden_layers":61,"num_attention_heads":128,"n_routed_experts":256,"num_experts_per_tok":8,
            "n_group":8,"topk_group":4,"kv_lora_rank":512,"q_lora_rank":1536,"qk_nope_head_dim":128,
            "qk_rope_head_dim":64,"v_head_dim":128,"max_position_embeddings":163840,"rope_theta":10000,
            "rope_scaling":{"type":"yarn","factor":40,"original_max_position_embeddings":4096,"beta_fast":32,
            "beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0}}"#,
        )
        .expect("V3 config parses")
    }

    /// Values from spec §4.1 and §3.1 (computed independently by script), quoted verbatim.
    #[allow(clippy::excessive_precision)]
    #[test]
    fn v3_yarn_constants() {
        let cfg = v3_config();
        let rope = Rope::new(&cfg);
        let f = rope.inv_freq();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1e-30) * 10.0;
        assert!(close(f[0], 1.0));
        assert!(close(f[10], 5.623412877e-2), "{}", f[10]);
        assert!(close(f[11], 3.900692612e-2), "{}", f[11]);
        assert!(close(f[16], 5.500000436e-3), "{}", f[16]);
        assert!(close(f[22], 1.778279402e-4), "{}", f[22]);
        assert!(close(f[23], 3.333803761e-5), "{}", f[23]);
        assert!(close(f[31], 3.333803761e-6), "{}", f[31]);
        assert!((softmax_scale(&cfg) as f64 - 0.1352337788608801).abs() < 1e-7);
        assert_eq!(rope.attention_factor, 1.0);
    }

    #[test]
    fn rotation_is_a_rotation() {
        let mut x = [1.0f32, 0.0, 0.0, 2.0];
        let cos = [0.0f32, 1.0];
        let sin = [1.0f32, 0.0];
        Rope::rotate(&mut x, &cos, &sin);
        assert_eq!(x, [0.0, 1.0, 0.0, 2.0]);
    }
}
