//! The DeepSeek-V3 decoder on one GPU: the same step API as the CPU model (chunks of consecutive
//! tokens per sequence, prefill and decode mixed), weights in their checkpoint format, the latent
//! cache paged in GPU memory, all routed experts local.

use crate::cache::DeviceCache;
use crate::gpu::{float, int, ptr, u64_arg, DeviceBuf, Gpu};
use crate::linear::mma_fits;
use crate::weights::{load_vector, random_vector, DeviceMatrix, ExpertBank, Format};
use anyhow::{bail, ensure, Context, Result};
use dsv3_engine::rope::{softmax_scale, Rope};
use dsv3_engine::{Checkpoint, Chunk, ChunkOutput, ModelConfig, ModelFiles, Outputs};
use std::collections::HashSet;

/// Experts with more routed rows than this in a step use cuBLAS instead of the grouped GEMV.
const GROUPED_MAX_ROWS: usize = 64;
const LATENT_NORM_EPS: f32 = 1e-6;
const MLA_HEAD_GROUP: usize = 16;
const MLA_TILE: usize = 32;
/// Positions per tile of the tensor-core decode kernel.
const TC_TILE: usize = 64;
/// Steps whose chunks all have at least this many rows (prefill) use the naive MLA form.
pub const NAIVE_MIN_ROWS: usize = 64;

struct Attention {
    q_a: Option<(DeviceMatrix, DeviceBuf)>,
    q_b: DeviceMatrix,
    kv_a: DeviceMatrix,
    kv_norm: DeviceBuf,
    kv_b: DeviceMatrix,
    o: DeviceMatrix,
}

struct Mlp {
    gate: DeviceMatrix,
    up: DeviceMatrix,
    down: DeviceMatrix,
}

struct Moe {
    router: DeviceMatrix,
    bias: DeviceBuf,
    shared: Option<Mlp>,
    experts: ExpertBank,
}

enum Ffn {
    Dense(Box<Mlp>),
    Moe(Box<Moe>),
}

struct Layer {
    index: usize,
    input_norm: DeviceBuf,
    attn: Attention,
    post_norm: DeviceBuf,
    ffn: Ffn,
}

/// Per-layer hidden states of a step (`hidden[0]` = embeddings), rows in step order.
#[derive(Default, Debug)]
pub struct DeviceTrace {
    pub hidden: Vec<Vec<f32>>,
    pub routes: Vec<(usize, Vec<u32>)>,
}

pub struct CudaModel {
    pub gpu: Gpu,
    pub config: ModelConfig,
    rope: Rope,
    embed: DeviceMatrix,
    layers: Vec<Layer>,
    norm: DeviceBuf,
    head: DeviceMatrix,
    pub cache: DeviceCache,
    /// bf16 scratch for dequantised weights on the cuBLAS path.
    dequant: DeviceBuf,
    experts_touched: std::cell::Cell<usize>,
    /// Tokens each routed expert received, per MoE layer, since the last take (serving metrics).
    expert_counts: std::cell::RefCell<std::collections::BTreeMap<usize, Vec<u64>>>,
    /// Use the CUDA-core attention kernel instead of the tensor-core one (DSV3_MLA_SIMT=1).
    simt_attention: bool,
    /// Use the CUDA-core GEMV kernels for FP8 weights at every batch (DSV3_LINEAR_SIMT=1).
    simt_linear: bool,
}

fn dense_matrices(config: &ModelConfig) -> Vec<(usize, usize)> {
    let h = config.hidden_size;
    let qk = config.qk_head_dim();
    let heads = config.num_attention_heads;
    let mut v = vec![
        (heads * qk, config.q_lora_rank.unwrap_or(h)),
        (config.kv_lora_rank + config.qk_rope_head_dim, h),
        (heads * config.v_head_dim, h),
        (h, heads * config.v_head_dim),
        (config.intermediate_size, h),
        (h, config.intermediate_size),
        (config.moe_intermediate_size.max(1) * config.n_shared_experts.max(1), h),
        (config.vocab_size, h),
        (config.moe_intermediate_size, h),
    ];
    if let Some(r) = config.q_lora_rank {
        v.push((r, h));
    }
    v
}

