//! The DeepSeek-V3 decoder on one GPU: the same step API as the CPU model (chunks of consecutive
//! tokens per sequence, prefill and decode mixed), weights in their checkpoint format, the latent
//! cache paged in GPU memory, the routed experts on this GPU, on other ranks, or split by expert.

mod attention;
mod graph;
mod layers;
mod moe;
mod mtp;
mod pick;
mod rope;

use crate::cache::DeviceCache;
use crate::data_plane::NcclExperts;
use crate::fp8_gemm::QuantizedRows;
use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr};
use crate::linear::Unsummed;
use crate::tiles::RMS_HELD;
use crate::weights::{load_vector, random_vector, DeviceMatrix, Format};
use anyhow::{ensure, Context, Result};
use dsv3_engine::{
    begin_step, check_chunks, discard_step, CacheCapacity, Checkpoint, Chunk, ChunkOutput, ExpertCounts,
    ExpertExecutor, ExpertSelection, Fp8Activations, MemoryUse, ModelConfig, ModelFiles, PickedToken, SeqId,
    StepBackend, TokenPick,
};
use graph::DecodeGraph;
use layers::{Ffn, Layer, Mlp};
use mtp::Mtp;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use attention::NAIVE_MIN_ROWS;
pub use moe::{plan_routes, route_logits, ExpertKernels, PlannedRoutes};
pub(crate) use moe::{run_bank, BankCounters, MoeStats};
pub use pick::pick_tokens;

/// Routed experts reached from the host (remote shards): what an attention rank's model holds
/// instead of the expert weights.
pub type HostExperts = Arc<dyn ExpertExecutor + Send>;

/// Where a model's routed experts run: the ones `held` on this GPU, every other one through
/// `remote` (expert shards, reached from the host). The default holds them all.
#[derive(Clone, Default)]
pub struct ModelExperts {
    pub held: ExpertSelection,
    pub remote: Option<HostExperts>,
    /// Every routed expert on other GPUs, over the NCCL data plane (instead of `remote`).
    pub nccl: Option<Arc<NcclExperts>>,
}

impl ModelExperts {
    /// None on this GPU: every routed expert through `remote` (an attention rank of a fleet).
    pub fn remote(remote: HostExperts) -> Self {
        ModelExperts {
            held: ExpertSelection::None,
            remote: Some(remote),
            nccl: None,
        }
    }

    /// None on this GPU: every routed expert on expert shards over NCCL.
    pub fn nccl(shards: Arc<NcclExperts>) -> Self {
        ModelExperts {
            held: ExpertSelection::None,
            remote: None,
            nccl: Some(shards),
        }
    }

    /// Experts `held` on this GPU, the rest through `remote`.
    pub fn split(held: Vec<u32>, remote: HostExperts) -> Self {
        ModelExperts {
            held: ExpertSelection::Only(held),
            remote: Some(remote),
            nccl: None,
        }
    }

    /// The expert ids of this GPU's bank, ascending (bank index = position).
    fn bank_ids(&self, n_experts: usize) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = match &self.held {
            ExpertSelection::All => (0..n_experts as u32).collect(),
            ExpertSelection::None => Vec::new(),
            ExpertSelection::Only(ids) => ids.clone(),
        };
        ids.sort_unstable();
        ids.dedup();
        if let Some(&e) = ids.iter().find(|&&e| e as usize >= n_experts) {
            anyhow::bail!("expert {e} is outside the model's {n_experts} routed experts");
        }
        if let Some(nccl) = &self.nccl {
            ensure!(
                ids.is_empty() && self.remote.is_none(),
                "over the NCCL data plane every routed expert runs on the expert shards"
            );
            ensure!(
                nccl.owner.len() == n_experts && nccl.owner.iter().all(|&o| o >= 0 && (o as usize) < nccl.shards.len()),
                "the NCCL data plane must name a shard for each of the {n_experts} routed experts"
            );
            return Ok(ids);
        }
        ensure!(
            ids.len() == n_experts || self.remote.is_some(),
            "{} of {n_experts} routed experts on this GPU and no expert shards to reach the rest",
            ids.len()
        );
        Ok(ids)
    }
}

/// The experts of this GPU's bank when it holds only some: their global ids, on the host (to
/// keep them out of what goes to the shards) and as a device map from id to bank index.
struct PartialBank {
    held: Vec<bool>,
    bank_of: DeviceBuf,
}

