r"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"): one fused op per group.

For each parameter θ with gradient g (−g when ``maximize``), at step t (from 1), learning rate γ,
weight decay λ:

    θ ← θ·(1 − γλ)                                  decoupled decay: never enters the moments
    m ← β₁·m + (1 − β₁)·g                           first moment (``exp_avg``)
    v ← β₂·v + (1 − β₂)·g²                          second moment (``exp_avg_sq``)
    v̂ ← max(v̂, v) if ``amsgrad`` else v             (``max_exp_avg_sq``)
    θ ← θ − γ/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)

exactly torch.optim.AdamW's update, term for term (the bias corrections divide ``√v̂``, then ε is
added, as torch does), so trajectories match torch's to rounding.

The whole step of a parameter group is one registered mutating op,

* ``metalcore::adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize) -> None``

updating ``params``, the moments and ``state_steps`` in place (``grads`` are only read). A backend
kernel does it in one pass over memory per tensor (one read of θ, g, m, v; one write of θ, m, v)
where the unfused update makes about a dozen. ``state_steps`` are float32 scalar tensors on the CPU
(torch's layout when neither ``capturable`` nor ``fused``). Moments are float32 for bf16/fp16
parameters — the update is computed in float32 and θ is rounded to its dtype once per step — and
have the parameter's dtype for float32/float64 ones (torch's layout). ``max_exp_avg_sqs`` is empty
unless ``amsgrad``.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalcore._op import metalcore_op
from metalcore.optim import distributed

