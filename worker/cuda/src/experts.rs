//! An expert shard on the GPU: the routed experts the placement plan gives it, for every MoE
//! layer, in FP8 as the checkpoint stores them, run with the same grouped kernels as the whole
//! model (`run_bank`). Requests of several attention ranks for the same layer that arrive
//! while the GPU is busy are run together, so each expert streams its weights once for all.

use crate::data_plane::{LayerExchange, ATTENTION_SIDE};
use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr};
use crate::model::{run_bank, BankCounters, ExpertKernels, MoeStats};
use crate::nccl::RankComm;
use crate::weights::ExpertBank;
use anyhow::{bail, ensure, Context, Result};
use dsv3_engine::moe::NO_EXPERT;
use dsv3_engine::{Checkpoint, ExpertExecutor, Fp8Activations, MemoryUse, ModelConfig, ModelFiles, TokenRoutes};
use std::collections::BTreeMap;
use std::sync::{mpsc, Mutex};

struct Shard {
    gpu: Gpu,
    /// Per MoE layer, the held experts in `held` order.
    banks: BTreeMap<usize, ExpertBank>,
    stats: MoeStats,
    kernels: ExpertKernels,
    /// `local_of` on the GPU: the bank index of each global expert id, -1 where another shard
    /// holds it (for routes that arrive over NCCL).
    bank_of: DeviceBuf,
}

/// One layer's tokens from one caller, waiting for the GPU.
struct Job {
    layer: usize,
    x: Vec<f32>,
    routes: TokenRoutes,
    reply: mpsc::Sender<Result<Vec<f32>, String>>,
}

pub struct CudaExperts {
    hidden: usize,
    top_k: usize,
    /// The GPU the experts are on.
    ordinal: usize,
    n_experts: usize,
    /// Bank index of each global expert id, -1 where another shard holds it.
    local_of: Vec<i32>,
    weight_bytes: u64,
    device: String,
    queue: Mutex<Vec<Job>>,
    shard: Mutex<Shard>,
}

impl CudaExperts {
    /// Loads experts `held` of every MoE layer onto GPU `ordinal` (only their tensors are read),
    /// their products applying `activations`.
    pub fn load(
        files: &ModelFiles,
        ordinal: usize,
        held: &[u32],
        activations: Fp8Activations,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ModelConfig::from_model_files(files)?.with_fp8_activations(activations);
        let mut local_of = vec![-1i32; config.n_routed_experts];
        for (i, &e) in held.iter().enumerate() {
            let slot = local_of
                .get_mut(e as usize)
                .with_context(|| format!("expert {e} is outside the model's {} experts", config.n_routed_experts))?;
            ensure!(*slot < 0, "expert {e} is listed twice for this shard");
            *slot = i as i32;
        }
        let gpu = Gpu::open(ordinal)?;
        let ckpt = Checkpoint::open(files)?;
        let layers = config.routed_expert_layers();
        let mut banks = BTreeMap::new();
        for (done, &layer) in layers.iter().enumerate() {
            let prefix = format!("model.layers.{layer}.mlp");
            let bank = ExpertBank::load(
                &gpu,
                &ckpt,
                &prefix,
                held,
                config.hidden_size,
                config.moe_intermediate_size,
            )
            .with_context(|| format!("loading the routed experts of layer {layer}"))?;
            banks.insert(layer, bank);
            progress(done + 1, layers.len());
        }
        let weight_bytes = banks.values().map(|b| (b.experts * b.bytes_per_expert()) as u64).sum();
        let stats = MoeStats::new(&gpu, config.num_cache_layers(), held.len().max(1))?;
        let bank_of = gpu.upload(&local_of)?;
        gpu.sync()?;
        Ok(CudaExperts {
            hidden: config.hidden_size,
            n_experts: config.n_routed_experts,
            local_of,
            weight_bytes,
            device: format!("{} (cuda:{ordinal})", gpu.name),
            queue: Mutex::new(Vec::new()),
            shard: Mutex::new(Shard {
                gpu,
                banks,
                stats,
                kernels: ExpertKernels::new(&config)?,
                bank_of,
            }),
            top_k: config.num_experts_per_tok,
            ordinal,
        })
    }

    pub fn device(&self) -> String {
        self.device.clone()
    }

    pub fn memory(&self) -> MemoryUse {
        let pool = self
            .shard
            .lock()
            .ok()
            .and_then(|s| s.gpu.pool_reserved().ok())
            .unwrap_or(0);
        MemoryUse {
            weights: self.weight_bytes,
            kv_cache: 0,
            workspace: pool.saturating_sub(self.weight_bytes),
        }
    }