impl PartialBank {
    fn new(gpu: &Gpu, bank_ids: &[u32], n_experts: usize) -> Result<Option<Self>> {
        if bank_ids.is_empty() || bank_ids.len() == n_experts {
            return Ok(None);
        }
        let mut bank_of = vec![-1i32; n_experts];
        let mut held = vec![false; n_experts];
        for (i, &e) in bank_ids.iter().enumerate() {
            bank_of[e as usize] = i as i32;
            held[e as usize] = true;
        }
        Ok(Some(PartialBank {
            held,
            bank_of: gpu.upload(&bank_of)?,
        }))
    }
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
    /// The rotary angles' cos and sin on the GPU, of every position used so far (grown as steps
    /// need).
    rope: std::cell::RefCell<rope::DeviceRope>,
    embed: DeviceMatrix,
    layers: Vec<Layer>,
    norm: DeviceBuf,
    head: DeviceMatrix,
    /// The multi-token-prediction module, when the checkpoint has it (speculative decoding).
    mtp: Option<Mtp>,
    pub cache: DeviceCache,
    /// bf16 scratch for dequantised weights on the cuBLAS path.
    dequant: DeviceBuf,
    /// Tokens per routed expert and experts touched, counted on the GPU.
    moe_stats: MoeStats,
    /// The routed experts not on this GPU; with them, every route is counted on the host.
    host_experts: Option<HostExperts>,
    /// Set when this GPU holds only some of the routed experts next to `host_experts`.
    partial_bank: Option<PartialBank>,
    /// The routed experts on expert shards over NCCL, with the shard of each expert on the GPU.
    nccl_experts: Option<(Arc<NcclExperts>, DeviceBuf)>,
    host_counts: Mutex<ExpertCounts>,
    /// Bytes of every weight on the GPU.
    weight_bytes: usize,
    /// Decode steps recorded as CUDA graphs, by (padded batch, with head).
    graphs: HashMap<(usize, bool), DecodeGraph>,
    /// Replay decode steps as CUDA graphs (off with DSV3_CUDA_GRAPHS=0 and while profiling).
    use_graphs: bool,
    /// Use the CUDA-core attention kernel instead of the tensor-core one (DSV3_MLA_SIMT=1).
    simt_attention: bool,
    /// The decode attention may run on the Hopper (wgmma) kernel (not DSV3_MLA_WGMMA=0).
    wgmma_attention: bool,
    /// Decode steps of at least this many rows run the absorptions of W_UK and W_UV on Hopper's
    /// wgmma kernel (DSV3_ABSORB_WGMMA_ROWS; 0: never).
    absorb_wgmma_rows: usize,
    /// At small batches the absorption of W_UV merges the decode's splits as it reads them, where
    /// `mla_combine` would merge them in a launch of its own (DSV3_MLA_MERGE_IN_ABSORB=0 keeps
    /// that launch).
    merge_in_absorption: bool,
    /// The prefill attention kernels allowed (DSV3_PREFILL_WGMMA, DSV3_PREFILL_PIPELINE).
    prefill_attention: crate::mla_prefill::PrefillSwitches,
    /// Kernel choices: CUDA-core GEMVs for every FP8 product (DSV3_LINEAR_SIMT=1), and the routed
    /// rows above which a large step's expert goes to cuBLAS (DSV3_EXPERT_CUBLAS_ROWS).
    kernels: ExpertKernels,
}

