// Flash attention (scaled dot-product attention) forward and backward. The contract is
// metalcore/nn/attention.py, the host code attention_metal.py; the algorithm is that of the Triton
// kernels in attention_triton.py: an online softmax in base 2 (exp2((z - m)·log2 e)) that never stores
// the L x S scores, lse = ln Σ exp(z) kept for the backward, and a backward without atomics (one
// kernel per key block for dK/dV, summing the query heads of a GQA group in registers; one per query
// block for dQ), so results are deterministic. All arithmetic is float32, whatever the input dtype.
//
// Layout, shared by the three kernels: a threadgroup owns up to 32 rows of one side (query rows in
// the forward and the dQ kernel, key rows in the dK/dV kernel), one SIMD-group per row. Lane l keeps
// columns l, l + 32, l + 64, l + 96 of its row in registers (head dims up to ATTN_MAX_HEAD_DIM), so
// the dot product of two rows is one simd_sum. The other side streams through threadgroup memory in
// tiles of ATTN_TILE rows, read by every SIMD-group from there (lanes read consecutive floats).
// Threadgroup memory, float32 (tiles are converted once, on load):
//   forward and dQ: K and V tiles            2 x 16 rows x 128 x 4 B = 16 KiB
//   dK/dV:          Q and dO tiles           2 x 16 rows x 128 x 4 B = 16 KiB, + lse, delta: 128 B
// That is half of Apple's 32 KiB, so two threadgroups can share a core; 32-row tiles would fill all
// 32 KiB and leave dK/dV's lse and delta no room. simdgroup_matrix is not used: the CPU executor
// that runs these shaders in CI does not implement it, and nothing here could check it.
//
// Strides (int64, in elements; 0 on broadcast mask dimensions) arrive as one array of 16:
//   q (b, h, l, e), k (b, h, s, e), v (b, h, s, e), attn_mask (b, h, l, s).
// dout, out, lse, delta and every output are contiguous.
#include "common.h"

#define ATTN_TILE 16
#define ATTN_MAX_HEAD_DIM 128
#define ATTN_COLS (ATTN_MAX_HEAD_DIM / METALCORE_SIMD_WIDTH)
// mask_kind: how attn_mask is read (the other mask buffers are placeholders, never read).
#define ATTN_MASK_NONE 0
#define ATTN_MASK_BOOL 1
#define ATTN_MASK_FLOAT 2
#define ATTN_MASK_INPUT_DTYPE 3

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Sizes and flags every kernel takes, in this order after the strides.
#define ATTN_SIZES                                                                                  \
    constant uint& n_heads, constant uint& group, constant uint& seq_q, constant uint& seq_k,       \
    constant uint& dim, constant uint& dim_v, constant uint& causal, constant uint& mask_kind

// Metal wants the vector attributes (threadgroup_position_in_grid, threads_per_threadgroup) of one
// width: both uint2 here, for the (rows, batch·heads) grid.
#define ATTN_IDS                                                                                    \
    uint2 tgpos [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],         \
    uint2 tg_size [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],             \
    uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]

// The user's mask at element `off`, in the scores' base-2 units. A finite float mask is clamped at
// -3e38 after scaling by log2 e, so that finfo.min padding (Hugging Face's) stays finite as in torch
// instead of overflowing to -inf; -inf stays -inf and NaN stays NaN (the comparison is false).
template <typename T>
static inline float attn_mask_log2(uint kind, device const uchar* mask_b, device const float* mask_f,
                                   device const T* mask_t, long off) {
    if (kind == ATTN_MASK_BOOL) {
        return mask_b[off] != 0 ? 0.0f : -INFINITY;
    }
    const float a = kind == ATTN_MASK_FLOAT ? mask_f[off] : float(mask_t[off]);
    const float a2 = a * ATTN_LOG2E;
    return (a2 < -3.0e38f && a != -INFINITY) ? -3.0e38f : a2;
}

