// ---------------------------------------------------------------- FP8 weights on the tensor cores
// y[m, n] (+)= x[m, k] · W[n, k]ᵀ for FP8 W with 128x128 scales and bf16 x, for small m (decode
// batches): each warp owns 16 output features and all of up to 8*NT tokens; mma.sync m16n8k16
// with W as the A operand, converted exactly from e4m3 to bf16 in registers, the block scale
// applied per 128-wide k chunk. Lane (g, t) reads 32 contiguous bytes of rows g and g+8 per chunk;
// the k order inside a chunk is permuted identically for W and x (the sum does not care), so
// every load is 16 bytes wide. k % 128 == 0 and n % 16 == 0; k chunks split over gridDim.z
// (then y must be zeroed and partial sums are added atomically).
// x rows: token j of the tile is row x_rows[j] (or j) of x. With x_scale, x holds e4m3 values
// (quantize_rows_bf16) and x_scale their scales, [rows of x][k/128]: each chunk's sum is scaled
// by the token's and the weight block's scales, so the product is DeepSeek's FP8 recipe exactly.

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

// Weights are written by no kernel, so a product may fetch them before it waits for the kernel
// before it (programmatic dependent launch): the first k chunks [begin, end) the warp will read of
// its 16 weight rows from row0 (128 bytes of a row per chunk, FP8 or bf16) pulled into L2
// meanwhile.
__device__ __forceinline__ void prefetch_rows(const void* w, int n, size_t row_bytes, int row0, int begin, int end) {
    constexpr int ahead = 8;
    const int lane = threadIdx.x & 31, row = row0 + lane;
    if (lane >= 16 || row >= n) return;
    const char* p = (const char*)w + (size_t)row * row_bytes;
    for (int c = begin; c < min(end, begin + ahead); ++c)
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + (size_t)c * 128));
}

// prefetch_rows for the warp's rows of a product with 16 rows a warp and k split over gridDim.z.
__device__ __forceinline__ void prefetch_weight_rows(const void* w, int n, size_t row_bytes, int chunks) {
    int begin, end;
    split_chunks(chunks, begin, end);
    prefetch_rows(w, n, row_bytes, (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 16, begin, end);
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

// W words (4 bytes each, W a multiple of 4) from p, 16 bytes at a time: a lane's slice of a
// weight row or a token row for one k chunk.
template <int W>
__device__ __forceinline__ void load_words(u32 (&v)[W], const void* p) {
    const uint4* src = (const uint4*)p;
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
        uint4 u = src[i];
        v[4 * i] = u.x; v[4 * i + 1] = u.y; v[4 * i + 2] = u.z; v[4 * i + 3] = u.w;
    }
}

// The lane's slice at element c0 of each token row of its tiles (token_rows), zeros for tokens
// that are not live.
template <int NT, int W, typename T>
__device__ __forceinline__ void load_token_words(u32 (&xv)[NT][W], const T* const (&xr)[NT], const bool (&live)[NT],
                                                 size_t c0) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        if (live[j]) {
            load_words<W>(xv[j], xr[j] + c0);
        } else {
#pragma unroll
            for (int v = 0; v < W; ++v) xv[j][v] = 0u;
        }
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

// As store_tiles (mode 0), each sum rounded to bf16.
template <int NT>
__device__ __forceinline__ void store_tiles(bf16* y, int ldy, int m, int row0, const float (&acc)[NT][4], int, u64) {
    int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int tok = 8 * j + 2 * t + (e & 1), feat = row0 + g + (e >> 1) * 8;
            if (tok < m) y[(size_t)tok * ldy + feat] = f32_to_bf16(acc[j][e]);
        }
}

