// dsv3 CUDA kernels, compiled at run time by NVRTC (no headers: NVRTC ships none by default).
// Conventions: activations f32 row-major; bf16 stored as unsigned short; FP8 e4m3 weights as
// bytes with one f32 scale per 128x128 tile (`weight_scale_inv`, spec §8.5).

typedef unsigned char u8;
typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FMT_F32 0
#define FMT_BF16 1
#define FMT_FP8 2
#define GEMV_MAXM 8
#define QBLOCK 128
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(u32 v) { return __uint_as_float(v << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    u32 rounding = ((u >> 16) & 1u) + 0x7fffu;  // round to nearest even
    return (bf16)((u + rounding) >> 16);
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// e4m3 -> f32 without a table: the 7 magnitude bits placed at the top of an f32 mantissa give
// 2^(e-127)(1+m/8) for normals and the right denormal for e == 0; 2^120 restores the bias of 7.
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    float f = __uint_as_float((b & 0x7fu) << 20) * __uint_as_float(0x7B800000u);
    return (b & 0x80u) ? -f : f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// Maximum over the block, as block_sum.
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// ---------------------------------------------------------------- elementwise and norms

// out[r, :width] = in[r, :width] * rsqrt(mean(in^2) + eps) * w; rows strided by ld_in / ld_out.
extern "C" __global__ void rms_norm(float* out, int ld_out, const float* in, int ld_in, const float* w, int width,
                                    float eps) {
    __shared__ float scratch[32];
    const float* x = in + (size_t)blockIdx.x * ld_in;
    float* y = out + (size_t)blockIdx.x * ld_out;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) y[i] = x[i] * inv * w[i];
}

// act[r, j] = silu(gu[r, j]) * gu[r, inter + j]
extern "C" __global__ void swiglu(float* act, const float* gu, int rows, int inter) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * inter) return;
    int r = (int)(i / inter), j = (int)(i % inter);
    float g = gu[(size_t)r * 2 * inter + j], u = gu[(size_t)r * 2 * inter + inter + j];
    act[i] = g / (1.f + expf(-g)) * u;
}

// y[i] += x[i]: partial sums that came back from remote expert shards, added into the residual.
extern "C" __global__ void add_f32(float* y, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// Global expert ids to indices of the bank this GPU holds (-1: another rank runs that expert).
extern "C" __global__ void bank_expert_ids(int* out, const int* ids, const int* bank_of, int n_experts, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int e = ids[i];
    out[i] = (e >= 0 && e < n_experts) ? bank_of[e] : -1;
}

// Rotates interleaved pairs of `dim` values at `offset` inside each of `heads` vectors of each
// row (row stride ld, head stride hs). cos/sin are [rows, dim/2] and already carry YaRN's factor.
extern "C" __global__ void rope_interleaved(float* x, int ld, int heads, int hs, int offset, int dim,
                                            const float* cos_t, const float* sin_t) {
    int r = blockIdx.x, half = dim / 2;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float* p = x + (size_t)r * ld + (size_t)h * hs + offset + 2 * j;
        float c = cos_t[r * half + j], s = sin_t[r * half + j];
        float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
    }
}

extern "C" __global__ void f32_to_bf16_rows(bf16* out, const float* in, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(in[i]);
}

// ---------------------------------------------------------------- weights

__device__ __forceinline__ float weight_at(int fmt, const void* w, const float* scale, int scale_cols, u64 r, u64 c,
                                           int k) {
    if (fmt == FMT_FP8) {
        u32 b = ((const u8*)w)[r * k + c];
        return e4m3_to_f32(b) * scale[(r / QBLOCK) * scale_cols + c / QBLOCK];
    }
    if (fmt == FMT_BF16) return bf16_to_f32(((const bf16*)w)[r * k + c]);
    return ((const float*)w)[r * k + c];
}

extern "C" __global__ void embed_rows(float* out, int fmt, const void* table, const float* scale, const u32* ids,
                                      int width) {
    float* dst = out + (size_t)blockIdx.x * width;
    int scale_cols = (width + QBLOCK - 1) / QBLOCK;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        dst[i] = weight_at(fmt, table, scale, scale_cols, ids[blockIdx.x], i, width);
}

// Dequantises rows [r0, r0+n) of a weight into bf16 for the tensor-core GEMM path.
extern "C" __global__ void dequant_bf16(bf16* out, int fmt, const void* w, const float* scale, int r0, int n, int k) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * k) return;
    u64 r = r0 + i / k, c = i % k;
    int scale_cols = (k + QBLOCK - 1) / QBLOCK;
    out[i] = f32_to_bf16(weight_at(fmt, w, scale, scale_cols, r, c, k));
}

// FP8 -> bf16 with the block scales, 16 elements per thread (k % 16 == 0, n * k < 2^32).
extern "C" __global__ void dequant_fp8_bf16(bf16* out, const u8* w, const float* scale, int n, int k) {
    u32 i = (blockIdx.x * blockDim.x + threadIdx.x) * 16u;
    if (i >= (u32)n * (u32)k) return;
    u32 r = i / (u32)k, c = i % (u32)k;
    float s = scale[(r / QBLOCK) * ((k + QBLOCK - 1) / QBLOCK) + c / QBLOCK];
    uint4 p = *(const uint4*)(w + i);
    u32 words[4] = {p.x, p.y, p.z, p.w};
    u32 o[8];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        u32 v = words[q];
        o[2 * q] = pack_bf16(e4m3_to_f32(v & 0xffu) * s, e4m3_to_f32((v >> 8) & 0xffu) * s);
        o[2 * q + 1] = pack_bf16(e4m3_to_f32((v >> 16) & 0xffu) * s, e4m3_to_f32(v >> 24) * s);
    }
    uint4* dst = (uint4*)(out + i);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
}

// Deterministic random weights (for full-width benchmarks): a hash per element.
__device__ __forceinline__ u32 hash_u32(u64 x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (u32)x;
}

// e4m3 bytes with magnitudes in [2^-4, 2^3): random sign, exponent field 3..9, mantissa.
extern "C" __global__ void random_fp8(u8* w, u64 n, u64 seed) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    u32 exp = 3 + (h >> 8) % 7, mant = h & 7, sign = (h >> 16) & 1;
    w[i] = (u8)((sign << 7) | (exp << 3) | mant);
}

// Uniform values in [lo, hi).
extern "C" __global__ void random_f32(float* w, u64 n, u64 seed, float lo, float hi) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    w[i] = lo + (hi - lo) * ((h >> 8) * (1.f / 16777216.f));
}

extern "C" __global__ void random_bf16(bf16* w, u64 n, u64 seed, float lo, float hi) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    w[i] = f32_to_bf16(lo + (hi - lo) * ((h >> 8) * (1.f / 16777216.f)));
}

// ---------------------------------------------------------------- small-batch GEMV
// y[r, n] (+)= sum_k x[r, k] * W[n, k] for up to GEMV_MAXM rows: one warp per output column,
// 16-byte weight loads, the weight read once for all rows (decode is bound by weight bytes).
// k must be a multiple of 16 (FP8), 8 (BF16) or 4 (F32); the loader checks it.

