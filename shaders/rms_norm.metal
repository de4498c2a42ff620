// RMSNorm: y = x * rstd * (offset + w), rstd = 1/sqrt(mean(x^2) + eps), with the fused residual add
// and the backward. The contract is metalcore/nn/rms_norm.py; the host code is rms_norm_metal.py.
//
// Forward and dx kernels: one threadgroup per row (threads_for_row(n) threads, a power of two), each
// thread striding over the row; statistics in float32. The weight arrives as float32 whatever its
// dtype (the host converts it: n elements), so that fp32 weights work with half/bfloat rows.
// dweight: a 2-D grid (column, chunk of METALCORE_RMS_DW_ROWS_PER_THREAD rows); each thread sums its
// column over its chunk in float32 and the host adds the chunks: no atomics, deterministic.
#include "common.h"

template <typename T>
static void rms_norm_fwd_row(device const T* x, device const float* w, device T* y, device float* rstd,
                             uint n, float eps, float offset, bool has_weight, threadgroup float* scratch,
                             uint row, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base = ulong(row) * n;
    float ss = 0.0f;
    for (uint i = tid; i < n; i += tpg) {
        const float v = float(x[base + i]);
        ss += v * v;
    }
    const float r = rsqrt(threadgroup_sum(ss, scratch, lane, sg, nsg) / float(n) + eps);
    if (tid == 0) {
        rstd[row] = r;
    }
    for (uint i = tid; i < n; i += tpg) {
        float v = float(x[base + i]) * r;
        if (has_weight) {
            v *= w[i] + offset;
        }
        y[base + i] = T(v);
    }
}

// h = x + residual, rounded to T as an unfused model computes it, then RMSNorm(h).
template <typename T>
static void fused_add_rms_norm_fwd_row(device const T* x, device const T* res, device const float* w,
                                       device T* y, device T* h, device float* rstd, uint n, float eps,
                                       float offset, bool has_weight, threadgroup float* scratch, uint row,
                                       uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base = ulong(row) * n;
    float ss = 0.0f;
    for (uint i = tid; i < n; i += tpg) {
        const T s = T(float(x[base + i]) + float(res[base + i]));
        h[base + i] = s;
        const float v = float(s);
        ss += v * v;
    }
    const float r = rsqrt(threadgroup_sum(ss, scratch, lane, sg, nsg) / float(n) + eps);
    if (tid == 0) {
        rstd[row] = r;
    }
    for (uint i = tid; i < n; i += tpg) {  // the same thread wrote h[base + i] above
        float v = float(h[base + i]) * r;
        if (has_weight) {
            v *= w[i] + offset;
        }
        y[base + i] = T(v);
    }
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * (offset + w), xhat = x * rstd.
template <typename T>
static void rms_norm_bwd_dx_row(device const T* dy, device const T* x, device const float* w,
                                device const float* rstd, device T* dx, uint n, float offset, bool has_weight,
                                threadgroup float* scratch, uint row, uint tid, uint tpg, uint lane, uint sg,
                                uint nsg) {
    const ulong base = ulong(row) * n;
    const float r = rstd[row];
    float dot = 0.0f;
    for (uint i = tid; i < n; i += tpg) {
        const float g = float(dy[base + i]) * (has_weight ? w[i] + offset : 1.0f);
        dot += g * float(x[base + i]) * r;
    }
    const float mean_gx = threadgroup_sum(dot, scratch, lane, sg, nsg) / float(n);
    for (uint i = tid; i < n; i += tpg) {
        const float g = float(dy[base + i]) * (has_weight ? w[i] + offset : 1.0f);
        const float xhat = float(x[base + i]) * r;
        dx[base + i] = T(r * (g - xhat * mean_gx));
    }
}

template <typename T>
static void rms_norm_bwd_dw_chunk(device const T* dy, device const T* x, device const float* rstd,
                                  device float* partial, uint rows, uint n, uint2 pos) {
    const uint col = pos.x, chunk = pos.y;
    if (col >= n) {
        return;
    }
    const uint first = chunk * METALCORE_RMS_DW_ROWS_PER_THREAD;
    const uint last = min(rows, first + METALCORE_RMS_DW_ROWS_PER_THREAD);
    float acc = 0.0f;
    for (uint r = first; r < last; ++r) {
        const ulong i = ulong(r) * n + col;
        acc += float(dy[i]) * float(x[i]) * rstd[r];
    }
    partial[ulong(chunk) * n + col] = acc;
}

#define ROW_IDS                                                                                     \
    uint row [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],        \
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],                  \
    uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]

#define INSTANTIATE_RMS_NORM(T, SUFFIX)                                                              \
kernel void rms_norm_fwd_##SUFFIX(                                                                 \
        device const T* x [[buffer(0)]], device const float* w [[buffer(1)]],                      \
        device T* y [[buffer(2)]], device float* rstd [[buffer(3)]], constant uint& n [[buffer(4)]], \
        constant float& eps [[buffer(5)]], constant float& offset [[buffer(6)]],                    \
        constant uint& has_weight [[buffer(7)]], ROW_IDS) {                                         \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    rms_norm_fwd_row<T>(x, w, y, rstd, n, eps, offset, has_weight != 0, scratch, row, tid, tpg,    \
                        lane, sg, nsg);                                                             \
}                                                                                                   \
kernel void fused_add_rms_norm_fwd_##SUFFIX(                                                       \
        device const T* x [[buffer(0)]], device const T* res [[buffer(1)]],                        \
        device const float* w [[buffer(2)]], device T* y [[buffer(3)]], device T* h [[buffer(4)]], \
        device float* rstd [[buffer(5)]], constant uint& n [[buffer(6)]],                          \
        constant float& eps [[buffer(7)]], constant float& offset [[buffer(8)]],                    \
        constant uint& has_weight [[buffer(9)]], ROW_IDS) {                                         \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    fused_add_rms_norm_fwd_row<T>(x, res, w, y, h, rstd, n, eps, offset, has_weight != 0, scratch,  \
                                  row, tid, tpg, lane, sg, nsg);                                    \
}                                                                                                   \
kernel void rms_norm_bwd_dx_##SUFFIX(                                                              \
        device const T* dy [[buffer(0)]], device const T* x [[buffer(1)]],                         \
        device const float* w [[buffer(2)]], device const float* rstd [[buffer(3)]],               \
        device T* dx [[buffer(4)]], constant uint& n [[buffer(5)]],                                \
        constant float& offset [[buffer(6)]], constant uint& has_weight [[buffer(7)]], ROW_IDS) {  \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    rms_norm_bwd_dx_row<T>(dy, x, w, rstd, dx, n, offset, has_weight != 0, scratch, row, tid, tpg, \
                           lane, sg, nsg);                                                          \
}                                                                                                   \
kernel void rms_norm_bwd_dw_##SUFFIX(                                                              \
        device const T* dy [[buffer(0)]], device const T* x [[buffer(1)]],                         \
        device const float* rstd [[buffer(2)]], device float* partial [[buffer(3)]],               \
        constant uint& rows [[buffer(4)]], constant uint& n [[buffer(5)]],                         \
        uint2 pos [[thread_position_in_grid]]) {                                                   \
    rms_norm_bwd_dw_chunk<T>(dy, x, rstd, partial, rows, n, pos);                                  \
}

INSTANTIATE_RMS_NORM(float, float)
INSTANTIATE_RMS_NORM(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_RMS_NORM(bfloat, bfloat)
#endif
