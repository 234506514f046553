//! The weights of one decoder layer on the GPU, loaded from the checkpoint or made at random.

use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr};
use crate::weights::{load_vector, random_vector, scale_shape, DeviceMatrix, ExpertBank, Format};
use anyhow::Result;
use dsv3_engine::{Checkpoint, ModelConfig};

pub(super) struct Attention {
    /// The projections of the layer's input in one matrix, so one product computes them: q_a's
    /// rows (models with a q LoRA) then kv_a's (`kv_a_proj_with_mqa`).
    pub(super) x_down: DeviceMatrix,
    /// The q LoRA's rank and its norm (`q_a_layernorm`), where the model has one.
    pub(super) q_lora: Option<(usize, DeviceBuf)>,
    pub(super) q_b: DeviceMatrix,
    pub(super) kv_norm: DeviceBuf,
    pub(super) kv_b: DeviceMatrix,
    /// W_UK of kv_b transposed per head, for the tensor-core q absorption ([`uk_transposed`]).
    pub(super) uk_t: Option<DeviceMatrix>,
    pub(super) o: DeviceMatrix,
}

/// W_UK of every head transposed, `[heads * lora, nope]`: the same FP8 bytes with their 128 x 128
/// scale blocks transposed, the weight operand of the tensor-core q absorption. `None` where kv_b
/// is not FP8 or its heads are not whole 128-blocks (the CUDA-core kernel reads kv_b itself).
fn uk_transposed(gpu: &Gpu, kv_b: &DeviceMatrix, c: &ModelConfig) -> Result<Option<DeviceMatrix>> {
    let (heads, nope, vdim, lora) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
    if kv_b.format != Format::Fp8 || [nope, vdim, lora].iter().any(|d| d % 128 != 0) {
        return Ok(None);
    }
    let (rows, cols) = (heads * lora, nope);
    let (sr, sc) = scale_shape(rows, cols);
    let (data, scales) = (gpu.alloc(rows * cols)?, gpu.alloc(sr * sc * 4)?);
    kernels::mla_uk_transpose.launch(
        gpu,
        ((lora * nope).div_ceil(256) as u32, heads as u32, 1),
        256,
        0,
        (
            ptr(data.addr),
            ptr(scales.addr),
            ptr(kv_b.data.addr),
            ptr(kv_b.scale_addr()),
            int(nope),
            int(vdim),
            int(lora),
        ),
    )?;
    Ok(Some(DeviceMatrix {
        rows,
        cols,
        format: Format::Fp8,
        data,
        scales: Some(scales),
    }))
}

pub(super) struct Mlp {
    /// gate_proj's rows then up_proj's: one product writes both halves of SwiGLU's input.
    pub(super) gate_up: DeviceMatrix,
    pub(super) down: DeviceMatrix,
}

pub(super) struct Moe {
    pub(super) router: DeviceMatrix,
    pub(super) bias: DeviceBuf,
    pub(super) shared: Option<Mlp>,
    /// The routed experts this GPU holds (all of them, some, or none on an attention rank of a
    /// fleet), in the order of the model's `bank_ids`.
    pub(super) experts: Option<ExpertBank>,
}

impl Mlp {
    fn matrices(&self) -> [&DeviceMatrix; 2] {
        [&self.gate_up, &self.down]
    }

    /// The intermediate width (SwiGLU's output).
    pub(super) fn inter(&self) -> usize {
        self.gate_up.rows / 2
    }
}

pub(super) enum Ffn {
    Dense(Box<Mlp>),
    Moe(Box<Moe>),
}

pub(super) struct Layer {
    pub(super) index: usize,
    pub(super) input_norm: DeviceBuf,
    pub(super) attn: Attention,
    pub(super) post_norm: DeviceBuf,
    pub(super) ffn: Ffn,
}

