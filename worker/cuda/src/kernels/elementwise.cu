// ---------------------------------------------------------------- elementwise, norms, weights

// out[r, :width] = in[r, :width] * rsqrt(mean(in^2) + eps) * w for row r = blockIdx.x, rows
// strided by ld_in / ld_out; with codes, the output also quantised per 128 values (a warp a
// block: codes [rows][width], scales [width/128][rows]; width then a multiple of 128). Where the
// rows fit the block's registers (HeldRow; rows and weights 16-byte aligned) each stays there
// between the sum and the scaling, loaded at once with its weights, which (written by no kernel)
// are pulled into L2 before the wait for the kernel before: a decode step's norm is then one
// load's latency, not a chain of them, and each warp quantises the 128 values it holds.
// Otherwise the row is walked twice and its quantisation read back. HELD float4s a thread: the
// kernels named _many hold RMS_HELD_MANY for a prefill's rows (256 threads each: a 7,168-wide row
// walked streamed at half the memory's rate); every kernel that normalises rows of a width in
// blocks of a size is the plain or the _many one alike (`kernels::norm_holds_many`), so they
// add the squares in one order.
template <int HELD>
__device__ __forceinline__ void rms_norm_row(float* out, int ld_out, const float* in, int ld_in, const float* w,
                                             int width, float eps, u8* codes = nullptr, float* scales = nullptr,
                                             int ue8m0 = 0) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const float* x = in + (size_t)r * ld_in;
    float* y = out + (size_t)r * ld_out;
    if (rows_fit_held<HELD>(in, ld_in, w, out, ld_out, width)) {
        HeldRow<HELD> h;
        const float inv = rsqrtf(block_sum(held_row(h, x, w, width), scratch) / (float)width + eps);
#pragma unroll
        for (int j = 0; j < HELD; ++j) {
            const int f = threadIdx.x + j * blockDim.x;
            if (f >= width / 4) break;  // with codes, the same for the whole warp (width % 128 == 0)
            const float4 v = held_normed(h, j, inv);
            ((float4*)y)[f] = v;
            if (codes) {
                float scale;
                *(u32*)(codes + (size_t)r * width + 4 * f) = quantize_lane(v, ue8m0, scale);
                if ((threadIdx.x & 31) == 0) scales[(size_t)(f / 32) * gridDim.x + r] = scale;
            }
        }
        return;
    }
    await_previous_kernel();
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) y[i] = x[i] * inv * w[i];
    if (!codes) return;
    // Quantised from the row as written (visible to the block past the barrier), a warp a block.
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int kb = threadIdx.x >> 5; kb < width / QBLOCK; kb += blockDim.x >> 5) {
        float scale;
        const u32 q = quantize_lane(*(const float4*)(y + kb * QBLOCK + lane * 4), ue8m0, scale);
        *(u32*)(codes + (size_t)r * width + kb * QBLOCK + lane * 4) = q;
        if (lane == 0) scales[(size_t)kb * gridDim.x + r] = scale;
    }
}

extern "C" __global__ void rms_norm(float* out, int ld_out, const float* in, int ld_in, const float* w, int width,
                                    float eps) {
    rms_norm_row<RMS_HELD>(out, ld_out, in, ld_in, w, width, eps);
}

extern "C" __global__ void __launch_bounds__(256) rms_norm_many(float* out, int ld_out, const float* in, int ld_in,
                                                               const float* w, int width, float eps) {
    rms_norm_row<RMS_HELD_MANY>(out, ld_out, in, ld_in, w, width, eps);
}

// act[r, j] = silu(gu[r, j]) * gu[r, inter + j]
// SiLU(gate) * up: the one expression of it, so every kernel that makes the activations makes
// the same bits.
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.f + expf(-g)) * u; }

extern "C" __global__ void swiglu(float* act, const float* gu, int rows, int inter) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * inter) return;
    int r = (int)(i / inter), j = (int)(i % inter);
    act[i] = silu_times(gu[(size_t)r * 2 * inter + j], gu[(size_t)r * 2 * inter + inter + j]);
}

