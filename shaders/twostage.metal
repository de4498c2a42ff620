// The pieces of the two-stage symmetric eigensolver (metalcore/linalg/eigh_twostage.py) that are not
// GEMMs, float32 only (Metal has no float64): stage 2, band -> tridiagonal by bulge chasing, and its
// back-transformation; stage 3, the eigenvalues of the tridiagonal blocks by bisection, inverse
// iteration and Gram-Schmidt within clusters. The host code is metalcore/linalg/eigh_twostage_metal.py
// and metalcore/linalg/tridiag_eig_metal.py; the algorithms are the Triton kernels' of
// metalcore/linalg/eigh_band_triton.py ('sweeps' schedule) and tridiag_eig_triton.py (bisection, one
// Sturm point a lane), whose docstrings give the derivations. Every array arrives contiguous.
//
// Control flow that contains a threadgroup barrier depends only on kernel arguments and on values
// every thread reads after a barrier, so it is uniform across the threadgroup.
#include "common.h"

// The widest band stage 2 takes: its windows (2b x b) live in threadgroup memory, 8 KiB at 32.
#define METALCORE_BAND_MAX 32
// Stage 2 and the clusters' kernel update device memory that other threads of the threadgroup read
// after the barrier: both kinds of memory are ordered.
#define TWOSTAGE_BARRIER() threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)

// --- Stage 2: band -> tridiagonal, one threadgroup per matrix -------------------------------------

// The reflector of x[0 .. len) in place (LAPACK dlarfg as metalcore's kernels form it, for entries
// scaled to at most ~n): x becomes v with v[0] = 1, and tau, beta are returned through `out`
// (out[0] = tau, out[1] = beta). tau = 0 when nothing below x[0] is nonzero. One thread runs it.
static void reflector(threadgroup float* x, uint len, threadgroup float* out) {
    const float alpha = len > 0 ? x[0] : 0.0f;
    float sigma = 0.0f;
    for (uint r = 1; r < len; ++r) {
        sigma += x[r] * x[r];
    }
    if (sigma == 0.0f) {
        out[0] = 0.0f;
        out[1] = alpha;
        if (len > 0) {
            x[0] = 1.0f;
        }
        return;
    }
    const float norm = sqrt(alpha * alpha + sigma);
    const float beta = alpha >= 0.0f ? -norm : norm;
    const float scale = 1.0f / (alpha - beta);
    for (uint r = 1; r < len; ++r) {
        x[r] *= scale;
    }
    x[0] = 1.0f;
    out[0] = (beta - alpha) / beta;
    out[1] = beta;
}

