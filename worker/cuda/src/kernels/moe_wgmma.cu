// ---------------------------------------------------------------- routed experts on Hopper: FP8 wgmma
// out[s, n] = x[s, :] · W_e[n, :] for every slot s of every group (expert e = group_expert[g]), both
// operands e4m3 as stored: x quantised per row per 128 channels (quantize_rows_fp8, scales in its
// per-group layout), W with the checkpoint's 128x128 block scales. DeepSeek-V3's own recipe for
// FP8 products: the tensor cores sum one 128-wide k block, and that sum is added to an f32
// accumulator times the token's and the weight block's scales ("promotion"), so the tensor cores'
// narrow accumulator never carries a sum across k blocks.
//
// One block per (128 weight rows, one tile of a group's slots), the tiles listed by expert_tiles.
// Warpgroup 0 feeds: for each k block, one thread starts the TMA copies of the weight tile
// (128 rows x 128 bytes) and of the token tile (N rows x 128 bytes) into a free stage, and its 128
// threads write the stage's N combined scales (token scale x weight block scale, loaded a block
// ahead); the stage's full barrier completes when both are in. Warpgroups 1 and 2 each multiply 64 weight rows by the N
// tokens — weights as wgmma's M operand and tokens as N, so a group's last tile takes only its
// remainder rounded up to 16, 32 or 64 — promote, and free the stage on its empty barrier. Both
// tiles are in the 128-byte swizzled layout TMA writes and wgmma reads (128-byte rows, 8-row atoms
// of 1024 bytes). Compiled for sm_90a only.

#define GX_W_BYTES (GX_ROWS * 128)
#define GX_STAGE_BYTES (GX_W_BYTES + GX_TOKENS * 128)
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


// Warpgroup `wg` (0 or 1) of the multiplying pair: weight rows wg * 64 .. + 64 of the tile by its N
// token columns, over every k block; writes out[first + column, row] for the tile's `count` slots.
template <int N>
__device__ __forceinline__ void gx_multiply(float* out, int ldy, u32 stages, const float* scales, u32 full, u32 empty,
                                            int kblocks, int row0, int first, int count) {
    const int tid = threadIdx.x - 128, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2,
              t = lane & 3;
    float acc[N / 2], part[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
    for (int kb = 0; kb < kblocks; ++kb) {
        const int s = kb % GX_STAGES;
        mbar_wait(full + 8 * s, (kb / GX_STAGES) & 1);
        const u32 w_tile = stages + s * GX_STAGE_BYTES + wg * 64 * 128, x_tile = stages + s * GX_STAGE_BYTES + GX_W_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_fp8<N>(part, smem_desc(w_tile + kk * 32, 0, 1024, 1), smem_desc(x_tile + kk * 32, 0, 1024, 1), kk);
        wgmma_commit();
        wgmma_wait_all();
        const float* sc = scales + s * GX_TOKENS;
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
            hold(part[4 * j]);
            hold(part[4 * j + 1]);
            hold(part[4 * j + 2]);
            hold(part[4 * j + 3]);
            float2 c = *(const float2*)(sc + 8 * j + 2 * t);
            acc[4 * j] += part[4 * j] * c.x;
            acc[4 * j + 1] += part[4 * j + 1] * c.y;
            acc[4 * j + 2] += part[4 * j + 2] * c.x;
            acc[4 * j + 3] += part[4 * j + 3] * c.y;
        }
        mbar_arrive(empty + 8 * s);
    }
    const int r = row0 + wg * 64 + warp * 16 + g;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        const int c = 8 * j + 2 * t;
        if (c < count) {
            float* o = out + (size_t)(first + c) * ldy + r;
            o[0] = acc[4 * j];
            o[8] = acc[4 * j + 2];
        }
        if (c + 1 < count) {
            float* o = out + (size_t)(first + c + 1) * ldy + r;
            o[0] = acc[4 * j + 1];
            o[8] = acc[4 * j + 3];
        }
    }
}
#endif