// Rows [first, first + n) of a (rows, dim) matrix with strides (s_row, s_col) into `tile` (n x dim,
// compact), by all threads of the threadgroup.
template <typename T>
static void attn_load_tile(threadgroup float* tile, device const T* base, long s_row, long s_col, uint first,
                           uint n, uint dim, uint tid, uint tpg) {
    for (uint idx = tid; idx < n * dim; idx += tpg) {
        const uint r = idx / dim, c = idx - r * dim;
        tile[idx] = float(base[long(first + r) * s_row + long(c) * s_col]);
    }
}

// This lane's columns of one row, zero past `dim`.
template <typename T>
static void attn_load_row(thread float* dst, device const T* row, long s_col, uint dim, uint lane) {
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        dst[t] = c < dim ? float(row[long(c) * s_col]) : 0.0f;
    }
}

// Dot product of the row held in registers with row `r` of a compact tile, returned to every lane.
static inline float attn_dot(thread const float* x, threadgroup const float* tile, uint r, uint dim, uint lane) {
    float d = 0.0f;
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (c < dim) {
            d += x[t] * tile[r * dim + c];
        }
    }
    return simd_sum(d);
}

// acc += w · (row r of the tile), on this lane's columns.
static inline void attn_axpy(thread float* acc, float w, threadgroup const float* tile, uint r, uint dim, uint lane) {
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (c < dim) {
            acc[t] += w * tile[r * dim + c];
        }
    }
}

// Keys of the tile [s0, s0 + n) that query `row` attends under causality (top-left aligned: j <= i).
static inline uint attn_causal_count(bool causal, uint row, uint s0, uint n) {
    if (!causal) {
        return n;
    }
    return row < s0 ? 0u : min(n, row - s0 + 1);
}

// Forward: grid (ceil(L / rows) x rows·32, B·H); SIMD-group sg handles query row tgpos.x·rows + sg.
template <typename T>
static void sdpa_fwd_rows(device const T* q, device const T* k, device const T* v, device const uchar* mask_b,
                          device const float* mask_f, device const T* mask_t, device T* out, device float* lse,
                          constant long* st, uint n_heads, uint group, uint seq_q, uint seq_k, uint dim,
                          uint dim_v, bool causal, uint mask_kind, float scale_log2, threadgroup float* k_tile,
                          threadgroup float* v_tile, uint2 tgpos, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const uint bh = tgpos.y, b = bh / n_heads, h = bh % n_heads, kv_h = h / group;
    const uint row0 = tgpos.x * nsg, row = row0 + sg;
    const bool live = row < seq_q;
    float qr[ATTN_COLS], acc[ATTN_COLS];
    attn_load_row(qr, q + b * st[0] + h * st[1] + long(live ? row : 0) * st[2], st[3], live ? dim : 0, lane);
    for (uint t = 0; t < ATTN_COLS; ++t) {
        acc[t] = 0.0f;
    }
    device const T* k_base = k + b * st[4] + kv_h * st[5];
    device const T* v_base = v + b * st[8] + kv_h * st[9];
    const long m_row = b * st[12] + h * st[13] + long(row) * st[14];
    float m = -INFINITY, l = 0.0f;
    // Causal: no row of this threadgroup attends a key past its last row.
    const uint hi = causal ? min(seq_k, row0 + nsg) : seq_k;
    for (uint s0 = 0; s0 < hi; s0 += ATTN_TILE) {
        const uint n = min(uint(ATTN_TILE), hi - s0);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // every SIMD-group is done with the last tile
        attn_load_tile(k_tile, k_base, st[6], st[7], s0, n, dim, tid, tpg);
        attn_load_tile(v_tile, v_base, st[10], st[11], s0, n, dim_v, tid, tpg);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (!live) {
            continue;
        }
        const uint n_row = attn_causal_count(causal, row, s0, n);
        float z[ATTN_TILE];
        float z_max = -INFINITY;
        for (uint j = 0; j < n_row; ++j) {
            z[j] = attn_dot(qr, k_tile, j, dim, lane) * scale_log2;
            if (mask_kind != ATTN_MASK_NONE) {
                z[j] += attn_mask_log2(mask_kind, mask_b, mask_f, mask_t, m_row + long(s0 + j) * st[15]);
            }
            z_max = max(z_max, z[j]);
        }
        const float m_new = max(m, z_max);
        // A row that has attended nothing yet (m = -inf, masks only) takes exponents against 0, so
        // that p = 0 rather than NaN.
        const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2(m - m_ref);
        l *= alpha;
        for (uint t = 0; t < ATTN_COLS; ++t) {
            acc[t] *= alpha;
        }
        for (uint j = 0; j < n_row; ++j) {
            const float p = exp2(z[j] - m_ref);
            l += p;
            attn_axpy(acc, p, v_tile, j, dim_v, lane);
        }
        m = m_new;
    }
    if (!live) {
        return;
    }
    // l = 0: the row attended nothing; its output is 0 and its lse -inf (torch's safe softmax).
    const long o_row = long(bh) * seq_q + row;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (c < dim_v) {
            out[o_row * dim_v + c] = T(acc[t] * inv_l);
        }
    }
    if (lane == 0) {
        lse[o_row] = l > 0.0f ? (m + log2(l)) * ATTN_LN2 : -INFINITY;
    }
}