// S: (nb, n, n), the lower band of width b (every entry below it zero; the upper triangle is not
// read), reduced in place; D, E: (nb, n), the diagonal and sub-diagonal (E[n - 1] = 0); W: (nb, n - 2,
// steps, b), reflector s of sweep st as sqrt(tau) v (H = I - w w^T), zero past its length, when
// want_v. Sweep st = 0 .. n - 3 zeroes column st below the sub-diagonal; each step applies H to the
// window rows J (from both sides) and to the bulge rows K below (from the right), then chases the
// bulge's first column with the next reflector (eigh_band_triton.py's module docstring).
kernel void band_to_tridiag_float(device float* S [[buffer(0)]], device float* D [[buffer(1)]],
                                  device float* E [[buffer(2)]], device float* W [[buffer(3)]],
                                  constant uint& n [[buffer(4)]], constant uint& b [[buffer(5)]],
                                  constant uint& steps [[buffer(6)]], constant uint& want_v [[buffer(7)]],
                                  uint mat [[threadgroup_position_in_grid]],
                                  uint tid [[thread_index_in_threadgroup]],
                                  uint tpg [[threads_per_threadgroup]]) {
    threadgroup float y[METALCORE_BAND_MAX * METALCORE_BAND_MAX];   // A[J, J]
    threadgroup float z[METALCORE_BAND_MAX * METALCORE_BAND_MAX];   // A[K, J]
    threadgroup float v[METALCORE_BAND_MAX];
    threadgroup float p[METALCORE_BAND_MAX];
    threadgroup float tb[2];                                         // tau, beta
    threadgroup float dot[1];
    device float* A = S + ulong(mat) * n * n;
    device float* refl = W + ulong(mat) * (n > 2 ? n - 2 : 0) * steps * b;
    for (uint st = 0; st + 2 < n; ++st) {
        uint j0 = st + 1;
        uint ell = min(b, n - j0);
        for (uint r = tid; r < ell; r += tpg) {
            v[r] = A[(j0 + r) * n + st];
        }
        TWOSTAGE_BARRIER();
        if (tid == 0) {
            reflector(v, ell, tb);
        }
        TWOSTAGE_BARRIER();
        for (uint r = tid; r < ell; r += tpg) {
            A[(j0 + r) * n + st] = r == 0 ? tb[1] : 0.0f;
        }
        for (uint step = 0; ell >= 2; ++step) {
            const float tau = tb[0];
            if (want_v != 0) {
                const float root = sqrt(tau);
                for (uint r = tid; r < b; r += tpg) {
                    refl[(st * steps + step) * b + r] = r < ell ? root * v[r] : 0.0f;
                }
            }
            // A[J, J] <- H A[J, J] H: p = tau A v, w = p - (tau/2)(p.v) v, A -= v w^T + w v^T.
            for (uint e = tid; e < ell * ell; e += tpg) {
                const uint r = e / ell, c = e % ell;
                y[e] = A[(j0 + max(r, c)) * n + j0 + min(r, c)];
            }
            TWOSTAGE_BARRIER();
            for (uint r = tid; r < ell; r += tpg) {
                float s = 0.0f;
                for (uint c = 0; c < ell; ++c) {
                    s += y[r * ell + c] * v[c];
                }
                p[r] = tau * s;
            }
            TWOSTAGE_BARRIER();
            if (tid == 0) {
                float s = 0.0f;
                for (uint r = 0; r < ell; ++r) {
                    s += p[r] * v[r];
                }
                dot[0] = 0.5f * tau * s;
            }
            TWOSTAGE_BARRIER();
            for (uint e = tid; e < ell * ell; e += tpg) {
                const uint r = e / ell, c = e % ell;
                if (r >= c) {
                    const float wr = p[r] - dot[0] * v[r], wc = p[c] - dot[0] * v[c];
                    A[(j0 + r) * n + j0 + c] = y[e] - v[r] * wc - wr * v[c];
                }
            }
            // The bulge A[K, J] <- H_K (A[K, J] H), and H_K from its first column.
            const uint k0 = j0 + ell;
            const uint kl = k0 < n ? min(b, n - k0) : 0;
            for (uint e = tid; e < kl * ell; e += tpg) {
                const uint r = e / ell, c = e % ell;
                z[e] = A[(k0 + r) * n + j0 + c];
            }
            TWOSTAGE_BARRIER();
            for (uint r = tid; r < kl; r += tpg) {
                float s = 0.0f;
                for (uint c = 0; c < ell; ++c) {
                    s += z[r * ell + c] * v[c];
                }
                p[r] = tau * s;
            }
            TWOSTAGE_BARRIER();
            for (uint e = tid; e < kl * ell; e += tpg) {
                const uint r = e / ell, c = e % ell;
                z[e] -= p[r] * v[c];
            }
            TWOSTAGE_BARRIER();
            if (tid == 0) {
                for (uint r = 0; r < kl; ++r) {
                    v[r] = z[r * ell];
                }
                reflector(v, kl, tb);
            }
            TWOSTAGE_BARRIER();
            const float tau2 = tb[0];
            for (uint c = tid; c < ell; c += tpg) {
                float s = 0.0f;
                for (uint r = 0; r < kl; ++r) {
                    s += v[r] * z[r * ell + c];
                }
                p[c] = tau2 * s;
            }
            TWOSTAGE_BARRIER();
            for (uint e = tid; e < kl * ell; e += tpg) {
                const uint r = e / ell, c = e % ell;
                A[(k0 + r) * n + j0 + c] = c == 0 ? (r == 0 ? tb[1] : 0.0f) : z[e] - v[r] * p[c];
            }
            TWOSTAGE_BARRIER();
            j0 = k0;
            ell = kl;
        }
        TWOSTAGE_BARRIER();
    }
    TWOSTAGE_BARRIER();
    for (uint i = tid; i < n; i += tpg) {
        D[ulong(mat) * n + i] = A[i * n + i];
        E[ulong(mat) * n + i] = i + 1 < n ? A[(i + 1) * n + i] : 0.0f;
    }
}

