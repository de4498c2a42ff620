// SwiGLU: y = silu(gate) * up, and its backward recomputing sigmoid(gate); one thread per element,
// math in float32 (the contract is metalcore/nn/swiglu.py; host code: swiglu_metal.py).
#include "common.h"

static inline float swiglu_sigmoid(float x) {
    return 1.0f / (1.0f + exp(-x));
}

template <typename T>
static void swiglu_fwd_elem(device const T* gate, device const T* up, device T* y, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float g = float(gate[i]);
    y[i] = T(g * swiglu_sigmoid(g) * float(up[i]));
}

template <typename T>
static void swiglu_bwd_elem(device const T* dy, device const T* gate, device const T* up, device T* dgate,
                            device T* dup, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float g = float(gate[i]), u = float(up[i]), d = float(dy[i]);
    const float s = swiglu_sigmoid(g);
    dup[i] = T(d * g * s);
    dgate[i] = T(d * u * s * (1.0f + g * (1.0f - s)));
}

#define INSTANTIATE_SWIGLU(T, SUFFIX)                                                                \
kernel void swiglu_fwd_##SUFFIX(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]], \
                                device T* y [[buffer(2)]], constant uint& n [[buffer(3)]],         \
                                uint i [[thread_position_in_grid]]) {                               \
    swiglu_fwd_elem<T>(gate, up, y, n, i);                                                          \
}                                                                                                   \
kernel void swiglu_bwd_##SUFFIX(device const T* dy [[buffer(0)]], device const T* gate [[buffer(1)]], \
                                device const T* up [[buffer(2)]], device T* dgate [[buffer(3)]],   \
                                device T* dup [[buffer(4)]], constant uint& n [[buffer(5)]],       \
                                uint i [[thread_position_in_grid]]) {                               \
    swiglu_bwd_elem<T>(dy, gate, up, dgate, dup, n, i);                                             \
}

INSTANTIATE_SWIGLU(float, float)
INSTANTIATE_SWIGLU(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_SWIGLU(bfloat, bfloat)
#endif