template <int FMT>
__device__ __forceinline__ void gemv_column(float acc[GEMV_MAXM], const float* x, const int* x_rows, int ldx, int m,
                                            const void* w, const float* scale, u64 col, int k) {
    int lane = threadIdx.x & 31;
    int scale_cols = (k + QBLOCK - 1) / QBLOCK;
    const int per = FMT == FMT_FP8 ? 16 : (FMT == FMT_BF16 ? 8 : 4);
#pragma unroll 4
    for (int c = lane * per; c < k; c += 32 * per) {
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
                          int n, int k, int accumulate) {
    u64 col = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= (u64)n) return;
    for (int r0 = 0; r0 < m; r0 += GEMV_MAXM) {
        float acc[GEMV_MAXM];
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) acc[r] = 0.f;
        int mm = min(GEMV_MAXM, m - r0);
        gemv_column<FMT>(acc, x + (size_t)r0 * ldx, 0, ldx, mm, w, scale, col, k);
#pragma unroll
        for (int r = 0; r < GEMV_MAXM; ++r) {
            float v = warp_sum(acc[r]);
            if (r < mm && (threadIdx.x & 31) == 0) {
                float* dst = y + (size_t)(r0 + r) * ldy + col;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
}

extern "C" __global__ void gemv_fp8(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                    const float* scale, int n, int k, int accumulate) {
    gemv_impl<FMT_FP8>(y, ldy, x, ldx, m, w, scale, n, k, accumulate);
}
extern "C" __global__ void gemv_bf16(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                     const float* scale, int n, int k, int accumulate) {
    gemv_impl<FMT_BF16>(y, ldy, x, ldx, m, w, scale, n, k, accumulate);
}
extern "C" __global__ void gemv_f32(float* y, int ldy, const float* x, int ldx, int m, const void* w,
                                    const float* scale, int n, int k, int accumulate) {
    gemv_impl<FMT_F32>(y, ldy, x, ldx, m, w, scale, n, k, accumulate);
}

// Routed experts: blockIdx.y = group g (one expert), slots offsets[g]..offsets[g+1] in permuted
// order; groups of more than max_rows slots are left to the caller (cuBLAS). Input row of slot s is x_rows[s] (token row, gate/up) or s (down).
// Output row of slot s is s. Expert e's weight starts at w + e * w_stride (and its scales likewise).
extern "C" __global__ void grouped_gemv_fp8(float* y, int ldy, const float* x, int ldx, const int* x_rows,
                                            const u8* w, const float* scale, u64 w_stride, u64 scale_stride,
                                            const int* group_expert, const int* offsets, int n, int k,
                                            int max_rows) {
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

// Gathers token rows into slot order as bf16 (input of the per-expert tensor-core GEMM).
extern "C" __global__ void gather_rows_bf16(bf16* out, const float* x, int ldx, const int* rows, int width) {
    const float* src = x + (size_t)rows[blockIdx.x] * ldx;
    bf16* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = f32_to_bf16(src[i]);
}

// f32 -> e4m3 (round to nearest even, saturating at ±448; NaN saturates too).
__device__ __forceinline__ u32 f32_to_e4m3(float v) {
    u32 sign = (__float_as_uint(v) >> 24) & 0x80u;
    float a = fminf(fabsf(v), 448.0f);
    if (a < 0.015625f) return sign | (u32)__float2int_rn(a * 512.0f);  // subnormal steps of 2^-9
    int e;
    float f = frexpf(a, &e);  // a = f * 2^e, f in [0.5, 1)
    u32 m = (u32)__float2int_rn((f * 2.0f - 1.0f) * 8.0f);
    int field = e + 6;
    if (m == 8) {
        m = 0;
        field += 1;
    }
    return sign | ((u32)field << 3) | m;
}

// Rows as e4m3 with one f32 scale per row per 128 columns (amax / 448), the activation operand
// of cuBLASLt's block-scaled FP8 products. Output row r is row rows[r] of x (rows null: row r).
// Scales are laid out per group of output rows, as each product reads them: the rows
// offsets[g]..offsets[g+1] keep [k/128][group rows] from offsets[g] * k/128 (offsets null: one
// group of all n rows). One warp per (row, 128 columns); k a multiple of 128, ldx of 4.
extern "C" __global__ void quantize_rows_fp8(u8* out, float* scales, const float* x, int ldx, const int* rows, int n,
                                             int k, const int* offsets, int groups) {
    int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    int blocks = k / QBLOCK;
    if (warp >= n * blocks) return;
    int r = warp / blocks, kb = warp % blocks;
    int src = rows ? rows[r] : r;
    float4 v = *(const float4*)(x + (size_t)src * ldx + kb * QBLOCK + lane * 4);
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float scale = amax > 0.f ? amax / 448.0f : 1.0f;
    float inv = amax > 0.f ? 448.0f / amax : 1.0f;
    u32 word = f32_to_e4m3(v.x * inv) | (f32_to_e4m3(v.y * inv) << 8) | (f32_to_e4m3(v.z * inv) << 16) |
               (f32_to_e4m3(v.w * inv) << 24);
    *(u32*)(out + (size_t)r * k + kb * QBLOCK + lane * 4) = word;
    if (lane == 0) {
        int first = 0, count = n;
        if (offsets) {
            if (r >= offsets[groups]) return;  // past every group: no scale to keep
            // The last group starting at or before r (empty groups share their start with the next).
            int lo = 0, hi = groups - 1;
            while (lo < hi) {
                int mid = (lo + hi + 1) >> 1;
                if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
            }
            first = offsets[lo];
            count = offsets[lo + 1] - first;
        }
        scales[(size_t)first * blocks + (size_t)kb * count + (r - first)] = scale;
    }
}

// out[t, :] += sum_j weight[t, j] * y[slot[t, j], :] over the top-k slots of token t (-1 = skipped).
extern "C" __global__ void combine_experts(float* out, const float* y, const int* slot, const float* weight, int top_k,
                                           int width) {
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) {
            int s = slot[t * top_k + j];
            if (s >= 0) acc += weight[t * top_k + j] * y[(size_t)s * width + i];
        }
        out[(size_t)t * width + i] += acc;
    }
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); `total` gets
// the block's sum. scratch: 32 ints.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < warps; ++w) {
        if (w < warp) before += scratch[w];
        sum += scratch[w];
    }
    *total = sum;
    return before + incl - v;
}

