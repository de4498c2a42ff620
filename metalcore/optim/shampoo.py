r"""Shampoo (Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization",
arXiv:1802.09568), blocked and grafted as in distributed Shampoo (Shi et al., "A Distributed
Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer", arXiv:2309.06497;
https://github.com/facebookresearch/optimizers).

Blocks. A parameter is viewed with consecutive small dimensions merged
(:func:`~metalcore.optim._preconditioner.merged_shape` with ``max_preconditioner_dim``), then cut into
blocks of at most ``max_preconditioner_dim`` along every dimension (edge blocks are smaller). A block
of order r (its number of dimensions) carries one factor ``F_a`` (``d_a × d_a``) per dimension.

For gradient g at step t (from 1), learning rate γ, weight decay λ, betas (β₁, β₂), ε = ``epsilon``:

    F_a ← β₂ F_a + (1 − β₂)·g_(a) g_(a)ᵀ        per block (β₂ = 1: F_a ← F_a + g_(a) g_(a)ᵀ, Adagrad)
    m ← β₁ m + (1 − β₁) g;  m̂ = m / (1 − β₁ᵗ)       (``exp_avg``; m̂ = g when β₁ = 0)
    every ``precondition_frequency`` steps from ``start_preconditioning_step`` (and at it):
        R_a ← (F_a / (1 − β₂ᵗ) + ε I)^(−1/(2r))     by one eigh: Q diag((max(λ, 0) + ε)^(−1/(2r))) Qᵀ
    D = graft(m̂):  Adam grafting  m̂ / (√(v / (1 − β₂'ᵗ)) + ε'),  v ← β₂' v + (1 − β₂') g²  (``exp_avg_sq``)
                   SGD grafting   m̂
    P = m̂ ×₁ R₁ ⋯ ×_r R_r  per block, rescaled to the grafted norm: P·‖D‖/(‖P‖ + 1e-16)
                   (no grafting: P unscaled)
    P = D before ``start_preconditioning_step`` (m̂ when grafting is None)
    θ ← θ·(1 − γλ) − γ P                            decoupled weight decay

(β₂', ε' are ``grafting_beta2``, ``grafting_epsilon``; the bias corrections apply when
``use_bias_correction``.) This is distributed Shampoo's default path (eigendecomposition root,
grafting of the second moment only, decoupled decay), with one difference: ε is added to the
eigenvalues after negative rounding noise is clamped to zero, per eigenvalue, where distributed
Shampoo shifts the whole spectrum by its smallest eigenvalue (which needs that value on the host).

Batching. Blocks of one shape from every parameter are stacked (the full blocks of a parameter are
cut out by one reshape-permute copy, not one slice per block), so factor updates and preconditioning
are one batched matmul per dimension; a refresh makes one ``metalcore.linalg.eigh`` call per factor
size and order over all blocks of all parameters (bucketing, not padding:
:mod:`metalcore.optim._preconditioner`). No host synchronisation.
"""

import functools
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from metalcore.linalg.eigh import eigh
from metalcore.optim._preconditioner import (along, by_size, check_int, check_number, gram, joined, merged_shape,
                                             KroneckerOptimizer)
from metalcore.optim.adamw import evaluate_closure, state_dtype

_CLS = "Shampoo"
GRAFTING = ("adam", "sgd", None)

Segment = tuple[int, int, int]  # (start, number of blocks, block length) along one dimension


def block_regions(shape: tuple[int, ...], max_dim: int) -> list[tuple[Segment, ...]]:
    """The parameter's blocks as regions of equal blocks: along each dimension, the full blocks of
    ``max_dim`` and the remainder; a region is one choice per dimension (≤ 2^r regions)."""
    per_dim = []
    for d in shape:
        full, rest = divmod(d, max_dim)
        segments = [(0, full, max_dim)] if full else []
        if rest:
            segments.append((full * max_dim, 1, rest))
        per_dim.append(segments)
    return list(itertools.product(*per_dim))


def _region_view(X: Tensor, region: tuple[Segment, ...]) -> Tensor:
    """``X``'s region viewed as ``(n₁, …, n_r, b₁, …, b_r)``: block index first, then within-block."""
    split = []
    for a, (start, count, size) in enumerate(region):
        X = X.narrow(a, start, count * size)
        split += [count, size]
    r = len(region)
    return X.reshape(split).permute(*range(0, 2 * r, 2), *range(1, 2 * r, 2))


