r"""Muon (Jordan et al., https://kellerjordan.github.io/posts/muon/): momentum, then orthogonalize.

For each matrix parameter θ (conv kernels ``(out, in, kh, kw)`` are viewed as ``(out, in·kh·kw)``)
with gradient g, learning rate γ, weight decay λ, momentum μ:

    B ← μ B + (1 − μ) g                      (``momentum_buffer``; torch's lerp form)
    B̃ ← (1 − μ) g + μ B if nesterov else B
    O ← polar(B̃)                             Newton–Schulz, Polar Express or the exact SVD factor
    θ ← θ (1 − γλ)                            decoupled weight decay
    θ ← θ − γ·adjust(A, B) · O                adjust: √max(1, A/B) ('original'), 0.2·√max(A, B)
                                              ('match_rms_adamw', Moonshot), for θ of shape (A, B)

exactly torch.optim.Muon's update, term for term, so with ``orthogonalize='newton_schulz'`` the
trajectories match torch's to bf16 rounding. Unlike torch, which runs one iteration per parameter,
:func:`muon_update` stacks the parameters of one shape and orthogonalizes them in one batched
``polar`` call (one launch of batched matmuls instead of one per matrix).
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalcore.linalg.polar import NS_COEFFICIENTS, NS_EPS, NS_STEPS, newton_schulz, polar, polar_express
from metalcore.optim import distributed
from metalcore.optim.adamw import evaluate_closure

_CLS = "Muon"
ORTHOGONALIZE = ("newton_schulz", "polar_express", "svd")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def as_matrix(x: Tensor) -> Tensor:
    """The 2-D view Muon orthogonalizes: ``(out, in·kh·kw…)`` for conv weights (the published
    recipes' flattening: rows are output channels), the tensor itself when 2-D."""
    return x if x.ndim == 2 else x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 is ambiguous with 0 rows


def adjust_lr(lr: float, adjust_lr_fn: Optional[str], shape: tuple[int, int]) -> float:
    """torch.optim.Muon's learning-rate scaling for an update of 2-D ``shape`` (A, B)."""
    A, B = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, A / B))
    return lr * 0.2 * math.sqrt(max(A, B))


def orthogonalize_batch(M: Tensor, *, method: str, ns_coefficients: tuple[float, float, float], ns_steps: int,
                        eps: float) -> Tensor:
    """Orthogonalize a stack ``(k, A, B)`` of updates in one call; returns ``M``'s shape, ``M``'s dtype
    for 'svd' (computed in float32 at least) and bf16 for the iterations (as torch's Muon)."""
    if method == "newton_schulz":
        return newton_schulz(M, coefficients=ns_coefficients, steps=ns_steps, eps=eps)
    if method == "polar_express":
        return polar_express(M, steps=ns_steps, eps=eps)
    work = M if M.dtype == torch.float64 else M.float()
    O = polar(work, method="svd")
    # The polar factor of a zero matrix is undefined (the SVD returns arbitrary vectors): a zero update
    # must stay zero, as it does under Newton–Schulz.
    nonzero = work.flatten(-2).abs().amax(-1) > 0
    return O * nonzero[..., None, None].to(O.dtype)


@torch.no_grad()
def muon_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                weight_decay: float, momentum: float, nesterov: bool,
                ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS,
                ns_steps: int = NS_STEPS, adjust_lr_fn: Optional[str] = None,
                orthogonalize: str = "newton_schulz") -> None:
    """Functional Muon: one step, in place, over parallel lists (math in the module docstring).

    ``params[i]`` of ndim ≥ 2 (flattened by :func:`as_matrix`), ``grads[i]`` and
    ``momentum_buffers[i]`` of its shape. Updates of the same 2-D shape are orthogonalized together:
    stacked ``(k, A, B)``, one :func:`polar`-family call, unstacked.
    """
    check_update_inputs(params, grads, momentum_buffers)
    by_shape: dict[tuple[tuple[int, int], torch.dtype, torch.device], list[int]] = {}
    updates: list[Tensor] = []
    for i, (g, buf) in enumerate(zip(grads, momentum_buffers)):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        update = as_matrix(update)
        updates.append(update)
        by_shape.setdefault((tuple(update.shape), update.dtype, update.device), []).append(i)
    for (shape, _, _), idx in by_shape.items():
        if 0 in shape:
            continue  # nothing to orthogonalize or update (torch.optim.Muon steps such a parameter as a no-op)
        O = orthogonalize_batch(torch.stack([updates[i] for i in idx]), method=orthogonalize,
                                ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps)
        step = adjust_lr(lr, adjust_lr_fn, shape)
        for i, o in zip(idx, O.unbind(0)):
            p = params[i]
            p.mul_(1 - lr * weight_decay)
            p.add_(o.view(p.shape), alpha=-step)


