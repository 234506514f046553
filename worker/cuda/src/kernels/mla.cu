// ---------------------------------------------------------------- MLA, weight-absorbed form
// kv_b rows: head h owns rows h*(nope+v) + [0, nope) (W_UK) and + [nope, nope+v) (W_UV), each
// row `lora` wide. Weights are FP8/BF16/F32 (fmt).

// q_lat[t, h, c] = sum_d q[t, h, d] * W_UK[h][d, c]   (d < nope; q row stride heads*qk); q_lat f32,
// or bf16 with `bf16_out` (what the wgmma decode copies by TMA).
// grid (heads, ceil(m / 8)), block = lora threads (<= 1024).
extern "C" __global__ void mla_absorb_q(void* q_lat, const float* q, int m, int heads, int qk, int nope, int vdim,
                                        int lora, int fmt, const void* w, const float* scale, int bf16_out) {
    await_previous_kernel();
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
    for (int tt = 0; tt < mt; ++tt) {
        const size_t at = ((size_t)(t0 + tt) * heads + h) * lora + c;
        if (bf16_out) ((bf16*)q_lat)[at] = f32_to_bf16(acc[tt]);
        else ((float*)q_lat)[at] = acc[tt];
    }
}

// out[t, h*vdim + j] = sum_c o_lat[t, h, c] * W_UV[h][j, c]. Block per (head, 8 rows): the rows'
// latents sit in shared memory, each warp streams W_UV rows j = warp, warp+8, ... once.
// grid (heads, ceil(m / 8)), block 256, lora <= 512.
extern "C" __global__ void mla_absorb_out(float* out, const float* o_lat, int m, int heads, int nope, int vdim,
                                          int lora, int fmt, const void* w, const float* scale) {
    await_previous_kernel();
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

// Each row's latent made ready in one launch, where it took three (rms_norm, rope_interleaved
// and a copy into the cache) and with their bits at the same block size: c_kv (the first `lora` values of
// the row, row stride ld) RMS-normed with w, k_pe (the `rope` values after it) rotated for
// position lens[r] - 1, both written back in place (f32) and, unless the row's slot is -1 (a
// padding row of a graphed step), into the paged cache as bf16. One block a row; the row is
// held in registers as rms_norm holds it, and the rotation is made while its sum is reduced.
extern "C" __global__ void kv_latent(float* kv, int ld, const float* w, int lora, int rope, float eps,
                                     const float* cos_t, const float* sin_t, const int* lens, bf16* cache,
                                     const int* slots) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    float* x = kv + (size_t)r * ld;
    const bool held = rows_fit_held(kv, ld, w, kv, ld, lora);
    HeldRow<> h;
    float ss = 0.f;
    if (held) {
        ss = held_row(h, x, w, lora);
    } else {
        await_previous_kernel();
        for (int i = threadIdx.x; i < lora; i += blockDim.x) ss += x[i] * x[i];
    }
    const int slot = slots[r];
    bf16* dst = slot >= 0 ? cache + (size_t)slot * (lora + rope) : nullptr;
    const int half = rope / 2;
    const size_t at = (size_t)max(lens[r] - 1, 0) * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float* p = x + lora + 2 * j;
        const float2 v = rotate_pair(p[0], p[1], cos_t[at + j], sin_t[at + j]);
        p[0] = v.x;
        p[1] = v.y;
        if (dst) *(u32*)(dst + lora + 2 * j) = pack_bf16(v.x, v.y);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)lora + eps);
    if (held) {
#pragma unroll
        for (int j = 0; j < RMS_HELD; ++j) {
            const int f = threadIdx.x + j * blockDim.x;
            if (f >= lora / 4) break;
            const float4 v = held_normed(h, j, inv);
            ((float4*)x)[f] = v;
            if (dst) {  // a cache row is 8-byte aligned where lora + rope is a multiple of 4
                const u32 lo = pack_bf16(v.x, v.y), hi = pack_bf16(v.z, v.w);
                if ((lora + rope) % 4 == 0) {
                    *(uint2*)(dst + 4 * f) = make_uint2(lo, hi);
                } else {
                    *(u32*)(dst + 4 * f) = lo;
                    *(u32*)(dst + 4 * f + 2) = hi;
                }
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < lora; i += blockDim.x) {
        const float v = x[i] * inv * w[i];
        x[i] = v;
        if (dst) dst[i] = f32_to_bf16(v);
    }
}

// Attention over the latent cache for HG heads of one token row per block, online softmax over
// tiles of TILE positions; every cached latent is read once per head group, not once per head.
//   scores[h, j] = scale * (q_lat[h] . c_j + q_pe[h] . kpe_j)     (c_j = cache[j][:lora])
//   o_lat[h]     = sum_j softmax_j * c_j
// Row r sees positions 0..lens[r]-1 of its sequence; position p lives in slot
// tables[table_off[r] + p / block] * block + p % block. grid (heads / HG, m), block 256.
// MLA_HG, MLA_TILE, MLA_THREADS: from tiles.rs (NVRTC -D).

extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_attend(float* o_lat, const float* q_lat, const float* q, int qk, int nope, int heads, int hg, int lora, int rope,
           const bf16* cache, const int* tables, const int* table_off, const int* lens, int block, float scale) {
    await_previous_kernel();
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
                const float inv = l_run[hh] > 0.f ? 1.f / l_run[hh] : 0.f;  // an empty row (padding): zeros
                float* dst = o_lat + ((size_t)r * heads + h0 + hh) * lora + c0;
                dst[0] = o[hh][0] * inv;
                dst[1] = o[hh][1] * inv;
            }
    }
}

