"""Householder QR in Triton: one program per matrix (or per group of tiny ones), in registers.

Layers: ``_householder_kernel`` → :func:`householder_launch` → the ``triton`` implementations of
``metalcore::qr``, ``metalcore::geqr2`` and ``metalcore::householder_product``.

One kernel, two phases selected at compile time:

* **factor** (LAPACK ``geqr2``): for each column ``j < k = min(m, n)`` the reflector of ``dlarfg``
  (``β = −sign(α)‖x‖``, ``τ = (β − α)/β``, ``v = x/(α − β)``) and its application
  ``A ← A − τ v (vᵀ A)`` to the trailing columns. Norms are computed as ``s·‖x/s‖`` with
  ``s = max|x|``, so a 1e25- or 1e-25-scaled fp32 matrix neither overflows nor underflows its
  squares (LAPACK's ``dnrm2`` does the same). A zero column gives ``τ = 0`` (``H = I``), as in
  LAPACK, so rank-deficient inputs still give an orthonormal ``Q``.
* **accumulate** (LAPACK ``org2r``): ``Q = H₁ ⋯ H_k I[:, :nq]`` applied backwards, ``H_k`` first,
  from the reflectors still in registers (``qr``) or loaded (``householder_product``).

``qr`` runs both phases in one launch: ``A`` read once, ``R`` and ``Q`` written once. Work per
matrix: ``k`` steps over the ``[BM, BN]`` tile plus ``k`` over the ``[BM, BQ]`` tile,
``~4 m n k + 4 m nq k`` flops (the algorithm's ``4mnk − ...``, padded to powers of two); bytes
``4(mn + m nq + kn)`` in fp32.

Matrices beyond the register tile (a side over :data:`SMALL_MAX`) go to the blocked QR of
:mod:`metalcore.linalg.qr_blocked` (panels, ``larft``, ``larfb``, all GEMMs but the panels) when
the triton backend is requested explicitly, for batches of at least :data:`BATCHED_AUTO_MIN_BATCH`
matrices, or above :data:`BLOCKED_AUTO_MIN_SIDE` once that is set from an H100 measurement;
otherwise cuSOLVER (the reference) keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton.language as tl
from torch import Tensor

from metalcore._graphs import replay
from metalcore._selection import register_path
from metalcore.linalg import qr_blocked
from metalcore.linalg._small_triton import DTYPES, MAX_N, block, fits, group, stack_strides, warps
from metalcore.linalg.householder import geqr2_op, householder_product_op
from metalcore.linalg.householder_gemm import as3
from metalcore.linalg.qr import qr_op
from metalcore._triton import cdiv, helper, jit

# Largest side the one-program kernel takes; larger matrices go to the blocked QR. A parameter so
# that CI can force the blocked path at small sizes.
SMALL_MAX = MAX_N
# Panel width and panel variant of the blocked path (qr_blocked.PANELS), from the H100 sweep
# (bench/results/qr-large-h100-20261125.log, geqrf panels): nb = 128 ran 29.8 ms at 4096² (64: 50.1,
# 32: 86.0) and 59.3 ms at 11008×4096 (64: 66.5); the recursive panel lost 2-6x everywhere.
BLOCK_NB = 128
BLOCK_PANEL = "auto"
# Smallest min(m, n) from which the blocked QR is chosen automatically over cuSOLVER: None, since on
# the H100 it only draws level: 0.98x cuSOLVER geqrf + orgqr at 4096² (29.8 vs 29.1 ms), 1.02x at
# 11008×4096, 0.78x at 2048² (1.15x only for the batch 8×1024²). Its 32 cuSOLVER geqrf panels take
# 19.5 of the 29.8 ms against a whole-QR floor of ~4 ms (183 GFLOP at 51 TFLOP/s fp32): a faster
# tall-panel factorization is what would move it — the "tsqr" path below (TSQR with Householder
# reconstruction), not yet timed.
BLOCKED_AUTO_MIN_SIDE: int | None = None
# Batches of matrices beyond the tile: the blocked QR is chosen automatically from this many matrices
# (None: never), with panels of batched_nb() columns that the tall-panel kernel factors one program per
# matrix (qr_blocked.TALL_MIN_BATCH), where cuSOLVER runs geqrf + orgqr one matrix after another.
# H100, fp32, wall per call (bench/results/qr-batched-h100-20261206.log): 64x256² 2.7 ms against
# torch's 49.5 (18x), 16x512² 6.3x, 8x1024² 4.0x, 62x768² 21x, 12x2304² 3.0x, 24x3072² 3.2x; fp64
# 64x256² 15x, 8x1024² 1.65x. Batches under 8 were not measured: one program per matrix leaves most
# of the card idle there (a single 4096² runs 3x slower than cuSOLVER), so they stay with cuSOLVER.
# Where a card's selection table has qr points, those decide instead.
BATCHED_AUTO_MIN_BATCH: int | None = 8
# Panel width by side, from the same run: 64 columns up to 512 (fewer launches: 64x256² 2.6 ms
# against 4.5 at 32, which is host-bound), 32 above (less panel traffic: 8x1024² 9.1 ms against 14.2,
# 24x3072² 145 against 162).
BATCHED_NB_SMALL, BATCHED_NB_LARGE, BATCHED_NB_SPLIT = 64, 32, 512


@helper
def reflector(x, j, r):
    """LAPACK ``dlarfg`` for the column ``x`` ``[G, B]`` (entries along ``r``) at pivot row ``j``: ``v``
    (``v_j = 1``, zero above ``j``), ``τ`` and ``β`` with ``(I − τ v vᵀ) x = β e_j`` on rows ``≥ j``.
    Norms as ``s·‖x/s‖`` and ``dlapy2(α, ‖x‖)`` without squaring the larger one, so tiny and huge
    columns neither underflow nor overflow; a zero column below ``j`` gives ``τ = 0``, ``β = α``
    (``H = I``), and NaN in ``x`` makes ``reflect`` false, so the NaN flows on through ``α``."""
    on = r[None, :] == j
    below = tl.where(r[None, :] > j, x, 0.0)
    alpha = tl.sum(tl.where(on, x, 0.0), axis=1)
    s = tl.max(tl.abs(below), axis=1)
    s1 = tl.where(s > 0.0, s, 1.0)
    xnorm = s * tl.sqrt(tl.sum((below / s1[:, None]) * (below / s1[:, None]), axis=1))
    big = tl.maximum(tl.abs(alpha), xnorm)
    small = tl.minimum(tl.abs(alpha), xnorm)
    ratio = small / tl.where(big > 0.0, big, 1.0)
    norm = big * tl.sqrt(1.0 + ratio * ratio)
    reflect = xnorm > 0.0
    beta = tl.where(reflect, tl.where(alpha >= 0.0, -norm, norm), alpha)
    tau = tl.where(reflect, (beta - alpha) / tl.where(reflect, beta, 1.0), 0.0)
    denom = tl.where(reflect, alpha - beta, 1.0)
    v = tl.where(on, 1.0, below / denom[:, None])
    return v, tau, beta


@jit
def _householder_kernel(A, TAU_IN, QR, TAU, R, Q, batch, m, n, k, nq, kr,
                        s_ab, s_ar, s_ac, s_tb, s_tk,
                        G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr,
                        FACTOR: tl.constexpr, STORE_QR: tl.constexpr, STORE_R: tl.constexpr,
                        WANT_Q: tl.constexpr):
    g = tl.program_id(0) * G + tl.arange(0, G)
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    g2 = g[:, None].to(tl.int64)
    g3 = g[:, None, None].to(tl.int64)
    r2 = r[None, :]
    r3 = r[None, :, None]
    c3 = c[None, None, :]
    live = g3 < batch
    inside = live & (r3 < m) & (c3 < n)
    a = tl.load(A + g3 * s_ab + r3 * s_ar + c3 * s_ac, mask=inside, other=0.0)
    if FACTOR:
        taus = tl.zeros([G, BN], dtype=a.dtype)
        for j in range(k):
            x = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                 # [G, BM]: A[:, j]
            v, tau, beta = reflector(x, j, r)                               # [G, BM], v_j = 1
            w = tl.sum(v[:, :, None] * a, axis=1)                           # [G, BN]: vᵀ A
            a = tl.where(c3 > j, a - (tau[:, None] * v)[:, :, None] * w[:, None, :], a)
            a = tl.where((c3 == j) & (r3 >= j), tl.where(r3 == j, beta[:, None, None], v[:, :, None]), a)
            taus = tl.where(c[None, :] == j, tau[:, None], taus)
        if STORE_QR:
            tl.store(QR + g3 * m * n + r3 * n + c3, a, mask=inside)
            tl.store(TAU + g2 * k + c[None, :], taus, mask=(g2 < batch) & (c[None, :] < k))
        if STORE_R:
            tl.store(R + g3 * kr * n + r3 * n + c3, tl.where(r3 <= c3, a, 0.0),
                     mask=live & (r3 < kr) & (c3 < n))
    else:
        taus = tl.load(TAU_IN + g2 * s_tb + c[None, :] * s_tk, mask=(g2 < batch) & (c[None, :] < k), other=0.0)
    if WANT_Q:
        cq3 = tl.arange(0, BQ)[None, None, :]
        q = tl.where((r3 == cq3) & live, 1.0, 0.0).to(a.dtype)            # I[:, :nq]
        for t in range(k):
            j = k - 1 - t
            vcol = tl.sum(tl.where(c3 == j, a, 0.0), axis=2)                # [G, BM]
            v = tl.where(r2 == j, 1.0, tl.where(r2 > j, vcol, 0.0))
            tau = tl.sum(tl.where(c[None, :] == j, taus, 0.0), axis=1)      # [G]
            w = tl.sum(v[:, :, None] * q, axis=1)                           # [G, BQ]: vᵀ Q
            q = q - (tau[:, None] * v)[:, :, None] * w[:, None, :]
        tl.store(Q + g3 * m * nq + r3 * nq + cq3, q, mask=live & (r3 < m) & (cq3 < nq))


def householder_launcher(A: Tensor, *, tau: Tensor | None = None, store_qr: bool = False, kr: int = 0,
                         nq: int = 0) -> Callable[..., tuple[Tensor | None, ...]]:
    """``run(A, tau=None) -> (QR, tau, R, Q)`` for tensors of ``A``'s (and ``tau``'s) shape, strides,
    dtype and device: :func:`householder_launch` with strides, outputs' shapes, launch shape and grid
    worked out here, once per call signature (the op's plan keeps ``run``)."""
    *batch_shape, m, n = A.shape
    k = min(m, n) if tau is None else tau.shape[-1]
    dev, dt = A.device, A.dtype
    nb = math.prod(batch_shape)
    shapes = {"QR": A.shape if store_qr else None, "TAU": (*batch_shape, k) if store_qr else None,
              "R": (*batch_shape, kr, n) if kr else None, "Q": (*batch_shape, m, nq) if nq else None}

    def outputs() -> list[Tensor | None]:
        return [None if s is None else torch.empty(s, dtype=dt, device=dev) for s in shapes.values()]

    if nb == 0 or A.numel() == 0:
        def empty(A: Tensor, tau: Tensor | None = None) -> tuple[Tensor | None, ...]:
            QR, TAU, R, Q = outputs()
            if Q is not None:
                Q.copy_(torch.eye(m, nq, dtype=dt, device=dev))
            if R is not None:
                R.zero_()
            return QR, TAU, R, Q
        return empty
    sa, copy = stack_strides(A)
    st, copy_tau = [0, 0], False   # tau read as (batch, k): its strides, or a copy per call
    if tau is not None:
        try:
            st = list(tau.view(nb, k).stride())
        except RuntimeError:
            st, copy_tau = [k, 1], True
    BM, BN = block(m), block(n)
    BQ = block(nq) if nq else 2
    G = group(nb, BM * max(BN, BQ), dev)
    launch = _householder_kernel.bind(
        (cdiv(nb, G),), None, None, None, None, None, None, nb, m, n, k, nq, kr, *sa, *st,
        G=G, BM=BM, BN=BN, BQ=BQ, FACTOR=tau is None, STORE_QR=store_qr, STORE_R=kr > 0, WANT_Q=nq > 0,
        num_warps=warps(G * BM * max(BN, BQ)))

    def run(A: Tensor, tau: Tensor | None = None) -> tuple[Tensor | None, ...]:
        QR, TAU, R, Q = outputs()
        A3 = as3(A) if copy else A   # also what the kernel reads for the arguments it does not use
        if copy_tau:
            tau = tau.reshape(nb, k)
        launch(A3, A3 if tau is None else tau, A3 if QR is None else QR, A3 if TAU is None else TAU,
               A3 if R is None else R, A3 if Q is None else Q)
        return QR, TAU, R, Q

    return run


def householder_launch(A: Tensor, *, tau: Tensor | None = None, store_qr: bool = False, kr: int = 0,
                       nq: int = 0) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Run the kernel on ``A`` ``(*, m, n)``; returns ``(QR, tau, R, Q)``, each None unless asked.

    With ``tau`` given, ``A`` holds reflectors (``householder_product``) and only ``Q`` is formed.
    ``kr`` > 0 asks for ``R`` with ``kr`` rows; ``nq`` > 0 for ``Q`` with ``nq`` columns.
    """
    return householder_launcher(A, tau=tau, store_qr=store_qr, kr=kr, nq=nq)(A, tau)


def _small(A: Tensor) -> bool:
    return fits(A, max_n=SMALL_MAX)


def _supports(A: Tensor, *rest) -> bool:
    """The kernel takes ``A`` when it fits the register tile; the blocked path takes any other
    float32/float64 matrix."""
    return A.dtype in DTYPES and A.dim() >= 2


def _batch(A: Tensor) -> int:
    return math.prod(A.shape[:-2])


def _automatic(A: Tensor, *rest) -> bool:
    """Automatic selection: the one-program kernel, the blocked path from ``BLOCKED_AUTO_MIN_SIDE``
    (never, today: see above) and for batches from ``BATCHED_AUTO_MIN_BATCH``; an explicit request
    takes any of them."""
    return (_small(A) or (BLOCKED_AUTO_MIN_SIDE is not None and min(A.shape[-2:]) >= BLOCKED_AUTO_MIN_SIDE)
            or (BATCHED_AUTO_MIN_BATCH is not None and _batch(A) >= BATCHED_AUTO_MIN_BATCH))


def _block_nb(A: Tensor) -> int:
    """Panel width of the blocked path: narrower for batches, whose tall-panel kernel moves ~4·h·nb²
    bytes per panel, than for one matrix, whose cuSOLVER panels are fastest at 128."""
    if _batch(A) < qr_blocked.TALL_MIN_BATCH:
        return BLOCK_NB
    return BATCHED_NB_SMALL if min(A.shape[-2:]) <= BATCHED_NB_SPLIT else BATCHED_NB_LARGE


def _qr_specialized(A: Tensor, mode: str) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The register-tile QR for this call signature (the blocked path keeps its own function)."""
    m, n = A.shape[-2:]
    k = min(m, n)
    if not _small(A) or k == 0:
        return None
    if mode == "r":
        run = householder_launcher(A, kr=k)
        return lambda A, mode: (A.new_empty(0), run(A)[2])
    complete = mode == "complete"
    run = householder_launcher(A, kr=m if complete else k, nq=m if complete else k)

    def qr(A: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        _, _, R, Q = run(A)
        return Q, R

    return qr


@qr_op.implement("triton", supports=_supports, automatic=_automatic, specialize=_qr_specialized)
def _qr_triton(A, mode):
    m, n = A.shape[-2:]
    k = min(m, n)
    # k = 0 too: the launcher reads a zero row or column count as "not wanted"; the blocked path has
    # nothing to factor and returns Q = I, R = 0.
    if not _small(A) or k == 0:
        return qr_blocked.qr_blocked(A, mode, _block_nb(A), BLOCK_PANEL)
    if mode == "r":
        _, _, R, _ = householder_launch(A, kr=k)
        return A.new_empty(0), R
    complete = mode == "complete"
    _, _, R, Q = householder_launch(A, kr=m if complete else k, nq=m if complete else k)
    return Q, R


# Panel width of the "blocked" path for matrices that fit the register tile: 32-column panels, each
# factored in registers (a 128×32 fp64 tile is 32 KB), the rest GEMMs.
PATH_NB = 32
# Smallest larger side the "blocked" path is offered at: up to 32 the register tile holds a matrix in
# one program without spilling, and the path would only add launches.
PATH_MIN_SIDE = 33


def _blocked_path_supported(A: Tensor, mode: str) -> bool:
    return _supports(A) and max(A.shape[-2:]) >= PATH_MIN_SIDE


# The blocked QR as an alternative path where the register tile would take the matrix (sides 33-128):
# the tile holds a whole 128×128 fp64 matrix at 16 warps and runs no faster than cuSOLVER's
# per-matrix loop there (256×128² fp64: 21.2 ms, torch 21.7; 256×65² fp64 12.1 ms, while 256×64²
# takes 0.70: H100 table v10), and qdwh's stacked 2n × n QR at fp64 n = 33-127 goes to torch because
# of it (bench/linalg_triton.md v12). Beyond the tile the kernel's own routing is this same blocked
# QR; the path is offered there too, so that a call between 128 and 256 finds it measured on both
# sides. It runs only where the measured table names it.
@register_path("qr", "triton", "blocked", supports=_blocked_path_supported)
def _qr_blocked_path(A, mode):
    nb = PATH_NB if _small(A) else _block_nb(A)
    return qr_blocked.qr_blocked(A, mode, nb, BLOCK_PANEL)


# Panel width of the "tsqr" path: 32 columns, so that TSQR's stack shrinks 4× a level (4096
# rows: 3 levels) and a panel's reconstruction is a 32² LU; 128 panels of ~10 launches at 4096². Not
# yet timed (bench/linalg.md, "a TSQR panel").
TSQR_NB = 32


def _tsqr_path_supported(A: Tensor, mode: str) -> bool:
    return _supports(A) and not _small(A)


# The blocked QR with TSQR panels (qr_tsqr_triton) for matrices beyond the tile, one or a few, where
# a panel needs more of the card than one program: replayed as a CUDA graph from the second call on
# (~1,300 launches at 4096², host-bound eager). Runs only where the measured table names it.
@register_path("qr", "triton", "tsqr", supports=_tsqr_path_supported)
def _qr_tsqr_path(A, mode):
    return replay(qr_blocked.qr_blocked, A, mode=mode, nb=TSQR_NB, panel="tsqr")


@geqr2_op.implement("triton", supports=_supports, automatic=_automatic)
def _geqr2_triton(A):
    if not _small(A):
        *batch, m, n = A.shape
        QR, tau, _ = qr_blocked.geqrf_blocked(as3(A), _block_nb(A), BLOCK_PANEL)
        return QR.reshape(A.shape), tau.reshape(*batch, min(m, n))
    QR, tau, _, _ = householder_launch(A, store_qr=True)
    return QR, tau


@householder_product_op.implement("triton", supports=lambda A, tau: tau.dtype == A.dtype and _supports(A),
                                   automatic=_automatic)
def _householder_product_triton(A, tau):
    if not _small(A) or A.shape[-1] == 0:
        return qr_blocked.householder_product_blocked(A, tau, _block_nb(A))
    _, _, _, Q = householder_launch(A, tau=tau.expand(*A.shape[:-2], tau.shape[-1]), nq=A.shape[-1])
    return Q
