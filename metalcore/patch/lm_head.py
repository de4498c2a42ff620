"""Causal-LM heads: in training with labels, the loss comes from metalcore's fused linear cross-entropy.

A patched causal LM (``*ForCausalLM``, ``*LMHeadModel``) keeps its class ``forward`` for everything but one case: in
training mode (``model.training``) with ``labels`` given, its instance forward runs the decoder, then
:func:`metalcore.nn.fused_linear_cross_entropy` on the last hidden states and the LM head's weight —
the ``(tokens, vocab)`` logits are never materialized — and returns the loss with ``logits=None``.
The loss is Hugging Face's ``ForCausalLMLoss`` exactly: labels shifted by one (or ``shift_labels``
when given), ``ignore_index=-100``, float32 arithmetic, the mean over counted tokens or, with
``num_items_in_batch`` (the Trainer's gradient-accumulation count), the sum divided by it; Gemma 2/3's
``final_logit_softcapping`` and Granite's ``logits_scaling`` are applied as the model would.

Everything else goes to the class forward unchanged: evaluation (``model.eval()``), ``generate``,
calls without labels, ``logits_to_keep`` other than 0, MoE models asked for router logits (their
auxiliary loss needs them), and any call with ``return_logits=True`` — the way to get the logits
of a training step (the keyword is consumed by the patched forward, never passed on). As every
swap of the patch, it runs the model's own forward on the devices of
``metalcore.patch.core.OWN_CODE_DEVICES`` (the CPU) unless a backend is asked for explicitly.

Families in :data:`metalcore.patch.FAMILIES` are patched on sight; any other causal LM only after a
probe (a 5-token batch, evaluation mode, no gradients) shows that the fused loss equals its own.
Declined, with the reason in the report (``skipped["lm_head"]``): heads that are not a plain
``nn.Linear`` (LoRA-wrapped), heads with forward hooks or their own forward (an FSDP unit,
accelerate offloading: the fused loss would bypass them), and models whose ``loss_function`` is
not ``ForCausalLMLoss``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metalcore.nn.cross_entropy import fused_linear_cross_entropy

KIND = "causal_lm_loss"  # the kind of swapped forward (metalcore.patch.core._FORWARDS)
WHAT = "fused_linear_cross_entropy"
_IGNORE_INDEX = -100  # ForCausalLMLoss's default, which the causal-LM forwards never override
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # LlamaForCausalLM, GPT2LMHeadModel, ...


@dataclasses.dataclass(frozen=True)
class _HeadSpec:
    positional: tuple[str, ...]  # the class forward's parameters after self, to read positional calls


def _softcap(config: Any) -> Optional[float]:
    return getattr(config, "final_logit_softcapping", None)


def _fused_output(model: nn.Module, call: dict[str, Any], labels: torch.Tensor) -> Any:
    """What the class forward returns, with the loss from the fused kernel and ``logits=None``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    shift_labels = call.get("shift_labels")
    outputs = getattr(model, model.base_model_prefix)(**call)
    hidden = outputs.last_hidden_state
    scaling = getattr(model.config, "logits_scaling", None)
    if scaling is not None and scaling != 1:
        hidden = hidden / scaling  # Granite divides the logits; the head is linear
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=_IGNORE_INDEX)[..., 1:]
    head = model.get_output_embeddings()
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), head.bias,
                                      ignore_index=_IGNORE_INDEX, num_items_in_batch=call.get("num_items_in_batch"),
                                      softcap=_softcap(model.config))
    moe = any(f.name == "router_logits" for f in dataclasses.fields(outputs))
    cls = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k in fields and k != "loss"})


def causal_lm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward bound on a patched causal LM (see the module docstring)."""
    return_logits = kwargs.pop("return_logits", False)
    spec: _HeadSpec = self._metalcore_spec
    call = dict(zip(spec.positional, args), **kwargs)
    labels = call.pop("labels", None)
    keep = call.pop("logits_to_keep", 0)
    router = call.get("output_router_logits", getattr(self.config, "output_router_logits", False))
    if (return_logits or not self.training or labels is None or len(args) > len(spec.positional)
            or not (isinstance(keep, int) and keep == 0) or router):
        return type(self).forward(self, *args, **kwargs)
    return_dict = call.pop("return_dict", None)
    output = _fused_output(self, call, labels)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def _decline(model: nn.Module) -> Optional[str]:
    """Why the head of this transformers model cannot be swapped (None when it can)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__}, not an nn.Linear (e.g. a LoRA-wrapped head)"
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        return ("the LM head has forward hooks or its own forward (an FSDP unit, accelerate offloading, ...), "
                "which the fused loss would bypass")
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "the model's loss_function is not transformers' ForCausalLMLoss"
    if not isinstance(getattr(model, model.base_model_prefix, None), nn.Module):
        return "no decoder under the model's base_model_prefix"
    return None


def _probe(model: nn.Module) -> bool:
    """Does the fused loss equal the model's own on a tiny batch (evaluation mode, no gradients)?"""
    weight = model.get_output_embeddings().weight
    if weight.device.type == "meta":
        return False
    ids = torch.randint(3, weight.shape[0], (1, 5), generator=torch.Generator().manual_seed(0)).to(weight.device)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ref = type(model).forward(model, input_ids=ids, labels=ids).loss
            got = _fused_output(model, {"input_ids": ids}, ids).loss
        tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        return torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode


def patch_causal_lm_head(patcher: Any, model: nn.Module, known: bool, structural: bool) -> None:
    """Bind the fused-loss forward on ``model`` (the top ``*ForCausalLM``) through ``patcher``.

    ``known``: the model type is in the table; otherwise the head is swapped only when ``structural``
    and the probe agrees. Declines are written to ``patcher.report.skipped["lm_head"]``.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not type(model).__name__.endswith(_CAUSAL_LM_SUFFIXES):
        return  # no causal-LM head: nothing to swap or report
    reason = _decline(model)
    if reason:
        patcher.report.skipped["lm_head"] = f"loss kept: {reason}"
        return
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    spec = _HeadSpec(tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD))
    if not known and not (structural and _probe(model)):
        patcher.report.skipped["lm_head"] = (f"{type(model).__name__} is not in the table and its loss did not match "
                                             "the fused loss on a probe: loss kept")
        return
    softcap = _softcap(model.config)
    patcher.bind_forward("", model, KIND, spec, WHAT + (f"(softcap={softcap:g})" if softcap else ""))
