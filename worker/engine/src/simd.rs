//! Hot inner loops (weight decoding, dot products), compiled twice: for the baseline target and
//! for AVX2+FMA, chosen at run time, so one binary is fast on every x86-64 CPU.

macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                        $imp::<true>($($arg),*)
                    }
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $imp::<false>($($arg),*)
        }
    };
}

#[inline(always)]
fn madd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = madd::<FMA>(acc[i], x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[j] = row · x[j]` for every `row.len()`-wide input row of `x`.
#[inline(always)]
fn dot_many_impl<const FMA: bool>(row: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, xj) in out.iter_mut().zip(x.chunks_exact(row.len())) {
        *o = dot_impl::<FMA>(row, xj);
    }
}

#[inline(always)]
fn bf16_impl<const FMA: bool>(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// E4M3FN by integer arithmetic: a normal code is the f32 with the exponent rebased (bias 7 →
/// 127) and the 3 mantissa bits moved up; a subnormal is `m · 2^-9`. (The NaN code 0x7F decodes
/// as 480; checkpoints hold no NaN.)
#[inline(always)]
fn e4m3_impl<const FMA: bool>(q: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(q) {
        let magnitude = (q & 0x7f) as u32;
        let normal = f32::from_bits((magnitude << 20) + (120 << 23));
        let subnormal = magnitude as f32 * (1.0 / 512.0);
        let v = if magnitude < 8 { subnormal } else { normal };
        let v = if q & 0x80 != 0 { -v } else { v };
        *o = v * scale;
    }
}

dispatch!(
    /// Dot product of two equally long slices.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_impl
);
dispatch!(
    /// `out[j] = row · x[j]` for each row of `x` (row-major, `row.len()` wide).
    pub fn dot_many(row: &[f32], x: &[f32], out: &mut [f32]) => dot_many_impl
);
dispatch!(
    /// Little-endian BF16 bytes to f32.
    pub fn bf16_to_f32(bytes: &[u8], out: &mut [f32]) => bf16_impl
);
dispatch!(
    /// E4M3FN bytes times `scale` to f32.
    pub fn e4m3_to_f32(q: &[u8], scale: f32, out: &mut [f32]) => e4m3_impl
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::E4M3_TO_F32;

    #[test]
    fn e4m3_decode_equals_the_table() {
        let q: Vec<u8> = (0u8..=255).filter(|&b| b & 0x7f != 0x7f).collect();
        let mut fast = vec![0.0f32; q.len()];
        e4m3_to_f32(&q, 0.75, &mut fast);
        let mut slow = vec![0.0f32; q.len()];
        e4m3_impl::<false>(&q, 0.75, &mut slow);
        for ((b, f), s) in q.iter().zip(&fast).zip(&slow) {
            assert_eq!(*f, E4M3_TO_F32[*b as usize] * 0.75, "byte {b:#x}");
            assert_eq!(f, s);
        }
    }

    #[test]
    fn dot_products_agree_with_a_plain_sum() {
        let a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.1).sin()).collect();
        let b: Vec<f32> = (0..100).map(|i| (i as f32 * 0.3).cos()).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
        assert!((dot(&a, &b) as f64 - plain).abs() < 1e-4);
        let mut out = [0.0f32; 2];
        let x: Vec<f32> = b.iter().chain(&a).copied().collect();
        dot_many(&a, &x, &mut out);
        assert!((out[0] as f64 - plain).abs() < 1e-4);
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let mut o = [0.0f32; 2];
        bf16_to_f32(&bf, &mut o);
        assert_eq!(o, [1.5, -2.0]);
    }
}