// Out: float (stores as `mode` says) or bf16 (stores only).
template <int NT, typename Out = float>
__device__ void fp8_mma_impl(Out* y, int ldy, const bf16* x, const int* x_rows, int ldx, const float* x_scale, int m,
                             const u8* w, const float* scale, int n, int k, int mode, u64 split_stride) {
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
    // The x_scale rows of this lane's accumulator tokens 8j+2t and 8j+2t+1 (-1: not live).
    int srows[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            int tok = 8 * j + 2 * t + e;
            srows[j][e] = tok < m ? (x_rows ? x_rows[tok] : tok) : -1;
        }
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 2
    for (int ch = c_begin; ch < c_end; ++ch) {
        size_t c0 = (size_t)ch * 128;
        u32 ra[8], rb[8], xv[NT][16];
        load_words(ra, w0 + c0);
        load_words(rb, w1 + c0);
        load_token_words(xv, xr, live, c0);
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
        for (int j = 0; j < NT; ++j) {
            float s0 = sc, s1 = sc;
            if (x_scale) {
                s0 *= srows[j][0] >= 0 ? x_scale[(size_t)srows[j][0] * chunks + ch] : 0.f;
                s1 *= srows[j][1] >= 0 ? x_scale[(size_t)srows[j][1] * chunks + ch] : 0.f;
            }
            acc[j][0] += s0 * part[j][0];
            acc[j][1] += s1 * part[j][1];
            acc[j][2] += s0 * part[j][2];
            acc[j][3] += s1 * part[j][3];
        }
    }
    store_tiles<NT>(y, ldy, m, row0, acc, mode, split_stride);
}

// mode: 0 = store, 1 = add into y, 2 = split k into slabs of y (see store_tiles). x contiguous
// (token tiles of 8*NT rows along grid.y); x_scale null or as in fp8_mma_impl.
#define FP8_MMA(NT)                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) fp8_mma_n##NT(                                            \
        float* y, int ldy, const bf16* x, int ldx, const float* x_scale, int m, const u8* w, const float* scale, \
        int n, int k, int mode, u64 split_stride) {                                                             \
        prefetch_weight_rows(w, n, k, k / 128);                                                                 \
        await_previous_kernel();                                                                                \
        int t0 = blockIdx.y * 8 * NT;                                                                           \
        fp8_mma_impl<NT>(y + (size_t)t0 * ldy, ldy, x + (size_t)t0 * ldx, 0, ldx,                               \
                         x_scale ? x_scale + (size_t)t0 * (k / 128) : 0, min(8 * NT, m - t0), w, scale, n, k,   \
                         mode, split_stride);                                                                   \
    }
FP8_MMA(1)
FP8_MMA(2)
FP8_MMA(4)
FP8_MMA(8)

// One mma of m16n8k32 on e4m3 operands (sm_89 and later; the kernels using it are launched only
// on Hopper): A holds 16 rows x 32 k, four e4m3 a register, B 32 k x 8 tokens.
__device__ __forceinline__ void mma_e4m3(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// One 128-wide k chunk of fp8x8_mma_sum as a lane holds it: its 32 bytes of W's rows g and g + 8
// and of its tokens, the weight block's scale and (when requested with them) its tokens' scales.
template <int NT>
struct Fp8x8Chunk {
    u32 a[8], b[8], x[NT][8];
    float sw, sx[NT][2];
};

// Requests chunk ch's operands (the loads stay in flight until the chunk is added); the tokens'
// scales too where TOKEN_SCALES (else fp8x8_add reads them).
template <int NT, bool TOKEN_SCALES>
__device__ __forceinline__ void fp8x8_request(Fp8x8Chunk<NT>& c, const u8* w0, const u8* w1,
                                              const u8* const (&xr)[NT], const bool (&live)[NT], const float* srow,
                                              const float* x_scale, int x_scale_ld, int m, int t, int ch) {
    const size_t c0 = (size_t)ch * 128;
    load_words(c.a, w0 + c0);
    load_words(c.b, w1 + c0);
    load_token_words(c.x, xr, live, c0);
    c.sw = srow[ch];
    if (!TOKEN_SCALES) return;
    const float* xs = x_scale + (size_t)ch * x_scale_ld;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + 2 * t;
        c.sx[j][0] = tok < m ? xs[tok] : 0.f;
        c.sx[j][1] = tok + 1 < m ? xs[tok + 1] : 0.f;
    }
}

