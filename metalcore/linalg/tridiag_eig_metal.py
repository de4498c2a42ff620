"""Eigenvalues and eigenvectors of batched symmetric tridiagonal matrices of any order on Metal (stage 3
of the two-stage eigensolver): the host side of ``tridiag_prepare_float``, ``tridiag_values_float``,
``tridiag_vector_plan_float``, ``tridiag_vectors_float`` and ``tridiag_clusters_float`` in
``shaders/twostage.metal``.

Layers: the shaders → :func:`tridiag_eig_metal` → the Metal :class:`~metalcore.linalg.eigh_twostage.Stages`
of :mod:`metalcore.linalg.eigh_twostage_metal`.

The algorithm is the Triton solver's (:mod:`metalcore.linalg.tridiag_eig_triton`, whose docstring
derives it), and the steps around the kernels are :mod:`metalcore.linalg.tridiag_host`'s, run as two
one-thread-a-matrix shaders (``prepare``, ``vector_plan``: the same outputs as the torch steps, where
those were 86 and 188 dispatches a call) as the Triton backend runs them as two launches: ``T`` scaled
and split into blocks, each lane's eigenvalue of its
block by bisection (one Sturm point a lane and pass: one thread a lane), shifts and clusters of the
whole spectrum, :data:`~metalcore.linalg.tridiag_host.ROUNDS` rounds of inverse iteration (one thread
a column) each followed by Gram-Schmidt within clusters (one threadgroup a matrix), the columns sorted
with the eigenvalues at the end. float32 only (Apple GPUs have no float64).

Not timed: no Apple hardware here; CI runs the shaders through the CPU executor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.linalg.tridiag_host import (ORTOL_N, RHO, ROUNDS, SEED, SPLIT, TIGHT, Problem, eigenvalues, in_order,
                                           passes)

SHADER = "twostage"
# Threads of a threadgroup of the one-thread-a-lane kernels, and of the clusters' threadgroup.
GROUP = 64
CLUSTER_THREADS = 256


def prepare_metal(lib, d: Tensor, e: Tensor) -> Problem:
    """:func:`~metalcore.linalg.tridiag_host.prepare` in one launch (``tridiag_prepare_float``, one
    thread a matrix): the same outputs, the same arithmetic."""
    nb, n = d.shape
    finfo = torch.finfo(d.dtype)
    D, E = (_metal.empty((nb, n), dtype=d.dtype, device=d.device) for _ in range(2))
    first_row, last_row = (_metal.empty((nb, n), dtype=torch.int32, device=d.device) for _ in range(2))
    low, high, scale = (_metal.empty((nb,), dtype=d.dtype, device=d.device) for _ in range(3))
    finite = _metal.empty((nb,), dtype=torch.uint8, device=d.device)
    _metal.launch(lib, "tridiag_prepare_float", d.contiguous(), e.contiguous(), D, E, first_row, last_row, low, high,
                  scale, finite, n, nb, SPLIT * math.sqrt(n) * finfo.eps, finfo.eps, finfo.tiny, threads=nb,
                  group_size=GROUP)
    return Problem(D, E, scale, finite.view(torch.bool), first_row, last_row, low, high)


def vector_plan_metal(lib, problem: Problem, LS: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~metalcore.linalg.tridiag_host.vector_plan` in one launch (``tridiag_vector_plan_float``,
    one thread a matrix)."""
    nb, n = LS.shape
    eps = torch.finfo(LS.dtype).eps
    shift = _metal.empty((nb, n), dtype=LS.dtype, device=LS.device)
    first, todo = (_metal.empty((nb, n), dtype=torch.int32, device=LS.device) for _ in range(2))
    count = _metal.empty((nb,), dtype=torch.int32, device=LS.device)
    _metal.launch(lib, "tridiag_vector_plan_float", LS, problem.first_row, shift, first, todo, count, n, nb,
                  TIGHT * eps, ORTOL_N / n, RHO * math.sqrt(eps), 8.0 * eps, threads=nb, group_size=GROUP)
    return shift, first, todo, count


def tridiag_eig_metal(d: Tensor, e: Tensor, compute_v: bool) -> tuple[Tensor, Tensor]:
    """:func:`~metalcore.linalg.tridiag_eig_triton.tridiag_eig`'s contract on Metal: eigenvalues,
    ascending, of the symmetric tridiagonal matrices with diagonals ``d`` ``(nb, n)`` and off-diagonals
    ``e`` ``(nb, n)`` (``e[:, i] = T[i, i+1]``; the last column is ignored), float32; with
    ``compute_v`` also their orthonormal eigenvectors as the columns of ``Z`` ``(nb, n, n)``, else
    ``d.new_empty(0)``. NaN or Inf in a matrix gives NaN eigenvalues and vectors for that matrix only."""
    if d.dim() != 2 or e.shape != d.shape:
        raise ValueError(f"d and e must both be (nb, n), got {tuple(d.shape)} and {tuple(e.shape)}")
    if d.dtype != torch.float32 or e.dtype != d.dtype or e.device != d.device:
        raise ValueError(f"d and e must be float32 on one device, got {d.dtype} on {d.device} and {e.dtype} "
                         f"on {e.device}")
    nb, n = d.shape
    if nb == 0 or n == 0:
        return d.new_empty(nb, n), d.new_empty(nb, n, n) if compute_v else d.new_empty(0)
    finfo = torch.finfo(d.dtype)
    lib = _metal.library(SHADER, d.device)
    lanes = nb * n
    prob = prepare_metal(lib, d, e)
    LS = torch.empty_like(prob.D)
    _metal.launch(lib, "tridiag_values_float", prob.D, prob.E, prob.first_row, prob.last_row, prob.low, prob.high,
                  LS, n, nb, passes(d.dtype, 1), finfo.tiny, threads=lanes, group_size=GROUP)
    lam, order = eigenvalues(prob, LS)
    if not compute_v:
        return lam, d.new_empty(0)

    shift, first, todo, count = vector_plan_metal(lib, prob, LS)
    Z = torch.empty(nb, n, n, dtype=d.dtype, device=d.device)
    Y, P = torch.empty_like(Z), torch.empty_like(Z)
    C = torch.empty_like(prob.D)
    for round_ in range(ROUNDS):
        _metal.launch(lib, "tridiag_vectors_float", prob.D, prob.E, shift, prob.first_row, prob.last_row, Z, Y, P,
                      n, nb, finfo.eps, int(round_ == 0), SEED, threads=lanes, group_size=GROUP)
        _metal.launch(lib, "tridiag_clusters_float", Z, first, todo, count, C, n,
                      threads=nb * CLUSTER_THREADS, group_size=CLUSTER_THREADS)
    return lam, in_order(Z, order, Y, prob.finite)
