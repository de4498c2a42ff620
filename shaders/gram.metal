// alpha A A^T + beta C, computing only the upper tiles (BLAS syrk, batched): the symmetric products
// of one Newton-Schulz / Polar Express step, b G + c G^2 with G = X X^T (metalcore::gram_poly; the
// contract is metalcore/linalg/syrk.py, the host code metalcore/linalg/syrk_metal.py, which launches
// this twice: G = syrk(X), then syrk(G, C = G, alpha = c, beta = b), G^2 being G G^T).
//
// The (m x m) output is cut into GRAM_BLOCK-row square tiles; one threadgroup per upper tile pair
// (i, j), i <= j, per batch element: T(T + 1) / 2 of the T^2 tiles, about half the FLOPs of a full
// product (0.52 of them at m = 4096). It accumulates P = A[rows_i] A[rows_j]^T in float32 over k in
// GRAM_BLOCK_K steps, both row blocks staged in threadgroup memory as float32 (2 x 16 x 64 x 4 B =
// 8 KiB of Apple's 32 KiB), 16 x 16 threads each holding a 4 x 4 block of P in registers (rows
// ty + 16u, columns tx + 16v: neighbouring lanes read neighbouring words). P is written twice: to
// tile (i, j) where row <= column and, transposed, to tile (j, i) where row > column, each copy with
// its own beta C element (C need not be symmetric). No two threadgroups write one element, so the Gram
// part of the result is exactly symmetric, which the second launch relies on.
//
// Plain float FMAs, no simdgroup_matrix: the shader executor (metalcore/executor/) does not implement it, and a
// kernel CI cannot run is not shipped.
#include "common.h"

#define GRAM_BLOCK 64
#define GRAM_BLOCK_K 16
// Threads per side of the threadgroup (16 x 16 = 256), each computing GRAM_MICRO x GRAM_MICRO outputs.
#define GRAM_SIDE 16
#define GRAM_MICRO (GRAM_BLOCK / GRAM_SIDE)
#define GRAM_THREADS (GRAM_SIDE * GRAM_SIDE)
static_assert(GRAM_BLOCK % GRAM_SIDE == 0, "each thread takes whole micro-tiles");
static_assert((GRAM_BLOCK * GRAM_BLOCK_K) % GRAM_THREADS == 0, "the staging loads divide evenly");

// Strides (in elements) in the `st` array: A as (batch, row, column), then C likewise.
#define GRAM_A 0
#define GRAM_C 3

// Upper tile pairs column by column: p = j (j + 1) / 2 + i, 0 <= i <= j. The float square root can
// land one off where 8p + 1 is near a perfect square; the two integer corrections put j back.
static inline uint2 gram_pair(uint p) {
    uint j = uint((sqrt(8.0f * float(p) + 1.0f) - 1.0f) * 0.5f);
    j = j * (j + 1) / 2 > p ? j - 1 : j;
    j = (j + 1) * (j + 2) / 2 <= p ? j + 1 : j;
    return uint2(p - j * (j + 1) / 2, j);
}