// acc += chunk ch's products, each token's promoted by its scale times the weight block's (the
// tokens' scales as requested, or read here).
template <int NT, bool TOKEN_SCALES>
__device__ __forceinline__ void fp8x8_add(float (&acc)[NT][4], const Fp8x8Chunk<NT>& c, const float* x_scale,
                                          int x_scale_ld, int m, int t, int ch) {
    float part[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j)
            mma_e4m3(part[j], c.a[2 * s], c.b[2 * s], c.a[2 * s + 1], c.b[2 * s + 1], c.x[j][2 * s], c.x[j][2 * s + 1]);
    const float* xs = x_scale + (size_t)ch * x_scale_ld;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + 2 * t;
        const float s0 = tok < m ? c.sw * (TOKEN_SCALES ? c.sx[j][0] : xs[tok]) : 0.f;
        const float s1 = tok + 1 < m ? c.sw * (TOKEN_SCALES ? c.sx[j][1] : xs[tok + 1]) : 0.f;
        acc[j][0] += s0 * part[j][0];
        acc[j][1] += s1 * part[j][1];
        acc[j][2] += s0 * part[j][2];
        acc[j][3] += s1 * part[j][3];
    }
}

// FP8 x FP8 on the tensor cores: fp8_mma_impl with the activations as e4m3 bytes too
// (quantize_rows_fp8's rows, ldx bytes apart; x_scale [k/128][x_scale_ld], token j's at column
// j): half the activation bytes are read, and the widening is the hardware's (on sm_90 ptxas
// makes each mma one F2FP.E4M3 unpack per pair of values and f16 HMMAs, where fp8_mma_impl
// spends four instructions per pair of weights). Lane (g, t) reads 32
// contiguous bytes of W's rows g and g+8 and of token g per 128-wide chunk, as fp8_mma_impl
// does; mma s of the chunk takes bytes 8s..8s+3 of each (a0/a1/b0) and 8s+4..8s+7 (a2/a3/b1),
// the same permutation of k for W and x. With AHEAD > 1 a ring of AHEAD chunks is in flight in
// registers, each chunk requested AHEAD chunks before it is added: a warp that waits on one
// chunk at a time keeps too few bytes in flight to stream the weights where few warps share an
// SM. The wider token tiles (AHEAD 1) hold one chunk at a time in their registers.
template <int NT, int AHEAD>
__device__ __forceinline__ void fp8x8_mma_sum(float (&acc)[NT][4], const u8* x, int ldx, const float* x_scale,
                                              int x_scale_ld, int m, const u8* w, const float* scale, int k,
                                              int row0, int c_begin, int c_end) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int chunks = k / 128;
    const u8* w0 = w + (size_t)(row0 + g) * k + 32 * t;
    const u8* w1 = w0 + (size_t)8 * k;
    const float* srow = scale + (size_t)(row0 / 128) * chunks;
    const u8* xr[NT];
    bool live[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        int tok = 8 * j + g;
        live[j] = tok < m;
        xr[j] = x + (size_t)(live[j] ? tok : 0) * ldx + 32 * t;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    if constexpr (AHEAD == 1) {
#pragma unroll 2
        for (int ch = c_begin; ch < c_end; ++ch) {
            Fp8x8Chunk<NT> c;
            fp8x8_request<NT, false>(c, w0, w1, xr, live, srow, x_scale, x_scale_ld, m, t, ch);
            fp8x8_add<NT, false>(acc, c, x_scale, x_scale_ld, m, t, ch);
        }
    } else {
        Fp8x8Chunk<NT> ring[AHEAD];
#pragma unroll
        for (int s = 0; s < AHEAD; ++s)
            if (c_begin + s < c_end)
                fp8x8_request<NT, true>(ring[s], w0, w1, xr, live, srow, x_scale, x_scale_ld, m, t, c_begin + s);
        for (int ch0 = c_begin; ch0 < c_end; ch0 += AHEAD) {
#pragma unroll
            for (int s = 0; s < AHEAD; ++s) {
                const int ch = ch0 + s;
                if (ch < c_end) {
                    fp8x8_add<NT, true>(acc, ring[s], x_scale, x_scale_ld, m, t, ch);
                    if (ch + AHEAD < c_end)
                        fp8x8_request<NT, true>(ring[s], w0, w1, xr, live, srow, x_scale, x_scale_ld, m, t,
                                                ch + AHEAD);
                }
            }
        }
    }
}

template <int NT>
__device__ void fp8x8_mma_impl(float* y, int ldy, const u8* x, int ldx, const float* x_scale, int x_scale_ld, int m,
                               const u8* w, const float* scale, int n, int k, int mode, u64 split_stride) {
    int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 16;
    if (row0 >= n) return;
    int c_begin, c_end;
    split_chunks(k / 128, c_begin, c_end);
    float acc[NT][4];
    fp8x8_mma_sum<NT, NT == 1 ? FP8_AHEAD : 1>(acc, x, ldx, x_scale, x_scale_ld, m, w, scale, k, row0, c_begin,
                                               c_end);
    store_tiles<NT>(y, ldy, m, row0, acc, mode, split_stride);
}

