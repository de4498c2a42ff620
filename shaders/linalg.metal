// Batched small-matrix linear algebra: one threadgroup per matrix, the matrix in threadgroup memory
// (both sides <= METALCORE_LINALG_MAX_N; larft holds only T, so its V may be taller), float32 only
// (Metal has no float64). The contracts are metalcore/linalg/{cholesky,triangular,solve,qr,householder}.py;
// the host code is metalcore/linalg/*_metal.py.
// Every matrix arrives contiguous and row-major (the host copies where needed), so element (r, c) of
// matrix b of an m x n stack is at b * m * n + r * n + c; right-sided solves read A transposed
// (`trans_a`) and their right-hand sides through transposed strides, without copies (so does larfb
// from the right).
//
// Control flow that contains a barrier depends only on values every thread reads from threadgroup
// memory after a barrier (a pivot, info), so it is uniform across the threadgroup, as Metal requires.
#include "common.h"

#define LINALG_IDS                                                                                  \
    uint mat [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],          \
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],                  \
    uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]

// Registers per lane for one column of a solution: element i lives in lane i % 32, slot i / 32.
#define LINALG_SLOTS (METALCORE_LINALG_MAX_N / METALCORE_SIMD_WIDTH)
static_assert(METALCORE_LINALG_MAX_N % METALCORE_SIMD_WIDTH == 0, "a column is LINALG_SLOTS whole registers a lane");

// --- Cholesky (LAPACK potf2, right-looking) ------------------------------------------------------
// For each column k: d = a[k][k]; d <= 0 or NaN stops this matrix with info = k + 1 (LAPACK leaves
// the remaining columns as they are); else a[k:][k] /= sqrt(d) and the trailing lower triangle
// takes the rank-1 update a[i][j] -= a[i][k] a[j][k]. Only the lower (upper) triangle of A is read.
template <typename T>
static void cholesky_tile(device const T* A, device T* L, device int* info, uint n, bool upper,
                          threadgroup float* a, uint mat, uint tid, uint tpg) {
    const ulong base = ulong(mat) * n * n;
    for (uint e = tid; e < n * n; e += tpg) {
        const uint r = e / n, c = e % n;
        if (r >= c) {
            a[r * n + c] = float(upper ? A[base + c * n + r] : A[base + e]);
        }
    }
    int status = 0;
    for (uint k = 0; k < n; ++k) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous update (or the load) is visible
        const float d = a[k * n + k];
        if (!(d > 0.0f)) {  // uniform: every thread read the same d
            status = int(k) + 1;
            break;
        }
        const float s = sqrt(d);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // every thread has read d
        for (uint i = k + tid; i < n; i += tpg) {
            a[i * n + k] = i == k ? s : a[i * n + k] / s;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // column k is final
        const uint m = n - k - 1;
        for (uint e = tid; e < m * m; e += tpg) {
            const uint i = k + 1 + e / m, j = k + 1 + e % m;
            if (j <= i) {
                a[i * n + j] -= a[i * n + k] * a[j * n + k];
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = tid; e < n * n; e += tpg) {
        const uint r = e / n, c = e % n;
        const T v = T(r >= c ? a[e] : 0.0f);
        L[base + (upper ? c * n + r : e)] = v;
    }
    if (tid == 0) {
        info[mat] = status;
    }
}

// --- Substitution, one right-hand side per SIMD-group ----------------------------------------------
// Solves M x = b in place for one column, M triangular in the threadgroup tile `a` (row-major n x n,
// only the strict triangle and, unless `unit`, the diagonal are read). Element i of x lives in lane
// i % 32, slot i / 32 (n <= METALCORE_LINALG_MAX_N: LINALG_SLOTS registers a lane). Row j is a dot
// product over the solved elements, summed across the SIMD-group: x_j = (b_j - M[j, solved] x) / M[j, j].
// No threadgroup barrier: each SIMD-group works on its own columns; `a` is only read.
static void substitute(threadgroup const float* a, uint n, bool lower, bool unit, thread float* x, uint lane) {
    for (uint t = 0; t < n; ++t) {
        const uint j = lower ? t : n - 1 - t;
        float partial = 0.0f;
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < n && (lower ? i < j : i > j)) {
                partial += a[j * n + i] * x[s];
            }
        }
        const float total = simd_sum(partial);
        const float bj = simd_broadcast(x[j / METALCORE_SIMD_WIDTH], ushort(j % METALCORE_SIMD_WIDTH));
        const float xj = unit ? bj - total : (bj - total) / a[j * n + j];
        if (lane == j % METALCORE_SIMD_WIDTH) {
            x[j / METALCORE_SIMD_WIDTH] = xj;
        }
    }
}

