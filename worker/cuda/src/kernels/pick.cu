// ---------------------------------------------------------------- token picking
// The next token of each row of logits, chosen on the GPU by the host's reference rule
// (`dsv3_engine::sampling::choose`), so that only ids and the requested log-probabilities cross
// to the host. One block of PICK_THREADS per row.
//
// Order: descending v = logit/temperature, ties to the lower id; mass exp(v − max) in f64. Each
// cut of the rule (the top-k, the top-p prefix, the draw) is "the first element at which a
// running total over that order reaches a target", found without sorting:
//   1. one pass buckets every element by its distance below the max (1/32 wide, the last bucket
//      open) with count and mass — buckets of distance are buckets of order, and they spread
//      the row, so the histogram's atomics rarely collide;
//   2. the bucket holding the crossing is copied into shared memory (when it fits; otherwise
//      the row is re-read) and a radix select over the value's 32 bits (four digits of 256)
//      finds the exact value, then the rank among its ties by id.

// PICK_THREADS: from tiles.rs (NVRTC -D).
#define PICK_LEVELS 1024
#define PICK_LEVEL_SCALE 32.0f
#define PICK_CANDIDATES 2048

struct TokenPick {
    float temperature;  // 0: greedy
    int top_k;          // 0: none
    float top_p;
    int logprobs;       // -1: none; n >= 0: the token's and the n best
    double uniform;     // the draw, in [0, 1)
};

// Ascending key of a float's order, inverted: ascending key = descending value.
__device__ __forceinline__ unsigned pick_key(float v) {
    unsigned b = __float_as_uint(v);
    unsigned ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ~ascending;
}

__device__ __forceinline__ float pick_value(unsigned key) {
    unsigned ascending = ~key;
    unsigned b = (ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending;
    return __uint_as_float(b);
}

// The scaled value as the host rounds it (never fused into another operation).
__device__ __forceinline__ float pick_scaled(float logit, float scale) { return __fmul_rn(logit, scale); }

// v − max as the host rounds it; mass = exp of it.
__device__ __forceinline__ float pick_offset(float v, float top) { return __fsub_rn(v, top); }

// Level of a value: monotone in its distance below the max, so levels follow the order.
__device__ __forceinline__ int pick_level(float offset) {
    return (int)fminf(-offset * PICK_LEVEL_SCALE, (float)(PICK_LEVELS - 1));
}

struct PickShared {
    double level_mass[PICK_LEVELS];
    unsigned level_count[PICK_LEVELS];
    double mass[256];
    unsigned count[256];
    unsigned cand_key[PICK_CANDIDATES];
    int cand_id[PICK_CANDIDATES];
    int n_cand;
    double reduce_d[32];
    float reduce_f[32];
    int reduce_i[32];
    unsigned prefix, mask;
    double before_mass, before_count;
    int chosen, ties, result;
};

__device__ float pick_block_max(float v, PickShared& s) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s.reduce_f[warp] = v;
    __syncthreads();
    float r = s.reduce_f[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) r = fmaxf(r, s.reduce_f[w]);
    return r;
}

__device__ double pick_block_sum(double v, PickShared& s) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s.reduce_d[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) r += s.reduce_d[w];
    return r;
}