// x: m rows of e4m3 (k bytes each) with scales [k/128][m] (quantize_rows_fp8 of one group);
// token tiles of 8*NT rows along grid.y; otherwise as fp8_mma_n*.
#define FP8X8_MMA(NT)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        fp8x8_mma_n##NT(float* y, int ldy, const u8* x, const float* x_scale, int m, const u8* w,               \
                        const float* scale, int n, int k, int mode, u64 split_stride) {                         \
        prefetch_weight_rows(w, n, k, k / 128);                                                                 \
        await_previous_kernel();                                                                                \
        int t0 = blockIdx.y * 8 * NT;                                                                           \
        fp8x8_mma_impl<NT>(y + (size_t)t0 * ldy, ldy, x + (size_t)t0 * k, k, x_scale + t0, m,                  \
                           min(8 * NT, m - t0), w, scale, n, k, mode, split_stride);                            \
    }
FP8X8_MMA(1)
FP8X8_MMA(2)
FP8X8_MMA(4)
FP8X8_MMA(8)

// Up to 8 tokens, a product whose 16-row tiles all fit on the GPU at once (q_a + kv_a, q_b,
// o_proj, the shared expert, dense down): one tile a block, its k chunks split over the block's
// warps (blockDim.x / 32, at most 8) and their sums added in shared memory in warp order. The
// host launches it only where every block is resident at once, so the product is one wave and
// one launch: no slabs to write and add up, as fp8x8_mma's split k needs. mode: 0 = store, 1 =
// add into y; otherwise as fp8x8_mma_n1.
extern "C" __global__ void __launch_bounds__(256) fp8x8_mma_k_over_warps(float* y, int ldy, const u8* x,
                                                                         const float* x_scale, int m, const u8* w,
                                                                         const float* scale, int n, int k,
                                                                         int mode) {
    __shared__ float partial[7][32][4];
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * 16, chunks = k / 128, per = (chunks + warps - 1) / warps;
    const int c_begin = min(chunks, warp * per), c_end = min(chunks, c_begin + per);
    prefetch_rows(w, n, k, row0, c_begin, c_end);
    await_previous_kernel();
    float acc[1][4];
    fp8x8_mma_sum<1, 1>(acc, x, k, x_scale, m, m, w, scale, k, row0, c_begin, c_end);
    if (warp > 0) {
#pragma unroll
        for (int e = 0; e < 4; ++e) partial[warp - 1][lane][e] = acc[0][e];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int v = 0; v + 1 < warps; ++v)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][e] += partial[v][lane][e];
    store_tiles<1>(y, ldy, m, row0, acc, mode, 0);
}

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
        u32 ra[8], rb[8], xv[NT][8];
        load_words(ra, w0 + c0);
        load_words(rb, w1 + c0);
        load_token_words(xv, xr, live, c0);
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
                                                                      int mode, u64 split_stride) {             \
        prefetch_weight_rows(w, n, (size_t)k * 2, k / 64);                                                      \
        await_previous_kernel();                                                                                \
        bf16_mma_impl<NT>(y, ldy, x, ldx, m, w, n, k, mode, split_stride);                                     \
    }
BF16_MMA(1)
BF16_MMA(2)

