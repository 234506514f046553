//! The signature of every kernel in `kernels/*.cu`, in Rust types ([`crate::launch`]): one
//! typed launcher each, e.g. `kernels::rms_norm.launch(g, grid, block, smem, (out, ld, ...))`.
//! Variants compiled from one C definition (`fp8_mma_n1` … `_n8`) share a type, so code can
//! pick one at run time. A C pointer is a [`Ptr`], `int` and `unsigned` an `i32`, `u64` a u64,
//! `float` an f32, a `TensorMap` a [`TensorMap`]; `tests/nvrtc.rs` checks each declaration
//! against the parameters of the compiled kernel, and that every kernel is declared.

#![allow(non_upper_case_globals)]

use crate::launch::{Kernel, Kind, Ptr, TensorMap};
use crate::tiles::RMS_HELD;

/// Declares, per C signature, a type `Kernel<(params)>` and one constant per kernel of that
/// signature, and lists them all in [`ALL`].
macro_rules! kernels {
    ($( $Ty:ident : $($name:ident),+ ( $($p:ident : $t:ty),* $(,)? ); )*) => {
        $(
            pub type $Ty = Kernel<($($t,)*)>;
            $( pub const $name: $Ty = Kernel::new(stringify!($name)); )+
        )*
        /// Every kernel: its name and its parameters' kinds.
        pub const ALL: &[(&str, &[Kind])] = &[$($((stringify!($name), <$Ty>::KINDS),)+)*];
    };
}