// base-2 lse of a row; +inf for a row that attended nothing, so that its P = exp2(z - lse2) is 0.
static inline float attn_lse2(float lse) {
    return lse == -INFINITY ? INFINITY : lse * ATTN_LOG2E;
}

// dQ: grid as the forward. Also writes delta = rowsum(dO ∘ O) (= rowsum(P ∘ dP)) for the dK/dV
// kernel, which the host launches after this one.
template <typename T>
static void sdpa_bwd_dq_rows(device const T* q, device const T* k, device const T* v, device const uchar* mask_b,
                             device const float* mask_f, device const T* mask_t, device const T* dout,
                             device const T* out, device const float* lse, device T* dq, device float* delta,
                             constant long* st, uint n_heads, uint group, uint seq_q, uint seq_k, uint dim,
                             uint dim_v, bool causal, uint mask_kind, float scale_log2, float scale,
                             threadgroup float* k_tile, threadgroup float* v_tile, uint2 tgpos, uint tid, uint tpg,
                             uint lane, uint sg, uint nsg) {
    const uint bh = tgpos.y, b = bh / n_heads, h = bh % n_heads, kv_h = h / group;
    const uint row0 = tgpos.x * nsg, row = row0 + sg;
    const bool live = row < seq_q;
    const long o_row = long(bh) * seq_q + (live ? row : 0);
    float qr[ATTN_COLS], dor[ATTN_COLS], acc[ATTN_COLS];
    attn_load_row(qr, q + b * st[0] + h * st[1] + long(live ? row : 0) * st[2], st[3], live ? dim : 0, lane);
    attn_load_row(dor, dout + o_row * dim_v, 1, live ? dim_v : 0, lane);
    float d = 0.0f;
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (live && c < dim_v) {
            d += dor[t] * float(out[o_row * dim_v + c]);
        }
        acc[t] = 0.0f;
    }
    const float delta_row = simd_sum(d);
    const float lse2 = attn_lse2(live ? lse[o_row] : 0.0f);
    if (live && lane == 0) {
        delta[o_row] = delta_row;
    }
    device const T* k_base = k + b * st[4] + kv_h * st[5];
    device const T* v_base = v + b * st[8] + kv_h * st[9];
    const long m_row = b * st[12] + h * st[13] + long(row) * st[14];
    const uint hi = causal ? min(seq_k, row0 + nsg) : seq_k;
    for (uint s0 = 0; s0 < hi; s0 += ATTN_TILE) {
        const uint n = min(uint(ATTN_TILE), hi - s0);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        attn_load_tile(k_tile, k_base, st[6], st[7], s0, n, dim, tid, tpg);
        attn_load_tile(v_tile, v_base, st[10], st[11], s0, n, dim_v, tid, tpg);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (!live) {
            continue;
        }
        const uint n_row = attn_causal_count(causal, row, s0, n);
        for (uint j = 0; j < n_row; ++j) {
            float z = attn_dot(qr, k_tile, j, dim, lane) * scale_log2;
            if (mask_kind != ATTN_MASK_NONE) {
                z += attn_mask_log2(mask_kind, mask_b, mask_f, mask_t, m_row + long(s0 + j) * st[15]);
            }
            const float p = exp2(z - lse2);
            const float ds = p * (attn_dot(dor, v_tile, j, dim_v, lane) - delta_row);
            attn_axpy(acc, ds, k_tile, j, dim, lane);
        }
    }
    if (!live) {
        return;
    }
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (c < dim) {
            dq[o_row * dim + c] = T(acc[t] * scale);
        }
    }
}