// Z <- Q2 Z for Z (nb, n, k): the reflectors of band_to_tridiag_float in reverse order, one thread per
// column of one matrix (the columns are independent); 4b flops a reflector and column.
kernel void band_back_float(device const float* W [[buffer(0)]], device float* Z [[buffer(1)]],
                            constant uint& n [[buffer(2)]], constant uint& k [[buffer(3)]],
                            constant uint& b [[buffer(4)]], constant uint& steps [[buffer(5)]],
                            constant uint& nb [[buffer(6)]], uint gid [[thread_position_in_grid]]) {
    if (gid >= nb * k) {
        return;
    }
    const uint mat = gid / k, col = gid % k;
    device const float* refl = W + ulong(mat) * (n - 2) * steps * b;
    device float* z = Z + ulong(mat) * n * k + col;
    for (uint u = 0; u + 2 < n; ++u) {
        const uint st = n - 3 - u;
        const uint count = (n - 3 - st) / b + 1;   // the sweep's steps: j0 = st + 1 + s b <= n - 2
        for (uint t = 0; t < count; ++t) {
            const uint s = count - 1 - t;
            const uint j0 = st + 1 + s * b;
            const uint ell = min(b, n - j0);
            device const float* w = refl + (st * steps + s) * b;
            float dot = 0.0f;
            for (uint r = 0; r < ell; ++r) {
                dot += w[r] * z[ulong(j0 + r) * k];
            }
            for (uint r = 0; r < ell; ++r) {
                z[ulong(j0 + r) * k] -= w[r] * dot;
            }
        }
    }
}

// --- Stage 3: the tridiagonal blocks' eigenpairs ---------------------------------------------------
// T is scaled to max(|d|, |e|) = 1 and split into diagonal blocks (E = 0 at their edges; rows
// first[j] .. last[j] hold row j's block), as metalcore/linalg/tridiag_host.py prepares it.

// Lane j of matrix mat (one thread): the (j - first[j])-th smallest eigenvalue of its block, by
// `passes` bisection steps from [low, high]. Sturm counts: the negative pivots of T - x I over the
// block's rows, a pivot below pivmin replaced by -pivmin (LAPACK dstebz).
kernel void tridiag_values_float(device const float* D [[buffer(0)]], device const float* E [[buffer(1)]],
                                 device const int* first [[buffer(2)]], device const int* last [[buffer(3)]],
                                 device const float* low [[buffer(4)]], device const float* high [[buffer(5)]],
                                 device float* L [[buffer(6)]], constant uint& n [[buffer(7)]],
                                 constant uint& nb [[buffer(8)]], constant uint& passes [[buffer(9)]],
                                 constant float& pivmin [[buffer(10)]], uint gid [[thread_position_in_grid]]) {
    if (gid >= nb * n) {
        return;
    }
    const uint mat = gid / n;
    device const float* d = D + ulong(mat) * n;
    device const float* e = E + ulong(mat) * n;
    const int f = first[gid], l = last[gid];
    const int index = int(gid % n) - f;
    float left = low[mat], right = high[mat];
    for (uint pass = 0; pass < passes; ++pass) {
        const float x = 0.5f * (left + right);
        float q = d[f] - x;
        q = fabs(q) < pivmin ? -pivmin : q;
        int count = q < 0.0f ? 1 : 0;
        for (int i = f + 1; i <= l; ++i) {
            q = (d[i] - x) - e[i - 1] * e[i - 1] / q;
            q = fabs(q) < pivmin ? -pivmin : q;
            count += q < 0.0f ? 1 : 0;
        }
        if (count > index) {
            right = x;
        } else {
            left = x;
        }
    }
    L[gid] = 0.5f * (left + right);
}

// A uniform pseudo-random number in [0, 1) from a 32-bit key (an integer hash; the start vectors only
// need to be independent of the eigenvectors and of each other).
static float uniform(uint key) {
    key ^= key >> 16;
    key *= 0x7feb352dU;
    key ^= key >> 15;
    key *= 0x846ca68bU;
    key ^= key >> 16;
    return float(key >> 8) * (1.0f / 16777216.0f);
}

