// ---------------------------------------------------------------- routed experts: gather, quantise, combine, plan
// Gathers token rows into slot order as bf16 (input of the per-expert tensor-core GEMM).
extern "C" __global__ void gather_rows_bf16(bf16* out, const float* x, int ldx, const int* rows, int width) {
    await_previous_kernel();
    const float* src = x + (size_t)rows[blockIdx.x] * ldx;
    bf16* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = f32_to_bf16(src[i]);
}

// Four channels of expert row `src` (f32 or bf16) as f32 where `take`, else zeros: predicated in
// asm (as plain loads, ptxas split a thread's eight 1 + 7).
__device__ __forceinline__ float4 load4_if(bool take, const float* src) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n"
        " @p ld.global.v4.f32 {%0, %1, %2, %3}, [%5];\n}\n"
        : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
        : "r"((int)take), "l"(src));
    return v;
}
__device__ __forceinline__ float4 load4_if(bool take, const bf16* src) {
    u32 lo = 0, hi = 0;
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
        " @p ld.global.v2.b32 {%0, %1}, [%3];\n}\n"
        : "+r"(lo), "+r"(hi)
        : "r"((int)take), "l"(src));
    return bf16x4_to_f32(lo, hi);
}
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const bf16* p) { return bf16_to_f32(*p); }