// Groups the routed (token, choice) pairs of the first *valid rows by expert on the GPU, so a
// decode step needs no host round trip (and can be a CUDA graph). Active experts become groups in
// index order: group g owns slots offsets[g]..offsets[g+1] of expert group_expert[g]; groups past
// the last active one are empty (offsets = total, up to offsets[groups]). Slots keep token order
// inside a group. x_rows[s] = token row of slot s; slot_of[t*k+j] = slot of choice j of token t,
// -1 for padding rows. counts[e] += tokens routed to e (serving metrics); *touched += active
// experts. Each group's slots are rounded up to a multiple of `align` (cuBLASLt's block-scaled
// products read a group's per-row scales in rows of 4); the extra slots, like every slot no pair
// took up to `capacity`, gather row 0. One block of 1024 threads; n_experts <= 1024.
extern "C" __global__ void __launch_bounds__(1024)
moe_plan(int* group_expert, int* offsets, int* x_rows, int* slot_of, unsigned* counts, unsigned* touched,
         const int* chosen, const int* valid, int m, int top_k, int n_experts, int groups, int align,
         int capacity) {
    __shared__ int cnt[1024];
    __shared__ int next[1024];  // next free slot of each expert
    __shared__ int scratch[32];
    int tid = threadIdx.x;
    const int rows = min(*valid, m), pairs = rows * top_k;
    for (int e = tid; e < n_experts; e += blockDim.x) cnt[e] = 0;
    for (int i = pairs + tid; i < m * top_k; i += blockDim.x) slot_of[i] = -1;
    __syncthreads();
    for (int i = tid; i < pairs; i += blockDim.x) {
        int e = chosen[i];
        if (e >= 0 && e < n_experts) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    int c = tid < n_experts ? cnt[tid] : 0;
    int slots, active;
    int first = block_exclusive_scan((c + align - 1) / align * align, scratch, &slots);
    int group = block_exclusive_scan(c > 0, scratch, &active);
    if (c > 0) {
        group_expert[group] = tid;
        offsets[group] = first;
        next[tid] = first;
        atomicAdd(&counts[tid], (unsigned)c);
    }
    for (int g = active + tid; g <= groups; g += blockDim.x) offsets[g] = slots;
    // Slots no pair takes (pairs routed to another shard, padding rows, rounding) gather row 0:
    // every slot's row is read by the large groups' gathers, so none may hold a stale index.
    for (int s = tid; s < capacity; s += blockDim.x) x_rows[s] = 0;
    if (tid == 0) atomicAdd(touched, (unsigned)active);
    __syncthreads();
    // One warp hands out slots in pair order: lanes with the same expert rank themselves.
    if (tid < 32) {
        for (int base = 0; base < pairs; base += 32) {
            int i = base + tid;
            int e = i < pairs ? chosen[i] : -1;
            bool ok = e >= 0 && e < n_experts;
            unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
            int s = ok ? next[e] + __popc(peers & ((1u << tid) - 1u)) : -1;
            if (i < pairs) slot_of[i] = s;
            if (ok) x_rows[s] = i / top_k;
            __syncwarp();
            if (ok && tid == __ffs(peers) - 1) next[e] += __popc(peers);
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------- routing (spec §5)
// One block per token, one thread per expert (n_experts <= 1024). Sigmoid scores; the bias is
// used for selection only; groups ranked by the sum of their two best biased scores; top-k
// inside the best groups; ties go to the lower index (as the CPU reference).
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

extern "C" __global__ void route_topk(int* experts_out, float* weights_out, const float* logits, const float* bias,
                                      int n_experts, int n_group, int topk_group, int top_k, int normalize,
                                      float scaling) {
    extern __shared__ float sm[];
    float* score = sm;                    // [n_experts]
    float* biased = sm + n_experts;       // [n_experts]
    float* gscore = biased + n_experts;   // [n_group]
    int* chosen = (int*)(gscore + n_group);  // [top_k]
    int t = blockIdx.x, e = threadIdx.x, per = n_experts / n_group;
    if (e < n_experts) {
        float s = 1.f / (1.f + expf(-logits[(size_t)t * n_experts + e]));
        score[e] = s;
        biased[e] = s + bias[e];
    }
    __syncthreads();
    if (e < n_group) {
        float b0 = -INFINITY, b1 = -INFINITY;
        for (int i = e * per; i < (e + 1) * per; ++i) {
            float v = biased[i];
            if (v > b0) { b1 = b0; b0 = v; } else if (v > b1) { b1 = v; }
        }
        gscore[e] = per == 1 ? b0 : b0 + b1;
    }
    __syncthreads();
    if (e < n_experts) {
        // group rank: how many groups beat mine
        int g = e / per, rank = 0;
        for (int o = 0; o < n_group; ++o) rank += beats(gscore[o], o, gscore[g], g);
        float v = rank < topk_group ? biased[e] : -INFINITY;
        biased[e] = v;
    }
    __syncthreads();
    if (e < n_experts) {
        int rank = 0;
        float v = biased[e];
        for (int o = 0; o < n_experts; ++o) rank += beats(biased[o], o, v, e);
        if (rank < top_k && v != -INFINITY) chosen[rank] = e;
    }
    __syncthreads();
    if (e == 0) {
        // sort chosen ascending (as the CPU does) and weight from unbiased scores
        int ids[32];
        for (int j = 0; j < top_k; ++j) ids[j] = chosen[j];
        for (int a = 1; a < top_k; ++a)
            for (int b = a; b > 0 && ids[b - 1] > ids[b]; --b) { int tmp = ids[b]; ids[b] = ids[b - 1]; ids[b - 1] = tmp; }
        float sum = 1e-20f;
        for (int j = 0; j < top_k; ++j) sum += score[ids[j]];
        for (int j = 0; j < top_k; ++j) {
            float w = score[ids[j]];
            if (normalize) w /= sum;
            experts_out[t * top_k + j] = ids[j];
            weights_out[t * top_k + j] = w * scaling;
        }
    }
}

// ---------------------------------------------------------------- MLA, weight-absorbed form
// kv_b rows: head h owns rows h*(nope+v) + [0, nope) (W_UK) and + [nope, nope+v) (W_UV), each
// row `lora` wide. Weights are FP8/BF16/F32 (fmt).

// q_lat[t, h, c] = sum_d q[t, h, d] * W_UK[h][d, c]   (d < nope; q row stride heads*qk)
// grid (heads, ceil(m / 8)), block = lora threads (<= 1024).
extern "C" __global__ void mla_absorb_q(float* q_lat, const float* q, int m, int heads, int qk, int nope, int vdim,
                                        int lora, int fmt, const void* w, const float* scale) {
    __shared__ float qs[8][256];
    int h = blockIdx.x, t0 = blockIdx.y * 8, c = threadIdx.x, mt = min(8, m - t0);
    for (int i = threadIdx.x; i < 8 * nope; i += blockDim.x) {
        int tt = i / nope, d = i % nope;
        qs[tt][d] = tt < mt ? q[(size_t)(t0 + tt) * heads * qk + h * qk + d] : 0.f;
    }
    __syncthreads();
    if (c >= lora) return;
    int scale_cols = (lora + QBLOCK - 1) / QBLOCK;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll 8  // eight weight rows in flight per thread: the loop is bound by load latency
    for (int d = 0; d < nope; ++d) {
        float wv = weight_at(fmt, w, scale, scale_cols, (u64)h * (nope + vdim) + d, c, lora);
#pragma unroll
        for (int tt = 0; tt < 8; ++tt) acc[tt] += qs[tt][d] * wv;
    }
    for (int tt = 0; tt < mt; ++tt) q_lat[((size_t)(t0 + tt) * heads + h) * lora + c] = acc[tt];
}

// out[t, h*vdim + j] = sum_c o_lat[t, h, c] * W_UV[h][j, c]. Block per (head, 8 rows): the rows'
// latents sit in shared memory, each warp streams W_UV rows j = warp, warp+8, ... once.
// grid (heads, ceil(m / 8)), block 256, lora <= 512.
extern "C" __global__ void mla_absorb_out(float* out, const float* o_lat, int m, int heads, int nope, int vdim,
                                          int lora, int fmt, const void* w, const float* scale) {
    __shared__ float os[8][512];
    int h = blockIdx.x, t0 = blockIdx.y * 8, mt = min(8, m - t0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 8 * lora; i += blockDim.x) {
        int tt = i / lora, c = i % lora;
        os[tt][c] = tt < mt ? o_lat[((size_t)(t0 + tt) * heads + h) * lora + c] : 0.f;
    }
    __syncthreads();
    int scale_cols = (lora + QBLOCK - 1) / QBLOCK;
    for (int j = warp; j < vdim; j += blockDim.x >> 5) {
        u64 row = (u64)h * (nope + vdim) + nope + j;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int c = lane; c < lora; c += 32) {
            float wv = weight_at(fmt, w, scale, scale_cols, row, c, lora);
#pragma unroll
            for (int tt = 0; tt < 8; ++tt) acc[tt] += os[tt][c] * wv;
        }
#pragma unroll
        for (int tt = 0; tt < 8; ++tt) {
            float v = warp_sum(acc[tt]);
            if (tt < mt && lane == 0) out[(size_t)(t0 + tt) * heads * vdim + (size_t)h * vdim + j] = v;
        }
    }
}

// Writes each row's latent [c_kv (normed) ; k_pe (roped)] into the paged cache as bf16.
extern "C" __global__ void cache_write(bf16* cache, const float* latent, int ld, const int* slots, int width) {
    int slot = slots[blockIdx.x];
    if (slot < 0) return;  // padding row of a fixed-size (graphed) step
    const float* src = latent + (size_t)blockIdx.x * ld;
    bf16* dst = cache + (size_t)slot * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = f32_to_bf16(src[i]);
}

// Attention over the latent cache for HG heads of one token row per block, online softmax over
// tiles of TILE positions; every cached latent is read once per head group, not once per head.
//   scores[h, j] = scale * (q_lat[h] . c_j + q_pe[h] . kpe_j)     (c_j = cache[j][:lora])
//   o_lat[h]     = sum_j softmax_j * c_j
// Row r sees positions 0..lens[r]-1 of its sequence; position p lives in slot
// tables[table_off[r] + p / block] * block + p % block. grid (heads / HG, m), block 256.
#define MLA_HG 16
#define MLA_TILE 32
#define MLA_THREADS 256

extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_attend(float* o_lat, const float* q_lat, const float* q, int qk, int nope, int heads, int hg, int lora, int rope,
           const bf16* cache, const int* tables, const int* table_off, const int* lens, int block, float scale) {
    extern __shared__ float sm[];
    int width = lora + rope, pitch = width + 2;  // bf16 row pitch padded against bank conflicts
    float* qs = sm;                                // [hg][width]
    float* p = qs + hg * width;                    // [hg][TILE]
    float* m_run = p + hg * MLA_TILE;              // [hg]
    float* l_run = m_run + hg;                     // [hg]
    float* corr = l_run + hg;                      // [hg]
    bf16* tile = (bf16*)(corr + hg);               // [TILE][pitch]
    int r = blockIdx.y, h0 = blockIdx.x * hg, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < hg * width; i += blockDim.x) {
        int hh = i / width, c = i % width;
        qs[i] = c < lora ? q_lat[((size_t)r * heads + h0 + hh) * lora + c]
                         : q[(size_t)r * heads * qk + (size_t)(h0 + hh) * qk + nope + (c - lora)];
    }
    if (tid < hg) { m_run[tid] = -INFINITY; l_run[tid] = 0.f; }
    int len = lens[r];
    const int* tab = tables + table_off[r];
    // this thread's output columns (lora <= 2 * MLA_THREADS)
    int c0 = tid * 2;
    float o[MLA_HG][2];
#pragma unroll
    for (int hh = 0; hh < MLA_HG; ++hh) { o[hh][0] = 0.f; o[hh][1] = 0.f; }
    __syncthreads();
    for (int base = 0; base < len; base += MLA_TILE) {
        int n = min(MLA_TILE, len - base);
        // load the tile (4-byte words; width is even)
        int words = width / 2;
        for (int i = tid; i < n * words; i += blockDim.x) {
            int j = i / words, wd = i % words, pos = base + j;
            u64 slot = (u64)tab[pos / block] * block + pos % block;
            ((u32*)(tile + j * pitch))[wd] = ((const u32*)(cache + slot * width))[wd];
        }
        __syncthreads();
        // scores: thread -> (position j = tid % TILE, heads hh = tid / TILE + k * 8)
        {
            int j = tid % MLA_TILE;
            for (int hh = tid / MLA_TILE; hh < hg; hh += MLA_THREADS / MLA_TILE) {
                float s = -INFINITY;
                if (j < n) {
                    const u32* row = (const u32*)(tile + j * pitch);
                    const float* qh = qs + hh * width;
                    float a = 0.f;
                    for (int wd = 0; wd < words; ++wd) {
                        u32 two = row[wd];
                        a += qh[2 * wd] * bf16_to_f32(two & 0xffffu) + qh[2 * wd + 1] * bf16_to_f32(two >> 16);
                    }
                    s = a * scale;
                }
                p[hh * MLA_TILE + j] = s;
            }
        }
        __syncthreads();
        // online softmax per head: warp w handles heads w, w+8, ...
        for (int hh = warp; hh < hg; hh += MLA_THREADS / 32) {
            float s = p[hh * MLA_TILE + lane];  // MLA_TILE == 32
            float mx = fmaxf(warp_max(s), m_run[hh]);
            float e = (lane < n) ? expf(s - mx) : 0.f;
            float sum = warp_sum(e);
            p[hh * MLA_TILE + lane] = e;
            __syncwarp();
            if (lane == 0) {
                float cr = expf(m_run[hh] - mx);  // exp(-inf) = 0 on the first tile
                corr[hh] = cr;
                l_run[hh] = l_run[hh] * cr + sum;
                m_run[hh] = mx;
            }
        }
        __syncthreads();
        if (c0 < lora) {
#pragma unroll
            for (int hh = 0; hh < MLA_HG; ++hh)
                if (hh < hg) { o[hh][0] *= corr[hh]; o[hh][1] *= corr[hh]; }
            for (int j = 0; j < n; ++j) {
                u32 two = *(const u32*)(tile + j * pitch + c0);
                float a = bf16_to_f32(two & 0xffffu), b = bf16_to_f32(two >> 16);
#pragma unroll
                for (int hh = 0; hh < MLA_HG; ++hh)
                    if (hh < hg) {
                        float pj = p[hh * MLA_TILE + j];
                        o[hh][0] += pj * a;
                        o[hh][1] += pj * b;
                    }
            }
        }
        __syncthreads();
    }
    if (c0 < lora) {
#pragma unroll
        for (int hh = 0; hh < MLA_HG; ++hh)
            if (hh < hg) {
                float inv = 1.f / l_run[hh];
                float* dst = o_lat + ((size_t)r * heads + h0 + hh) * lora + c0;
                dst[0] = o[hh][0] * inv;
                dst[1] = o[hh][1] * inv;
            }
    }
}

extern "C" __global__ void gather_rows_f32(float* out, const float* x, int ldx, const int* rows, int width) {
    const float* src = x + (size_t)rows[blockIdx.x] * ldx;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// ---------------------------------------------------------------- MLA, naive form (prefill)
// Latents of positions 0..total of one sequence from the paged cache, split into c_kv (f32,
// [total, lora]) and k_pe (f32, [total, rope]).
extern "C" __global__ void gather_latents(float* c_kv, float* k_pe, const bf16* cache, const int* table, int block,
                                          int lora, int rope) {
    int p = blockIdx.x, width = lora + rope;
    const bf16* src = cache + ((size_t)table[p / block] * block + p % block) * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = bf16_to_f32(src[i]);
        if (i < lora) c_kv[(size_t)p * lora + i] = v;
        else k_pe[(size_t)p * rope + (i - lora)] = v;
    }
}

// From kv = c_kv · kv_bᵀ ([total, heads*(nope+v)]) and k_pe: K [total, heads, nope+rope] and
// V [total, heads, v] in bf16 for the tensor-core attention products.
extern "C" __global__ void build_kv(bf16* k, bf16* v, const float* kv, const float* k_pe, int heads, int nope, int rope,
                                    int vdim) {
    int p = blockIdx.x, qk = nope + rope, per = nope + vdim;
    for (int i = threadIdx.x; i < heads * qk; i += blockDim.x) {
        int h = i / qk, d = i % qk;
        float x = d < nope ? kv[(size_t)p * heads * per + h * per + d] : k_pe[(size_t)p * rope + (d - nope)];
        k[(size_t)p * heads * qk + i] = f32_to_bf16(x);
    }
    for (int i = threadIdx.x; i < heads * vdim; i += blockDim.x) {
        int h = i / vdim, d = i % vdim;
        v[(size_t)p * heads * vdim + i] = f32_to_bf16(kv[(size_t)p * heads * per + h * per + nope + d]);
    }
}

// Causal softmax of scores s [rows = hc * n, total] (query i sits at position start + i and sees
// 0..start+i) into bf16 probabilities, zero beyond the causal limit.
extern "C" __global__ void causal_softmax(bf16* p, const float* s, int n, int total, int start) {
    __shared__ float scratch[32];
    int row = blockIdx.x, i = row % n, limit = start + i + 1;
    const float* x = s + (size_t)row * total;
    bf16* y = p + (size_t)row * total;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) sum += expf(x[j] - mx);
    sum = block_sum(sum, scratch);
    float inv = 1.f / sum;
    for (int j = threadIdx.x; j < total; j += blockDim.x) y[j] = f32_to_bf16(j < limit ? expf(x[j] - mx) * inv : 0.f);
}

// ---------------------------------------------------------------- MLA decode on the tensor cores
// Absorbed-form attention for 16 heads of one row per block, positions split across gridDim.z
// (flash-decoding): S = Q·Tᵀ and O += P·T[:, :lora] with mma.sync m16n8k16 (bf16 in, f32
// accumulate), online softmax per tile of 64 positions. Partial results (unnormalised O, row
// max, row sum) go to o_part / ml_part and mla_combine merges the splits.
// Needs (lora + rope) % 16 == 0, lora % 64 == 0, lora <= 512. 8 warps; warp w computes scores
// for positions w*8.. of each tile and owns output columns [w*lora/8, (w+1)*lora/8).
#define TC_TILE 64
#define TC_PAD 8

__device__ __forceinline__ void mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


#define TC_WARPS 8

extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)
mla_decode_tc(float* o_part, float* ml_part, const float* q_lat, const float* q, int qk, int nope, int heads, int hg,
              int lora, int rope, const bf16* cache, const int* tables, const int* table_off, const int* lens,
              int block, float scale, int min_split) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int width = lora + rope, pitch = width + TC_PAD;  // bf16 elements per smem row
    const int pp = TC_TILE + TC_PAD;
    // Q and P are kept as bf16 hi + lo pairs (two products each), so the tensor cores lose no
    // more precision than the bf16 cache itself (plain bf16 Q and P measured no faster: the
    // kernel is bound by its tile loads and synchronisation, not the tensor cores).
    bf16* qs = (bf16*)smem_raw;                             // [2][16][pitch] (hi, lo)
    bf16* tbuf = qs + 2 * 16 * pitch;                       // [2][TC_TILE][pitch], double-buffered
    bf16* ps = tbuf + 2 * TC_TILE * pitch;                  // [2][16][pp] (hi, lo)
    float* red_max = (float*)(ps + 2 * 16 * pp);            // [TC_WARPS][16]
    float* red_sum = red_max + TC_WARPS * 16;               // [TC_WARPS][16]
    float* m_run = red_sum + TC_WARPS * 16;                 // [16]
    float* l_run = m_run + 16;                              // [16]
    int r = blockIdx.y, h0 = blockIdx.x * hg, split = blockIdx.z, splits = gridDim.z;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // Each row splits its own length (at least min_split positions per split), so the grid does
    // not depend on the lengths and a graphed step stays valid as contexts grow.
    const int len = lens[r];
    const int split_len = (max(min_split, (len + splits - 1) / splits) + TC_TILE - 1) / TC_TILE * TC_TILE;
    const int begin = split * split_len, end = min(len, begin + split_len);
    if (begin >= end) {  // nothing here: an empty partial (l = 0) that the merge skips
        if (tid < hg) {
            float* ml = ml_part + (((size_t)r * heads + h0 + tid) * splits + split) * 2;
            ml[0] = -INFINITY;
            ml[1] = 0.f;
        }
        return;
    }
    for (int i = tid; i < 16 * width; i += blockDim.x) {
        int hh = i / width, c = i % width;
        float v = 0.f;
        if (hh < hg)
            v = c < lora ? q_lat[((size_t)r * heads + h0 + hh) * lora + c]
                         : q[(size_t)r * heads * qk + (size_t)(h0 + hh) * qk + nope + (c - lora)];
        bf16 hi = f32_to_bf16(v);
        qs[hh * pitch + c] = hi;
        qs[(16 + hh) * pitch + c] = f32_to_bf16(v - bf16_to_f32(hi));
    }
    if (tid < 16) { m_run[tid] = -INFINITY; l_run[tid] = 0.f; }
    const int* tab = tables + table_off[r];
    // warp w: scores for positions w*8..w*8+7 of each tile; output columns [w*cols, (w+1)*cols)
    const int cols = lora / TC_WARPS, col0 = warp * cols, ntiles = cols / 8;
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    const u32* qw = (const u32*)qs;
    const int pw = pitch / 2;  // u32 words per smem row
    __syncthreads();
    // Tile loads are asynchronous copies (cp.async), the next tile in flight while this one is used.
    const int pieces = width / 8;
    auto load_tile = [&](int base, bf16* dst_tile) {
        int n = min(TC_TILE, end - base);
        for (int j = warp; j < TC_TILE; j += TC_WARPS) {
            int pos = base + min(j, n - 1);
            const bf16* src = cache + ((size_t)tab[pos / block] * block + pos % block) * width;
            int bytes = j < n ? 16 : 0;  // rows past n are zero-filled (P is 0 there, but 0 * NaN is not)
            for (int x = lane; x < pieces; x += 32) {
                unsigned dst = (unsigned)__cvta_generic_to_shared(dst_tile + j * pitch + 8 * x);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src + 8 * x), "r"(bytes));
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    if (begin < end) load_tile(begin, tbuf);
    int buf = 0;
    for (int base = begin; base < end; base += TC_TILE, buf ^= 1) {
        int n = min(TC_TILE, end - base);
        bf16* ts = tbuf + buf * TC_TILE * pitch;
        if (base + TC_TILE < end) {
            load_tile(base + TC_TILE, tbuf + (buf ^ 1) * TC_TILE * pitch);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        // scores of this warp's 8 positions: 4 independent chains (hi/lo x k parity)
        float sp[2][2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 2; ++b) sp[a][b][0] = sp[a][b][1] = sp[a][b][2] = sp[a][b][3] = 0.f;
        const u32* tw = (const u32*)ts;
        const int ksteps = width / 16, prow = warp * 8 + g;
        for (int ks = 0; ks < ksteps; ks += 2) {
#pragma unroll
            for (int par = 0; par < 2; ++par) {
                if (ks + par < ksteps) {
                    int kw = (ks + par) * 8 + t;
                    u32 b0 = tw[prow * pw + kw], b1 = tw[prow * pw + kw + 4];
#pragma unroll
                    for (int part = 0; part < 2; ++part) {
                        const u32* qp = qw + part * 16 * pw;
                        mma_bf16(sp[part][par], qp[g * pw + kw], qp[(g + 8) * pw + kw], qp[g * pw + kw + 4],
                                 qp[(g + 8) * pw + kw + 4], b0, b1);
                    }
                }
            }
        }
        float sc[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[e] = (sp[0][0][e] + sp[0][1][e]) + (sp[1][0][e] + sp[1][1][e]);
        // mask, scale, per-row max over this warp's positions
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int j = warp * 8 + 2 * t + (e & 1);
            float v = j < n ? sc[e] * scale : -INFINITY;
            sc[e] = v;
            if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
        }
        for (int o = 1; o < 4; o <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
        }
        if (t == 0) { red_max[warp * 16 + g] = mx0; red_max[warp * 16 + g + 8] = mx1; }
        __syncthreads();
        float tmax0 = -INFINITY, tmax1 = -INFINITY;
#pragma unroll
        for (int w = 0; w < TC_WARPS; ++w) {
            tmax0 = fmaxf(tmax0, red_max[w * 16 + g]);
            tmax1 = fmaxf(tmax1, red_max[w * 16 + g + 8]);
        }
        float new0 = fmaxf(m_run[g], tmax0), new1 = fmaxf(m_run[g + 8], tmax1);
        float corr0 = expf(m_run[g] - new0), corr1 = expf(m_run[g + 8] - new1);
        float p0 = expf(sc[0] - new0), p1 = expf(sc[1] - new0);
        float p2 = expf(sc[2] - new1), p3 = expf(sc[3] - new1);
        float sum0 = p0 + p1, sum1 = p2 + p3;
        {
            int j = warp * 8 + 2 * t;
            u32 hi01 = pack_bf16(p0, p1), hi23 = pack_bf16(p2, p3);
            *(u32*)(ps + g * pp + j) = hi01;
            *(u32*)(ps + (g + 8) * pp + j) = hi23;
            *(u32*)(ps + (16 + g) * pp + j) =
                pack_bf16(p0 - bf16_to_f32(hi01 & 0xffffu), p1 - bf16_to_f32(hi01 >> 16));
            *(u32*)(ps + (24 + g) * pp + j) =
                pack_bf16(p2 - bf16_to_f32(hi23 & 0xffffu), p3 - bf16_to_f32(hi23 >> 16));
        }
        for (int o = 1; o < 4; o <<= 1) {
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, o);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, o);
        }
        if (t == 0) { red_sum[warp * 16 + g] = sum0; red_sum[warp * 16 + g + 8] = sum1; }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            acc[nt][0] *= corr0; acc[nt][1] *= corr0;
            acc[nt][2] *= corr1; acc[nt][3] *= corr1;
        }
        __syncthreads();
        if (tid < 16) {
            float tm = -INFINITY, total = 0.f;
            for (int w = 0; w < TC_WARPS; ++w) {
                tm = fmaxf(tm, red_max[w * 16 + tid]);
                total += red_sum[w * 16 + tid];
            }
            float nm = fmaxf(m_run[tid], tm);
            l_run[tid] = l_run[tid] * expf(m_run[tid] - nm) + total;
            m_run[tid] = nm;
        }
        // O[16, cols of this warp] += P[16, 64] · T[64, cols]
        const u32* pw32 = (const u32*)ps;
        const int hp = pp / 2;
        for (int k0 = 0; k0 < TC_TILE; k0 += 16) {
            int kw = k0 / 2 + t;
            u32 a0 = pw32[g * hp + kw], a1 = pw32[(g + 8) * hp + kw];
            u32 a2 = pw32[g * hp + kw + 4], a3 = pw32[(g + 8) * hp + kw + 4];
            u32 l0 = pw32[(16 + g) * hp + kw], l1 = pw32[(24 + g) * hp + kw];
            u32 l2 = pw32[(16 + g) * hp + kw + 4], l3 = pw32[(24 + g) * hp + kw + 4];
            const bf16* r0 = ts + (k0 + 2 * t) * pitch;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                if (nt < ntiles) {
                    int c = col0 + nt * 8 + g;
                    u32 b0 = (u32)r0[c] | ((u32)r0[pitch + c] << 16);
                    u32 b1 = (u32)r0[8 * pitch + c] | ((u32)r0[9 * pitch + c] << 16);
                    mma_bf16(acc[nt], a0, a1, a2, a3, b0, b1);
                    mma_bf16(acc[nt], l0, l1, l2, l3, b0, b1);
                }
            }
        }
        __syncthreads();
    }
    // partial outputs: o_part[r, h, split, :lora], ml_part[r, h, split, 2]
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        if (nt < ntiles) {
            int c = col0 + nt * 8 + 2 * t;
            if (g < hg) {
                float* dst = o_part + (((size_t)r * heads + h0 + g) * splits + split) * lora + c;
                dst[0] = acc[nt][0]; dst[1] = acc[nt][1];
            }
            if (g + 8 < hg) {
                float* dst = o_part + (((size_t)r * heads + h0 + g + 8) * splits + split) * lora + c;
                dst[0] = acc[nt][2]; dst[1] = acc[nt][3];
            }
        }
    }
    if (tid < hg) {
        float* ml = ml_part + (((size_t)r * heads + h0 + tid) * splits + split) * 2;
        ml[0] = m_run[tid];
        ml[1] = l_run[tid];
    }
}