def to_blocks(X: Tensor, region: tuple[Segment, ...]) -> Tensor:
    """The region's blocks stacked ``(n₁·…·n_r, b₁, …, b_r)`` (one copy)."""
    return _region_view(X, region).reshape(-1, *(size for _, _, size in region))


def from_blocks(out: Tensor, region: tuple[Segment, ...], blocks: Tensor) -> None:
    """Write stacked blocks back into the region of ``out`` (contiguous)."""
    view = _region_view(out, region)
    view.copy_(blocks.view(view.shape))


@functools.lru_cache(maxsize=1024)
def _layout(shape: tuple[int, ...], max_preconditioner_dim: int, merge_dims: bool):
    shape = shape or (1,)
    if merge_dims:
        shape = merged_shape(shape, max_preconditioner_dim)
    return shape, tuple(block_regions(shape, max_preconditioner_dim))


def shampoo_layout(param: Tensor, max_preconditioner_dim: int, merge_dims: bool):
    """``(shape, regions)``: the shape Shampoo sees ``param`` as, and its block regions (cached per
    shape: this runs for every parameter at every step)."""
    return _layout(tuple(param.shape), max_preconditioner_dim, merge_dims)


def inverse_roots(exponent: float, A: Tensor, *, epsilon: float) -> tuple[Tensor]:
    """``(A + εI)^(−exponent)`` for a stack of symmetric PSD matrices, by one eigh call; negative
    eigenvalues (rounding noise of a PSD matrix) count as zero."""
    L, Q = eigh(A)
    return ((Q * (L.clamp_min(0) + epsilon).pow(-exponent).unsqueeze(-2)) @ Q.mT,)