// y[i] += x[i]: partial sums that came back from remote expert shards, added into the residual.
extern "C" __global__ void add_f32(float* y, const float* x, u64 n) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// Global expert ids to indices of the bank this GPU holds (-1: another rank runs that expert).
extern "C" __global__ void bank_expert_ids(int* out, const int* ids, const int* bank_of, int n_experts, int n) {
    await_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int e = ids[i];
    out[i] = (e >= 0 && e < n_experts) ? bank_of[e] : -1;
}

// The NCCL data plane. Slots whose expert `owner` gives to data-plane peer `peer` keep their
// global expert id, the others get -1: each peer computes only its share of the routes.
extern "C" __global__ void peer_expert_ids(int* out, const int* ids, const int* owner, int peer, int n_experts, int n) {
    await_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int e = ids[i];
    out[i] = (e >= 0 && e < n_experts && owner[e] == peer) ? e : -1;
}

// counts[e] += slots routed to expert e (serving metrics of a rank whose experts run elsewhere).
extern "C" __global__ void count_routes(unsigned* counts, const int* ids, int n_experts, int n) {
    await_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int e = ids[i];
    if (e >= 0 && e < n_experts) atomicAdd(&counts[e], 1u);
}

// y[i] += x[i] with x in bf16: a peer's partial sums, as the data plane carries them.
extern "C" __global__ void add_bf16_f32(float* y, const bf16* x, u64 n) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += bf16_to_f32((u32)x[i]);
}

extern "C" __global__ void bf16_to_f32_rows(float* out, const bf16* in, u64 n) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32((u32)in[i]);
}

// Rotates interleaved pairs of `dim` values at `offset` inside each of `heads` vectors of each
// row (row stride ld, head stride hs). cos/sin are the rotary table, [position][dim/2], already
// carrying YaRN's factor; row r is at position lens[r] - 1 (its context length minus one; a
// padding row, of length 0, rotates as position 0). grid (rows, blocks a row): a row's
// heads * dim / 2 pairs spread over gridDim.y blocks, so a decode step's few rows do not leave
// each thread a chain of loads (128 heads of one row in one block took 10 µs).
extern "C" __global__ void rope_interleaved(float* x, int ld, int heads, int hs, int offset, int dim,
                                            const float* cos_t, const float* sin_t, const int* lens) {
    await_previous_kernel();
    int r = blockIdx.x, half = dim / 2;
    size_t at = (size_t)max(lens[r] - 1, 0) * half;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < heads * half; i += gridDim.y * blockDim.x) {
        int h = i / half, j = i % half;
        float* p = x + (size_t)r * ld + (size_t)h * hs + offset + 2 * j;
        const float2 v = rotate_pair(p[0], p[1], cos_t[at + j], sin_t[at + j]);
        p[0] = v.x;
        p[1] = v.y;
    }
}