// Merges the splits: o_lat[r, h, :] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s. grid (heads, m);
// dynamic shared memory: 2 * splits floats (each split's weight is computed once, then the partial
// outputs are read with independent loads).
extern "C" __global__ void mla_combine(float* o_lat, const float* o_part, const float* ml_part, int heads, int splits,
                                       int lora) {
    extern __shared__ float cw[];  // [splits] m_s, then [splits] weights
    __shared__ float scratch[32];
    int h = blockIdx.x, r = blockIdx.y;
    const float* ml = ml_part + ((size_t)r * heads + h) * splits * 2;
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        float m = ml[2 * s + 1] > 0.f ? ml[2 * s] : -INFINITY;  // empty splits do not count
        cw[s] = m;
        mx = fmaxf(mx, m);
    }
    mx = block_max(mx, scratch);
    float part = 0.f;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        float e = cw[s] == -INFINITY ? 0.f : expf(cw[s] - mx);
        cw[splits + s] = e;
        part += e * ml[2 * s + 1];
    }
    float denom = block_sum(part, scratch);
    __syncthreads();
    const float* op = o_part + ((size_t)r * heads + h) * splits * lora;
    for (int c = threadIdx.x; c < lora; c += blockDim.x) {
        float v = 0.f;
#pragma unroll 4
        for (int s = 0; s < splits; ++s) {
            float e = cw[splits + s];
            if (e > 0.f) v += e * op[(size_t)s * lora + c];
        }
        o_lat[((size_t)r * heads + h) * lora + c] = denom > 0.f ? v / denom : 0.f;  // 0 for empty rows
    }
}