// out[t, :] += sum_j weight[t, j] * y[slot[t, j], :] over the top-k slots of token t (-1 = skipped),
// then, unless null, += shared[t, :] (the shared expert's rows, made beside the routing: the
// same additions in the same order as the shared expert's down product adding into out after).
// y f32 (combine_experts) or bf16 (combine_experts_bf16: the expert product's rows rounded, half
// the bytes to write and read back).
// grid (tokens, ceil(width / (4 * COMBINE_THREADS))): four channels a thread, eight
// slots' loads in flight together (one block a token, looping over the width, took 40 µs for one
// token; the launch bounds leave ptxas the registers to issue the eight loads at once: without,
// it kept three in flight).
template <typename Y>
__device__ __forceinline__ void combine_rows(float* out, const Y* y, const int* slot, const float* weight, int top_k,
                                             int width, const float* shared) {
    constexpr int U = 8;
    const int t = blockIdx.x, i = 4 * (blockIdx.y * blockDim.x + threadIdx.x);
    if (i >= width) return;
    const int* st = slot + (size_t)t * top_k;
    const float* wt = weight + (size_t)t * top_k;
    float* o = out + (size_t)t * width + i;
    if (width % 4 == 0) {  // rows 16-byte aligned
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j0 = 0; j0 < top_k; j0 += U) {
            int s[U];
            float w[U];
            float4 v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool in = j0 + u < top_k;
                s[u] = in ? st[j0 + u] : -1;
                w[u] = in ? wt[j0 + u] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) v[u] = load4_if(s[u] >= 0, y + (size_t)max(s[u], 0) * width + i);
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (s[u] >= 0) {
                    acc.x += w[u] * v[u].x; acc.y += w[u] * v[u].y; acc.z += w[u] * v[u].z; acc.w += w[u] * v[u].w;
                }
        }
        float4 r = *(float4*)o;
        r = make_float4(r.x + acc.x, r.y + acc.y, r.z + acc.z, r.w + acc.w);
        if (shared) {
            const float4 s = *(const float4*)(shared + (size_t)t * width + i);
            r = make_float4(r.x + s.x, r.y + s.y, r.z + s.z, r.w + s.w);
        }
        *(float4*)o = r;
        return;
    }
    for (int c = 0; c < 4 && i + c < width; ++c) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j)
            if (st[j] >= 0) acc += wt[j] * load1(y + (size_t)st[j] * width + i + c);
        o[c] += acc;
        if (shared) o[c] += shared[(size_t)t * width + i + c];
    }
}

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS, 4)
    combine_experts(float* out, const float* y, const int* slot, const float* weight, int top_k, int width,
                    const float* shared) {
    await_previous_kernel();
    combine_rows(out, y, slot, weight, top_k, width, shared);
}

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS, 4)
    combine_experts_bf16(float* out, const bf16* y, const int* slot, const float* weight, int top_k, int width,
                         const float* shared) {
    await_previous_kernel();
    combine_rows(out, y, slot, weight, top_k, width, shared);
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
// took up to `capacity`, gather row 0. One block of 1024 threads; n_experts <= 1024. Each warp
// takes one contiguous chunk of the pairs: it counts its chunk's pairs per expert, the counts of
// the chunks before it place its first pair of each expert in that expert's group, and it hands
// out its chunk's slots in pair order. Dynamic shared memory: warps * n_experts ints.
#define PLAN_BATCH 8  // pairs a lane whose expert ids moe_plan loads before working on them

// The experts of pairs base + 32u + lane (u < PLAN_BATCH; -1 from `end` on), loaded together.
__device__ __forceinline__ void plan_load_batch(int (&es)[PLAN_BATCH], const int* chosen, int base, int end, int lane) {
#pragma unroll
    for (int u = 0; u < PLAN_BATCH; ++u) {
        const int i = base + 32 * u + lane;
        es[u] = i < end ? chosen[i] : -1;
    }
}

// The plan's work; chunk_pairs: the dynamic shared memory above.
__device__ __forceinline__ void plan_pairs(int* group_expert, int* offsets, int* x_rows, int* slot_of,
                                           unsigned* counts, unsigned* touched, const int* chosen, const int* valid,
                                           int m, int top_k, int n_experts, int groups, int align, int capacity,
                                           int* chunk_pairs) {
    __shared__ int cnt[1024];
    __shared__ int next[1024];  // first slot of each expert's group
    __shared__ int scratch[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int rows = min(*valid, m), pairs = rows * top_k;
    const int chunk = (pairs + warps - 1) / warps, begin = min(pairs, warp * chunk), end = min(pairs, begin + chunk);
    int* mine = chunk_pairs + warp * n_experts;
    for (int e = lane; e < n_experts; e += 32) mine[e] = 0;
    for (int i = pairs + tid; i < m * top_k; i += blockDim.x) slot_of[i] = -1;
    __syncwarp();
    // A prefill's chunk is ~32 pairs a lane: their loads are made PLAN_BATCH at a time, before the
    // work on them, so the chunk waits out a few load latencies rather than one a pair.
    for (int base = begin; base < end; base += 32 * PLAN_BATCH) {
        int es[PLAN_BATCH];
        plan_load_batch(es, chosen, base, end, lane);
#pragma unroll
        for (int u = 0; u < PLAN_BATCH; ++u)
            if (es[u] >= 0 && es[u] < n_experts) atomicAdd(&mine[es[u]], 1);
    }
    __syncthreads();
    // Per expert: its pairs in all, and the pairs of the chunks before each chunk.
    for (int e = tid; e < n_experts; e += blockDim.x) {
        int run = 0;
        for (int w = 0; w < warps; ++w) {
            int c = chunk_pairs[w * n_experts + e];
            chunk_pairs[w * n_experts + e] = run;
            run += c;
        }
        cnt[e] = run;
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
    // Each warp hands out its chunk's slots in pair order: lanes with the same expert rank themselves.
    for (int batch = begin; batch < end; batch += 32 * PLAN_BATCH) {
        int es[PLAN_BATCH];
        plan_load_batch(es, chosen, batch, end, lane);
#pragma unroll
        for (int u = 0; u < PLAN_BATCH; ++u) {
            const int base = batch + 32 * u, i = base + lane, e = es[u];
            if (base >= end) break;  // the same for the whole warp
            bool ok = e >= 0 && e < n_experts;
            unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
            int s = ok ? next[e] + mine[e] + __popc(peers & ((1u << lane) - 1u)) : -1;
            if (i < end) slot_of[i] = s;
            if (ok) x_rows[s] = i / top_k;
            __syncwarp();
            if (ok && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
            __syncwarp();
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024)
moe_plan(int* group_expert, int* offsets, int* x_rows, int* slot_of, unsigned* counts, unsigned* touched,
         const int* chosen, const int* valid, int m, int top_k, int n_experts, int groups, int align,
         int capacity) {
    await_previous_kernel();
    extern __shared__ int chunk_pairs[];  // [warps][n_experts]: counts, then each chunk's start
    plan_pairs(group_expert, offsets, x_rows, slot_of, counts, touched, chosen, valid, m, top_k, n_experts, groups,
               align, capacity, chunk_pairs);
}

// ---------------------------------------------------------------- routing (spec §5)
// One block per token, one thread per expert (n_experts <= 1024). Sigmoid scores; the bias is
// used for selection only; groups ranked by the sum of their two best biased scores; top-k
// inside the best groups; ties go to the lower index (as the CPU reference, dsv3_engine's Gate).
// Where groups are a warp wide (DeepSeek-V3: 8 of 32), a warp finds its group's two best by
// shuffles; only the experts of kept groups rank themselves, against the experts of kept groups
// alone (no other can beat them), four at a time: a decode step's routing is a few memory
// latencies, not a chain of 256 shared loads a thread.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// An expert's score from its router logit. Like the two group scores below, one home for the
// block's routing (route_row) and the warp's (route_row_warp), which give the same bits.
__device__ __forceinline__ float route_score(float logit) { return 1.f / (1.f + expf(-logit)); }

// What a row's chosen scores are summed from (in ascending expert order), and a choice's weight
// from its score and that sum: both routings' weights, bit for bit.
#define ROUTE_SUM_START 1e-20f
__device__ __forceinline__ float route_weight(float score, float sum, int normalize, float scaling) {
    float w = score;
    if (normalize) w /= sum;
    return w * scaling;
}

// A warp-wide group's score, the sum of its two best biased scores, from its lanes' `v` (all
// lanes get it).
__device__ __forceinline__ float warp_group_score(float v) {
    const float b0 = warp_max(v);
    const int first = __ffs(__ballot_sync(0xffffffffu, v == b0)) - 1;  // one of the best kept out
    const float b1 = warp_max((int)(threadIdx.x & 31) == first ? -INFINITY : v);
    return b0 + b1;
}

// Group g's score from `biased` in shared memory: its two best summed (the best alone for groups
// of one).
__device__ __forceinline__ float scanned_group_score(const float* biased, int g, int per) {
    float b0 = -INFINITY, b1 = -INFINITY;
    for (int i = g * per; i < (g + 1) * per; ++i) {
        const float u = biased[i];
        if (u > b0) { b1 = b0; b0 = u; } else if (u > b1) { b1 = u; }
    }
    return per == 1 ? b0 : b0 + b1;
}

// Routes token row t with the n_experts (rounded up to a warp) threads e of the block, on `sm`:
// (2 * n_experts + 2 * n_group + top_k) floats of shared memory, 16-byte aligned.
__device__ __forceinline__ void route_row(int* experts_out, float* weights_out, const float* logits, const float* bias,
                                          int n_experts, int n_group, int topk_group, int top_k, int normalize,
                                          float scaling, int t, int e, float* sm) {
    float* score = sm;                    // [n_experts]
    float* biased = sm + n_experts;       // [n_experts]
    float* gscore = biased + n_experts;   // [n_group]
    int* kept = (int*)(gscore + n_group);  // [n_group]: the group is among the best topk_group
    int* chosen = kept + n_group;          // [top_k]
    const int per = n_experts / n_group, lane = e & 31;
    const bool expert = e < n_experts;
    float v = -INFINITY;
    if (expert) {
        float s = route_score(logits[(size_t)t * n_experts + e]);
        score[e] = s;
        v = s + bias[e];
        biased[e] = v;
    }
    if (per == 32) {  // a warp a group, every lane an expert
        const float group_score = warp_group_score(v);
        if (lane == 0 && expert) gscore[e >> 5] = group_score;
    }
    __syncthreads();
    if (per != 32 && e < n_group) gscore[e] = scanned_group_score(biased, e, per);
    __syncthreads();
    if (e < n_group) {  // how many groups beat this one
        int rank = 0;
        for (int o = 0; o < n_group; ++o) rank += beats(gscore[o], o, gscore[e], e);
        kept[e] = rank < topk_group;
    }
    __syncthreads();
    if (expert && kept[e / per]) {
        int rank = 0;
        for (int gr = 0; gr < n_group; ++gr) {
            if (!kept[gr]) continue;
            int o = gr * per;
            const int end = o + per;
            if (per % 4 == 0) {
#pragma unroll 4
                for (; o < end; o += 4) {
                    const float4 b = *(const float4*)(biased + o);
                    rank += beats(b.x, o, v, e) + beats(b.y, o + 1, v, e) + beats(b.z, o + 2, v, e) +
                            beats(b.w, o + 3, v, e);
                }
            }
            for (; o < end; ++o) rank += beats(biased[o], o, v, e);
        }
        if (rank < top_k) chosen[rank] = e;
    }
    __syncthreads();
    if (e == 0) {
        // sort chosen ascending (as the CPU does) and weight from unbiased scores
        int ids[32];
        for (int j = 0; j < top_k; ++j) ids[j] = chosen[j];
        for (int a = 1; a < top_k; ++a)
            for (int b = a; b > 0 && ids[b - 1] > ids[b]; --b) { int tmp = ids[b]; ids[b] = ids[b - 1]; ids[b - 1] = tmp; }
        float sum = ROUTE_SUM_START;
        for (int j = 0; j < top_k; ++j) sum += score[ids[j]];
        for (int j = 0; j < top_k; ++j) {
            experts_out[t * top_k + j] = ids[j];
            weights_out[t * top_k + j] = route_weight(score[ids[j]], sum, normalize, scaling);
        }
    }
}

extern "C" __global__ void route_topk(int* experts_out, float* weights_out, const float* logits, const float* bias,
                                      int n_experts, int n_group, int topk_group, int top_k, int normalize,
                                      float scaling) {
    await_previous_kernel();
    extern __shared__ float4 route_smem[];  // float4: the rank loop's 16-byte loads
    route_row(experts_out, weights_out, logits, bias, n_experts, n_group, topk_group, top_k, normalize, scaling,
              blockIdx.x, threadIdx.x, (float*)route_smem);
}

// The tiles of grouped_fp8_wgmma: each group's slots in the fewest runs of at most GX_TOKENS, as
// even as they go (300 slots: two of 150, not 192 and 108), as (group, first slot, slots), in
// group order; entries past the last tile get group -1. One block; max_tiles bounds the list
// (slots / GX_TOKENS + groups always fits).
__device__ __forceinline__ void list_tiles(int* tiles, int max_tiles, const int* offsets, int groups) {
    __shared__ int scratch[32];
    int listed = 0;
    for (int base = 0; base < groups; base += blockDim.x) {
        const int g = base + threadIdx.x;
        const int rows = g < groups ? offsets[g + 1] - offsets[g] : 0, runs = (rows + GX_TOKENS - 1) / GX_TOKENS;
        const int per = runs > 0 ? (rows + runs - 1) / runs : 0;  // the runs as even as they go
        int total;
        const int at = listed + block_exclusive_scan(runs, scratch, &total);
        for (int i = 0; i < runs && at + i < max_tiles; ++i) {
            int* t = tiles + 3 * (at + i);
            t[0] = g;
            t[1] = offsets[g] + i * per;
            t[2] = min(per, rows - i * per);
        }
        listed += total;
    }
    for (int i = listed + threadIdx.x; i < max_tiles; i += blockDim.x) tiles[3 * i] = -1;
}

extern "C" __global__ void expert_tiles(int* tiles, int max_tiles, const int* offsets, int groups) {
    await_previous_kernel();
    list_tiles(tiles, max_tiles, offsets, groups);
}

// ---------------------------------------------------------------- a small step's routing, plan and tiles
// route_topk, moe_plan and expert_tiles each cost a decode step 5-6 µs of serial latency on its
// critical path, little of it their launches: a block's barriers, scans over 1,024 threads and a
// 32-step loop per expert, for eight (token, choice) pairs. route_plan does their work for a
// step of a few rows with a warp per row and a thread per pair, with the same bits.

// Routes row t with one warp, as route_row does with a block: the same choices (ties to the
// lower index) and the same weights, bit for bit (the same float operations in the same order).
// Lane l holds experts l, l + 32, ... (ROUTE_LANE_EXPERTS at most); where groups are a warp wide
// (DeepSeek-V3: 8 of 32) its j-th expert is in group j, and a group's two best are found by
// shuffles. The top_k best of the kept groups are picked one at a time by a warp argmax. sm: this
// warp's route_warp_floats: scores and biased scores per expert, a score per group, the choices
// ascending. pair_expert gets the choices too, for the plan.
__device__ __forceinline__ void route_row_warp(int* experts_out, float* weights_out, int* pair_expert,
                                               const float* logits, const float* bias, int n_experts, int n_group,
                                               int topk_group, int top_k, int normalize, float scaling, int t,
                                               float* sm) {
    float* score = sm;                   // [n_experts]
    float* biased = sm + n_experts;      // [n_experts]
    float* gscore = biased + n_experts;  // [n_group]
    int* sorted = (int*)(gscore + n_group);  // [top_k]
    const int lane = threadIdx.x & 31, per = n_experts / n_group;
    float logit[ROUTE_LANE_EXPERTS], b[ROUTE_LANE_EXPERTS], v[ROUTE_LANE_EXPERTS];
#pragma unroll
    for (int j = 0; j < ROUTE_LANE_EXPERTS; ++j) {  // every load in flight before any is used
        const int e = lane + 32 * j;
        logit[j] = e < n_experts ? logits[(size_t)t * n_experts + e] : 0.f;
        b[j] = e < n_experts ? bias[e] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < ROUTE_LANE_EXPERTS; ++j) {
        const int e = lane + 32 * j;
        v[j] = -INFINITY;
        if (e < n_experts) {
            const float s = route_score(logit[j]);
            score[e] = s;
            v[j] = s + b[j];
            biased[e] = v[j];
        }
    }
    __syncwarp();
    if (per == 32) {
#pragma unroll
        for (int j = 0; j < ROUTE_LANE_EXPERTS; ++j) {
            if (j >= n_group) break;  // the same for the whole warp
            const float group_score = warp_group_score(v[j]);
            if (lane == 0) gscore[j] = group_score;
        }
    } else if (lane < n_group) {
        gscore[lane] = scanned_group_score(biased, lane, per);
    }
    __syncwarp();
    int group_rank = 0;  // how many groups beat lane's
    if (lane < n_group)
        for (int o = 0; o < n_group; ++o) group_rank += beats(gscore[o], o, gscore[lane], lane);
    const unsigned kept = __ballot_sync(0xffffffffu, lane < n_group && group_rank < topk_group);
    unsigned candidates = 0;  // bit j: expert lane + 32j, in a kept group, not yet chosen
#pragma unroll
    for (int j = 0; j < ROUTE_LANE_EXPERTS; ++j) {
        const int e = lane + 32 * j;
        if (e < n_experts && (kept >> (e / per) & 1u)) candidates |= 1u << j;
    }
    int mine = 0;  // lane r < top_k: the r-th best
    for (int r = 0; r < top_k; ++r) {
        float bv = -INFINITY;
        int bi = -1;
#pragma unroll
        for (int j = 0; j < ROUTE_LANE_EXPERTS; ++j)
            if ((candidates >> j & 1u) && (bi < 0 || beats(v[j], lane + 32 * j, bv, bi))) {
                bv = v[j];
                bi = lane + 32 * j;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || beats(ov, oi, bv, bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == r) mine = bi;
        if (bi >= 0 && (bi & 31) == lane) candidates &= ~(1u << (bi >> 5));
    }
    // Ascending, as the CPU gives them; the weights from the unbiased scores, summed in that order.
    int at = 0;
    for (int r = 0; r < top_k; ++r) at += __shfl_sync(0xffffffffu, mine, r) < mine;
    if (lane < top_k) sorted[at] = mine;
    __syncwarp();
    const int id = lane < top_k ? sorted[lane] : 0;
    const float s = lane < top_k ? score[id] : 0.f;
    float sum = ROUTE_SUM_START;
    for (int r = 0; r < top_k; ++r) sum += __shfl_sync(0xffffffffu, s, r);
    if (lane < top_k) {
        experts_out[t * top_k + lane] = id;
        weights_out[t * top_k + lane] = route_weight(s, sum, normalize, scaling);
        pair_expert[t * top_k + lane] = id;
    }
    __syncwarp();  // sm read in full before the warp's next row writes it
}

// A step of m rows (m * top_k <= blockDim.x, each row's choices distinct, so m <= GX_TOKENS keeps
// every group one tile): each warp routes rows warp, warp + 32, ... (route_row_warp), then thread
// i places pair i of the first *valid rows. Its slot is the pairs of lower experts plus the pairs
// of its own expert before it (groups unaligned, token order inside a group); its group, the
// experts present below its own, from a bitmask of the experts present. What moe_plan and
// expert_tiles write, this writes, with the same values; the counters get the same sums. One
// block of ROUTE_PLAN_THREADS; dynamic shared memory: m * top_k ints (the choices), then
// route_warp_floats floats a warp for min(m, warps) warps.
extern "C" __global__ void __launch_bounds__(ROUTE_PLAN_THREADS)
route_plan(int* experts_out, float* weights_out, const float* logits, const float* bias, int n_experts, int n_group,
           int topk_group, int top_k, int normalize, float scaling, int route_warp_floats, int* group_expert,
           int* offsets, int* x_rows, int* slot_of, unsigned* counts, unsigned* touched, const int* valid, int m,
           int groups, int capacity, int* tiles, int max_tiles) {
    __shared__ unsigned present[32];  // bit e & 31 of word e >> 5: expert e has a pair
    extern __shared__ int plan_smem[];
    int* pair_expert = plan_smem;
    float* routing = (float*)(plan_smem + m * top_k);
    const int tid = threadIdx.x, warp = tid >> 5;
    if (tid < 32) present[tid] = 0;
    await_previous_kernel();
    for (int t = warp; t < m; t += blockDim.x >> 5)
        route_row_warp(experts_out, weights_out, pair_expert, logits, bias, n_experts, n_group, topk_group, top_k,
                       normalize, scaling, t, routing + warp * route_warp_floats);
    __syncthreads();
    const int pairs = min(*valid, m) * top_k;
    const bool paired = tid < pairs;
    const int e = paired ? pair_expert[tid] : 0;
    if (paired) atomicOr(&present[e >> 5], 1u << (e & 31));
    int below = 0, before = 0, count = 0;  // pairs of lower experts; of this one, before tid; in all
    if (paired)
        for (int j = 0; j < pairs; ++j) {
            const int o = pair_expert[j];
            below += o < e;
            before += o == e && j < tid;
            count += o == e;
        }
    __syncthreads();
    int active = 0, group = 0;
    for (int w = 0; w < (n_experts + 31) / 32; ++w) {
        const unsigned bits = present[w];
        active += __popc(bits);
        group += w < e >> 5 ? __popc(bits) : w == e >> 5 ? __popc(bits & ((1u << (e & 31)) - 1u)) : 0;
    }
    if (paired) {
        const int slot = below + before;
        slot_of[tid] = slot;
        x_rows[slot] = tid / top_k;
        if (before == 0) {  // the expert's first pair speaks for its group
            group_expert[group] = e;
            offsets[group] = below;
            atomicAdd(&counts[e], (unsigned)count);
            if (tiles && group < max_tiles) {
                int* tile = tiles + 3 * group;
                tile[0] = group;
                tile[1] = below;
                tile[2] = count;
            }
        }
    }
    for (int i = pairs + tid; i < m * top_k; i += blockDim.x) slot_of[i] = -1;
    for (int s = pairs + tid; s < capacity; s += blockDim.x) x_rows[s] = 0;
    for (int g = active + tid; g <= groups; g += blockDim.x) offsets[g] = pairs;
    if (tiles)
        for (int i = active + tid; i < max_tiles; i += blockDim.x) tiles[3 * i] = -1;
    if (tid == 0) atomicAdd(touched, (unsigned)active);
}
