// Batched small-matrix Jacobi methods: the symmetric eigendecomposition (two-sided Jacobi) and the
// SVD (one-sided Jacobi), one threadgroup per matrix, float32 only (Metal has no float64), both sides
// <= METALCORE_LINALG_MAX_N. The contracts are metalcore/linalg/{eigh,svd}.py; the host code is
// metalcore/linalg/{eigh,svd}_metal.py. The algorithms are those of the Triton kernels
// (metalcore/linalg/{eigh,svd}_triton.py):
//
// * The matrix is divided by max|a|, so that tiny- and huge-scaled inputs behave like unit-scaled
//   ones; eigenvalues and singular values are scaled back at the end.
// * A sweep is N - 1 rounds (N = n rounded up to even; index n of an odd n is a zero row and column)
//   of the round-robin tournament: in round t index N - 1 meets t and index (t - k) mod (N - 1) meets
//   (t + k) mod (N - 1), k = 1 .. N/2 - 1, so a round holds N/2 disjoint pairs, rotated at once, and
//   a sweep meets every pair once.
// * A pair (p, q), p < q, is rotated only while |a_pq| > tol sqrt(|a_pp|) sqrt(|a_qq|) (for the SVD,
//   of the Gram matrix: |a_p . a_q| > tol ||a_p|| ||a_q||) and |a_pq| > tiny: scale-invariant, which
//   keeps small eigenvalues and singular values of graded matrices accurate relative to themselves.
//   The host passes tol (sqrt(n) eps for eigh, LAPACK gesvj's; m eps for an m x n SVD, as the Triton
//   kernel, since the computed a_p . a_q carries a rounding error of about sqrt(m) eps ||a_p|| ||a_q||).
//   The loop stops after a sweep without rotations, or after `max_sweeps`.
// * Non-convergence, and NaN/Inf anywhere in the input, are reported in-band: every output of that
//   matrix is NaN; the other matrices of the batch are unaffected.
//
// Control flow that contains a threadgroup barrier depends only on values every thread read from
// threadgroup memory after a barrier (the convergence flags, the input check), so it is uniform.
#include "common.h"

#define JACOBI_IDS                                                                                  \
    uint mat [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],          \
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],                  \
    uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]

// Rounded up to even, n stays within the limit; eigh's rotations of a round are computed by the lanes
// of one SIMD-group, one pair each.
static_assert(METALCORE_LINALG_MAX_N % 2 == 0, "N = n rounded up to even must stay <= METALCORE_LINALG_MAX_N");
static_assert(METALCORE_LINALG_MAX_N / 2 <= METALCORE_SIMD_WIDTH, "one lane per pair of a round");