// x_map: the quantised slots, [slots][k] bytes, boxes of GX_BOX rows x 128; w_map: the bank's
// weights, [experts * rows][k] bytes, boxes of GX_ROWS x 128; w_scales [experts][rows/128][k/128]
// (w_scale_stride floats per expert); tiles: (group, first slot, slots) per tile, group -1 past the
// last. rows and k multiples of 128.
extern "C" __global__ void __launch_bounds__(GX_THREADS, 1)
grouped_fp8_wgmma(float* out, int ldy, const __grid_constant__ TensorMap x_map, const float* x_scales,
                  const __grid_constant__ TensorMap w_map, const float* w_scales, u64 w_scale_stride, const int* tiles,
                  const int* group_expert, const int* offsets, int rows, int k) {
    await_previous_kernel();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const int* tile = tiles + 3 * blockIdx.y;
    const int grp = tile[0];
    if (grp < 0) return;
    const int first = tile[1], count = tile[2];
    const int n = count <= 16 ? 16 : count <= 32 ? 32 : count <= 64 ? 64 : 128;
    const int e = group_expert[grp], g_first = offsets[grp], g_rows = offsets[grp + 1] - g_first;
    const int rb = blockIdx.x, kblocks = k / 128, tid = threadIdx.x;
    const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 stages = (raw + 1023) & ~1023u;  // 1024-byte aligned: the swizzle atoms
    float* scales = (float*)(smem_raw + (stages - raw) + GX_STAGES * GX_STAGE_BYTES);
    const u32 full = stages + GX_STAGES * GX_STAGE_BYTES + GX_STAGES * GX_TOKENS * 4, empty = full + 8 * GX_STAGES;
    if (tid == 0) {
        for (int s = 0; s < GX_STAGES; ++s) {
            mbar_init(full + 8 * s, 128);
            mbar_init(empty + 8 * s, 256);
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (tid < 128) {
        const float* ws = w_scales + (size_t)e * w_scale_stride + (size_t)rb * kblocks;
        const float* xs = x_scales + (size_t)g_first * kblocks + (first - g_first);  // [kb][g_rows]
        // This thread's token's combined scale, loaded a k block ahead so the load's latency
        // passes while the stage is still in use.
        auto scale_at = [&](int kb) { return tid < count ? xs[(size_t)kb * g_rows + tid] * ws[kb] : 0.f; };
        float scale = scale_at(0);
        for (int kb = 0; kb < kblocks; ++kb) {
            const int s = kb % GX_STAGES;
            const u32 bar = full + 8 * s;
            mbar_wait(empty + 8 * s, ((kb / GX_STAGES) & 1) ^ 1);
            if (tid == 0) {  // the copies first: they take longest
                const u32 w_dst = stages + s * GX_STAGE_BYTES;
                mbar_expect(bar, GX_W_BYTES + n * 128);
                tma_load_2d(w_dst, &w_map, kb * 128, e * rows + rb * GX_ROWS, bar);
                for (int i = 0; i < n / GX_BOX; ++i)
                    tma_load_2d(w_dst + GX_W_BYTES + i * GX_BOX * 128, &x_map, kb * 128, first + i * GX_BOX, bar);
            }
            scales[s * GX_TOKENS + tid] = scale;
            if (kb + 1 < kblocks) scale = scale_at(kb + 1);
            mbar_arrive(bar);
        }
        return;
    }
    switch (n) {
    case 16: gx_multiply<16>(out, ldy, stages, scales, full, empty, kblocks, rb * GX_ROWS, first, count); break;
    case 32: gx_multiply<32>(out, ldy, stages, scales, full, empty, kblocks, rb * GX_ROWS, first, count); break;
    case 64: gx_multiply<64>(out, ldy, stages, scales, full, empty, kblocks, rb * GX_ROWS, first, count); break;
    default: gx_multiply<128>(out, ldy, stages, scales, full, empty, kblocks, rb * GX_ROWS, first, count); break;
    }
#endif
}