// rope_interleaved of `heads` heads of dim rotated values at `offset` in each head of hs values
// (rows of ld = heads * hs), then the whole rows in bf16 (xb, same layout): one launch for the
// queries of a step, which the absorption, the decode kernel and the prefill attention read in
// bf16. The rotated pairs are written back to x too; every value has the bits of the two kernels
// one after the other. grid (rows, blocks a row); hs, offset and dim even. Four pairs a thread
// (two 16-byte loads, one 16-byte store) where ld % 8 == 0, else one: a pair a thread moved a
// prefill's queries at two thirds of the memory's rate.
__device__ __forceinline__ float2 rope_pair(float2 v, int pair, int hs, int offset, int dim, const float* cos_t,
                                            const float* sin_t, size_t at, bool& rotated) {
    const int j = (2 * pair) % hs - offset;  // the value's place in its head's rotary block
    if (j < 0 || j >= dim) return v;
    rotated = true;
    return rotate_pair(v.x, v.y, cos_t[at + j / 2], sin_t[at + j / 2]);
}
extern "C" __global__ void rope_interleaved_bf16(float* x, u32* xb, int ld, int hs, int offset, int dim,
                                                 const float* cos_t, const float* sin_t, const int* lens) {
    await_previous_kernel();
    const int r = blockIdx.x, half = dim / 2;
    const size_t at = (size_t)max(lens[r] - 1, 0) * half;
    float* row = x + (size_t)r * ld;
    u32* row_b = xb + (size_t)r * (ld / 2);
    const int stride = gridDim.y * blockDim.x;
    if (ld % 8 == 0) {
        for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < ld / 8; i += stride) {
            float4* p = (float4*)row + 2 * i;
            const float4 a = p[0], b = p[1];
            float2 v[4] = {make_float2(a.x, a.y), make_float2(a.z, a.w), make_float2(b.x, b.y), make_float2(b.z, b.w)};
            bool rotated = false;
#pragma unroll
            for (int q = 0; q < 4; ++q) v[q] = rope_pair(v[q], 4 * i + q, hs, offset, dim, cos_t, sin_t, at, rotated);
            if (rotated) {
                p[0] = make_float4(v[0].x, v[0].y, v[1].x, v[1].y);
                p[1] = make_float4(v[2].x, v[2].y, v[3].x, v[3].y);
            }
            ((uint4*)row_b)[i] = make_uint4(pack_bf16(v[0].x, v[0].y), pack_bf16(v[1].x, v[1].y),
                                            pack_bf16(v[2].x, v[2].y), pack_bf16(v[3].x, v[3].y));
        }
        return;
    }
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < ld / 2; i += stride) {
        float2* p = (float2*)row + i;
        bool rotated = false;
        const float2 v = rope_pair(*p, i, hs, offset, dim, cos_t, sin_t, at, rotated);
        if (rotated) *p = v;
        row_b[i] = pack_bf16(v.x, v.y);
    }
}

// rope_interleaved on bf16 rows in place (a prefill's queries, which their product wrote as
// bf16; ld bf16 values a row): each pair widened, rotated as rope_interleaved rotates it and
// rounded back, so the bits are those of rope_interleaved_bf16 on the widened rows. Four pairs a
// thread (one 16-byte load and store) where ld, hs, offset and dim are multiples of 8, else one.
__device__ __forceinline__ u32 rotate_bf16_pair(u32 v, float c, float s) {
    const float2 r = rotate_pair(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u), c, s);
    return pack_bf16(r.x, r.y);
}
extern "C" __global__ void rope_interleaved_bf16_in_place(u32* x, int ld, int heads, int hs, int offset, int dim,
                                                          const float* cos_t, const float* sin_t, const int* lens) {
    await_previous_kernel();
    const int r = blockIdx.x, half = dim / 2;
    const size_t at = (size_t)max(lens[r] - 1, 0) * half;
    u32* row = x + (size_t)r * (ld / 2);
    const int per = (ld % 8 == 0 && hs % 8 == 0 && offset % 8 == 0 && dim % 8 == 0) ? 4 : 1;  // pairs a thread
    const int runs = half / per;                                                              // a head's
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < heads * runs; i += gridDim.y * blockDim.x) {
        const int j = (i % runs) * per;
        u32* p = row + ((i / runs) * hs + offset) / 2 + j;
        const float* c = cos_t + at + j;
        const float* s = sin_t + at + j;
        if (per == 4) {
            uint4 v = *(uint4*)p;
            v = make_uint4(rotate_bf16_pair(v.x, c[0], s[0]), rotate_bf16_pair(v.y, c[1], s[1]),
                           rotate_bf16_pair(v.z, c[2], s[2]), rotate_bf16_pair(v.w, c[3], s[3]));
            *(uint4*)p = v;
        } else {
            *p = rotate_bf16_pair(*p, c[0], s[0]);
        }
    }
}

extern "C" __global__ void f32_to_bf16_rows(bf16* out, const float* in, u64 n) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(in[i]);
}

// The same for n8 groups of 8 values, 16-byte aligned: two 16-byte loads and one 16-byte store
// a thread (one value a thread left the copy at a fraction of the memory's rate).
extern "C" __global__ void f32_to_bf16_x8(uint4* out, const float4* in, u64 n8) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const float4 a = in[2 * i], b = in[2 * i + 1];
    out[i] = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
}

