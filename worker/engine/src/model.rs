//! The DeepSeek-V3 decoder (spec §3): embedding, MLA + dense/MoE blocks, final norm, head, and
//! the multi-token-prediction module (spec §7). Routed experts are reached through
//! [`ExpertExecutor`], so this struct is exactly what an attention worker holds.

use crate::block_table::BlockTable;
use crate::checkpoint::{Checkpoint, ModelFiles};
use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, SeqId};
use crate::linear::Matrix;
use crate::mla::{ChunkSpan, Mla, MlaForm};
use crate::moe::{ExpertExecutor, Mlp, Router, TokenRoutes};
use crate::ops::{add_assign, rms_norm, rms_norm_into};
use crate::rope::Rope;
use anyhow::{bail, ensure, Context, Result};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashSet};

enum Ffn {
    Dense(Mlp),
    Moe { router: Box<Router>, shared: Option<Mlp> },
}

struct Block {
    index: usize,
    input_norm: Vec<f32>,
    attn: Mla,
    post_norm: Vec<f32>,
    ffn: Ffn,
}

struct MtpModule {
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    eh_proj: Matrix,
    block: Block,
    head_norm: Vec<f32>,
    /// `shared_head.head`; the main head when the checkpoint leaves it out.
    head: Option<Matrix>,
}

/// Which positions of a chunk produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    None,
    Last,
    All,
}

/// Consecutive tokens of one sequence, starting at position `start`.
#[derive(Clone, Debug)]
pub struct Chunk<'a> {
    pub seq: SeqId,
    pub start: usize,
    pub tokens: &'a [u32],
    pub outputs: Outputs,
    /// MTP only: the main model's post-norm hidden states at positions `start..`, `[n, hidden]`.
    pub prev_hidden: Option<&'a [f32]>,
    /// Return the post-norm hidden state of every position, not only of those giving logits
    /// (what the MTP module drafts from).
    pub all_hidden: bool,
}

impl<'a> Chunk<'a> {
    /// Offsets inside the chunk of the positions that produce logits.
    pub fn output_offsets(&self) -> Vec<usize> {
        let n = self.tokens.len();
        match self.outputs {
            Outputs::None => vec![],
            Outputs::Last => vec![n - 1],
            Outputs::All => (0..n).collect(),
        }
    }

    pub fn new(seq: SeqId, start: usize, tokens: &'a [u32], outputs: Outputs) -> Self {
        Chunk {
            seq,
            start,
            tokens,
            outputs,
            prev_hidden: None,
            all_hidden: false,
        }
    }
}

/// Makes room in `table` for a step's chunks and records their tokens (full blocks become
/// reusable); when a chunk does not fit, what the chunks before it took is undone. Shared by
/// every backend.
pub fn begin_step(table: &mut BlockTable, chunks: &[Chunk]) -> Result<()> {
    for (i, c) in chunks.iter().enumerate() {
        if let Err(e) = table.begin_chunk(c.seq, c.start, c.tokens.len()) {
            discard_step(table, &chunks[..i]);
            return Err(e.into());
        }
        table.note_tokens(c.seq, c.start, c.tokens);
    }
    Ok(())
}

/// Forgets what a step's chunks wrote from their starts on, after the step failed part-way:
/// the rows the layers before the failure wrote are not what their tokens give, and none of
/// them stays in the prefix cache. Shared by every backend.
pub fn discard_step(table: &mut BlockTable, chunks: &[Chunk]) {
    for c in chunks {
        table.discard_from(c.seq, c.start);
    }
}

/// Checks a step's chunks against the model: none empty, each sequence once, token ids inside
/// the vocabulary, positions inside the context. Shared by every backend.
pub fn check_chunks(config: &ModelConfig, chunks: &[Chunk]) -> Result<()> {
    let mut seen = HashSet::new();
    for c in chunks {
        ensure!(!c.tokens.is_empty(), "sequence {}: empty chunk", c.seq);
        ensure!(seen.insert(c.seq), "sequence {} appears twice in one step", c.seq);
        if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
            bail!(
                "sequence {}: token id {bad} is outside the vocabulary (size {})",
                c.seq,
                config.vocab_size
            );
        }
        let end = c.start + c.tokens.len();
        if end > config.max_position_embeddings {
            bail!(
                "sequence {}: position {} is beyond the model's context of {} tokens",
                c.seq,
                end - 1,
                config.max_position_embeddings
            );
        }
    }
    Ok(())
}

