// dsv3 CUDA kernels: what every family shares (types, conversions, reductions, the bf16 tensor-core
// step). Each family is compiled by NVRTC as this header followed by its own file (no #include:
// NVRTC ships no headers by default).
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

// Programmatic dependent launch (sm_90 and later): every kernel is launched allowed to start
// while the kernel before it on the stream is finishing (Gpu::launch), so each calls this before
// it touches memory another kernel writes or reads: it waits until the kernel before has
// finished and its writes are visible, then lets the next kernel's blocks be placed as room
// frees up (they wait here in turn). Only what no kernel writes (the weights) may be read
// before it. A unit test holds every kernel to this.
__device__ __forceinline__ void await_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float bf16_to_f32(u32 v) { return __uint_as_float(v << 16); }

// Four bf16 values packed two a word (the first in the low half of lo) as f32.
__device__ __forceinline__ float4 bf16x4_to_f32(u32 lo, u32 hi) {
    return make_float4(bf16_to_f32(lo & 0xffffu), bf16_to_f32(lo >> 16), bf16_to_f32(hi & 0xffffu),
                       bf16_to_f32(hi >> 16));
}

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

// Two values to e4m3, lo in the low byte: on sm_89 and later the hardware's conversion
// (cvt.rn.satfinite: nearest even, saturating at ±448: f32_to_e4m3's codes for every finite
// value, one instruction a pair where f32_to_e4m3 takes ~15 a value), unless E4M3_CVT is 0
// (DSV3_E4M3_CVT=0, to measure it).
#ifndef E4M3_CVT
#define E4M3_CVT 1
#endif
__device__ __forceinline__ u32 e4m3_pair(float lo, float hi) {
#if E4M3_CVT && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return f32_to_e4m3(lo) | (f32_to_e4m3(hi) << 8);
#endif
}

// The scale of an activation block whose largest magnitude is amax (amax / 448, or under ue8m0
// the next power of two at or above it, taken from the bits) and the factor that maps the block
// onto e4m3 (448 / amax, or 1 / scale). An all-zero block gets 1 and 1. The CPU reference
// computes the same (fp8::quantize_block_in_place).
__device__ __forceinline__ void block_scale(float amax, int ue8m0, float& scale, float& inv) {
    if (!(amax > 0.f)) {
        scale = inv = 1.0f;
        return;
    }
    scale = amax / 448.0f;
    if (ue8m0) {
        u32 bits = __float_as_uint(scale);
        if (bits & 0x007fffffu) scale = __uint_as_float((bits & 0x7f800000u) + 0x00800000u);
        inv = 1.0f / scale;
    } else {
        inv = 448.0f / amax;
    }
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

// One warp's 128 values: the e4m3 codes of its lane's four (packed, first in the low byte) and
// the block's scale.
__device__ __forceinline__ u32 quantize_lane(float4 v, int ue8m0, float& scale) {
    float amax = warp_max(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    float inv;
    block_scale(amax, ue8m0, scale, inv);
    return e4m3_pair(v.x * inv, v.y * inv) | (e4m3_pair(v.z * inv, v.w * inv) << 16);
}

// Maximum over the 4 threads of a quad (the lanes holding one row of an mma accumulator).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// An mma accumulator's scores s = 2^(s - m) in place, J fragments of 4 (elements 0, 1 of row m0,
// 2, 3 of row m1), each row's sum added to l0, l1.
template <int J>
__device__ __forceinline__ void exponentiate(float* s, float m0, float m1, float& l0, float& l1) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
        s[4 * j] = exp2f(s[4 * j] - m0);
        s[4 * j + 1] = exp2f(s[4 * j + 1] - m0);
        s[4 * j + 2] = exp2f(s[4 * j + 2] - m1);
        s[4 * j + 3] = exp2f(s[4 * j + 3] - m1);
        l0 += s[4 * j] + s[4 * j + 1];
        l1 += s[4 * j + 2] + s[4 * j + 3];
    }
}