// out[r] = the table's row ids[r]. grid (rows, blocks a row), the row's width spread over
// gridDim.y blocks (one block walking a row of 7,168 took 13 µs of a decode step). A bf16 table
// (DeepSeek-V3's) moves eight values a thread a step, one 16-byte load and two 16-byte stores
// (one value a thread moved a prefill's 4,096 rows at under half the memory's rate).
extern "C" __global__ void embed_rows(float* out, int fmt, const void* table, const float* scale, const u32* ids,
                                      int width) {
    await_previous_kernel();
    float* dst = out + (size_t)blockIdx.x * width;
    const u32 id = ids[blockIdx.x];
    const int first = blockIdx.y * blockDim.x + threadIdx.x, step = gridDim.y * blockDim.x;
    if (fmt == FMT_BF16 && width % 8 == 0) {
        const uint4* src = (const uint4*)((const bf16*)table + (size_t)id * width);
        float4* to = (float4*)dst;
        for (int i = first; i < width / 8; i += step) {
            const uint4 p = src[i];
            to[2 * i] = bf16x4_to_f32(p.x, p.y);
            to[2 * i + 1] = bf16x4_to_f32(p.z, p.w);
        }
        return;
    }
    const int scale_cols = (width + QBLOCK - 1) / QBLOCK;
    for (int i = first; i < width; i += step) dst[i] = weight_at(fmt, table, scale, scale_cols, id, i, width);
}

// Dequantises rows [r0, r0+n) of a weight into bf16 for the tensor-core GEMM path.
extern "C" __global__ void dequant_bf16(bf16* out, int fmt, const void* w, const float* scale, int r0, int n, int k) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * k) return;
    u64 r = r0 + i / k, c = i % k;
    int scale_cols = (k + QBLOCK - 1) / QBLOCK;
    out[i] = f32_to_bf16(weight_at(fmt, w, scale, scale_cols, r, c, k));
}

// FP8 -> bf16 with the block scales, 16 elements per thread (k % 16 == 0, n * k < 2^32).
extern "C" __global__ void dequant_fp8_bf16(bf16* out, const u8* w, const float* scale, int n, int k) {
    await_previous_kernel();
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
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    u32 exp = 3 + (h >> 8) % 7, mant = h & 7, sign = (h >> 16) & 1;
    w[i] = (u8)((sign << 7) | (exp << 3) | mant);
}

// Uniform values in [lo, hi).
extern "C" __global__ void random_f32(float* w, u64 n, u64 seed, float lo, float hi) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    w[i] = lo + (hi - lo) * ((h >> 8) * (1.f / 16777216.f));
}

extern "C" __global__ void random_bf16(bf16* w, u64 n, u64 seed, float lo, float hi) {
    await_previous_kernel();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 h = hash_u32(seed * 0x9E3779B97F4A7C15ull + i);
    w[i] = f32_to_bf16(lo + (hi - lo) * ((h >> 8) * (1.f / 16777216.f)));
}

// Reads n float4s once (the read-stream rate: the floor of a kernel that only reads, as decode
// attention does). The sum is written only if it hits a value it never does, so the loads stay.
extern "C" __global__ void read_stream(const float4* x, u64 n, float* out) {
    await_previous_kernel();
    float acc = 0.f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float4 v = x[i];
        acc += (v.x + v.y) + (v.z + v.w);
    }
    if (acc == 1234.5678f) out[blockIdx.x] = acc;
}

// ---------------------------------------------------------------- activations quantised to e4m3
// Every kernel here quantises per row per 128 columns, one warp per (row, 128 columns), each
// lane 4 values; k a multiple of 128, ldx of 4. ue8m0: power-of-two scales (block_scale).

// This warp's (row r, 128-column block kb) of n rows of k columns; false past the last.
__device__ __forceinline__ bool warp_block(int n, int k, int& r, int& kb) {
    int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), blocks = k / QBLOCK;
    r = warp / blocks;
    kb = warp % blocks;
    return warp < n * blocks;
}

