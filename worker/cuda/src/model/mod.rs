//! The DeepSeek-V3 decoder on one GPU: the same step API as the CPU model (chunks of consecutive
//! tokens per sequence, prefill and decode mixed), weights in their checkpoint format, the latent
//! cache paged in GPU memory, all routed experts local.

mod attention;
mod layers;
mod moe;

use crate::cache::DeviceCache;
use crate::gpu::{float, int, ptr, u64_arg, DeviceBuf, Gpu};
use crate::weights::{load_vector, random_vector, DeviceMatrix, Format};
use anyhow::{ensure, Context, Result};
use dsv3_engine::rope::Rope;
use dsv3_engine::{check_chunks, Checkpoint, Chunk, ChunkOutput, ModelConfig, ModelFiles};
use layers::{dense_matrices, Ffn, Layer, Mlp};

pub use attention::NAIVE_MIN_ROWS;

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
        let (h, trace) = self.forward_hidden(chunks, trace)?;
        let mut wanted_rows = Vec::new();
        let mut row = 0;
        let mut plan = Vec::new();
        for c in chunks {
            let ks = c.output_offsets();
            plan.push(ks.iter().map(|k| c.start + k).collect::<Vec<_>>());
            wanted_rows.extend(ks.iter().map(|k| (row + k) as i32));
            row += c.tokens.len();
        }
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
        let (h, _) = self.forward_hidden(chunks, false)?;
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

    /// Runs every layer; returns the residual stream `[m, hidden]` on the GPU.
    pub fn forward_hidden(&mut self, chunks: &[Chunk], trace: bool) -> Result<(DeviceBuf, Option<DeviceTrace>)> {
        check_chunks(&self.config, chunks)?;
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
        Ok((h, tr))
    }

    fn step_layout(&self, chunks: &[Chunk]) -> Result<StepLayout> {
        let half = self.config.qk_rope_head_dim / 2;
        let mut ids = Vec::new();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let (mut slots, mut table_off, mut lens, mut tables) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut c_buf, mut s_buf) = (vec![0.0f32; half], vec![0.0f32; half]);
        let mut spans = Vec::with_capacity(chunks.len());
        for c in chunks {
            let off = tables.len() as i32;
            spans.push(Span {
                start: c.start,
                rows: c.tokens.len(),
                first_row: ids.len(),
                table_off: off as usize,
            });
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
}

/// One chunk's rows inside the step.
struct Span {
    start: usize,
    rows: usize,
    first_row: usize,
    /// Where the sequence's block table starts in the step's `tables`.
    table_off: usize,
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