// One round of inverse iteration for column j of matrix mat (one thread): z <- (T - shift I)^-1 z
// through the L D L^T pivots of the shifted Sturm recurrence (a pivot below eps raised to +-eps),
// then scaled to unit norm. Z, Y, P: (nb, n, n) row-major, column j for lane j; P holds 1/pivot.
// `start`: first the pivots and a pseudo-random start vector, zero outside the lane's block (the
// solves keep it so: E = 0 at the block's edges), seeded by the entry's place in Z.
kernel void tridiag_vectors_float(device const float* D [[buffer(0)]], device const float* E [[buffer(1)]],
                                  device const float* shift [[buffer(2)]], device const int* first [[buffer(3)]],
                                  device const int* last [[buffer(4)]], device float* Z [[buffer(5)]],
                                  device float* Y [[buffer(6)]], device float* P [[buffer(7)]],
                                  constant uint& n [[buffer(8)]], constant uint& nb [[buffer(9)]],
                                  constant float& eps [[buffer(10)]], constant uint& start [[buffer(11)]],
                                  constant uint& seed [[buffer(12)]], uint gid [[thread_position_in_grid]]) {
    if (gid >= nb * n) {
        return;
    }
    const uint mat = gid / n, j = gid % n;
    device const float* d = D + ulong(mat) * n;
    device const float* e = E + ulong(mat) * n;
    const ulong base = ulong(mat) * n * n + j;
    device float* z = Z + base;
    device float* y = Y + base;
    device float* r = P + base;
    if (start != 0) {
        const float sigma = shift[gid];
        float q = d[0] - sigma;
        q = fabs(q) < eps ? (q < 0.0f ? -eps : eps) : q;
        r[0] = 1.0f / q;
        for (uint i = 1; i < n; ++i) {
            q = (d[i] - sigma) - e[i - 1] * (e[i - 1] / q);
            q = fabs(q) < eps ? (q < 0.0f ? -eps : eps) : q;
            r[ulong(i) * n] = 1.0f / q;
        }
        const int f = first[gid], l = last[gid];
        for (uint i = 0; i < n; ++i) {
            z[ulong(i) * n] = int(i) >= f && int(i) <= l ? uniform(seed ^ (i * n + j) * 0x9e3779b9U) - 0.5f : 0.0f;
        }
    }
    // L y = z, then D^-1 y; L's multiplier at row i is e[i - 1] / q[i - 1].
    float prev = z[0];
    y[0] = prev * r[0];
    for (uint i = 1; i < n; ++i) {
        prev = z[ulong(i) * n] - e[i - 1] * r[ulong(i - 1) * n] * prev;
        y[ulong(i) * n] = prev * r[ulong(i) * n];
    }
    // L^T x = D^-1 y, bottom up, keeping the largest |x| for the normalisation.
    float x = y[ulong(n - 1) * n];
    z[ulong(n - 1) * n] = x;
    float top = fabs(x);
    for (uint t = 1; t < n; ++t) {
        const uint i = n - 1 - t;
        x = y[ulong(i) * n] - e[i] * r[ulong(i) * n] * x;
        top = max(top, fabs(x));
        z[ulong(i) * n] = x;
    }
    const float m = top > 0.0f ? top : 1.0f;
    float squares = 0.0f;
    for (uint i = 0; i < n; ++i) {
        const float t = z[ulong(i) * n] / m;
        squares += t * t;
    }
    const float s = m * sqrt(max(squares, 1.0f));
    for (uint i = 0; i < n; ++i) {
        z[ulong(i) * n] /= s;
    }
}

