//! Tile sizes shared by the kernels and the code that launches them: the one home of each, handed
//! to NVRTC as `-D` definitions (the kernels define none of their own), so a grid, a block or a
//! shared-memory size can never disagree with the kernel it is computed for.

/// Heads per block of the CUDA-core MLA decode kernel (`mla_attend`).
pub const MLA_HEAD_GROUP: usize = 16;
/// Cached positions per tile of `mla_attend`.
pub const MLA_TILE: usize = 32;
/// Threads per block of `mla_attend`.
pub const MLA_THREADS: usize = 256;
/// Heads per block of the tensor-core MLA decode kernel (`mla_decode_mma`): four warps of 16
/// rows, each paired with a second warp for the other half of the positions and of the output.
pub const DEC_HEADS: usize = 64;
/// Threads per block of `mla_decode_mma` (the kernel's warp roles assume 8 warps).
pub const DEC_THREADS: usize = 256;
/// Cached positions per tile of `mla_decode_mma`.
pub const DEC_TILE: usize = 64;
/// Tiles of `mla_decode_mma` in shared memory at once: the one in use and those in flight.
pub const DEC_STAGES: usize = 2;
/// bf16 elements of padding per row of `mla_decode_mma`'s P in shared memory (an odd number of
/// 16-byte units per row keeps ldmatrix free of bank conflicts; Q and the tiles are swizzled).
pub const DEC_PAD: usize = 8;
/// Query rows per block of the flash prefill attention (`mla_prefill_flash`): 4 warps of 16.
pub const FL_Q: usize = 64;
/// Key positions per tile of `mla_prefill_flash`.
pub const FL_K: usize = 64;
/// Widest query/key head (`nope + rope`) `mla_prefill_flash` takes (its register arrays).
pub const FL_QK: usize = 192;
/// Widest value head `mla_prefill_flash` takes.
pub const FL_V: usize = 128;
/// Query rows per block of the Hopper prefill attention (`mla_prefill_wgmma`): two multiplying
/// warpgroups of 64.
pub const PF_Q: usize = 128;
/// Key positions per tile of `mla_prefill_wgmma`.
pub const PF_K: usize = 128;
/// Threads per block of `mla_prefill_wgmma`: two multiplying warpgroups and a feeding one.
pub const PF_THREADS: usize = 384;
/// Weight rows per tile of the Hopper expert product (`grouped_fp8_wgmma`): two consumer
/// warpgroups of 64, one 128-row block of the weights' scales.
pub const GX_ROWS: usize = 128;
/// Most tokens (one group's) per tile of `grouped_fp8_wgmma`: a group of up to 192 slots is one
/// tile (a prefill's ~128 per expert, with room for the uneven ones); larger groups are split
/// evenly. 192 columns keep a multiplying thread's partial sums and accumulators in 232 registers.
pub const GX_TOKENS: usize = 192;
/// Dynamic shared memory of `grouped_fp8_wgmma`: five stages of the widest tile (its weights, its
/// tokens, their scales, the weight block's scale and two barriers each) and room to align them
/// to the 1024-byte swizzle atom. A block lays out as many stages as fit for its own tile's
/// width, up to [`GX_MAX_STAGES`]: 6 up to 128 tokens, 5 above.
pub const GX_SHARED: usize = 5 * ((GX_ROWS + GX_TOKENS) * 128 + GX_TOKENS * 4 + 32) + 1024;
/// Most k blocks in flight per `grouped_fp8_wgmma` block. More made no difference to narrow
/// (decode) tiles: 4, 5, 6, 8 and 11 measured within noise of each other on one H200.
pub const GX_MAX_STAGES: usize = 6;
/// Threads per block of `grouped_fp8_wgmma`: a feeding warpgroup and two multiplying ones.
pub const GX_THREADS: usize = 384;
/// Most 128-channel blocks of a row one warp of `quantize_rows_fp8` takes (their loads in flight
/// together).
pub const QUANT_SPAN: usize = 4;
/// float4s of its row each thread of a norm holds in registers (`HeldRow`): a decode step's
/// 7,168-wide row on 896 threads, with room at 1,024 threads a block (64 registers a thread).
pub const RMS_HELD: usize = 2;
/// float4s of its row each thread of a norm's `_many` kernels holds: a prefill's rows of up to
/// 8,192 on blocks of 256 threads.
pub const RMS_HELD_MANY: usize = 8;
/// Threads per block of the merge of the routed experts' rows (`combine_experts`: four channels a
/// thread, a token's width over `ceil(width / (4 × this))` blocks).
pub const COMBINE_THREADS: usize = 256;
/// Token rows per block of the Hopper absorptions (`mla_absorb_*_wgmma`): one warpgroup's wgmma M.
pub const ABSORB_ROWS: usize = 64;
/// Weight rows per block of `mla_absorb_*_wgmma`: its wgmma N, one 128-row block of the scales.
pub const ABSORB_COLS: usize = 128;
/// Dynamic shared memory of `mla_absorb_*_wgmma`: one 128-wide k chunk of the tokens and of the
/// weights as bf16, and room to align them to the 1024-byte swizzle atom.
pub const ABSORB_SHARED: usize = (ABSORB_ROWS + ABSORB_COLS) * 128 * 2 + 1024;
/// Most rows a step may have for the absorption of W_UV to merge the decode's splits itself
/// (`mla_absorb_out_merged_mma`: one token tile of `mla_absorb_out_mma_n1`).
pub const ABSORB_MERGED_ROWS: usize = 8;
/// Widest latent `mla_absorb_out_merged_mma` holds in shared memory (DeepSeek-V3's 512).
pub const ABSORB_MERGED_LORA: usize = 512;
/// Widest head value `mla_absorb_out_merged_mma` takes (a warp per 16 of a head's value rows;
/// DeepSeek-V3's 128).
pub const ABSORB_MERGED_VDIM: usize = 256;
/// Experts each lane of `route_plan` holds (a warp routes a row): it takes banks of up to 32 ×
/// this many experts (DeepSeek-V3's 256).
pub const ROUTE_LANE_EXPERTS: usize = 8;
/// Threads of `route_plan`'s one block: a warp a row routed at a time, a thread a (row, choice)
/// pair placed in the plan.
pub const ROUTE_PLAN_THREADS: usize = 1024;
/// Threads per row of the token pick (`pick_tokens`).
pub const PICK_THREADS: usize = 1024;

