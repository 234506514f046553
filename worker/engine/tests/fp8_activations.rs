//! `Fp8Activations::Quantised` on the CPU: an FP8 product sees its input quantised per token per
//! 128 channels, checked against a float64 product on an independently quantised input.

mod common;

use common::golden_dir;
use dsv3_engine::fp8::E4M3_TO_F32;
use dsv3_engine::linear::Matrix;
use dsv3_engine::{Checkpoint, Fp8Activations, ModelConfig, ModelFiles};

/// The e4m3 value nearest to `v` (ties to the even code), by search over every finite code.
fn nearest_e4m3(v: f64) -> f64 {
    let v = v.clamp(-448.0, 448.0);
    let mut best = (f64::INFINITY, 0u8);
    for code in (0u8..=0x7e).chain(0x80..=0xfe) {
        let err = (E4M3_TO_F32[code as usize] as f64 - v).abs();
        if err < best.0 || (err == best.0 && code & 1 == 0) {
            best = (err, code);
        }
    }
    E4M3_TO_F32[best.1 as usize] as f64
}

/// `x` quantised per 128 channels as DeepSeek's FP8 inference does: scale = amax / 448 (or the
/// next power of two), each value the nearest e4m3 of value / scale, times the scale.
fn reference_quantise(x: &[f32], ue8m0: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for block in x.chunks(128) {
        let amax = block.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let scale = if ue8m0 {
            2f64.powf((amax / 448.0).log2().ceil())
        } else {
            amax / 448.0
        };
        out.extend(block.iter().map(|&v| nearest_e4m3(v as f64 / scale) * scale));
    }
    out
}

#[test]
fn quantised_products_see_e4m3_inputs() {
    let files = ModelFiles::Dir(golden_dir().join("tiny-fp8"));
    let ckpt = Checkpoint::open(&files).expect("checkpoint");
    let config = ModelConfig::from_model_files(&files).expect("config");
    let (name, rows, cols) = ("model.layers.0.self_attn.q_a_proj.weight", 256, 256);
    let m = 9; // both CPU paths: row at a time (<= 4 rows) for the first 3, panels for all 9
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0 - 1.0) * 3.0)
        .collect();
    for (ue8m0, rows_used) in [(false, 3), (false, m), (true, m)] {
        let mut quant = config.quantization.clone().expect("FP8 checkpoint");
        quant.ue8m0_scales = ue8m0;
        let exact = Matrix::load(&ckpt, name, rows, cols, Some(&quant)).expect("weight");
        quant.activations = Fp8Activations::Quantised;
        let quantised = Matrix::load(&ckpt, name, rows, cols, Some(&quant)).expect("weight");
        let input = &x[..rows_used * cols];
        let got = quantised.forward(input, rows_used);
        let unquantised = exact.forward(input, rows_used);
        let mut w = vec![0f32; rows * cols];
        exact.decode_rows(0, rows, &mut w);
        let xq = reference_quantise(input, ue8m0);
        let (mut err, mut moved, mut norm) = (0f64, 0f64, 0f64);
        for t in 0..rows_used {
            for o in 0..rows {
                let want: f64 = (0..cols).map(|c| xq[t * cols + c] * w[o * cols + c] as f64).sum();
                err += (got[t * rows + o] as f64 - want).powi(2);
                moved += (unquantised[t * rows + o] as f64 - want).powi(2);
                norm += want * want;
            }
        }
        let (err, moved) = ((err / norm).sqrt(), (moved / norm).sqrt());
        // f32 sums against f64: ~1e-7. Quantisation itself moves the product by ~1e-2.
        assert!(err < 1e-5, "ue8m0={ue8m0} rows={rows_used}: relative error {err:.2e}");
        assert!(
            moved > 1e-3,
            "ue8m0={ue8m0}: quantisation moved the product by only {moved:.2e}"
        );
    }
}