// Routed experts on the tensor cores: blockIdx.y = group (one expert, its slots offsets[g]..),
// token rows of x from x_rows (gate/up) or the slots themselves (down); 8*NT slots per pass, so
// any group size works (the weight tile is re-read from L2 per pass). Groups of more than
// max_rows slots are left to the caller; empty groups (past the active ones) return at once.
// k chunks split over gridDim.z as in fp8_mma (mode 2: per-split slabs, added up afterwards).
// x_scale null or the scales of x's rows (quantize_rows_bf16), indexed as x is.
#define GROUPED_FP8_MMA(NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) grouped_fp8_mma_n##NT(                                    \
        float* y, int ldy, const bf16* x, int ldx, const int* x_rows, const u8* w, const float* scale,          \
        u64 w_stride, u64 scale_stride, const int* group_expert, const int* offsets, int n, int k, int max_rows, \
        int mode, u64 split_stride, const float* x_scale) {                                                     \
        await_previous_kernel();                                                                                \
        int gi = blockIdx.y, s0 = offsets[gi], cnt = offsets[gi + 1] - s0;                                      \
        if (cnt <= 0 || cnt > max_rows) return;                                                                 \
        int e = group_expert[gi];                                                                               \
        for (int t0 = s0; t0 < s0 + cnt; t0 += 8 * NT)                                                          \
            fp8_mma_impl<NT>(y + (size_t)t0 * ldy, ldy, x_rows ? x : x + (size_t)t0 * ldx,                      \
                             x_rows ? x_rows + t0 : 0, ldx,                                                     \
                             x_scale && !x_rows ? x_scale + (size_t)t0 * (k / 128) : x_scale,                  \
                             min(8 * NT, s0 + cnt - t0), w + (u64)e * w_stride, scale + (u64)e * scale_stride,  \
                             n, k, mode, split_stride);                                                         \
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
        await_previous_kernel();                                                                                \
        int h = blockIdx.y % heads, t0 = (blockIdx.y / heads) * 8 * NT;                                         \
        size_t row = (size_t)h * (nope + vdim) + nope;                                                          \
        fp8_mma_impl<NT>(out + (size_t)t0 * heads * vdim + (size_t)h * vdim, heads * vdim,                      \
                         o_lat + ((size_t)t0 * heads + h) * lora, 0, heads * lora, 0, min(8 * NT, m - t0),      \
                         w + row * lora, scale + (row / 128) * (lora / 128), vdim, lora, 0, 0);                \
    }
ABSORB_OUT_MMA(1)
ABSORB_OUT_MMA(2)
ABSORB_OUT_MMA(4)
ABSORB_OUT_MMA(8)

// The absorption of W_UV for a small step read from its split decode's outputs unmerged (o_part,
// ml_part: `splits` per row and head, as mla_combine reads them), one block a head: the block
// merges its head's splits for the step's rows into bf16 rows of shared memory by mla_combine's
// own code, multiplies them as mla_absorb_out_mma_n1 does (a warp per 16 of the head's vdim
// rows), and writes out[t, h*vdim + j] in f32 and, where `codes` is not null, quantised as
// quantize_rows_fp8 quantises those rows for o_proj (codes [m][heads*vdim], scales
// [heads*vdim/128][m]; vdim a multiple of 128). The same bits as mla_combine into bf16,
// mla_absorb_out_mma_n1 and quantize_rows_fp8 in turn, in one launch where those took three:
// at a small batch the merge's launch alone was a tenth of the attention's chain of small
// kernels. Up to ABSORB_MERGED_ROWS rows, lora up to ABSORB_MERGED_LORA, vdim up to
// ABSORB_MERGED_VDIM (tiles.rs); grid (1, heads), vdim / 16 warps; dynamic shared memory
// 2 * splits floats.
#define ABSORB_MERGED_LD (ABSORB_MERGED_LORA + 8)  // a row's bf16 values padded 16 bytes: rows fall in other banks
#define ABSORB_MERGED_OUT_LD (ABSORB_MERGED_VDIM + 4)
extern "C" __global__ void __launch_bounds__(ABSORB_MERGED_VDIM * 2)
    mla_absorb_out_merged_mma(float* out, u8* codes, float* scales, int ue8m0, const float* o_part,
                              const float* ml_part, int splits, int m, int heads, int nope, int vdim, int lora,
                              const u8* w, const float* scale) {
    __shared__ __align__(16) bf16 rows[ABSORB_MERGED_ROWS * ABSORB_MERGED_LD];
    __shared__ __align__(16) float sums[ABSORB_MERGED_ROWS * ABSORB_MERGED_OUT_LD];
    __shared__ float scratch[32];
    extern __shared__ float cw[];  // [splits] m_s, then [splits] weights
    await_previous_kernel();
    const int h = blockIdx.y, width = heads * vdim;
    for (int r = 0; r < m; ++r) {
        const size_t at = (size_t)r * heads + h;
        const float denom = split_weights(ml_part + at * splits * 2, splits, cw, scratch);
        const float* op = o_part + at * splits * lora;
        for (int c = 4 * threadIdx.x; c < lora; c += 4 * blockDim.x) {
            const float4 o = merged_channels(op, cw + splits, splits, lora, c, denom);
            *(uint2*)(rows + r * ABSORB_MERGED_LD + c) = make_uint2(pack_bf16(o.x, o.y), pack_bf16(o.z, o.w));
        }
        __syncthreads();  // the weights are the next row's to write; the rows, the product's to read
    }
    const size_t row = (size_t)h * (nope + vdim) + nope;
    fp8_mma_impl<1>(sums, ABSORB_MERGED_OUT_LD, rows, 0, ABSORB_MERGED_LD, 0, m, w + row * lora,
                    scale + (row / 128) * (lora / 128), vdim, lora, 0, 0);
    __syncthreads();
    for (int i = threadIdx.x; i < m * vdim / 4; i += blockDim.x) {
        const int r = i / (vdim / 4), c = 4 * (i % (vdim / 4));
        *(float4*)(out + (size_t)r * width + h * vdim + c) = *(const float4*)(sums + r * ABSORB_MERGED_OUT_LD + c);
    }
    if (!codes) return;
    // A warp a block of 128 values of a row, as quantize_rows_fp8.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, blocks = vdim / 128;
    for (int i = warp; i < m * blocks; i += blockDim.x >> 5) {
        const int r = i / blocks, b = i % blocks, kb = h * blocks + b;
        float s;
        *(u32*)(codes + (size_t)r * width + kb * 128 + lane * 4) =
            quantize_lane(*(const float4*)(sums + r * ABSORB_MERGED_OUT_LD + b * 128 + lane * 4), ue8m0, s);
        if (lane == 0) scales[(size_t)kb * m + r] = s;
    }
}

