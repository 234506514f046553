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
// MLA_HG, MLA_TILE, MLA_THREADS: from tiles.rs (NVRTC -D).

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

// The two warps of head group `id` (64 threads) wait for each other.
__device__ __forceinline__ void pair_barrier(int id) { asm volatile("bar.sync %0, 64;\n" ::"r"(id)); }

extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1)
mla_decode_mma(float* o_part, float* ml_part, const float* q_lat, const float* q, int qk, int nope, int heads, int hg,
               int lora, int rope, const bf16* cache, const int* tables, const int* table_off, const int* lens,
               int block, float scale, int min_split) {
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
        if (tid < hg) {
            float* ml = ml_part + (((size_t)r * heads + h0 + tid) * splits + split) * 2;
            ml[0] = -INFINITY;
            ml[1] = 0.f;
        }
        return;
    }
    const int* tab = tables + table_off[r];
    const int ntiles = (end - begin + DEC_TILE - 1) / DEC_TILE;
    // Tile i of the split into stage i % DEC_STAGES: each cached row by DEC_THREADS / DEC_TILE
    // threads (one block-table lookup per row), rows past the end zero-filled (P is 0 there, but
    // 0 * NaN is not).
    const int row_threads = DEC_THREADS / DEC_TILE, my_row = tid / row_threads, my_part = tid % row_threads;
    auto load_tile = [&](int i) {
        if (i < ntiles) {
            int base = begin + i * DEC_TILE, n = min(DEC_TILE, end - base), pos = base + min(my_row, n - 1);
            const bf16* src = cache + ((size_t)tab[pos / block] * block + pos % block) * width;
            u32 dst = tiles + ((i % DEC_STAGES) * DEC_TILE + my_row) * row_bytes;
            int bytes = my_row < n ? 16 : 0;
            for (int x = my_part; x < chunks; x += row_threads)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + ((x ^ (my_row & swz)) << 4)),
                             "l"(src + 8 * x), "r"(bytes));
        }
        asm volatile("cp.async.commit_group;\n" ::);  // always a group, so the waits count tiles
    };
#pragma unroll
    for (int i = 0; i < DEC_STAGES - 1; ++i) load_tile(i);
    // Q as bf16: rows past hg are zero (their scores are never used).
    for (int e = tid; e < 64 * (width / 2); e += blockDim.x) {
        int hh = e / (width / 2), c = 2 * (e - hh * (width / 2));
        float2 v = make_float2(0.f, 0.f);
        if (hh < hg)
            v = c < lora ? *(const float2*)(q_lat + ((size_t)r * heads + h0 + hh) * lora + c)
                         : *(const float2*)(q + (size_t)r * heads * qk + (size_t)(h0 + hh) * qk + nope + (c - lora));
        u32 at = qs + hh * row_bytes + (((c >> 3) ^ (hh & swz)) << 4) + (c & 7) * 2;
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(at), "r"(pack_bf16(v.x, v.y)));
    }
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
        load_tile(it + DEC_STAGES - 1);
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
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            tm0 = fmaxf(tm0, __shfl_xor_sync(0xffffffffu, tm0, o));
            tm1 = fmaxf(tm1, __shfl_xor_sync(0xffffffffu, tm1, o));
        }
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
    // row sums: this thread's positions, then the warp's, then both halves
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    }
    float* sums = red + 128;
    float* final_max = red + 256;
    if (t == 0) {
        sums[half * 64 + hw * 16 + g] = l0;
        sums[half * 64 + hw * 16 + g + 8] = l1;
        if (half == 0) { final_max[hw * 16 + g] = m0; final_max[hw * 16 + g + 8] = m1; }
    }
    // partial outputs: o_part[r, h, split, :lora], ml_part[r, h, split, 2]
    const int head0 = hw * 16 + g, head1 = head0 + 8;
#pragma unroll
    for (int nt = 0; nt < 32; ++nt) {
        if (nt < 2 * col_pairs) {
            int c = half * (lora / 2) + nt * 8 + 2 * t;
            if (head0 < hg)
                *(float2*)(o_part + (((size_t)r * heads + h0 + head0) * splits + split) * lora + c) =
                    make_float2(acc[nt][0], acc[nt][1]);
            if (head1 < hg)
                *(float2*)(o_part + (((size_t)r * heads + h0 + head1) * splits + split) * lora + c) =
                    make_float2(acc[nt][2], acc[nt][3]);
        }
    }
    __syncthreads();
    if (tid < hg) {
        float* ml = ml_part + (((size_t)r * heads + h0 + tid) * splits + split) * 2;
        ml[0] = final_max[tid] * 0.6931471805599453f;  // back to natural-log units for the merge
        ml[1] = sums[tid] + sums[64 + tid];
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