// ---------------------------------------------------------------- FP8 weights on the tensor cores
// y[m, n] (+)= x[m, k] · W[n, k]ᵀ for FP8 W with 128x128 scales and bf16 x, for small m (decode
// batches): each warp owns 16 output features and all of up to 8*NT tokens; mma.sync m16n8k16
// with W as the A operand, converted exactly from e4m3 to bf16 in registers, the block scale
// applied per 128-wide k chunk. Lane (g, t) reads 32 contiguous bytes of rows g and g+8 per chunk;
// the k order inside a chunk is permuted identically for W and x (the sum does not care), so
// every load is 16 bytes wide. k % 128 == 0 and n % 16 == 0; k chunks split over gridDim.z
// (then y must be zeroed and partial sums are added atomically).
// x rows: token j of the tile is row x_rows[j] (or j) of x.

// Two e4m3 values of `word` (bytes picked by `selector`: 0x1404 = bytes 0 and 1, 0x3424 = bytes 2
// and 3) to bf16x2, exactly: a byte placed in the high byte of a bf16 lane has its sign in place
// and its exponent and mantissa 4 bits too high; shifted down, the lane reads as the value times
// 2^-120 (subnormals included), and one packed multiply by 2^120 restores it. Four instructions.
__device__ __forceinline__ u32 e4m3x2_to_bf16x2(u32 word, u32 selector) {
    u32 x = __byte_perm(word, 0u, selector);
    u32 bits = ((x >> 4) & 0x07f007f0u) | (x & 0x80008000u);
    u32 out;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(bits), "r"(0x7B807B80u), "r"(0x80008000u));
    return out;
}