kernels! {
    // Norms, conversions, RoPE, quantisation, embedding, routing bookkeeping, test data
    // (`kernels/elementwise.cu`).
    RmsNorm: rms_norm, rms_norm_many(out: Ptr, ld_out: i32, in_: Ptr, ld_in: i32, w: Ptr, width: i32, eps: f32);
    Swiglu: swiglu(act: Ptr, gu: Ptr, rows: i32, inter: i32);
    AddF32: add_f32(y: Ptr, x: Ptr, n: u64);
    BankExpertIds: bank_expert_ids(out: Ptr, ids: Ptr, bank_of: Ptr, n_experts: i32, n: i32);
    PeerExpertIds: peer_expert_ids(out: Ptr, ids: Ptr, owner: Ptr, peer: i32, n_experts: i32, n: i32);
    CountRoutes: count_routes(counts: Ptr, ids: Ptr, n_experts: i32, n: i32);
    AddBf16F32: add_bf16_f32(y: Ptr, x: Ptr, n: u64);
    Bf16ToF32Rows: bf16_to_f32_rows(out: Ptr, in_: Ptr, n: u64);
    RopeInterleaved: rope_interleaved(
        x: Ptr, ld: i32, heads: i32, hs: i32, offset: i32, dim: i32, cos_t: Ptr, sin_t: Ptr, lens: Ptr,
    );
    RopeInterleavedBf16: rope_interleaved_bf16(
        x: Ptr, xb: Ptr, ld: i32, hs: i32, offset: i32, dim: i32, cos_t: Ptr, sin_t: Ptr, lens: Ptr,
    );
    RopeInterleavedBf16InPlace: rope_interleaved_bf16_in_place(
        x: Ptr, ld: i32, heads: i32, hs: i32, offset: i32, dim: i32, cos_t: Ptr, sin_t: Ptr, lens: Ptr,
    );
    F32ToBf16Rows: f32_to_bf16_rows(out: Ptr, in_: Ptr, n: u64);
    F32ToBf16X8: f32_to_bf16_x8(out: Ptr, in_: Ptr, n8: u64);
    EmbedRows: embed_rows(out: Ptr, fmt: i32, table: Ptr, scale: Ptr, ids: Ptr, width: i32);
    DequantBf16: dequant_bf16(out: Ptr, fmt: i32, w: Ptr, scale: Ptr, r0: i32, n: i32, k: i32);
    DequantFp8Bf16: dequant_fp8_bf16(out: Ptr, w: Ptr, scale: Ptr, n: i32, k: i32);
    RandomFp8: random_fp8(w: Ptr, n: u64, seed: u64);
    RandomF32: random_f32(w: Ptr, n: u64, seed: u64, lo: f32, hi: f32);
    RandomBf16: random_bf16(w: Ptr, n: u64, seed: u64, lo: f32, hi: f32);
    ReadStream: read_stream(x: Ptr, n: u64, out: Ptr);
    QuantizeRowsFp8: quantize_rows_fp8(
        out: Ptr, scales: Ptr, x: Ptr, ldx: i32, rows: Ptr, n: i32, k: i32, offsets: Ptr, groups: i32,
        ue8m0: i32, span: i32,
    );
    RmsNormQuantizeFp8: rms_norm_quantize_fp8, rms_norm_quantize_fp8_many(
        out: Ptr, ld_out: i32, in_: Ptr, ld_in: i32, w: Ptr, width: i32, eps: f32, codes: Ptr, scales: Ptr,
        ue8m0: i32,
    );
    SwigluQuantizeFp8: swiglu_quantize_fp8(
        out: Ptr, scales: Ptr, gu: Ptr, n: i32, k: i32, offsets: Ptr, groups: i32, ue8m0: i32, span: i32,
        act: Ptr, splits: i32, split_stride: u64,
    );
    SwigluQuantizeFp8Bf16: swiglu_quantize_fp8_bf16(
        out: Ptr, scales: Ptr, gu: Ptr, n: i32, k: i32, offsets: Ptr, groups: i32, ue8m0: i32, span: i32,
    );
    GatherQuantizedRows: gather_quantized_rows(
        out: Ptr, scales: Ptr, q: Ptr, q_scales: Ptr, m: i32, rows: Ptr, k: i32, offsets: Ptr, groups: i32,
    );
    QuantizeRowsBf16: quantize_rows_bf16(out: Ptr, scales: Ptr, x: Ptr, n: i32, k: i32, ue8m0: i32);
    QuantizeRowsF32: quantize_rows_f32(out: Ptr, x: Ptr, n: i32, k: i32, ue8m0: i32);
    QuantizeWeightFp8: quantize_weight_fp8(
        out: Ptr, scales: Ptr, w: Ptr, rows: i32, cols: i32, scale_cols: i32,
    );

    // Weight-streaming products on the CUDA cores (`kernels/gemv.cu`).
    Gemv: gemv_fp8, gemv_bf16, gemv_f32(
        y: Ptr, ldy: i32, x: Ptr, ldx: i32, m: i32, w: Ptr, scale: Ptr, n: i32, k: i32, accumulate: i32,
        parts: i32,
    );
    GroupedGemvFp8: grouped_gemv_fp8(
        y: Ptr, ldy: i32, x: Ptr, ldx: i32, x_rows: Ptr, w: Ptr, scale: Ptr, w_stride: u64,
        scale_stride: u64, group_expert: Ptr, offsets: Ptr, n: i32, k: i32, max_rows: i32,
    );

    // The routed experts: routing, planning, gathering and combining (`kernels/moe.cu`).
    GatherRowsBf16: gather_rows_bf16(out: Ptr, x: Ptr, ldx: i32, rows: Ptr, width: i32);
    CombineExperts: combine_experts, combine_experts_bf16(
        out: Ptr, y: Ptr, slot: Ptr, weight: Ptr, top_k: i32, width: i32, shared: Ptr,
    );
    MoePlan: moe_plan(
        group_expert: Ptr, offsets: Ptr, x_rows: Ptr, slot_of: Ptr, counts: Ptr, touched: Ptr, chosen: Ptr,
        valid: Ptr, m: i32, top_k: i32, n_experts: i32, groups: i32, align: i32, capacity: i32,
    );
    RouteTopk: route_topk(
        experts_out: Ptr, weights_out: Ptr, logits: Ptr, bias: Ptr, n_experts: i32, n_group: i32,
        topk_group: i32, top_k: i32, normalize: i32, scaling: f32,
    );
    ExpertTiles: expert_tiles(tiles: Ptr, max_tiles: i32, offsets: Ptr, groups: i32);
    RoutePlan: route_plan(
        experts_out: Ptr, weights_out: Ptr, logits: Ptr, bias: Ptr, n_experts: i32, n_group: i32,
        topk_group: i32, top_k: i32, normalize: i32, scaling: f32, route_warp_floats: i32, group_expert: Ptr,
        offsets: Ptr, x_rows: Ptr, slot_of: Ptr, counts: Ptr, touched: Ptr, valid: Ptr, m: i32, groups: i32,
        capacity: i32, tiles: Ptr, max_tiles: i32,
    );

    // The Hopper routed-expert product (`kernels/moe_wgmma.cu`).
    GroupedFp8Wgmma: grouped_fp8_wgmma(
        out: Ptr, out_bf16: i32, ldy: i32, x_map: TensorMap, x_scales: Ptr, w_map: TensorMap, w_scales: Ptr,
        w_scale_stride: u64, tiles: Ptr, group_expert: Ptr, offsets: Ptr, rows: i32, k: i32,
    );

    // Latent attention: absorption, the cache, decode (`kernels/mla.cu`).
    MlaAbsorbQ: mla_absorb_q(
        q_lat: Ptr, q: Ptr, m: i32, heads: i32, qk: i32, nope: i32, vdim: i32, lora: i32, fmt: i32, w: Ptr,
        scale: Ptr, bf16_out: i32,
    );
    MlaAbsorbOut: mla_absorb_out(
        out: Ptr, o_lat: Ptr, m: i32, heads: i32, nope: i32, vdim: i32, lora: i32, fmt: i32, w: Ptr,
        scale: Ptr,
    );
    KvLatent: kv_latent(
        kv: Ptr, ld: i32, w: Ptr, lora: i32, rope: i32, eps: f32, cos_t: Ptr, sin_t: Ptr, lens: Ptr, cache: Ptr,
        slots: Ptr,
    );
    MlaAttend: mla_attend(
        o_lat: Ptr, q_lat: Ptr, q: Ptr, qk: i32, nope: i32, heads: i32, hg: i32, lora: i32, rope: i32,
        cache: Ptr, tables: Ptr, table_off: Ptr, lens: Ptr, block: i32, scale: f32,
    );
    GatherRowsF32: gather_rows_f32(out: Ptr, x: Ptr, ldx: i32, rows: Ptr, width: i32);
    MlaDecodeMma: mla_decode_mma(
        o_part: Ptr, ml_part: Ptr, q_lat: Ptr, q: Ptr, qk: i32, nope: i32, heads: i32, hg: i32, lora: i32,
        rope: i32, cache: Ptr, tables: Ptr, table_off: Ptr, lens: Ptr, block: i32, scale: f32,
        min_split: i32, bf16_out: i32,
    );
    MlaDecodeWgmma: mla_decode_wgmma(
        o_part: Ptr, ml_part: Ptr, heads: i32, hg: i32, tables: Ptr, table_off: Ptr, lens: Ptr, block: i32,
        scale: f32, min_split: i32, cache_map: TensorMap, tma_rows: i32, q_lat_map: TensorMap, q_map: TensorMap,
        nope: i32, bf16_out: i32,
    );
    MlaCombine: mla_combine(
        o_lat: Ptr, o_part: Ptr, ml_part: Ptr, heads: i32, splits: i32, lora: i32, bf16_out: i32,
    );

    // Prefill attention (`kernels/mla_prefill.cu`).
    GatherLatents: gather_latents(
        c_kv: Ptr, k_pe: Ptr, cache: Ptr, table: Ptr, block: i32, lora: i32, rope: i32,
    );
    BuildKv: build_kv(k: Ptr, v: Ptr, kv: Ptr, k_pe: Ptr, heads: i32, nope: i32, rope: i32, vdim: i32);
    MlaPrefillFlash: mla_prefill_flash(
        out: Ptr, ld_out: i32, q: Ptr, k: Ptr, v: Ptr, n: i32, start: i32, heads: i32, qk: i32, vdim: i32,
        scale: f32,
    );
    MlaPrefillWgmma: mla_prefill_wgmma, mla_prefill_wgmma_serial(
        out: Ptr, ld_out: i32, codes: Ptr, code_scales: Ptr, ld_scales: i32, ue8m0: i32, q_map: TensorMap, kv_map: TensorMap, kpe_map: TensorMap, n: i32, start: i32,
        scale: f32,
    );

    // Tensor-core products (mma.sync) and their split-k reduction (`kernels/mma.cu`).
    Fp8Mma: fp8_mma_n1, fp8_mma_n2, fp8_mma_n4, fp8_mma_n8(
        y: Ptr, ldy: i32, x: Ptr, ldx: i32, x_scale: Ptr, m: i32, w: Ptr, scale: Ptr, n: i32, k: i32,
        mode: i32, split_stride: u64,
    );
    Fp8x8Mma: fp8x8_mma_n1, fp8x8_mma_n2, fp8x8_mma_n4, fp8x8_mma_n8(
        y: Ptr, ldy: i32, x: Ptr, x_scale: Ptr, m: i32, w: Ptr, scale: Ptr, n: i32, k: i32, mode: i32,
        split_stride: u64,
    );
    Fp8x8MmaKOverWarps: fp8x8_mma_k_over_warps(
        y: Ptr, ldy: i32, x: Ptr, x_scale: Ptr, m: i32, w: Ptr, scale: Ptr, n: i32, k: i32, mode: i32,
    );
    Bf16Mma: bf16_mma_n1, bf16_mma_n2(
        y: Ptr, ldy: i32, x: Ptr, ldx: i32, m: i32, w: Ptr, n: i32, k: i32, mode: i32, split_stride: u64,
    );
    GroupedFp8Mma: grouped_fp8_mma_n1, grouped_fp8_mma_n2, grouped_fp8_mma_n4, grouped_fp8_mma_n8(
        y: Ptr, ldy: i32, x: Ptr, ldx: i32, x_rows: Ptr, w: Ptr, scale: Ptr, w_stride: u64,
        scale_stride: u64, group_expert: Ptr, offsets: Ptr, n: i32, k: i32, max_rows: i32, mode: i32,
        split_stride: u64, x_scale: Ptr,
    );
    MlaAbsorbOutMma: mla_absorb_out_mma_n1, mla_absorb_out_mma_n2, mla_absorb_out_mma_n4, mla_absorb_out_mma_n8(
        out: Ptr, o_lat: Ptr, m: i32, heads: i32, nope: i32, vdim: i32, lora: i32, w: Ptr, scale: Ptr,
    );
    MlaAbsorbOutMergedMma: mla_absorb_out_merged_mma(
        out: Ptr, codes: Ptr, scales: Ptr, ue8m0: i32, o_part: Ptr, ml_part: Ptr, splits: i32, m: i32,
        heads: i32, nope: i32, vdim: i32, lora: i32, w: Ptr, scale: Ptr,
    );
    SplitKReduce: split_k_reduce(y: Ptr, ldy: i32, part: Ptr, m: i32, n: i32, splits: i32, accumulate: i32);
    MlaAbsorbQMma: mla_absorb_q_mma_n1, mla_absorb_q_mma_n2, mla_absorb_q_mma_n4, mla_absorb_q_mma_n8,
        mla_absorb_q_mma_bf16_n1, mla_absorb_q_mma_bf16_n2, mla_absorb_q_mma_bf16_n4, mla_absorb_q_mma_bf16_n8(
        q_lat: Ptr, q: Ptr, m: i32, heads: i32, qk: i32, nope: i32, lora: i32, uk_t: Ptr, scale_t: Ptr,
    );
    MlaAbsorbWgmma: mla_absorb_q_wgmma, mla_absorb_q_wgmma_bf16, mla_absorb_out_wgmma(
        y: Ptr, ldy: i32, y_head: i32, x: Ptr, ldx: i32, x_head: i32, m: i32, w: Ptr, w_head: u64, scale: Ptr,
        scale_head: u64, k: i32,
    );
    MlaUkTranspose: mla_uk_transpose(
        uk_t: Ptr, scale_t: Ptr, kv_b: Ptr, scale: Ptr, nope: i32, vdim: i32, lora: i32,
    );

    // Sampling (`kernels/pick.cu`).
    PickTokens: pick_tokens(out: Ptr, logits: Ptr, vocab: i32, picks: Ptr, max_top: i32);
    ApplyLogitEdits: apply_logit_edits(logits: Ptr, vocab: i32, edits: Ptr, n: i32);
    ApplyTokenMasks: apply_token_masks(logits: Ptr, vocab: i32, masks: Ptr, words_per_row: i32);
}

