r"""SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321): Adam run
in the eigenbasis of Shampoo's preconditioner, the eigenbasis refreshed every few steps.

For a parameter θ viewed as a tensor of shape ``(d₁, …, d_r)`` (``merge_dims`` first merges
consecutive small dimensions, :func:`~metalcore.optim._preconditioner.merged_shape`), each dimension
``a`` with ``d_a ≤ max_precond_dim`` carries a Gram EMA ``GG_a`` (``d_a × d_a``) and an orthonormal
basis ``Q_a``; larger dimensions (and 1-D parameters unless ``precondition_1d``) are left in the
coordinate basis. With ``P(X) = X ×₁ Q₁ᵀ ⋯ ×_r Q_rᵀ`` (mode products over the preconditioned
dimensions) and ``P⁻¹`` its inverse (``Q_a`` in place of ``Q_aᵀ``), for gradient g at step t (from 1),
learning rate γ, weight decay λ, betas β₁, β₂ and ``shampoo_beta`` β_s:

    first call:  GG_a ← (1 − β_s)·g_(a) g_(a)ᵀ;  Q_a ← eigenvectors of GG_a, eigenvalues descending;
                 no update of θ (the reference skips it so that a gradient never projects itself)
    then:        ĝ = P(g)
                 m ← β₁ m + (1 − β₁) ĝ                    (``exp_avg``, kept in the eigenbasis)
                 v ← β₂ v + (1 − β₂) ĝ²                   (``exp_avg_sq``)
                 N = P⁻¹(m / (√v + ε));  N ← N / rms(N) if ``normalize_grads``
                 θ ← θ − γ·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·N         (γ alone without ``correct_bias``)
                 θ ← θ·(1 − γλ)                           decoupled decay, after the update (reference order)
                 GG_a ← β_s GG_a + (1 − β_s)·g_(a) g_(a)ᵀ   (``g_(a)``: mode-a unfolding of the raw gradient)
    every ``precondition_frequency`` steps, after the above — one power-iteration step and a QR:
                 m ← P⁻¹(m) with the old bases
                 order_a = argsort(diag(Q_aᵀ GG_a Q_a), descending);  Q_a ← Q_a[:, order_a]
                 v ← v permuted by order_a along dimension a
                 Q_a ← qr(GG_a Q_a).Q
                 m ← P(m) with the new bases

This is the algorithm of the paper's reference code (https://github.com/nikhilvyas/SOAP, ``soap.py``),
step for step; the one change is where m is rotated: the reference projects it back and forth every
step (a no-op between refreshes, since ``Q Qᵀ = I``), here only on refresh steps.

Batching (the point of this implementation): parameters of one merged shape are stacked, so every
projection and Gram update is one batched matmul per dimension over all of them; a refresh makes one
``metalcore.linalg.eigh`` (first step) or one ``metalcore.linalg.qr`` (later) call per matrix *size*,
over every parameter and side of that size (bucketing, not padding: see
:mod:`metalcore.optim._preconditioner`). No host synchronisation: the step count is a Python int
per parameter, the eigenvalue order stays on the device.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from metalcore.linalg.eigh import eigh
from metalcore.linalg.qr import qr
from metalcore.optim._preconditioner import (along, by_size, check_int, check_number, gram, joined, merged_shape,
                                             KroneckerOptimizer)
from metalcore.optim.adamw import evaluate_closure, state_dtype

_CLS = "SOAP"


def preconditioned_axes(shape: tuple[int, ...], original_ndim: int, max_precond_dim: int,
                        precondition_1d: bool) -> tuple[int, ...]:
    """The dimensions of a (merged) shape that carry a basis: those of size ≤ ``max_precond_dim``;
    none for a 1-D parameter unless ``precondition_1d`` (the reference's rule)."""
    if original_ndim <= 1 and not precondition_1d:
        return ()
    return tuple(a for a, d in enumerate(shape) if d <= max_precond_dim)


def soap_layout(param: Tensor, *, max_precond_dim: int, merge_dims: bool,
                precondition_1d: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, axes)``: the shape SOAP sees ``param`` as and the dimensions it preconditions."""
    shape = tuple(param.shape) or (1,)
    if merge_dims and param.ndim > 1:
        shape = merged_shape(shape, max_precond_dim)
    return shape, preconditioned_axes(shape, param.ndim, max_precond_dim, precondition_1d)


def project(X: Tensor, bases: dict[int, Tensor], *, back: bool) -> Tensor:
    """``P(X)`` (``back=False``) or ``P⁻¹(X)`` for a stack ``X`` ``(k, d₁, …)`` and stacked bases
    ``{axis: (k, d_a, d_a)}``."""
    for a, Q in bases.items():
        X = along(X, Q if back else Q.mT, 1 + a)
    return X


def initial_bases(_, GG: Tensor) -> tuple[Tensor]:
    """Eigenvectors of a stack of Gram matrices, columns by descending eigenvalue (one eigh call)."""
    return (eigh(GG).eigenvectors.flip(-1),)


def power_qr_bases(_, GG: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration step from the current bases, sorted by their Rayleigh quotients, then QR
    (one batched matmul and one qr call): returns ``(Q_new, order)``; ``GG (Q P) = (GG Q) P`` lets the
    column sort act on the product."""
    GQ = GG @ Q
    order = (Q * GQ).sum(-2).argsort(dim=-1, descending=True)
    return qr(GQ.gather(-1, order.unsqueeze(-2).expand_as(GQ))).Q, order


def _permute_along(v: Tensor, order: Tensor, axis: int) -> Tensor:
    shape = [1] * v.ndim
    shape[0], shape[axis] = v.shape[0], v.shape[axis]
    return v.gather(axis, order.view(shape).expand_as(v))


@torch.no_grad()
def soap_update(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *, lr: float,
                betas: tuple[float, float], shampoo_beta: Optional[float], eps: float, weight_decay: float,
                precondition_frequency: int, max_precond_dim: int, merge_dims: bool, precondition_1d: bool,
                normalize_grads: bool, correct_bias: bool) -> None:
    """Functional SOAP: one step, in place, over parallel lists (math in the module docstring).

    ``states[i]`` is parameter i's state dict (empty before its first step); it holds ``'step'`` (int),
    ``'exp_avg'`` and ``'exp_avg_sq'`` (the merged shape, in the eigenbasis; float32 for bf16/fp16
    parameters), ``'GG'`` and ``'Q'`` (one entry per merged dimension: a ``d × d`` tensor, or None where
    the dimension is not preconditioned).
    """
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(f"metalcore.optim.soap_update: params, grads and states must have equal lengths; "
                         f"got {len(params)}, {len(grads)}, {len(states)}")
    beta1, beta2 = betas
    beta_s = beta2 if shampoo_beta is None else shampoo_beta
    groups: dict[tuple, list[int]] = {}
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        shape, axes = soap_layout(p, max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                                  precondition_1d=precondition_1d)
        if not state:
            dtype = state_dtype(p)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state["GG"] = [torch.zeros(d, d, dtype=dtype, device=p.device) if a in axes else None
                           for a, d in enumerate(shape)]
        key = (shape, axes, state["exp_avg"].dtype, p.device, state["step"], "Q" in state)
        groups.setdefault(key, []).append(i)

    first: list[tuple[list[dict], int, Tensor]] = []      # (states, axis, GG stack) needing a first basis
    refresh: list[tuple[dict[int, Tensor], dict[int, Tensor], Tensor, Tensor]] = []  # (GG, Q, m, v) stacks
    for (shape, axes, dtype, _, step, has_bases), idx in groups.items():
        sts = [states[i] for i in idx]
        G = torch.stack([grads[i].reshape(shape) for i in idx]).to(dtype)
        GG = {a: joined([(s["GG"], a) for s in sts]) for a in axes}
        if not has_bases:
            for a in axes:
                GG[a].lerp_(gram(G, 1 + a), 1 - beta_s)
                first.append((sts, a, GG[a]))
            for s in sts:
                s["Q"] = [None] * len(shape)
            continue
        Q = {a: joined([(s["Q"], a) for s in sts]) for a in axes}
        m, v = joined([(s, "exp_avg") for s in sts]), joined([(s, "exp_avg_sq") for s in sts])
        t = step + 1
        for s in sts:
            s["step"] = t
        g_hat = project(G, Q, back=False)
        m.mul_(beta1).add_(g_hat, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
        N = project(m / (v.sqrt() + eps), Q, back=True)
        if normalize_grads:
            N = N / (N.square().flatten(1).mean(1).sqrt() + 1e-30).view(-1, *[1] * len(shape))
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if correct_bias else lr
        ps = [params[i] for i in idx]
        torch._foreach_add_(ps, [n.reshape(p.shape).to(p.dtype) for n, p in zip(N.unbind(0), ps)],
                            alpha=-step_size)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        for a in axes:
            GG[a].lerp_(gram(G, 1 + a), 1 - beta_s)
        if axes and t % precondition_frequency == 0:
            refresh.append((GG, Q, m, v))

    if first:
        bases = by_size(initial_bases, [(GG,) for _, _, GG in first])
        for (sts, a, _), (Qa,) in zip(first, bases):
            for s, q in zip(sts, Qa.clone().unbind(0)):
                s["Q"][a] = q
    if refresh:
        for _, Q, m, _ in refresh:
            m.copy_(project(m, Q, back=True))
        jobs = [(GG[a], Q[a]) for GG, Q, _, _ in refresh for a in Q]
        results = iter(by_size(power_qr_bases, jobs))
        for _, Q, m, v in refresh:
            for a in Q:
                Q_new, order = next(results)
                Q[a].copy_(Q_new)
                v.copy_(_permute_along(v, order, 1 + a))
            m.copy_(project(m, Q, back=False))


def check_hyperparameters(lr: Any, betas: Any, shampoo_beta: Any, eps: Any, weight_decay: Any,
                          precondition_frequency: Any, max_precond_dim: Any, merge_dims: Any,
                          precondition_1d: Any, normalize_grads: Any, correct_bias: Any) -> None:
    """ValueError naming the bad value, in torch.optim's style."""
    check_number(_CLS, "learning rate", lr, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{_CLS}: betas must be a pair (beta1, beta2); got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(_CLS, f"beta parameter at index {i}", beta, 0.0, 1.0)
    if shampoo_beta is not None:
        check_number(_CLS, "shampoo_beta", shampoo_beta, 0.0, 1.0)
    check_number(_CLS, "epsilon value", eps, 0.0)
    check_number(_CLS, "weight_decay value", weight_decay, 0.0)
    check_int(_CLS, "precondition_frequency", precondition_frequency, 1)
    check_int(_CLS, "max_precond_dim", max_precond_dim, 1)
    for name, flag in (("merge_dims", merge_dims), ("precondition_1d", precondition_1d),
                       ("normalize_grads", normalize_grads), ("correct_bias", correct_bias)):
        if not isinstance(flag, bool):
            raise ValueError(f"{_CLS}: {name} must be a bool; got {flag!r}")


HYPERPARAMETERS = ("lr", "betas", "shampoo_beta", "eps", "weight_decay", "precondition_frequency", "max_precond_dim",
                   "merge_dims", "precondition_1d", "normalize_grads", "correct_bias")


class SOAP(KroneckerOptimizer):
    r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (math and sources in
    :mod:`metalcore.optim.soap`), with the refreshes of all parameters batched into one
    ``metalcore.linalg.eigh``/``qr`` call per matrix size.

    Args (the reference's names and defaults):
        params: parameters or parameter groups (any shape; conv kernels are handled per dimension,
            or merged with ``merge_dims``).
        lr: learning rate γ (default 3e-3).
        betas: (β₁, β₂) of Adam in the eigenbasis (default (0.95, 0.95)).
        shampoo_beta: EMA factor of the Gram matrices; None (default) uses β₂.
        eps: added to √v (default 1e-8).
        weight_decay: decoupled weight decay λ (default 0.01).
        precondition_frequency: refresh the bases every this many steps (default 10).
        max_precond_dim: dimensions larger than this are not preconditioned (default 10000).
        merge_dims: merge consecutive dimensions while their product is ≤ ``max_precond_dim``.
        precondition_1d: give 1-D parameters (biases, norms) a full ``n × n`` basis too.
        normalize_grads: scale each parameter's update to unit RMS.
        correct_bias: Adam's bias corrections (default True).

    The first step of each parameter computes its first bases and leaves it unchanged (as the
    reference does). State per parameter: ``'step'``, ``'exp_avg'``, ``'exp_avg_sq'``, ``'GG'``,
    ``'Q'``; ``state_dict`` save/load continues bit for bit.

    >>> opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=10)
    """

    NAME = _CLS
    HYPERPARAMETERS = HYPERPARAMETERS
    check_hyperparameters = staticmethod(check_hyperparameters)

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: Optional[float] = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False, correct_bias: bool = True):
        check_hyperparameters(lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency, max_precond_dim,
                              merge_dims, precondition_1d, normalize_grads, correct_bias)
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One SOAP step for every parameter group; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for _group, params, options in self.groups_to_step():
            soap_update(params, [p.grad for p in params], [self.state[p] for p in params], **options)
        return loss
