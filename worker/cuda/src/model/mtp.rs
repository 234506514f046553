//! The multi-token-prediction module on the GPU (spec §7), what speculative decoding drafts
//! with: the embedding of the next token and the main model's hidden state, each normed, joined
//! by `eh_proj`, one decoder layer with its own cache layer, then its own norm and head.

use super::layers::Layer;
use super::CudaModel;
use crate::gpu::{DeviceBuf, Gpu};
use crate::weights::{load_vector, DeviceMatrix};
use anyhow::{ensure, Context, Result};
use dsv3_engine::{check_chunks, Checkpoint, Chunk, ChunkOutput, ModelConfig};

pub(super) struct Mtp {
    enorm: DeviceBuf,
    hnorm: DeviceBuf,
    /// `[hidden, 2 * hidden]`: the normed embedding's columns, then the hidden state's.
    eh_proj: DeviceMatrix,
    layer: Layer,
    head_norm: DeviceBuf,
    /// `shared_head.head`; the main head when the checkpoint leaves it out.
    head: Option<DeviceMatrix>,
}

impl Mtp {
    /// Layer `num_hidden_layers` of the checkpoint, of its routed experts only `bank_ids`.
    pub(super) fn load(gpu: &Gpu, ckpt: &Checkpoint, c: &ModelConfig, bank_ids: &[u32]) -> Result<Self> {
        let index = c.num_hidden_layers;
        let p = format!("model.layers.{index}");
        let h = c.hidden_size;
        let head_name = format!("{p}.shared_head.head.weight");
        Ok(Mtp {
            enorm: load_vector(gpu, ckpt, &format!("{p}.enorm.weight"), h)?,
            hnorm: load_vector(gpu, ckpt, &format!("{p}.hnorm.weight"), h)?,
            eh_proj: DeviceMatrix::load(gpu, ckpt, &format!("{p}.eh_proj.weight"), h, 2 * h)?,
            layer: Layer::load(gpu, ckpt, c, index, bank_ids).with_context(|| format!("layer {index}"))?,
            head_norm: load_vector(gpu, ckpt, &format!("{p}.shared_head.norm.weight"), h)?,
            head: if ckpt.contains(&head_name) {
                Some(DeviceMatrix::load(gpu, ckpt, &head_name, c.vocab_size, h)?)
            } else {
                None
            },
        })
    }

    pub(super) fn resident_bytes(&self) -> usize {
        self.enorm.bytes
            + self.hnorm.bytes
            + self.head_norm.bytes
            + self.eh_proj.bytes()
            + self.layer.resident_bytes()
            + self.head.as_ref().map_or(0, DeviceMatrix::bytes)
    }
}

impl CudaModel {
    /// One step of the MTP module: see [`dsv3_engine::Model::mtp_forward`] (the same inputs and
    /// outputs); its cache layer is the last one.
    pub fn mtp_forward(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        let mtp = self.mtp.as_ref().context("this checkpoint has no MTP module")?;
        check_chunks(&self.config, chunks)?;
        let (width, vocab, eps) = (
            self.config.hidden_size,
            self.config.vocab_size,
            self.config.rms_norm_eps,
        );
        let mut prev = Vec::new();
        for c in chunks {
            let h = c
                .prev_hidden
                .with_context(|| format!("sequence {}: MTP chunk without hidden states", c.seq))?;
            ensure!(
                h.len() == c.tokens.len() * width,
                "sequence {}: MTP hidden states have the wrong length",
                c.seq
            );
            prev.extend_from_slice(h);
            self.cache.table.reserve(c.seq, c.start + c.tokens.len())?;
        }
        let g = &self.gpu;
        let rows = prev.len() / width;
        let (words, spans, max_len) = self.pack_inputs(chunks, rows)?;
        let inputs = g.upload(&words)?;
        let step = self.step_layout(inputs.addr, rows, spans, max_len);
        let prev = g.upload(&prev)?;
        let embedded = g.alloc(rows * width * 4)?;
        self.embed_into(&embedded, &step)?;
        // [enorm(embedding) ; hnorm(hidden)] per row, then eh_proj.
        let joined = g.alloc(rows * 2 * width * 4)?;
        self.rms_norm(
            joined.addr,
            2 * width,
            embedded.addr,
            width,
            &mtp.enorm,
            width,
            rows,
            eps,
        )?;
        self.rms_norm(
            joined.addr + (width * 4) as u64,
            2 * width,
            prev.addr,
            width,
            &mtp.hnorm,
            width,
            rows,
            eps,
        )?;
        let h = g.alloc(rows * width * 4)?;
        self.linear(h.addr, width, joined.addr, rows, &mtp.eh_proj, false)?;
        self.layer_forward(&mtp.layer, &h, &step, &mut None)
            .context("the MTP layer")?;
        // Norm and head over the rows that give logits.
        let mut wanted = Vec::new();
        let mut row = 0;
        for c in chunks {
            wanted.extend(c.output_offsets().into_iter().map(|k| (row + k) as i32));
            row += c.tokens.len();
        }
        let r = wanted.len();
        let (logits, normed) = if r == 0 {
            (Vec::new(), Vec::new())
        } else {
            let pick = g.upload(&wanted)?;
            let normed = g.alloc(r * width * 4)?;
            let logits = g.alloc(r * vocab * 4)?;
            let head = mtp.head.as_ref().unwrap_or(&self.head);
            self.norm_head_into((&mtp.head_norm, head), &h, Some(pick.addr), r, &normed, logits.addr)?;
            (
                g.download::<f32>(logits.addr, r * vocab)?,
                g.download::<f32>(normed.addr, r * width)?,
            )
        };
        let mut outputs = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            let offsets = c.output_offsets();
            let k = offsets.len();
            outputs.push(ChunkOutput {
                positions: offsets.iter().map(|o| c.start + o).collect(),
                logits: logits[at * vocab..(at + k) * vocab].to_vec(),
                hidden: normed[at * width..(at + k) * width].to_vec(),
            });
            at += k;
        }
        Ok(outputs)
    }
}
