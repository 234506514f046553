// ---------------------------------------------------------------- small-batch GEMV
// y[r, n] (+)= sum_k x[r, k] * W[n, k] for up to GEMV_MAXM rows: `parts` warps per output column
// (each a 1/parts share of k, interleaved), 16-byte weight loads, the weight read once for all
// rows (decode is bound by weight bytes). k must be a multiple of 16 (FP8), 8 (BF16) or 4 (F32);
// the loader checks it.

template <int FMT>
__device__ __forceinline__ void gemv_column(float acc[GEMV_MAXM], const float* x, const int* x_rows, int ldx, int m,
                                            const void* w, const float* scale, u64 col, int k, int part = 0,
                                            int parts = 1) {
    int lane = threadIdx.x & 31;
    int scale_cols = (k + QBLOCK - 1) / QBLOCK;
    const int per = FMT == FMT_FP8 ? 16 : (FMT == FMT_BF16 ? 8 : 4);
#pragma unroll 4
    for (int c = (part * 32 + lane) * per; c < k; c += 32 * per * parts) {
        float wv[16];
        if (FMT == FMT_FP8) {
            uint4 p = *(const uint4*)((const u8*)w + col * k + c);
            float s = scale[(col / QBLOCK) * scale_cols + c / QBLOCK];
            u32 words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int b = 0; b < 4; ++b) wv[q * 4 + b] = e4m3_to_f32((words[q] >> (8 * b)) & 0xffu) * s;
        } else if (FMT == FMT_BF16) {
            uint4 p = *(const uint4*)((const bf16*)w + col * k + c);
            u32 words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                wv[2 * q] = bf16_to_f32(words[q] & 0xffffu);
                wv[2 * q + 1] = bf16_to_f32(words[q] >> 16);
            }
        } else {
            float4 p = *(const float4*)((const float*)w + col * k + c);
            wv[0] = p.x; wv[1] = p.y; wv[2] = p.z; wv[3] = p.w;
        }
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) {
            if (r < m) {
                const float* xr = x + (size_t)(x_rows ? x_rows[r] : r) * ldx + c;
                float a = 0.f;
#pragma unroll
                for (int q = 0; q < per; q += 4) {
                    float4 xv = *(const float4*)(xr + q);
                    a += xv.x * wv[q] + xv.y * wv[q + 1] + xv.z * wv[q + 2] + xv.w * wv[q + 3];
                }
                acc[r] += a;
            }
        }
    }
}

template <int FMT>
__device__ void gemv_impl(float* y, int ldy, const float* x, int ldx, int m, const void* w, const float* scale,
                          int n, int k, int accumulate, int parts) {
    // A block of 256 threads: 8 / parts columns, `parts` warps each. Every warp stays to the end,
    // since the parts of a column meet at the block's barrier.
    __shared__ float partial[8][GEMV_MAXM];
    const int warp = threadIdx.x >> 5, part = warp % parts;
    const u64 col = (u64)blockIdx.x * (8 / parts) + warp / parts;
    const bool live = col < (u64)n;
    for (int r0 = 0; r0 < m; r0 += GEMV_MAXM) {
        float acc[GEMV_MAXM];
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) acc[r] = 0.f;
        int mm = min(GEMV_MAXM, m - r0);
        if (live) gemv_column<FMT>(acc, x + (size_t)r0 * ldx, 0, ldx, mm, w, scale, col, k, part, parts);
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) acc[r] = warp_sum(acc[r]);
        if (parts > 1) {  // the parts' sums meet in shared memory, all rows at one barrier
            if ((threadIdx.x & 31) == 0)
#pragma unroll
                for (int r = 0; r < GEMV_MAXM; ++r) partial[warp][r] = acc[r];
            __syncthreads();
#pragma unroll
            for (int r = 0; r < GEMV_MAXM; ++r) {
                acc[r] = 0.f;
                for (int p = 0; p < parts; ++p) acc[r] += partial[warp - part + p][r];  // in part order
            }
            __syncthreads();
        }
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r)
            if (live && part == 0 && r < mm && (threadIdx.x & 31) == 0) {
                float* dst = y + (size_t)(r0 + r) * ldy + col;
                *dst = accumulate ? *dst + acc[r] : acc[r];
            }
    }
}

extern "C" __global__ void gemv_fp8(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                    const float* scale, int n, int k, int accumulate, int parts) {
    await_previous_kernel();
    gemv_impl<FMT_FP8>(y, ldy, x, ldx, m, w, scale, n, k, accumulate, parts);
}
extern "C" __global__ void gemv_bf16(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                     const float* scale, int n, int k, int accumulate, int parts) {
    await_previous_kernel();
    gemv_impl<FMT_BF16>(y, ldy, x, ldx, m, w, scale, n, k, accumulate, parts);
}
extern "C" __global__ void gemv_f32(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                    const float* scale, int n, int k, int accumulate, int parts) {
    await_previous_kernel();
    gemv_impl<FMT_F32>(y, ldy, x, ldx, m, w, scale, n, k, accumulate, parts);
}

// Routed experts: blockIdx.y = group g (one expert), slots offsets[g]..offsets[g+1] in permuted
// order; groups of more than max_rows slots are left to the caller (cuBLAS). Input row of slot s is x_rows[s] (token row, gate/up) or s (down).
// Output row of slot s is s. Expert e's weight starts at w + e * w_stride (and its scales likewise).
extern "C" __global__ void grouped_gemv_fp8(float* y, int ldy, const float* x, int ldx, const int* x_rows,
                                            const u8* w, const float* scale, u64 w_stride, u64 scale_stride,
                                            const int* group_expert, const int* offsets, int n, int k,
                                            int max_rows) {
    await_previous_kernel();
    int g = blockIdx.y;
    u64 col = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= (u64)n || offsets[g + 1] - offsets[g] > max_rows) return;
    int e = group_expert[g];
    const u8* we = w + (u64)e * w_stride;
    const float* se = scale + (u64)e * scale_stride;
    for (int s0 = offsets[g]; s0 < offsets[g + 1]; s0 += GEMV_MAXM) {
        int mm = min(GEMV_MAXM, offsets[g + 1] - s0);
        float acc[GEMV_MAXM];
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) acc[r] = 0.f;
        if (x_rows)
            gemv_column<FMT_FP8>(acc, x, x_rows + s0, ldx, mm, we, se, col, k);
        else
            gemv_column<FMT_FP8>(acc, x + (size_t)s0 * ldx, 0, ldx, mm, we, se, col, k);
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) {
            float v = warp_sum(acc[r]);
            if (r < mm && (threadIdx.x & 31) == 0) y[(size_t)(s0 + r) * ldy + col] = v;
        }
    }
}
