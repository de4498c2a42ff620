// RoPE in Hugging Face's half-split convention, forward and its adjoint, q and k in one launch. The
// contract is metalcore/nn/rope.py; the host code is metalcore/nn/rope_metal.py. With x1 = x[:D/2],
// x2 = x[D/2:] and the same split of cos (c1, c2) and sin (s1, s2):
//   forward  x cos + rotate_half(x) sin:   o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2
//   backward dy cos - rotate_half(dy sin): o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1
// both exact for any cos/sin. Math in float32.
//
// One thread per rotated pair (i, i + D/2): a 3-D grid (pair i < D/2, head h < Hq + Hk, flat position
// b * S + s), the heads of q first, then those of k. No threadgroup memory: every element is read and
// written once, and the cos/sin row of a position, read by all its heads, stays in cache. Every tensor
// is addressed through its strides (in elements, the `strides` array: q, k, q_out, k_out as
// (batch, head, seq, dim), then cos and sin as (batch, seq, dim) with batch stride 0 when shared), so
// the (B, S, H, D) layout and slices of a fused qkv projection need no copies.
#include "common.h"

// Offsets into the strides array.
#define ROPE_Q 0
#define ROPE_K 4
#define ROPE_QO 8
#define ROPE_KO 12
#define ROPE_COS 16
#define ROPE_SIN 19

template <typename T>
static void rope_pair(device const T* q, device const T* k, device T* q_out, device T* k_out,
                      device const T* cosines, device const T* sines, constant long* st, uint seq_len,
                      uint half_dim, uint n_q_heads, uint n_k_heads, uint n_pos, bool backward, uint3 gid) {
    const uint i = gid.x, h = gid.y, pos = gid.z;
    if (i >= half_dim || h >= n_q_heads + n_k_heads || pos >= n_pos) {
        return;
    }
    const long b = pos / seq_len, s = pos % seq_len;
    const bool is_q = h < n_q_heads;
    const long head = is_q ? h : h - n_q_heads;
    const uint xs = is_q ? ROPE_Q : ROPE_K, os = is_q ? ROPE_QO : ROPE_KO;
    device const T* x = is_q ? q : k;
    device T* out = is_q ? q_out : k_out;

    const long c_row = b * st[ROPE_COS] + s * st[ROPE_COS + 1];
    const long s_row = b * st[ROPE_SIN] + s * st[ROPE_SIN + 1];
    const long c_d = st[ROPE_COS + 2], s_d = st[ROPE_SIN + 2];
    const float c1 = float(cosines[c_row + long(i) * c_d]);
    const float c2 = float(cosines[c_row + long(i + half_dim) * c_d]);
    const float s1 = float(sines[s_row + long(i) * s_d]);
    const float s2 = float(sines[s_row + long(i + half_dim) * s_d]);

    const long x_row = b * st[xs] + head * st[xs + 1] + s * st[xs + 2];
    const long x_d = st[xs + 3];
    const float x1 = float(x[x_row + long(i) * x_d]), x2 = float(x[x_row + long(i + half_dim) * x_d]);
    const float o1 = backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
    const float o2 = backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;

    const long o_row = b * st[os] + head * st[os + 1] + s * st[os + 2];
    const long o_d = st[os + 3];
    out[o_row + long(i) * o_d] = T(o1);
    out[o_row + long(i + half_dim) * o_d] = T(o2);
}

#define INSTANTIATE_ROPE(T, SUFFIX)                                                                  \
kernel void rope_##SUFFIX(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],          \
                          device T* q_out [[buffer(2)]], device T* k_out [[buffer(3)]],              \
                          device const T* cosines [[buffer(4)]], device const T* sines [[buffer(5)]], \
                          constant long* strides [[buffer(6)]], constant uint& seq_len [[buffer(7)]], \
                          constant uint& half_dim [[buffer(8)]], constant uint& n_q_heads [[buffer(9)]], \
                          constant uint& n_k_heads [[buffer(10)]], constant uint& n_pos [[buffer(11)]], \
                          constant uint& backward [[buffer(12)]], uint3 gid [[thread_position_in_grid]]) { \
    rope_pair<T>(q, k, q_out, k_out, cosines, sines, strides, seq_len, half_dim, n_q_heads, n_k_heads, \
                 n_pos, backward != 0, gid);                                                         \
}

INSTANTIATE_ROPE(float, float)
INSTANTIATE_ROPE(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_ROPE(bfloat, bfloat)
#endif