impl CudaModel {
    /// Loads a checkpoint onto GPU `ordinal` with a cache of `cache_tokens` positions.
    pub fn load(
        files: &ModelFiles,
        ordinal: usize,
        cache_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_model_files(files)?;
        let gpu = Gpu::open(ordinal)?;
        let ckpt = Checkpoint::open(files)?;
        let h = config.hidden_size;
        let embed = DeviceMatrix::load(&gpu, &ckpt, "model.embed_tokens.weight", config.vocab_size, h)?;
        let head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            DeviceMatrix::load(&gpu, &ckpt, "model.embed_tokens.weight", config.vocab_size, h)?
        } else {
            DeviceMatrix::load(&gpu, &ckpt, "lm_head.weight", config.vocab_size, h)?
        };
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            layers.push(Layer::load(&gpu, &ckpt, &config, l).with_context(|| format!("layer {l}"))?);
            progress(l + 1, config.num_hidden_layers);
        }
        let norm = load_vector(&gpu, &ckpt, "model.norm.weight", h)?;
        Self::assemble(gpu, config, embed, layers, norm, head, cache_tokens)
    }

    /// Random FP8 weights made on the GPU (bf16 embedding and head, as the official checkpoint),
    /// for benchmarks at full width.
    pub fn random(config: ModelConfig, ordinal: usize, cache_tokens: usize, seed: u64) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let h = config.hidden_size;
        let embed = DeviceMatrix::random(&gpu, config.vocab_size, h, Format::Bf16, seed)?;
        let head = DeviceMatrix::random(&gpu, config.vocab_size, h, Format::Bf16, seed + 1)?;
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            layers.push(Layer::random(&gpu, &config, l, seed + 100 * (l as u64 + 1))?);
        }
        let norm = random_vector(&gpu, h, 0.8, 1.2, seed + 2)?;
        gpu.sync()?;
        Self::assemble(gpu, config, embed, layers, norm, head, cache_tokens)
    }

    fn assemble(
        gpu: Gpu,
        config: ModelConfig,
        embed: DeviceMatrix,
        layers: Vec<Layer>,
        norm: DeviceBuf,
        head: DeviceMatrix,
        cache_tokens: usize,
    ) -> Result<Self> {
        let block = 64;
        let cache = DeviceCache::new(
            &gpu,
            config.num_hidden_layers,
            config.kv_cache_width(),
            block,
            cache_tokens.div_ceil(block).max(1),
        )?;
        let largest = dense_matrices(&config).iter().map(|(r, c)| r * c).max().unwrap_or(1);
        let dequant = gpu.alloc(largest * 2)?;
        ensure!(
            config.kv_lora_rank <= 512 && config.kv_lora_rank % 2 == 0,
            "kv_lora_rank must be even and at most 512"
        );
        ensure!(
            config.qk_nope_head_dim <= 256,
            "qk_nope_head_dim above 256 is not supported by the CUDA kernels"
        );
        ensure!(
            config.n_routed_experts <= 1024 && config.num_experts_per_tok <= 32,
            "too many experts for the routing kernel"
        );
        Ok(CudaModel {
            rope: Rope::new(&config),
            gpu,
            config,
            embed,
            layers,
            norm,
            head,
            cache,
            dequant,
            experts_touched: std::cell::Cell::new(0),
            expert_counts: Default::default(),
            simt_attention: std::env::var_os("DSV3_MLA_SIMT").is_some_and(|v| v != "0"),
            simt_linear: std::env::var_os("DSV3_LINEAR_SIMT").is_some_and(|v| v != "0"),
        })
    }

    /// Bytes of weights a decode step reads outside the routed experts (one embedding row).
    pub fn dense_step_bytes(&self) -> usize {
        self.layers.iter().map(Layer::dense_bytes).sum::<usize>() + self.head.bytes()
    }

    /// Bytes of one routed expert of a MoE layer (all layers share the shape).
    pub fn expert_bytes(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| match &l.ffn {
                Ffn::Moe(m) => Some(m.experts.bytes_per_expert()),
                Ffn::Dense(_) => None,
            })
            .unwrap_or(0)
    }

    pub fn free_sequence(&mut self, seq: u64) {
        self.cache.free_sequence(seq);
    }

    /// One forward step over `chunks`; logits for the positions each chunk asks for.
    pub fn forward(&mut self, chunks: &[Chunk], trace: bool) -> Result<(Vec<ChunkOutput>, Option<DeviceTrace>)> {
        let (h, m, mut trace) = self.forward_hidden(chunks, trace)?;
        let mut wanted_rows = Vec::new();
        let mut row = 0;
        let mut plan = Vec::new();
        for c in chunks {
            let n = c.tokens.len();
            let ks: Vec<usize> = match c.outputs {
                Outputs::None => vec![],
                Outputs::Last => vec![n - 1],
                Outputs::All => (0..n).collect(),
            };
            plan.push(ks.iter().map(|k| c.start + k).collect::<Vec<_>>());
            wanted_rows.extend(ks.iter().map(|k| (row + k) as i32));
            row += n;
        }
        let _ = m;
        let r = wanted_rows.len();
        let mut outputs = Vec::with_capacity(chunks.len());
        let (logits, hidden) = if r > 0 {
            self.head_rows(&h, &wanted_rows)?
        } else {
            (vec![], vec![])
        };
        let (v, width) = (self.config.vocab_size, self.config.hidden_size);
        let mut at = 0;
        for positions in plan {
            let k = positions.len();
            outputs.push(ChunkOutput {
                positions,
                logits: logits[at * v..(at + k) * v].to_vec(),
                hidden: hidden[at * width..(at + k) * width].to_vec(),
            });
            at += k;
        }
        if let Some(t) = &mut trace {
            t.hidden.shrink_to_fit();
        }
        Ok((outputs, trace))
    }

    /// Final norm and head over the given rows of `h`: (logits, post-norm hidden).
    fn head_rows(&self, h: &DeviceBuf, rows: &[i32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (logits, normed) = self.head_device(h, rows)?;
        let (width, v) = (self.config.hidden_size, self.config.vocab_size);
        let l = self.gpu.download::<f32>(logits.addr, rows.len() * v)?;
        let hs = self.gpu.download::<f32>(normed.addr, rows.len() * width)?;
        Ok((l, hs))
    }

    /// One greedy step: the argmax token after the last position of every chunk, chosen on the GPU.
    pub fn greedy_step(&mut self, chunks: &[Chunk]) -> Result<Vec<u32>> {
        let (h, _, _) = self.forward_hidden(chunks, false)?;
        let mut rows = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            at += c.tokens.len();
            rows.push(at as i32 - 1);
        }
        let (logits, _) = self.head_device(&h, &rows)?;
        let ids = self.gpu.alloc(rows.len() * 4)?;
        self.gpu.launch(
            "argmax_rows",
            (rows.len() as u32, 1, 1),
            1024,
            0,
            &[ptr(ids.addr), ptr(logits.addr), int(self.config.vocab_size)],
        )?;
        Ok(self
            .gpu
            .download::<i32>(ids.addr, rows.len())?
            .into_iter()
            .map(|t| t as u32)
            .collect())
    }

    /// Gives each sequence `len` cached positions of random latents (benchmarks of long contexts
    /// without running their prefill).
    pub fn fill_cache_random(&mut self, seqs: &[u64], len: usize, seed: u64) -> Result<()> {
        for &s in seqs {
            self.cache.begin_chunk(s, 0, len)?;
        }
        let n = self.cache.data.bytes / 2;
        self.gpu.launch_1d(
            "random_bf16",
            n,
            &[
                ptr(self.cache.data.addr),
                u64_arg(n as u64),
                u64_arg(seed),
                float(-1.0),
                float(1.0),
            ],
        )
    }

    /// Drops positions from `len` on.
    pub fn truncate(&mut self, seq: u64, len: usize) {
        self.cache.truncate(seq, len);
    }

    /// Tokens per routed expert and MoE layer since the last call.
    pub fn take_expert_counts(&self) -> std::collections::BTreeMap<usize, Vec<u64>> {
        std::mem::take(&mut *self.expert_counts.borrow_mut())
    }

    /// Routed experts used by the last step, summed over MoE layers.
    pub fn experts_touched(&self) -> usize {
        self.experts_touched.get()
    }

    /// Weight elements a token multiplies outside the routed experts, and per routed expert.
    pub fn dense_elements_per_token(&self) -> usize {
        self.layers.iter().map(Layer::dense_elements).sum::<usize>() + self.head.rows * self.head.cols
    }

    pub fn expert_elements(&self) -> usize {
        self.expert_bytes_elements().1
    }

    fn expert_bytes_elements(&self) -> (usize, usize) {
        self.layers
            .iter()
            .find_map(|l| match &l.ffn {
                Ffn::Moe(m) => {
                    let b = &m.experts;
                    Some((b.bytes_per_expert(), b.gate.stride() + b.up.stride() + b.down.stride()))
                }
                Ffn::Dense(_) => None,
            })
            .unwrap_or((0, 0))
    }

    pub fn moe_layers(&self) -> usize {
        self.layers.iter().filter(|l| matches!(l.ffn, Ffn::Moe(_))).count()
    }

    /// Logits `[rows, vocab]` and post-norm hidden states for the given rows, left on the GPU.
    fn head_device(&self, h: &DeviceBuf, rows: &[i32]) -> Result<(DeviceBuf, DeviceBuf)> {
        let g = &self.gpu;
        let (width, v) = (self.config.hidden_size, self.config.vocab_size);
        let r = rows.len();
        let rows_buf = g.upload(rows)?;
        let picked = g.alloc(r * width * 4)?;
        g.launch(
            "gather_rows_f32",
            (r as u32, 1, 1),
            256,
            0,
            &[
                ptr(picked.addr),
                ptr(h.addr),
                int(width),
                ptr(rows_buf.addr),
                int(width),
            ],
        )?;
        let normed = g.alloc(r * width * 4)?;
        self.rms_norm(
            &normed,
            width,
            &picked,
            width,
            &self.norm,
            width,
            r,
            self.config.rms_norm_eps,
        )?;
        let logits = g.alloc(r * v * 4)?;
        self.linear(logits.addr, v, normed.addr, r, &self.head, false)?;
        Ok((logits, normed))
    }

    fn check_chunks(&self, chunks: &[Chunk]) -> Result<()> {
        let mut seen = HashSet::new();
        for c in chunks {
            ensure!(!c.tokens.is_empty(), "sequence {}: empty chunk", c.seq);
            ensure!(seen.insert(c.seq), "sequence {} appears twice in one step", c.seq);
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                bail!(
                    "sequence {}: token id {bad} is outside the vocabulary (size {})",
                    c.seq,
                    self.config.vocab_size
                );
            }
            let end = c.start + c.tokens.len();
            if end > self.config.max_position_embeddings {
                bail!(
                    "sequence {}: position {} is beyond the model's context of {} tokens",
                    c.seq,
                    end - 1,
                    self.config.max_position_embeddings
                );
            }
        }
        Ok(())
    }

    /// Runs every layer; returns the residual stream `[m, hidden]` on the GPU.
    pub fn forward_hidden(&mut self, chunks: &[Chunk], trace: bool) -> Result<(DeviceBuf, usize, Option<DeviceTrace>)> {
        self.check_chunks(chunks)?;
        for c in chunks {
            self.cache.begin_chunk(c.seq, c.start, c.tokens.len())?;
        }
        let step = self.step_layout(chunks)?;
        self.experts_touched.set(0);
        let g = &self.gpu;
        let m = step.rows;
        let width = self.config.hidden_size;
        let h = g.alloc(m * width * 4)?;
        g.launch(
            "embed_rows",
            (m as u32, 1, 1),
            256,
            0,
            &[
                ptr(h.addr),
                int(self.embed.format as usize),
                ptr(self.embed.data.addr),
                ptr(self.embed.scale_addr()),
                ptr(step.ids),
                int(width),
            ],
        )?;
        let mut tr = trace.then(DeviceTrace::default);
        if let Some(t) = &mut tr {
            t.hidden.push(g.download(h.addr, m * width)?);
        }
        for layer in &self.layers {
            self.layer_forward(layer, &h, &step, &mut tr)
                .with_context(|| format!("layer {}", layer.index))?;
            if let Some(t) = &mut tr {
                t.hidden.push(g.download(h.addr, m * width)?);
            }
        }
        Ok((h, m, tr))
    }

    fn step_layout(&self, chunks: &[Chunk]) -> Result<StepLayout> {
        let half = self.config.qk_rope_head_dim / 2;
        let mut ids = Vec::new();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let (mut slots, mut table_off, mut lens, mut tables) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut c_buf, mut s_buf) = (vec![0.0f32; half], vec![0.0f32; half]);
        for c in chunks {
            let off = tables.len() as i32;
            tables.extend(self.cache.blocks(c.seq).iter().map(|&b| b as i32));
            for (k, &t) in c.tokens.iter().enumerate() {
                let pos = c.start + k;
                ids.push(t);
                self.rope.cos_sin(pos, &mut c_buf, &mut s_buf);
                cos.extend_from_slice(&c_buf);
                sin.extend_from_slice(&s_buf);
                slots.push(self.cache.slot(c.seq, pos) as i32);
                table_off.push(off);
                lens.push((pos + 1) as i32);
            }
        }
        let g = &self.gpu;
        let mut spans = Vec::with_capacity(chunks.len());
        let mut first_row = 0;
        for c in chunks {
            spans.push(Span {
                seq: c.seq,
                start: c.start,
                rows: c.tokens.len(),
                first_row,
            });
            first_row += c.tokens.len();
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let words = |v: &[i32]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        let (buf, a) = g.upload_words(&[
            &ids,
            &bits(&cos),
            &bits(&sin),
            &words(&slots),
            &words(&table_off),
            &words(&lens),
            &words(&tables),
        ])?;
        Ok(StepLayout {
            max_len: lens.iter().copied().max().unwrap_or(0) as usize,
            rows: ids.len(),
            spans,
            ids: a[0],
            cos: a[1],
            sin: a[2],
            slots: a[3],
            table_off: a[4],
            lens: a[5],
            tables: a[6],
            _buf: buf,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        out: &DeviceBuf,
        ld_out: usize,
        x: &DeviceBuf,
        ld_in: usize,
        w: &DeviceBuf,
        width: usize,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        self.rms_norm_addr(out.addr, ld_out, x.addr, ld_in, w, width, rows, eps)
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm_addr(
        &self,
        out: u64,
        ld_out: usize,
        x: u64,
        ld_in: usize,
        w: &DeviceBuf,
        width: usize,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        self.gpu.launch(
            "rms_norm",
            (rows as u32, 1, 1),
            256,
            0,
            &[
                ptr(out),
                int(ld_out),
                ptr(x),
                int(ld_in),
                ptr(w.addr),
                int(width),
                float(eps),
            ],
        )
    }

    /// `y[m, w.rows] (+)= x[m, w.cols] · wᵀ` (x contiguous, y with row stride ldy).
    fn linear(&self, y: u64, ldy: usize, x: u64, m: usize, w: &DeviceMatrix, accumulate: bool) -> Result<()> {
        crate::linear::linear(&self.gpu, &self.dequant, self.simt_linear, y, ldy, x, m, w, accumulate)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        h: &DeviceBuf,
        step: &StepLayout,
        trace: &mut Option<DeviceTrace>,
    ) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let m = step.rows;
        let width = c.hidden_size;
        let eps = c.rms_norm_eps;
        let x = g.alloc(m * width * 4)?;
        self.rms_norm(&x, width, h, width, &layer.input_norm, width, m, eps)?;
        self.attention(layer, &x, h, step)?;
        self.rms_norm(&x, width, h, width, &layer.post_norm, width, m, eps)?;
        match &layer.ffn {
            Ffn::Dense(mlp) => self.mlp(mlp, &x, h.addr, m),
            Ffn::Moe(moe) => {
                let routes = self.moe(moe, &x, h, m)?;
                let mut counts = self.expert_counts.borrow_mut();
                let layer_counts = counts
                    .entry(layer.index)
                    .or_insert_with(|| vec![0; moe.experts.experts]);
                for &e in &routes {
                    if let Some(c) = layer_counts.get_mut(e as usize) {
                        *c += 1;
                    }
                }
                if let Some(t) = trace {
                    t.routes.push((layer.index, routes));
                }
                Ok(())
            }
        }
    }

    /// Dense SwiGLU MLP, added into `out`.
    fn mlp(&self, mlp: &Mlp, x: &DeviceBuf, out: u64, m: usize) -> Result<()> {
        let g = &self.gpu;
        let inter = mlp.gate.rows;
        let gu = g.alloc(m * 2 * inter * 4)?;
        self.linear(gu.addr, 2 * inter, x.addr, m, &mlp.gate, false)?;
        self.linear(gu.addr + (inter * 4) as u64, 2 * inter, x.addr, m, &mlp.up, false)?;
        let act = g.alloc(m * inter * 4)?;
        g.launch_1d("swiglu", m * inter, &[ptr(act.addr), ptr(gu.addr), int(m), int(inter)])?;
        self.linear(out, self.config.hidden_size, act.addr, m, &mlp.down, true)
    }

    fn attention(&self, layer: &Layer, x: &DeviceBuf, h: &DeviceBuf, step: &StepLayout) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let a = &layer.attn;
        let m = step.rows;
        let (heads, nope, rope, vdim, lora) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = nope + rope;
        let q = g.alloc(m * heads * qk * 4)?;
        match &a.q_a {
            Some((q_a, q_norm)) => {
                let ca = g.alloc(m * q_a.rows * 4)?;
                self.linear(ca.addr, q_a.rows, x.addr, m, q_a, false)?;
                self.rms_norm(&ca, q_a.rows, &ca, q_a.rows, q_norm, q_a.rows, m, LATENT_NORM_EPS)?;
                self.linear(q.addr, heads * qk, ca.addr, m, &a.q_b, false)?;
            }
            None => self.linear(q.addr, heads * qk, x.addr, m, &a.q_b, false)?,
        }
        let kv_w = lora + rope;
        let kv = g.alloc(m * kv_w * 4)?;
        self.linear(kv.addr, kv_w, x.addr, m, &a.kv_a, false)?;
        self.rms_norm(&kv, kv_w, &kv, kv_w, &a.kv_norm, lora, m, LATENT_NORM_EPS)?;
        let rope_args = |buf: u64, ld: usize, nh: usize, hs: usize, offset: usize| {
            [
                ptr(buf),
                int(ld),
                int(nh),
                int(hs),
                int(offset),
                int(rope),
                ptr(step.cos),
                ptr(step.sin),
            ]
        };
        g.launch(
            "rope_interleaved",
            (m as u32, 1, 1),
            128,
            0,
            &rope_args(kv.addr, kv_w, 1, 0, lora),
        )?;
        g.launch(
            "rope_interleaved",
            (m as u32, 1, 1),
            256,
            0,
            &rope_args(q.addr, heads * qk, heads, qk, nope),
        )?;
        let cache = self.cache.layer_addr(layer.index);
        g.launch(
            "cache_write",
            (m as u32, 1, 1),
            256,
            0,
            &[ptr(cache), ptr(kv.addr), int(kv_w), ptr(step.slots), int(kv_w)],
        )?;
        let attn = g.alloc(m * heads * vdim * 4)?;
        if step.spans.iter().all(|sp| sp.rows >= NAIVE_MIN_ROWS) {
            for sp in &step.spans {
                self.attend_naive(layer, &q, &attn, sp)?;
            }
        } else {
            self.attend_absorbed(layer, &q, &attn, step)?;
        }
        self.linear(h.addr, c.hidden_size, attn.addr, m, &a.o, true)
    }

    /// Weight-absorbed attention over the latent cache for every row of the step (decode).
    fn attend_absorbed(&self, layer: &Layer, q: &DeviceBuf, attn: &DeviceBuf, step: &StepLayout) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let a = &layer.attn;
        let m = step.rows;
        let (heads, nope, rope, vdim, lora) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = nope + rope;
        let kv_w = lora + rope;
        let cache = self.cache.layer_addr(layer.index);
        // absorbed attention over the latent cache
        let q_lat = g.alloc(m * heads * lora * 4)?;
        let kvb = &a.kv_b;
        g.launch(
            "mla_absorb_q",
            (heads as u32, m.div_ceil(8) as u32, 1),
            lora.next_multiple_of(32) as u32,
            0,
            &[
                ptr(q_lat.addr),
                ptr(q.addr),
                int(m),
                int(heads),
                int(qk),
                int(nope),
                int(vdim),
                int(lora),
                int(kvb.format as usize),
                ptr(kvb.data.addr),
                ptr(kvb.scale_addr()),
            ],
        )?;
        let o_lat = g.alloc(m * heads * lora * 4)?;
        let hg = MLA_HEAD_GROUP.min(heads);
        ensure!(heads % hg == 0, "{heads} heads do not split into groups of {hg}");
        let args_tail = [
            ptr(q_lat.addr),
            ptr(q.addr),
            int(qk),
            int(nope),
            int(heads),
            int(hg),
            int(lora),
            int(rope),
            ptr(cache),
            ptr(step.tables),
            ptr(step.table_off),
            ptr(step.lens),
            int(self.cache.block_size),
            float(softmax_scale(c)),
        ];
        let tensor_cores = kv_w % 16 == 0 && lora % 64 == 0 && !self.simt_attention;
        if tensor_cores {
            // Split the positions so the grid fills the GPU even at batch 1 (flash-decoding).
            let groups = m * heads / hg;
            let max_len = step.max_len;
            let wanted = (4 * g.sm_count).div_ceil(groups);
            let splits = wanted.min(max_len.div_ceil(256)).max(1);
            let split_len = max_len.div_ceil(splits).next_multiple_of(TC_TILE);
            let splits = max_len.div_ceil(split_len);
            let o_part = g.alloc(m * heads * splits * lora * 4)?;
            let ml_part = g.alloc(m * heads * splits * 2 * 4)?;
            let smem = (32 + 2 * TC_TILE) * (kv_w + 8) * 2 + 32 * (TC_TILE + 8) * 2 + (2 * 8 * 16 + 32) * 4;
            let mut args = vec![ptr(o_part.addr), ptr(ml_part.addr)];
            args.extend_from_slice(&args_tail);
            args.push(int(split_len));
            g.launch(
                "mla_decode_tc",
                ((heads / hg) as u32, m as u32, splits as u32),
                256,
                smem as u32,
                &args,
            )?;
            g.launch(
                "mla_combine",
                (heads as u32, m as u32, 1),
                128,
                0,
                &[
                    ptr(o_lat.addr),
                    ptr(o_part.addr),
                    ptr(ml_part.addr),
                    int(heads),
                    int(splits),
                    int(lora),
                ],
            )?;
        } else {
            let smem = (hg * kv_w + hg * MLA_TILE + 3 * hg) * 4 + MLA_TILE * (kv_w + 2) * 2;
            let mut args = vec![ptr(o_lat.addr)];
            args.extend_from_slice(&args_tail);
            g.launch(
                "mla_attend",
                ((heads / hg) as u32, m as u32, 1),
                256,
                smem as u32,
                &args,
            )?;
        }
        g.launch(
            "mla_absorb_out",
            (heads as u32, m.div_ceil(8) as u32, 1),
            256,
            0,
            &[
                ptr(attn.addr),
                ptr(o_lat.addr),
                int(m),
                int(heads),
                int(nope),
                int(vdim),
                int(lora),
                int(kvb.format as usize),
                ptr(kvb.data.addr),
                ptr(kvb.scale_addr()),
            ],
        )?;
        Ok(())
    }

    /// Naive-form attention for one prefill chunk: K and V expanded from every cached latent of
    /// the sequence, then causal QKᵀ and PV per head on the tensor cores, a group of heads at a time.
    fn attend_naive(&self, layer: &Layer, q: &DeviceBuf, attn: &DeviceBuf, span: &Span) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let (heads, nope, rope, vdim, lora) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = nope + rope;
        let (n, total) = (span.rows, span.start + span.rows);
        let table = g.upload(
            &self
                .cache
                .blocks(span.seq)
                .iter()
                .map(|&b| b as i32)
                .collect::<Vec<_>>(),
        )?;
        let c_kv = g.alloc(total * lora * 4)?;
        let k_pe = g.alloc(total * rope * 4)?;
        g.launch(
            "gather_latents",
            (total as u32, 1, 1),
            256,
            0,
            &[
                ptr(c_kv.addr),
                ptr(k_pe.addr),
                ptr(self.cache.layer_addr(layer.index)),
                ptr(table.addr),
                int(self.cache.block_size),
                int(lora),
                int(rope),
            ],
        )?;
        let kv = g.alloc(total * heads * (nope + vdim) * 4)?;
        self.linear(
            kv.addr,
            heads * (nope + vdim),
            c_kv.addr,
            total,
            &layer.attn.kv_b,
            false,
        )?;
        let kb = g.alloc(total * heads * qk * 2)?;
        let vb = g.alloc(total * heads * vdim * 2)?;
        g.launch(
            "build_kv",
            (total as u32, 1, 1),
            256,
            0,
            &[
                ptr(kb.addr),
                ptr(vb.addr),
                ptr(kv.addr),
                ptr(k_pe.addr),
                int(heads),
                int(nope),
                int(rope),
                int(vdim),
            ],
        )?;
        let qb = g.alloc(n * heads * qk * 2)?;
        let q_rows = q.at(span.first_row * heads * qk * 4);
        g.launch_1d(
            "f32_to_bf16_rows",
            n * heads * qk,
            &[ptr(qb.addr), ptr(q_rows), u64_arg((n * heads * qk) as u64)],
        )?;
        // heads per group: scores of at most 2^28 elements (1 GiB of f32)
        let hc = (((1usize << 28) / (n * total)).max(1)).min(heads);
        let scores = g.alloc(hc * n * total * 4)?;
        let probs = g.alloc(hc * n * total * 2)?;
        let out = attn.at(span.first_row * heads * vdim * 4);
        let scale = softmax_scale(c);
        let mut h0 = 0;
        while h0 < heads {
            let hn = hc.min(heads - h0);
            // Sᵀ[total, n] = K_h · Q_hᵀ per head (column-major view of row-major S[n, total])
            g.gemm_batched_bf16(
                true,
                total,
                n,
                qk,
                scale,
                (kb.at(h0 * qk * 2), heads * qk, qk),
                (qb.at(h0 * qk * 2), heads * qk, qk),
                (scores.addr, total, n * total),
                hn,
            )?;
            g.launch(
                "causal_softmax",
                ((hn * n) as u32, 1, 1),
                256,
                0,
                &[ptr(probs.addr), ptr(scores.addr), int(n), int(total), int(span.start)],
            )?;
            // Oᵀ[v, n] = V_hᵀ · Pᵀ, written into attn rows with stride heads*v
            g.gemm_batched_bf16(
                false,
                vdim,
                n,
                total,
                1.0,
                (vb.at(h0 * vdim * 2), heads * vdim, vdim),
                (probs.addr, total, n * total),
                (out + (h0 * vdim * 4) as u64, heads * vdim, vdim),
                hn,
            )?;
            h0 += hn;
        }
        Ok(())
    }

    /// Routed and shared experts, added into `h`. Returns the chosen experts `[m, top_k]`.
    fn moe(&self, moe: &Moe, x: &DeviceBuf, h: &DeviceBuf, m: usize) -> Result<Vec<u32>> {
        let g = &self.gpu;
        let c = &self.config;
        let (e, k, width) = (c.n_routed_experts, c.num_experts_per_tok, c.hidden_size);
        let logits = g.alloc(m * e * 4)?;
        self.linear(logits.addr, e, x.addr, m, &moe.router, false)?;
        let ids = g.alloc(m * k * 4)?;
        let weights = g.alloc(m * k * 4)?;
        let smem = (2 * e + c.n_group + k) * 4;
        g.launch(
            "route_topk",
            (m as u32, 1, 1),
            e.next_multiple_of(32) as u32,
            smem as u32,
            &[
                ptr(ids.addr),
                ptr(weights.addr),
                ptr(logits.addr),
                ptr(moe.bias.addr),
                int(e),
                int(c.n_group),
                int(c.topk_group),
                int(k),
                int(c.norm_topk_prob as usize),
                float(c.routed_scaling_factor),
            ],
        )?;
        let (chosen, plan) = g.profiled("route_sync_permute", || {
            let chosen: Vec<i32> = g.download(ids.addr, m * k)?;
            let plan = Permutation::new(&chosen, m, k, e)?;
            Ok((chosen, plan))
        })?;
        self.experts_touched
            .set(self.experts_touched.get() + plan.group_expert.len());
        let slots = plan.x_rows.len();
        let bank = &moe.experts;
        let inter = bank.gate.rows;
        let gu = g.alloc(slots * 2 * inter * 4)?;
        let act = g.alloc(slots * inter * 4)?;
        let y = g.alloc(slots * width * 4)?;
        let w = |v: &[i32]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        let (_plan_buf, pa) = g.upload_words(&[
            &w(&plan.x_rows),
            &w(&plan.group_expert),
            &w(&plan.offsets),
            &w(&plan.slot_of),
        ])?;
        let (x_rows, group_expert, offsets, slot_of) = (pa[0], pa[1], pa[2], pa[3]);
        let small = plan.small_groups(GROUPED_MAX_ROWS);
        let tensor_cores = !self.simt_linear && mma_fits(inter, width) && mma_fits(width, inter);
        let largest_small = plan.offsets[..=small]
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        // Small groups: one launch for all of them, weights streamed once per group.
        let grouped = |out: u64, ldy: usize, input: u64, ldx: usize, rows: u64, s: &crate::weights::Stacked| {
            let common = [
                ptr(out),
                int(ldy),
                ptr(input),
                int(ldx),
                ptr(rows),
                ptr(s.data.addr),
                ptr(s.scales.addr),
                u64_arg(s.stride() as u64),
                u64_arg(s.scale_stride() as u64),
                ptr(group_expert),
                ptr(offsets),
                int(s.rows),
                int(s.cols),
            ];
            if tensor_cores {
                let name = match largest_small {
                    0..=8 => "grouped_fp8_mma_n1",
                    9..=16 => "grouped_fp8_mma_n2",
                    17..=32 => "grouped_fp8_mma_n4",
                    _ => "grouped_fp8_mma_n8",
                };
                g.launch(name, (s.rows.div_ceil(64) as u32, small as u32, 1), 128, 0, &common)
            } else {
                g.launch(
                    "grouped_gemv_fp8",
                    (s.rows.div_ceil(8) as u32, small as u32, 1),
                    256,
                    0,
                    &common,
                )
            }
        };
        // The tensor-core path reads bf16 activations.
        let to_bf16 = |src: u64, n: usize| -> Result<Option<DeviceBuf>> {
            if !tensor_cores || small == 0 {
                return Ok(None);
            }
            let b = g.alloc(n * 2)?;
            g.launch_1d("f32_to_bf16_rows", n, &[ptr(b.addr), ptr(src), u64_arg(n as u64)])?;
            Ok(Some(b))
        };
        if small > 0 {
            let xb = to_bf16(x.addr, m * width)?;
            let input = xb.as_ref().map_or(x.addr, |b| b.addr);
            grouped(gu.addr, 2 * inter, input, width, x_rows, &bank.gate)?;
            grouped(gu.addr + (inter * 4) as u64, 2 * inter, input, width, x_rows, &bank.up)?;
        }
        // Large groups (prefill): dequantise the expert and use the tensor cores.
        let large: Vec<usize> = (small..plan.group_expert.len()).collect();
        let xb = if large.is_empty() {
            None
        } else {
            Some(g.alloc(slots * width * 2)?)
        };
        if let Some(xb) = &xb {
            let first = plan.offsets[small] as usize;
            let n = slots - first;
            g.launch(
                "gather_rows_bf16",
                (n as u32, 1, 1),
                256,
                0,
                &[
                    ptr(xb.at(first * width * 2)),
                    ptr(x.addr),
                    int(width),
                    ptr(x_rows + (first * 4) as u64),
                    int(width),
                ],
            )?;
            for &gi in &large {
                let (s0, s1) = (plan.offsets[gi] as usize, plan.offsets[gi + 1] as usize);
                let ex = plan.group_expert[gi] as usize;
                for (s, col) in [(&bank.gate, 0), (&bank.up, inter)] {
                    self.dequant_expert(s, ex)?;
                    g.gemm_bf16(
                        gu.at((s0 * 2 * inter + col) * 4),
                        2 * inter,
                        xb.at(s0 * width * 2),
                        self.dequant.addr,
                        s1 - s0,
                        s.rows,
                        s.cols,
                        false,
                    )?;
                }
            }
        }
        g.launch_1d(
            "swiglu",
            slots * inter,
            &[ptr(act.addr), ptr(gu.addr), int(slots), int(inter)],
        )?;
        if small > 0 {
            let ab = to_bf16(act.addr, slots * inter)?;
            grouped(
                y.addr,
                width,
                ab.as_ref().map_or(act.addr, |b| b.addr),
                inter,
                0,
                &bank.down,
            )?;
        }
        if !large.is_empty() {
            let first = plan.offsets[small] as usize;
            let n = slots - first;
            let ab = g.alloc(n * inter * 2)?;
            g.launch_1d(
                "f32_to_bf16_rows",
                n * inter,
                &[
                    ptr(ab.addr),
                    ptr(act.at(first * inter * 4)),
                    u64_arg((n * inter) as u64),
                ],
            )?;
            for &gi in &large {
                let (s0, s1) = (plan.offsets[gi] as usize, plan.offsets[gi + 1] as usize);
                self.dequant_expert(&bank.down, plan.group_expert[gi] as usize)?;
                g.gemm_bf16(
                    y.at(s0 * width * 4),
                    width,
                    ab.at((s0 - first) * inter * 2),
                    self.dequant.addr,
                    s1 - s0,
                    width,
                    inter,
                    false,
                )?;
            }
        }
        g.launch(
            "combine_experts",
            (m as u32, 1, 1),
            256,
            0,
            &[
                ptr(h.addr),
                ptr(y.addr),
                ptr(slot_of),
                ptr(weights.addr),
                int(k),
                int(width),
            ],
        )?;
        if let Some(shared) = &moe.shared {
            self.mlp(shared, x, h.addr, m)?;
        }
        Ok(chosen.iter().map(|&v| v as u32).collect())
    }

    fn dequant_expert(&self, s: &crate::weights::Stacked, expert: usize) -> Result<()> {
        crate::weights::dequant_fp8(
            &self.gpu,
            self.dequant.addr,
            s.data.at(expert * s.stride()),
            s.scales.at(expert * s.scale_stride() * 4),
            s.rows,
            s.cols,
        )
    }
}