    /// Bank indices of `routes`' slots; an expert routed here that this shard does not hold is
    /// an error (the caller's placement disagrees with ours), a slot for another shard is -1.
    fn local_ids(&self, layer: usize, routes: &TokenRoutes) -> Result<Vec<i32>> {
        routes
            .experts
            .iter()
            .map(|&e| {
                if e == NO_EXPERT {
                    return Ok(-1);
                }
                match self.local_of.get(e as usize) {
                    Some(&i) if i >= 0 => Ok(i),
                    Some(_) => bail!("routed expert {e} of layer {layer} is not held by this shard"),
                    None => bail!("expert id {e} is outside the model's {} experts", self.n_experts),
                }
            })
            .collect()
    }

    /// Runs every queued job of the first queued job's layer as one batch, answering each caller.
    fn drain(&self, shard: &Shard) {
        let jobs = {
            let Ok(mut queue) = self.queue.lock() else { return };
            let Some(layer) = queue.first().map(|j| j.layer) else {
                return;
            };
            let (same, rest): (Vec<Job>, Vec<Job>) =
                std::mem::take(&mut *queue).into_iter().partition(|j| j.layer == layer);
            *queue = rest;
            same
        };
        let result = self.run_batch(shard, &jobs);
        let mut at = 0;
        for job in jobs {
            let n = job.x.len();
            let answer = match &result {
                Ok(y) => Ok(y[at..at + n].to_vec()),
                Err(e) => Err(format!("{e:#}")),
            };
            at += n;
            let _ = job.reply.send(answer);
        }
    }

    /// The jobs' rows stacked into one step of the grouped kernels.
    fn run_batch(&self, shard: &Shard, jobs: &[Job]) -> Result<Vec<f32>> {
        let layer = jobs[0].layer;
        let bank = shard
            .banks
            .get(&layer)
            .with_context(|| format!("layer {layer} has no routed experts in this model"))?;
        let k = jobs[0].routes.k;
        let mut x = Vec::new();
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for job in jobs {
            ensure!(job.routes.k == k, "callers of one batch disagree on top-k");
            x.extend_from_slice(&job.x);
            ids.extend(self.local_ids(layer, &job.routes)?);
            weights.extend_from_slice(&job.routes.weights);
        }
        let m = x.len() / self.hidden;
        if m == 0 {
            return Ok(Vec::new());
        }
        let g = &shard.gpu;
        let xd = g.upload(&x)?;
        let idd = g.upload(&ids)?;
        let wd = g.upload(&weights)?;
        let h = self.weighted_sums(g, shard, bank, layer, &xd, m, k, idd.addr, wd.addr)?;
        g.download(h.addr, m * self.hidden)
    }

    /// The weighted sums of `m` rows `x` (f32) over their routed slots (`ids`: bank indices, -1
    /// for another shard's; `weights`), queued on `g`'s stream, in a new f32 buffer.
    #[allow(clippy::too_many_arguments)]
    fn weighted_sums(
        &self,
        g: &Gpu,
        shard: &Shard,
        bank: &ExpertBank,
        layer: usize,
        x: &DeviceBuf,
        m: usize,
        k: usize,
        ids: u64,
        weights: u64,
    ) -> Result<DeviceBuf> {
        let valid = g.upload(&[m as i32])?;
        let h = g.alloc(m * self.hidden * 4)?;
        g.zero(h.addr, h.bytes)?;
        let counters = BankCounters {
            counts: shard.stats.counts_addr(layer),
            touched: shard.stats.touched_addr(),
        };
        run_bank(
            g,
            shard.kernels,
            bank,
            x,
            None,
            &h,
            m,
            k,
            ids,
            weights,
            valid.addr,
            &counters,
            None,
        )?;
        Ok(h)
    }
}

/// One NCCL pair of a shard: its communicator, and a handle on the shard's GPU with a stream
/// of its own for the pair's exchanges.
pub struct PairStream {
    gpu: Gpu,
    pub comm: RankComm,
}

impl Drop for PairStream {
    /// The pair's queued work finishes before its communicator goes (an aborted pair's
    /// transfers have already stopped waiting).
    fn drop(&mut self) {
        let _ = self.gpu.sync();
    }
}