// Gram-Schmidt within clusters, one threadgroup per matrix: the `count[mat]` lanes listed in `todo`
// (ascending), lane j orthogonalised against the columns cluster[j] .. j - 1 of Z (its earlier mates,
// orthonormal by then; classical Gram-Schmidt, twice) and scaled to unit norm. C: (nb, n) scratch.
kernel void tridiag_clusters_float(device float* Z [[buffer(0)]], device const int* cluster [[buffer(1)]],
                                   device const int* todo [[buffer(2)]], device const int* count [[buffer(3)]],
                                   device float* C [[buffer(4)]], constant uint& n [[buffer(5)]],
                                   uint mat [[threadgroup_position_in_grid]],
                                   uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
                                   uint lane [[thread_index_in_simdgroup]],
                                   uint sg [[simdgroup_index_in_threadgroup]],
                                   uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[METALCORE_MAX_SIMDGROUPS];
    device float* z = Z + ulong(mat) * n * n;
    device float* c = C + ulong(mat) * n;
    const int lanes = count[mat];
    for (int t = 0; t < lanes; ++t) {
        const uint j = uint(todo[ulong(mat) * n + t]);
        const uint f = uint(cluster[ulong(mat) * n + j]);
        for (uint pass = 0; pass < 2; ++pass) {
            for (uint k = f + tid; k < j; k += tpg) {
                float s = 0.0f;
                for (uint i = 0; i < n; ++i) {
                    s += z[ulong(i) * n + k] * z[ulong(i) * n + j];
                }
                c[k] = s;
            }
            TWOSTAGE_BARRIER();
            for (uint i = tid; i < n; i += tpg) {
                float s = z[ulong(i) * n + j];
                for (uint k = f; k < j; ++k) {
                    s -= c[k] * z[ulong(i) * n + k];
                }
                z[ulong(i) * n + j] = s;
            }
            TWOSTAGE_BARRIER();
        }
        // After Gram-Schmidt z_j is at most of unit norm and at least ~eps: no square over- or underflows.
        float part = 0.0f;
        for (uint i = tid; i < n; i += tpg) {
            part += z[ulong(i) * n + j] * z[ulong(i) * n + j];
        }
        const float norm = sqrt(threadgroup_sum(part, scratch, lane, sg, nsg));
        for (uint i = tid; i < n; i += tpg) {
            z[ulong(i) * n + j] /= norm;
        }
        TWOSTAGE_BARRIER();
    }
}

// --- Stage 3's plan: tridiag_host.prepare and vector_plan, one thread a matrix ---------------------
// The torch steps around the stage-3 kernels (metalcore/linalg/tridiag_host.py), as the Triton backend
// fuses them (metalcore/linalg/tridiag_plan_triton.py): the same arithmetic in the same order, so the
// outputs equal the torch steps' (tested through the executor). One thread walks its matrix's n
// entries: O(n) work, where the torch steps were 86 dispatches (values) and 188 (vectors).

// d, e: (nb, n), e[i] = T[i, i+1], its last column not read. Out: D, E scaled to max(|d|, |e|) = 1
// (zeros for a matrix with NaN or Inf, finite 0), E = 0 where |E| <= tau (T splits there) and in its
// last column; each row's block first_row .. last_row; Gershgorin's low, high widened by their
// rounding (eps, tiny: float32's); scale (0 for a non-finite or zero matrix).
kernel void tridiag_prepare_float(device const float* d [[buffer(0)]], device const float* e [[buffer(1)]],
                                  device float* D [[buffer(2)]], device float* E [[buffer(3)]],
                                  device int* first_row [[buffer(4)]], device int* last_row [[buffer(5)]],
                                  device float* low [[buffer(6)]], device float* high [[buffer(7)]],
                                  device float* scale_out [[buffer(8)]], device uchar* finite_out [[buffer(9)]],
                                  constant uint& n [[buffer(10)]], constant uint& nb [[buffer(11)]],
                                  constant float& tau [[buffer(12)]], constant float& eps [[buffer(13)]],
                                  constant float& tiny [[buffer(14)]], uint mat [[thread_position_in_grid]]) {
    if (mat >= nb) {
        return;
    }
    const ulong o = ulong(mat) * n;
    bool finite = true;
    float big = 0.0f;
    for (uint i = 0; i < n; ++i) {
        const float x = fabs(d[o + i]), y = i + 1 < n ? fabs(e[o + i]) : 0.0f;
        finite = finite && x < INFINITY && y < INFINITY;
        big = max(big, max(x, y));
    }
    const float scale = finite ? big : 0.0f;
    const float s = scale > 0.0f ? scale : 1.0f;
    float lo = INFINITY, hi = -INFINITY, before = 0.0f;
    bool cut_before = false;                              // T splits above row i
    int first = 0;
    for (uint i = 0; i < n; ++i) {
        const float x = finite ? d[o + i] / s : 0.0f;
        float y = finite && i + 1 < n ? e[o + i] / s : 0.0f;
        const bool cut = i + 1 < n && fabs(y) <= tau;     // ... below row i
        y = cut ? 0.0f : y;
        D[o + i] = x;
        E[o + i] = y;
        first = cut_before ? int(i) : first;
        first_row[o + i] = first;
        const float radius = fabs(y) + fabs(before);
        lo = min(lo, x - radius);
        hi = max(hi, x + radius);
        before = y;
        cut_before = cut;
    }
    const float pad = 4.0f * eps * max(fabs(lo), fabs(hi)) + 2.0f * tiny;
    low[mat] = lo - pad;
    high[mat] = hi + pad;
    scale_out[mat] = scale;
    finite_out[mat] = finite ? 1 : 0;
    int last = int(n) - 1;
    for (uint t = 0; t < n; ++t) {
        const uint i = n - 1 - t;
        last = first_row[o + min(i + 1, n - 1)] == int(i) + 1 ? int(i) : last;   // a block starts below i
        last_row[o + i] = last;
    }
}

