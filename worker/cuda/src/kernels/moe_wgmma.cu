// ---------------------------------------------------------------- routed experts on Hopper: FP8 wgmma
// out[s, n] = x[s, :] · W_e[n, :] for every slot s of every group (expert e = group_expert[g]), both
// operands e4m3 as stored: x quantised per row per 128 channels (quantize_rows_fp8, scales in its
// per-group layout), W with the checkpoint's 128x128 block scales. DeepSeek-V3's own recipe for
// FP8 products: the tensor cores sum one 128-wide k block, and that sum is added to an f32
// accumulator times the token's and the weight block's scales ("promotion"), so the tensor cores'
// narrow accumulator never carries a sum across k blocks.
//
// One block per (128 weight rows, one tile of a group's slots), the tiles listed by expert_tiles.
// A tile takes up to GX_TOKENS (192) slots, so that a group of the ~128 slots a 4,096-token prefill
// gives each expert is one tile: each block streams its 128 weight rows over every k block, and
// a second, small tile of the same group would stream them again for a few tokens.
// Warpgroup 0 feeds: for each k block, one thread starts the TMA copies of the weight tile
// (128 rows x 128 bytes) and of the token tile (N rows x 128 bytes) into a free stage, and its 128
// threads copy the stage's N token scales and its weight block's scale by cp.async; the stage's
// full barrier completes when the copies and the scales are in. Its registers go to the other two
// (setmaxnreg), which each multiply 64 weight rows by the N tokens — weights as wgmma's M operand
// and tokens as N, the tile's count rounded up to one of the widths below, up to 192 (96 partial
// sums and 96 accumulators a thread) — promote, and free the stage on its empty barrier. Both
// tiles are in the 128-byte swizzled layout TMA writes and wgmma reads (128-byte rows, 8-row atoms
// of 1024 bytes). Compiled for sm_90a only.

#define GX_W_BYTES (GX_ROWS * 128)
// Parts switched off to time the rest (DSV3_EXPERT_PROBE; the names and what each does:
// probes.rs, EXPERT). All 0 in service.
#ifndef GX_PROBE_WEIGHT_TILES
#define GX_PROBE_WEIGHT_TILES 0
#endif
#ifndef GX_PROBE_TOKEN_TILES
#define GX_PROBE_TOKEN_TILES 0
#endif
#ifndef GX_PROBE_TOKEN_SCALES
#define GX_PROBE_TOKEN_SCALES 0
#endif
#ifndef GX_PROBE_PROMOTION
#define GX_PROBE_PROMOTION 0
#endif

// A block's stages, laid out for its tile's width n: as many as GX_SHARED holds, up to
// GX_MAX_STAGES. Stage s: the weight tile, then the token tile; after the stages, each stage's n
// token scales, then each stage's weight block scale (16 bytes apart), then each stage's full and
// empty barrier. The stage and its barriers' phase advance a step at a time rather than by
// dividing the k block by a count known only at run time: the divisions made a decode step of the
// MoE layer ~6% slower.
struct GxStages {
    u32 base, bytes, full, empty;  // shared addresses; bytes of one stage
    u32 token_scales, weight_scales;  // shared addresses: each stage's n token scales; its weight block's
    const float* scales;               // the token scales, for reading
    const float* weight_scale;         // the weight blocks' scales, for reading
    unsigned char* staging;            // the stages, for the sums on their way out (gx_write_out)
    int count;
    __device__ GxStages(unsigned char* raw, int n) {
        const u32 at = (u32)__cvta_generic_to_shared(raw);
        base = (at + 1023) & ~1023u;  // the swizzle atoms
        staging = raw + (base - at);
        bytes = GX_W_BYTES + n * 128;
        count = min(GX_MAX_STAGES, (int)((GX_SHARED - 1024) / (bytes + n * 4 + 32)));
        token_scales = base + count * bytes;
        scales = (const float*)(raw + (token_scales - at));
        weight_scales = token_scales + count * n * 4;
        weight_scale = (const float*)(raw + (weight_scales - at));
        full = weight_scales + count * 16;
        empty = full + 8 * count;
    }
    // The stage after s; the barriers' phase flips each time the stages wrap around.
    __device__ int next(int s, int& phase) const {
        if (++s < count) return s;
        phase ^= 1;
        return 0;
    }
    __device__ u32 weights(int s) const { return base + s * bytes; }
    __device__ u32 tokens(int s) const { return base + s * bytes + GX_W_BYTES; }
};
#define GX_BOX 16  // token rows per TMA copy

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d[64, N] (+)= A[64, 32] · B[N, 32]ᵀ, e4m3 operands K-major in shared memory (128-byte swizzle).
template <int N>
__device__ __forceinline__ void wgmma_fp8(float* d, u64 da, u64 db, int accumulate);