@torch.no_grad()
def shampoo_update(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *, lr: float,
                   betas: tuple[float, float], epsilon: float, weight_decay: float, max_preconditioner_dim: int,
                   precondition_frequency: int, start_preconditioning_step: int, use_bias_correction: bool,
                   grafting: Optional[str], grafting_beta2: float, grafting_epsilon: float, merge_dims: bool) -> None:
    """Functional Shampoo: one step, in place, over parallel lists (math in the module docstring).

    ``states[i]`` is parameter i's state dict (empty before its first step): ``'step'`` (int),
    ``'exp_avg'`` (when β₁ > 0) and ``'exp_avg_sq'`` (Adam grafting) of the merged shape, and
    ``'factors'``/``'inv_roots'``: for each block region (:func:`block_regions`) and dimension a, a
    ``(blocks, d_a, d_a)`` tensor. Moments and factors are float32 for bf16/fp16 parameters.
    """
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(f"metalcore.optim.shampoo_update: params, grads and states must have equal lengths; "
                         f"got {len(params)}, {len(grads)}, {len(states)}")
    beta1, beta2 = betas
    layouts = [shampoo_layout(p, max_preconditioner_dim, merge_dims) for p in params]
    by_step: dict[tuple, list[int]] = {}
    for i, (p, (shape, regions), state) in enumerate(zip(params, layouts, states)):
        if not state:
            dtype = state_dtype(p)
            state["step"] = 0
            if beta1 > 0:
                state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
            if grafting == "adam":
                state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
            blocks = [(math.prod(n for _, n, _ in region), size) for region in regions for _, _, size in region]
            state["factors"] = [torch.zeros(n, d, d, dtype=dtype, device=p.device) for n, d in blocks]
            state["inv_roots"] = [torch.zeros(n, d, d, dtype=dtype, device=p.device) for n, d in blocks]
        state["step"] += 1
        by_step.setdefault((state["step"], state["factors"][0].dtype, p.device), []).append(i)

    # Elementwise: filtered gradient m̂ and grafted direction D, per parameter (merged shape).
    g = [grads[i].reshape(layouts[i][0]).to(states[i]["factors"][0].dtype) for i in range(len(params))]
    m_hat: list[Tensor] = list(g)
    D: list[Tensor] = list(g)
    for (t, _, _), idx in by_step.items():
        if beta1 > 0:
            ms = [states[i]["exp_avg"] for i in idx]
            torch._foreach_lerp_(ms, [g[i] for i in idx], 1 - beta1)
            scaled = torch._foreach_div(ms, 1 - beta1**t) if use_bias_correction else ms
            for i, m in zip(idx, scaled):
                m_hat[i] = D[i] = m
        if grafting == "adam":
            vs = [states[i]["exp_avg_sq"] for i in idx]
            torch._foreach_mul_(vs, grafting_beta2)
            torch._foreach_addcmul_(vs, [g[i] for i in idx], [g[i] for i in idx], 1 - grafting_beta2)
            denom = torch._foreach_sqrt(torch._foreach_div(vs, 1 - grafting_beta2**t) if use_bias_correction else vs)
            torch._foreach_add_(denom, grafting_epsilon)
            for i, d in zip(idx, torch._foreach_div([m_hat[i] for i in idx], denom)):
                D[i] = d

    # Blocks of one shape (and step) from every parameter, stacked.
    units: dict[tuple, list[tuple[int, int, int]]] = {}   # key -> [(param, region, first factor index)]
    for i, (shape, regions) in enumerate(layouts):
        f = 0
        for r, region in enumerate(regions):
            key = (tuple(size for _, _, size in region), states[i]["step"], g[i].dtype, g[i].device)
            units.setdefault(key, []).append((i, r, f))
            f += len(region)

    jobs: list[tuple[Tensor]] = []           # bias-corrected factor stacks to refresh ...
    targets: list[Tensor] = []               # ... and the inverse-root stacks they refresh
    exponents: list[float] = []
    preconditioning: list[tuple[list, dict[int, Tensor]]] = []
    for (block_shape, t, _, _), members in units.items():
        G = torch.cat([to_blocks(g[i], layouts[i][1][r]) for i, r, _ in members])
        factors = {a: joined([(states[i]["factors"], f + a) for i, _, f in members], cat=True)
                   for a in range(len(block_shape))}
        roots = {a: joined([(states[i]["inv_roots"], f + a) for i, _, f in members], cat=True)
                 for a in range(len(block_shape))}
        for a, F in factors.items():
            if beta2 == 1.0:
                F.add_(gram(G, 1 + a))
            else:
                F.mul_(beta2).add_(gram(G, 1 + a), alpha=1 - beta2)
        if t == start_preconditioning_step or (t > start_preconditioning_step and t % precondition_frequency == 0):
            correction = 1 - beta2**t if use_bias_correction and beta2 < 1.0 else 1.0
            for a in factors:
                jobs.append((factors[a] / correction,))
                targets.append(roots[a])
                exponents.append(1 / (2 * len(block_shape)))
        if t >= start_preconditioning_step:
            preconditioning.append((members, roots))

    if jobs:
        results = by_size(lambda e, A: inverse_roots(e, A, epsilon=epsilon), jobs, exponents)
        for R, (R_new,) in zip(targets, results):
            R.copy_(R_new)

    preconditioned = {i for members, _ in preconditioning for i, _, _ in members}
    update = {i: torch.empty(layouts[i][0], dtype=g[i].dtype, device=g[i].device) if i in preconditioned
              else (D[i] if grafting is not None else m_hat[i]) for i in range(len(params))}
    for members, roots in preconditioning:
        P = torch.cat([to_blocks(m_hat[i], layouts[i][1][r]) for i, r, _ in members])
        for a, R in roots.items():
            P = along(P, R, 1 + a)
        if grafting is not None:
            Dg = torch.cat([to_blocks(D[i], layouts[i][1][r]) for i, r, _ in members])
            scale = Dg.flatten(1).norm(dim=1) / (P.flatten(1).norm(dim=1) + 1e-16)
            P = P * scale.view(-1, *[1] * (P.ndim - 1))
        counts = [math.prod(n for _, n, _ in layouts[i][1][r]) for i, r, _ in members]
        for (i, r, _), piece in zip(members, P.split(counts)):
            from_blocks(update[i], layouts[i][1][r], piece)

    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, [update[i].reshape(p.shape).to(p.dtype) for i, p in enumerate(params)], alpha=-lr)