/// The n1, n2, n4 and n8 variants of a tensor-core kernel, whose blocks take 8, 16, 32 and 64
/// token rows (1, 2, 4 and 8 tiles of 8).
#[derive(Clone, Copy)]
pub struct TokenTiles<K>(pub [K; 4]);

impl<K: Copy> TokenTiles<K> {
    /// The variant for `m` token rows: the fewest tiles that hold them (at most 8; more rows take
    /// several blocks), and the rows its block takes.
    pub fn for_rows(&self, m: usize) -> (K, usize) {
        match m {
            0..=8 => (self.0[0], 8),
            9..=16 => (self.0[1], 16),
            17..=32 => (self.0[2], 32),
            _ => (self.0[3], 64),
        }
    }
}

pub const FP8_MMA: TokenTiles<Fp8Mma> = TokenTiles([fp8_mma_n1, fp8_mma_n2, fp8_mma_n4, fp8_mma_n8]);
pub const FP8X8_MMA: TokenTiles<Fp8x8Mma> = TokenTiles([fp8x8_mma_n1, fp8x8_mma_n2, fp8x8_mma_n4, fp8x8_mma_n8]);
pub const MLA_ABSORB_Q_MMA: TokenTiles<MlaAbsorbQMma> = TokenTiles([
    mla_absorb_q_mma_n1,
    mla_absorb_q_mma_n2,
    mla_absorb_q_mma_n4,
    mla_absorb_q_mma_n8,
]);
pub const MLA_ABSORB_Q_MMA_BF16: TokenTiles<MlaAbsorbQMma> = TokenTiles([
    mla_absorb_q_mma_bf16_n1,
    mla_absorb_q_mma_bf16_n2,
    mla_absorb_q_mma_bf16_n4,
    mla_absorb_q_mma_bf16_n8,
]);
pub const MLA_ABSORB_OUT_MMA: TokenTiles<MlaAbsorbOutMma> = TokenTiles([
    mla_absorb_out_mma_n1,
    mla_absorb_out_mma_n2,
    mla_absorb_out_mma_n4,
    mla_absorb_out_mma_n8,
]);

