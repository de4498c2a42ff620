"""Muon for hidden matrices, AdamW for the rest, in one optimizer (the published Muon recipes).

:func:`muon_param_groups` splits a model's parameters; :class:`MuonWithAuxAdamW` steps both kinds
of group — Muon's update (:func:`metalcore.optim.muon_update`) where ``group['use_muon']`` and
MetalAdamW's fused step elsewhere — behind one ``param_groups`` list (so LR schedulers see every
group), one ``state`` and one ``state_dict()``/``load_state_dict()``.
"""

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metalcore.linalg.polar import NS_COEFFICIENTS, NS_EPS, NS_STEPS
from metalcore.optim import muon as _muon
from metalcore.optim.adamw import MetalAdamW, adamw, evaluate_closure
from metalcore.optim.adamw import check_hyperparameters as check_adamw_hyperparameters

_CLS = "MuonWithAuxAdamW"
# Parameter names that mark embeddings and output heads (GPT-2 wte/wpe, Llama embed_tokens/lm_head,
# BERT/T5 'embeddings'). A classifier's last layer named 'fc'/'head'/'classifier' is not guessed: it
# stays under Muon unless the caller moves it (names that generic also match hidden layers).
_EMBED_OR_HEAD_NAMES = ("embed", "lm_head", "wte", "wpe", "output_layer")

MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS, eps=NS_EPS, ns_steps=NS_STEPS,
                     adjust_lr_fn=None, orthogonalize="newton_schulz")
ADAMW_DEFAULTS = dict(betas=(0.9, 0.95), eps=1e-8, amsgrad=False, maximize=False)


def _embedding_and_head_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    for getter in ("get_input_embeddings", "get_output_embeddings"):  # Hugging Face models, tied or not
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if isinstance(module, nn.Module):
            ids.update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        if any(key in name.lower() for key in _EMBED_OR_HEAD_NAMES):
            ids.add(id(p))
    return ids


def muon_param_groups(model: nn.Module, *, lr: float = 0.02, adamw_lr: float = 3e-4, weight_decay: float = 0.0,
                      adamw_weight_decay: Optional[float] = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                      adamw_eps: float = 1e-8, **muon_options: Any) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters the way the Muon recipes do:

    * Muon (``use_muon=True``, ``lr``, ``weight_decay``, ``muon_options`` such as ``momentum``,
      ``orthogonalize``): hidden weights with ≥ 2 dimensions — linear layers and conv kernels
      (flattened to ``(out, -1)`` by Muon);
    * AdamW (``use_muon=False``, ``adamw_lr``, ``adamw_betas``, ``adamw_eps``,
      ``adamw_weight_decay`` defaulting to ``weight_decay``): embeddings (``nn.Embedding``, a Hugging
      Face model's input embeddings), output heads (its output embeddings, tied or untied, and
      parameters named like ``lm_head``/``embed``/``wte``/``wpe``), norms, biases and every other
      parameter with fewer than 2 dimensions. Muon's authors found orthogonalized updates wrong for
      these: an embedding row or a head's output row is a per-token vector, not a linear map to
      condition.

    Tied weights appear once (in AdamW). Empty groups are left out. Pass the result to
    :class:`MuonWithAuxAdamW`.

    >>> opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.02, adamw_lr=3e-4, weight_decay=0.01))
    """
    special = _embedding_and_head_ids(model)
    muon_params: list[Tensor] = []
    adamw_params: list[Tensor] = []
    for p in model.parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        (muon_params if p.ndim >= 2 and id(p) not in special else adamw_params).append(p)
    groups = []
    if muon_params:
        groups.append(dict(params=muon_params, use_muon=True, lr=lr, weight_decay=weight_decay, **muon_options))
    if adamw_params:
        groups.append(dict(params=adamw_params, use_muon=False, lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps,
                           weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay))
    return groups


class MuonWithAuxAdamW(Optimizer):
    """One optimizer for a whole model: Muon on groups with ``use_muon=True``, AdamW on the others.

    Each group carries its own hyperparameters: a Muon group ``lr``, ``weight_decay``,
    ``momentum``, ``nesterov``, ``ns_coefficients``, ``eps``, ``ns_steps``, ``adjust_lr_fn``,
    ``orthogonalize`` (defaults :data:`MUON_DEFAULTS`, as :class:`metalcore.optim.Muon`); an AdamW
    group ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize`` (defaults
    :data:`ADAMW_DEFAULTS`; the betas (0.9, 0.95) of the recipes). Missing ``lr``/``weight_decay``
    raise. The state is the two optimizers' own (``momentum_buffer``; ``step``/``exp_avg``/
    ``exp_avg_sq``), so one ``state_dict`` holds both and the update is exactly that of
    :class:`Muon` and :class:`MetalAdamW` on their groups. ``process_group`` as :class:`Muon`'s (DDP);
    FSDP2 (DTensor) parameters need none (:mod:`metalcore.optim.distributed`).

    >>> opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.02, adamw_lr=3e-4))
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # scales every group
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, process_group: Any = None):
        self.process_group = process_group  # as Muon's: the group plain (DDP) matrices are replicated over
        param_groups = list(param_groups)
        for g in param_groups:
            if not isinstance(g, dict) or "use_muon" not in g:
                raise ValueError(f"{_CLS}: every parameter group must be a dict with 'use_muon' (see "
                                 f"metalcore.optim.muon_param_groups); got {g!r:.200}")
        super().__init__(param_groups, dict())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("use_muon", "lr", "weight_decay"):
            if key not in param_group:
                raise ValueError(f"{_CLS}: a parameter group needs {key!r}; got keys {sorted(param_group)}")
        if param_group["use_muon"]:
            group = {**MUON_DEFAULTS, **param_group}
            _muon.check_hyperparameters(_CLS, *(group[k] for k in _muon.MUON_HYPERPARAMETERS))
        else:
            group = {**ADAMW_DEFAULTS, **param_group}
            check_adamw_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        super().add_param_group(group)
        if param_group["use_muon"]:
            for p in self.param_groups[-1]["params"]:
                _muon.check_param(_CLS, p)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
        # MetalAdamW's gathering, on this optimizer's state (it reads only self.state and the group).
        MetalAdamW._init_group(self, group, *lists)  # type: ignore[arg-type]
        if not lists[0]:
            return
        beta1, beta2 = group["betas"]
        adamw(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
              amsgrad=group["amsgrad"], maximize=group["maximize"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One step of every group: Muon where ``use_muon``, AdamW elsewhere."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            if group["use_muon"]:
                _muon.step_group(self, group)
            else:
                self._adamw_group(group)
        return loss


# The name issue 7 uses for it.
CombinedOptimizer = MuonWithAuxAdamW