// The rotary pair (a, b) turned by the angle of cosine c and sine s, its roundings spelled out
// (no contraction left to the compiler) so that every kernel that rotates makes the same bits.
__device__ __forceinline__ float2 rotate_pair(float a, float b, float c, float s) {
    return make_float2(__fmaf_rn(a, c, -__fmul_rn(b, s)), __fmaf_rn(a, s, __fmul_rn(b, c)));
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

// ---------------------------------------------------------------- a decode's splits merged
// Split s of one (row, head) of a split decode (flash-decoding) leaves its unnormalised output
// o_s (`lora` floats, splits in a row) and its maximum and sum (m_s, l_s) in ml. Merged:
// o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s. mla_combine and the absorption that merges
// as it reads (mla_absorb_out_merged_mma) both merge through these two, for the same bits.

// Each split's weight e^(m_s - M) into w[s] (0 for an empty split: l_s = 0), where `cw` is
// 2 * splits floats of shared memory and w = cw + splits; the denominator, to every thread. A
// block-wide call; the weights are ready when it returns.
__device__ float split_weights(const float* ml, int splits, float* cw, float* scratch) {
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
    return denom;
}

// Channels c .. c + 3 of the merged output from `op` (split s's output at op + s * lora) and the
// weights w: sixteen splits' loads in flight at a time. Divided, not multiplied by 1 / denom, so
// that a row with one non-empty split gets the bits the decode kernels write for a row's only
// split; a row with no positions (denom 0) gets zeros.
__device__ __forceinline__ float4 merged_channels(const float* op, const float* w, int splits, int lora, int c,
                                                  float denom) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += 16) {
        float4 x[16];
#pragma unroll
        for (int u = 0; u < 16; ++u)  // a split of weight 0 is not read: it may hold anything
            x[u] = s0 + u < splits && w[s0 + u] > 0.f ? *(const float4*)(op + (size_t)(s0 + u) * lora + c)
                                                      : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const float e = s0 + u < splits ? w[s0 + u] : 0.f;
            v.x += e * x[u].x; v.y += e * x[u].y; v.z += e * x[u].z; v.w += e * x[u].w;
        }
    }
    return denom > 0.f ? make_float4(v.x / denom, v.y / denom, v.z / denom, v.w / denom)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
}

// A row normed by a block (rms_norm, rms_norm_quantize_fp8, kv_latent) held in registers:
// HELD float4s a thread (RMS_HELD, tiles.rs, for a decode step's blocks of up to 1,024 threads;
// RMS_HELD_MANY for the 256-thread blocks of a prefill's many rows), thread t holding float4s t,
// t + blockDim.x, ..., so that at each step a warp holds 128 consecutive values (one
// quantisation block).

// The row's float4s held in registers (`held_row`) and the weights beside them.
template <int HELD = RMS_HELD>
struct HeldRow {
    float4 x[HELD], w[HELD];
};

// Whether the rows of `width` of x (row stride ld_x) normed with w into y (ld_y) are held by a
// block of blockDim.x threads: decided from the bases and strides, so every row of a launch takes
// the same path (the two paths add the squares in different orders).
template <int HELD = RMS_HELD>
__device__ __forceinline__ bool rows_fit_held(const float* x, int ld_x, const float* w, const float* y, int ld_y,
                                              int width) {
    return width % 4 == 0 && width / 4 <= HELD * (int)blockDim.x && ld_x % 4 == 0 && ld_y % 4 == 0 &&
           (((size_t)x | (size_t)w | (size_t)y) & 15) == 0;
}

// Loads the row and its weights (the weights' lines requested before the wait for the kernel
// before), and returns this thread's share of the sum of squares.
template <int HELD>
__device__ __forceinline__ float held_row(HeldRow<HELD>& h, const float* x, const float* w, int width) {
    for (int i = 32 * threadIdx.x; i < width; i += 32 * blockDim.x)  // one 128-byte line each
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(w + i));
    await_previous_kernel();
    const int quads = width / 4;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < HELD; ++j) {
        const int f = threadIdx.x + j * blockDim.x;
        const bool in = f < quads;
        h.w[j] = in ? ((const float4*)w)[f] : make_float4(0.f, 0.f, 0.f, 0.f);
        h.x[j] = in ? ((const float4*)x)[f] : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += h.x[j].x * h.x[j].x;
        ss += h.x[j].y * h.x[j].y;
        ss += h.x[j].z * h.x[j].z;
        ss += h.x[j].w * h.x[j].w;
    }
    return ss;
}