// Max of v over the threadgroup, returned to every thread; as threadgroup_sum (common.h).
inline float threadgroup_max(float v, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
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

// Inf or NaN: all exponent bits set. Tested on the bits, not with isfinite(): Apple compiles with fast
// math by default, which lets the compiler assume finite floats and fold isfinite() to true.
static bool nonfinite(float x) {
    return (as_type<uint>(x) & 0x7f800000u) == 0x7f800000u;
}

// Pair k of round t of the tournament on N indices, as (p, q) with p < q.
static uint2 jacobi_pair(uint t, uint k, uint N) {
    const uint last = N - 1;
    const uint i = k == 0 ? t : (t + last - k) % last;
    const uint j = k == 0 ? last : (t + k) % last;
    return uint2(min(i, j), max(i, j));
}

// tan(theta) of the symmetric Schur rotation (Golub & Van Loan, Alg. 8.4.1) that diagonalizes
// [[app, apq], [apq, aqq]], apq != 0: the smaller of the two angles. sqrt(1 + zeta^2) is formed
// without squaring a |zeta| above 1, which would overflow for |zeta| > 1e19.
static float schur_tangent(float app, float aqq, float apq) {
    const float zeta = (aqq - app) / (2.0f * apq);
    const float az = fabs(zeta);
    const float hyp = az > 1.0f ? az * sqrt(1.0f + (1.0f / az) * (1.0f / az)) : sqrt(1.0f + az * az);
    return (zeta >= 0.0f ? 1.0f : -1.0f) / (az + hyp);
}

// Index of (i, j) in the packed upper triangle, column by column: a symmetric tile of N(N+1)/2 floats
// (8.1 KiB at N = 64), which leaves room for the 16 KiB eigenvector tile in Apple's 32 KiB.
static uint packed(uint i, uint j) {
    const uint lo = min(i, j), hi = max(i, j);
    return hi * (hi + 1) / 2 + lo;
}

// --- Symmetric eigendecomposition (two-sided Jacobi) -----------------------------------------------
// A <- J^T A J and V <- V J for all rotations of a round at once. SIMD-group 0 computes the round's
// rotations (lane k: pair k), with J = [[c, s], [-s, c]] on rows/columns (p, q), and diagonalizes the
// pair's 2x2 block itself (a_pp - t a_pq, a_qq + t a_pq, a_pq = 0 exactly). Then each thread takes
// whole 2x2 blocks (rows of pair k, columns of pair l, k < l): the block's four entries depend on each
// other only, so they are updated in place; the symmetric tile stores each block once, so both
// members of a pair always see the same a_pq. Eigenvalues ascend (ties by index) and the columns of V
// follow them.
template <typename T>
static void jacobi_eigh_tile(device const T* A, device T* W, device T* Q, uint n, bool upper, bool want_v,
                             float tol, float tiny, uint max_sweeps, threadgroup float* a, threadgroup float* v,
                             threadgroup float* cs, threadgroup float* sn, threadgroup uint2* pairs,
                             threadgroup uint* rank, threadgroup float* scratch, threadgroup uint* flag, uint mat,
                             uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const uint N = n + n % 2, P = N / 2;
    const ulong base = ulong(mat) * n * n;
    float big = 0.0f, bad_count = 0.0f;
    for (uint e = tid; e < N * N; e += tpg) {
        const uint r = e / N, c = e % N;
        if (r <= c) {  // (r, c) of the upper triangle: A[r][c] ('U') or its mirror A[c][r] ('L')
            const float x = c < n ? float(A[base + (upper ? r * n + c : c * n + r)]) : 0.0f;
            a[packed(r, c)] = x;
            big = max(big, fabs(x));
            bad_count += nonfinite(x) ? 1.0f : 0.0f;
        }
    }
    const float amax = threadgroup_max(big, scratch, lane, sg, nsg);
    const bool bad_input = threadgroup_sum(bad_count, scratch, lane, sg, nsg) > 0.0f;
    const float scale = amax > 0.0f ? amax : 1.0f;
    for (uint e = tid; e < N * N; e += tpg) {  // the same elements this thread loaded
        const uint r = e / N, c = e % N;
        if (r <= c) {
            a[packed(r, c)] /= scale;
        }
    }
    if (want_v) {
        for (uint e = tid; e < n * N; e += tpg) {
            v[e] = e / N == e % N ? 1.0f : 0.0f;
        }
    }
    bool rotated = !bad_input;
    for (uint sweep = 0; rotated && sweep < max_sweeps; ++sweep) {
        for (uint t = 0; t < N - 1; ++t) {
            threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous round (or the load) is visible
            if (sg == 0) {
                bool act = false;
                if (lane < P) {
                    const uint2 pq = jacobi_pair(t, lane, N);
                    const float app = a[packed(pq.x, pq.x)], aqq = a[packed(pq.y, pq.y)];
                    const float apq = a[packed(pq.x, pq.y)];
                    const float mag = fabs(apq);
                    act = mag > tol * sqrt(fabs(app)) * sqrt(fabs(aqq)) && mag > tiny;
                    const float tt = act ? schur_tangent(app, aqq, apq) : 0.0f;
                    const float c = 1.0f / sqrt(1.0f + tt * tt);
                    pairs[lane] = pq;
                    cs[lane] = c;
                    sn[lane] = tt * c;
                    if (act) {
                        a[packed(pq.x, pq.x)] = app - tt * apq;
                        a[packed(pq.y, pq.y)] = aqq + tt * apq;
                        a[packed(pq.x, pq.y)] = 0.0f;
                    }
                }
                const bool any = simd_any(act);
                if (lane == 0) {
                    flag[0] = ((t > 0 && flag[0] != 0) || any) ? 1u : 0u;  // or-ed over the sweep
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);  // the rotations are known
            for (uint b = tid; b < P * P; b += tpg) {
                const uint k = b / P, l = b % P;
                if (k >= l || (sn[k] == 0.0f && sn[l] == 0.0f)) {  // s = 0: J is the identity there
                    continue;
                }
                const uint2 r = pairs[k], c = pairs[l];
                const float c1 = cs[k], s1 = sn[k], c2 = cs[l], s2 = sn[l];
                const uint i00 = packed(r.x, c.x), i01 = packed(r.x, c.y), i10 = packed(r.y, c.x),
                           i11 = packed(r.y, c.y);
                const float x00 = a[i00], x01 = a[i01], x10 = a[i10], x11 = a[i11];
                // columns: (p, q) <- (c p - s q, s p + c q); then rows likewise
                const float y00 = c2 * x00 - s2 * x01, y01 = s2 * x00 + c2 * x01;
                const float y10 = c2 * x10 - s2 * x11, y11 = s2 * x10 + c2 * x11;
                a[i00] = c1 * y00 - s1 * y10;
                a[i10] = s1 * y00 + c1 * y10;
                a[i01] = c1 * y01 - s1 * y11;
                a[i11] = s1 * y01 + c1 * y11;
            }
            if (want_v) {
                for (uint e = tid; e < n * P; e += tpg) {
                    const uint i = e / P, k = e % P;
                    const float s = sn[k];
                    if (s == 0.0f) {
                        continue;
                    }
                    const uint2 pq = pairs[k];
                    const float c = cs[k], vp = v[i * N + pq.x], vq = v[i * N + pq.y];
                    v[i * N + pq.x] = c * vp - s * vq;
                    v[i * N + pq.y] = s * vp + c * vq;
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        rotated = flag[0] != 0;  // the next write to flag follows the next round's first barrier
    }
    const bool bad = bad_input || rotated;
    for (uint i = tid; i < n; i += tpg) {
        const float d = a[packed(i, i)];
        uint r = 0;
        for (uint j = 0; j < n; ++j) {
            const float dj = a[packed(j, j)];
            r += dj < d || (dj == d && j < i) ? 1 : 0;
        }
        rank[i] = bad ? i : r;  // NaN compares false: a bad matrix keeps its order (all NaN anyway)
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < n; i += tpg) {
        W[ulong(mat) * n + rank[i]] = T(bad ? NAN : a[packed(i, i)] * scale);
    }
    if (want_v) {
        for (uint e = tid; e < n * n; e += tpg) {
            const uint r = e / n, c = e % n;
            Q[base + r * n + rank[c]] = T(bad ? NAN : v[r * N + c]);
        }
    }
}

// --- SVD (one-sided Jacobi, Hestenes) --------------------------------------------------------------
// For an m x n matrix with m >= n (the host hands a wide matrix over as its transpose, through the
// strides: element (i, j) is at i * sr + j * sc within the matrix). Each SIMD-group takes whole pairs
// of a round: alpha = ||a_p||^2, beta = ||a_q||^2, gamma = a_p . a_q summed across its lanes (so every
// lane makes the same decision), then the rotation that makes a_p and a_q orthogonal is applied to the
// two columns of the tile and to rows p, q of V^T. V^T is accumulated in place in the output Vh: an
// m x n tile and an n x n one together would fill Apple's 32 KiB at m = n = 64 with nothing to spare.
// At the end S_j = ||a_j|| (as s ||a_j / s||, s = max|a_j|, so that no square underflows), sorted
// descending (ties by index), and W = A V (the rotated tile) and V^T follow it; the host forms U from
// the QR of W.
template <typename T>
static void jacobi_svd_tile(device const T* A, device T* W, device T* S, device T* Vh, uint m, uint n, uint sr,
                            uint sc, bool want_uv, float tol, float tiny, uint max_sweeps, threadgroup float* a,
                            threadgroup float* sv, threadgroup uint* rank, threadgroup float* scratch,
                            threadgroup uint* flags, uint mat, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const uint N = n + n % 2, P = N / 2;
    const ulong base = ulong(mat) * m * n, vbase = ulong(mat) * n * n;
    float big = 0.0f, bad_count = 0.0f;
    for (uint e = tid; e < m * n; e += tpg) {
        const uint r = e / n, c = e % n;
        const float x = float(A[base + r * sr + c * sc]);
        a[e] = x;
        big = max(big, fabs(x));
        bad_count += nonfinite(x) ? 1.0f : 0.0f;
    }
    const float amax = threadgroup_max(big, scratch, lane, sg, nsg);
    const bool bad_input = threadgroup_sum(bad_count, scratch, lane, sg, nsg) > 0.0f;
    const float scale = amax > 0.0f ? amax : 1.0f;
    for (uint e = tid; e < m * n; e += tpg) {
        a[e] /= scale;
    }
    if (want_uv) {
        for (uint e = tid; e < n * n; e += tpg) {
            Vh[vbase + e] = T(e / n == e % n ? 1.0f : 0.0f);
        }
    }
    bool rotated = !bad_input;
    for (uint sweep = 0; rotated && sweep < max_sweeps; ++sweep) {
        bool mine = false;  // this SIMD-group rotated a pair in this sweep
        for (uint t = 0; t < N - 1; ++t) {
            // The previous round's columns (tile) and rows of V^T (device) are visible.
            threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
            for (uint k = sg; k < P; k += nsg) {  // uniform within the SIMD-group
                const uint2 pq = jacobi_pair(t, k, N);
                if (pq.y >= n) {  // the zero column of an odd n
                    continue;
                }
                float alpha = 0.0f, beta = 0.0f, gamma = 0.0f;
                for (uint i = lane; i < m; i += METALCORE_SIMD_WIDTH) {
                    const float x = a[i * n + pq.x], y = a[i * n + pq.y];
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                alpha = simd_sum(alpha);
                beta = simd_sum(beta);
                gamma = simd_sum(gamma);
                const float mag = fabs(gamma);
                if (!(mag > tol * sqrt(alpha) * sqrt(beta) && mag > tiny)) {
                    continue;
                }
                const float tt = schur_tangent(alpha, beta, gamma);
                const float c = 1.0f / sqrt(1.0f + tt * tt), s = tt * c;
                for (uint i = lane; i < m; i += METALCORE_SIMD_WIDTH) {
                    const float x = a[i * n + pq.x], y = a[i * n + pq.y];
                    a[i * n + pq.x] = c * x - s * y;
                    a[i * n + pq.y] = s * x + c * y;
                }
                if (want_uv) {
                    device T* vp = Vh + vbase + pq.x * n;
                    device T* vq = Vh + vbase + pq.y * n;
                    for (uint j = lane; j < n; j += METALCORE_SIMD_WIDTH) {
                        const float x = float(vp[j]), y = float(vq[j]);
                        vp[j] = T(c * x - s * y);
                        vq[j] = T(s * x + c * y);
                    }
                }
                mine = true;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (lane == 0) {
            flags[sg] = mine ? 1u : 0u;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        rotated = false;
        for (uint g = 0; g < nsg; ++g) {
            rotated = rotated || flags[g] != 0;
        }
    }
    const bool bad = bad_input || rotated;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = sg; j < n; j += nsg) {  // uniform within the SIMD-group
        float colmax = 0.0f;
        for (uint i = lane; i < m; i += METALCORE_SIMD_WIDTH) {
            colmax = max(colmax, fabs(a[i * n + j]));
        }
        colmax = simd_max(colmax);
        const float unit = colmax > 0.0f ? colmax : 1.0f;
        float ss = 0.0f;
        for (uint i = lane; i < m; i += METALCORE_SIMD_WIDTH) {
            const float y = a[i * n + j] / unit;
            ss += y * y;
        }
        ss = simd_sum(ss);
        if (lane == 0) {
            sv[j] = colmax * sqrt(ss);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = tid; j < n; j += tpg) {
        uint r = 0;
        for (uint i = 0; i < n; ++i) {
            r += sv[i] > sv[j] || (sv[i] == sv[j] && i < j) ? 1 : 0;
        }
        rank[j] = bad ? j : r;  // NaN compares false: a bad matrix keeps its order (all NaN anyway)
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = tid; j < n; j += tpg) {
        S[ulong(mat) * n + rank[j]] = T(bad ? NAN : sv[j] * scale);
    }
    if (!want_uv) {
        return;
    }
    for (uint e = tid; e < m * n; e += tpg) {
        W[base + (e / n) * n + rank[e % n]] = T(bad ? NAN : a[e]);
    }
    // V^T's rows move to their sorted places through the tile, which W no longer needs (n*n <= m*n).
    threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
    for (uint e = tid; e < n * n; e += tpg) {
        a[e] = float(Vh[vbase + e]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
    for (uint e = tid; e < n * n; e += tpg) {
        Vh[vbase + rank[e / n] * n + e % n] = T(bad ? NAN : a[e]);
    }
}

#define JACOBI_PAIRS (METALCORE_LINALG_MAX_N / 2)

#define INSTANTIATE_JACOBI(T, SUFFIX)                                                                \
kernel void jacobi_eigh_##SUFFIX(                                                                   \
        device const T* A [[buffer(0)]], device T* W [[buffer(1)]], device T* Q [[buffer(2)]],      \
        constant uint& n [[buffer(3)]], constant uint& upper [[buffer(4)]],                         \
        constant uint& want_v [[buffer(5)]], constant float& tol [[buffer(6)]],                     \
        constant float& tiny [[buffer(7)]], constant uint& max_sweeps [[buffer(8)]], JACOBI_IDS) {  \
    threadgroup float a[METALCORE_LINALG_MAX_N * (METALCORE_LINALG_MAX_N + 1) / 2];                \
    threadgroup float v[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float cs[JACOBI_PAIRS];                                                             \
    threadgroup float sn[JACOBI_PAIRS];                                                             \
    threadgroup uint2 pairs[JACOBI_PAIRS];                                                          \
    threadgroup uint rank[METALCORE_LINALG_MAX_N];                                                  \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    threadgroup uint flag[1];                                                                       \
    jacobi_eigh_tile<T>(A, W, Q, n, upper != 0, want_v != 0, tol, tiny, max_sweeps, a, v, cs, sn, pairs, \
                        rank, scratch, flag, mat, tid, tpg, lane, sg, nsg);                         \
}                                                                                                   \
kernel void jacobi_svd_##SUFFIX(                                                                    \
        device const T* A [[buffer(0)]], device T* W [[buffer(1)]], device T* S [[buffer(2)]],      \
        device T* Vh [[buffer(3)]], constant uint& m [[buffer(4)]], constant uint& n [[buffer(5)]], \
        constant uint& sr [[buffer(6)]], constant uint& sc [[buffer(7)]],                           \
        constant uint& want_uv [[buffer(8)]], constant float& tol [[buffer(9)]],                    \
        constant float& tiny [[buffer(10)]], constant uint& max_sweeps [[buffer(11)]], JACOBI_IDS) { \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float sv[METALCORE_LINALG_MAX_N];                                                   \
    threadgroup uint rank[METALCORE_LINALG_MAX_N];                                                  \
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];                                            \
    threadgroup uint flags[METALCORE_MAX_SIMDGROUPS];                                               \
    jacobi_svd_tile<T>(A, W, S, Vh, m, n, sr, sc, want_uv != 0, tol, tiny, max_sweeps, a, sv, rank, scratch, \
                       flags, mat, tid, tpg, lane, sg, nsg);                                        \
}

INSTANTIATE_JACOBI(float, float)
