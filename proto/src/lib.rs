//! Generated gRPC code for the fleet contracts (`proto/fleet.proto`), plus tensor helpers.

pub mod v1 {
    tonic::include_proto!("dsv3.fleet.v1");
}

pub use v1::*;

/// `v` as bf16 bits, rounded to nearest even; NaN stays NaN.
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x40) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Marks a routing slot that belongs to another shard.
pub const OTHER_SHARD: u32 = u32::MAX;

/// Element types an activation tensor travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// Half the bytes of f32; what GPU ranks send (their kernels read bf16 anyway).
    Bf16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            other => Err(format!(
                "tensor dtype `{other}` is not supported (expected f32 or bf16)"
            )),
        }
    }
}

impl Tensor {
    /// A tensor of `values` stored as `dtype` (bf16 rounds to nearest even).
    pub fn from_f32_as(shape: &[usize], values: &[f32], dtype: Dtype) -> Self {
        let data: Vec<u8> = match dtype {
            Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
            // Straight-line bit arithmetic (the compiler vectorises it): a layer's dispatch
            // converts tens of millions of values.
            Dtype::Bf16 => {
                let halves: Vec<u16> = values.iter().map(|&v| bf16_bits(v)).collect();
                bytemuck::cast_slice(&halves).to_vec()
            }
        };
        Tensor {
            dtype: dtype.name().into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: data.into(),
        }
    }

    /// An f32 tensor from a slice (one copy, into the message).
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        Self::from_f32_as(shape, values, Dtype::F32)
    }

    pub fn element_type(&self) -> Result<Dtype, String> {
        Dtype::parse(&self.dtype)
    }

    /// The values as f32 (bf16 widened exactly), checking that the byte length matches the shape.
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        let dtype = self.element_type()?;
        let elements: u64 = self.shape.iter().product();
        if self.data.len() as u64 != elements * dtype.bytes() {
            return Err(format!(
                "tensor of shape {:?} carries {} bytes, expected {}",
                self.shape,
                self.data.len(),
                elements * dtype.bytes()
            ));
        }
        Ok(match dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_reject_bad_lengths() {
        let t = Tensor::from_f32(&[2, 2], &[1.0, -2.0, 3.5, 0.0]);
        assert_eq!(t.to_f32(), Ok(vec![1.0, -2.0, 3.5, 0.0]));
        let bad = Tensor {
            shape: vec![3, 2],
            ..t.clone()
        };
        assert!(bad.to_f32().unwrap_err().contains("expected 24"));
        let f16 = Tensor {
            dtype: "f16".into(),
            ..t
        };
        assert!(f16.to_f32().unwrap_err().contains("`f16` is not supported"));
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        let mut state = 0x2545f4914f6cdd1du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push(f32::from_bits(state as u32));
        }
        for v in values {
            let want = half::bf16::from_f32(v);
            let got = half::bf16::from_bits(bf16_bits(v));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v:e}: {:#06x} vs {:#06x}",
                got.to_bits(),
                want.to_bits()
            );
        }
    }

    #[test]
    fn bf16_tensors_carry_half_the_bytes_and_round_to_nearest() {
        // 1 + 2^-8 lies halfway between two bf16 values and rounds to even (1.0); 1 + 3·2^-8 up.
        let values = [1.0, -2.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        let t = Tensor::from_f32_as(&[2, 2], &values, Dtype::Bf16);
        assert_eq!((t.dtype.as_str(), t.data.len()), ("bf16", 8));
        assert_eq!(t.to_f32(), Ok(vec![1.0, -2.0, 1.0, 1.0 + 4.0 / 256.0]));
        let short = Tensor { shape: vec![2, 3], ..t };
        assert!(short.to_f32().unwrap_err().contains("expected 12"));
    }
}