// LS: (nb, n), each block's scaled eigenvalues ascending (blocks of first_row). Out, as
// tridiag_host.vector_plan gives them: each lane's shift (its group's, eigenvalues within tight of the
// next, shared beside the group when rho allows, with floor its least offset; else its own), its
// cluster's first lane (eigenvalues within ortol), the clustered lanes ascending padded with n (todo),
// and their count. Groups and clusters start with a block.
kernel void tridiag_vector_plan_float(device const float* LS [[buffer(0)]], device const int* first_row [[buffer(1)]],
                                      device float* shift [[buffer(2)]], device int* cluster [[buffer(3)]],
                                      device int* todo [[buffer(4)]], device int* count_out [[buffer(5)]],
                                      constant uint& n [[buffer(6)]], constant uint& nb [[buffer(7)]],
                                      constant float& tight [[buffer(8)]], constant float& ortol [[buffer(9)]],
                                      constant float& rho [[buffer(10)]], constant float& floor_ [[buffer(11)]],
                                      uint mat [[thread_position_in_grid]]) {
    if (mat >= nb) {
        return;
    }
    const ulong o = ulong(mat) * n;
    device const float* lam = LS + o;
    device const int* fr = first_row + o;
    // Forward: each lane's group's first lane (in todo for now) and cluster's first lane.
    int group = 0, clus = 0;
    for (uint i = 0; i < n; ++i) {
        const bool block = fr[i] == int(i);
        const float gap = i > 0 ? lam[i] - lam[i - 1] : 0.0f;
        group = block || gap > tight ? int(i) : group;
        clus = block || gap > ortol ? int(i) : clus;
        todo[o + i] = group;
        cluster[o + i] = clus;
    }
    // Backward: each lane's group's last lane, and the shift.
    int last = int(n) - 1;
    for (uint t = 0; t < n; ++t) {
        const uint i = n - 1 - t;
        const bool ends = i + 1 >= n || fr[i + 1] == int(i) + 1 || lam[i + 1] - lam[i] > tight;
        last = ends ? int(i) : last;
        const int first = todo[o + i];
        const float lo = lam[first], hi = lam[last];
        // Distances to the block's nearest eigenvalue below and above (8: the spectrum is in [-3, 3]).
        const float below = fr[first] == first ? 8.0f : lo - lam[max(first - 1, 0)];
        const int after = min(last + 1, int(n) - 1);
        const float above = last == int(n) - 1 || fr[after] == last + 1 ? 8.0f : lam[after] - hi;
        const float width = hi - lo;
        const float offset = max(width, floor_);
        const float shared = below >= above ? lo - offset : hi + offset;
        const float distance = min(max(below, above) - offset, min(below, above) + width + offset);
        const bool use = last > first && width + offset <= rho * distance;
        shift[o + i] = use ? shared : lam[i];
    }
    // The clustered lanes (an earlier cluster mate), ascending, then the padding.
    int count = 0;
    for (uint i = 0; i < n; ++i) {
        if (cluster[o + i] < int(i)) {
            todo[o + count] = int(i);
            ++count;
        }
    }
    for (uint i = uint(count); i < n; ++i) {
        todo[o + i] = int(n);
    }
    count_out[mat] = count;
}
