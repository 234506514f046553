// ---------------------------------------------------------------- MLA, naive form (prefill)
// Latents of positions 0..total of one sequence from the paged cache, split into c_kv (f32,
// [total, lora], the input of kv_b's product) and k_pe (bf16 as cached, [total, rope], K's rotary
// part).
extern "C" __global__ void gather_latents(float* c_kv, bf16* k_pe, const bf16* cache, const int* table, int block,
                                          int lora, int rope) {
    await_previous_kernel();
    int p = blockIdx.x, width = lora + rope;
    const bf16* src = cache + ((size_t)table[p / block] * block + p % block) * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        if (i < lora) c_kv[(size_t)p * lora + i] = bf16_to_f32(src[i]);
        else k_pe[(size_t)p * rope + (i - lora)] = src[i];
    }
}

// For the mma.sync kernel, from kv = c_kv · kv_bᵀ (bf16 [total, heads, nope + v]) and k_pe (bf16
// [total, rope]): K [total, heads, nope + rope] and V [total, heads, v] (the Hopper kernel reads
// kv and k_pe in place).
extern "C" __global__ void build_kv(bf16* k, bf16* v, const bf16* kv, const bf16* k_pe, int heads, int nope, int rope,
                                    int vdim) {
    await_previous_kernel();
    int p = blockIdx.x, qk = nope + rope, per = nope + vdim;
    for (int i = threadIdx.x; i < heads * qk; i += blockDim.x) {
        int h = i / qk, d = i % qk;
        k[(size_t)p * heads * qk + i] = d < nope ? kv[(size_t)p * heads * per + h * per + d] : k_pe[(size_t)p * rope + (d - nope)];
    }
    for (int i = threadIdx.x; i < heads * vdim; i += blockDim.x) {
        int h = i / vdim, d = i % vdim;
        v[(size_t)p * heads * vdim + i] = kv[(size_t)p * heads * per + h * per + nope + d];
    }
}

// The end of both prefill kernels: a thread holds rows r0 and r0 + 8 (of n) of one head, its
// partial row sums l0 and l1 (summed here over the quad that shares a row) and output columns
// col0 + 8j + 2t, + 1 for j < n8 <= FL_V / 8 in o[j] (row r0: [0], [1]; r0 + 8: [2], [3]),
// normalised into out.
__device__ __forceinline__ void quad_sums(float& l0, float& l1) {
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
}
__device__ __forceinline__ void store_rows(float* out, int ld_out, const float (*o)[4], int n8, float l0, float l1,
                                           int r0, int n, int col0, int t) {
    quad_sums(l0, l1);
    const int r1 = r0 + 8;
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int j = 0; j < FL_V / 8; ++j) {
        if (j >= n8) break;
        const int c = col0 + 8 * j + 2 * t;
        if (r0 < n) *(float2*)(out + (size_t)r0 * ld_out + c) = make_float2(o[j][0] * inv0, o[j][1] * inv0);
        if (r1 < n) *(float2*)(out + (size_t)r1 * ld_out + c) = make_float2(o[j][2] * inv1, o[j][3] * inv1);
    }
}

// store_rows of a 128-wide head quantised for the product that reads it (o_proj) in its place:
// each row of the head is one block of 128 channels (the quad's 4 x 32 values), its e4m3 codes
// at col0 of the row in codes (row stride ld bytes), its scale at scales[(col0 / 128) * ld_scales
// + row]. The values are store_rows' f32 values, quantised as quantize_lane does, so the codes
// and scales are quantize_rows_fp8's of store_rows' output, bit for bit, without those 4 bytes a
// value written and read back.
__device__ __forceinline__ void store_rows_e4m3(u8* codes, int ld, float* scales, int ld_scales, int ue8m0,
                                                const float (*o)[4], float l0, float l1, int r0, int n, int col0,
                                                int t) {
    quad_sums(l0, l1);
    const float inv_l[2] = {1.f / l0, 1.f / l1};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r0 + 8 * half;
        float v[32], amax = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[2 * j] = o[j][2 * half] * inv_l[half];
            v[2 * j + 1] = o[j][2 * half + 1] * inv_l[half];
            amax = fmaxf(amax, fmaxf(fabsf(v[2 * j]), fabsf(v[2 * j + 1])));
        }
        float scale, inv;
        block_scale(quad_max(amax), ue8m0, scale, inv);
        if (r >= n) continue;
        u8* row = codes + (size_t)r * ld + col0 + 2 * t;