// This block's share [begin, end) of `chunks` k chunks split over gridDim.z (split k).
__device__ __forceinline__ void split_chunks(int chunks, int& begin, int& end) {
    int per = (chunks + gridDim.z - 1) / gridDim.z;
    begin = blockIdx.z * per;
    end = min(chunks, begin + per);
}

// Token tile j of a warp holds tokens 8j..8j+7; lane (g, t) reads token 8j+g (row x_rows[tok], or
// tok), starting `lane_off` elements into the row. Tokens at or past m are not live.
template <int NT>
__device__ __forceinline__ void token_rows(const bf16* (&xr)[NT], bool (&live)[NT], const bf16* x, const int* x_rows,
                                           int ldx, int m, int lane_off) {
    int g = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        int tok = 8 * j + g;
        live[j] = tok < m;
        xr[j] = x + (size_t)(live[j] ? (x_rows ? x_rows[tok] : tok) : 0) * ldx + lane_off;
    }
}

// Stores the C fragments: lane (g, t) holds features row0+g and row0+g+8 of tokens 8j+2t and +1.
// mode: 0 = store, 1 = add into y, 2 = store into split blockIdx.z's slab of y (split k: the
// slabs, split_stride floats apart, are added up afterwards in split order by split_k_reduce).
template <int NT>
__device__ __forceinline__ void store_tiles(float* y, int ldy, int m, int row0, const float (&acc)[NT][4], int mode,
                                            u64 split_stride) {
    int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    if (mode == 2) y += blockIdx.z * split_stride;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int tok = 8 * j + 2 * t + (e & 1), feat = row0 + g + (e >> 1) * 8;
            if (tok < m) {
                float* dst = y + (size_t)tok * ldy + feat;
                *dst = mode == 1 ? *dst + acc[j][e] : acc[j][e];
            }
        }
}

