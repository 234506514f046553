//! Generated gRPC code for the fleet contracts (`proto/fleet.proto`), plus tensor helpers.

pub mod v1 {
    tonic::include_proto!("dsv3.fleet.v1");
}

pub use v1::*;

/// Marks a routing slot that belongs to another shard.
pub const OTHER_SHARD: u32 = u32::MAX;

impl Tensor {
    /// An f32 tensor from a slice (one copy, into the message).
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            dtype: "f32".into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: data.into(),
        }
    }

    /// The f32 values, checking dtype and that the byte length matches the shape.
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        if self.dtype != "f32" {
            return Err(format!("tensor dtype `{}` is not supported (expected f32)", self.dtype));
        }
        let elements: u64 = self.shape.iter().product();
        if self.data.len() as u64 != elements * 4 {
            return Err(format!(
                "tensor of shape {:?} carries {} bytes, expected {}",
                self.shape,
                self.data.len(),
                elements * 4
            ));
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
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
        let bf = Tensor {
            dtype: "bf16".into(),
            ..t
        };
        assert!(bf.to_f32().unwrap_err().contains("bf16"));
    }
}