#pragma unroll
        for (int j = 0; j < 16; ++j) *(unsigned short*)(row + 8 * j) = (unsigned short)e4m3_pair(v[2 * j] * inv, v[2 * j + 1] * inv);
        if (t == 0) scales[(size_t)(col0 / 128) * ld_scales + r] = scale;
    }
}

// Causal attention of one sequence's new rows in the naive form (prefill), flash style: per
// block one head and FL_Q query rows, over key tiles of FL_K positions up to the diagonal, online
// softmax, so no score matrix is ever in memory and memory stays linear in the prompt length.
// Query row i (global position start + i) sees keys 0 ..= start + i. q: bf16 [n, heads, qk],
// k: bf16 [total, heads, qk], v: bf16 [total, heads, vdim]; out: f32 rows of stride ld_out,
// head h's values at h * vdim. 4 warps of 16 query rows; Q fragments stay in registers, S never
// leaves them (P is re-packed as the A operand of P·V), K and V tiles double-buffered with cp.async.
// Needs qk % 16 == 0, qk <= FL_QK, vdim % 16 == 0, vdim <= FL_V (DeepSeek-V3: 192 and 128).
// FL_Q, FL_K, FL_QK, FL_V: from tiles.rs (NVRTC -D).
extern "C" __global__ void __launch_bounds__(128)
mla_prefill_flash(float* out, int ld_out, const bf16* q, const bf16* k, const bf16* v, int n, int start, int heads,
                  int qk, int vdim, float scale) {
    await_previous_kernel();
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int QP = qk + 8, VP = vdim + 8;  // padded pitches: an odd number of 16-byte units
    bf16* qs = (bf16*)smem_raw;                     // [FL_Q][QP]
    bf16* ks = qs + FL_Q * QP;                      // [2][FL_K][QP]
    bf16* vs = ks + 2 * FL_K * QP;                  // [2][FL_K][VP]
    const int q0 = blockIdx.x * FL_Q, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int total = start + n;
    const int limit = start + min(q0 + FL_Q, n);  // keys any row of this block sees
    const int ktiles = (limit + FL_K - 1) / FL_K;
    auto copy16 = [](bf16* dst, const bf16* src, bool valid) {
        unsigned d = (unsigned)__cvta_generic_to_shared(dst);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
    };
    // Q tile (rows past n zero-filled)
    for (int e = tid; e < FL_Q * (qk / 8); e += blockDim.x) {
        int row = e / (qk / 8), x = e % (qk / 8), qi = min(q0 + row, n - 1);
        copy16(qs + row * QP + 8 * x, q + ((size_t)qi * heads + h) * qk + 8 * x, q0 + row < n);
    }
    auto load_kv = [&](int kt) {
        if (kt < ktiles) {
            bf16* kd = ks + (kt & 1) * FL_K * QP;
            bf16* vd = vs + (kt & 1) * FL_K * VP;
            for (int e = tid; e < FL_K * (qk / 8); e += blockDim.x) {
                int row = e / (qk / 8), x = e % (qk / 8), key = kt * FL_K + row;
                copy16(kd + row * QP + 8 * x, k + ((size_t)min(key, total - 1) * heads + h) * qk + 8 * x, key < total);
            }
            for (int e = tid; e < FL_K * (vdim / 8); e += blockDim.x) {
                int row = e / (vdim / 8), x = e % (vdim / 8), key = kt * FL_K + row;
                copy16(vd + row * VP + 8 * x, v + ((size_t)min(key, total - 1) * heads + h) * vdim + 8 * x, key < total);
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    load_kv(0);  // one group with Q
    // Q fragments of this warp's 16 rows, all qk / 16 k-steps
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    u32 qa[FL_QK / 16][4];
#pragma unroll
    for (int kk = 0; kk < FL_QK / 16; ++kk)
        if (kk < qk / 16) ldmatrix_x4(qa[kk], (u32)__cvta_generic_to_shared(qs + (warp * 16 + (lane & 15)) * QP + kk * 16 + 8 * (lane >> 4)));
    float o[FL_V / 8][4];
#pragma unroll
    for (int j = 0; j < FL_V / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8 (base 2)
    const float scale_log2 = scale * 1.4426950408889634f;
    const int pos0 = start + q0 + warp * 16 + g, pos1 = pos0 + 8;  // global positions of this thread's rows
    for (int kt = 0; kt < ktiles; ++kt) {
        if (kt > 0) {
            asm volatile("cp.async.wait_group 0;\n" ::);
            __syncthreads();  // tile kt is in; the other stage is free
        }
        load_kv(kt + 1);
        const bf16* kt_s = ks + (kt & 1) * FL_K * QP;
        const bf16* vt_s = vs + (kt & 1) * FL_K * VP;
        float s[FL_K / 8][4];
#pragma unroll
        for (int j = 0; j < FL_K / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < FL_QK / 16; ++kk)
#pragma unroll
            for (int np = 0; np < FL_K / 16; ++np) {
                if (kk >= qk / 16) break;
                u32 b[4];
                int row = np * 16 + (lane & 7) + 8 * (lane >> 4), col = kk * 16 + 8 * ((lane >> 3) & 1);
                ldmatrix_x4(b, (u32)__cvta_generic_to_shared(kt_s + row * QP + col));
                mma_bf16(s[2 * np], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
                mma_bf16(s[2 * np + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
            }
        // causal mask and row maxima (each row is whole in one quad of threads)
        float tm0 = -INFINITY, tm1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < FL_K / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = kt * FL_K + 8 * j + 2 * t + (e & 1);
                float val = key <= (e < 2 ? pos0 : pos1) ? s[j][e] * scale_log2 : -INFINITY;
                s[j][e] = val;
                if (e < 2) tm0 = fmaxf(tm0, val); else tm1 = fmaxf(tm1, val);
            }
        tm0 = quad_max(tm0);
        tm1 = quad_max(tm1);
        // a row may see no key of this tile yet (its max stays -inf): keep it at its old state
        const float n0 = fmaxf(m0, tm0), n1 = fmaxf(m1, tm1);
        const float corr0 = n0 == -INFINITY ? 1.f : exp2f(m0 - n0), corr1 = n1 == -INFINITY ? 1.f : exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= corr0;
        l1 *= corr1;
        u32 pa[FL_K / 16][4];
#pragma unroll
        for (int j = 0; j < FL_K / 8; ++j) {
            float p0 = n0 == -INFINITY ? 0.f : exp2f(s[j][0] - n0), p1 = n0 == -INFINITY ? 0.f : exp2f(s[j][1] - n0);
            float p2 = n1 == -INFINITY ? 0.f : exp2f(s[j][2] - n1), p3 = n1 == -INFINITY ? 0.f : exp2f(s[j][3] - n1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pa[j >> 1][(j & 1) * 2] = pack_bf16(p0, p1);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p2, p3);
        }
#pragma unroll
        for (int j = 0; j < FL_V / 8; ++j) {
            o[j][0] *= corr0; o[j][1] *= corr0;
            o[j][2] *= corr1; o[j][3] *= corr1;
        }
        // O[16, FL_V] += P[16, FL_K] · V[FL_K, FL_V]
#pragma unroll
        for (int kk = 0; kk < FL_K / 16; ++kk)
#pragma unroll
            for (int np = 0; np < FL_V / 16; ++np) {
                if (np >= vdim / 16) break;
                u32 b[4];
                int row = kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), col = np * 16 + 8 * (lane >> 4);
                ldmatrix_x4_trans(b, (u32)__cvta_generic_to_shared(vt_s + row * VP + col));
                mma_bf16(o[2 * np], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[0], b[1]);
                mma_bf16(o[2 * np + 1], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[2], b[3]);
            }
    }
    store_rows(out, ld_out, o, vdim / 8, l0, l1, q0 + warp * 16 + g, n, h * vdim, t);
}

// ---------------------------------------------------------------- MLA prefill on Hopper (wgmma)
// The same causal attention for DeepSeek-V3's heads (nope 128 + rope 64, v 128), in the
// FlashAttention-3 style: per block one head and PF_Q = 128 query rows, over key tiles of
// PF_K = 128 positions up to the diagonal.
// - Warpgroup 2 feeds, its registers given to the others: one thread copies Q once, then each
//   tile's K (3 boxes of 64 channels) and V (2 boxes) by TMA into one of two stages. K and V have
//   full and empty barriers of their own, so a K stage is refilled as soon as both multiplying
//   warpgroups have their scores, before their P·V is done.
// - Warpgroups 0 and 1 each own 64 query rows: S = Q·Kᵀ on wgmma m64n128k16 (Q and K read by the
//   tensor cores from shared memory), the online softmax in registers, O += P·V with P straight
//   from those registers and V N-major from shared memory.
// - Pipelined (the default): a warpgroup issues tile t's S with tile t - 1's P·V and runs tile t's
//   softmax while P·V is still on the tensor cores, and the two warpgroups take turns to issue
//   (two named barriers), so one's products run while the other's softmax does. Both take every
//   tile, to take turns to the end. The serial form waits for each product in turn, and a
//   warpgroup stops at its own last row's tile.
// - Every operand sits in the 128-byte swizzle TMA writes (128-byte rows, 8-row atoms of 1024
//   bytes; 64-channel blocks of PF_K or PF_Q rows). Tiles past the sequence's end arrive as zeros
//   (TMA); the causal mask is applied only on tiles that cross a row's diagonal.
// - A head's blocks run together (its K and V stay in L2), the longest query tiles first.
// Compiled for sm_90a only.

#define PF_BLOCK(rows) ((rows) * 128)                // bytes of one 64-channel block of `rows` rows
#define PF_Q_BYTES (3 * PF_BLOCK(PF_Q))              // Q: 192 channels
#define PF_K_BYTES (3 * PF_BLOCK(PF_K))              // a K tile: 192 channels
#define PF_V_BYTES (2 * PF_BLOCK(PF_K))              // a V tile: 128 channels
#define PF_STAGE_BYTES (PF_K_BYTES + PF_V_BYTES)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A 3-D box of `map` at coordinates (c0, c1, c2) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_3d(u32 dst, const TensorMap* map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
            dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// d[64, 128] += A[64, 16] (registers) · B[16, 128] (N-major in shared memory).
__device__ __forceinline__ void wgmma_m64n128_rs(float d[64], const u32 a[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

#endif

// The running state of a thread's two query rows (row0 and row0 + 8 of its warpgroup's 64):
// their global positions, maxima and sums (base 2).
struct PfRows {
    int pos0, pos1;
    float m0, m1, l0, l1;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// S[64 rows, 128 keys of tile kt] = Q · Kᵀ, issued and committed (not waited for).
__device__ __forceinline__ void pf_issue_scores(float sc[64], u32 qs, int wg, u32 k_tile) {
#pragma unroll
    for (int i = 0; i < 64; ++i) sc[i] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 12; ++ks)
        wgmma_m64n128_ss(sc, k_major_sw128(qs, PF_Q, wg * 64, ks), k_major_sw128(k_tile, PF_K, 0, ks), ks);
    wgmma_commit();
}

// O += P · V over one tile, issued and committed (not waited for).
__device__ __forceinline__ void pf_issue_values(float o[64], const u32 pa[8][4], u32 v_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_m64n128_rs(o, pa[kk], smem_desc(v_tile + kk * 16 * 128, PF_BLOCK(PF_K), 1024, 1));
    wgmma_commit();
}

// Tile kt's scores (keys kt * PF_K + 8j + 2t, + 1; rows row0 for e < 2, else row0 + 8) become
// probabilities against the rows' new maxima, in place; the sums follow, and corr0 / corr1 is
// what the output so far must be scaled by.
__device__ __forceinline__ void pf_softmax(float sc[64], PfRows& r, int kt, bool masked, int t, float scale_log2,
                                           float& corr0, float& corr1) {
    if (masked) {
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kt * PF_K + 8 * j + 2 * t + (e & 1);
                sc[4 * j + e] = key <= (e < 2 ? r.pos0 : r.pos1) ? sc[4 * j + e] * scale_log2 : -INFINITY;
            }
    } else {
#pragma unroll
        for (int i = 0; i < 64; ++i) sc[i] *= scale_log2;
    }
    float tm0 = -INFINITY, tm1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        tm0 = fmaxf(tm0, fmaxf(sc[4 * j], sc[4 * j + 1]));
        tm1 = fmaxf(tm1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
    }
    // Key 0 is in the first tile and every row sees it, so the maxima are finite from there on.
    const float n0 = fmaxf(r.m0, quad_max(tm0)), n1 = fmaxf(r.m1, quad_max(tm1));
    corr0 = exp2f(r.m0 - n0);
    corr1 = exp2f(r.m1 - n1);
    r.m0 = n0;
    r.m1 = n1;
    float s0 = 0.f, s1 = 0.f;
    exponentiate<16>(sc, n0, n1, s0, s1);
    r.l0 = r.l0 * corr0 + s0;
    r.l1 = r.l1 * corr1 + s1;
}

// Probabilities as bf16 wgmma A fragments: 8 k-steps of 16 keys.
__device__ __forceinline__ void pf_pack(const float sc[64], u32 pa[8][4]) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        pa[j >> 1][(j & 1) * 2] = pack_bf16(sc[4 * j], sc[4 * j + 1]);
        pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(sc[4 * j + 2], sc[4 * j + 3]);
    }
}

__device__ __forceinline__ void pf_rescale(float o[64], float corr0, float corr1) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        o[4 * j] *= corr0; o[4 * j + 1] *= corr0;
        o[4 * j + 2] *= corr1; o[4 * j + 3] *= corr1;
    }
}

// A multiplying warpgroup's whole share: its 64 query rows over tiles 0 .. tiles - 1, into o
// (unnormalised) with the rows' sums in r.
template <bool PIPELINED>
__device__ __forceinline__ void pf_consume(float o[64], PfRows& r, u32 qs, u32 stages, u32 k_full, u32 v_full,
                                           u32 k_empty, u32 v_empty, int wg, int t, int tiles, int first_pos,
                                           float scale_log2) {
    const auto k_tile = [&](int kt) { return stages + (kt & 1) * PF_STAGE_BYTES; };
    const auto v_tile = [&](int kt) { return stages + (kt & 1) * PF_STAGE_BYTES + PF_K_BYTES; };
    const auto parity = [](int kt) { return (u32)((kt >> 1) & 1); };
    const auto masked = [&](int kt) { return kt * PF_K + PF_K - 1 > first_pos; };  // crosses a row's diagonal
    float sc[64], corr0, corr1;
    u32 pa[8][4];
    if (!PIPELINED) {
        for (int kt = 0; kt < tiles; ++kt) {
            const int s = kt & 1;
            mbar_wait(k_full + 8 * s, parity(kt));
            pf_issue_scores(sc, qs, wg, k_tile(kt));
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 64; ++i) hold(sc[i]);
            mbar_arrive(k_empty + 8 * s);
            pf_softmax(sc, r, kt, masked(kt), t, scale_log2, corr0, corr1);
            pf_pack(sc, pa);
            pf_rescale(o, corr0, corr1);
            mbar_wait(v_full + 8 * s, parity(kt));
            pf_issue_values(o, pa, v_tile(kt));
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 64; ++i) hold(o[i]);
            mbar_arrive(v_empty + 8 * s);
        }
        return;
    }
    mbar_wait(k_full, 0);
    pf_issue_scores(sc, qs, wg, k_tile(0));
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) hold(sc[i]);
    mbar_arrive(k_empty);
    pf_softmax(sc, r, 0, masked(0), t, scale_log2, corr0, corr1);
    pf_pack(sc, pa);
    // The warpgroups take turns to issue their products (two named barriers, warpgroup 0 first):
    // one's products then run while the other's softmax does, instead of both at once.
    if (wg == 1 && tiles > 1) warpgroups_arrive(1);
    for (int kt = 1; kt < tiles; ++kt) {
        const int s = kt & 1, ps = s ^ 1;
        mbar_wait(k_full + 8 * s, parity(kt));
        mbar_wait(v_full + 8 * ps, parity(kt - 1));
        warpgroups_sync(1 + wg);
        pf_issue_scores(sc, qs, wg, k_tile(kt));
        pf_issue_values(o, pa, v_tile(kt - 1));
        if (wg == 0 || kt + 1 < tiles) warpgroups_arrive(2 - wg);
        wgmma_wait<1>();  // the scores are in; P·V of the tile before still runs
#pragma unroll
        for (int i = 0; i < 64; ++i) hold(sc[i]);
        mbar_arrive(k_empty + 8 * s);
        pf_softmax(sc, r, kt, masked(kt), t, scale_log2, corr0, corr1);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; ++i) hold(o[i]);
        mbar_arrive(v_empty + 8 * ps);
        pf_rescale(o, corr0, corr1);
        pf_pack(sc, pa);
    }
    const int last = tiles - 1;
    mbar_wait(v_full + 8 * (last & 1), parity(last));
    pf_issue_values(o, pa, v_tile(last));
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) hold(o[i]);
    mbar_arrive(v_empty + 8 * (last & 1));
}
#endif