// Rows as e4m3 with one f32 scale per row per 128 columns, the activation operand of cuBLASLt's
// block-scaled FP8 products and of the Hopper expert kernel. Output row r is row rows[r] of x
// (rows null: row r). Scales are laid out per group of output rows, as each product reads them:
// the rows offsets[g]..offsets[g+1] keep [k/128][group rows] from offsets[g] * k/128 (offsets
// null: one group of all n rows). A warp takes `span` (at most QUANT_SPAN, from tiles.rs)
// consecutive blocks of 128 values of a row, their loads in flight together: QUANT_SPAN where
// there are rows enough to fill the GPU with such warps, 1 for the few rows of a decode step.

// Where output row r's scales go: the group of rows offsets[g] .. offsets[g + 1] holding r keeps
// [k/128][group rows] from its first row on (offsets null: one group of all n rows). False for a
// row past every group (no scale to keep).
__device__ __forceinline__ bool scale_group(const int* offsets, int groups, int n, int r, int& first, int& count) {
    first = 0;
    count = n;
    if (!offsets) return true;
    // The last group starting at or before r (empty groups share their start with the next).
    int lo = 0, hi = groups - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
    }
    first = offsets[lo];
    count = offsets[lo + 1] - first;
    return r < offsets[groups];
}

// Four consecutive values as f32, from f32 or bf16 rows.
__device__ __forceinline__ float4 load4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 load4(const bf16* p) {
    const uint2 v = *(const uint2*)p;
    return bf16x4_to_f32(v.x, v.y);
}

// Four values of a split-k product's output: p itself for one split, else the sum over the
// slabs (split_stride values apart) in split order from zero, split_k_reduce's bits.
template <typename In>
__device__ __forceinline__ float4 split_sum4(const In* p, int splits, u64 split_stride) {
    if (splits == 1) return load4(p);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = 0; i < splits; ++i) {
        const float4 v = load4(p + i * split_stride);
        s = make_float4(s.x + v.x, s.y + v.y, s.z + v.z, s.w + v.w);
    }
    return s;
}

// The body of quantize_rows_fp8; with SWIGLU the values are SiLU(gate) * up of rows of x that hold
// each row's k gate values and then its k up values (ldx = 2k), the gate and up products' own
// split-k slabs where `splits` > 1 (added here, as split_k_reduce would); the activations are
// also written in f32 to `act` (n rows of k) where it is not null. x f32 or bf16.
template <bool SWIGLU, typename In>
__device__ __forceinline__ void quantize_rows(u8* out, float* scales, const In* x, int ldx, const int* rows, int n,
                                              int k, const int* offsets, int groups, int ue8m0, int span,
                                              float* act = nullptr, int splits = 1, u64 split_stride = 0) {
    const int lane = threadIdx.x & 31, blocks = k / QBLOCK, spans = (blocks + span - 1) / span;
    const int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (warp >= n * spans) return;
    const int r = warp / spans, kb0 = (warp % spans) * span, here = min(span, blocks - kb0);
    const int src = rows ? rows[r] : r;
    const In* in = x + (size_t)src * ldx + kb0 * QBLOCK + lane * 4;
    float4 v[QUANT_SPAN];
#pragma unroll
    for (int j = 0; j < QUANT_SPAN; ++j) {
        if (j >= here) continue;
        if (SWIGLU) {
            v[j] = split_sum4(in + j * QBLOCK, splits, split_stride);
            const float4 u = split_sum4(in + k + j * QBLOCK, splits, split_stride);
            v[j] = make_float4(silu_times(v[j].x, u.x), silu_times(v[j].y, u.y), silu_times(v[j].z, u.z),
                               silu_times(v[j].w, u.w));
            if (act) *(float4*)(act + (size_t)r * k + (kb0 + j) * QBLOCK + lane * 4) = v[j];
        } else {
            v[j] = load4(in + j * QBLOCK);
        }
    }
    int first, count;
    const bool keep = scale_group(offsets, groups, n, r, first, count);
#pragma unroll
    for (int j = 0; j < QUANT_SPAN; ++j) {
        if (j >= here) break;  // the same for the whole warp
        float scale;
        *(u32*)(out + (size_t)r * k + (kb0 + j) * QBLOCK + lane * 4) = quantize_lane(v[j], ue8m0, scale);
        if (lane == 0 && keep) scales[(size_t)first * blocks + (size_t)(kb0 + j) * count + (r - first)] = scale;
    }
}

