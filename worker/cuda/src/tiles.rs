//! Tile sizes shared by the kernels and the code that launches them: the one home of each, handed
//! to NVRTC as `-D` definitions (the kernels define none of their own), so a grid, a block or a
//! shared-memory size can never disagree with the kernel it is computed for.

/// Heads per block of the CUDA-core MLA decode kernel (`mla_attend`).
pub const MLA_HEAD_GROUP: usize = 16;
/// Cached positions per tile of `mla_attend`.
pub const MLA_TILE: usize = 32;
/// Threads per block of `mla_attend`.
pub const MLA_THREADS: usize = 256;
/// Cached positions per tile of the tensor-core MLA decode kernel (`mla_decode_tc`).
pub const TC_TILE: usize = 64;
/// bf16 elements of padding per shared-memory row of `mla_decode_tc` (bank conflicts).
pub const TC_PAD: usize = 8;
/// Warps per block of `mla_decode_tc`.
pub const TC_WARPS: usize = 8;
/// Threads per row of the token pick (`pick_tokens`).
pub const PICK_THREADS: usize = 1024;

/// The definitions every kernel family is compiled with.
pub fn defines() -> Vec<String> {
    [
        ("MLA_HG", MLA_HEAD_GROUP),
        ("MLA_TILE", MLA_TILE),
        ("MLA_THREADS", MLA_THREADS),
        ("TC_TILE", TC_TILE),
        ("TC_PAD", TC_PAD),
        ("TC_WARPS", TC_WARPS),
        ("PICK_THREADS", PICK_THREADS),
    ]
    .iter()
    .map(|(name, value)| format!("-D{name}={value}"))
    .collect()
}