_CLS = "MetalAdamW"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def evaluate_closure(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """The loss from an optimizer's ``closure`` (evaluated with gradients on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a parameter's moments: float32 for bf16/fp16 parameters, else its own."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def shared_step_buffer(state_steps: list[Tensor]) -> Optional[Tensor]:
    """The 1-D CPU buffer whose elements ``state_steps`` are, in order (``state_steps[i]`` is
    ``buffer[i]``), or None when they are separate tensors."""
    base = state_steps[0]._base if state_steps else None
    if base is None or base.dim() != 1 or base.numel() != len(state_steps) or base.device.type != "cpu":
        return None
    start = base.storage_offset()
    for i, s in enumerate(state_steps):
        if s._base is not base or s.storage_offset() != start + i:
            return None
    return base


def advance_steps(state_steps: list[Tensor]) -> list[float]:
    """Add one to every step counter (float32 CPU scalars) and return the new counts as floats.

    Counters packed into one buffer (:meth:`MetalAdamW._init_group` keeps them so) take one add and
    one read for the whole group. Separate ones take an op each: torch's foreach ops have no fused
    CPU path, so ``_foreach_add_`` on 64 CPU scalars costs ~160 µs of host time, about half of a
    fused GPU step's budget."""
    buffer = shared_step_buffer(state_steps)
    if buffer is not None:
        buffer.add_(1.0)
        return buffer.tolist()
    torch._foreach_add_(state_steps, 1.0)
    return [s.item() for s in state_steps]  # CPU scalars: no device synchronisation


@metalcore_op("adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """Reference: torch's multi-tensor AdamW through ``torch._foreach_*`` ops, on float32 working
    copies of bf16/fp16 parameters that are written back rounded."""
    if not params:
        return
    if all(p.device.type == "cpu" and p.dtype == m.dtype and s.device.type == "cpu"
           for p, m, s in zip(params, exp_avgs, state_steps)):
        # Same math in torch's fused CPU kernel: 5.4x the foreach ops on 16.8M fp32 parameters.
        # It reads the step count, as torch's optimizer does, after the caller's increment.
        advance_steps(state_steps)
        torch._fused_adamw_(params, [g.to(p.dtype) for g, p in zip(grads, params)], exp_avgs, exp_avg_sqs,
                            max_exp_avg_sqs if amsgrad else [], state_steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize)
        return
    work = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]
    g = [grad.to(w.dtype) for grad, w in zip(grads, work)]  # read only: never written below
    if maximize:
        g = torch._foreach_neg(g)
    steps = advance_steps(state_steps)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1.0 - beta2)
    step_size = [-lr / (1.0 - beta1**t) for t in steps]
    bias_correction2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_size)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


@adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize):
    return None


def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """Functional AdamW: one step, in place, over parallel lists (the math is in the module docstring).

    ``params[i]`` fp32/bf16/fp16/fp64 with ``grads[i]`` of its shape; ``exp_avgs[i]``,
    ``exp_avg_sqs[i]`` (and ``max_exp_avg_sqs[i]`` when ``amsgrad``, else the list is empty) of its
    shape in :func:`state_dtype`; ``state_steps[i]`` a float32 scalar tensor counting steps taken.
    """
    n = len(params)
    lengths = dict(grads=len(grads), exp_avgs=len(exp_avgs), exp_avg_sqs=len(exp_avg_sqs), state_steps=len(state_steps),
                   max_exp_avg_sqs=len(max_exp_avg_sqs) if amsgrad else n)
    for name, length in lengths.items():
        if length != n:
            raise ValueError(f"metalcore.optim.adamw: {name} must have one entry per parameter ({n}); got {length}")
    if not amsgrad and max_exp_avg_sqs:
        raise ValueError("metalcore.optim.adamw: max_exp_avg_sqs must be empty unless amsgrad=True")
    if distributed.has_dtensor(params):
        # FSDP2 (DTensor) parameters: the update is elementwise, so it runs on the local shards.
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
            distributed.local_tensors(t) for t in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs))
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, float(lr), float(beta1),
                float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize))


# torch.optim.AdamW's switches between its own implementations. Here the step is always the fused
# op, so each must keep its default: any other value raises rather than being ignored.
_IMPLEMENTATION_DEFAULTS = dict(foreach=None, capturable=False, differentiable=False, fused=None)
_IMPLEMENTATION_WHY = dict(
    foreach="the step is always one fused op per parameter group (there is no for-loop or foreach variant to pick)",
    fused="the step is always one fused op per parameter group",
    capturable="CUDA-graph capture of the step is not supported (state steps live on the CPU)",
    differentiable="the step is not differentiable (it runs under torch.no_grad)",
)


def _check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """torch.optim.AdamW's checks: ValueError naming the bad value."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, Tensor):
            raise ValueError(f"{_CLS}: {name} must be a float, not a Tensor (tensor hyperparameters serve torch's "
                             f"capturable/fused implementations, which do not apply here); got {value!r}")
    if not 0.0 <= lr:
        raise ValueError(f"{_CLS}: Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"{_CLS}: Invalid epsilon value: {eps} (must be >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{_CLS}: betas must be a pair (beta1, beta2); got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            raise ValueError(f"{_CLS}: betas[{i}] must be a float, not a Tensor; got {beta!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{_CLS}: Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{_CLS}: Invalid weight_decay value: {weight_decay} (must be >= 0)")


def _check_implementation(options: dict[str, Any]) -> None:
    for name, default in _IMPLEMENTATION_DEFAULTS.items():
        value = options.get(name, default)
        if value is not default and value != default:
            raise ValueError(f"{_CLS}: {name}={value!r} is not supported: {_IMPLEMENTATION_WHY[name]}; "
                             f"leave {name}={default!r}")


class MetalAdamW(Optimizer):
    r"""Drop-in for ``torch.optim.AdamW``: same constructor, update, state and ``state_dict``.

    The math (module docstring) and the state layout (``'step'``, ``'exp_avg'``, ``'exp_avg_sq'``,
    ``'max_exp_avg_sq'``) are torch's; each parameter group's step is one fused op
    (:func:`adamw_step_`). Two differences, both deliberate:

    * bf16/fp16 parameters keep float32 moments and are updated in float32, then rounded once (torch
      keeps moments in the parameter's dtype). A ``state_dict`` loaded into ``torch.optim.AdamW`` is
      cast to its parameters' dtype by torch; one loaded here is brought (back) to float32.
    * ``foreach``, ``fused``, ``capturable`` and ``differentiable`` choose among torch's
      implementations and do not apply: any value but the default raises ``ValueError``. A
      ``state_dict`` from ``torch.optim.AdamW`` that recorded other values loads with them reset
      (they never change the math); ``decoupled_weight_decay`` is forced to True, as
      ``torch.optim.AdamW`` itself does.

    The learning rate and other hyperparameters are read from each group at every step, so LR
    schedulers work. Tensor ``lr``/``betas`` (which torch accepts for its capturable and fused
    paths), sparse gradients and complex parameters raise.

    >>> opt = MetalAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None):
        _check_implementation(dict(foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused))
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, **_IMPLEMENTATION_DEFAULTS, decoupled_weight_decay=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and also validates the group's own hyperparameters (torch checks only the defaults)."""
        _check_implementation(param_group)
        _check_hyperparameters(*(param_group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps", "weight_decay")))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.update(_IMPLEMENTATION_DEFAULTS)
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group["decoupled_weight_decay"] = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's (also accepts a ``torch.optim.AdamW`` state dict), keeping float32 moments for
        bf16/fp16 parameters, which torch's loader would cast to the parameter's dtype."""
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in state_dict["state"]:
                continue
            state = self.state[p]
            for key, value in state_dict["state"][saved_id].items():
                if key == "step" and isinstance(value, Tensor):
                    state[key] = value.to(device="cpu", dtype=torch.float32, copy=True)
                elif key != "step" and isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor]) -> bool:
        """Gather the group's parameters that have gradients and their state (created on first use).
        Signature and lists as torch's own optimizers, which ``torch.compile`` handles specially."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{_CLS} does not support sparse gradients (a parameter of shape "
                                   f"{tuple(p.shape)} has one); use torch.optim.SparseAdam")
            if not p.is_floating_point():
                raise TypeError(f"{_CLS}: parameters must be real floating point (fp32/bf16/fp16/fp64); "
                                f"got one of dtype {p.dtype}")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        if state_steps and not torch.compiler.is_compiling() and shared_step_buffer(state_steps) is None:
            # Pack the counters into one CPU buffer, each state["step"] a 0-d view of it (still a
            # float32 scalar tensor, as torch keeps it), so that advance_steps is one add for the
            # group. Repacked after a load_state_dict or when the set of parameters with gradients
            # changes; skipped under torch.compile, which must not see the state being rebuilt.
            buffer = torch.stack([s.detach().to("cpu", torch.float32) for s in state_steps])
            for i, p in enumerate(params):
                self.state[p]["step"] = state_steps[i] = buffer[i]
        return False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One AdamW step for every parameter group; ``closure`` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=group["lr"], beta1=beta1,
                  beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                  maximize=group["maximize"])
        return loss
