//! Decode steps as CUDA graphs. A decode step is ~50 launches per layer of a few microseconds
//! each; launched one by one from the host they cost more than the kernels themselves at small
//! batches. Every step of the same padded batch size runs the same kernels on the same buffers
//! (inputs copied into a fixed buffer, lengths read on the GPU, experts grouped on the GPU), so it
//! is recorded once and replayed with one launch.

use super::{CudaModel, HeadOut, StepLayout};
use crate::gpu::DeviceBuf;
use anyhow::{Context, Result};
use cudarc::driver::CudaGraph;
use dsv3_engine::Chunk;

/// Row counts that get a graph; a step pads its rows up to the next one.
const BATCH_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// Most tokens a sequence feeds a graphed step: its last token and the drafts after it
/// (speculative decoding). Such rows attend over the cache like decode rows.
const GRAPHED_TOKENS_PER_SEQUENCE: usize = 8;
/// Most rows of a graphed step whose sequences feed several tokens. A graph splits attention
/// for the whole cache's capacity; with drafts that cost more than launching saves above small
/// batches (5-layer slice, 4K context, one draft: batch 1 2.51 ms graphed vs 2.74 launched,
/// batch 8 5.62 vs 5.67, batch 64 17.4 vs 13.3).
const GRAPHED_ROWS_WITH_DRAFTS: usize = 32;

/// Whether a step can replay a graph: a few new tokens per sequence (decode, or decode with
/// drafts), at most the largest bucket of rows, and the head (if any) over every row in order.
pub(super) fn fits(chunks: &[Chunk], head_rows: Option<&[i32]>) -> bool {
    let m: usize = chunks.iter().map(|c| c.tokens.len()).sum();
    m > 0
        && m <= super::moe::DEVICE_ONLY_MAX_ROWS
        && bucket(m).is_some()
        && chunks.iter().all(|c| c.tokens.len() <= GRAPHED_TOKENS_PER_SEQUENCE)
        && (m <= GRAPHED_ROWS_WITH_DRAFTS || chunks.iter().all(|c| c.tokens.len() == 1))
        && head_rows.is_none_or(|rows| rows.len() == m && rows.iter().enumerate().all(|(i, &r)| r == i as i32))
}

fn bucket(m: usize) -> Option<usize> {
    BATCH_BUCKETS.iter().copied().find(|&b| b >= m)
}

/// One recorded decode step and the fixed buffers it reads and writes.
pub(super) struct DecodeGraph {
    rows: usize,
    inputs: DeviceBuf,
    hidden: DeviceBuf,
    /// Post-norm hidden states and logits of every row, when the graph includes the head.
    head: Option<(DeviceBuf, DeviceBuf)>,
    exec: Option<Recorded>,
}

/// A recorded graph. The driver lets any thread use a graph as long as the calls are serialised,
/// and the model runs steps through `&mut self`, so the graph may move with the model.
struct Recorded(CudaGraph);

// SAFETY: graph handles are used only by whoever holds the model mutably (see above).
unsafe impl Send for Recorded {}

impl DecodeGraph {
    fn new(model: &CudaModel, rows: usize, with_head: bool) -> Result<Self> {
        let g = &model.gpu;
        let c = &model.config;
        let at = StepLayout::offsets(rows);
        // The block tables of all sequences together never exceed the cache's blocks.
        let inputs = g.alloc((at.tables + model.cache.num_blocks()) * 4)?;
        let hidden = g.alloc(rows * c.hidden_size * 4)?;
        let head = if with_head {
            Some((g.alloc(rows * c.hidden_size * 4)?, g.alloc(rows * c.vocab_size * 4)?))
        } else {
            None
        };
        Ok(DecodeGraph {
            rows,
            inputs,
            hidden,
            head,
            exec: None,
        })
    }

    /// The step's kernels over the graph's buffers.
    fn enqueue(&self, model: &CudaModel, step: &StepLayout) -> Result<()> {
        model.run_layers(step, &self.hidden, &mut None)?;
        if let Some((normed, logits)) = &self.head {
            model.head_into(&self.hidden, None, self.rows, normed, logits.addr)?;
        }
        Ok(())
    }
}

impl CudaModel {
    /// Runs a decode step (checked by [`fits`], cache positions already reserved) through the graph
    /// of its padded batch size, recording that graph the first time: that step runs directly.
    pub(super) fn run_graphed(&mut self, chunks: &[Chunk], with_head: bool) -> Result<Option<HeadOut>> {
        let m: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let rows = bucket(m).context("batch too large for a CUDA graph")?;
        let key = (rows, with_head);
        let mut graph = match self.graphs.remove(&key) {
            Some(graph) => graph,
            None => DecodeGraph::new(self, rows, with_head)?,
        };
        let (words, spans, _) = self.pack_inputs(chunks, rows)?;
        self.gpu.copy_to(&graph.inputs, 0, &words)?;
        // Split attention by the cache's capacity, so the launch shapes hold for any context.
        let capacity = self.cache.num_blocks() * self.cache.block_size();
        let step = self.step_layout(graph.inputs.addr, rows, spans, capacity);
        match &graph.exec {
            Some(Recorded(exec)) => exec.launch().context("launching the decode graph")?,
            None => {
                graph.enqueue(self, &step)?;
                let exec = self
                    .gpu
                    .capture(|| graph.enqueue(self, &step))
                    .with_context(|| format!("recording the decode step of {rows} rows"))?;
                graph.exec = Some(Recorded(exec));
            }
        }
        let out = graph.head.as_ref().map(|(normed, logits)| HeadOut {
            logits: logits.addr,
            normed: normed.addr,
            rows: m,
            _owned: vec![],
        });
        self.graphs.insert(key, graph);
        Ok(out)
    }
}