extern "C" __global__ void gather_rows_f32(float* out, const float* x, int ldx, const int* rows, int width) {
    await_previous_kernel();
    const float* src = x + (size_t)rows[blockIdx.x] * ldx;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// ---------------------------------------------------------------- MLA decode on the tensor cores
// Absorbed-form attention for up to 64 heads of one row per block over one split of the row's
// cached positions (flash-decoding: unnormalised O, row max and row sum per split go to o_part /
// ml_part, and mla_combine merges the splits). Every cached latent is read once per 64 heads, in
// tiles of DEC_TILE positions loaded DEC_STAGES - 1 tiles ahead (cp.async).
// 8 warps: warp w takes heads 16 * (w % 4) .. + 16 and half h = w / 4, which is
//   - for S = Q·Kᵀ (K = the tile's lora + rope columns): positions h * DEC_TILE / 2 .. of the tile,
//   - for O += P·V (V = the tile's first lora columns): output columns h * lora / 2 ..,
// so the two warps of a head group trade their row maxima and their halves of P through shared
// memory, behind a 64-thread named barrier. mma.sync m16n8k16 with operands from ldmatrix; plain
// bf16 Q and P, f32 accumulation and softmax (FlashMLA's precision).
// Q and the tiles are stored unpadded (so 64-position tiles fit twice beside Q), with each row's
// 16-byte chunks XOR-swizzled by the row's low bits: the 8 rows one ldmatrix reads fall in
// different banks.
// Needs (lora + rope) % 16 == 0, lora % 64 == 0, lora <= 512, hg <= 64.
// DEC_THREADS, DEC_TILE, DEC_STAGES, DEC_PAD: from tiles.rs (NVRTC -D).

// A split with no positions: an empty partial (l = 0) that the merge skips, or, when the row has
// only one split (its output written directly, bf16 with `bf16_out`), zeros.
__device__ __forceinline__ void empty_split(float* o_part, float* ml_part, size_t head0, int hg, int splits, int split,
                                            int lora, int bf16_out) {
    if (splits == 1) {
        if (bf16_out)
            for (int i = threadIdx.x; i < hg * lora; i += blockDim.x) ((bf16*)o_part)[head0 * lora + i] = bf16(0);
        else
            for (int i = threadIdx.x; i < hg * lora; i += blockDim.x) o_part[head0 * lora + i] = 0.f;
        return;
    }
    if (threadIdx.x < hg) {
        float* ml = ml_part + ((head0 + threadIdx.x) * splits + split) * 2;
        ml[0] = -INFINITY;
        ml[1] = 0.f;
    }
}

// The end of a split, shared by both decode kernels. The thread holds rows `row` and `row + 8`
// (of 64) of half `half`: its running max (base 2) and partial row sums, and output columns
// col0 + 8j + 2t, + 1 for j < n8 in acc[j] (rows row: [0], [1]; row + 8: [2], [3]). The halves'
// sums meet in `red`; then the partial output goes to o_part with its max and sum in ml_part, or,
// for a row's only split, the normalised output (o_part is then o_lat, bf16 with `bf16_out`: what
// the tensor-core absorption reads, rounded as f32_to_bf16_x8 rounds) — by a division, as
// mla_combine's, so one split or several with one non-empty give the same bits (a graphed step,
// split for the cache's capacity, and a launched one agree). The outputs pass through `stage`
// (64 x lora floats of shared memory no longer read: the tiles) so that each head's row leaves in
// whole 16-byte chunks a thread, a warp writing 512 contiguous bytes; written straight from the
// fragments, eight rows' 32-byte pieces an instruction, the stores took 5.9 of a batch-1 block's
// 19.3 µs (the timeline probe).
__device__ __forceinline__ void finish_split(float (*acc)[4], int n8, float l0, float l1, float m0, float m1,
                                             float* red, float* stage, int half, int row, int t, float* o_part,
                                             float* ml_part, size_t head0, int hg, int splits, int split, int lora,
                                             int col0, int bf16_out) {
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    float* sums = red + 128;       // [2][64]
    float* final_max = red + 256;  // [64]
    if (t == 0) {
        sums[half * 64 + row] = l0;
        sums[half * 64 + row + 8] = l1;
        if (half == 0) { final_max[row] = m0; final_max[row + 8] = m1; }
    }
    __syncthreads();  // the sums are in, and every thread is done with the tiles `stage` covers
    // A row's 16-byte chunk c sits at chunk c ^ ((row & 3) << 1) of its row in `stage`: the eight
    // rows one store instruction writes land in distinct banks, four rows a 128-byte wavefront.
    const int chunks = lora / 4;
    const auto staged = [&](int rr, int c) { return stage + rr * lora + 4 * (c ^ ((rr & 3) << 1)); };
    if (splits == 1) {
        const float d0 = sums[row] + sums[64 + row], d1 = sums[row + 8] + sums[64 + row + 8];
#pragma unroll
        for (int j = 0; j < 32; ++j)
            if (j < n8) {
                const int c = col0 + 8 * j + 2 * t;
                *(float2*)(staged(row, c >> 2) + (c & 3)) = make_float2(acc[j][0] / d0, acc[j][1] / d0);
                *(float2*)(staged(row + 8, c >> 2) + (c & 3)) = make_float2(acc[j][2] / d1, acc[j][3] / d1);
            }
    } else {  // a partial output, unnormalised: no division (by 1, it would change no bit)
#pragma unroll
        for (int j = 0; j < 32; ++j)
            if (j < n8) {
                const int c = col0 + 8 * j + 2 * t;
                *(float2*)(staged(row, c >> 2) + (c & 3)) = make_float2(acc[j][0], acc[j][1]);
                *(float2*)(staged(row + 8, c >> 2) + (c & 3)) = make_float2(acc[j][2], acc[j][3]);
            }
    }
    __syncthreads();
    if (splits == 1 && bf16_out) {  // two chunks a thread, one 16-byte store of eight bf16
        const int pairs = chunks / 2;
        for (int i = threadIdx.x; i < hg * pairs; i += blockDim.x) {
            const int rr = i / pairs, c = 2 * (i - rr * pairs);
            const float4 a = *(const float4*)staged(rr, c), b = *(const float4*)staged(rr, c + 1);
            *(uint4*)((bf16*)o_part + (head0 + rr) * lora + 4 * c) =
                make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        return;
    }
    for (int i = threadIdx.x; i < hg * chunks; i += blockDim.x) {
        const int rr = i / chunks, c = i - rr * chunks;
        *(float4*)(o_part + ((head0 + rr) * splits + split) * lora + 4 * c) = *(const float4*)staged(rr, c);
    }
    if (splits > 1 && threadIdx.x < hg) {
        float* ml = ml_part + ((head0 + threadIdx.x) * splits + split) * 2;
        ml[0] = final_max[threadIdx.x] * 0.6931471805599453f;  // back to natural-log units for the merge
        ml[1] = sums[threadIdx.x] + sums[64 + threadIdx.x];
    }
}

// One block's query rows as bf16 into shared memory, `at(hh, c)` the shared address of channels
// c, c + 1 of head hh: q_lat's lora channels, then q's rope channels from `nope` on; heads past hg
// are zero. Its loads are the first thing a block waits on, so many are in flight at once: twelve
// 16-byte loads a thread where the rows allow (four channels never straddle lora and lie in one
// 16-byte chunk of either layout), eight 8-byte loads otherwise.
template <typename At>
__device__ __forceinline__ void load_q(At at, const float* q_lat, const float* q, size_t head0, int qk, int nope,
                                       int hg, int lora, int width) {
    const auto src = [&](int hh, int c) {
        return c < lora ? q_lat + (head0 + hh) * lora + c : q + (head0 + hh) * qk + nope + (c - lora);
    };
    if ((qk | nope | lora | width) % 4 == 0) {
        const int quads = 64 * (width / 4);
        for (int e0 = threadIdx.x; e0 < quads; e0 += 12 * blockDim.x) {
            float4 v[12];
#pragma unroll
            for (int u = 0; u < 12; ++u) {
                int e = e0 + u * blockDim.x, hh = e / (width / 4), c = 4 * (e - hh * (width / 4));
                v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
                if (e < quads && hh < hg) v[u] = *(const float4*)src(hh, c);
            }
#pragma unroll
            for (int u = 0; u < 12; ++u) {
                int e = e0 + u * blockDim.x, hh = e / (width / 4), c = 4 * (e - hh * (width / 4));
                if (e < quads)
                    asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(at(hh, c)), "r"(pack_bf16(v[u].x, v[u].y)),
                                 "r"(pack_bf16(v[u].z, v[u].w)));
            }
        }
        return;
    }
    const int pairs = 64 * (width / 2);
    for (int e0 = threadIdx.x; e0 < pairs; e0 += 8 * blockDim.x) {
        float2 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            int e = e0 + u * blockDim.x, hh = e / (width / 2), c = 2 * (e - hh * (width / 2));
            v[u] = make_float2(0.f, 0.f);
            if (e < pairs && hh < hg) v[u] = *(const float2*)src(hh, c);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            int e = e0 + u * blockDim.x, hh = e / (width / 2), c = 2 * (e - hh * (width / 2));
            if (e < pairs) asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(at(hh, c)), "r"(pack_bf16(v[u].x, v[u].y)));
        }
    }
}