// dK and dV: grid (ceil(S / rows) x rows·32, B·Hkv); SIMD-group sg handles key tgpos.x·rows + sg of
// key/value head tgpos.y % Hkv, summing over every query of the `group` query heads that read it.
template <typename T>
static void sdpa_bwd_dkdv_rows(device const T* q, device const T* k, device const T* v, device const uchar* mask_b,
                               device const float* mask_f, device const T* mask_t, device const T* dout,
                               device const float* lse, device const float* delta, device T* dk, device T* dv,
                               constant long* st, uint n_heads, uint group, uint seq_q, uint seq_k, uint dim,
                               uint dim_v, bool causal, uint mask_kind, float scale_log2, float scale,
                               threadgroup float* q_tile, threadgroup float* do_tile, threadgroup float* lse2_t,
                               threadgroup float* delta_t, uint2 tgpos, uint tid, uint tpg, uint lane, uint sg,
                               uint nsg) {
    const uint n_kv = n_heads / group, bkv = tgpos.y, b = bkv / n_kv, kv_h = bkv % n_kv;
    const uint key0 = tgpos.x * nsg, key = key0 + sg;
    const bool live = key < seq_k;
    const uint key_r = live ? key : 0;
    float kr[ATTN_COLS], vr[ATTN_COLS], dk_acc[ATTN_COLS], dv_acc[ATTN_COLS];
    attn_load_row(kr, k + b * st[4] + kv_h * st[5] + long(key_r) * st[6], st[7], live ? dim : 0, lane);
    attn_load_row(vr, v + b * st[8] + kv_h * st[9] + long(key_r) * st[10], st[11], live ? dim_v : 0, lane);
    for (uint t = 0; t < ATTN_COLS; ++t) {
        dk_acc[t] = 0.0f;
        dv_acc[t] = 0.0f;
    }
    // Causal: queries before this threadgroup's first key attend none of its keys.
    const uint q_lo = causal ? key0 : 0;
    for (uint gi = 0; gi < group; ++gi) {
        const uint h = kv_h * group + gi;
        const long bh_row = (long(b) * n_heads + h) * seq_q;
        device const T* q_base = q + b * st[0] + h * st[1];
        const long m_col = b * st[12] + h * st[13] + long(key) * st[15];
        for (uint q0 = q_lo; q0 < seq_q; q0 += ATTN_TILE) {
            const uint n = min(uint(ATTN_TILE), seq_q - q0);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            attn_load_tile(q_tile, q_base, st[2], st[3], q0, n, dim, tid, tpg);
            attn_load_tile(do_tile, dout + bh_row * dim_v, long(dim_v), 1, q0, n, dim_v, tid, tpg);
            if (tid < n) {
                lse2_t[tid] = attn_lse2(lse[bh_row + q0 + tid]);
                delta_t[tid] = delta[bh_row + q0 + tid];
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (!live) {
                continue;
            }
            // Causal: this key is attended by queries key, key + 1, ...
            const uint i_lo = causal && key > q0 ? min(n, key - q0) : 0;
            for (uint i = i_lo; i < n; ++i) {
                float z = attn_dot(kr, q_tile, i, dim, lane) * scale_log2;
                if (mask_kind != ATTN_MASK_NONE) {
                    z += attn_mask_log2(mask_kind, mask_b, mask_f, mask_t, m_col + long(q0 + i) * st[14]);
                }
                const float p = exp2(z - lse2_t[i]);
                const float ds = p * (attn_dot(vr, do_tile, i, dim_v, lane) - delta_t[i]);
                attn_axpy(dv_acc, p, do_tile, i, dim_v, lane);
                attn_axpy(dk_acc, ds, q_tile, i, dim, lane);
            }
        }
    }
    if (!live) {
        return;
    }
    const long kv_row = long(bkv) * seq_k + key;
    for (uint t = 0; t < ATTN_COLS; ++t) {
        const uint c = lane + t * METALCORE_SIMD_WIDTH;
        if (c < dim) {
            dk[kv_row * dim + c] = T(dk_acc[t] * scale);
        }
        if (c < dim_v) {
            dv[kv_row * dim_v + c] = T(dv_acc[t]);
        }
    }
}

#define ATTN_MASKS(T)                                                                               \
    device const uchar* mask_b, device const float* mask_f,                                         \
    device const T* mask_t

#define INSTANTIATE_ATTENTION(T, SUFFIX)                                                            \
kernel void sdpa_fwd_##SUFFIX(                                                                      \
        device const T* q, device const T* k, device const T* v,                                    \
        ATTN_MASKS(T), device T* out, device float* lse,                                            \
        constant long* strides, ATTN_SIZES, constant float& scale_log2, ATTN_IDS) {                 \
    threadgroup float k_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                        \
    threadgroup float v_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                        \
    sdpa_fwd_rows<T>(q, k, v, mask_b, mask_f, mask_t, out, lse, strides, n_heads, group, seq_q,     \
                     seq_k, dim, dim_v, causal != 0, mask_kind, scale_log2, k_tile, v_tile, tgpos,  \
                     tid, tg_size.x, lane, sg, nsg);                                                \
}                                                                                                   \
kernel void sdpa_bwd_dq_##SUFFIX(                                                                   \
        device const T* q, device const T* k, device const T* v,                                    \
        ATTN_MASKS(T), device const T* dout, device const T* out,                                   \
        device const float* lse, device T* dq,                                                      \
        device float* delta, constant long* strides, ATTN_SIZES,                                    \
        constant float& scale_log2, constant float& scale, ATTN_IDS) {                              \
    threadgroup float k_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                        \
    threadgroup float v_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                        \
    sdpa_bwd_dq_rows<T>(q, k, v, mask_b, mask_f, mask_t, dout, out, lse, dq, delta, strides,        \
                        n_heads, group, seq_q, seq_k, dim, dim_v, causal != 0, mask_kind,           \
                        scale_log2, scale, k_tile, v_tile, tgpos, tid, tg_size.x, lane, sg, nsg);   \
}                                                                                                   \
kernel void sdpa_bwd_dkdv_##SUFFIX(                                                                 \
        device const T* q, device const T* k, device const T* v,                                    \
        ATTN_MASKS(T), device const T* dout, device const float* lse,                               \
        device const float* delta, device T* dk, device T* dv,                                      \
        constant long* strides, ATTN_SIZES, constant float& scale_log2,                             \
        constant float& scale, ATTN_IDS) {                                                          \
    threadgroup float q_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                        \
    threadgroup float do_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];                                       \
    threadgroup float lse2_t[ATTN_TILE];                                                            \
    threadgroup float delta_t[ATTN_TILE];                                                           \
    sdpa_bwd_dkdv_rows<T>(q, k, v, mask_b, mask_f, mask_t, dout, lse, delta, dk, dv, strides,       \
                          n_heads, group, seq_q, seq_k, dim, dim_v, causal != 0, mask_kind,         \
                          scale_log2, scale, q_tile, do_tile, lse2_t, delta_t, tgpos, tid,          \
                          tg_size.x, lane, sg, nsg);                                                \
}

INSTANTIATE_ATTENTION(float, float)
INSTANTIATE_ATTENTION(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_ATTENTION(bfloat, bfloat)
#endif