impl CudaExperts {
    /// Makes this shard's side of an NCCL pair with an attention rank (the shard is NCCL rank 1),
    /// on the shard's GPU; fails past `deadline` if the attention rank does not join.
    /// The pair gets a stream of its own ([`PairStream`]): a shard's pairs then never wait on
    /// each other, whatever order their attention ranks announce their layers in (on one stream
    /// the orders could cross between two shards and two ranks, each pair waiting on the other).
    pub fn join_pair(&self, id: &[u8; crate::nccl::ID_BYTES], deadline: std::time::Duration) -> Result<PairStream> {
        // Not under the shard's lock: a join waits on its peer, and other pairs go on meanwhile.
        let gpu = Gpu::open(self.ordinal)?;
        let comm = RankComm::join(&gpu, id, crate::data_plane::SHARD_SIDE, 2, deadline)?;
        Ok(PairStream { gpu, comm })
    }

    /// Queues one announced exchange with the attention rank of `comm`
    /// ([`crate::data_plane`]): its rows, routes and weights are received, the routes this
    /// shard holds run, and their weighted sums go back. Nothing waits for the GPU: the
    /// exchanges of a pair run in the order they are queued, those of other pairs and gRPC
    /// batches in between.
    pub fn serve_exchange(&self, pair: &PairStream, exchange: LayerExchange) -> Result<()> {
        let comm = &pair.comm;
        let LayerExchange { layer, rows: m, k } = exchange;
        ensure!(
            k == self.top_k,
            "layer {layer}: {k} routed slots per token announced, the model routes each to {}",
            self.top_k
        );
        ensure!(m > 0, "layer {layer}: an exchange of no rows");
        let shard = self.shard()?;
        let bank = shard
            .banks
            .get(&layer)
            .with_context(|| format!("layer {layer} has no routed experts in this model"))?;
        // The pair's own stream (same device, context and memory pool as the shard's weights).
        let g = &pair.gpu;
        let width = self.hidden;
        let bytes = exchange.bytes(width);
        let rows = g.alloc(bytes.rows)?;
        let ids = g.alloc(bytes.ids)?;
        let weights = g.alloc(bytes.weights)?;
        let peer = ATTENTION_SIDE;
        comm.exchange(
            g,
            &[],
            &[
                (peer, rows.addr, bytes.rows),
                (peer, ids.addr, bytes.ids),
                (peer, weights.addr, bytes.weights),
            ],
        )?;
        let x = g.alloc(m * width * 4)?;
        kernels::bf16_to_f32_rows.launch_1d(g, m * width, (ptr(x.addr), ptr(rows.addr), (m * width) as u64))?;
        let local = g.alloc(bytes.ids)?;
        kernels::bank_expert_ids.launch_1d(
            g,
            m * k,
            (
                ptr(local.addr),
                ptr(ids.addr),
                ptr(shard.bank_of.addr),
                int(self.n_experts),
                int(m * k),
            ),
        )?;
        let h = self.weighted_sums(g, &shard, bank, layer, &x, m, k, local.addr, weights.addr)?;
        let sums = g.to_bf16(h.addr, m * width)?;
        comm.exchange(g, &[(peer, sums.addr, bytes.sums)], &[])
        // Every buffer above is freed in stream order, after the work that uses it.
    }

    fn shard(&self) -> Result<std::sync::MutexGuard<'_, Shard>> {
        self.shard
            .lock()
            .map_err(|_| anyhow::anyhow!("the expert shard is poisoned by an earlier panic"))
    }
}

impl ExpertExecutor for CudaExperts {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        let tokens = routes.tokens();
        ensure!(
            x.len() == tokens * self.hidden,
            "routes for {tokens} tokens, activations of {} values (hidden {})",
            x.len(),
            self.hidden
        );
        ensure!(
            routes.weights.len() == routes.experts.len(),
            "{} routing weights for {} routed slots",
            routes.weights.len(),
            routes.experts.len()
        );
        // Checked here so one caller's bad request never fails the others it is batched with.
        self.local_ids(layer, routes)?;
        let (reply, answer) = mpsc::channel();
        self.queue
            .lock()
            .map_err(|_| anyhow::anyhow!("the expert queue is poisoned by an earlier panic"))?
            .push(Job {
                layer,
                x: x.to_vec(),
                routes: routes.clone(),
                reply,
            });
        // Whoever holds the GPU runs what is queued; the others wait for their answer.
        loop {
            if let Ok(result) = answer.try_recv() {
                return result.map_err(anyhow::Error::msg);
            }
            let shard = self
                .shard
                .lock()
                .map_err(|_| anyhow::anyhow!("the expert shard is poisoned by an earlier panic"))?;
            self.drain(&shard);
        }
    }
}