// The two warps of head group `id` (64 threads) wait for each other.
__device__ __forceinline__ void pair_barrier(int id) { asm volatile("bar.sync %0, 64;\n" ::"r"(id)); }

extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1)
mla_decode_mma(float* o_part, float* ml_part, const float* q_lat, const float* q, int qk, int nope, int heads, int hg,
               int lora, int rope, const bf16* cache, const int* tables, const int* table_off, const int* lens,
               int block, float scale, int min_split, int bf16_out) {
    await_previous_kernel();
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int width = lora + rope, row_bytes = width * 2, chunks = width / 8;
    // swizzle mask: the row's low 3 bits where a row has a multiple of 8 chunks (fewer otherwise)
    const int swz = chunks % 8 == 0 ? 7 : chunks % 4 == 0 ? 3 : 1;
    const int pp = DEC_TILE + DEC_PAD;
    const u32 qs = (u32)__cvta_generic_to_shared(smem_raw);         // [64][width], swizzled
    const u32 tiles = qs + 64 * row_bytes;                           // [DEC_STAGES][DEC_TILE][width], swizzled
    bf16* ps = (bf16*)(smem_raw + (64 + DEC_STAGES * DEC_TILE) * row_bytes);  // [64][pp]
    float* red = (float*)(ps + 64 * pp);  // [2][64] row maxima per half, [2][64] row sums, [64] final max
    const int r = blockIdx.y, h0 = blockIdx.x * hg, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int hw = warp & 3, half = warp >> 2;
    // Each row splits its own length (at least min_split positions per split), so the grid does
    // not depend on the lengths and a graphed step stays valid as contexts grow.
    const int len = lens[r];
    const int split_len = (max(min_split, (len + splits - 1) / splits) + DEC_TILE - 1) / DEC_TILE * DEC_TILE;
    const int begin = split * split_len, end = min(len, begin + split_len);
    if (begin >= end) {  // nothing here: an empty partial (l = 0) that the merge skips
        empty_split(o_part, ml_part, (size_t)r * heads + h0, hg, splits, split, lora, bf16_out);
        return;
    }
    const int* tab = tables + table_off[r];
    const int ntiles = (end - begin + DEC_TILE - 1) / DEC_TILE;
    // Tile i of the split into stage i % DEC_STAGES: each cached row by DEC_THREADS / DEC_TILE
    // threads, rows past the end zero-filled (P is 0 there, but 0 * NaN is not). The row's place
    // in the cache (a block-table lookup, a global load) is looked up a tile ahead, so no tile
    // waits on it.
    const int row_threads = DEC_THREADS / DEC_TILE, my_row = tid / row_threads, my_part = tid % row_threads;
    auto row_src = [&](int i) -> const bf16* {
        if (i >= ntiles) return cache;
        int base = begin + i * DEC_TILE, pos = base + min(my_row, end - base - 1);
        return cache + ((size_t)tab[pos / block] * block + pos % block) * width;
    };
    auto load_tile = [&](int i, const bf16* src) {
        if (i < ntiles) {
            u32 dst = tiles + ((i % DEC_STAGES) * DEC_TILE + my_row) * row_bytes;
            int bytes = my_row < end - (begin + i * DEC_TILE) ? 16 : 0;
            for (int x = my_part; x < chunks; x += row_threads)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + ((x ^ (my_row & swz)) << 4)),
                             "l"(src + 8 * x), "r"(bytes));
        }
        asm volatile("cp.async.commit_group;\n" ::);  // always a group, so the waits count tiles
    };
#pragma unroll
    for (int i = 0; i < DEC_STAGES - 1; ++i) load_tile(i, row_src(i));
    const bf16* next_src = row_src(DEC_STAGES - 1);
    load_q(
        [&](int hh, int c) { return qs + hh * row_bytes + (((c >> 3) ^ (hh & swz)) << 4) + (c & 7) * 2; }, q_lat, q,
        (size_t)r * heads + h0, qk, nope, hg, lora, width);
    // ldmatrix rows: A (Q, P) rows (lane & 15), chunk + (lane >> 4); non-transposed B (K) rows
    // (lane & 7) + 8 * (lane >> 4), chunk + ((lane >> 3) & 1); transposed B (V) rows
    // (lane & 7) + 8 * ((lane >> 3) & 1), chunk + (lane >> 4). Every such row is lane & 7 modulo
    // 8, so the swizzle of a lane's rows is lane & swz.
    const int sw = lane & swz;
    const u32 q_row = qs + (hw * 16 + (lane & 15)) * row_bytes;
    const int q_chunk = lane >> 4;
    const int k_row0 = half * (DEC_TILE / 2) + (lane & 7) + 8 * (lane >> 4), k_chunk = (lane >> 3) & 1;
    const int v_row0 = (lane & 7) + 8 * ((lane >> 3) & 1), v_chunk = half * (lora / 16) + (lane >> 4);
    const u32 p_addr = (u32)__cvta_generic_to_shared(ps + (hw * 16 + (lane & 15)) * pp + 8 * (lane >> 4));
    const int col_pairs = lora / 32;  // pairs of 8-column tiles per warp
    float acc[32][4];