template <> __device__ __forceinline__ void wgmma_fp8<16>(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(da), "l"(db), "r"(accumulate));
}

template <> __device__ __forceinline__ void wgmma_fp8<32>(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(accumulate));
}

template <> __device__ __forceinline__ void wgmma_fp8<64>(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate));
}

template <> __device__ __forceinline__ void wgmma_fp8<128>(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}


// d[64, N] (+)= A[64, 32] · B[N, 32]ᵀ for any N in steps of 16 up to 256: the widest instructions
// first, each on the next token rows of B (a token row is 128 bytes of the swizzled tile). The
// accumulators of consecutive instructions lie as one instruction of their total width would lay them.
template <int N>
__device__ __forceinline__ void wgmma_fp8_wide(float* d, u64 da, u32 b, int accumulate) {
    constexpr int HEAD = N >= 128 ? 128 : N >= 64 ? 64 : N >= 32 ? 32 : 16;
    wgmma_fp8<HEAD>(d, da, smem_desc(b, 0, 1024, 1), accumulate);
    if constexpr (N > HEAD) wgmma_fp8_wide<N - HEAD>(d + HEAD / 2, da, b + HEAD * 128, accumulate);
}

// A multiplying warpgroup's sums (acc: rows rr and rr + 8 of its 64 by slots 8j + 2t, + 1) to
// out[first + slot, col0 + row] for the tile's `count` slots, through `stage` ([N][LD] values a
// slot's 64 rows padded to LD, so that the quads' slots fall in different banks), in 16-byte
// stores (T: float, or bf16 rounded to nearest even). wtid: the thread's place
// in its warpgroup, whose 128 threads alone sync on named barrier 2 + wg.
template <int N, typename T, int LD>
__device__ __forceinline__ void gx_write_out(const float* acc, T* stage, T* out, int ldy, int first, int count, int col0,
                                             int rr, int t, int wg, int wtid) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        const int c = 8 * j + 2 * t;
        T* a = stage + c * LD + rr;
        if constexpr (sizeof(T) == 2) {
            a[0] = f32_to_bf16(acc[4 * j]);
            a[8] = f32_to_bf16(acc[4 * j + 2]);
            a[LD] = f32_to_bf16(acc[4 * j + 1]);
            a[LD + 8] = f32_to_bf16(acc[4 * j + 3]);
        } else {
            a[0] = acc[4 * j];
            a[8] = acc[4 * j + 2];
            a[LD] = acc[4 * j + 1];
            a[LD + 8] = acc[4 * j + 3];
        }
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
    constexpr int PER_ROW = 64 * (int)sizeof(T) / 16;  // 16-byte pieces of a slot's 64 values
    for (int i = wtid; i < count * PER_ROW; i += 128) {
        const int c = i / PER_ROW, piece = i % PER_ROW;
        *(uint4*)(out + (size_t)(first + c) * ldy + col0 + piece * (16 / sizeof(T))) =
            *(const uint4*)(stage + c * LD + piece * (16 / sizeof(T)));
    }
}