template <int NT>
__device__ void fp8_mma_impl(float* y, int ldy, const bf16* x, const int* x_rows, int ldx, int m, const u8* w,
                             const float* scale, int n, int k, int mode, u64 split_stride) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 16;
    if (row0 >= n) return;
    int chunks = k / 128, c_begin, c_end;
    split_chunks(chunks, c_begin, c_end);
    const u8* w0 = w + (size_t)(row0 + g) * k + 32 * t;
    const u8* w1 = w0 + (size_t)8 * k;
    const float* srow = scale + (size_t)(row0 / 128) * chunks;
    const bf16* xr[NT];
    bool live[NT];
    token_rows<NT>(xr, live, x, x_rows, ldx, m, 32 * t);
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 2
    for (int ch = c_begin; ch < c_end; ++ch) {
        size_t c0 = (size_t)ch * 128;
        uint4 p0 = *(const uint4*)(w0 + c0), p1 = *(const uint4*)(w0 + c0 + 16);
        uint4 q0 = *(const uint4*)(w1 + c0), q1 = *(const uint4*)(w1 + c0 + 16);
        u32 ra[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
        u32 rb[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        u32 xv[NT][16];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (live[j]) {
                const uint4* src = (const uint4*)(xr[j] + c0);
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    uint4 u = src[v];
                    xv[j][4 * v] = u.x; xv[j][4 * v + 1] = u.y; xv[j][4 * v + 2] = u.z; xv[j][4 * v + 3] = u.w;
                }
            } else {
#pragma unroll
                for (int v = 0; v < 16; ++v) xv[j][v] = 0u;
            }
        }
        float part[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            u32 a0 = e4m3x2_to_bf16x2(ra[s], 0x1404u), a2 = e4m3x2_to_bf16x2(ra[s], 0x3424u);
            u32 a1 = e4m3x2_to_bf16x2(rb[s], 0x1404u), a3 = e4m3x2_to_bf16x2(rb[s], 0x3424u);
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_bf16(part[j], a0, a1, a2, a3, xv[j][2 * s], xv[j][2 * s + 1]);
        }
        float sc = srow[ch];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] += sc * part[j][e];
    }
    store_tiles<NT>(y, ldy, m, row0, acc, mode, split_stride);
}