// --- Triangular solve (BLAS trsm, left side) -------------------------------------------------------
// M X = B for every column of B, M = A (or A^T when `trans_a`: a right-sided solve X A = B is
// A^T X^T = B^T) lower or upper. Element (i, q) of B and X is at i * sr + q * sc within the matrix
// (the host passes transposed strides for the right side). Only the triangle that is read is
// loaded, so the other may hold anything, NaN included.
template <typename T>
static void trsm_tile(device const T* A, device const T* B, device T* X, uint n, uint k, uint sr, uint sc,
                      bool lower, bool unit, bool trans_a, threadgroup float* a, uint mat, uint tid, uint tpg,
                      uint lane, uint sg, uint nsg) {
    const ulong base_a = ulong(mat) * n * n, base_b = ulong(mat) * n * k;
    for (uint e = tid; e < n * n; e += tpg) {
        const uint r = e / n, c = e % n;
        if ((lower ? c < r : c > r) || (r == c && !unit)) {
            a[e] = float(A[base_a + (trans_a ? c * n + r : e)]);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint q = sg; q < k; q += nsg) {  // uniform within the SIMD-group
        float x[LINALG_SLOTS];
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            x[s] = i < n ? float(B[base_b + i * sr + q * sc]) : 0.0f;
        }
        substitute(a, n, lower, unit, x, lane);
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < n) {
                X[base_b + i * sr + q * sc] = T(x[s]);
            }
        }
    }
}

// --- Solve with a Cholesky factor (LAPACK potrs) -------------------------------------------------
// A X = B with A = L L^T (U^T U when `upper`: L = U^T). The factor is read once into the tile with
// both of its triangles made explicit: a[r][c] = a[c][r] = L[r][c] (r >= c), so the strict lower
// triangle and the diagonal are L and the strict upper triangle and the diagonal are L^T, and one
// `substitute` of each orientation gives x = L^-T (L^-1 b) with the column in registers throughout:
// one dispatch, one load of the factor, no round trip of the intermediate through device memory.
// Only the triangle the contract names is read, so the other may hold anything, NaN included.
template <typename T>
static void cholesky_solve_tile(device const T* L, device const T* B, device T* X, uint n, uint k, bool upper,
                                threadgroup float* a, uint mat, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base_l = ulong(mat) * n * n, base_b = ulong(mat) * n * k;
    for (uint e = tid; e < n * n; e += tpg) {
        const uint r = e / n, c = e % n;
        if (r >= c) {
            const float v = float(L[base_l + (upper ? c * n + r : e)]);
            a[e] = v;
            a[c * n + r] = v;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint q = sg; q < k; q += nsg) {  // uniform within the SIMD-group
        float x[LINALG_SLOTS];
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            x[s] = i < n ? float(B[base_b + i * k + q]) : 0.0f;
        }
        substitute(a, n, true, false, x, lane);   // L y = b
        substitute(a, n, false, false, x, lane);  // L^T x = y
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < n) {
                X[base_b + i * k + q] = T(x[s]);
            }
        }
    }
}