/// Logits and post-norm hidden states of the positions a chunk asked for.
#[derive(Clone, Debug, Default)]
pub struct ChunkOutput {
    pub positions: Vec<usize>,
    pub logits: Vec<f32>,
    /// At `positions`; at every position of the chunk when it asked for `all_hidden`.
    pub hidden: Vec<f32>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StepOptions {
    pub mla: MlaForm,
    /// Record per-layer hidden states and routing (golden tests, debugging).
    pub trace: bool,
}

/// Per-layer internals of a step, in token-row order.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// `hidden[0]` = embeddings, `hidden[l+1]` = after layer l (the last one before the final norm).
    pub hidden: Vec<Vec<f32>>,
    pub router_logits: BTreeMap<usize, Vec<f32>>,
    pub routes: BTreeMap<usize, TokenRoutes>,
}

pub struct Model {
    pub config: ModelConfig,
    rope: Rope,
    embed: Matrix,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Matrix,
    mtp: Option<MtpModule>,
}

fn load_vector(ckpt: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = ckpt.get(name)?;
    t.expect(&[Dtype::F32, Dtype::BF16, Dtype::F16], &[len])?;
    t.to_f32_vec()
}

impl Block {
    fn load(ckpt: &Checkpoint, config: &ModelConfig, index: usize) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let h = config.hidden_size;
        let ffn = if config.is_moe_layer(index) || index >= config.num_hidden_layers {
            let shared = if config.n_shared_experts > 0 {
                let width = config.moe_intermediate_size * config.n_shared_experts;
                Some(Mlp::load(ckpt, &format!("{p}.mlp.shared_experts"), config, width)?)
            } else {
                None
            };
            Ffn::Moe {
                router: Box::new(Router::load(ckpt, &format!("{p}.mlp.gate"), config)?),
                shared,
            }
        } else {
            Ffn::Dense(Mlp::load(ckpt, &format!("{p}.mlp"), config, config.intermediate_size)?)
        };
        Ok(Block {
            index,
            input_norm: load_vector(ckpt, &format!("{p}.input_layernorm.weight"), h)?,
            attn: Mla::load(ckpt, &format!("{p}.self_attn"), config)?,
            post_norm: load_vector(ckpt, &format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn,
        })
    }

    fn weight_bytes(&self) -> usize {
        self.attn.weight_bytes()
            + match &self.ffn {
                Ffn::Dense(m) => m.weight_bytes(),
                Ffn::Moe { shared, .. } => shared.as_ref().map_or(0, Mlp::weight_bytes),
            }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        h: &mut [f32],
        spans: &[ChunkSpan],
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        experts: &dyn ExpertExecutor,
        eps: f32,
        opts: &StepOptions,
        trace: &mut Option<Trace>,
    ) -> Result<()> {
        let width = self.input_norm.len();
        let t = h.len() / width;
        let x = rms_norm_into(h, &self.input_norm, eps);
        let attn = self
            .attn
            .forward(self.index, &x, spans, cos, sin, cache, opts.mla)
            .with_context(|| format!("attention of layer {}", self.index))?;
        add_assign(h, &attn);
        let x = rms_norm_into(h, &self.post_norm, eps);
        let y = match &self.ffn {
            Ffn::Dense(mlp) => mlp.forward(&x, t),
            Ffn::Moe { router, shared } => {
                let routes = router.route(&x, t);
                let mut y = experts
                    .routed_experts(self.index, &x, &routes)
                    .with_context(|| format!("routed experts of layer {}", self.index))?;
                if let Some(shared) = shared {
                    add_assign(&mut y, &shared.forward(&x, t));
                }
                if let Some(trace) = trace {
                    trace.router_logits.insert(self.index, router.logits(&x, t));
                    trace.routes.insert(self.index, routes);
                }
                y
            }
        };
        add_assign(h, &y);
        Ok(())
    }
}

impl Model {
    /// Loads everything except the routed experts, reporting each finished layer.
    pub fn load(files: &ModelFiles, mut on_layer: impl FnMut(usize)) -> Result<Self> {
        let config = ModelConfig::from_model_files(files)?;
        let ckpt = Checkpoint::open(files)?;
        Self::from_checkpoint(config, &ckpt, &mut on_layer)
    }