// mode: 0 = store, 1 = add into y, 2 = split k into slabs of y (see store_tiles).
#define FP8_MMA(NT)                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) fp8_mma_n##NT(                                            \
        float* y, int ldy, const bf16* x, const int* x_rows, int ldx, int m, const u8* w, const float* scale,   \
        int n, int k, int mode, u64 split_stride) {                                                             \
        int t0 = blockIdx.y * 8 * NT; /* token tiles of 8*NT rows along grid.y */                              \
        fp8_mma_impl<NT>(y + (size_t)t0 * ldy, ldy, x + (size_t)t0 * ldx, x_rows, ldx, min(8 * NT, m - t0), w,   \
                         scale, n, k, mode, split_stride);                                                      \
    }
FP8_MMA(1)
FP8_MMA(2)
FP8_MMA(4)
FP8_MMA(8)

// bf16 weights (the head, the router) on the tensor cores, as fp8_mma but without conversion:
// lane (g, t) reads 32 bytes (16 values) of rows g and g+8 per 64-wide k chunk. k % 64 == 0,
// n % 16 == 0; k chunks split over gridDim.z as above.
template <int NT>
__device__ void bf16_mma_impl(float* y, int ldy, const bf16* x, int ldx, int m, const bf16* w, int n, int k,
                              int mode, u64 split_stride) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 16;
    if (row0 >= n) return;
    int chunks = k / 64, c_begin, c_end;
    split_chunks(chunks, c_begin, c_end);
    const bf16* w0 = w + (size_t)(row0 + g) * k + 16 * t;
    const bf16* w1 = w0 + (size_t)8 * k;
    const bf16* xr[NT];
    bool live[NT];
    token_rows<NT>(xr, live, x, 0, ldx, m, 16 * t);
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 2
    for (int ch = c_begin; ch < c_end; ++ch) {
        size_t c0 = (size_t)ch * 64;
        uint4 p0 = *(const uint4*)(w0 + c0), p1 = *(const uint4*)(w0 + c0 + 8);
        uint4 q0 = *(const uint4*)(w1 + c0), q1 = *(const uint4*)(w1 + c0 + 8);
        u32 ra[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
        u32 rb[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        u32 xv[NT][8];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (live[j]) {
                uint4 u0 = *(const uint4*)(xr[j] + c0), u1 = *(const uint4*)(xr[j] + c0 + 8);
                xv[j][0] = u0.x; xv[j][1] = u0.y; xv[j][2] = u0.z; xv[j][3] = u0.w;
                xv[j][4] = u1.x; xv[j][5] = u1.y; xv[j][6] = u1.z; xv[j][7] = u1.w;
            } else {
#pragma unroll
                for (int v = 0; v < 8; ++v) xv[j][v] = 0u;
            }
        }
        // k step s takes values 4s..4s+3 of each lane's 16: words 2s (a0/b0) and 2s+1 (a2/b1)
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int j = 0; j < NT; ++j)
                mma_bf16(acc[j], ra[2 * s], rb[2 * s], ra[2 * s + 1], rb[2 * s + 1], xv[j][2 * s], xv[j][2 * s + 1]);
    }
    store_tiles<NT>(y, ldy, m, row0, acc, mode, split_stride);
}

#define BF16_MMA(NT)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) bf16_mma_n##NT(float* y, int ldy, const bf16* x, int ldx, \
                                                                      int m, const bf16* w, int n, int k,       \
                                                                      int mode, u64 split_stride) {            \
        bf16_mma_impl<NT>(y, ldy, x, ldx, m, w, n, k, mode, split_stride);                                     \
    }
BF16_MMA(1)
BF16_MMA(2)

// Routed experts on the tensor cores: blockIdx.y = group (one expert, its slots offsets[g]..),
// token rows of x from x_rows (gate/up) or the slots themselves (down); 8*NT slots per pass, so
// any group size works (the weight tile is re-read from L2 per pass). Groups of more than
// max_rows slots are left to the caller; empty groups (past the active ones) return at once.
// k chunks split over gridDim.z as in fp8_mma (mode 2: per-split slabs, added up afterwards).
#define GROUPED_FP8_MMA(NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) grouped_fp8_mma_n##NT(                                    \
        float* y, int ldy, const bf16* x, int ldx, const int* x_rows, const u8* w, const float* scale,          \
        u64 w_stride, u64 scale_stride, const int* group_expert, const int* offsets, int n, int k,              \
        int max_rows, int mode, u64 split_stride) {                                                             \
        int gi = blockIdx.y, s0 = offsets[gi], cnt = offsets[gi + 1] - s0;                                      \
        if (cnt <= 0 || cnt > max_rows) return;                                                                 \
        int e = group_expert[gi];                                                                               \
        for (int t0 = s0; t0 < s0 + cnt; t0 += 8 * NT)                                                          \
            fp8_mma_impl<NT>(y + (size_t)t0 * ldy, ldy, x_rows ? x : x + (size_t)t0 * ldx,                      \
                             x_rows ? x_rows + t0 : 0, ldx, min(8 * NT, s0 + cnt - t0), w + (u64)e * w_stride,  \
                             scale + (u64)e * scale_stride, n, k, mode, split_stride);                          \
    }
GROUPED_FP8_MMA(1)
GROUPED_FP8_MMA(2)
GROUPED_FP8_MMA(4)
GROUPED_FP8_MMA(8)

// out[t, h*vdim + j] = sum_c o_lat[t, h, c] * W_UV[h][j, c] on the tensor cores, per head an FP8
// product as fp8_mma over head h's value rows of kv_b (128-aligned, so their scale rows line up);
// o_lat as bf16. grid (vdim / 64, heads * ceil(m / (8 * NT))).
#define ABSORB_OUT_MMA(NT)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) mla_absorb_out_mma_n##NT(                                 \
        float* out, const bf16* o_lat, int m, int heads, int nope, int vdim, int lora, const u8* w,             \
        const float* scale) {                                                                                   \
        int h = blockIdx.y % heads, t0 = (blockIdx.y / heads) * 8 * NT;                                         \
        size_t row = (size_t)h * (nope + vdim) + nope;                                                          \
        fp8_mma_impl<NT>(out + (size_t)t0 * heads * vdim + (size_t)h * vdim, heads * vdim,                      \
                         o_lat + ((size_t)t0 * heads + h) * lora, 0, heads * lora, min(8 * NT, m - t0),         \
                         w + row * lora, scale + (row / 128) * (lora / 128), vdim, lora, 0, 0);                \
    }
ABSORB_OUT_MMA(1)
ABSORB_OUT_MMA(2)
ABSORB_OUT_MMA(4)
ABSORB_OUT_MMA(8)

// y[r, c] (+)= sum over s in order of part[s][r][c]: the slabs of a split-k product, added in a
// fixed order so a step gives the same bits every time (atomics would add in arrival order).
extern "C" __global__ void split_k_reduce(float* y, int ldy, const float* part, int m, int n, int splits,
                                          int accumulate) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)m * n) return;
    u64 slab = (u64)m * n;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += part[s * slab + i];
    float* dst = y + (i / n) * ldy + i % n;
    *dst = accumulate ? *dst + sum : sum;
}