def check_update_inputs(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor]) -> None:
    """Everything :func:`muon_update` needs of its lists, checked before any of them is written, so
    that a bad entry (a momentum buffer of another shape from a stale checkpoint, say) raises with
    the whole step undone rather than after earlier shape groups were updated."""
    if not (len(params) == len(grads) == len(momentum_buffers)):
        raise ValueError(f"metalcore.optim.muon_update: params, grads and momentum_buffers must have equal lengths; "
                         f"got {len(params)}, {len(grads)}, {len(momentum_buffers)}")
    for i, (p, g, buf) in enumerate(zip(params, grads, momentum_buffers)):
        if p.ndim < 2:
            raise ValueError(f"metalcore.optim.muon_update: params[{i}] must have at least 2 dimensions; "
                             f"got shape {tuple(p.shape)}")
        for name, t in (("grads", g), ("momentum_buffers", buf)):
            if t.shape != p.shape:
                raise RuntimeError(f"metalcore.optim.muon_update: size mismatch: {name}[{i}] has shape "
                                   f"{tuple(t.shape)}, params[{i}] has shape {tuple(p.shape)}")
            if t.device != p.device:
                raise RuntimeError(f"metalcore.optim.muon_update: {name}[{i}] is on {t.device}, params[{i}] on "
                                   f"{p.device}")
        if not (p.is_floating_point() and g.is_floating_point()):
            raise TypeError(f"metalcore.optim.muon_update: params[{i}] and grads[{i}] must be real floating point; "
                            f"got {p.dtype} and {g.dtype}")
        if buf.dtype != g.dtype:
            raise TypeError(f"metalcore.optim.muon_update: momentum_buffers[{i}] must have the dtype of grads[{i}] "
                            f"({g.dtype}); got {buf.dtype}")


def check_hyperparameters(cls: str, lr: Any, weight_decay: Any, momentum: Any, ns_coefficients: Any, eps: Any,
                          ns_steps: Any, adjust_lr_fn: Any, orthogonalize: Any) -> None:
    """torch.optim.Muon's checks (its messages, prefixed by the class), made at construction — torch
    makes the ns_steps and coefficient checks only at the first step — plus ``orthogonalize``."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{cls}: Tensor lr must be 1-element; got shape {tuple(lr.shape)}")
    if not 0.0 <= lr:
        raise ValueError(f"{cls}: Learning rate should be >= 0 but is: {lr}")
    if not 0.0 <= momentum:
        raise ValueError(f"{cls}: momentum should be >= 0 but is: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{cls}: weight decay should be >= 0 but is: {weight_decay}")
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"{cls}: Adjust learning rate function {adjust_lr_fn} is not supported "
                         f"(use 'original' or 'match_rms_adamw')")
    if not 0.0 <= eps:
        raise ValueError(f"{cls}: eps should be >= 0 but is: {eps}")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ValueError(f"{cls}: ns_steps must be an integer in [1, 100) (fewer than 100 for computational "
                         f"efficiency); got {ns_steps!r}")
    if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3:
        raise ValueError(f"{cls}: Coefficients must be a tuple of exactly 3 values; got {ns_coefficients!r}")
    if orthogonalize not in ORTHOGONALIZE:
        raise ValueError(f"{cls}: orthogonalize must be one of {', '.join(map(repr, ORTHOGONALIZE))}; "
                         f"got {orthogonalize!r}")
    if orthogonalize == "polar_express" and ns_steps > 5:
        raise ValueError(f"{cls}: ns_steps must be at most 5 with orthogonalize='polar_express' (the published "
                         f"schedule has 5 steps); got {ns_steps}")


def check_param(cls: str, p: Tensor) -> None:
    if p.ndim < 2:
        raise ValueError(f"{cls} only supports parameters with at least 2 dimensions (matrices; conv weights are "
                         f"flattened to (out, -1)) whereas we found a parameter with size: {p.size()}; "
                         f"optimize it with AdamW (see metalcore.optim.muon_param_groups)")
    distributed.check_placements(cls, p)


def init_group(optimizer: Optimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
               momentum_buffers: list[Tensor]) -> None:
    """Gather a Muon group's parameters with gradients and their ``momentum_buffer`` (torch's layout)."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if torch.is_complex(p):
            raise RuntimeError(f"{_CLS} does not support complex parameters")
        if p.grad.is_sparse:
            raise RuntimeError(f"{_CLS} does not support sparse gradients")
        state = optimizer.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        params.append(p)
        grads.append(p.grad)
        momentum_buffers.append(state["momentum_buffer"])