/// Whether rows of `width` normalised by blocks of `threads` take the norms' `_many` kernels
/// (`rms_norm_many`, `rms_norm_quantize_fp8_many`: [`RMS_HELD_MANY`](crate::tiles::RMS_HELD_MANY)
/// float4s a thread held, for blocks of at most 256), where the plain ones ([`RMS_HELD`] a
/// thread) would walk the row.
pub fn norm_holds_many(width: usize, threads: usize) -> bool {
    threads <= 256 && width.div_ceil(4) > RMS_HELD * threads
}

/// The norm kernels for rows of `width` on blocks of `threads`: (plain, quantising), both plain
/// or both `_many` ([`norm_holds_many`]). Every launch of a norm takes its kernel from here, so
/// rows of one width and block size are summed in one order.
pub fn norm_kernels(width: usize, threads: usize) -> (RmsNorm, RmsNormQuantizeFp8) {
    if norm_holds_many(width, threads) {
        (rms_norm_many, rms_norm_quantize_fp8_many)
    } else {
        (rms_norm, rms_norm_quantize_fp8)
    }
}

#[cfg(test)]
mod tests {
    use super::{norm_holds_many, TokenTiles};

    #[test]
    fn only_rows_a_prefill_block_would_walk_take_the_many_norms() {
        assert!(norm_holds_many(7168, 256), "a prefill's 7,168-wide rows");
        assert!(!norm_holds_many(1536, 256), "q_a's rows are held by the plain kernel");
        assert!(!norm_holds_many(7168, 896), "a decode step's block holds its row");
        assert!(!norm_holds_many(7168, 1024));
    }

    #[test]
    fn token_rows_take_the_fewest_tiles_that_hold_them() {
        let tiles = TokenTiles([1, 2, 4, 8]);
        let picked: Vec<_> = [1, 8, 9, 16, 17, 32, 33, 64, 65, 512]
            .iter()
            .map(|&m| tiles.for_rows(m))
            .collect();
        assert_eq!(
            picked,
            [
                (1, 8),
                (1, 8),
                (2, 16),
                (2, 16),
                (4, 32),
                (4, 32),
                (8, 64),
                (8, 64),
                (8, 64),
                (8, 64)
            ]
        );
    }
}