extern "C" __global__ void quantize_rows_fp8(u8* out, float* scales, const float* x, int ldx, const int* rows, int n,
                                             int k, const int* offsets, int groups, int ue8m0, int span) {
    await_previous_kernel();
    quantize_rows<false>(out, scales, x, ldx, rows, n, k, offsets, groups, ue8m0, span);
}

// rms_norm, then quantize_rows_fp8 of its output rows (gridDim.x of them, one group: scales
// [width/128][rows]), in one launch: the norm is the products' input, quantised where it is made,
// with the codes and scales of the two kernels (a warp quantises 128 values it holds, or, for a
// row walked twice, reads back). width a multiple of 128, ld_out of 4.
extern "C" __global__ void rms_norm_quantize_fp8(float* out, int ld_out, const float* in, int ld_in, const float* w,
                                                 int width, float eps, u8* codes, float* scales, int ue8m0) {
    rms_norm_row<RMS_HELD>(out, ld_out, in, ld_in, w, width, eps, codes, scales, ue8m0);
}

extern "C" __global__ void __launch_bounds__(256)
    rms_norm_quantize_fp8_many(float* out, int ld_out, const float* in, int ld_in, const float* w, int width,
                               float eps, u8* codes, float* scales, int ue8m0) {
    rms_norm_row<RMS_HELD_MANY>(out, ld_out, in, ld_in, w, width, eps, codes, scales, ue8m0);
}

// quantize_rows_fp8 of swiglu's output, made from the gate and up products `gu` (n rows of 2k:
// gate, then up; with `splits` > 1 the product's split-k slabs, split_stride floats apart, not yet
// added up), the f32 activations written to `act` only where it is not null: the codes and scales
// (and activations) are those of split_k_reduce, swiglu and quantize_rows_fp8 one after another.
extern "C" __global__ void swiglu_quantize_fp8(u8* out, float* scales, const float* gu, int n, int k,
                                               const int* offsets, int groups, int ue8m0, int span, float* act,
                                               int splits, u64 split_stride) {
    await_previous_kernel();
    quantize_rows<true>(out, scales, gu, 2 * k, nullptr, n, k, offsets, groups, ue8m0, span, act, splits,
                        split_stride);
}

// swiglu_quantize_fp8 of gate and up products written as bf16 (n rows of 2k, whole): the codes and
// scales of swiglu_quantize_fp8 of those bf16 values widened to f32.
extern "C" __global__ void swiglu_quantize_fp8_bf16(u8* out, float* scales, const bf16* gu, int n, int k,
                                                    const int* offsets, int groups, int ue8m0, int span) {
    await_previous_kernel();
    quantize_rows<true>(out, scales, gu, 2 * k, nullptr, n, k, offsets, groups, ue8m0, span);
}

// quantize_rows_fp8's output for rows that repeat (a token routed to several experts), from the
// m rows quantised once (codes q [m][k], scales q_scales [k/128][m]): output row r is row rows[r]
// with its scales placed as there. One block per output row, n = gridDim.x rows.
extern "C" __global__ void gather_quantized_rows(u8* out, float* scales, const u8* q, const float* q_scales, int m,
                                                 const int* rows, int k, const int* offsets, int groups) {
    await_previous_kernel();
    const int r = blockIdx.x, src = rows[r], blocks = k / QBLOCK;
    const uint4* from = (const uint4*)(q + (size_t)src * k);
    uint4* to = (uint4*)(out + (size_t)r * k);
    for (int i = threadIdx.x; i < k / 16; i += blockDim.x) to[i] = from[i];
    int first, count;
    if (!scale_group(offsets, groups, (int)gridDim.x, r, first, count)) return;
    for (int kb = threadIdx.x; kb < blocks; kb += blockDim.x)
        scales[(size_t)first * blocks + (size_t)kb * count + (r - first)] = q_scales[(size_t)kb * m + src];
}