impl CudaModel {
    /// Loads a checkpoint onto GPU `ordinal` with a cache of `cache_tokens` positions, its FP8
    /// products applying `activations`. Only the routed experts `experts` holds are read; every
    /// MoE layer reaches the rest through it.
    pub fn load(
        files: &ModelFiles,
        ordinal: usize,
        cache_tokens: usize,
        experts: ModelExperts,
        activations: Fp8Activations,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_model_files(files)?.with_fp8_activations(activations);
        let bank_ids = experts.bank_ids(config.n_routed_experts)?;
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
            let layer = Layer::load(&gpu, &ckpt, &config, l, &bank_ids).with_context(|| format!("layer {l}"))?;
            layers.push(layer);
            progress(l + 1, config.num_hidden_layers);
        }
        let norm = load_vector(&gpu, &ckpt, "model.norm.weight", h)?;
        let mtp = if config.num_nextn_predict_layers > 0 {
            Some(Mtp::load(&gpu, &ckpt, &config, &bank_ids).context("the MTP module")?)
        } else {
            None
        };
        let weights = (embed, layers, norm, head);
        let mut model = Self::assemble(gpu, config, weights, cache_tokens, experts, &bank_ids, mtp.is_some())?;
        model.weight_bytes += mtp.as_ref().map_or(0, Mtp::resident_bytes);
        model.mtp = mtp;
        Ok(model)
    }

    /// Random FP8 weights made on the GPU (bf16 embedding and head, as the official checkpoint),
    /// for benchmarks at full width.
    pub fn random(config: ModelConfig, ordinal: usize, cache_tokens: usize, seed: u64) -> Result<Self> {
        Self::random_with(config, ordinal, cache_tokens, seed, ModelExperts::default())
    }

    /// [`CudaModel::random`] with only the routed experts `experts` holds made on the GPU (the
    /// attention side of a fleet reaches the rest through it).
    pub fn random_with(
        config: ModelConfig,
        ordinal: usize,
        cache_tokens: usize,
        seed: u64,
        experts: ModelExperts,
    ) -> Result<Self> {
        let bank_ids = experts.bank_ids(config.n_routed_experts)?;
        let gpu = Gpu::open(ordinal)?;
        let h = config.hidden_size;
        let embed = DeviceMatrix::random(&gpu, config.vocab_size, h, Format::Bf16, seed)?;
        let head = DeviceMatrix::random(&gpu, config.vocab_size, h, Format::Bf16, seed + 1)?;
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let layer_seed = seed + 100 * (l as u64 + 1);
            layers.push(Layer::random(&gpu, &config, l, layer_seed, bank_ids.len())?);
        }
        let norm = random_vector(&gpu, h, 0.8, 1.2, seed + 2)?;
        gpu.sync()?;
        let weights = (embed, layers, norm, head);
        Self::assemble(gpu, config, weights, cache_tokens, experts, &bank_ids, false)
    }

    /// The model from its weights (embedding, layers, final norm, head), with a cache of
    /// `cache_tokens` positions (and a cache layer for the MTP module `with_mtp`); the layers'
    /// banks hold experts `bank_ids`, `experts` reaches the rest.
    fn assemble(
        gpu: Gpu,
        config: ModelConfig,
        (embed, layers, norm, head): (DeviceMatrix, Vec<Layer>, DeviceBuf, DeviceMatrix),
        cache_tokens: usize,
        experts: ModelExperts,
        bank_ids: &[u32],
        with_mtp: bool,
    ) -> Result<Self> {
        let host_experts = experts.remote;
        let nccl_experts = match experts.nccl {
            Some(shards) => {
                let owner = gpu.upload(&shards.owner)?;
                Some((shards, owner))
            }
            None => None,
        };
        let partial_bank = PartialBank::new(&gpu, bank_ids, config.n_routed_experts)?;
        let block = 64;
        let cache_layers = config.num_hidden_layers + usize::from(with_mtp);
        let cache = DeviceCache::new(
            &gpu,
            cache_layers,
            config.kv_cache_width(),
            block,
            cache_tokens.div_ceil(block).max(1),
            config.max_position_embeddings,
        )?;
        let weight_bytes =
            embed.bytes() + head.bytes() + norm.bytes + layers.iter().map(Layer::resident_bytes).sum::<usize>();
        // cuBLAS reads the matrices not stored as bf16 through this scratch (steps above 512 rows).
        let largest = layers
            .iter()
            .flat_map(Layer::matrices)
            .chain([&head])
            .filter(|m| m.format != Format::Bf16)
            .map(|m| m.rows * m.cols)
            .max()
            .unwrap_or(1);
        let dequant = gpu.alloc(largest * 2)?;
        ensure!(
            config.kv_lora_rank <= 512 && config.kv_lora_rank.is_multiple_of(2),
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
        let moe_stats = MoeStats::new(&gpu, cache_layers, config.n_routed_experts)?;
        // cuBLASLt made, with the main stream's workspace, before any step: a graphed decode step
        // may be the first to use it, and must not allocate for it.
        if let Some(fp8) = gpu.fp8_gemm()? {
            fp8.reserve(&gpu, 0)?;
        }
        // A step that reaches its experts through the host cannot be captured as a graph.
        let use_graphs = crate::switches::flag("DSV3_CUDA_GRAPHS", true)? && !gpu.profiling() && host_experts.is_none()
            // Each exchange is announced to the shards from the host as it is queued.
            && nccl_experts.is_none();
        let kernels = ExpertKernels::new(&config)?;
        // Every position a sequence can reach: the context, or the whole cache if smaller.
        let positions = config
            .max_position_embeddings
            .min(cache.num_blocks() * cache.block_size());
        let rope = rope::DeviceRope::new(&gpu, &config, positions)?;
        Ok(CudaModel {
            rope: std::cell::RefCell::new(rope),
            gpu,
            config,
            embed,
            layers,
            norm,
            head,
            mtp: None,
            cache,
            dequant,
            moe_stats,
            host_experts,
            partial_bank,
            nccl_experts,
            host_counts: Mutex::new(ExpertCounts::new()),
            weight_bytes,
            graphs: HashMap::new(),
            use_graphs,
            simt_attention: crate::switches::flag("DSV3_MLA_SIMT", false)?,
            wgmma_attention: crate::mla_decode::wgmma_allowed()?,
            absorb_wgmma_rows: match crate::switches::count("DSV3_ABSORB_WGMMA_ROWS")? {
                Some(0) => usize::MAX,
                rows => rows.unwrap_or(attention::ABSORB_WGMMA_MIN_ROWS),
            },
            merge_in_absorption: crate::switches::flag("DSV3_MLA_MERGE_IN_ABSORB", true)?,
            prefill_attention: crate::mla_prefill::PrefillSwitches::from_env()?,
            kernels,
        })
    }

    /// Bytes of weights a decode step reads outside the routed experts (one embedding row).
    pub fn dense_step_bytes(&self) -> usize {
        self.layers.iter().map(Layer::dense_bytes).sum::<usize>() + self.head.bytes()
    }

    /// Bytes of one routed expert of a MoE layer (all layers share the shape).
    pub fn expert_bytes(&self) -> usize {
        self.expert_bytes_elements().0
    }

    pub fn free_sequence(&mut self, seq: u64) {
        self.cache.table.free_sequence(seq);
    }

    /// One forward step over `chunks`; logits for the positions each chunk asks for.
    pub fn forward(&mut self, chunks: &[Chunk], trace: bool) -> Result<(Vec<ChunkOutput>, Option<DeviceTrace>)> {
        let mut wanted_rows = Vec::new();
        let mut row = 0;
        let mut plan = Vec::new();
        for c in chunks {
            let ks = c.output_offsets();
            plan.push(ks.iter().map(|k| c.start + k).collect::<Vec<_>>());
            wanted_rows.extend(ks.iter().map(|k| (row + k) as i32));
            row += c.tokens.len();
        }
        let all_hidden = chunks.iter().any(|c| c.all_hidden);
        let (head, trace, residual) = self.run_step_keeping(chunks, Some(&wanted_rows), trace, all_hidden)?;
        let (width, v) = (self.config.hidden_size, self.config.vocab_size);
        // Post-norm hidden states of every row, for the chunks that want them all.
        let every_row = self.normed_rows(residual.as_ref(), row)?;
        let (logits, hidden) = match head {
            Some(out) => (
                self.gpu.download::<f32>(out.logits, out.rows * v)?,
                self.gpu.download::<f32>(out.normed, out.rows * width)?,
            ),
            None => (vec![], vec![]),
        };
        let mut outputs = Vec::with_capacity(chunks.len());
        let (mut at, mut first_row) = (0, 0);
        for (c, positions) in chunks.iter().zip(plan) {
            let k = positions.len();
            let n = c.tokens.len();
            outputs.push(ChunkOutput {
                positions,
                logits: logits[at * v..(at + k) * v].to_vec(),
                hidden: if c.all_hidden {
                    every_row[first_row * width..(first_row + n) * width].to_vec()
                } else {
                    hidden[at * width..(at + k) * width].to_vec()
                },
            });
            at += k;
            first_row += n;
        }
        Ok((outputs, trace))
    }

    /// Runs every layer without the head (benchmarks, traces).
    pub fn forward_hidden(&mut self, chunks: &[Chunk], trace: bool) -> Result<Option<DeviceTrace>> {
        Ok(self.run_step(chunks, None, trace)?.1)
    }

    /// Gives each sequence `len` cached positions of random latents (benchmarks of long contexts
    /// without running their prefill).
    pub fn fill_cache_random(&mut self, seqs: &[u64], len: usize, seed: u64) -> Result<()> {
        for &s in seqs {
            self.cache.table.begin_chunk(s, 0, len)?;
        }
        let n = self.cache.data.bytes / 2;
        kernels::random_bf16.launch_1d(&self.gpu, n, (ptr(self.cache.data.addr), n as u64, seed, -1.0, 1.0))
    }

    /// Drops positions from `len` on.
    pub fn truncate(&mut self, seq: u64, len: usize) {
        self.cache.table.truncate(seq, len);
    }

    /// Tokens per routed expert and MoE layer since the last call.
    pub fn take_expert_counts(&self) -> Result<ExpertCounts> {
        if self.host_experts.is_some() {
            let mut counts = self
                .host_counts
                .lock()
                .map_err(|_| anyhow::anyhow!("expert counters poisoned by an earlier panic"))?;
            return Ok(std::mem::take(&mut *counts));
        }
        let moe_layers: Vec<usize> = self
            .layers
            .iter()
            .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
            .map(|l| l.index)
            .collect();
        self.moe_stats.take_counts(&self.gpu, &moe_layers)
    }

    /// Turns the replay of decode steps as CUDA graphs on or off.
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on && !self.gpu.profiling();
    }

    /// Decode step sizes recorded as CUDA graphs so far.
    pub fn graphs_recorded(&self) -> usize {
        self.graphs.len()
    }

    /// Routed experts used by the last step, summed over MoE layers.
    pub fn experts_touched(&self) -> Result<usize> {
        self.moe_stats.touched(&self.gpu)
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
                    let b = m.experts.as_ref()?;
                    Some((b.bytes_per_expert(), b.gate.stride() + b.up.stride() + b.down.stride()))
                }
                Ffn::Dense(_) => None,
            })
            .unwrap_or((0, 0))
    }

    pub fn moe_layers(&self) -> usize {
        self.layers.iter().filter(|l| matches!(l.ffn, Ffn::Moe(_))).count()
    }

    /// Final norm and head over `r` rows of `h`: rows `pick[..r]` (indices on the GPU) or the
    /// first `r`. Post-norm hidden states go to `normed`, logits `[r, vocab]` to `logits`.
    fn head_into(&self, h: &DeviceBuf, pick: Option<u64>, r: usize, normed: &DeviceBuf, logits: u64) -> Result<()> {
        self.norm_head_into((&self.norm, &self.head), h, pick, r, normed, logits)
    }

    /// [`CudaModel::head_into`] with another final norm and head (the MTP module's).
    fn norm_head_into(
        &self,
        (norm, head): (&DeviceBuf, &DeviceMatrix),
        h: &DeviceBuf,
        pick: Option<u64>,
        r: usize,
        normed: &DeviceBuf,
        logits: u64,
    ) -> Result<()> {
        let g = &self.gpu;
        let width = self.config.hidden_size;
        let picked;
        let rows = match pick {
            Some(rows) => {
                picked = g.alloc(r * width * 4)?;
                kernels::gather_rows_f32.launch(
                    g,
                    (r as u32, 1, 1),
                    256,
                    0,
                    (ptr(picked.addr), ptr(h.addr), int(width), ptr(rows), int(width)),
                )?;
                &picked
            }
            None => h,
        };
        self.rms_norm(
            normed.addr,
            width,
            rows.addr,
            width,
            norm,
            width,
            r,
            self.config.rms_norm_eps,
        )?;
        self.linear(logits, self.config.vocab_size, normed.addr, r, head, false)
    }

    /// One step: the layers, then the head over `head_rows` (step row indices) when given. Decode
    /// steps replay a CUDA graph when they can; everything else runs launch by launch.
    fn run_step(
        &mut self,
        chunks: &[Chunk],
        head_rows: Option<&[i32]>,
        trace: bool,
    ) -> Result<(Option<HeadOut>, Option<DeviceTrace>)> {
        let (head, trace, _) = self.run_step_keeping(chunks, head_rows, trace, false)?;
        Ok((head, trace))
    }

    /// [`CudaModel::run_step`], also giving the residual stream after the last layer
    /// (`[rows, hidden]`) with `keep_residual`.
    #[allow(clippy::type_complexity)]
    fn run_step_keeping(
        &mut self,
        chunks: &[Chunk],
        head_rows: Option<&[i32]>,
        trace: bool,
        keep_residual: bool,
    ) -> Result<(Option<HeadOut>, Option<DeviceTrace>, Option<DeviceBuf>)> {
        check_chunks(&self.config, chunks)?;
        begin_step(&mut self.cache.table, chunks)?;
        let result = self.run_step_rows(chunks, head_rows, trace, keep_residual);
        if result.is_err() {
            discard_step(&mut self.cache.table, chunks);
        }
        result
    }

    /// [`CudaModel::run_step_keeping`] once every chunk has its room in the cache.
    #[allow(clippy::type_complexity)]
    fn run_step_rows(
        &mut self,
        chunks: &[Chunk],
        head_rows: Option<&[i32]>,
        trace: bool,
        keep_residual: bool,
    ) -> Result<(Option<HeadOut>, Option<DeviceTrace>, Option<DeviceBuf>)> {
        self.moe_stats.reset_touched(&self.gpu)?;
        let head_rows = head_rows.filter(|r| !r.is_empty());
        if self.use_graphs && !trace && !keep_residual && graph::fits(chunks, head_rows) {
            return Ok((self.run_graphed(chunks, head_rows.is_some())?, None, None));
        }
        let g = &self.gpu;
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let (words, spans, max_len) = self.pack_inputs(chunks, rows)?;
        let buf = g.upload(&words)?;
        let step = self.step_layout(buf.addr, rows, spans, max_len);
        let h = g.alloc(rows * self.config.hidden_size * 4)?;
        let mut tr = trace.then(DeviceTrace::default);
        self.run_layers(&step, &h, &mut tr)?;
        let head = match head_rows {
            Some(picked) => {
                let r = picked.len();
                let pick = g.upload(picked)?;
                let normed = g.alloc(r * self.config.hidden_size * 4)?;
                let logits = g.alloc(r * self.config.vocab_size * 4)?;
                self.head_into(&h, Some(pick.addr), r, &normed, logits.addr)?;
                Some(HeadOut {
                    logits: logits.addr,
                    normed: normed.addr,
                    rows: r,
                    _owned: vec![pick, normed, logits],
                })
            }
            None => None,
        };
        drop(buf);
        Ok((head, tr, keep_residual.then_some(h)))
    }

    /// The embeddings of `step`'s tokens into `out` (`[step.rows, hidden]` f32).
    fn embed_into(&self, out: &DeviceBuf, step: &StepLayout) -> Result<()> {
        let width = self.config.hidden_size;
        kernels::embed_rows.launch(
            &self.gpu,
            // Blocks enough for a bf16 row at eight values a thread (other tables take more
            // steps a thread).
            (step.rows as u32, width.div_ceil(8 * 256) as u32, 1),
            256,
            0,
            (
                ptr(out.addr),
                int(self.embed.format as usize),
                ptr(self.embed.data.addr),
                ptr(self.embed.scale_addr()),
                ptr(step.ids),
                int(self.config.hidden_size),
            ),
        )
    }

    /// The final norm over the first `rows` rows of a kept residual stream, on the host (none
    /// without one): the post-norm hidden states the MTP module drafts from.
    fn normed_rows(&self, residual: Option<&DeviceBuf>, rows: usize) -> Result<Vec<f32>> {
        let Some(h) = residual else { return Ok(Vec::new()) };
        let width = self.config.hidden_size;
        let normed = self.gpu.alloc(rows * width * 4)?;
        self.rms_norm(
            normed.addr,
            width,
            h.addr,
            width,
            &self.norm,
            width,
            rows,
            self.config.rms_norm_eps,
        )?;
        self.gpu.download::<f32>(normed.addr, rows * width)
    }

    /// The embedding and every layer over `step`; the residual stream `[step.rows, hidden]` in `h`.
    fn run_layers(&self, step: &StepLayout, h: &DeviceBuf, trace: &mut Option<DeviceTrace>) -> Result<()> {
        let g = &self.gpu;
        let m = step.rows;
        let width = self.config.hidden_size;
        self.embed_into(h, step)?;
        if let Some(t) = trace {
            t.hidden.push(g.download(h.addr, m * width)?);
        }
        for layer in &self.layers {
            self.layer_forward(layer, h, step, trace)
                .with_context(|| format!("layer {}", layer.index))?;
            if let Some(t) = trace {
                t.hidden.push(g.download(h.addr, m * width)?);
            }
        }
        Ok(())
    }

    /// The step's inputs as 4-byte words in [`StepLayout`] order for `rows` rows (the chunks' rows,
    /// then padding rows that write no cache slot and attend to nothing); the chunks' spans and
    /// longest context.
    fn pack_inputs(&self, chunks: &[Chunk], rows: usize) -> Result<(Vec<u32>, Vec<Span>, usize)> {
        let at = StepLayout::offsets(rows);
        let mut words = vec![0u32; at.tables];
        let reach = chunks.iter().map(|c| c.start + c.tokens.len()).max().unwrap_or(0);
        self.rope.borrow_mut().cover(&self.gpu, reach.max(1))?;
        let mut spans = Vec::with_capacity(chunks.len());
        let mut tables = Vec::new();
        let (mut row, mut max_len) = (0, 0);
        for c in chunks {
            let off = tables.len();
            spans.push(Span {
                start: c.start,
                rows: c.tokens.len(),
                first_row: row,
                table_off: off,
            });
            tables.extend(self.cache.table.blocks(c.seq).iter().copied());
            for (k, &t) in c.tokens.iter().enumerate() {
                let pos = c.start + k;
                words[at.ids + row] = t;
                words[at.slots + row] = self.cache.table.slot(c.seq, pos)? as u32;
                words[at.table_off + row] = off as u32;
                words[at.lens + row] = (pos + 1) as u32;
                max_len = max_len.max(pos + 1);
                row += 1;
            }
        }
        words[at.valid] = row as u32;
        for r in row..rows {
            words[at.slots + r] = u32::MAX; // -1: no cache slot
        }
        words.extend(tables);
        Ok((words, spans, max_len))
    }

    #[allow(clippy::too_many_arguments)]
    /// `out[r] = rms_norm(x[r]) · w` for `rows` rows of `width` (addresses with row strides).
    fn rms_norm(
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
        let threads = self.norm_threads(width, rows);
        let (kernel, _) = kernels::norm_kernels(width, threads);
        kernel.launch(
            &self.gpu,
            (rows as u32, 1, 1),
            threads as u32,
            0,
            (ptr(out), int(ld_out), ptr(x), int(ld_in), ptr(w.addr), int(width), eps),
        )
    }

    /// Threads of a block normalising one row of `width` among `rows`: a decode step's few rows
    /// get a block that holds the row in registers, [`RMS_HELD`] float4s a thread (one block a
    /// row is then a load's latency and a block-wide sum; 256 threads walking a 7168-wide row
    /// took 8 µs per norm at batch 1, ncu). The sum's order follows the block size, so every
    /// kernel that normalises a row takes its size from here.
    pub(super) fn norm_threads(&self, width: usize, rows: usize) -> usize {
        if rows < self.gpu.sm_count {
            width.div_ceil(4 * RMS_HELD).next_multiple_of(32).min(1024)
        } else {
            256
        }
    }

    /// `y[m, w.rows] (+)= x[m, w.cols] · wᵀ` (x contiguous, y with row stride ldy), an FP8 w
    /// meeting x as the model's [`Fp8Activations`] say.
    fn linear(&self, y: u64, ldy: usize, x: u64, m: usize, w: &DeviceMatrix, accumulate: bool) -> Result<()> {
        self.linear_from(y, ldy, x, None, m, w, accumulate)
    }

    /// [`CudaModel::linear`] of x whose rows may come quantised already ([`Self::norm_for_products`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_from(
        &self,
        y: u64,
        ldy: usize,
        x: u64,
        x_quantised: Option<&QuantizedRows>,
        m: usize,
        w: &DeviceMatrix,
        accumulate: bool,
    ) -> Result<()> {
        crate::linear::linear_from(
            &self.gpu,
            &self.dequant,
            self.kernels.small_batch,
            self.kernels.input_quant,
            y,
            ldy,
            x,
            x_quantised,
            m,
            w,
            accumulate,
        )
    }

    /// [`crate::linear::linear_from_to_bf16`] with the model's kernel choices: new bf16 rows
    /// `[m, w.rows]`.
    fn linear_from_to_bf16(
        &self,
        x: u64,
        x_quantised: Option<&QuantizedRows>,
        m: usize,
        w: &DeviceMatrix,
    ) -> Result<DeviceBuf> {
        crate::linear::linear_from_to_bf16(
            &self.gpu,
            &self.dequant,
            self.kernels.small_batch,
            self.kernels.input_quant,
            x,
            x_quantised,
            m,
            w,
        )
    }

    /// [`crate::linear::linear_unsummed`] with the model's kernel choices: `y[m, w.rows]` whose
    /// split-k slabs its reader may add up itself.
    fn linear_unsummed(
        &self,
        y: u64,
        x: u64,
        x_quantised: Option<&QuantizedRows>,
        m: usize,
        w: &DeviceMatrix,
    ) -> Result<Unsummed> {
        crate::linear::linear_unsummed(
            &self.gpu,
            &self.dequant,
            self.kernels.small_batch,
            self.kernels.input_quant,
            y,
            x,
            x_quantised,
            m,
            w,
        )
    }

    /// The scale encoding (`ue8m0`) with which rows of `width` channels are quantised by the
    /// kernel that makes them, for the products to take ([`CudaModel::linear_from`]): with
    /// quantised activations, the tensor-core kernels and whole blocks of 128 channels.
    fn quantised_where_made(&self, width: usize) -> Option<bool> {
        self.kernels
            .input_quant
            .filter(|_| !self.kernels.simt_linear() && width.is_multiple_of(128))
    }

    /// [`CudaModel::rms_norm`] of rows that feed FP8 products: where
    /// [`CudaModel::quantised_where_made`] says so, the same rows also quantised by the norm's
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    fn norm_for_products(
        &self,
        out: u64,
        x: u64,
        ld_in: usize,
        w: &DeviceBuf,
        width: usize,
        rows: usize,
        eps: f32,
    ) -> Result<Option<QuantizedRows>> {
        match self.quantised_where_made(width) {
            Some(ue8m0) => {
                let threads = self.norm_threads(width, rows);
                QuantizedRows::rms_norm(
                    &self.gpu, out, width, x, ld_in, w.addr, width, rows, eps, threads, ue8m0,
                )
                .map(Some)
            }
            _ => {
                self.rms_norm(out, width, x, ld_in, w, width, rows, eps)?;
                Ok(None)
            }
        }
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
        let xq = self.norm_for_products(x.addr, h.addr, width, &layer.input_norm, width, m, eps)?;
        self.attention(layer, &x, xq.as_ref(), h, step)?;
        let xq = self.norm_for_products(x.addr, h.addr, width, &layer.post_norm, width, m, eps)?;
        match &layer.ffn {
            Ffn::Dense(mlp) => self.mlp(mlp, &x, xq.as_ref(), h.addr, m, true),
            Ffn::Moe(moe) => {
                let routes = self.moe(layer.index, moe, &x, xq.as_ref(), h, m, step.valid, trace.is_some())?;
                if let (Some(t), Some(routes)) = (trace, routes) {
                    t.routes.push((layer.index, routes));
                }
                Ok(())
            }
        }
    }

    /// Dense SwiGLU MLP, added into `out` when `accumulate`, else written there (x's rows quantised
    /// already where `xq` has them). With quantised activations the down product's input is
    /// quantised where SwiGLU makes it (one launch where there were two), as the norms quantise
    /// theirs.
    fn mlp(
        &self,
        mlp: &Mlp,
        x: &DeviceBuf,
        xq: Option<&QuantizedRows>,
        out: u64,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        let inter = mlp.inter();
        let gu = g.alloc(m * 2 * inter * 4)?;
        let gate_up = self.linear_unsummed(gu.addr, x.addr, xq, m, &mlp.gate_up)?;
        let act = g.alloc(m * inter * 4)?;
        let hidden = self.config.hidden_size;
        match self.quantised_where_made(inter) {
            // The product's split-k sum, SwiGLU and the down product's quantisation: one launch.
            Some(ue8m0) => {
                let aq = QuantizedRows::swiglu(g, gate_up.sums(), m, inter, None, ue8m0, Some(act.addr))?;
                drop(gate_up);
                self.linear_from(out, hidden, act.addr, Some(&aq), m, &mlp.down, accumulate)
            }
            _ => {
                gate_up.finish(g)?;
                kernels::swiglu.launch_1d(g, m * inter, (ptr(act.addr), ptr(gu.addr), int(m), int(inter)))?;
                self.linear(out, hidden, act.addr, m, &mlp.down, accumulate)
            }
        }
    }
}