template <typename T>
static void gram_tile(device const T* A, device const T* C, device T* out, constant long* st, uint m, uint k,
                      float alpha, float beta, bool has_c, threadgroup float* tile_i, threadgroup float* tile_j,
                      uint3 group, uint2 t) {
    const uint2 ij = gram_pair(group.x);
    const uint row0 = ij.x * GRAM_BLOCK, col0 = ij.y * GRAM_BLOCK;
    const long b = group.z;
    device const T* a = A + b * st[GRAM_A];
    const uint tid = t.y * GRAM_SIDE + t.x;

    float acc[GRAM_MICRO][GRAM_MICRO];
    for (uint u = 0; u < GRAM_MICRO; ++u) {
        for (uint v = 0; v < GRAM_MICRO; ++v) {
            acc[u][v] = 0.0f;
        }
    }
    for (uint k0 = 0; k0 < k; k0 += GRAM_BLOCK_K) {
        // Stage rows_i and rows_j of this k step as [kk][row]; consecutive threads read consecutive
        // columns of A (its unit stride in the common row-major case). Out of range reads as zero.
        for (uint e = tid; e < GRAM_BLOCK * GRAM_BLOCK_K; e += GRAM_THREADS) {
            const uint r = e / GRAM_BLOCK_K, kk = e % GRAM_BLOCK_K;
            const long col = long(k0 + kk) * st[GRAM_A + 2];
            const bool in_k = k0 + kk < k;
            tile_i[kk * GRAM_BLOCK + r] = in_k && row0 + r < m ? float(a[long(row0 + r) * st[GRAM_A + 1] + col]) : 0.0f;
            tile_j[kk * GRAM_BLOCK + r] = in_k && col0 + r < m ? float(a[long(col0 + r) * st[GRAM_A + 1] + col]) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < GRAM_BLOCK_K; ++kk) {
            float x[GRAM_MICRO], y[GRAM_MICRO];
            for (uint u = 0; u < GRAM_MICRO; ++u) {
                x[u] = tile_i[kk * GRAM_BLOCK + t.y + GRAM_SIDE * u];
                y[u] = tile_j[kk * GRAM_BLOCK + t.x + GRAM_SIDE * u];
            }
            for (uint u = 0; u < GRAM_MICRO; ++u) {
                for (uint v = 0; v < GRAM_MICRO; ++v) {
                    acc[u][v] = fma(x[u], y[v], acc[u][v]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are free for the next step
    }

    device const T* c_mat = C + b * st[GRAM_C];
    device T* o = out + b * long(m) * m;
    for (uint u = 0; u < GRAM_MICRO; ++u) {
        const uint r = row0 + t.y + GRAM_SIDE * u;
        for (uint v = 0; v < GRAM_MICRO; ++v) {
            const uint c = col0 + t.x + GRAM_SIDE * v;
            if (r >= m || c >= m || r > c) {
                continue;
            }
            const float p = alpha * acc[u][v];
            // beta = 0 ignores C, NaN included (torch.baddbmm's rule): the host then passes has_c = 0.
            const float top = has_c ? p + beta * float(c_mat[long(r) * st[GRAM_C + 1] + long(c) * st[GRAM_C + 2]]) : p;
            o[long(r) * m + c] = T(top);
            if (r < c) {
                const float bottom =
                    has_c ? p + beta * float(c_mat[long(c) * st[GRAM_C + 1] + long(r) * st[GRAM_C + 2]]) : p;
                o[long(c) * m + r] = T(bottom);
            }
        }
    }
}

#define INSTANTIATE_GRAM(T, SUFFIX)                                                                  \
kernel void syrk_##SUFFIX(device const T* A [[buffer(0)]], device const T* C [[buffer(1)]],          \
                          device T* out [[buffer(2)]], constant long* strides [[buffer(3)]],         \
                          constant uint& m [[buffer(4)]], constant uint& k [[buffer(5)]],            \
                          constant float& alpha [[buffer(6)]], constant float& beta [[buffer(7)]],   \
                          constant uint& has_c [[buffer(8)]],                                        \
                          uint3 group [[threadgroup_position_in_grid]],                              \
                          uint3 t [[thread_position_in_threadgroup]]) {                              \
    threadgroup float tile_i[GRAM_BLOCK_K * GRAM_BLOCK];                                            \
    threadgroup float tile_j[GRAM_BLOCK_K * GRAM_BLOCK];                                            \
    gram_tile<T>(A, C, out, strides, m, k, alpha, beta, has_c != 0, tile_i, tile_j, group, t.xy);   \
}

INSTANTIATE_GRAM(float, float)
INSTANTIATE_GRAM(half, half)
#if __METAL_VERSION__ >= 310
INSTANTIATE_GRAM(bfloat, bfloat)
#endif
