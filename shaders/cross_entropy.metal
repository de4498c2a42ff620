// Cross-entropy's fused chunk kernel: per-row loss of a (rows, V) block of logits and, in the same
// buffer, grad_scale * d loss / d logits. The contract and the math are in
// metalcore/nn/cross_entropy.py; the host code is cross_entropy_metal.py.
//
// One threadgroup per row (threads_for_row(V) threads), each thread striding over the row with its
// own running maximum and rescaled sum of exponentials (an online log-sum-exp); the threadgroup then
// merges them. A second pass writes the gradient over the logits. Arithmetic in float32.
#include "common.h"

// Maximum of v over the threadgroup, returned to every thread (same scheme as threadgroup_sum).
static inline float cross_entropy_threadgroup_max(float v, threadgroup float* scratch, uint lane, uint sg,
                                                  uint nsg) {
    v = simd_max(v);
    if (lane == 0) {
        scratch[sg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = lane < nsg ? scratch[lane] : -INFINITY;
    total = simd_max(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

// cap * tanh(x / cap) (Gemma 2/3's final logit soft-capping).
static inline float cross_entropy_softcap(float x, float cap) {
    return cap * tanh(x / cap);
}

template <typename T>
static void cross_entropy_row(device T* logits, device const long* target, device const float* scale,
                              device float* loss, uint n, uint scale_stride, int ignore_index,
                              float smoothing, float z_loss, float cap, bool has_cap, bool write_grad,
                              threadgroup float* scratch, uint row, uint tid, uint tpg, uint lane, uint sg,
                              uint nsg) {
    device T* x = logits + ulong(row) * n;
    const long t = target[row];
    if (t == long(ignore_index)) {
        if (write_grad) {
            for (uint i = tid; i < n; i += tpg) {
                x[i] = T(0.0f);
            }
        }
        if (tid == 0) {
            loss[row] = 0.0f;
        }
        return;
    }
    float m = -INFINITY, s = 0.0f, z_sum = 0.0f;
    for (uint i = tid; i < n; i += tpg) {
        float z = float(x[i]);
        if (has_cap) {
            z = cross_entropy_softcap(z, cap);
        }
        z_sum += z;
        const float m_new = max(m, z);
        s = s * exp(m - m_new) + exp(z - m_new);
        m = m_new;
    }
    const float row_max = cross_entropy_threadgroup_max(m, scratch, lane, sg, nsg);
    // Threads that saw no column (n < tpg) have m = -inf and s = 0: they add nothing.
    const float part = m == -INFINITY ? 0.0f : s * exp(m - row_max);
    const float total = threadgroup_sum(part, scratch, lane, sg, nsg);
    const float lse = row_max + log(total);
    z_sum = threadgroup_sum(z_sum, scratch, lane, sg, nsg);
    float z_t = t >= 0 && t < long(n) ? float(x[t]) : 0.0f;  // out-of-range targets: undefined, memory-safe
    if (has_cap) {
        z_t = cross_entropy_softcap(z_t, cap);
    }
    if (tid == 0) {
        loss[row] = lse - (1.0f - smoothing) * z_t - smoothing / float(n) * z_sum + z_loss * lse * lse;
    }
    if (!write_grad) {
        return;
    }
    // Every thread has read x[t] above before any thread overwrites it below.
    threadgroup_barrier(mem_flags::mem_device);
    const float g_scale = scale[ulong(row) * scale_stride];
    // softmax as exp(z - max) / sum: exp(z - lse) would carry lse's rounding (its ulp, ~2e-6 at
    // lse ~ 20) into every probability as a relative error.
    const float p_scale = (1.0f + 2.0f * z_loss * lse) / total;
    for (uint i = tid; i < n; i += tpg) {
        float z = float(x[i]);
        if (has_cap) {
            z = cross_entropy_softcap(z, cap);
        }
        float g = exp(z - row_max) * p_scale - smoothing / float(n);
        if (long(i) == t) {
            g -= 1.0f - smoothing;
        }
        if (has_cap) {
            g *= 1.0f - (z / cap) * (z / cap);
        }
        x[i] = T(g * g_scale);
    }
}

#define INSTANTIATE_CROSS_ENTROPY(T, SUFFIX)                                                         \
kernel void cross_entropy_chunk_##SUFFIX(                                                           \
        device T* logits [[buffer(0)]], device const long* target [[buffer(1)]],                    \
        device const float* scale [[buffer(2)]], device float* loss [[buffer(3)]],                  \
        constant uint& n [[buffer(4)]], constant uint& scale_stride [[buffer(5)]],                  \
        constant int& ignore_index [[buffer(6)]], constant float& smoothing [[buffer(7)]],          \
        constant float& z_loss [[buffer(8)]], constant float& cap [[buffer(9)]],                    \
        constant uint& has_cap [[buffer(10)]], constant uint& write_grad [[buffer(11)]],            \
        uint row [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],     \
        uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],              \
        uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]) {      \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    cross_entropy_row<T>(logits, target, scale, loss, n, scale_stride, ignore_index, smoothing, z_loss, \
                         cap, has_cap != 0, write_grad != 0, scratch, row, tid, tpg, lane, sg, nsg); \
}

INSTANTIATE_CROSS_ENTROPY(float, float)
INSTANTIATE_CROSS_ENTROPY(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_CROSS_ENTROPY(bfloat, bfloat)
#endif