#pragma unroll
    for (int nt = 0; nt < 32; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // heads g and g + 8 of this warp (base 2)
    const int ksteps = width / 16;
    const float scale_log2 = scale * 1.4426950408889634f;  // scores in base 2: exp2f is one instruction
    constexpr int NT = DEC_TILE / 16;                      // 8-position tiles of S per warp
    for (int it = 0; it < ntiles; ++it) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(DEC_STAGES - 2));
        __syncthreads();  // tile `it` is in for every thread; the stage loaded next is free
        load_tile(it + DEC_STAGES - 1, next_src);
        next_src = row_src(it + DEC_STAGES);
        const u32 ts = tiles + (it % DEC_STAGES) * DEC_TILE * row_bytes;
        const int n = min(DEC_TILE, end - (begin + it * DEC_TILE));
        // S for this warp's 16 heads x DEC_TILE / 2 positions
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        for (int ks = 0; ks < ksteps; ++ks) {
            u32 a[4];
            ldmatrix_x4(a, q_row + (((2 * ks + q_chunk) ^ sw) << 4));
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4];
                ldmatrix_x4(b, ts + (k_row0 + 16 * np) * row_bytes + (((2 * ks + k_chunk) ^ sw) << 4));
                mma_bf16(s[2 * np], a[0], a[1], a[2], a[3], b[0], b[1]);
                mma_bf16(s[2 * np + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
            }
        }
        float tm0 = -INFINITY, tm1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = half * (DEC_TILE / 2) + nt * 8 + 2 * t + (e & 1);
                float v = j < n ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][e] = v;
                if (e < 2) tm0 = fmaxf(tm0, v); else tm1 = fmaxf(tm1, v);
            }
        tm0 = quad_max(tm0);
        tm1 = quad_max(tm1);
        float* my_max = red + half * 64 + hw * 16;
        const float* other_max = red + (half ^ 1) * 64 + hw * 16;
        if (t == 0) { my_max[g] = tm0; my_max[g + 8] = tm1; }
        pair_barrier(1 + hw);
        const float n0 = fmaxf(m0, fmaxf(tm0, other_max[g])), n1 = fmaxf(m1, fmaxf(tm1, other_max[g + 8]));
        const float corr0 = exp2f(m0 - n0), corr1 = exp2f(m1 - n1);  // 2^-inf = 0 on the first tile
        m0 = n0;
        m1 = n1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            float p0 = exp2f(s[nt][0] - n0), p1 = exp2f(s[nt][1] - n0);
            float p2 = exp2f(s[nt][2] - n1), p3 = exp2f(s[nt][3] - n1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            int j = half * (DEC_TILE / 2) + nt * 8 + 2 * t;
            *(u32*)(ps + (hw * 16 + g) * pp + j) = pack_bf16(p0, p1);
            *(u32*)(ps + (hw * 16 + g + 8) * pp + j) = pack_bf16(p2, p3);
        }
        if (__any_sync(0xffffffffu, corr0 != 1.f || corr1 != 1.f)) {  // once the maxima settle, rarely
#pragma unroll
            for (int nt = 0; nt < 32; ++nt) {
                acc[nt][0] *= corr0; acc[nt][1] *= corr0;
                acc[nt][2] *= corr1; acc[nt][3] *= corr1;
            }
        }
        pair_barrier(1 + hw);  // both halves of P are in
        // O[16 heads, this half's columns] += P[16, DEC_TILE] · V[DEC_TILE, columns]