// The block's best of each thread's (bv, bi) by raw logit, ties to the lower id; its id (vocab
// when every thread holds none).
__device__ int pick_block_best(float bv, int bi, int vocab, PickShared& s) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != vocab && (bi == vocab || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { s.reduce_f[warp] = bv; s.reduce_i[warp] = bi; }
    __syncthreads();
    bv = s.reduce_f[0];
    bi = s.reduce_i[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
        float ov = s.reduce_f[w];
        int oi = s.reduce_i[w];
        if (oi != vocab && (bi == vocab || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
    }
    return bi;
}

// The first element in order strictly after (after_v, after_i) — everything when after_i < 0 —
// by raw logit, ties to the lower id; its id (vocab when none).
__device__ int pick_next_best(const float* row, int vocab, float after_v, int after_i, PickShared& s) {
    float bv = -INFINITY;
    int bi = vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = row[j];
        bool after = after_i < 0 || v < after_v || (v == after_v && j > after_i);
        if (after && (bi == vocab || v > bv)) { bv = v; bi = j; }
    }
    return pick_block_best(bv, bi, vocab, s);
}

// The row's best element (the greedy pick), as pick_next_best(row, vocab, 0, -1, s) finds it, with
// PICK_BEST_LOADS 16-byte loads in flight a thread where the row allows them: one block reads the
// whole row, and one 4-byte load a thread at a time left it waiting on memory (~50 µs for a
// 129,280-wide row on an H100). Each thread still meets its elements in increasing id.
#define PICK_BEST_LOADS 8
__device__ int pick_best(const float* row, int vocab, PickShared& s) {
    if ((vocab & 3) != 0 || ((size_t)row & 15) != 0) return pick_next_best(row, vocab, 0.0f, -1, s);
    float bv = -INFINITY;
    int bi = vocab;
    const float4* quads = (const float4*)row;
    const int n = vocab >> 2, step = PICK_BEST_LOADS * blockDim.x;
    for (int base = threadIdx.x; base < n; base += step) {
        float4 q[PICK_BEST_LOADS];
#pragma unroll
        for (int u = 0; u < PICK_BEST_LOADS; ++u) {
            const int i = base + u * blockDim.x;
            q[u] = i < n ? quads[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < PICK_BEST_LOADS; ++u) {
            const int i = base + u * blockDim.x;
            if (i >= n) break;
            const float v[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (bi == vocab || v[c] > bv) { bv = v[c]; bi = 4 * i + c; }
        }
    }
    return pick_block_best(bv, bi, vocab, s);
}

// A place in the order: the value's key, the rank among the elements of that value (by id),
// and the running count and mass through it.
struct PickPlace {
    unsigned key;
    int tie;
    double through_count, through_mass;
};

__device__ __forceinline__ bool pick_before(PickPlace a, PickPlace b) {
    return a.key < b.key || (a.key == b.key && a.tie < b.tie);
}

// Thread 0: the first of `n` buckets (weights by count or mass) at which the running total,
// starting from s.before_*, reaches `target` (> when strict); past the end, the last non-empty
// bucket. Sets s.chosen and advances s.before_* over the buckets before it.
__device__ void pick_scan(const double* mass_w, const unsigned* count_w, int n, bool by_mass, double target,
                          bool strict, PickShared& s) {
    double bm = s.before_mass, bc = s.before_count;
    int chosen = -1, last = -1;
    for (int b = 0; b < n; ++b) {
        if (count_w[b] == 0) continue;
        double w = by_mass ? mass_w[b] : (double)count_w[b];
        double before = by_mass ? bm : bc;
        if (strict ? before + w > target : before + w >= target) { chosen = b; break; }
        last = b;
        bm += mass_w[b];
        bc += count_w[b];
    }
    if (chosen < 0) {  // the target lies past the end (rounding): the last element
        chosen = last;
        bm -= mass_w[last];
        bc -= count_w[last];
    }
    s.before_mass = bm;
    s.before_count = bc;
    s.chosen = chosen;
}

// The place where the running count (by_mass false) or mass reaches `target`.
__device__ PickPlace pick_crossing(const float* row, int vocab, float scale, float top, bool by_mass, double target,
                                   bool strict, PickShared& s) {
    if (threadIdx.x == 0) {
        s.before_mass = 0.0;
        s.before_count = 0.0;
        pick_scan(s.level_mass, s.level_count, PICK_LEVELS, by_mass, target, strict, s);
        s.prefix = 0;
        s.mask = 0;
        s.n_cand = 0;
    }
    __syncthreads();
    const int level = s.chosen;
    const bool in_shared = s.level_count[level] <= PICK_CANDIDATES;
    if (in_shared) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float v = pick_scaled(row[j], scale);
            if (pick_level(pick_offset(v, top)) != level) continue;
            int c = atomicAdd(&s.n_cand, 1);
            s.cand_key[c] = pick_key(v);
            s.cand_id[c] = j;
        }
    }
    __syncthreads();
    const int n = in_shared ? s.n_cand : vocab;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) { s.mass[b] = 0.0; s.count[b] = 0; }
        __syncthreads();
        const unsigned prefix = s.prefix, mask = s.mask;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            unsigned key;
            if (in_shared) {
                key = s.cand_key[c];
            } else {
                float v = pick_scaled(row[c], scale);
                if (pick_level(pick_offset(v, top)) != level) continue;
                key = pick_key(v);
            }
            if ((key & mask) != prefix) continue;
            int b = (key >> shift) & 255;
            atomicAdd(&s.mass[b], exp((double)pick_offset(pick_value(key), top)));
            atomicAdd(&s.count[b], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            pick_scan(s.mass, s.count, 256, by_mass, target, strict, s);
            s.prefix = prefix | ((unsigned)s.chosen << shift);
            s.mask = mask | (255u << shift);
            s.ties = (int)s.count[s.chosen];
        }
        __syncthreads();
    }
    PickPlace p;
    p.key = s.prefix;
    double w_mass = exp((double)pick_offset(pick_value(p.key), top));
    double w = by_mass ? w_mass : 1.0;
    double need = (target - (by_mass ? s.before_mass : s.before_count)) / w;
    long long tie = strict ? (long long)floor(need) : (long long)ceil(need) - 1;
    p.tie = (int)max(0ll, min(tie, (long long)s.ties - 1));
    p.through_count = s.before_count + (p.tie + 1);
    p.through_mass = s.before_mass + (p.tie + 1) * w_mass;
    __syncthreads();
    return p;
}