def step_group(optimizer: Optimizer, group: dict[str, Any]) -> None:
    params: list[Tensor] = []
    grads: list[Tensor] = []
    bufs: list[Tensor] = []
    init_group(optimizer, group, params, grads, bufs)
    if not params:
        return
    lr = group["lr"]
    options = dict(lr=float(lr), weight_decay=group["weight_decay"], momentum=group["momentum"],
                   nesterov=group["nesterov"], ns_coefficients=tuple(group["ns_coefficients"]), eps=group["eps"],
                   ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"], orthogonalize=group["orthogonalize"])
    process_group = getattr(optimizer, "process_group", None)
    if process_group is not None or distributed.has_dtensor(params):
        # Sharded (FSDP2) or replicated (DDP) matrices: owner-computes over the group (distributed.py).
        distributed.owner_computes_muon_update(params, grads, bufs, process_group=process_group,
                                               cls=type(optimizer).__name__, **options)
    else:
        muon_update(params, grads, bufs, **options)


MUON_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn",
                        "orthogonalize")


class Muon(Optimizer):
    r"""Drop-in for ``torch.optim.Muon``: same constructor, update, validation and state
    (``'momentum_buffer'``), so ``state_dict``\ s interchange both ways; plus ``orthogonalize``.

    Args beyond torch's:
        orthogonalize: ``'newton_schulz'`` (default: torch's iteration, ``ns_coefficients`` and
            ``ns_steps`` apply), ``'polar_express'`` (Polar Express's per-step coefficients;
            ``ns_steps`` ≤ 5 of them are used, ``ns_coefficients`` does not apply) or ``'svd'`` (the
            exact polar factor U Vᵀ through metalcore's SVD in float32: the SVD-based orthogonalizing
            optimizer; neither ns argument applies).
        process_group: the ``torch.distributed`` group over which plain parameters are replicated
            (DDP): each matrix is then orthogonalized by one owner rank and the result shared. FSDP2
            (DTensor) parameters need nothing: their mesh's group is used. Either way the update is
            the single-process one (:mod:`metalcore.optim.distributed`).

    Differences from torch, deliberate:

    * Parameters with more than 2 dimensions (conv kernels) are accepted and orthogonalized as
      ``(out, in·kh·kw)`` matrices, the published recipes' choice (torch raises); the LR adjustment
      uses that 2-D shape. 0-D/1-D parameters raise ``ValueError``: give them to AdamW
      (:func:`metalcore.optim.muon_param_groups`, :class:`metalcore.optim.MuonWithAuxAdamW`).
    * ``ns_steps`` (1 ≤ ns_steps < 100) and ``ns_coefficients`` (3 values) are checked at
      construction and in ``add_param_group``, not at the first step.
    * Same-shape parameters of a group are orthogonalized in one batched call (:func:`muon_update`).

    >>> opt = Muon(hidden_matrices, lr=0.02, momentum=0.95, orthogonalize="polar_express")
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: Optional[str] = None, *,
                 orthogonalize: str = "newton_schulz", process_group: Any = None):
        check_hyperparameters(_CLS, lr, weight_decay, momentum, ns_coefficients, eps, ns_steps, adjust_lr_fn,
                              orthogonalize)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        orthogonalize=orthogonalize)
        self.process_group = process_group
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and also validates the group's own hyperparameters and parameter shapes."""
        check_hyperparameters(_CLS, *(param_group.get(k, self.defaults.get(k)) for k in MUON_HYPERPARAMETERS))
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            check_param(_CLS, p)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("orthogonalize", "newton_schulz")  # a torch.optim.Muon state_dict lacks it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's; also accepts a ``torch.optim.Muon`` state dict (whose groups lack
        ``orthogonalize``: they keep this optimizer's)."""
        state_dict = dict(state_dict, param_groups=[
            {"orthogonalize": mine["orthogonalize"], **saved}
            for mine, saved in zip(self.param_groups, state_dict["param_groups"])])
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One Muon step for every parameter group; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            step_group(self, group)
        return loss