// y[r, c] (+)= sum over s in order of part[s][r][c]: the slabs of a split-k product, added in a
// fixed order so a step gives the same bits every time (atomics would add in arrival order).
extern "C" __global__ void split_k_reduce(float* y, int ldy, const float* part, int m, int n, int splits,
                                          int accumulate) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)m * n) return;
    u64 slab = (u64)m * n;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += part[s * slab + i];
    float* dst = y + (i / n) * ldy + i % n;
    *dst = accumulate ? *dst + sum : sum;
}

// q_lat[t, h, c] = sum_d q[t, h, d] * W_UK[h][d, c] on the tensor cores: per head an FP8 product
// as fp8_mma over W_UK's transpose (mla_uk_transpose), q as bf16 (row stride heads * qk, its first
// nope channels); q_lat f32, or bf16 (`_bf16`: what the wgmma decode copies by TMA). grid
// (lora / 64, heads * ceil(m / (8 * NT))).
template <int NT, typename Out>
__device__ __forceinline__ void absorb_q_mma(Out* q_lat, const bf16* q, int m, int heads, int qk, int nope, int lora,
                                             const u8* uk_t, const float* scale_t) {
    await_previous_kernel();
    int h = blockIdx.y % heads, t0 = (blockIdx.y / heads) * 8 * NT;
    fp8_mma_impl<NT>(q_lat + ((size_t)t0 * heads + h) * lora, heads * lora, q + ((size_t)t0 * heads + h) * qk, 0,
                     heads * qk, 0, min(8 * NT, m - t0), uk_t + (size_t)h * lora * nope,
                     scale_t + (size_t)h * (lora / 128) * (nope / 128), lora, nope, 0, 0);
}
#define ABSORB_Q_MMA(NT)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) mla_absorb_q_mma_n##NT(                                   \
        float* q_lat, const bf16* q, int m, int heads, int qk, int nope, int lora, const u8* uk_t,              \
        const float* scale_t) {                                                                                 \
        absorb_q_mma<NT>(q_lat, q, m, heads, qk, nope, lora, uk_t, scale_t);                                    \
    }
#define ABSORB_Q_MMA_BF16(NT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) mla_absorb_q_mma_bf16_n##NT(                              \
        bf16* q_lat, const bf16* q, int m, int heads, int qk, int nope, int lora, const u8* uk_t,               \
        const float* scale_t) {                                                                                 \
        absorb_q_mma<NT>(q_lat, q, m, heads, qk, nope, lora, uk_t, scale_t);                                    \
    }