def check_hyperparameters(lr: Any, betas: Any, epsilon: Any, weight_decay: Any, max_preconditioner_dim: Any,
                          precondition_frequency: Any, start_preconditioning_step: Any, use_bias_correction: Any,
                          grafting: Any, grafting_beta2: Any, grafting_epsilon: Any, merge_dims: Any) -> None:
    """ValueError naming the bad value, in torch.optim's style."""
    check_number(_CLS, "learning rate", lr, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{_CLS}: betas must be a pair (beta1, beta2); got {betas!r}")
    check_number(_CLS, "beta parameter at index 0", betas[0], 0.0, 1.0)
    check_number(_CLS, "beta parameter at index 1", betas[1], 0.0, 1.0, closed=True)  # 1: Adagrad-like sums
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"{_CLS}: Invalid epsilon value: {epsilon!r} (must be > 0: it regularizes the inverse root)")
    check_number(_CLS, "weight_decay value", weight_decay, 0.0)
    check_int(_CLS, "max_preconditioner_dim", max_preconditioner_dim, 1)
    check_int(_CLS, "precondition_frequency", precondition_frequency, 1)
    if start_preconditioning_step is not None:
        check_int(_CLS, "start_preconditioning_step", start_preconditioning_step, 1)
    if grafting not in GRAFTING:
        raise ValueError(f"{_CLS}: grafting must be one of 'adam', 'sgd' or None; got {grafting!r}")
    check_number(_CLS, "grafting_beta2", grafting_beta2, 0.0, 1.0)
    check_number(_CLS, "grafting_epsilon", grafting_epsilon, 0.0)
    for name, flag in (("use_bias_correction", use_bias_correction), ("merge_dims", merge_dims)):
        if not isinstance(flag, bool):
            raise ValueError(f"{_CLS}: {name} must be a bool; got {flag!r}")


HYPERPARAMETERS = ("lr", "betas", "epsilon", "weight_decay", "max_preconditioner_dim", "precondition_frequency",
                   "start_preconditioning_step", "use_bias_correction", "grafting", "grafting_beta2",
                   "grafting_epsilon", "merge_dims")


class Shampoo(KroneckerOptimizer):
    r"""Blocked Shampoo with grafting (math and sources in :mod:`metalcore.optim.shampoo`); the inverse
    roots of all blocks are refreshed by one ``metalcore.linalg.eigh`` call per factor size.

    Args (distributed Shampoo's names and defaults):
        params: parameters or parameter groups, any shape (1-D ones get a full ``n × n`` factor per block).
        lr: learning rate γ (default 1e-3).
        betas: (β₁, β₂): EMA of the gradient (0 disables) and of the factors (1: running sums)
            (default (0.9, 0.999)).
        epsilon: added to the factors' eigenvalues before the inverse root (default 1e-12).
        weight_decay: decoupled (AdamW-style) weight decay λ (default 0).
        max_preconditioner_dim: block size and dimension-merging threshold (default 1024).
        precondition_frequency: steps between inverse-root refreshes (default 1).
        start_preconditioning_step: first step that uses Shampoo's direction (before it: the grafted
            method); None (default) means ``precondition_frequency``.
        use_bias_correction: Adam-style bias corrections of the EMAs (default True).
        grafting: ``'adam'`` (default: per-block norm of Adam's step, i.e. AdamW with the decay),
            ``'sgd'`` (norm of the filtered gradient) or None.
        grafting_beta2, grafting_epsilon: Adam grafting's β₂ and ε (defaults 0.999, 1e-8).
        merge_dims: merge consecutive dimensions while their product is ≤ ``max_preconditioner_dim``
            (default True).

    State per parameter: ``'step'``, ``'exp_avg'``, ``'exp_avg_sq'``, ``'factors'``, ``'inv_roots'``;
    ``state_dict`` save/load continues bit for bit.

    >>> opt = Shampoo(model.parameters(), lr=1e-3, precondition_frequency=10, max_preconditioner_dim=1024)
    """

    NAME = _CLS
    HYPERPARAMETERS = HYPERPARAMETERS
    check_hyperparameters = staticmethod(check_hyperparameters)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, max_preconditioner_dim: int = 1024,
                 precondition_frequency: int = 1, start_preconditioning_step: Optional[int] = None,
                 use_bias_correction: bool = True, grafting: Optional[str] = "adam", grafting_beta2: float = 0.999,
                 grafting_epsilon: float = 1e-8, merge_dims: bool = True):
        check_hyperparameters(lr, betas, epsilon, weight_decay, max_preconditioner_dim, precondition_frequency,
                              start_preconditioning_step, use_bias_correction, grafting, grafting_beta2,
                              grafting_epsilon, merge_dims)
        defaults = dict(lr=lr, betas=tuple(betas), epsilon=epsilon, weight_decay=weight_decay,
                        max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        use_bias_correction=use_bias_correction, grafting=grafting, grafting_beta2=grafting_beta2,
                        grafting_epsilon=grafting_epsilon, merge_dims=merge_dims)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One Shampoo step for every parameter group; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for _group, params, options in self.groups_to_step():
            if options["start_preconditioning_step"] is None:
                options["start_preconditioning_step"] = options["precondition_frequency"]
            shampoo_update(params, [p.grad for p in params], [self.state[p] for p in params], **options)
        return loss
