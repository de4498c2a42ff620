"""Blocked Householder QR for matrices too large for one program (LAPACK ``geqrf`` + ``orgqr``'s
structure, with every level-3 step a cuBLAS GEMM).

For ``A`` ``(B, m, n)``, ``k = min(m, n)``, panels of ``nb`` columns, ``j = 0, nb, 2nb, …``:

1. **panel**: factor ``A[j:, j:j+nb]`` in place (compact form: ``R`` on top, reflectors below);
2. ``T = larft(V, τ)`` (:func:`metalcore.linalg.householder_gemm.larft_gemm`, or the tall-panel
   kernel's own, formed in the panel's launch);
3. **trailing update**: ``A[j:, j+nb:] ← Hᴴ A[j:, j+nb:]``, ``H = I − V T Vᵀ`` (``larfb``, in place).

``Q = H₁ ⋯ H_k I[:, :nq]`` is then formed like LAPACK's ``orgqr``: the block reflectors applied
backwards to the identity, last panel first, each touching only ``Q[j:, j:]`` (the columns before
``j`` are still unit vectors that the later reflectors cannot reach). All three steps keep batch
elements apart, so a NaN stays in its own matrix.

Panel variants (``panel=``), because the tall, narrow panel is the one step that is not a GEMM:

* ``'kernel'``: the one-program-per-matrix Householder kernel of :mod:`metalcore.linalg.qr_triton`
  (panels up to 128 × 128, held in registers; also what CI runs under the interpreter);
* ``'tall'``: the tall-panel kernel of :mod:`metalcore.linalg.qr_panel_triton`, one program per
  panel streaming it through register tiles: any height, a whole batch at once;
* ``'geqrf'``: ``torch.geqrf`` on the panel (cuSOLVER on CUDA, one matrix after another);
* ``'tsqr'``: TSQR over many programs a panel and Householder reconstruction
  (:mod:`metalcore.linalg.qr_tsqr_triton`), for one or a few matrices whose panels are too tall for
  one program (``V`` and ``T`` formed with it); panels up to 64 columns;
* ``'recursive'``: the panel split in column halves down to ``base`` columns (Elmroth & Gustavson
  2000): the left half factored, applied to the right half with ``larfb``, the right half's lower
  part factored. It turns most of the panel's level-2 work into GEMMs; the leaves are factored as
  ``'auto'`` would factor them;
* ``'auto'``: ``'kernel'`` where the panel fits, else ``'tall'`` for a batch of at least
  :data:`TALL_MIN_BATCH` panels and ``'geqrf'`` for fewer (cuSOLVER's geqrf spreads one panel over
  the whole GPU; the tall kernel gives each panel one program);
* a function ``panel(P) -> tau`` that factors ``P`` in place as :func:`factor_panel` does: how another
  backend brings its own panel (the Metal backend's shader, :mod:`metalcore.linalg.qr_blocked_metal`);
  the rest of the algorithm is shared.

Flops (Householder, no pivoting): ``2mn² − 2n³/3`` for ``R`` (``m ≥ n``) and about the same again for
the reduced ``Q``; all but the panels' ``O(m n nb)`` share are GEMMs. Which ``nb`` and panel variant
are fastest on a card is measured by bench/scripts/qr_large_check.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metalcore.linalg.householder import _unit_lower
from metalcore.linalg.householder_gemm import as3, larfb_gemm, larft_gemm

PANELS = ("auto", "kernel", "tall", "geqrf", "recursive", "tsqr")
DEFAULT_NB = 64
# Smallest batch whose panels 'auto' gives to the tall-panel kernel (fewer go to torch.geqrf).
# Predicted, not yet measured (bench/linalg.md, "batched blocked QR"): one program per panel moves
# a 4096 × 64 panel at ~80 GB/s, ~0.4 ms against cuSOLVER's ~0.3 ms, so a single matrix keeps geqrf;
# from two matrices on, geqrf's per-matrix loop costs B times that.
TALL_MIN_BATCH = 2
# Largest panel side the register-tile kernel takes: its tile's limit, _small_triton.MAX_N (not
# imported: Triton may be missing here). A parameter so that CI can send small panels to 'tall'.
PANEL_KERNEL_MAX = 128
# Leaf width of the recursive panel (read at call time, so tests and the sweep can change it).
RECURSIVE_BASE = 16
# A panel variant: one of PANELS, or a function that factors the panel in place and returns tau.
Panel = str | Callable[[Tensor], Tensor]


def fits(P: Tensor) -> bool:
    """The panel fits the Triton Householder kernel's register tile, both sides at most
    :data:`PANEL_KERNEL_MAX`. Imported here, not at the top: the Metal backend uses this module where
    Triton is not installed (macOS)."""
    from metalcore.linalg._small_triton import fits as fits_triton

    return fits_triton(P, max_n=PANEL_KERNEL_MAX)


def _geqr2_kernel(P: Tensor) -> Tensor:
    # Imported here: qr_triton imports this module to route large inputs.
    from metalcore.linalg.qr_triton import householder_launch

    QR, tau, _, _ = householder_launch(P, store_qr=True)
    P.copy_(QR)
    return tau


def _tall(P: Tensor) -> Tensor:
    # Imported here for the same reason as fits: Triton may be missing where the Metal backend runs.
    from metalcore.linalg.qr_panel_triton import tall_panel_launch

    return tall_panel_launch(P)


def _tall_block(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from metalcore.linalg.qr_panel_triton import tall_block_launch

    return tall_block_launch(P)


def _tsqr_block(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from metalcore.linalg.qr_tsqr_triton import tsqr_block

    return tsqr_block(P)


def _geqrf(P: Tensor) -> Tensor:
    QR, tau = torch.geqrf(P)
    P.copy_(QR)
    return tau


def _auto(P: Tensor) -> str:
    if fits(P):
        return "kernel"
    return "tall" if P.shape[0] >= TALL_MIN_BATCH else "geqrf"


def _recursive(P: Tensor, base: int) -> Tensor:
    w = P.shape[-1]
    if w <= base:
        return factor_panel(P, "auto")
    h = w // 2
    tau1 = _recursive(P[..., :h], base)
    Vu = _unit_lower(P[..., :h])
    larfb_gemm(Vu, larft_gemm(Vu, tau1), P[..., h:], True, True, inplace=True)
    tau2 = _recursive(P[..., h:, h:], base)
    return torch.cat([tau1, tau2], dim=-1)


def factor_panel(P: Tensor, panel: Panel = "auto") -> Tensor:
    """Compact QR of the panel ``P`` ``(B, h, w)``, ``h ≥ w``, written into ``P`` (a view of the
    matrix being factored); returns ``tau`` ``(B, w)``."""
    if callable(panel):
        return panel(P)
    if panel == "kernel" and not fits(P):
        raise ValueError(f"metalcore qr_blocked: panel='kernel' holds panels of at most {PANEL_KERNEL_MAX} x "
                         f"{PANEL_KERNEL_MAX} in registers; got a panel of shape {tuple(P.shape)}")
    if panel == "recursive":
        return _recursive(P, RECURSIVE_BASE)
    if panel == "auto":
        panel = _auto(P)
    if panel == "kernel":
        return _geqr2_kernel(P)
    if panel == "tall":
        return _tall(P)
    if panel == "geqrf":
        return _geqrf(P)
    if panel == "tsqr":
        return _tsqr_block(P)[0]
    raise ValueError(f"metalcore qr_blocked: panel must be one of {PANELS} or a function; got {panel!r}")


def _block_panel(name: Panel) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None:
    """The variants that form their block reflector with the panel: the tall-panel kernel in its own
    launch, TSQR with its reconstruction (None for the others, whose comes from larft_gemm)."""
    return {"tall": _tall_block, "tsqr": _tsqr_block}.get(name) if isinstance(name, str) else None


def factor_block(P: Tensor, panel: Panel = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The panel ``P`` ``(B, h, w)``, ``h ≥ w``, factored in place as by :func:`factor_panel`, and its
    block reflector: ``(tau, Vu, T)``, ``Vu`` explicit unit lower trapezoidal, ``H = I − Vu T Vuᵀ``
    (:func:`_block_panel`'s variants form it with the panel; the others by
    :func:`~metalcore.linalg.householder_gemm.larft_gemm`)."""
    block = _block_panel(_auto(P) if panel == "auto" else panel)
    if block is not None:
        return block(P)
    tau = factor_panel(P, panel)
    Vu = _unit_lower(P)
    return tau, Vu, larft_gemm(Vu, tau)