// The held row's step j normed (x * inv * w, in the order the walked rows use).
template <int HELD>
__device__ __forceinline__ float4 held_normed(const HeldRow<HELD>& h, int j, float inv) {
    return make_float4(h.x[j].x * inv * h.w[j].x, h.x[j].y * inv * h.w[j].y, h.x[j].z * inv * h.w[j].z,
                       h.x[j].w * inv * h.w[j].w);
}

// A weight element of any format (FP8 with its 128x128 block scale, bf16, f32).
__device__ __forceinline__ float weight_at(int fmt, const void* w, const float* scale, int scale_cols, u64 r, u64 c,
                                           int k) {
    if (fmt == FMT_FP8) {
        u32 b = ((const u8*)w)[r * k + c];
        return e4m3_to_f32(b) * scale[(r / QBLOCK) * scale_cols + c / QBLOCK];
    }
    if (fmt == FMT_BF16) return bf16_to_f32(((const bf16*)w)[r * k + c]);
    return ((const float*)w)[r * k + c];
}

// D += A·B on the tensor cores: m16n8k16, bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory into mma fragments (lanes 8i..8i+7 address matrix i's rows).
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// ---------------------------------------------------------------- Hopper: wgmma, mbarriers, TMA
// Shared-memory matrix descriptor of wgmma: start address, leading and stride byte offsets, and
// the layout (0: unswizzled canonical; 1: 128-byte swizzle, as TMA writes it).
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo, u32 layout = 0) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | ((u64)layout << 62);
}

// Named barrier `id` (1..15; 0 is __syncthreads) of two warpgroups, 256 threads: wait at it, or
// arrive without waiting (the other warpgroup waits).
__device__ __forceinline__ void warpgroups_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void warpgroups_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// A CUtensorMap as a kernel parameter (`const __grid_constant__`), encoded on the host.
struct __align__(128) TensorMap {
    u64 words[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// At most `pending` of this thread's committed wgmma groups still running.
template <int pending> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
}
// Generic-proxy writes to shared memory (stores, cp.async) made visible to wgmma's reads.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from touching accumulators while a wgmma may still write them.
__device__ __forceinline__ void hold(float& v) { asm volatile("" : "+f"(v)::"memory"); }

__device__ __forceinline__ void mbar_init(u32 bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Barriers initialised by one thread made visible to the others and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Announces `bytes` the TMA copies of the barrier's current phase will deliver (no arrival).
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the barrier's phase of this parity has completed (a fresh barrier: parity 1 passes).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// Copies 4 bytes from global to shared memory without waiting (cp.async); `bytes` 0 writes a zero
// and reads nothing.
__device__ __forceinline__ void cp_async_4(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// One of the barrier's arrivals, made once this thread's cp.async copies so far have landed.
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// A 4-D box of `map` at coordinates (c0, c1, c2, c3) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TensorMap* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(
            dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// A 2-D box of `map` at (column x, row y) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, int x, int y, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            dst),
        "l"((u64)map), "r"(x), "r"(y), "r"(bar)
        : "memory");
}
// As tma_load_2d, with an L2 cache policy for the lines read (`policy`: l2_evict_first).
__device__ __forceinline__ void tma_load_2d_hinted(u32 dst, const TensorMap* map, int x, int y, u32 bar, u64 policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
        "%3}], [%4], %5;\n" ::"r"(dst),
        "l"((u64)map), "r"(x), "r"(y), "r"(bar), "l"(policy)
        : "memory");
}
// d[64, 128] (+)= A[64, 16] · B[128, 16]ᵀ, A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128_ss(float d[64], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}

// K-major wgmma operand in the 128-byte swizzle (as TMA writes it: 64-channel blocks of `rows`
// rows of 128 bytes, 8-row atoms of 1024 bytes) at `base`: rows row0 .., channels 16 ks ..
__device__ __forceinline__ u64 k_major_sw128(u32 base, int rows, int row0, int ks) {
    return smem_desc(base + (ks >> 2) * rows * 128 + row0 * 128 + (ks & 3) * 32, 16, 1024, 1);
}
// An L2 policy that marks the lines a load reads as the first to go.
__device__ __forceinline__ u64 l2_evict_first() {
    u64 p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
#endif