#pragma unroll
        for (int kk = 0; kk < DEC_TILE; kk += 16) {
            u32 a[4];
            ldmatrix_x4(a, p_addr + kk * 2);
            const u32 v_row = ts + (kk + v_row0) * row_bytes;
#pragma unroll
            for (int cp = 0; cp < 16; ++cp) {
                if (cp < col_pairs) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, v_row + (((v_chunk + 2 * cp) ^ sw) << 4));
                    mma_bf16(acc[2 * cp], a[0], a[1], a[2], a[3], b[0], b[1]);
                    mma_bf16(acc[2 * cp + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
    finish_split(acc, 2 * col_pairs, l0, l1, m0, m1, red, (float*)(smem_raw + 64 * row_bytes), half, hw * 16 + g, t,
                 o_part, ml_part,
                 (size_t)r * heads + h0, hg, splits, split, lora, half * (lora / 2), bf16_out);
}

// ---------------------------------------------------------------- MLA decode on Hopper (wgmma)
// DeepSeek-V3's shape only (lora 512, rope 64): the same split and partial outputs as
// mla_decode_mma, the products on wgmma with their operands read by the tensor cores from shared
// memory or registers. Tiles of 64 cached positions are taken in pairs (A, B) by two warpgroups
// that see-saw: group 0 scores A while group 1 scores B (m64n64k16 over all 576 channels, Q and K
// from shared memory), and each group owns half of the output columns (0: 0..255, 1: 256..511),
// to which it adds P·V of both tiles with P in registers (m64n256k16). The groups hand each
// other their row maxima and P through shared memory, in this order each pair:
//   group 0: softmax of A (against the running max) → posts the maxima and P_A → O_L += P_A·V_A
//   group 1: waits for them → O_R rescaled, += P_A·V_A; beside that product, the softmax of B
//            against group 0's maxima → posts the maxima and P_B
//   both:    the output rescaled to B's maxima, += P_B·V_B
// so that one group's softmax runs beside the other's products (FlashMLA's "seesaw" schedule),
// and P_A·V_A, whose stage the next tile A waits for, is done first by both groups.
// Each tile arrives by TMA in two halves, channel blocks 0..3 (V's left half) and 4..8 (V's
// right half and the rotary part), each on its own barrier, and each half is reloaded by the
// last group to read it as soon as its product has finished: the left halves by group 0, the
// right halves by group 1. Q comes by TMA too, in the same layout: bf16 as the absorption wrote
// it (mla_absorb_q_mma_bf16_n*, or mla_absorb_q with bf16_out), its rotary block from q's bf16
// copy. Compiled for sm_90a only.

#define WG_W 576                       // lora + rope
#define WG_TILE_BYTES (64 * WG_W * 2)  // one tile (or Q): 64 rows of 576 bf16
#define WG_BLOCK (64 * 128)            // one 64-channel block of a tile
#define WG_HANDOFF_BYTES (128 * 16 * 4 + 128 * 8)  // P fragments and maxima, one slot a thread
// Named barriers of the see-saw (0 is __syncthreads).
#define SEESAW_MAX_A 1  // group 0 has posted its maxima and P for tile A
#define SEESAW_MAX_B 2  // group 1 has posted its maxima and P for tile B
#define SEESAW_OWN 3    // + group: a group's own stores, before its products read them

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d[64, 64] (+)= A[64, 16] · B[64, 16]ᵀ, A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64_ss(float d[32], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate));
}
// d[64, 256] += A[64, 16] (registers) · B[16, 256] (N-major in shared memory).
__device__ __forceinline__ void wgmma_m64n256_rs(float d[128], const u32 a[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128,%129,%130,%131}, %132, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

#endif

// Parts of mla_decode_wgmma switched off to time the rest (DSV3_MLA_PROBE; the names and what
// each does: probes.rs, MLA_DECODE). All 0 in service.
#ifndef MLA_PROBE_LOAD_Q
#define MLA_PROBE_LOAD_Q 0
#endif
#ifndef MLA_PROBE_TILES
#define MLA_PROBE_TILES 0
#endif
#ifndef MLA_PROBE_SCORES
#define MLA_PROBE_SCORES 0
#endif
#ifndef MLA_PROBE_PV
#define MLA_PROBE_PV 0
#endif
#ifndef MLA_PROBE_FINISH
#define MLA_PROBE_FINISH 0
#endif
#ifndef MLA_PROBE_TIMELINE
#define MLA_PROBE_TIMELINE 0
#endif

// The timeline probe (a build with MLA_PROBE_TIMELINE, results unchanged): thread 0 of each block
// records the SM clock at each point of mla_decode_wgmma below, the global timer as it starts
// and ends, and the cycles its tile loop spent in each of MLA_TIMELINE_LAPS parts over all its
// tiles, into row blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z) of
// mla_timeline (the first MLA_TIMELINE_BLOCKS blocks); the host zeroes it before a run and reads
// it after (probes.rs, MLA_TIMELINE and MLA_TIMELINE_LAPS).
#define MLA_TIMELINE_BLOCKS 1024
#define MLA_TIMELINE_POINTS 10  // entry, waited, prologue, q, tile 0 in, scores 0, P 0, P·V 0, tiles, end
#define MLA_TIMELINE_LAPS 4     // tile waits, scores, softmax and P, P·V
struct MlaTime {
    u64 clock, global;
};
#if MLA_PROBE_TIMELINE
__device__ u64 mla_timeline[MLA_TIMELINE_BLOCKS][MLA_TIMELINE_POINTS + 2 + MLA_TIMELINE_LAPS];
__device__ __forceinline__ u64 mla_clock() {
    u64 c;
    asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(c)::"memory");
    return c;
}
// This block's row of mla_timeline, or null for a thread or block that records nothing.
__device__ __forceinline__ u64* mla_timeline_row() {
    const u32 b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return threadIdx.x == 0 && b < MLA_TIMELINE_BLOCKS ? mla_timeline[b] : nullptr;
}
// The tile loop's parts: each lap adds the cycles since the last to its part.
struct MlaLaps {
    u64 last, sum[MLA_TIMELINE_LAPS];
    __device__ __forceinline__ void start() {
        last = mla_clock();
        for (int i = 0; i < MLA_TIMELINE_LAPS; ++i) sum[i] = 0;
    }
    __device__ __forceinline__ void lap(int part) {
        const u64 now = mla_clock();
        sum[part] += now - last;
        last = now;
    }
    __device__ __forceinline__ void record() const {
        u64* row = mla_timeline_row();
        if (!row) return;
        for (int i = 0; i < MLA_TIMELINE_LAPS; ++i) row[MLA_TIMELINE_POINTS + 2 + i] = sum[i];
    }
};
__device__ __forceinline__ MlaTime mla_now() {
    MlaTime t;
    t.clock = mla_clock();
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t.global)::"memory");
    return t;
}
// Records `at` (by default now) as point `point` of this block; the entry is read before the
// wait for the kernel before and recorded after it, as nothing may be written before.
__device__ __forceinline__ void mla_stamp(int point, MlaTime at = mla_now()) {
    u64* row = mla_timeline_row();
    if (!row) return;
    row[point] = at.clock;
    if (point == 0 || point == MLA_TIMELINE_POINTS - 1) row[MLA_TIMELINE_POINTS + (point != 0)] = at.global;
}
#else
__device__ __forceinline__ MlaTime mla_now() { return MlaTime{0, 0}; }
__device__ __forceinline__ void mla_stamp(int, MlaTime = MlaTime{0, 0}) {}
struct MlaLaps {
    __device__ __forceinline__ void start() {}
    __device__ __forceinline__ void lap(int) {}
    __device__ __forceinline__ void record() const {}
};
#endif

// Where Q and a cache tile sit in shared memory: TMA's 128-byte swizzle, nine blocks of 64
// channels 8 KB apart, each 64 rows (heads or positions) of 128 bytes whose 16-byte chunks are
// XOR-ed with row % 8. A box of the cache's plain 2-D view ([slots][576], 64 channels by `rows`
// positions) lands in place, and the products read the layout through swizzled descriptors
// (8-row atoms 1024 bytes apart; for the N-major V, blocks of 64 channels 8 KB apart). `chunk`:
// the 16-byte chunk `c` of row `row`; `k_major`: all 64 rows at channels 16 ks .. + 16 as a
// K-major operand; `n_major`: positions pos0 .. + 16 by channels col0 .. + 256 as the N-major B
// of P·V. Needs 1024-byte aligned operands.
struct WgTile {
    static __device__ __forceinline__ u32 chunk(int row, int c) {
        return (c >> 3) * WG_BLOCK + row * 128 + (((c & 7) ^ (row & 7)) << 4);
    }
    static __device__ __forceinline__ u64 k_major(u32 base) { return smem_desc(base, 16, 1024, 1); }
    // What k-step ks adds to a k_major descriptor (its address field counts 16-byte units).
    static __device__ __forceinline__ u64 k_step(int ks) { return (u64)(((ks >> 2) * WG_BLOCK + (ks & 3) * 32) >> 4); }
    static __device__ __forceinline__ u64 n_major(u32 base, int pos0, int col0) {
        return smem_desc(base + (col0 >> 6) * WG_BLOCK + pos0 * 128, WG_BLOCK, 1024, 1);
    }
};

// What thread i of one group hands thread i of the other (they hold the same rows and columns
// of a 64 x 64 fragment): P as four 16-byte wgmma A fragments, then the two row maxima. One slot
// a thread, reused in turn: each slot is read by its one reader before its writer writes again.
struct Handoff {
    u32 base;
    int wt;  // the thread within its group
    __device__ __forceinline__ void put_p(const u32 p[16]) const {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(base + (c * 128 + wt) * 16), "r"(p[4 * c]),
                         "r"(p[4 * c + 1]), "r"(p[4 * c + 2]), "r"(p[4 * c + 3])
                         : "memory");
    }
    __device__ __forceinline__ void get_p(u32 p[16]) const {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(p[4 * c]), "=r"(p[4 * c + 1]), "=r"(p[4 * c + 2]), "=r"(p[4 * c + 3])
                         : "r"(base + (c * 128 + wt) * 16)
                         : "memory");
    }
    __device__ __forceinline__ void put_m(float m0, float m1) const {
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(base + 128 * 64 + wt * 8), "f"(m0), "f"(m1) : "memory");
    }
    __device__ __forceinline__ void get_m(float& m0, float& m1) const {
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(m0), "=f"(m1) : "r"(base + 128 * 64 + wt * 8) : "memory");
    }
    // Posts P and the maxima, then lets the other group past named barrier `id`.
    __device__ __forceinline__ void post(int id, const u32 p[16], float m0, float m1) const {
        put_p(p);
        put_m(m0, m1);
        warpgroups_arrive(id);
    }
    // What the other group posted before barrier `id`.
    __device__ __forceinline__ void take(int id, u32 p[16], float& m0, float& m1) const {
        warpgroups_sync(id);
        get_m(m0, m1);
        get_p(p);
    }
};