// Rows [n, k] as the e4m3 codes' values in bf16 (exact: e4m3 is a subset of bf16) and their
// scales [n][k/128], the activation operand of the mma.sync FP8 kernels (fp8_mma's x_scale).
extern "C" __global__ void quantize_rows_bf16(bf16* out, float* scales, const float* x, int n, int k, int ue8m0) {
    await_previous_kernel();
    int r, kb;
    if (!warp_block(n, k, r, kb)) return;
    size_t at = (size_t)r * k + kb * QBLOCK + (threadIdx.x & 31) * 4;
    float scale;
    u32 q = quantize_lane(*(const float4*)(x + at), ue8m0, scale);
    uint2 packed;
    packed.x = pack_bf16(e4m3_to_f32(q & 0xffu), e4m3_to_f32((q >> 8) & 0xffu));
    packed.y = pack_bf16(e4m3_to_f32((q >> 16) & 0xffu), e4m3_to_f32(q >> 24));
    *(uint2*)(out + at) = packed;
    if ((threadIdx.x & 31) == 0) scales[(size_t)r * (k / QBLOCK) + kb] = scale;
}

// Rows [n, k] replaced by the values an FP8 product sees (each e4m3 code times its block's
// scale), for the kernels that read f32 or bf16 activations (the GEMVs, cuBLAS on bf16).
extern "C" __global__ void quantize_rows_f32(float* out, const float* x, int n, int k, int ue8m0) {
    await_previous_kernel();
    int r, kb;
    if (!warp_block(n, k, r, kb)) return;
    size_t at = (size_t)r * k + kb * QBLOCK + (threadIdx.x & 31) * 4;
    float scale;
    u32 q = quantize_lane(*(const float4*)(x + at), ue8m0, scale);
    *(float4*)(out + at) = make_float4(e4m3_to_f32(q & 0xffu) * scale, e4m3_to_f32((q >> 8) & 0xffu) * scale,
                                       e4m3_to_f32((q >> 16) & 0xffu) * scale, e4m3_to_f32(q >> 24) * scale);
}

// A bf16 weight [rows, cols] to e4m3 with one f32 scale per 128x128 tile (scale_cols tiles per
// tile row), as the official FP8 checkpoints are made: s = max(amax, 1e-12) / 448,
// q = e4m3(W / s), W ~ q * s. One block of 256 threads per tile; edge tiles are partial.
extern "C" __global__ void quantize_weight_fp8(u8* out, float* scales, const bf16* w, int rows, int cols,
                                               int scale_cols) {
    await_previous_kernel();
    __shared__ float partial[8];
    int r0 = blockIdx.y * QBLOCK, c0 = blockIdx.x * QBLOCK;
    int nr = min(QBLOCK, rows - r0), nc = min(QBLOCK, cols - c0);
    float amax = 0.f;
    for (int i = threadIdx.x; i < nr * nc; i += blockDim.x) {
        int r = r0 + i / nc, c = c0 + i % nc;
        amax = fmaxf(amax, fabsf(bf16_to_f32(w[(size_t)r * cols + c])));
    }
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = partial[0];
    for (int k = 1; k < (int)(blockDim.x >> 5); k++) amax = fmaxf(amax, partial[k]);
    float s = fmaxf(amax, 1e-12f) / 448.0f;
    for (int i = threadIdx.x; i < nr * nc; i += blockDim.x) {
        int r = r0 + i / nc, c = c0 + i % nc;
        out[(size_t)r * cols + c] = (u8)f32_to_e4m3(bf16_to_f32(w[(size_t)r * cols + c]) / s);
    }
    if (threadIdx.x == 0) scales[blockIdx.y * scale_cols + blockIdx.x] = s;
}