ABSORB_Q_MMA(1)
ABSORB_Q_MMA(2)
ABSORB_Q_MMA(4)
ABSORB_Q_MMA(8)
ABSORB_Q_MMA_BF16(1)
ABSORB_Q_MMA_BF16(2)
ABSORB_Q_MMA_BF16(4)
ABSORB_Q_MMA_BF16(8)

// ---------------------------------------------------------------- the absorptions on wgmma (Hopper)
// Per head h (blockIdx.z): y[t, c] = sum_k x[t, k] · W_h[c, k] for FP8 W_h with 128 x 128 scales
// and bf16 x: the product of mla_absorb_q_mma / mla_absorb_out_mma for many rows, where those
// re-read and re-convert each weight tile for every 64 tokens on mma.sync. A block is one
// warpgroup: 64 token rows by 128 of W_h's rows (one scale row). Per 128-wide k chunk, x's tile is
// copied by cp.async and W's converted exactly to bf16 in registers (e4m3x2_to_bf16x2), both
// stored in the 128-byte swizzle wgmma reads; the chunk's sum (wgmma m64n128k16, f32) is then
// scaled by the weight block's scale into the running sum, as the mma.sync kernels do (ONE_CHUNK,
// k = 128: the sum scaled once, with no second set of 64 registers for it, so that more blocks
// fit on an SM). Rows past m read as zeros and are not stored. Head h's operands start
// h * x_head, h * w_head, h * scale_head (scale rows of k / 128) and h * y_head elements in.
// n % 128 == 0, k % 128 == 0.
// grid (n / 128, ceil(m / 64), heads), block 128.
static_assert(ABSORB_ROWS == 64 && ABSORB_COLS == 128, "the wgmma absorptions are written for m64n128");
template <typename Out, bool ONE_CHUNK>
__device__ __forceinline__ void absorb_wgmma(Out* y, int ldy, int y_head, const bf16* x, int ldx, int x_head, int m,
                                             const u8* w, u64 w_head, const float* scale, u64 scale_head, int k) {
    await_previous_kernel();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 xs = (raw + 1023) & ~1023u;  // 1024-byte aligned: the swizzle atoms (the host adds 1 KB)
    const u32 ws = xs + 2 * ABSORB_ROWS * 128;  // x: two 64-channel blocks of its rows, then W likewise
    const int h = blockIdx.z, c0 = blockIdx.x * ABSORB_COLS, t0 = blockIdx.y * ABSORB_ROWS, tid = threadIdx.x;
    const int chunks = k / 128;
    x += (size_t)h * x_head;
    w += h * w_head + (size_t)c0 * k;
    scale += h * scale_head + (size_t)(c0 / 128) * chunks;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    for (int kc = 0; kc < chunks; ++kc) {
        if (kc > 0) __syncthreads();  // every warp's products of the chunk before are done
        // x: 64 rows of 16 16-byte units (unit u: channels 8u ..), zeros past m.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int e = tid + 128 * i, r = e >> 4, u = e & 15;
            const bool live = t0 + r < m;
            const bf16* src = x + (size_t)(live ? t0 + r : 0) * ldx + kc * 128 + 8 * u;
            const u32 dst = xs + (u >> 3) * (ABSORB_ROWS * 128) + r * 128 + (((u & 7) ^ (r & 7)) << 4);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(live ? 16 : 0));
        }
        asm volatile("cp.async.commit_group;\n" ::);
        // W: 128 rows of 8 16-byte units of e4m3 (unit u: channels 16u ..), each two bf16 units.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int e = tid + 128 * i, r = e >> 3, u = e & 7;
            const uint4 v = *(const uint4*)(w + (size_t)r * k + kc * 128 + 16 * u);
            const u32 row = ws + (u >> 2) * (ABSORB_COLS * 128) + r * 128, b = (2 * u) & 7;
            const u32 lo = row + ((b ^ (r & 7)) << 4), hi = row + (((b + 1) ^ (r & 7)) << 4);
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(lo), "r"(e4m3x2_to_bf16x2(v.x, 0x1404u)),
                         "r"(e4m3x2_to_bf16x2(v.x, 0x3424u)), "r"(e4m3x2_to_bf16x2(v.y, 0x1404u)),
                         "r"(e4m3x2_to_bf16x2(v.y, 0x3424u)) : "memory");
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(hi), "r"(e4m3x2_to_bf16x2(v.z, 0x1404u)),
                         "r"(e4m3x2_to_bf16x2(v.z, 0x3424u)), "r"(e4m3x2_to_bf16x2(v.w, 0x1404u)),
                         "r"(e4m3x2_to_bf16x2(v.w, 0x3424u)) : "memory");
        }
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        fence_async_shared();
        __syncthreads();
        const float sc = scale[kc];
        if constexpr (ONE_CHUNK) {
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 8; ++ks)
                wgmma_m64n128_ss(acc, k_major_sw128(xs, ABSORB_ROWS, 0, ks), k_major_sw128(ws, ABSORB_COLS, 0, ks), ks);
            wgmma_commit();
            wgmma_wait_all();
#pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] = 0.f + sc * acc[i];  // as a sum from zero makes it
        } else {
            float part[64];
#pragma unroll
            for (int i = 0; i < 64; ++i) part[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 8; ++ks)
                wgmma_m64n128_ss(part, k_major_sw128(xs, ABSORB_ROWS, 0, ks), k_major_sw128(ws, ABSORB_COLS, 0, ks),
                                 ks);
            wgmma_commit();
            wgmma_wait_all();
#pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] += sc * part[i];
        }
    }
    // acc[4j + e]: row 16 warp + g (+ 8 for e >= 2), column 8j + 2t (+ 1 for odd e).
    const int warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
    y += (size_t)h * y_head + c0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = t0 + warp * 16 + g + 8 * half;
        if (row >= m) continue;
        Out* out = y + (size_t)row * ldy;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float a = acc[4 * j + 2 * half], b = acc[4 * j + 2 * half + 1];
            if constexpr (sizeof(Out) == 2)
                *(u32*)(out + 8 * j + 2 * t) = pack_bf16(a, b);
            else
                *(float2*)(out + 8 * j + 2 * t) = make_float2(a, b);
        }
    }
#endif
}
// The query's absorption (k = nope = 128) into f32 or bf16 (what the wgmma decode reads), and the
// output's (k = lora).
extern "C" __global__ void __launch_bounds__(128) mla_absorb_q_wgmma(float* y, int ldy, int y_head, const bf16* x,
                                                                      int ldx, int x_head, int m, const u8* w,
                                                                      u64 w_head, const float* scale, u64 scale_head,
                                                                      int k) {
    absorb_wgmma<float, true>(y, ldy, y_head, x, ldx, x_head, m, w, w_head, scale, scale_head, k);
}
extern "C" __global__ void __launch_bounds__(128) mla_absorb_q_wgmma_bf16(bf16* y, int ldy, int y_head, const bf16* x,
                                                                           int ldx, int x_head, int m, const u8* w,
                                                                           u64 w_head, const float* scale,
                                                                           u64 scale_head, int k) {
    absorb_wgmma<bf16, true>(y, ldy, y_head, x, ldx, x_head, m, w, w_head, scale, scale_head, k);
}
extern "C" __global__ void __launch_bounds__(128) mla_absorb_out_wgmma(float* y, int ldy, int y_head, const bf16* x,
                                                                        int ldx, int x_head, int m, const u8* w,
                                                                        u64 w_head, const float* scale,
                                                                        u64 scale_head, int k) {
    absorb_wgmma<float, false>(y, ldy, y_head, x, ldx, x_head, m, w, w_head, scale, scale_head, k);
}

// W_UK of every head transposed, bytes and 128x128 scale blocks alike (no requantisation):
// uk_t[h][c][d] = kv_b[h * (nope + vdim) + d][c], scale_t[h][c / 128][d / 128] = the block's
// scale. nope, vdim and lora multiples of 128. grid (lora * nope / 256, heads), block 256.
extern "C" __global__ void mla_uk_transpose(u8* uk_t, float* scale_t, const u8* kv_b, const float* scale, int nope,
                                            int vdim, int lora) {
    await_previous_kernel();
    int h = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= lora * nope) return;
    int c = i / nope, d = i % nope;
    size_t row = (size_t)h * (nope + vdim) + d;
    uk_t[(size_t)h * lora * nope + i] = kv_b[row * lora + c];
    if (c % 128 == 0 && d % 128 == 0)
        scale_t[((size_t)h * (lora / 128) + c / 128) * (nope / 128) + d / 128] = scale[(row / 128) * (lora / 128) + c / 128];
}