/// One chunk's rows inside the step.
struct Span {
    seq: u64,
    start: usize,
    rows: usize,
    first_row: usize,
}

struct StepLayout {
    rows: usize,
    /// Longest context any row attends over.
    max_len: usize,
    spans: Vec<Span>,
    ids: u64,
    cos: u64,
    sin: u64,
    slots: u64,
    table_off: u64,
    lens: u64,
    tables: u64,
    _buf: DeviceBuf,
}

/// Token rows grouped by expert: slots `offsets[g]..offsets[g+1]` belong to expert
/// `group_expert[g]`, groups ordered by size so the small ones form a prefix.
struct Permutation {
    group_expert: Vec<i32>,
    offsets: Vec<i32>,
    /// Token row of each slot.
    x_rows: Vec<i32>,
    /// Slot of each (token, choice), `[m, top_k]`.
    slot_of: Vec<i32>,
}

impl Permutation {
    fn new(chosen: &[i32], m: usize, k: usize, experts: usize) -> Result<Self> {
        let mut rows_of: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
        for t in 0..m {
            for j in 0..k {
                let e = chosen[t * k + j];
                ensure!(
                    e >= 0 && (e as usize) < experts,
                    "routing produced expert {e} of {experts}"
                );
                rows_of[e as usize].push((t, j));
            }
        }
        let mut active: Vec<usize> = (0..experts).filter(|&e| !rows_of[e].is_empty()).collect();
        active.sort_by_key(|&e| (rows_of[e].len(), e));
        let mut plan = Permutation {
            group_expert: Vec::with_capacity(active.len()),
            offsets: vec![0],
            x_rows: Vec::with_capacity(m * k),
            slot_of: vec![-1; m * k],
        };
        for e in active {
            plan.group_expert.push(e as i32);
            for &(t, j) in &rows_of[e] {
                plan.slot_of[t * k + j] = plan.x_rows.len() as i32;
                plan.x_rows.push(t as i32);
            }
            plan.offsets.push(plan.x_rows.len() as i32);
        }
        Ok(plan)
    }