// The id at `place`: the place.tie-th element (by id) of value key place.key.
__device__ int pick_id(const float* row, int vocab, float scale, PickPlace place, PickShared& s) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __shared__ int warp_count[32];
    __shared__ int seen, found_warp, found_rank;
    if (threadIdx.x == 0) { s.result = -1; seen = 0; }
    __syncthreads();
    for (int base = 0; base < vocab; base += blockDim.x) {
        int j = base + threadIdx.x;
        bool tied = j < vocab && pick_key(pick_scaled(row[j], scale)) == place.key;
        unsigned ballot = __ballot_sync(0xffffffffu, tied);
        if (lane == 0) warp_count[warp] = __popc(ballot);
        __syncthreads();
        if (threadIdx.x == 0) {
            int need = place.tie - seen, w = 0;
            for (; w < warps && need >= warp_count[w]; ++w) need -= warp_count[w];
            if (w < warps) { found_warp = w; found_rank = need; s.result = -2; }
            else seen = place.tie - need;
        }
        __syncthreads();
        if (s.result == -2) {
            __syncthreads();
            if (warp == found_warp && tied && __popc(ballot & ((1u << lane) - 1)) == found_rank) s.result = j;
            __syncthreads();
            return s.result;
        }
    }
    return vocab - 1;  // unreachable for a place found in this row
}