// One group's scores of a tile, s[4j + e] for position 8j + 2t + (e & 1) of row row0 (e < 2) or
// row0 + 8: scaled to base 2, positions from n on at -inf; the rows' maxima over the tile.
__device__ __forceinline__ void tile_scores(float s[32], int n, int t, float scale_log2, float& t0, float& t1) {
    t0 = t1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int pos = 8 * j + 2 * t + (e & 1);
            const float v = pos < n ? s[4 * j + e] * scale_log2 : -INFINITY;
            s[4 * j + e] = v;
            if (e < 2) t0 = fmaxf(t0, v); else t1 = fmaxf(t1, v);
        }
    t0 = quad_max(t0);
    t1 = quad_max(t1);
}

// P (times c0 for row0, c1 for row0 + 8) as bf16 wgmma A fragments: k-step kk (positions
// 16 kk ..) in p[4 kk ..].
__device__ __forceinline__ void pack_p(const float s[32], float c0, float c1, u32 p[16]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        p[4 * kk] = pack_bf16(s[8 * kk] * c0, s[8 * kk + 1] * c0);
        p[4 * kk + 1] = pack_bf16(s[8 * kk + 2] * c1, s[8 * kk + 3] * c1);
        p[4 * kk + 2] = pack_bf16(s[8 * kk + 4] * c0, s[8 * kk + 5] * c0);
        p[4 * kk + 3] = pack_bf16(s[8 * kk + 6] * c1, s[8 * kk + 7] * c1);
    }
}

// The output rows rescaled (skipped where a warp's factors are all 1, as they mostly are once
// the maxima settle).
__device__ __forceinline__ void rescale_rows(float o[128], float c0, float c1) {
    if (!__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) return;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        o[4 * j] *= c0; o[4 * j + 1] *= c0;
        o[4 * j + 2] *= c1; o[4 * j + 3] *= c1;
    }
}

// The output rows and their sums, kept against maxima m0, m1, brought to maxima n0, n1.
__device__ __forceinline__ void to_maxima(float o[128], float& l0, float& l1, float m0, float m1, float n0, float n1) {
    const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
    l0 *= c0;
    l1 *= c1;
    rescale_rows(o, c0, c1);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Rows n .. 63 of V's channel blocks cb0 .. cb0 + 3 of a tile zeroed by one group (thread wt of
// 128) for its P·V: past a split's end a tile holds whatever its boxes or the tile before left
// there (NaN in a poisoned test), and P = 0 there but 0 * NaN is not 0.
__device__ __forceinline__ void zero_rows_past(u32 tile, int n, int cb0, int wt, int group) {
    for (int i = wt; i < (64 - n) * 32; i += 128)
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(tile + WgTile::chunk(n + i / 32, cb0 * 8 + i % 32)),
                     "r"(0u)
                     : "memory");
    fence_async_shared();
    asm volatile("bar.sync %0, 128;\n" ::"r"(SEESAW_OWN + group) : "memory");
}

// A descriptor stepped from the first where it is used (an opaque add): the compiler otherwise
// keeps all 72 of a tile's live across the loop and spills them.
__device__ __forceinline__ u64 stepped(u64 d, u64 step) {
    u64 out;
    asm volatile("add.s64 %0, %1, %2;\n" : "=l"(out) : "l"(d), "l"(step));
    return out;
}
// s (=|+=) Q · Kᵀ over the 16-channel steps KS0 .. KS1 of a tile (`fresh`: the first step starts s).
template <int KS0, int KS1>
__device__ __forceinline__ void qk_steps(float s[32], u32 qs, u32 tile, bool fresh) {
    const u64 dq = WgTile::k_major(qs), dk = WgTile::k_major(tile);
#pragma unroll
    for (int ks = KS0; ks < KS1 && !MLA_PROBE_SCORES; ++ks)
        wgmma_m64n64_ss(s, stepped(dq, WgTile::k_step(ks)), stepped(dk, WgTile::k_step(ks)), !(fresh && ks == KS0));
}

// O[:, col0 ..+ 256] += P · V over a tile's 64 positions, P from registers; committed, not waited.
__device__ __forceinline__ void pv_tile(float o[128], const u32 p_made[16], u32 tile, int col0) {
    u32 p[16];  // made before the fence (left to the compiler, it packs between the products)
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        p[i] = p_made[i];
        asm volatile("" : "+r"(p[i]));
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4 && !MLA_PROBE_PV; ++kk) wgmma_m64n256_rs(o, p + 4 * kk, WgTile::n_major(tile, 16 * kk, col0));
    wgmma_commit();
}
#endif