// --- Solve by LU with partial pivoting (LAPACK getf2 + getrs) --------------------------------------
// Factors M = P L U in the tile (M = A, or A^T for a right-sided solve) exactly as getf2 does: the
// pivot is the first row of largest |m[i][j]| at or below j (SIMD-group 0 searches; NaN entries are
// skipped, and a column of NaN keeps row j), whole rows are swapped, the multipliers below the pivot are
// divided by it (skipped when it is zero: the column below is zero too) and the trailing block takes
// the rank-1 update. info = j + 1 for the first exactly-zero pivot; the factorization goes on, as in
// LAPACK, and X then holds inf/NaN for that matrix only. `perm[i]` is the row of M that ended up in
// row i. Then each SIMD-group solves its columns of B: x = U^-1 L^-1 (P B) by substitution.
template <typename T>
static void lu_solve_tile(device const T* A, device const T* B, device T* X, device int* info, uint n, uint k,
                          uint sr, uint sc, bool trans_a, threadgroup float* a, threadgroup uint* perm,
                          threadgroup uint* pivot_row, uint mat, uint tid, uint tpg, uint lane, uint sg,
                          uint nsg) {
    const ulong base_a = ulong(mat) * n * n, base_b = ulong(mat) * n * k;
    for (uint e = tid; e < n * n; e += tpg) {
        const uint r = e / n, c = e % n;
        a[e] = float(A[base_a + (trans_a ? c * n + r : e)]);
    }
    for (uint i = tid; i < n; i += tpg) {
        perm[i] = i;
    }
    int status = 0;
    for (uint j = 0; j < n; ++j) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous update (or the load) is visible
        if (sg == 0) {
            float best = -1.0f;
            uint row = n;
            for (uint i = j + lane; i < n; i += METALCORE_SIMD_WIDTH) {  // each lane keeps its first largest
                const float v = fabs(a[i * n + j]);
                if (v > best) {
                    best = v;
                    row = i;
                }
            }
            const float top = simd_max(best);
            const uint first = simd_min(best == top ? row : n);  // the first row among the largest
            if (lane == 0) {
                pivot_row[0] = first < n ? first : j;  // an all-NaN column: no swap
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const uint p = pivot_row[0];
        if (p != j) {  // uniform: every thread read the same p
            for (uint c = tid; c < n; c += tpg) {
                const float t = a[j * n + c];
                a[j * n + c] = a[p * n + c];
                a[p * n + c] = t;
            }
            if (tid == 0) {
                const uint t = perm[j];
                perm[j] = perm[p];
                perm[p] = t;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // row j holds the pivot row
        const float pivot = a[j * n + j];
        if (pivot == 0.0f && status == 0) {
            status = int(j) + 1;
        }
        if (pivot != 0.0f) {
            for (uint i = j + 1 + tid; i < n; i += tpg) {
                a[i * n + j] /= pivot;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the multipliers are final
        const uint m = n - j - 1;
        for (uint e = tid; e < m * m; e += tpg) {
            const uint i = j + 1 + e / m, c = j + 1 + e % m;
            a[i * n + c] -= a[i * n + j] * a[j * n + c];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        info[mat] = status;
    }
    for (uint q = sg; q < k; q += nsg) {  // uniform within the SIMD-group
        float x[LINALG_SLOTS];
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            x[s] = i < n ? float(B[base_b + perm[i] * sr + q * sc]) : 0.0f;
        }
        substitute(a, n, true, true, x, lane);    // L y = P b, L unit lower
        substitute(a, n, false, false, x, lane);  // U x = y
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < n) {
                X[base_b + i * sr + q * sc] = T(x[s]);
            }
        }
    }
}

// --- Householder reflections (LAPACK geqr2, org2r, larft, larfb) ---------------------------------
// A reflector is H = I - tau v v^T; k of them are stored LAPACK's way: v_j is column j of an m-row
// tile below its diagonal, with v_j[j] = 1 implicit and v_j[i < j] = 0 (metalcore/linalg/householder.py).

// geqr2 on the m x n tile `a` (row-major): for each column j < k = min(m, n), SIMD-group 0 forms the
// reflector of dlarfg (beta = -sign(alpha) ||(alpha, x)||, tau = (beta - alpha) / beta,
// v = x / (alpha - beta), v_j = 1), norms computed as s * ||x / s|| with s = max|x|, so that
// 1e+-25-scaled float32 columns neither overflow nor underflow their squares; a zero (or NaN) x gives
// tau = 0 (H = I), as in LAPACK. Then each SIMD-group applies H = I - tau v v^T to its trailing
// columns (one dot product across the lanes per column). The reflectors end below the diagonal of
// the tile, R on and above it, tau in `tau`; the tile is final for every thread on return.
static void householder_factor(threadgroup float* a, threadgroup float* tau, threadgroup float* head, uint m,
                               uint n, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const uint k = min(m, n);
    for (uint j = 0; j < k; ++j) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous update (or the load) is visible
        if (sg == 0) {
            float big = 0.0f;
            for (uint i = j + 1 + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                big = max(big, fabs(a[i * n + j]));
            }
            const float scale = simd_max(big);
            const float unit_scale = scale > 0.0f ? scale : 1.0f;
            float ss = 0.0f;
            for (uint i = j + 1 + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                const float y = a[i * n + j] / unit_scale;
                ss += y * y;
            }
            // Any NaN in x makes xnorm NaN (simd_sum propagates it), so `reflect` is false below.
            const float xnorm = scale * sqrt(simd_sum(ss));
            const float alpha = a[j * n + j];
            const float hi = max(fabs(alpha), xnorm), lo = min(fabs(alpha), xnorm);
            const float ratio = lo / (hi > 0.0f ? hi : 1.0f);
            const float norm = hi * sqrt(1.0f + ratio * ratio);  // dlapy2(alpha, ||x||)
            const bool reflect = xnorm > 0.0f;
            const float beta = reflect ? (alpha >= 0.0f ? -norm : norm) : alpha;
            if (lane == 0) {
                tau[j] = reflect ? (beta - alpha) / beta : 0.0f;
                head[0] = reflect ? alpha - beta : 1.0f;  // v = x / (alpha - beta)
                head[1] = beta;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const float denom = head[0];
        for (uint i = j + 1 + tid; i < m; i += tpg) {
            a[i * n + j] /= denom;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // v is final; the update treats v_j as 1
        const float t = tau[j];
        for (uint c = j + 1 + sg; c < n; c += nsg) {  // uniform within the SIMD-group
            float partial = 0.0f;
            for (uint i = j + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                partial += (i == j ? 1.0f : a[i * n + j]) * a[i * n + c];
            }
            const float w = t * simd_sum(partial);
            for (uint i = j + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                a[i * n + c] -= (i == j ? 1.0f : a[i * n + j]) * w;
            }
        }
        if (tid == 0) {
            a[j * n + j] = head[1];  // R[j][j] = beta: column j is not read by the update
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

// org2r: column q < nq of Q = H_1 ... H_k e_q, one column per SIMD-group in registers (as in
// `substitute`), applying H_k first; the reflectors are the first k columns of the m x n tile `a`.
// Q is row-major m x nq at Q + base. No barrier: `a` and `tau` are only read.
template <typename T>
static void householder_accumulate(threadgroup const float* a, threadgroup const float* tau, device T* Q,
                                   ulong base, uint m, uint n, uint k, uint nq, uint lane, uint sg, uint nsg) {
    for (uint q = sg; q < nq; q += nsg) {  // uniform within the SIMD-group
        float x[LINALG_SLOTS];
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            x[s] = s * METALCORE_SIMD_WIDTH + lane == q ? 1.0f : 0.0f;
        }
        for (uint step = 0; step < k; ++step) {
            const uint j = k - 1 - step;
            float partial = 0.0f;
            for (uint s = 0; s < LINALG_SLOTS; ++s) {
                const uint i = s * METALCORE_SIMD_WIDTH + lane;
                if (i >= j && i < m) {
                    partial += (i == j ? 1.0f : a[i * n + j]) * x[s];
                }
            }
            const float w = tau[j] * simd_sum(partial);
            for (uint s = 0; s < LINALG_SLOTS; ++s) {
                const uint i = s * METALCORE_SIMD_WIDTH + lane;
                if (i >= j && i < m) {
                    x[s] -= (i == j ? 1.0f : a[i * n + j]) * w;
                }
            }
        }
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < m) {
                Q[base + i * nq + q] = T(x[s]);
            }
        }
    }
}

// QR: geqr2 then org2r in one launch (A read once, R and Q written once); nq = k (reduced) or m
// (complete) columns of Q, none for mode 'r'; R has kr rows.
template <typename T>
static void qr_tile(device const T* A, device T* Q, device T* R, uint m, uint n, uint kr, uint nq,
                    threadgroup float* a, threadgroup float* tau, threadgroup float* head, uint mat, uint tid,
                    uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base = ulong(mat) * m * n;
    for (uint e = tid; e < m * n; e += tpg) {
        a[e] = float(A[base + e]);
    }
    householder_factor(a, tau, head, m, n, tid, tpg, lane, sg, nsg);
    for (uint e = tid; e < kr * n; e += tpg) {
        const uint r = e / n, c = e % n;
        R[ulong(mat) * kr * n + e] = T(r <= c && r < m ? a[r * n + c] : 0.0f);
    }
    householder_accumulate<T>(a, tau, Q, ulong(mat) * m * nq, m, n, min(m, n), nq, lane, sg, nsg);
}

// geqr2 alone: the factored tile (R and the reflectors) and tau, the output of torch.geqrf.
template <typename T>
static void geqr2_tile(device const T* A, device T* QR, device T* tau_out, uint m, uint n, threadgroup float* a,
                       threadgroup float* tau, threadgroup float* head, uint mat, uint tid, uint tpg, uint lane,
                       uint sg, uint nsg) {
    const uint k = min(m, n);
    const ulong base = ulong(mat) * m * n;
    for (uint e = tid; e < m * n; e += tpg) {
        a[e] = float(A[base + e]);
    }
    householder_factor(a, tau, head, m, n, tid, tpg, lane, sg, nsg);
    for (uint e = tid; e < m * n; e += tpg) {
        QR[base + e] = T(a[e]);
    }
    for (uint j = tid; j < k; j += tpg) {
        tau_out[ulong(mat) * k + j] = T(tau[j]);
    }
}

// geqr2 of a tall panel (m x n, n <= METALCORE_LINALG_MAX_N, any m), in place in device memory: the
// panel step of the blocked QR (metalcore/linalg/qr_blocked_metal.py). The arithmetic is that of
// householder_factor (dlarfg with scaled norms, SIMD-group 0 forming each reflector, one SIMD-group
// per trailing column for the update), but the panel stays where it is: a panel taller than 128 rows
// at n = 64 does not fit Apple's 32 KiB, and geqr2 reads the trailing panel once per reflector in
// any case, so staging row chunks in threadgroup memory would add a copy without saving a read.
// Threadgroup memory holds only tau and the reflector's head. Device writes that other SIMD-groups
// read next are fenced with device-memory barriers. The panel's R ends on and above its diagonal,
// the reflectors below, tau in `tau_out`, as from torch.geqrf.
template <typename T>
static void geqr2_panel_tile(device T* P, device T* tau_out, uint m, uint n, threadgroup float* tau,
                             threadgroup float* head, uint mat, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    device T* a = P + ulong(mat) * m * n;
    const uint k = min(m, n);
    for (uint j = 0; j < k; ++j) {
        threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);  // the previous update
        if (sg == 0) {
            float big = 0.0f;
            for (uint i = j + 1 + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                big = max(big, fabs(float(a[ulong(i) * n + j])));
            }
            const float scale = simd_max(big);
            const float unit_scale = scale > 0.0f ? scale : 1.0f;
            float ss = 0.0f;
            for (uint i = j + 1 + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                const float y = float(a[ulong(i) * n + j]) / unit_scale;
                ss += y * y;
            }
            const float xnorm = scale * sqrt(simd_sum(ss));  // NaN in x: NaN, so no reflection below
            const float alpha = float(a[ulong(j) * n + j]);
            const float hi = max(fabs(alpha), xnorm), lo = min(fabs(alpha), xnorm);
            const float ratio = lo / (hi > 0.0f ? hi : 1.0f);
            const float norm = hi * sqrt(1.0f + ratio * ratio);
            const bool reflect = xnorm > 0.0f;
            const float beta = reflect ? (alpha >= 0.0f ? -norm : norm) : alpha;
            if (lane == 0) {
                tau[j] = reflect ? (beta - alpha) / beta : 0.0f;
                head[0] = reflect ? alpha - beta : 1.0f;
                head[1] = beta;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);  // every read of column j is done
        const float denom = head[0];
        for (uint i = j + 1 + tid; i < m; i += tpg) {
            a[ulong(i) * n + j] = T(float(a[ulong(i) * n + j]) / denom);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);  // v is final
        const float t = tau[j];
        for (uint c = j + 1 + sg; c < n; c += nsg) {  // uniform within the SIMD-group
            float partial = 0.0f;
            for (uint i = j + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                partial += (i == j ? 1.0f : float(a[ulong(i) * n + j])) * float(a[ulong(i) * n + c]);
            }
            const float w = t * simd_sum(partial);
            for (uint i = j + lane; i < m; i += METALCORE_SIMD_WIDTH) {
                const float v = i == j ? 1.0f : float(a[ulong(i) * n + j]);
                a[ulong(i) * n + c] = T(float(a[ulong(i) * n + c]) - v * w);
            }
        }
        if (tid == 0) {
            a[ulong(j) * n + j] = T(head[1]);  // R[j][j] = beta: the update does not read it
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = tid; j < k; j += tpg) {
        tau_out[ulong(mat) * k + j] = T(tau[j]);
    }
}

// householder_product (org2r): the first n columns of H_1 ... H_k from the reflectors in the first
// k <= n columns of A (m x n, m >= n; entries on and above the diagonal are not read).
template <typename T>
static void householder_product_tile(device const T* A, device const T* tau_in, device T* Q, uint m, uint n,
                                     uint k, threadgroup float* a, threadgroup float* tau, uint mat, uint tid,
                                     uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base = ulong(mat) * m * n;
    for (uint e = tid; e < m * n; e += tpg) {
        a[e] = float(A[base + e]);
    }
    for (uint j = tid; j < k; j += tpg) {
        tau[j] = float(tau_in[ulong(mat) * k + j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    householder_accumulate<T>(a, tau, Q, base, m, n, k, n, lane, sg, nsg);
}

// larft (direct 'F', storev 'C'): T (k x k, upper) with H_1 ... H_k = I - V T V^T, by LAPACK's
// recurrence T[0:i, i] = -tau_i T[0:i, 0:i] (V^T v_i)[0:i], T[i][i] = tau_i, a zero tau_i giving a
// zero column i (and so a zero row i). First every SIMD-group forms its share of the entries
// w[p][q] = -tau_q (V^T V)[p][q], p < q, in the tile (one dot product across the lanes each, V read
// from device memory: only T is held, so V may have any number of rows); then column i of T is
// the triangular product of the finished columns 0..i-1 with column i of w, one thread a row.
template <typename T>
static void larft_tile(device const T* V, device const T* tau_in, device T* T_out, uint m, uint k,
                       threadgroup float* t, threadgroup float* taus, threadgroup float* col, uint mat, uint tid,
                       uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base_v = ulong(mat) * m * k;
    for (uint i = tid; i < k; i += tpg) {
        taus[i] = float(tau_in[ulong(mat) * k + i]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = sg; e < k * k; e += nsg) {  // uniform within the SIMD-group
        const uint p = e / k, q = e % k;
        if (p > q) {
            continue;
        }
        if (p == q) {
            if (lane == 0) {
                t[e] = taus[q];
            }
            continue;
        }
        // v_q is zero above row q and 1 at row q; below, both columns are stored entries of V.
        float partial = lane == 0 ? float(V[base_v + ulong(q) * k + p]) : 0.0f;
        for (uint r = q + 1 + lane; r < m; r += METALCORE_SIMD_WIDTH) {
            partial += float(V[base_v + ulong(r) * k + p]) * float(V[base_v + ulong(r) * k + q]);
        }
        const float s = simd_sum(partial);
        if (lane == 0) {
            t[e] = taus[q] == 0.0f ? 0.0f : -taus[q] * s;
        }
    }
    for (uint i = 1; i < k; ++i) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // columns 0..i-1 of T and column i of w are final
        for (uint p = tid; p < i; p += tpg) {
            col[p] = t[p * k + i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const bool zero = taus[i] == 0.0f;  // LAPACK zeroes the column outright (no NaN * 0)
        for (uint p = tid; p < i; p += tpg) {
            float acc = 0.0f;
            for (uint l = p; l < i; ++l) {
                acc += t[p * k + l] * col[l];
            }
            t[p * k + i] = zero ? 0.0f : acc;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = tid; e < k * k; e += tpg) {
        T_out[ulong(mat) * k * k + e] = T(e / k <= e % k ? t[e] : 0.0f);
    }
}

// Upper triangle of a k x k matrix packed by columns: (a, b), a <= b, at b (b + 1) / 2 + a.
static inline uint triangle_index(uint a, uint b) {
    return b * (b + 1) / 2 + a;
}

// larfb (direct 'F', storev 'C'), from the left: X = C - V T' V^T C with T' = T or T^T
// (`trans_t`), C and X m x ncol with element (i, q) at i * sr + q * sc within the matrix (the host
// passes transposed strides for the right side: C H = (H^T C^T)^T). V (m x k, unit lower) is held
// whole in the tile and the upper triangle of T packed beside it (a 64 x 64 V and T fit in
// 24.1 KiB of Apple's 32). Each SIMD-group takes whole columns of C in registers (element i in
// lane i % 32, slot i / 32): w = V^T c (one sum across the lanes per entry), y = T' w, c -= V y.
template <typename T>
static void larfb_tile(device const T* V, device const T* Tm, device const T* C, device T* X, uint m, uint k,
                       uint ncol, uint sr, uint sc, bool trans_t, threadgroup float* v, threadgroup float* tp,
                       uint mat, uint tid, uint tpg, uint lane, uint sg, uint nsg) {
    const ulong base_v = ulong(mat) * m * k, base_t = ulong(mat) * k * k, base_c = ulong(mat) * m * ncol;
    for (uint e = tid; e < m * k; e += tpg) {
        const uint r = e / k, c = e % k;
        v[e] = r == c ? 1.0f : (r > c ? float(V[base_v + e]) : 0.0f);
    }
    for (uint e = tid; e < k * k; e += tpg) {
        const uint r = e / k, c = e % k;
        if (r <= c) {
            tp[triangle_index(r, c)] = float(Tm[base_t + e]);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint q = sg; q < ncol; q += nsg) {  // uniform within the SIMD-group
        float x[LINALG_SLOTS], w[LINALG_SLOTS], y[LINALG_SLOTS];
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            x[s] = i < m ? float(C[base_c + i * sr + q * sc]) : 0.0f;
            w[s] = 0.0f;
            y[s] = 0.0f;
        }
        for (uint l = 0; l < k; ++l) {
            float partial = 0.0f;
            for (uint s = 0; s < LINALG_SLOTS; ++s) {
                const uint i = s * METALCORE_SIMD_WIDTH + lane;
                if (i < m) {
                    partial += v[i * k + l] * x[s];
                }
            }
            const float total = simd_sum(partial);
            if (lane == l % METALCORE_SIMD_WIDTH) {
                w[l / METALCORE_SIMD_WIDTH] = total;
            }
        }
        for (uint b = 0; b < k; ++b) {  // y[a] += T'[a][b] w[b], for the rows a this lane holds
            const float wb = simd_broadcast(w[b / METALCORE_SIMD_WIDTH], ushort(b % METALCORE_SIMD_WIDTH));
            for (uint s = 0; s < LINALG_SLOTS; ++s) {
                const uint a = s * METALCORE_SIMD_WIDTH + lane;
                if (a < k && (trans_t ? b <= a : a <= b)) {
                    y[s] += (trans_t ? tp[triangle_index(b, a)] : tp[triangle_index(a, b)]) * wb;
                }
            }
        }
        for (uint l = 0; l < k; ++l) {
            const float yl = simd_broadcast(y[l / METALCORE_SIMD_WIDTH], ushort(l % METALCORE_SIMD_WIDTH));
            for (uint s = 0; s < LINALG_SLOTS; ++s) {
                const uint i = s * METALCORE_SIMD_WIDTH + lane;
                if (i < m) {
                    x[s] -= v[i * k + l] * yl;
                }
            }
        }
        for (uint s = 0; s < LINALG_SLOTS; ++s) {
            const uint i = s * METALCORE_SIMD_WIDTH + lane;
            if (i < m) {
                X[base_c + i * sr + q * sc] = T(x[s]);
            }
        }
    }
}

#define INSTANTIATE_LINALG(T, SUFFIX)                                                                \
kernel void cholesky_##SUFFIX(                                                                      \
        device const T* A [[buffer(0)]], device T* L [[buffer(1)]], device int* info [[buffer(2)]], \
        constant uint& n [[buffer(3)]], constant uint& upper [[buffer(4)]], LINALG_IDS) {          \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    cholesky_tile<T>(A, L, info, n, upper != 0, a, mat, tid, tpg);                                  \
}                                                                                                   \
kernel void trsm_##SUFFIX(                                                                          \
        device const T* A [[buffer(0)]], device const T* B [[buffer(1)]], device T* X [[buffer(2)]], \
        constant uint& n [[buffer(3)]], constant uint& k [[buffer(4)]], constant uint& sr [[buffer(5)]], \
        constant uint& sc [[buffer(6)]], constant uint& lower [[buffer(7)]],                        \
        constant uint& unit [[buffer(8)]], constant uint& trans_a [[buffer(9)]], LINALG_IDS) {      \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    trsm_tile<T>(A, B, X, n, k, sr, sc, lower != 0, unit != 0, trans_a != 0, a, mat, tid, tpg, lane, sg, \
                 nsg);                                                                              \
}                                                                                   \
kernel void cholesky_solve_##SUFFIX(                                                                \
        device const T* L [[buffer(0)]], device const T* B [[buffer(1)]], device T* X [[buffer(2)]], \
        constant uint& n [[buffer(3)]], constant uint& k [[buffer(4)]], constant uint& upper [[buffer(5)]], \
        LINALG_IDS) {                                                                               \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    cholesky_solve_tile<T>(L, B, X, n, k, upper != 0, a, mat, tid, tpg, lane, sg, nsg);            \
}                                                                                                   \
kernel void lu_solve_##SUFFIX(                                                                      \
        device const T* A [[buffer(0)]], device const T* B [[buffer(1)]], device T* X [[buffer(2)]], \
        device int* info [[buffer(3)]], constant uint& n [[buffer(4)]], constant uint& k [[buffer(5)]], \
        constant uint& sr [[buffer(6)]], constant uint& sc [[buffer(7)]],                           \
        constant uint& trans_a [[buffer(8)]], LINALG_IDS) {                                         \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup uint perm[METALCORE_LINALG_MAX_N];                                                  \
    threadgroup uint pivot_row[1];                                                                  \
    lu_solve_tile<T>(A, B, X, info, n, k, sr, sc, trans_a != 0, a, perm, pivot_row, mat, tid, tpg, lane, \
                     sg, nsg);                                                                      \
}                                                                                   \
kernel void qr_##SUFFIX(                                                                            \
        device const T* A [[buffer(0)]], device T* Q [[buffer(1)]], device T* R [[buffer(2)]],      \
        constant uint& m [[buffer(3)]], constant uint& n [[buffer(4)]], constant uint& kr [[buffer(5)]], \
        constant uint& nq [[buffer(6)]], LINALG_IDS) {                                              \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float tau[METALCORE_LINALG_MAX_N];                                                  \
    threadgroup float head[2];                                                                      \
    qr_tile<T>(A, Q, R, m, n, kr, nq, a, tau, head, mat, tid, tpg, lane, sg, nsg);                  \
}                                                                                                   \
kernel void geqr2_##SUFFIX(                                                                         \
        device const T* A [[buffer(0)]], device T* QR [[buffer(1)]], device T* tau [[buffer(2)]],   \
        constant uint& m [[buffer(3)]], constant uint& n [[buffer(4)]], LINALG_IDS) {               \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float taus[METALCORE_LINALG_MAX_N];                                                 \
    threadgroup float head[2];                                                                      \
    geqr2_tile<T>(A, QR, tau, m, n, a, taus, head, mat, tid, tpg, lane, sg, nsg);                   \
}                                                                                                   \
kernel void geqr2_panel_##SUFFIX(                                                                   \
        device T* P [[buffer(0)]], device T* tau [[buffer(1)]], constant uint& m [[buffer(2)]],     \
        constant uint& n [[buffer(3)]], LINALG_IDS) {                                               \
    threadgroup float taus[METALCORE_LINALG_MAX_N];                                                 \
    threadgroup float head[2];                                                                      \
    geqr2_panel_tile<T>(P, tau, m, n, taus, head, mat, tid, tpg, lane, sg, nsg);                    \
}                                                                                                   \
kernel void householder_product_##SUFFIX(                                                           \
        device const T* A [[buffer(0)]], device const T* tau [[buffer(1)]], device T* Q [[buffer(2)]], \
        constant uint& m [[buffer(3)]], constant uint& n [[buffer(4)]], constant uint& k [[buffer(5)]], \
        LINALG_IDS) {                                                                               \
    threadgroup float a[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float taus[METALCORE_LINALG_MAX_N];                                                 \
    householder_product_tile<T>(A, tau, Q, m, n, k, a, taus, mat, tid, tpg, lane, sg, nsg);         \
}                                                                                                   \
kernel void larft_##SUFFIX(                                                                         \
        device const T* V [[buffer(0)]], device const T* tau [[buffer(1)]], device T* T_out [[buffer(2)]], \
        constant uint& m [[buffer(3)]], constant uint& k [[buffer(4)]], LINALG_IDS) {               \
    threadgroup float t[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float taus[METALCORE_LINALG_MAX_N];                                                 \
    threadgroup float col[METALCORE_LINALG_MAX_N];                                                  \
    larft_tile<T>(V, tau, T_out, m, k, t, taus, col, mat, tid, tpg, lane, sg, nsg);                 \
}                                                                                                   \
kernel void larfb_##SUFFIX(                                                                         \
        device const T* V [[buffer(0)]], device const T* Tm [[buffer(1)]], device const T* C [[buffer(2)]], \
        device T* X [[buffer(3)]], constant uint& m [[buffer(4)]], constant uint& k [[buffer(5)]], \
        constant uint& ncol [[buffer(6)]], constant uint& sr [[buffer(7)]], constant uint& sc [[buffer(8)]], \
        constant uint& trans_t [[buffer(9)]], LINALG_IDS) {                                         \
    threadgroup float v[METALCORE_LINALG_MAX_N * METALCORE_LINALG_MAX_N];                          \
    threadgroup float tp[METALCORE_LINALG_MAX_N * (METALCORE_LINALG_MAX_N + 1) / 2];               \
    larfb_tile<T>(V, Tm, C, X, m, k, ncol, sr, sc, trans_t != 0, v, tp, mat, tid, tpg, lane, sg, nsg); \
}

INSTANTIATE_LINALG(float, float)
