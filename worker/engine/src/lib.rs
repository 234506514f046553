//! dsv3-engine: exact DeepSeek-V3 inference on CPU from the official checkpoint format.
//!
//! Library API: load a model directory ([`Engine::load`]), run batched steps over a paged
//! latent KV cache ([`Model::forward`]), or generate ([`Engine::generate`]). Routed experts sit
//! behind [`ExpertExecutor`], so the same model serves in one process or split across workers.

pub mod backend;
pub mod batch;
pub mod block_table;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod fp8;
pub mod kv_cache;
pub mod linear;
pub mod logit_rules;
pub mod mla;
pub mod model;
pub mod moe;
pub mod ops;
pub mod rope;
pub mod sampling;
pub mod simd;
pub mod speculative;
pub mod synthetic;

pub use backend::{
    pick_on_host, pick_row, pick_rows_on_host, CacheCapacity, CpuBackend, ExpertCounts, MemoryUse, PickedRows,
    PickedToken, RowPicks, StepBackend, TokenPick,
};
pub use batch::{check_request, BatchOptions};
pub use block_table::{BlockTable, CacheError};
pub use checkpoint::{weight_map, Checkpoint, ModelFiles, INDEX_FILE, SINGLE_FILE};
pub use config::{Fp8Activations, ModelConfig};
pub use engine::{
    end_ids, finish_reason, Engine, EngineOptions, FinishReason, GenerateOutput, GenerateRequest, LoadProgress,
};
pub use kv_cache::{KvCache, SeqId};
pub use logit_rules::{apply_edits, apply_mask, LogitEdit, LogitRules, LogitState, TokenMask};
pub use mla::MlaForm;
pub use model::{begin_step, check_chunks, discard_step, Chunk, ChunkOutput, Model, Outputs, StepOptions, Trace};
pub use moe::{ExpertExecutor, ExpertSelection, LocalExperts, TokenRoutes};
pub use sampling::{choose, OutputGrammar, Sampler, SamplingParams, TokenChoice};
pub use speculative::{speculative_step, Acceptance, Drafting, SpecChunk, SpecOutcome};