__device__ __forceinline__ void mla_decode_wgmma_body(float* o_part, float* ml_part, int heads, int hg,
                                                      const int* tables, const int* table_off, const int* lens,
                                                      int block, float scale, int min_split, const TensorMap* cache_map,
                                                      int tma_rows, const TensorMap* q_lat_map, const TensorMap* q_map,
                                                      int nope, int bf16_out) {
    const MlaTime entry = mla_now();
    await_previous_kernel();  // lora == 512, rope == 64
    mla_stamp(0, entry);
    mla_stamp(1);
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 qs = (raw + 1023) & ~1023u;  // Q: 64 heads (the host adds 1 KB for this rounding)
    const u32 tiles = qs + WG_TILE_BYTES;  // stage 0 (tiles A), stage 1 (tiles B)
    const u32 handoff = tiles + 2 * WG_TILE_BYTES;
    const u32 bars = handoff + WG_HANDOFF_BYTES;  // [stage][half] TMA barriers, then Q's
    const u32 q_bar = bars + 32;
    const auto bar = [&](int stage, int half) { return bars + 16 * stage + 8 * half; };
    const int r = blockIdx.y, h0 = blockIdx.x * hg, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, h = tid >> 7, wt = tid & 127, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row0 = (wt >> 5) * 16 + g;  // the thread's rows: row0 and row0 + 8
    const int len = lens[r];
    const int split_len = (max(min_split, (len + splits - 1) / splits) + 63) / 64 * 64;
    const int begin = split * split_len, end = min(len, begin + split_len);
    if (begin >= end) {
        empty_split(o_part, ml_part, (size_t)r * heads + h0, hg, splits, split, 512, bf16_out);
        mla_stamp(MLA_TIMELINE_POINTS - 1);
        return;
    }
    const int* tab = tables + table_off[r];
    const int ntiles = (end - begin + 63) / 64, npairs = (ntiles + 1) / 2;
    const auto positions = [&](int i) { return min(64, end - (begin + i * 64)); };
    const auto slot_of = [&](int pos) { return tab[pos / block] * block + pos % block; };
    // Half `half` of tile i (channel blocks 4 half .. + 4 + half) into stage i % 2 as boxes of
    // tma_rows positions (those wholly past the end skipped), completing on the half's barrier;
    // thread 0 loads the left halves, thread 128 the right ones, each in tile order, the first
    // box's slot of a stage's next tile looked up a load ahead.
    int next_slot0 = 0, next_slot1 = 0;  // stage 0's, stage 1's
    const auto load_half = [&](int i, int half) {
        const int stage = i & 1, base = begin + i * 64, boxes = (positions(i) + tma_rows - 1) / tma_rows;
        const int cb0 = 4 * half, ncb = 4 + half;
        const u32 b = bar(stage, half), dst = tiles + stage * WG_TILE_BYTES;
        if (!MLA_PROBE_TILES) {  // probed: the barrier completes on the arrival alone
            const u64 evict_first = l2_evict_first();
            mbar_expect(b, boxes * tma_rows * 128 * ncb);
            for (int x = 0; x < boxes; ++x) {
                const int slot = x > 0 ? slot_of(base + x * tma_rows) : stage ? next_slot1 : next_slot0;
                for (int cb = cb0; cb < cb0 + ncb; ++cb)
                    tma_load_2d_hinted(dst + cb * WG_BLOCK + x * tma_rows * 128, cache_map, cb * 64, slot, b, evict_first);
            }
        }
        mbar_arrive(b);
        if (i + 2 < ntiles) (stage ? next_slot1 : next_slot0) = slot_of(base + 128);
    };
    if (wt == 0) {  // threads 0 and 128
        if (tid == 0) {
            for (int i = 0; i < 5; ++i) mbar_init(bars + 8 * i, 1);
            mbar_init_fence();
        }
        next_slot0 = slot_of(begin);
        if (ntiles > 1) next_slot1 = slot_of(begin + 64);
    }
    __syncthreads();  // the barriers are ready
    if (tid == 0) {
        // Q, bf16 as the absorption left it, in the tiles' layout: 64 heads (rows past hg are the
        // next rows' heads or zeros, scored and never written) by the eight blocks of its latent
        // part and the one of its rotary part.
        const int q_row = r * heads + h0;
        if (!MLA_PROBE_LOAD_Q) {
            mbar_expect(q_bar, WG_TILE_BYTES);
            for (int cb = 0; cb < 8; ++cb) tma_load_2d(qs + cb * WG_BLOCK, q_lat_map, cb * 64, q_row, q_bar);
            tma_load_2d(qs + 8 * WG_BLOCK, q_map, nope, q_row, q_bar);
        }
        mbar_arrive(q_bar);
    }
    if (wt == 0) {
        load_half(0, h);
        if (ntiles > 1) load_half(1, h);
    }
    mla_stamp(2);
    mbar_wait(q_bar, 0);  // Q is in
    mla_stamp(3);
    const Handoff hand{handoff, wt};
    const float scale_log2 = scale * 1.4426950408889634f;
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running maxima (base 2), this group's sums
    float s[32];
    MlaLaps laps;
    laps.start();
    // Scores of tile i, its left half waited for first (the one reloaded first); committed, not
    // waited. (A fence after each wait: a wgmma chain across the wait's loop without one is
    // serialised.)
    const auto score = [&](int i) {
        const u32 tile = tiles + (i & 1) * WG_TILE_BYTES;
        const u32 parity = (i >> 1) & 1;
        if (MLA_PROBE_SCORES)
#pragma unroll
            for (int x = 0; x < 32; ++x) s[x] = 0.f;
        mbar_wait(bar(i & 1, 0), parity);
        laps.lap(0);
        wgmma_fence();
        qk_steps<0, 16>(s, qs, tile, true);
        mbar_wait(bar(i & 1, 1), parity);
        laps.lap(0);
        wgmma_fence();
        qk_steps<16, 36>(s, qs, tile, false);
        wgmma_commit();
    };
    const u32 stage_a = tiles, stage_b = tiles + WG_TILE_BYTES;
    if (h == 0) {
        // Group 0: tiles A, output columns 0 .. 255.
        score(0);
        mla_stamp(4);
        wgmma_wait<0>();
#pragma unroll
        for (int x = 0; x < 32; ++x) hold(s[x]);
        laps.lap(1);
        mla_stamp(5);
        for (int k = 0; k < npairs; ++k) {
            const int ia = 2 * k;
            const bool has_b = ia + 1 < ntiles;
            float t0, t1;
            tile_scores(s, positions(ia), t, scale_log2, t0, t1);
            const float ma0 = fmaxf(m0, t0), ma1 = fmaxf(m1, t1);
            const float c0 = exp2f(m0 - ma0), c1 = exp2f(m1 - ma1);
            l0 *= c0;
            l1 *= c1;
            exponentiate<8>(s, ma0, ma1, l0, l1);
            u32 pa[16];
            pack_p(s, 1.f, 1.f, pa);
            hand.post(SEESAW_MAX_A, pa, ma0, ma1);
            rescale_rows(o, c0, c1);
            laps.lap(2);
            if (k == 0) mla_stamp(6);
            if (positions(ia) < 64) zero_rows_past(stage_a, positions(ia), 0, wt, 0);
            pv_tile(o, pa, stage_a, 0);
            wgmma_wait<0>();
#pragma unroll
            for (int x = 0; x < 128; ++x) hold(o[x]);
            if (wt == 0 && ia + 2 < ntiles) load_half(ia + 2, 0);  // stage A's left half is free
            laps.lap(3);
            if (k == 0) mla_stamp(7);
            // Group 1's maxima and P_B (at those maxima): O_L brought to them, += P_B·V_B.
            if (has_b) {
                float mb0, mb1;
                u32 pb[16];
                hand.take(SEESAW_MAX_B, pb, mb0, mb1);
                to_maxima(o, l0, l1, ma0, ma1, mb0, mb1);
                m0 = mb0;
                m1 = mb1;
                laps.lap(2);
                if (positions(ia + 1) < 64) zero_rows_past(stage_b, positions(ia + 1), 0, wt, 0);
                pv_tile(o, pb, stage_b, 0);
                wgmma_wait<0>();
#pragma unroll
                for (int x = 0; x < 128; ++x) hold(o[x]);
                if (wt == 0 && ia + 3 < ntiles) load_half(ia + 3, 0);  // stage B's left half is free
                laps.lap(3);
            } else {
                m0 = ma0;
                m1 = ma1;
            }
            if (k + 1 < npairs) {  // the next tile A
                score(ia + 2);
                wgmma_wait<0>();
#pragma unroll
                for (int x = 0; x < 32; ++x) hold(s[x]);
                laps.lap(1);
            }
        }
    } else {
        // Group 1: tiles B, output columns 256 .. 511.
        if (ntiles > 1) {
            score(1);
            wgmma_wait<0>();
#pragma unroll
            for (int x = 0; x < 32; ++x) hold(s[x]);
        }
        for (int k = 0; k < npairs; ++k) {
            const int ia = 2 * k;
            const bool has_b = ia + 1 < ntiles;
            // Group 0's maxima and P_A (at those maxima): O_R brought to them, += P_A·V_A, so
            // that stage A is free for the next tile A early.
            float ma0, ma1;
            u32 pa[16];
            hand.take(SEESAW_MAX_A, pa, ma0, ma1);
            to_maxima(o, l0, l1, m0, m1, ma0, ma1);
            if (positions(ia) < 64) zero_rows_past(stage_a, positions(ia), 4, wt, 1);
            pv_tile(o, pa, stage_a, 256);
            // Meanwhile the softmax of B against group 0's maxima, posted with P_B.
            float mb0 = ma0, mb1 = ma1, d0 = 1.f, d1 = 1.f;  // B's maxima, A's to B's factors
            u32 pb[16];
            if (has_b) {
                float t0, t1;
                tile_scores(s, positions(ia + 1), t, scale_log2, t0, t1);
                mb0 = fmaxf(ma0, t0);
                mb1 = fmaxf(ma1, t1);
                d0 = exp2f(ma0 - mb0);
                d1 = exp2f(ma1 - mb1);
                l0 *= d0;
                l1 *= d1;
                exponentiate<8>(s, mb0, mb1, l0, l1);
                pack_p(s, 1.f, 1.f, pb);
                hand.post(SEESAW_MAX_B, pb, mb0, mb1);
            }
            wgmma_wait<0>();
#pragma unroll
            for (int x = 0; x < 128; ++x) hold(o[x]);
            if (wt == 0 && ia + 2 < ntiles) load_half(ia + 2, 1);  // stage A's right half is free
            m0 = mb0;
            m1 = mb1;
            if (has_b) {
                rescale_rows(o, d0, d1);
                if (positions(ia + 1) < 64) zero_rows_past(stage_b, positions(ia + 1), 4, wt, 1);
                pv_tile(o, pb, stage_b, 256);
                wgmma_wait<0>();
#pragma unroll
                for (int x = 0; x < 128; ++x) hold(o[x]);
                if (wt == 0 && ia + 3 < ntiles) load_half(ia + 3, 1);  // stage B's right half is free
            }
            if (ia + 3 < ntiles) {  // the next tile B
                score(ia + 3);
                wgmma_wait<0>();
#pragma unroll
                for (int x = 0; x < 32; ++x) hold(s[x]);
            }
        }
    }
    mla_stamp(8);
    laps.record();
    if (MLA_PROBE_FINISH) {  // every sum kept alive by a store that does not happen
        float keep = l0 + l1 + m0 + m1;
#pragma unroll
        for (int i = 0; i < 128; ++i) keep += o[i];
        if (keep == 1.2345e-30f) o_part[tid] = keep;
        mla_stamp(MLA_TIMELINE_POINTS - 1);
        return;
    }
    // The row sums meet where Q was (no product reads it any more: each group's last scores were
    // waited for before the handoff the other group waited on), the outputs leave through the tiles.
    finish_split(reinterpret_cast<float(*)[4]>(o), 32, l0, l1, m0, m1, (float*)(smem_raw + (qs - raw)),
                 (float*)(smem_raw + (tiles - raw)), h, row0, t, o_part, ml_part, (size_t)r * heads + h0, hg, splits,
                 split, 512, h * 256, bf16_out);
    mla_stamp(MLA_TIMELINE_POINTS - 1);
#endif
}