impl Layer {
    /// Loads layer `index`; of a MoE layer's routed experts only `bank_ids` (none: no bank).
    pub(super) fn load(gpu: &Gpu, ckpt: &Checkpoint, c: &ModelConfig, index: usize, bank_ids: &[u32]) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let h = c.hidden_size;
        let (heads, qk) = (c.num_attention_heads, c.qk_head_dim());
        let a = format!("{p}.self_attn");
        let lora = c.kv_lora_rank;
        let (q_a, kv_a) = (format!("{a}.q_a_proj.weight"), format!("{a}.kv_a_proj_with_mqa.weight"));
        let kv_rows = lora + c.qk_rope_head_dim;
        let (x_down, q_lora, q_b) = match c.q_lora_rank {
            Some(r) => (
                DeviceMatrix::load_stacked(gpu, ckpt, &[(&q_a, r), (&kv_a, kv_rows)], h)?,
                Some((r, load_vector(gpu, ckpt, &format!("{a}.q_a_layernorm.weight"), r)?)),
                DeviceMatrix::load(gpu, ckpt, &format!("{a}.q_b_proj.weight"), heads * qk, r)?,
            ),
            None => (
                DeviceMatrix::load(gpu, ckpt, &kv_a, kv_rows, h)?,
                None,
                DeviceMatrix::load(gpu, ckpt, &format!("{a}.q_proj.weight"), heads * qk, h)?,
            ),
        };
        let kv_b = DeviceMatrix::load(
            gpu,
            ckpt,
            &format!("{a}.kv_b_proj.weight"),
            heads * (c.qk_nope_head_dim + c.v_head_dim),
            lora,
        )?;
        let attn = Attention {
            x_down,
            q_lora,
            q_b,
            kv_norm: load_vector(gpu, ckpt, &format!("{a}.kv_a_layernorm.weight"), lora)?,
            uk_t: uk_transposed(gpu, &kv_b, c)?,
            kv_b,
            o: DeviceMatrix::load(gpu, ckpt, &format!("{a}.o_proj.weight"), h, heads * c.v_head_dim)?,
        };
        let mlp = |prefix: &str, inter: usize| -> Result<Mlp> {
            let (gate, up) = (format!("{prefix}.gate_proj.weight"), format!("{prefix}.up_proj.weight"));
            Ok(Mlp {
                gate_up: DeviceMatrix::load_stacked(gpu, ckpt, &[(&gate, inter), (&up, inter)], h)?,
                down: DeviceMatrix::load(gpu, ckpt, &format!("{prefix}.down_proj.weight"), h, inter)?,
            })
        };
        let ffn = if c.is_moe_layer(index) {
            let shared = if c.n_shared_experts > 0 {
                Some(mlp(
                    &format!("{p}.mlp.shared_experts"),
                    c.moe_intermediate_size * c.n_shared_experts,
                )?)
            } else {
                None
            };
            Ffn::Moe(Box::new(Moe {
                router: DeviceMatrix::load(gpu, ckpt, &format!("{p}.mlp.gate.weight"), c.n_routed_experts, h)?,
                bias: load_vector(
                    gpu,
                    ckpt,
                    &format!("{p}.mlp.gate.e_score_correction_bias"),
                    c.n_routed_experts,
                )?,
                shared,
                experts: if bank_ids.is_empty() {
                    None
                } else {
                    Some(ExpertBank::load(
                        gpu,
                        ckpt,
                        &format!("{p}.mlp"),
                        bank_ids,
                        h,
                        c.moe_intermediate_size,
                    )?)
                },
            }))
        } else {
            Ffn::Dense(Box::new(mlp(&format!("{p}.mlp"), c.intermediate_size)?))
        };
        Ok(Layer {
            index,
            input_norm: load_vector(gpu, ckpt, &format!("{p}.input_layernorm.weight"), h)?,
            attn,
            post_norm: load_vector(gpu, ckpt, &format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn,
        })
    }

