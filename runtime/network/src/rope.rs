//! Rotary position tables, always computed and applied in f32: in bf16 a position above 256
//! cannot even be represented exactly, so tables built in the compute dtype collapse nearby
//! positions onto one angle.

use candle_core::{DType, Device, Tensor};

use super::config::{Llama3RopeScaling, NetConfig};

/// HF's inverse frequencies for the half-split (rotate_half) RoPE, with Llama 3.1 scaling.
pub fn inverse_frequencies(config: &NetConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> =
        (0..d).step_by(2).map(|i| 1.0 / (config.rope_theta as f32).powf(i as f32 / d as f32)).collect();
    match config.rope_scaling {
        None => base,
        Some(s) => base.into_iter().map(|f| llama3_scale(f, &s)).collect(),
    }
}

/// `_compute_llama3_parameters` in transformers: long wavelengths are slowed by `factor`, short
/// ones kept, and the band in between interpolated.
fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let (factor, low, high) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32);
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / factor
    } else {
        let smooth = (old / wavelen - low) / (high - low);
        (1.0 - smooth) * freq / factor + smooth * freq
    }
}

/// cos and sin, `[positions, head_dim / 2]` f32, computed on `device` (a 128k-position table
/// built on the host would add tens of milliseconds to every cold start). Angles are the f32
/// product `position * frequency`, as HF computes them.
pub fn tables(config: &NetConfig, positions: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let inv = inverse_frequencies(config);
    let half = inv.len();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let positions = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
    let angles = positions.broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Rotates `x` (`[tokens, heads, head_dim]`, any float dtype, contiguous) by each token's angles
/// (`cos`/`sin` rows already gathered per token, f32), computing in f32; returns `x`'s dtype.
/// Each token is its own batch element of candle's rope kernel, so no transposes are needed.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Tensor> {
    let (tokens, heads, d) = x.dims3()?;
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.reshape((tokens, heads, 1, d))?;
    let (cos, sin) = (cos.reshape((tokens, 1, d / 2))?, sin.reshape((tokens, 1, d / 2))?);
    let rotated = if interleaved {
        candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
    } else {
        candle_nn::rotary_emb::rope(&x, &cos, &sin)?
    };
    rotated.reshape((tokens, heads, d))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> NetConfig {
        let text = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 4096,
        });
        NetConfig::from_hf_json(&text.to_string()).unwrap()
    }

    #[test]
    fn positions_past_a_thousand_rotate_exactly_in_bf16() {
        let config = tiny_config();
        let (cos, sin) = tables(&config, 4096, &Device::Cpu).unwrap();
        let positions = [1023u32, 1099, 1100, 1101, 4000];
        let index = Tensor::new(&positions, &Device::Cpu).unwrap();
        let (cos, sin) = (cos.index_select(&index, 0).unwrap(), sin.index_select(&index, 0).unwrap());
        let d = config.head_dim;
        // One head per position, all ones: its rotation shows the angle directly.
        let x = Tensor::ones((positions.len(), 1, d), DType::BF16, &Device::Cpu).unwrap();
        let rotated = apply(&x, &cos, &sin, false).unwrap().to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
        let inv = inverse_frequencies(&config);
        for (row, p) in rotated.iter().zip(positions) {
            for (i, f) in inv.iter().enumerate() {
                // rotate_half: out[i] = x[i] cos - x[i + d/2] sin, out[i + d/2] = x[i + d/2] cos + x[i] sin.
                let angle = p as f64 * *f as f64;
                let (want_lo, want_hi) = (angle.cos() - angle.sin(), angle.cos() + angle.sin());
                let (got_lo, got_hi) = (row[0][i] as f64, row[0][i + d / 2] as f64);
                // bf16 output rounding only (8 significant bits): a collapsed position is off by whole radians.
                assert!(
                    (got_lo - want_lo).abs() < 0.02 && (got_hi - want_hi).abs() < 0.02,
                    "position {p}, pair {i}: got ({got_lo}, {got_hi}), want ({want_lo}, {want_hi})"
                );
            }
        }
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_and_slows_long_ones() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let long = 2.0 * std::f32::consts::PI / 20_000.0;
        assert!((llama3_scale(long, &s) - long / 8.0).abs() < 1e-12);
        let mid = 2.0 * std::f32::consts::PI / 4000.0;
        let scaled = llama3_scale(mid, &s);
        assert!(scaled < mid && scaled > mid / 8.0);
    }
}