    /// Number of leading groups with at most `limit` rows.
    fn small_groups(&self, limit: usize) -> usize {
        self.offsets
            .windows(2)
            .take_while(|w| (w[1] - w[0]) as usize <= limit)
            .count()
    }
}

impl Layer {
    fn load(gpu: &Gpu, ckpt: &Checkpoint, c: &ModelConfig, index: usize) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let h = c.hidden_size;
        let (heads, qk) = (c.num_attention_heads, c.qk_head_dim());
        let a = format!("{p}.self_attn");
        let (q_a, q_b) = match c.q_lora_rank {
            Some(r) => (
                Some((
                    DeviceMatrix::load(gpu, ckpt, &format!("{a}.q_a_proj.weight"), r, h)?,
                    load_vector(gpu, ckpt, &format!("{a}.q_a_layernorm.weight"), r)?,
                )),
                DeviceMatrix::load(gpu, ckpt, &format!("{a}.q_b_proj.weight"), heads * qk, r)?,
            ),
            None => (
                None,
                DeviceMatrix::load(gpu, ckpt, &format!("{a}.q_proj.weight"), heads * qk, h)?,
            ),
        };
        let lora = c.kv_lora_rank;
        let attn = Attention {
            q_a,
            q_b,
            kv_a: DeviceMatrix::load(
                gpu,
                ckpt,
                &format!("{a}.kv_a_proj_with_mqa.weight"),
                lora + c.qk_rope_head_dim,
                h,
            )?,
            kv_norm: load_vector(gpu, ckpt, &format!("{a}.kv_a_layernorm.weight"), lora)?,
            kv_b: DeviceMatrix::load(
                gpu,
                ckpt,
                &format!("{a}.kv_b_proj.weight"),
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                lora,
            )?,
            o: DeviceMatrix::load(gpu, ckpt, &format!("{a}.o_proj.weight"), h, heads * c.v_head_dim)?,
        };
        let mlp = |prefix: &str, inter: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate: DeviceMatrix::load(gpu, ckpt, &format!("{prefix}.gate_proj.weight"), inter, h)?,
                up: DeviceMatrix::load(gpu, ckpt, &format!("{prefix}.up_proj.weight"), inter, h)?,
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
                experts: ExpertBank::load(
                    gpu,
                    ckpt,
                    &format!("{p}.mlp"),
                    c.n_routed_experts,
                    h,
                    c.moe_intermediate_size,
                )?,
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