/// The definitions every kernel family is compiled with.
pub fn defines() -> Vec<String> {
    [
        ("MLA_HG", MLA_HEAD_GROUP),
        ("MLA_TILE", MLA_TILE),
        ("MLA_THREADS", MLA_THREADS),
        ("DEC_THREADS", DEC_THREADS),
        ("DEC_TILE", DEC_TILE),
        ("DEC_STAGES", DEC_STAGES),
        ("DEC_PAD", DEC_PAD),
        ("FL_Q", FL_Q),
        ("FL_K", FL_K),
        ("FL_QK", FL_QK),
        ("FL_V", FL_V),
        ("PF_Q", PF_Q),
        ("PF_K", PF_K),
        ("PF_THREADS", PF_THREADS),
        ("GX_ROWS", GX_ROWS),
        ("GX_TOKENS", GX_TOKENS),
        ("GX_SHARED", GX_SHARED),
        ("GX_MAX_STAGES", GX_MAX_STAGES),
        ("GX_THREADS", GX_THREADS),
        ("ABSORB_ROWS", ABSORB_ROWS),
        ("ABSORB_COLS", ABSORB_COLS),
        ("ABSORB_MERGED_ROWS", ABSORB_MERGED_ROWS),
        ("ABSORB_MERGED_LORA", ABSORB_MERGED_LORA),
        ("ABSORB_MERGED_VDIM", ABSORB_MERGED_VDIM),
        ("PICK_THREADS", PICK_THREADS),
        ("ROUTE_LANE_EXPERTS", ROUTE_LANE_EXPERTS),
        ("ROUTE_PLAN_THREADS", ROUTE_PLAN_THREADS),
        ("QUANT_SPAN", QUANT_SPAN),
        ("RMS_HELD", RMS_HELD),
        ("RMS_HELD_MANY", RMS_HELD_MANY),
        ("COMBINE_THREADS", COMBINE_THREADS),
    ]
    .iter()
    .map(|(name, value)| format!("-D{name}={value}"))
    .collect()
}
