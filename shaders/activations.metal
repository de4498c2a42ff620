// GELU (exact and tanh-approximated) and SiLU, forward and backward: one thread per element, math in
// float32 (the contract is metalcore/nn/activations.py; host code: activations_metal.py).
#include "common.h"

#define GELU_INV_SQRT2 0.70710678118654752440f
#define GELU_INV_SQRT_2PI 0.39894228040143267794f
#define GELU_SQRT_2_OVER_PI 0.79788456080286535588f
#define GELU_TANH_CUBIC 0.044715f

static inline float sigmoid(float x) {
    return 1.0f / (1.0f + exp(-x));
}

template <typename T>
static void gelu_fwd_elem(device const T* x, device T* y, uint tanh_approx, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float v = float(x[i]);
    float out;
    if (tanh_approx) {
        out = 0.5f * v * (1.0f + precise::tanh(GELU_SQRT_2_OVER_PI * (v + GELU_TANH_CUBIC * v * v * v)));
    } else {
        out = 0.5f * v * (1.0f + erf(v * GELU_INV_SQRT2));
    }
    y[i] = T(out);
}

template <typename T>
static void gelu_bwd_elem(device const T* dy, device const T* x, device T* dx, uint tanh_approx, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float v = float(x[i]);
    float grad;
    if (tanh_approx) {
        const float v2 = v * v;
        const float t = precise::tanh(GELU_SQRT_2_OVER_PI * v * (1.0f + GELU_TANH_CUBIC * v2));
        grad = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_TANH_CUBIC * v2);
    } else {
        grad = 0.5f * (1.0f + erf(v * GELU_INV_SQRT2)) + v * exp(-0.5f * v * v) * GELU_INV_SQRT_2PI;
    }
    dx[i] = T(float(dy[i]) * grad);
}

template <typename T>
static void silu_fwd_elem(device const T* x, device T* y, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float v = float(x[i]);
    y[i] = T(v * sigmoid(v));
}

template <typename T>
static void silu_bwd_elem(device const T* dy, device const T* x, device T* dx, uint n, uint i) {
    if (i >= n) {
        return;
    }
    const float v = float(x[i]);
    const float s = sigmoid(v);
    dx[i] = T(float(dy[i]) * s * (1.0f + v * (1.0f - s)));
}

#define INSTANTIATE_ACTIVATIONS(T, SUFFIX)                                                           \
kernel void gelu_fwd_##SUFFIX(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],          \
                              constant uint& tanh_approx [[buffer(2)]], constant uint& n [[buffer(3)]], \
                              uint i [[thread_position_in_grid]]) {                                 \
    gelu_fwd_elem<T>(x, y, tanh_approx, n, i);                                                      \
}                                                                                                   \
kernel void gelu_bwd_##SUFFIX(device const T* dy [[buffer(0)]], device const T* x [[buffer(1)]],   \
                              device T* dx [[buffer(2)]], constant uint& tanh_approx [[buffer(3)]], \
                              constant uint& n [[buffer(4)]], uint i [[thread_position_in_grid]]) { \
    gelu_bwd_elem<T>(dy, x, dx, tanh_approx, n, i);                                                 \
}                                                                                                   \
kernel void silu_fwd_##SUFFIX(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],          \
                              constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) { \
    silu_fwd_elem<T>(x, y, n, i);                                                                   \
}                                                                                                   \
kernel void silu_bwd_##SUFFIX(device const T* dy [[buffer(0)]], device const T* x [[buffer(1)]],   \
                              device T* dx [[buffer(2)]], constant uint& n [[buffer(3)]],          \
                              uint i [[thread_position_in_grid]]) {                                 \
    silu_bwd_elem<T>(dy, x, dx, n, i);                                                              \
}

INSTANTIATE_ACTIVATIONS(float, float)
INSTANTIATE_ACTIVATIONS(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_ACTIVATIONS(bfloat, bfloat)
#endif