// The kernel: tiles by TMA boxes of the cache's plain 2-D view (`cache_map`, tma_rows positions
// a box), 128-byte swizzled.
extern "C" __global__ void __launch_bounds__(256, 1)
    mla_decode_wgmma(float* o_part, float* ml_part, int heads, int hg, const int* tables, const int* table_off,
                     const int* lens, int block, float scale, int min_split, const __grid_constant__ TensorMap cache_map,
                     int tma_rows, const __grid_constant__ TensorMap q_lat_map, const __grid_constant__ TensorMap q_map,
                     int nope, int bf16_out) {
    mla_decode_wgmma_body(o_part, ml_part, heads, hg, tables, table_off, lens, block, scale, min_split, &cache_map,
                          tma_rows, &q_lat_map, &q_map, nope, bf16_out);
}

// Merges the splits (split_weights, merged_channels): o_lat[r, h, :] in f32 or (`bf16_out`) bf16
// as finish_split writes a row's only split. grid (heads, m); dynamic shared memory: 2 * splits
// floats (each split's weight is computed once). The partial outputs are read four channels a
// thread, sixteen splits' loads in flight (one split at a time, this kernel waited on a load per
// split per channel: 18 µs for one row of 32 splits).
extern "C" __global__ void mla_combine(void* o_lat, const float* o_part, const float* ml_part, int heads, int splits,
                                       int lora, int bf16_out) {
    await_previous_kernel();
    extern __shared__ float cw[];  // [splits] m_s, then [splits] weights
    __shared__ float scratch[32];
    int h = blockIdx.x, r = blockIdx.y;
    const float denom = split_weights(ml_part + ((size_t)r * heads + h) * splits * 2, splits, cw, scratch);
    const float* w = cw + splits;
    const float* op = o_part + ((size_t)r * heads + h) * splits * lora;
    const size_t out_at = ((size_t)r * heads + h) * lora;
    float* out = (float*)o_lat + out_at;
    bf16* out_bf16 = (bf16*)o_lat + out_at;
    if (lora % 4 == 0) {
        for (int c = 4 * threadIdx.x; c < lora; c += 4 * blockDim.x) {
            const float4 o = merged_channels(op, w, splits, lora, c, denom);
            if (bf16_out)
                *(uint2*)(out_bf16 + c) = make_uint2(pack_bf16(o.x, o.y), pack_bf16(o.z, o.w));
            else
                *(float4*)(out + c) = o;
        }
        return;
    }
    for (int c = threadIdx.x; c < lora; c += blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < splits; ++s)
            if (w[s] > 0.f) v += w[s] * op[(size_t)s * lora + c];
        const float o = denom > 0.f ? v / denom : 0.f;
        if (bf16_out)
            out_bf16[c] = f32_to_bf16(o);
        else
            out[c] = o;
    }
}