def geqrf_blocked(A: Tensor, nb: int = DEFAULT_NB, panel: Panel = "auto") -> tuple[Tensor, Tensor, list]:
    """Blocked compact QR of ``A`` ``(B, m, n)`` (a copy is factored): ``(QR, tau, blocks)`` with
    ``QR``/``tau`` as from ``torch.geqrf`` and ``blocks`` the ``(j, Vu, T)`` of each panel (``Vu``
    explicit unit trapezoidal), kept for forming ``Q``."""
    if nb < 1:
        raise ValueError(f"metalcore qr_blocked: nb must be positive; got {nb}")
    B, m, n = A.shape
    k = min(m, n)
    QR = A.clone(memory_format=torch.contiguous_format)
    taus, blocks = [], []
    for j in range(0, k, nb):
        jb = min(nb, k - j)
        tau, Vu, T = factor_block(QR[:, j:, j:j + jb], panel)
        if j + jb < n:
            larfb_gemm(Vu, T, QR[:, j:, j + jb:], True, True, inplace=True)
        taus.append(tau)
        blocks.append((j, Vu, T))
    tau = torch.cat(taus, dim=-1) if taus else A.new_empty(B, 0)
    return QR, tau, blocks


def apply_q(blocks: list, m: int, nq: int, batch: int, like: Tensor) -> Tensor:
    """``H₁ ⋯ H_k I[:, :nq]`` ``(batch, m, nq)`` from the panels' ``(j, Vu, T)``, backwards."""
    Q = torch.eye(m, nq, dtype=like.dtype, device=like.device).expand(batch, m, nq).contiguous()
    for j, Vu, T in reversed(blocks):
        larfb_gemm(Vu, T, Q[:, j:, j:], True, False, inplace=True)
    return Q