    pub fn from_checkpoint(config: ModelConfig, ckpt: &Checkpoint, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = Matrix::load(ckpt, "model.embed_tokens.weight", v, h, None)?;
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            embed.clone()
        } else {
            Matrix::load(ckpt, "lm_head.weight", v, h, None)?
        };
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            blocks.push(Block::load(ckpt, &config, i).with_context(|| format!("loading layer {i}"))?);
            on_layer(i);
        }
        let mtp_index = config.num_hidden_layers;
        let mtp = if config.num_nextn_predict_layers > 0
            && ckpt.contains(&format!("model.layers.{mtp_index}.eh_proj.weight"))
        {
            let p = format!("model.layers.{mtp_index}");
            let head_name = format!("{p}.shared_head.head.weight");
            let module = MtpModule {
                enorm: load_vector(ckpt, &format!("{p}.enorm.weight"), h)?,
                hnorm: load_vector(ckpt, &format!("{p}.hnorm.weight"), h)?,
                eh_proj: Matrix::load(
                    ckpt,
                    &format!("{p}.eh_proj.weight"),
                    h,
                    2 * h,
                    config.quantization.as_ref(),
                )?,
                block: Block::load(ckpt, &config, mtp_index).context("loading the MTP block")?,
                head_norm: load_vector(ckpt, &format!("{p}.shared_head.norm.weight"), h)?,
                head: if ckpt.contains(&head_name) {
                    Some(Matrix::load(ckpt, &head_name, v, h, None)?)
                } else {
                    None
                },
            };
            on_layer(mtp_index);
            Some(module)
        } else {
            None
        };
        Ok(Model {
            rope: Rope::new(&config),
            norm: load_vector(ckpt, "model.norm.weight", h)?,
            config,
            embed,
            blocks,
            lm_head,
            mtp,
        })
    }

    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Bytes of weights this struct reads for one decode step (all but the routed experts;
    /// the embedding counts one row per token).
    pub fn weight_bytes(&self) -> usize {
        self.blocks.iter().map(Block::weight_bytes).sum::<usize>() + self.lm_head.weight_bytes()
    }

    /// Bytes of every weight this struct holds (the embedding and the MTP module included).
    pub fn resident_bytes(&self) -> usize {
        let mtp = self.mtp.as_ref().map_or(0, |m| {
            m.block.weight_bytes() + m.eh_proj.weight_bytes() + m.head.as_ref().map_or(0, Matrix::weight_bytes)
        });
        self.weight_bytes() + self.embed.weight_bytes() + mtp
    }

    fn embed_rows(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let mut out = vec![0.0f32; tokens.len() * h];
        for (row, &t) in out.chunks_exact_mut(h).zip(tokens) {
            self.embed.decode_row(t as usize, row);
        }
        out
    }

    /// Rotary tables for every token row, and the chunk spans.
    fn layout(&self, chunks: &[Chunk]) -> (Vec<ChunkSpan>, Vec<f32>, Vec<f32>) {
        let half = self.config.qk_rope_head_dim / 2;
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let (mut cos, mut sin) = (vec![0.0f32; total * half], vec![0.0f32; total * half]);
        let mut spans = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for c in chunks {
            for k in 0..c.tokens.len() {
                let at = (row + k) * half;
                self.rope
                    .cos_sin(c.start + k, &mut cos[at..at + half], &mut sin[at..at + half]);
            }
            spans.push(ChunkSpan {
                seq: c.seq,
                start: c.start,
                rows: row..row + c.tokens.len(),
            });
            row += c.tokens.len();
        }
        (spans, cos, sin)
    }

    /// One forward step of the main model over a batch of chunks (prefill chunks and decode
    /// tokens mixed). Each chunk must continue its sequence in `cache`.
    pub fn forward(
        &self,
        chunks: &[Chunk],
        cache: &mut KvCache,
        experts: &dyn ExpertExecutor,
        opts: &StepOptions,
    ) -> Result<(Vec<ChunkOutput>, Option<Trace>)> {
        check_chunks(&self.config, chunks)?;
        begin_step(cache.table_mut(), chunks)?;
        let result = self.forward_layers(chunks, cache, experts, opts);
        if result.is_err() {
            discard_step(cache.table_mut(), chunks);
        }
        result
    }

    /// [`Model::forward`] once every chunk has its room in `cache`.
    fn forward_layers(
        &self,
        chunks: &[Chunk],
        cache: &mut KvCache,
        experts: &dyn ExpertExecutor,
        opts: &StepOptions,
    ) -> Result<(Vec<ChunkOutput>, Option<Trace>)> {
        let tokens: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let (spans, cos, sin) = self.layout(chunks);
        let mut h = self.embed_rows(&tokens);
        let mut trace = opts.trace.then(Trace::default);
        if let Some(t) = &mut trace {
            t.hidden.push(h.clone());
        }
        for block in &self.blocks {
            block.forward(
                &mut h,
                &spans,
                &cos,
                &sin,
                cache,
                experts,
                self.config.rms_norm_eps,
                opts,
                &mut trace,
            )?;
            if let Some(t) = &mut trace {
                t.hidden.push(h.clone());
            }
        }
        Ok((self.outputs(chunks, &h, &self.norm, &self.lm_head), trace))
    }

    /// Final norm and head on the rows each chunk asked for.
    fn outputs(&self, chunks: &[Chunk], h: &[f32], norm: &[f32], head: &Matrix) -> Vec<ChunkOutput> {
        let width = self.config.hidden_size;
        let mut row = 0;
        let mut result = Vec::with_capacity(chunks.len());
        for c in chunks {
            let n = c.tokens.len();
            let wanted = c.output_offsets();
            let normed_rows: Vec<usize> = if c.all_hidden { (0..n).collect() } else { wanted.clone() };
            let mut hidden = Vec::with_capacity(normed_rows.len() * width);
            for &k in &normed_rows {
                hidden.extend_from_slice(&h[(row + k) * width..(row + k + 1) * width]);
            }
            rms_norm(&mut hidden, norm, self.config.rms_norm_eps);
            let logits = if c.all_hidden {
                let mut picked = Vec::with_capacity(wanted.len() * width);
                for &k in &wanted {
                    picked.extend_from_slice(&hidden[k * width..(k + 1) * width]);
                }
                head.forward(&picked, wanted.len())
            } else {
                head.forward(&hidden, wanted.len())
            };
            result.push(ChunkOutput {
                positions: wanted.iter().map(|k| c.start + k).collect(),
                logits,
                hidden,
            });
            row += n;
        }
        result
    }

    /// One step of the MTP module (depth 1). Chunk `tokens` are `t_{i+1}` and `prev_hidden` the
    /// main model's post-norm hidden states `h_i` for positions `i = start..`; logits predict
    /// `t_{i+2}`. Uses its own cache layer (`num_hidden_layers`).
    pub fn mtp_forward(
        &self,
        chunks: &[Chunk],
        cache: &mut KvCache,
        experts: &dyn ExpertExecutor,
        opts: &StepOptions,
    ) -> Result<Vec<ChunkOutput>> {
        let mtp = self.mtp.as_ref().context("this checkpoint has no MTP module")?;
        check_chunks(&self.config, chunks)?;
        let width = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        let mut concat = Vec::new();
        for c in chunks {
            let prev = c
                .prev_hidden
                .with_context(|| format!("sequence {}: MTP chunk without hidden states", c.seq))?;
            ensure!(
                prev.len() == c.tokens.len() * width,
                "sequence {}: MTP hidden states have the wrong length",
                c.seq
            );
            cache.reserve(c.seq, c.start + c.tokens.len())?;
            let e = self.embed_rows(c.tokens);
            for (e_row, h_row) in e.chunks_exact(width).zip(prev.chunks_exact(width)) {
                concat.extend(rms_norm_into(e_row, &mtp.enorm, eps));
                concat.extend(rms_norm_into(h_row, &mtp.hnorm, eps));
            }
        }
        let rows = concat.len() / (2 * width);
        let mut h = mtp.eh_proj.forward(&concat, rows);
        let (spans, cos, sin) = self.layout(chunks);
        mtp.block
            .forward(&mut h, &spans, &cos, &sin, cache, experts, eps, opts, &mut None)?;
        Ok(self.outputs(chunks, &h, &mtp.head_norm, mtp.head.as_ref().unwrap_or(&self.lm_head)))
    }
}