// q_map: q bf16 as [n][heads][192] (boxes of 64 channels x 1 head x PF_Q rows); kv_map: kv_b's
// product, bf16 [total][heads][128 + 128] (each head's K without rotary, then its V; boxes of 64 x
// 1 x PF_K); kpe_map: the keys' rotary part shared by every head, bf16 [total][1][64] (boxes of
// 64 x 1 x PF_K), so a K tile is two boxes of kv and one of k_pe, a V tile two of kv; out: f32 rows of
// stride ld_out, head h's values at h * 128, or with codes those values quantised (store_rows_e4m3:
// codes of row stride ld_out bytes, scales [heads][ld_scales]). grid (ceil(n / PF_Q), heads).
template <bool PIPELINED>
__device__ __forceinline__ void mla_prefill_wgmma_body(float* out, int ld_out, u8* codes, float* code_scales,
                                                       int ld_scales, int ue8m0, const TensorMap* q_map,
                                                       const TensorMap* kv_map, const TensorMap* kpe_map, int n,
                                                       int start, float scale) {
    await_previous_kernel();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 qs = (raw + 1023) & ~1023u;  // 1024-byte aligned: the swizzle atoms (the host adds 1 KB)
    const u32 stages = qs + PF_Q_BYTES;
    const u32 bars = stages + 2 * PF_STAGE_BYTES;  // q_full, then [2] each of k_full, v_full, k_empty, v_empty
    const u32 q_full = bars, k_full = bars + 8, v_full = bars + 24, k_empty = bars + 40, v_empty = bars + 56;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;  // the longest query tiles of a head first
    const int q0 = qt * PF_Q, tid = threadIdx.x;
    const int ktiles = (start + min(q0 + PF_Q, n) + PF_K - 1) / PF_K;
    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < 2; ++s) {
            mbar_init(k_full + 8 * s, 1);
            mbar_init(v_full + 8 * s, 1);
            mbar_init(k_empty + 8 * s, 256);
            mbar_init(v_empty + 8 * s, 256);
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (tid >= 256) {  // the feeding warpgroup: one thread copies, the warpgroup's registers go to the others
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid != 256) return;
        mbar_expect(q_full, PF_Q_BYTES);
        for (int cb = 0; cb < 3; ++cb) tma_load_3d(qs + cb * PF_BLOCK(PF_Q), q_map, cb * 64, h, q0, q_full);
        mbar_arrive(q_full);
        for (int kt = 0; kt < ktiles; ++kt) {
            const int s = kt & 1;
            const u32 kd = stages + s * PF_STAGE_BYTES, vd = kd + PF_K_BYTES, free_parity = ((kt >> 1) & 1) ^ 1;
            mbar_wait(k_empty + 8 * s, free_parity);
            mbar_expect(k_full + 8 * s, PF_K_BYTES);
            for (int cb = 0; cb < 2; ++cb) tma_load_3d(kd + cb * PF_BLOCK(PF_K), kv_map, cb * 64, h, kt * PF_K, k_full + 8 * s);
            tma_load_3d(kd + 2 * PF_BLOCK(PF_K), kpe_map, 0, 0, kt * PF_K, k_full + 8 * s);
            mbar_arrive(k_full + 8 * s);
            mbar_wait(v_empty + 8 * s, free_parity);
            mbar_expect(v_full + 8 * s, PF_V_BYTES);
            for (int cb = 0; cb < 2; ++cb) tma_load_3d(vd + cb * PF_BLOCK(PF_K), kv_map, 128 + cb * 64, h, kt * PF_K, v_full + 8 * s);
            mbar_arrive(v_full + 8 * s);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row0 = warp * 16 + g;  // this thread's rows: row0 and row0 + 8 of the warpgroup's 64
    const int first_pos = start + q0 + wg * 64;
    // Serial, a warpgroup stops at its last row's tile (the feeder refills a stage only for a tile
    // two further on, which the other warpgroup's rows do not reach either); pipelined, both take
    // every tile, so that they take turns to the end (warpgroup 0's rows see none of a last tile
    // past them: its probabilities there are 0).
    const int tiles = PIPELINED ? ktiles : min(ktiles, (first_pos + 63) / PF_K + 1);
    PfRows r{first_pos + row0, first_pos + row0 + 8, -INFINITY, -INFINITY, 0.f, 0.f};
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    mbar_wait(q_full, 0);
    pf_consume<PIPELINED>(o, r, qs, stages, k_full, v_full, k_empty, v_empty, wg, t, tiles, first_pos,
                          scale * 1.4426950408889634f);
    const float(*acc)[4] = reinterpret_cast<const float(*)[4]>(o);
    if (codes)
        store_rows_e4m3(codes, ld_out, code_scales, ld_scales, ue8m0, acc, r.l0, r.l1, q0 + wg * 64 + row0, n, h * 128, t);
    else
        store_rows(out, ld_out, acc, 16, r.l0, r.l1, q0 + wg * 64 + row0, n, h * 128, t);
#endif
}

#define MLA_PREFILL_WGMMA_PARAMS                                                                                     \
    float *out, int ld_out, u8 *codes, float *code_scales, int ld_scales, int ue8m0,                                 \
        const __grid_constant__ TensorMap q_map, const __grid_constant__ TensorMap kv_map,                           \
        const __grid_constant__ TensorMap kpe_map, int n, int start, float scale
extern "C" __global__ void __launch_bounds__(PF_THREADS, 1) mla_prefill_wgmma(MLA_PREFILL_WGMMA_PARAMS) {
    mla_prefill_wgmma_body<true>(out, ld_out, codes, code_scales, ld_scales, ue8m0, &q_map, &kv_map, &kpe_map, n, start, scale);
}
extern "C" __global__ void __launch_bounds__(PF_THREADS, 1) mla_prefill_wgmma_serial(MLA_PREFILL_WGMMA_PARAMS) {
    mla_prefill_wgmma_body<false>(out, ld_out, codes, code_scales, ld_scales, ue8m0, &q_map, &kv_map, &kpe_map, n, start, scale);
}
