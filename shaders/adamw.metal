// AdamW's step over a list of tensors in one dispatch (the math is metalcore/optim/adamw.py).
//
// Tensor lists arrive as arrays of device pointers (torch.mps passes a list of tensors as their GPU
// addresses). Threadgroup b updates METALCORE_ADAMW_BLOCK elements of the tensor whose range of
// blocks holds b (block_starts: the first block of each tensor; a binary search finds it). Moments
// are float32; the parameter is read, updated in float32 and rounded to its dtype once.
#include "common.h"

template <typename T>
static void adamw_block(device T* constant* params, device const T* constant* grads,
                        device float* constant* exp_avgs, device float* constant* exp_avg_sqs,
                        device float* constant* max_exp_avg_sqs, constant long* numels,
                        constant long* block_starts, constant float* step_sizes, constant float* bc2_sqrts,
                        uint ntensors, float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
                        float eps, uint flags, uint block, uint tid) {
    uint lo = 0, hi = ntensors;  // last t with block_starts[t] <= block
    while (hi - lo > 1) {
        const uint mid = (lo + hi) / 2;
        if (block_starts[mid] <= long(block)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const uint t = lo;
    const bool amsgrad = (flags & 1u) != 0, maximize = (flags & 2u) != 0;
    device T* p = params[t];
    device const T* g = grads[t];
    device float* m = exp_avgs[t];
    device float* v = exp_avg_sqs[t];
    const long numel = numels[t];
    const long first = (long(block) - block_starts[t]) * METALCORE_ADAMW_BLOCK;
    const float step_size = step_sizes[t], bc2_sqrt = bc2_sqrts[t];
    for (uint k = 0; k < METALCORE_ADAMW_BLOCK / METALCORE_ADAMW_THREADS; ++k) {
        const long i = first + long(k * METALCORE_ADAMW_THREADS + tid);
        if (i >= numel) {
            break;
        }
        float grad = float(g[i]);
        if (maximize) {
            grad = -grad;
        }
        const float param = float(p[i]) * decay;
        float mi = m[i];
        // torch.lerp's two formulas (exact at both ends), as the reference's _foreach_lerp_.
        mi = one_minus_beta1 < 0.5f ? mi + one_minus_beta1 * (grad - mi)
                                    : grad - (grad - mi) * (1.0f - one_minus_beta1);
        const float vi = v[i] * beta2 + one_minus_beta2 * grad * grad;
        float v_hat = vi;
        if (amsgrad) {
            device float* vmax = max_exp_avg_sqs[t];
            v_hat = max(vmax[i], vi);
            vmax[i] = v_hat;
        }
        const float denom = sqrt(v_hat) / bc2_sqrt + eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = T(param + step_size * (mi / denom));
    }
}

#define INSTANTIATE_ADAMW(T, SUFFIX)                                                                 \
kernel void adamw_step_##SUFFIX(                                                                   \
        device T* constant* params [[buffer(0)]], device const T* constant* grads [[buffer(1)]],   \
        device float* constant* exp_avgs [[buffer(2)]],                                            \
        device float* constant* exp_avg_sqs [[buffer(3)]],                                         \
        device float* constant* max_exp_avg_sqs [[buffer(4)]], constant long* numels [[buffer(5)]], \
        constant long* block_starts [[buffer(6)]], constant float* step_sizes [[buffer(7)]],       \
        constant float* bc2_sqrts [[buffer(8)]], constant uint& ntensors [[buffer(9)]],            \
        constant float& decay [[buffer(10)]], constant float& one_minus_beta1 [[buffer(11)]],      \
        constant float& beta2 [[buffer(12)]], constant float& one_minus_beta2 [[buffer(13)]],      \
        constant float& eps [[buffer(14)]], constant uint& flags [[buffer(15)]],                   \
        uint block [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]]) { \
    adamw_block<T>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, numels, block_starts,   \
                   step_sizes, bc2_sqrts, ntensors, decay, one_minus_beta1, beta2, one_minus_beta2, \
                   eps, flags, block, tid);                                                         \
}

INSTANTIATE_ADAMW(float, float)
INSTANTIATE_ADAMW(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_ADAMW(bfloat, bfloat)
#endif