// out: per row [token, logprob bits, then `max_top` pairs (id, logprob bits)].
extern "C" __global__ void __launch_bounds__(PICK_THREADS)
pick_tokens(int* out, const float* logits, int vocab, const TokenPick* picks, int max_top) {
    await_previous_kernel();
    __shared__ PickShared s;
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const TokenPick pick = picks[blockIdx.x];
    int* o = out + (size_t)blockIdx.x * (2 + 2 * max_top);
    int token;
    if (pick.temperature == 0.0f) {
        token = pick_best(row, vocab, s);
    } else {
        float scale = 1.0f / pick.temperature;
        float local = -INFINITY;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) local = fmaxf(local, pick_scaled(row[j], scale));
        float top = pick_block_max(local, s);
        for (int b = threadIdx.x; b < PICK_LEVELS; b += blockDim.x) { s.level_mass[b] = 0.0; s.level_count[b] = 0; }
        __syncthreads();
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float offset = pick_offset(pick_scaled(row[j], scale), top);
            int level = pick_level(offset);
            atomicAdd(&s.level_mass[level], exp((double)offset));
            atomicAdd(&s.level_count[level], 1u);
        }
        __syncthreads();
        // The kept set ends at `last` (past every element when nothing is cut).
        PickPlace last;
        last.key = 0xffffffffu;
        last.tie = 0x7fffffff;
        last.through_mass = 0.0;
        for (int b = 0; b < PICK_LEVELS; ++b) last.through_mass += s.level_mass[b];
        if (pick.top_k > 0 && pick.top_k < vocab) last = pick_crossing(row, vocab, scale, top, false, (double)pick.top_k, false, s);
        if (pick.top_p < 1.0f) {
            PickPlace p = pick_crossing(row, vocab, scale, top, true, (double)pick.top_p * last.through_mass, false, s);
            if (pick_before(p, last)) last = p;
        }
        PickPlace drawn = pick_crossing(row, vocab, scale, top, true, pick.uniform * last.through_mass, true, s);
        if (pick_before(last, drawn)) drawn = last;
        token = pick_id(row, vocab, scale, drawn, s);
    }
    if (pick.logprobs >= 0) {
        float local = -INFINITY;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) local = fmaxf(local, row[j]);
        float top = pick_block_max(local, s);
        double sum = 0.0;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp((double)(row[j] - top));
        float lse = (float)log(pick_block_sum(sum, s)) + top;
        float after_v = 0.0f;
        int after_i = -1;
        for (int n = 0; n < pick.logprobs && n < max_top && n < vocab; ++n) {
            int id = pick_next_best(row, vocab, after_v, after_i, s);
            if (threadIdx.x == 0) { o[2 + 2 * n] = id; o[3 + 2 * n] = __float_as_int(row[id] - lse); }
            after_v = row[id];
            after_i = id;
        }
        if (threadIdx.x == 0) o[1] = __float_as_int(row[token] - lse);
    }
    if (threadIdx.x == 0) o[0] = token;
}

// The sequences' logit rules (`dsv3_engine::logit_rules`), applied in place before the pick:
// per edit [row, token, bias bits, repetition bits, add bits]; logit = repeat(logit + bias) +
// add, where repeat divides a positive value by `repetition` and multiplies a negative one. One
// thread per edit (each (row, token) appears once, so no two threads touch one logit).
extern "C" __global__ void apply_logit_edits(float* logits, int vocab, const int* edits, int n) {
    await_previous_kernel();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* e = edits + 5 * i;
    int token = e[1];
    if (token < 0 || token >= vocab) return;
    float bias = __int_as_float(e[2]), repetition = __int_as_float(e[3]), add = __int_as_float(e[4]);
    float* l = logits + (size_t)e[0] * vocab + token;
    float v = __fadd_rn(*l, bias);
    if (repetition != 1.0f) v = v > 0.0f ? __fdiv_rn(v, repetition) : __fmul_rn(v, repetition);
    *l = __fadd_rn(v, add);
}

// Grammars' masks (structured output), applied in place after the edits: words_per_row u32 per
// row, bit j % 32 of word j / 32 set when token j is allowed; the others become -inf.
extern "C" __global__ void apply_token_masks(float* logits, int vocab, const unsigned* masks, int words_per_row) {
    await_previous_kernel();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= vocab) return;
    const unsigned* mask = masks + (size_t)blockIdx.y * words_per_row;
    int w = j >> 5;
    bool allowed = w < words_per_row && ((mask[w] >> (j & 31)) & 1u);
    if (!allowed) logits[(size_t)blockIdx.y * vocab + j] = -INFINITY;
}