    /// Random FP8 weights made on the GPU; a MoE layer's bank holds `bank_experts` routed experts.
    pub(super) fn random(gpu: &Gpu, c: &ModelConfig, index: usize, seed: u64, bank_experts: usize) -> Result<Self> {
        let h = c.hidden_size;
        let (heads, qk) = (c.num_attention_heads, c.qk_head_dim());
        let f8 = Format::Fp8;
        let lora = c.kv_lora_rank;
        let mut s = seed;
        let mut next = || {
            s += 1;
            s
        };
        let kv_rows = lora + c.qk_rope_head_dim;
        let (x_down, q_lora, q_b) = match c.q_lora_rank {
            Some(r) => (
                DeviceMatrix::random(gpu, r + kv_rows, h, f8, next())?,
                Some((r, random_vector(gpu, r, 0.8, 1.2, next())?)),
                DeviceMatrix::random(gpu, heads * qk, r, f8, next())?,
            ),
            None => (
                DeviceMatrix::random(gpu, kv_rows, h, f8, next())?,
                None,
                DeviceMatrix::random(gpu, heads * qk, h, f8, next())?,
            ),
        };
        let kv_b = DeviceMatrix::random(gpu, heads * (c.qk_nope_head_dim + c.v_head_dim), lora, f8, next())?;
        let attn = Attention {
            x_down,
            q_lora,
            q_b,
            kv_norm: random_vector(gpu, lora, 0.8, 1.2, next())?,
            uk_t: uk_transposed(gpu, &kv_b, c)?,
            kv_b,
            o: DeviceMatrix::random(gpu, h, heads * c.v_head_dim, f8, next())?,
        };
        let mut mlp = |inter: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate_up: DeviceMatrix::random(gpu, 2 * inter, h, f8, next())?,
                down: DeviceMatrix::random(gpu, h, inter, f8, next())?,
            })
        };
        let ffn = if c.is_moe_layer(index) {
            let shared = if c.n_shared_experts > 0 {
                Some(mlp(c.moe_intermediate_size * c.n_shared_experts)?)
            } else {
                None
            };
            Ffn::Moe(Box::new(Moe {
                router: DeviceMatrix::random(gpu, c.n_routed_experts, h, Format::Bf16, seed + 50)?,
                bias: random_vector(gpu, c.n_routed_experts, -0.01, 0.01, seed + 51)?,
                shared,
                experts: if bank_experts == 0 {
                    None
                } else {
                    Some(ExpertBank::random(
                        gpu,
                        bank_experts,
                        h,
                        c.moe_intermediate_size,
                        seed + 52,
                    )?)
                },
            }))
        } else {
            Ffn::Dense(Box::new(mlp(c.intermediate_size)?))
        };
        Ok(Layer {
            index,
            input_norm: random_vector(gpu, h, 0.8, 1.2, seed + 60)?,
            attn,
            post_norm: random_vector(gpu, h, 0.8, 1.2, seed + 61)?,
            ffn,
        })
    }

    /// Every weight matrix of the layer outside the routed experts.
    pub(super) fn matrices(&self) -> Vec<&DeviceMatrix> {
        let a = &self.attn;
        let mut v: Vec<&DeviceMatrix> = vec![&a.x_down, &a.q_b, &a.kv_b, &a.o];
        match &self.ffn {
            Ffn::Dense(m) => v.extend(m.matrices()),
            Ffn::Moe(moe) => {
                v.push(&moe.router);
                if let Some(m) = &moe.shared {
                    v.extend(m.matrices());
                }
            }
        }
        v
    }

    pub(super) fn dense_elements(&self) -> usize {
        self.matrices().iter().map(|m| m.rows * m.cols).sum()
    }

    /// Bytes of every weight the layer holds on the GPU (its routed experts included).
    pub(super) fn resident_bytes(&self) -> usize {
        let a = &self.attn;
        let vectors = self.input_norm.bytes
            + self.post_norm.bytes
            + a.kv_norm.bytes
            + a.q_lora.as_ref().map_or(0, |(_, n)| n.bytes);
        let copies = a.uk_t.as_ref().map_or(0, DeviceMatrix::bytes);
        let experts = match &self.ffn {
            Ffn::Moe(moe) => moe.bias.bytes + moe.experts.as_ref().map_or(0, |b| b.experts * b.bytes_per_expert()),
            Ffn::Dense(_) => 0,
        };
        self.dense_bytes() + vectors + copies + experts
    }

    /// Weight bytes a decode step reads outside the routed experts.
    pub(super) fn dense_bytes(&self) -> usize {
        self.matrices().iter().map(|m| m.bytes()).sum()
    }
}