impl StepBackend for CudaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        format!("{} (cuda:{})", self.gpu.name, self.gpu.ordinal)
    }

    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        Ok(self.forward(chunks, false)?.0)
    }

    fn step_pick(&mut self, chunks: &[Chunk], picks: &[Option<TokenPick>]) -> Result<Vec<Option<PickedToken>>> {
        CudaModel::step_pick(self, chunks, picks)
    }

    fn step_pick_rows(
        &mut self,
        chunks: &[Chunk],
        picks: &[Option<dsv3_engine::RowPicks>],
    ) -> Result<Vec<dsv3_engine::PickedRows>> {
        CudaModel::step_pick_rows(self, chunks, picks)
    }

    fn free_sequence(&mut self, seq: SeqId) {
        self.cache.table.free_sequence(seq);
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        self.cache.table.truncate(seq, len);
    }

    fn discard_from(&mut self, seq: SeqId, len: usize) {
        self.cache.table.discard_from(seq, len);
    }

    fn withhold_from(&mut self, seq: SeqId, from: usize) {
        self.cache.table.withhold_from(seq, from);
    }

    fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    fn mtp_step(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        self.mtp_forward(chunks)
    }

    fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], keep_last: bool) -> usize {
        self.cache.table.reuse_prefix(seq, start, tokens, keep_last)
    }

    fn capacity(&self) -> CacheCapacity {
        CacheCapacity {
            block_size: self.cache.block_size(),
            total_blocks: self.cache.num_blocks(),
            free_blocks: self.cache.table.free_blocks(),
        }
    }

    fn take_expert_counts(&mut self) -> Result<ExpertCounts> {
        CudaModel::take_expert_counts(self)
    }

    /// Weights and cache as allocated; the workspace is the rest of what this process holds in
    /// the GPU's memory pool (step scratch kept for reuse, graph buffers).
    fn memory(&self) -> MemoryUse {
        let weights = self.weight_bytes as u64;
        let kv_cache = self.cache.data.bytes as u64;
        let pool = self.gpu.pool_reserved().unwrap_or(0);
        MemoryUse {
            weights,
            kv_cache,
            workspace: pool.saturating_sub(weights + kv_cache),
        }
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

/// Where a step's results are on the GPU: in buffers the step owns, or in a graph's.
struct HeadOut {
    logits: u64,
    normed: u64,
    rows: usize,
    _owned: Vec<DeviceBuf>,
}

/// Word offsets of a step's input arrays in their one buffer (the block tables last, so a graph's
/// fixed-size buffer takes any tables that fit the cache).
struct InputOffsets {
    ids: usize,
    slots: usize,
    table_off: usize,
    lens: usize,
    valid: usize,
    tables: usize,
}

/// A step's inputs on the GPU: `rows` rows (some may pad a graphed step; `valid` holds the count
/// of real ones), per row the token, cache slot, block-table offset and context length; and the
/// rotary table, where each row finds its angles at its position (its context length minus one).
struct StepLayout {
    rows: usize,
    /// Longest context any row attends over (for a graphed step: the cache capacity).
    max_len: usize,
    spans: Vec<Span>,
    ids: u64,
    slots: u64,
    table_off: u64,
    lens: u64,
    valid: u64,
    tables: u64,
    /// The model's rotary table (`[position][rope_dim / 2]` each).
    rope_cos: u64,
    rope_sin: u64,
}

impl StepLayout {
    fn offsets(rows: usize) -> InputOffsets {
        InputOffsets {
            ids: 0,
            slots: rows,
            table_off: 2 * rows,
            lens: 3 * rows,
            valid: 4 * rows,
            tables: 4 * rows + 1,
        }
    }
}

impl CudaModel {
    /// The layout of a step's inputs packed by [`CudaModel::pack_inputs`] at `base`.
    fn step_layout(&self, base: u64, rows: usize, spans: Vec<Span>, max_len: usize) -> StepLayout {
        let at = StepLayout::offsets(rows);
        let addr = |words: usize| base + (words * 4) as u64;
        let rope = self.rope.borrow();
        StepLayout {
            rows,
            max_len,
            spans,
            ids: addr(at.ids),
            slots: addr(at.slots),
            table_off: addr(at.table_off),
            lens: addr(at.lens),
            valid: addr(at.valid),
            tables: addr(at.tables),
            rope_cos: rope.cos.addr,
            rope_sin: rope.sin.addr,
        }
    }
}