// Warpgroup `wg` (0 or 1) of the multiplying pair: weight rows wg * 64 .. + 64 of the tile by its N
// token columns, over every k block; writes out[first + column, row] for the tile's `count` slots.
template <int N>
__device__ __forceinline__ void gx_multiply(void* out, int out_bf16, int ldy, const GxStages& st, int kblocks, int row0,
                                            int first, int count) {
    const int tid = threadIdx.x - 128, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2,
              t = lane & 3;
    float acc[N / 2], part[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
    for (int kb = 0, s = 0, phase = 0; kb < kblocks; ++kb, s = st.next(s, phase)) {
        mbar_wait(st.full + 8 * s, phase);
        const u32 w_tile = st.weights(s) + wg * 64 * 128, x_tile = st.tokens(s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_fp8_wide<N>(part, smem_desc(w_tile + kk * 32, 0, 1024, 1), x_tile + kk * 32, kk);
        wgmma_commit();
        wgmma_wait_all();
        const float* sc = st.scales + s * N;
        const float wsc = st.weight_scale[4 * s];
        if (GX_PROBE_PROMOTION) {  // no promotion: the last k block's sums kept, unscaled, so that
                                   // ptxas keeps the products (it drops a wgmma whose sums go unread)
            if (kb + 1 == kblocks) {
#pragma unroll
                for (int i = 0; i < N / 2; ++i) {
                    hold(part[i]);
                    acc[i] = part[i];
                }
            }
        } else if (GX_PROBE_TOKEN_SCALES) {  // the weight block's scale only
#pragma unroll
            for (int i = 0; i < N / 2; ++i) {
                hold(part[i]);
                acc[i] += part[i] * wsc;
            }
        } else {
#pragma unroll
            for (int j = 0; j < N / 8; ++j) {
                hold(part[4 * j]);
                hold(part[4 * j + 1]);
                hold(part[4 * j + 2]);
                hold(part[4 * j + 3]);
                float2 c = *(const float2*)(sc + 8 * j + 2 * t);
                c.x *= wsc;
                c.y *= wsc;
                acc[4 * j] += part[4 * j] * c.x;
                acc[4 * j + 1] += part[4 * j + 1] * c.y;
                acc[4 * j + 2] += part[4 * j + 2] * c.x;
                acc[4 * j + 3] += part[4 * j + 3] * c.y;
            }
        }
        mbar_arrive(st.empty + 8 * s);
    }
    // The sums leave through shared memory, so that each slot's 64 values of this warpgroup go out
    // as one row of 16-byte stores rather than 2- or 4-byte ones, 8 rows apart. The stages are
    // free once both multiplying warpgroups are out of the loop (every copy was consumed).
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    const int rr = warp * 16 + g, wtid = tid & 127;
    if (out_bf16) {
        gx_write_out<N, bf16, 72>(acc, (bf16*)st.staging + wg * N * 72, (bf16*)out, ldy, first, count, row0 + wg * 64, rr, t, wg, wtid);
    } else {
        gx_write_out<N, float, 68>(acc, (float*)st.staging + wg * N * 68, (float*)out, ldy, first, count, row0 + wg * 64, rr, t, wg, wtid);
    }
}
#endif

// out: f32, or bf16 where out_bf16 (row stride ldy values); x_map: the quantised slots, [slots][k]
// bytes, boxes of GX_BOX rows x 128; w_map: the bank's weights, [experts * rows][k] bytes, boxes of
// GX_ROWS x 128; w_scales [experts][rows/128][k/128] (w_scale_stride floats per expert); tiles:
// (group, first slot, slots) per tile, group -1 past the last. rows and k multiples of 128.
extern "C" __global__ void __launch_bounds__(GX_THREADS, 1)
grouped_fp8_wgmma(void* out, int out_bf16, int ldy, const __grid_constant__ TensorMap x_map, const float* x_scales,
                  const __grid_constant__ TensorMap w_map, const float* w_scales, u64 w_scale_stride, const int* tiles,
                  const int* group_expert, const int* offsets, int rows, int k) {
    await_previous_kernel();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const int* tile = tiles + 3 * blockIdx.y;
    const int grp = tile[0];
    if (grp < 0) return;
    const int first = tile[1], count = tile[2];
    // The token columns multiplied: the count rounded up to one of the kernel's widths.
    const int n = count <= 16 ? 16 : count <= 32 ? 32 : count <= 64 ? 64 : count <= 96 ? 96 : count <= 128 ? 128
                : count <= 144 ? 144 : count <= 160 ? 160 : 192;
    const int e = group_expert[grp], g_first = offsets[grp], g_rows = offsets[grp + 1] - g_first;
    const int rb = blockIdx.x, kblocks = k / 128, tid = threadIdx.x;
    const GxStages st(smem_raw, n);
    const bool wide = n > 128;  // more partial sums and accumulators than 168 registers hold
    if (tid == 0) {
        for (int s = 0; s < st.count; ++s) {
            mbar_init(st.full + 8 * s, 128);
            mbar_init(st.empty + 8 * s, 256);
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (tid < 128) {  // the feeding warpgroup: its registers go to the multiplying ones
        if (wide) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        const float* ws = w_scales + (size_t)e * w_scale_stride + (size_t)rb * kblocks;
        const float* xs = x_scales + (size_t)g_first * kblocks + (first - g_first);  // [kb][g_rows]
        // The scales travel by cp.async and each thread's arrival waits for its copies, so no
        // thread waits for a load: waiting for each k block's scales before the next (a load's
        // latency a k block) paced the whole product.
        const int c0 = tid, c1 = tid + 128;
        for (int kb = 0, s = 0, phase = 0; kb < kblocks; ++kb, s = st.next(s, phase)) {
            const u32 bar = st.full + 8 * s;
            mbar_wait(st.empty + 8 * s, phase ^ 1);
            if (tid == 0) {  // the copies first: they take longest
                const bool weights = !GX_PROBE_WEIGHT_TILES || kb < st.count, tokens = !GX_PROBE_TOKEN_TILES || kb < st.count;
                mbar_expect(bar, (weights ? GX_W_BYTES : 0) + (tokens ? n * 128 : 0));
                if (weights) tma_load_2d(st.weights(s), &w_map, kb * 128, e * rows + rb * GX_ROWS, bar);
                for (int i = 0; tokens && i < n / GX_BOX; ++i)
                    tma_load_2d(st.tokens(s) + i * GX_BOX * 128, &x_map, kb * 128, first + i * GX_BOX, bar);
            }
            const float* row = xs + (size_t)kb * g_rows;
            const u32 sc = st.token_scales + 4 * s * n;
            // Columns past the tile's slots get zeros (their sums are never stored).
            if (c0 < n) cp_async_4(sc + 4 * c0, row + min(c0, count - 1), c0 < count ? 4 : 0);
            if (c1 < n) cp_async_4(sc + 4 * c1, row + min(c1, count - 1), c1 < count ? 4 : 0);
            if (tid == 0) cp_async_4(st.weight_scales + 16 * s, ws + kb, 4);
            cp_async_arrive(bar);
        }
        return;
    }
    const int row0 = rb * GX_ROWS;
    if (wide) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        switch (n) {
        case 144: gx_multiply<144>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
        case 160: gx_multiply<160>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
        default: gx_multiply<192>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
        }
        return;
    }
    switch (n) {
    case 16: gx_multiply<16>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
    case 32: gx_multiply<32>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
    case 64: gx_multiply<64>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
    case 96: gx_multiply<96>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
    default: gx_multiply<128>(out, out_bf16, ldy, st, kblocks, row0, first, count); break;
    }
#endif
}