    fn random(gpu: &Gpu, c: &ModelConfig, index: usize, seed: u64) -> Result<Self> {
        let h = c.hidden_size;
        let (heads, qk) = (c.num_attention_heads, c.qk_head_dim());
        let f8 = Format::Fp8;
        let lora = c.kv_lora_rank;
        let mut s = seed;
        let mut next = || {
            s += 1;
            s
        };
        let (q_a, q_b) = match c.q_lora_rank {
            Some(r) => (
                Some((
                    DeviceMatrix::random(gpu, r, h, f8, next())?,
                    random_vector(gpu, r, 0.8, 1.2, next())?,
                )),
                DeviceMatrix::random(gpu, heads * qk, r, f8, next())?,
            ),
            None => (None, DeviceMatrix::random(gpu, heads * qk, h, f8, next())?),
        };
        let attn = Attention {
            q_a,
            q_b,
            kv_a: DeviceMatrix::random(gpu, lora + c.qk_rope_head_dim, h, f8, next())?,
            kv_norm: random_vector(gpu, lora, 0.8, 1.2, next())?,
            kv_b: DeviceMatrix::random(gpu, heads * (c.qk_nope_head_dim + c.v_head_dim), lora, f8, next())?,
            o: DeviceMatrix::random(gpu, h, heads * c.v_head_dim, f8, next())?,
        };
        let mut mlp = |inter: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate: DeviceMatrix::random(gpu, inter, h, f8, next())?,
                up: DeviceMatrix::random(gpu, inter, h, f8, next())?,
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
                experts: ExpertBank::random(gpu, c.n_routed_experts, h, c.moe_intermediate_size, seed + 52)?,
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

    fn dense_elements(&self) -> usize {
        let a = &self.attn;
        let n = |m: &DeviceMatrix| m.rows * m.cols;
        let attn = a.q_a.as_ref().map_or(0, |(m, _)| n(m)) + n(&a.q_b) + n(&a.kv_a) + n(&a.kv_b) + n(&a.o);
        let mlp = |m: &Mlp| n(&m.gate) + n(&m.up) + n(&m.down);
        attn + match &self.ffn {
            Ffn::Dense(m) => mlp(m),
            Ffn::Moe(moe) => n(&moe.router) + moe.shared.as_ref().map_or(0, mlp),
        }
    }

    /// Weight bytes a decode step reads outside the routed experts.
    fn dense_bytes(&self) -> usize {
        let a = &self.attn;
        let attn = a.q_a.as_ref().map_or(0, |(m, _)| m.bytes())
            + a.q_b.bytes()
            + a.kv_a.bytes()
            + a.kv_b.bytes()
            + a.o.bytes();
        let mlp = |m: &Mlp| m.gate.bytes() + m.up.bytes() + m.down.bytes();
        attn + match &self.ffn {
            Ffn::Dense(m) => mlp(m),
            Ffn::Moe(moe) => moe.router.bytes() + moe.shared.as_ref().map_or(0, mlp),
        }
    }
}