def qr_blocked(A: Tensor, mode: str = "reduced", nb: int = DEFAULT_NB, panel: Panel = "auto") -> tuple[Tensor, Tensor]:
    """``(Q, R)`` of ``A`` ``(*, m, n)`` as ``metalcore::qr`` returns them (``Q`` empty for
    ``mode='r'``), by the blocked algorithm of the module docstring."""
    *batch, m, n = A.shape
    k = min(m, n)
    A3 = as3(A)
    complete = mode == "complete"
    kr = m if complete else k
    QR, _, blocks = geqrf_blocked(A3, nb, panel)
    R = QR[:, :kr, :].triu().reshape(*batch, kr, n)
    if mode == "r":
        return A.new_empty(0), R
    nq = m if complete else k
    return apply_q(blocks, m, nq, A3.shape[0], A).reshape(*batch, m, nq), R


def householder_product_blocked(A: Tensor, tau: Tensor, nb: int = DEFAULT_NB) -> Tensor:
    """``orgqr`` by block reflectors: the first ``n`` columns of ``H₁ ⋯ H_k`` for ``A`` ``(*, m, n)``
    holding ``k = tau.shape[-1]`` reflectors."""
    *batch, m, n = A.shape
    k = tau.shape[-1]
    A3 = as3(A)
    tau2 = tau.reshape(A3.shape[0], k)
    blocks = []
    for j in range(0, k, nb):
        jb = min(nb, k - j)
        Vu = _unit_lower(A3[:, j:, j:j + jb])
        blocks.append((j, Vu, larft_gemm(Vu, tau2[:, j:j + jb])))
    return apply_q(blocks, m, n, A3.shape[0], A).reshape(*batch, m, n)
