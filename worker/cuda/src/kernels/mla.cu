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
// Absorbed-form attention for 16 heads of one row per block, positions split across gridDim.z
// (flash-decoding): S = Q·Tᵀ and O += P·T[:, :lora] with mma.sync m16n8k16 (bf16 in, f32
// accumulate), online softmax per tile of 64 positions. Partial results (unnormalised O, row
// max, row sum) go to o_part / ml_part and mla_combine merges the splits.
// Needs (lora + rope) % 16 == 0, lora % 64 == 0, lora <= 512. 8 warps; warp w computes scores
// for positions w*8.. of each tile and owns output columns [w*lora/8, (w+1)*lora/8).
// TC_TILE, TC_PAD, TC_WARPS: from tiles.rs (NVRTC -D).



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
