//! FP8 E4M3FN decoding (`torch.float8_e4m3fn`, safetensors `F8_E4M3`).
//!
//! Bit layout `s eeee mmm`, exponent bias 7, no infinities, 0x7F/0xFF are NaN, max finite ±448.

/// Exact f32 value of every E4M3FN byte.
pub static E4M3_TO_F32: [f32; 256] = build_table();

const fn decode(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let man = (byte & 0x07) as f32;
    if exp == 15 && (byte & 0x07) == 7 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: 2^-6 * m/8.
        man / 8.0 / 64.0
    } else {
        let mut scale = 1.0f32;
        let mut e = exp - 7;
        while e > 0 {
            scale *= 2.0;
            e -= 1;
        }
        while e < 0 {
            scale /= 2.0;
            e += 1;
        }
        scale * (1.0 + man / 8.0)
    };
    sign * magnitude
}

const fn build_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = decode(i as u8);
        i += 1;
    }
    table
}

/// Encodes with saturation to ±448 and round-to-nearest-even (used to write synthetic checkpoints).
pub fn encode_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
    let magnitude = value.abs().min(448.0);
    let code = if magnitude < 2f32.powi(-6) {
        // Subnormals are multiples of 2^-9; a rounded count of 8 is exactly the smallest normal.
        (magnitude * 512.0).round_ties_even() as u8
    } else {
        let exp = ((magnitude.to_bits() >> 23) as i32) - 127;
        let mantissa = magnitude / f32::from_bits(((exp + 127) as u32) << 23) - 1.0;
        let q = (mantissa * 8.0).round_ties_even() as i32;
        let (exp, q) = if q == 8 { (exp + 1, 0) } else { (exp, q) };
        (((exp + 7) as u8) << 3 | q as u8).min(0x7e)
    };
    if code == 0 {
        0
    } else {
        code | sign
    }
}

/// Quantises one block of activations as DeepSeek's FP8 inference does and writes back the values
/// the product sees: scale = amax / 448 (rounded up to a power of two when `ue8m0`), each value
/// times 448 / amax (times 1 / scale under ue8m0) encoded to e4m3, decoded, times the scale.
/// The CUDA kernels compute the same (`quantize_block` in `common.cuh`).
pub fn quantize_block_in_place(block: &mut [f32], ue8m0: bool) {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return;
    }
    let (scale, inv) = block_scale(amax, ue8m0);
    for v in block {
        *v = E4M3_TO_F32[encode_e4m3(*v * inv) as usize] * scale;
    }
}

/// The scale of a block with largest magnitude `amax` > 0 and the factor that maps it onto e4m3.
fn block_scale(amax: f32, ue8m0: bool) -> (f32, f32) {
    if ue8m0 {
        // The next power of two at or above amax / 448, from the bits (no log2 rounding).
        let exact = amax / 448.0;
        let bits = exact.to_bits();
        let scale = if bits & 0x007f_ffff == 0 {
            exact
        } else {
            f32::from_bits((bits & 0x7f80_0000) + 0x0080_0000)
        };
        (scale, 1.0 / scale)
    } else {
        (amax / 448.0, 448.0 / amax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(E4M3_TO_F32[0x00], 0.0);
        assert_eq!(E4M3_TO_F32[0x38], 1.0); // e=7, m=0
        assert_eq!(E4M3_TO_F32[0x7e], 448.0);
        assert_eq!(E4M3_TO_F32[0xfe], -448.0);
        assert_eq!(E4M3_TO_F32[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(E4M3_TO_F32[0x08], 2f32.powi(-6)); // smallest normal
        assert!(E4M3_TO_F32[0x7f].is_nan() && E4M3_TO_F32[0xff].is_nan());
        // Against half's independent implementation of the same format.
        for code in 0u16..256 {
            let ours = E4M3_TO_F32[code as usize];
            let theirs = half::f16::from_f32(ours).to_f32();
            if !ours.is_nan() {
                assert_eq!(ours, theirs, "code {code:#x} is not exactly representable");
            }
        }
    }

    #[test]
    fn encode_round_trips_and_saturates() {
        for code in 0u8..=0xfe {
            if code == 0x7f || code == 0x80 {
                continue;
            }
            assert_eq!(encode_e4m3(E4M3_TO_F32[code as usize]), code);
        }
        assert_eq!(encode_e4m3(1e6), 0x7e);
        assert_eq!(encode_e4m3(-1e6), 0xfe);
        // 1.0625 lies halfway between 1.0 (m=0) and 1.125 (m=1): ties to even.
        assert_eq!(encode_e4m3(1.0625), 0x38);
        // Against a brute-force nearest search over all codes.
        let mut x = -500.0f32;
        while x < 500.0 {
            let mut best = 0u8;
            let mut best_err = f32::INFINITY;
            for code in (0u8..=0x7e).chain(0x81..=0xfe) {
                let err = (E4M3_TO_F32[code as usize] - x.clamp(-448.0, 448.0)).abs();
                if err < best_err || (err == best_err && code & 1 == 0) {
                    best = code;
                    best_err = err;
                }
            }
            assert_eq!(
                E4M3_TO_F32[encode_e4m3(x) as usize],
                E4M3_TO_F32[best as usize],
                "value {x}"
            );
            x += 0.013_7;
        }
    }

    #[test]
    fn quantized_blocks_are_e4m3_times_their_scale() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.7
        };
        for ue8m0 in [false, true] {
            let x: Vec<f32> = (0..128).map(|_| next()).collect();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut q = x.clone();
            quantize_block_in_place(&mut q, ue8m0);
            let scale = if ue8m0 {
                // The smallest power of two s with amax / s <= 448.
                let mut s = 2f32.powi(-30);
                while amax / s > 448.0 {
                    s *= 2.0;
                }
                s
            } else {
                amax / 448.0
            };
            for (&orig, &got) in x.iter().zip(&q) {
                let code = encode_e4m3(got / scale);
                assert_eq!(
                    E4M3_TO_F32[code as usize] * scale,
                    got,
                    "{got} is not an e4m3 value times {scale}"
                );
                // Round to nearest: within half a step of the e4m3 grid (relative 2^-4, or the
                // subnormal step 2^-10 absolute).
                let err = (orig - got).abs() / scale;
                assert!(
                    err <= (orig.abs() / scale / 16.0).max(2f32.powi(-10)) * 1.0001,
                    "{orig} -> {got}"
                );
            }
            if !ue8m0 {
                assert_eq!(
                    q.iter().fold(0f32, |m, v| m.max(v.abs())),
                    amax,
                    "amax maps onto 448 exactly"
                );
            }
        }
        let mut zeros = [0.0f32; 128];
        quantize_block_in_place(&mut zeros, false);
        assert!(zeros.iter().all(|&v| v == 0.0));
    }
}
