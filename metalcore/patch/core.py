"""``patch_model`` / ``unpatch_model``: swap metalcore's kernels into a Hugging Face model, per instance.

Nothing global changes: ``transformers``' classes and modeling modules are left as they are, so an
unpatched model in the same process behaves exactly as before. Each swap is one of

* **a forward bound on the instance** (``module.forward``, a :class:`_Forward`): RMSNorm modules
  (:func:`metalcore.nn.rms_norm`, Gemma's ``(1 + w)`` as ``offset=1``), SiLU-gated MLPs (the fused
  :func:`metalcore.nn.swiglu`), stand-alone GELU/SiLU activation modules (:func:`metalcore.nn.metal_gelu`,
  :func:`metalcore.nn.metal_silu`) and attention layers for RoPE (below). Parameters, buffers, module
  types, ``state_dict`` keys and hooks are untouched, so optimizers, PEFT/LoRA wrappers and
  checkpoints see the same model. On a device where metalcore has nothing faster than the module's
  own code (the CPU, measured: see ``OWN_CODE_DEVICES``) the bound forward calls the module's own
  forward, decided per call from the input's device. The parents of swapped norms (decoder layers)
  get their own forward run inside saved-tensor hooks that recompute the norms' outputs in the
  backward instead of keeping them (:mod:`metalcore.patch.recompute`);
* **the model's attention implementation** set to the registered ``"metalcore"`` function
  (:mod:`metalcore.patch.attention`) with ``model.set_attn_implementation``.

RoPE. Attention layers call the *module-level* ``apply_rotary_pos_emb`` of their modeling file, so
the function cannot be swapped per instance by assignment. Instead the layer's class ``forward`` is
cloned — same code object, same closures and decorators (``deprecate_kwarg``) — with a copy of its
globals in which only ``apply_rotary_pos_emb`` is metalcore's, and the clone is bound on the
instance. The modeling module's namespace is untouched; the copy has no ``__name__``, which makes
``torch.compile`` resolve the clone's globals from the copy itself rather than by re-importing the
modeling module (where it would find the original function). Every family's ``apply_rotary_pos_emb`` is first run against metalcore's on a small probe
(full-width and partial-rotary ``cos``), so an interleaved RoPE (Cohere) or a changed formula is
reported and skipped, never swapped.

Patch state lives with the module it patches, never in closures: a swapped forward is a
:class:`_Forward` (the module, the kind of swap and its spec, the instance attribute it replaced),
rebuilt from that recipe when the model is deep-copied or pickled; a replaced child keeps the module it
replaced; the report (on the model) keeps the attention implementation to restore. So
``copy.deepcopy(model)`` (reference and EMA copies) gives an independently patched copy, and
``torch.save(model)`` works. Undo walks the model for that state and restores every instance attribute
and the attention implementation, so outputs afterwards are bit-identical to the unpatched model. Patching an already patched model with the same options
returns the existing report (no double wrapping); with other options it undoes and patches again.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from metalcore._backend import requested_backend
from metalcore.nn.activations import metal_gelu, metal_silu
from metalcore.nn.rms_norm import rms_norm
from metalcore.nn.rope import apply_rotary_pos_emb as _metal_rope
from metalcore.nn.swiglu import swiglu, swiglu_linear
from metalcore.patch.families import FAMILIES, Family, _softcap_blocker
from metalcore.patch import lm_head, recompute

_REPORT_ATTR = "_metalcore_patch_report"
_SPEC_ATTR = "_metalcore_spec"


# --------------------------------------------------------------------------------------------- report

@dataclass
class PatchReport:
    """What :func:`patch_model` did to one model; :meth:`undo` reverts all of it.

    ``swapped``: module path → the swaps applied there (``"rms_norm"``, ``"rms_norm(offset=1)"``,
    ``"swiglu_mlp"``, ``"gelu(tanh)"``, ``"rope"``, ``"rope(partial)"``, ...); the path ``""`` is the
    model itself (``"attention: sdpa -> metalcore"``). ``skipped``: module path or feature → why.
    """

    model_type: Optional[str]
    options: dict[str, bool]
    swapped: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    attn_implementation: Optional[tuple[Optional[str], str]] = None  # (before, after) when switched
    active: bool = True
    _owner: Any = field(default=None, repr=False)  # the patched model (a deep copy's report: the copy)

    def counts(self) -> Counter:
        """How many swaps of each kind, e.g. ``Counter({'rms_norm': 9, 'rope': 4, ...})``."""
        return Counter(what.split("(")[0].split(":")[0] for whats in self.swapped.values() for what in whats)

    def undo(self) -> None:
        """Restore the model exactly as it was before :func:`patch_model` (idempotent)."""
        owner = self._owner
        if self.active and owner is not None:
            _restore(owner)
            if self.attn_implementation is not None:
                owner.set_attn_implementation(self.attn_implementation[0])
            if owner.__dict__.get(_REPORT_ATTR) is self:
                del owner.__dict__[_REPORT_ATTR]
        self.active = False

    def _add(self, path: str, what: str) -> None:
        self.swapped.setdefault(path, []).append(what)

    def __str__(self) -> str:
        state = "active" if self.active else "undone"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items())) or "nothing"
        lines = [f"metalcore patch of {self.model_type or 'an unknown model type'} ({state}): {counts}"]
        if self.attn_implementation:
            lines.append(f"  attention implementation: {self.attn_implementation[0]} -> {self.attn_implementation[1]}")
        for device in sorted(OWN_CODE_DEVICES):
            lines.append(f"  on {device}: swapped modules run their own forward and attention runs transformers' "
                         "sdpa (metalcore measured slower there)")
        reasons = Counter(self.skipped.values())
        for reason, n in reasons.most_common():
            where = [p for p, r in self.skipped.items() if r == reason]
            lines.append(f"  skipped {n}x ({where[0]}{', ...' if n > 1 else ''}): {reason}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- swapped forwards

@dataclass(frozen=True)
class _NormSpec:
    eps_attr: str
    offset: float
    promotes: bool


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float], spec: _NormSpec) -> torch.Tensor:
    y = rms_norm(x, weight.shape, weight, eps, offset=spec.offset)
    if spec.promotes and weight.dtype != x.dtype:
        # Llama-style norms return ``w * x̂.to(x.dtype)``: fp32 weights on bf16 activations give fp32.
        y = y.to(torch.promote_types(weight.dtype, x.dtype))
    return y


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    spec: _NormSpec = self._metalcore_spec
    eps = getattr(self, spec.eps_attr)
    y = _rms_norm(hidden_states, self.weight, eps, spec)
    recompute.register(y, _rms_norm, hidden_states, self.weight, eps, spec)
    return y


def _down_of_swiglu(down: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``down(swiglu(gate, up))``; a plain, unhooked ``nn.Linear`` goes through ``swiglu_linear``, which
    recomputes the product in the backward instead of keeping it (one ``(tokens, intermediate)``
    activation less per layer)."""
    if type(down) is nn.Linear and "forward" not in down.__dict__ and not (down._forward_hooks or
                                                                           down._forward_pre_hooks):
        return swiglu_linear(gate, up, down.weight, down.bias)
    return down(swiglu(gate, up))


def _swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _down_of_swiglu(self.down_proj, self.gate_proj(x), self.up_proj(x))


def _fused_swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return _down_of_swiglu(self.down_proj, gate, up)


def _gelu_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return metal_gelu(input, self._metalcore_spec)


def _silu_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return metal_silu(input)


def _rope(q, k, cos, sin, unsqueeze_dim=1, *, partial: bool = False, cast: bool = False):
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` on metalcore's fused RoPE.

    ``partial`` (Phi-3): only the first ``cos.shape[-1]`` dimensions of each head rotate. ``cast``
    (OLMo-2/3, whose rotary embedding hands out fp32 ``cos``/``sin``): the results are cast back to
    ``q``'s and ``k``'s dtypes instead of being promoted.
    """
    d = cos.shape[-1]
    if partial and d != q.shape[-1]:
        q_rot, k_rot = _metal_rope(q[..., :d], k[..., :d], cos, sin, unsqueeze_dim=unsqueeze_dim)
        q_out, k_out = torch.cat([q_rot, q[..., d:]], dim=-1), torch.cat([k_rot, k[..., d:]], dim=-1)
    else:
        q_out, k_out = _metal_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if cast:
        q_out, k_out = q_out.to(q.dtype), k_out.to(k.dtype)
    return q_out, k_out


@functools.cache
def _rope_forward(cls: type, variant: str, cast: bool) -> Callable:
    """``cls.forward`` cloned with metalcore's RoPE as its ``apply_rotary_pos_emb`` (one clone per class)."""
    adapter = functools.partial(_rope, partial=variant == "partial", cast=cast)
    return _with_global(cls.forward, "apply_rotary_pos_emb", adapter)


def _norm_recompute_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own forward, with the outputs of its swapped norms recomputed in the backward
    (:mod:`metalcore.patch.recompute`)."""
    return recompute.run(_swapped_forward(self).own, *args, **kwargs)


_FORWARDS: dict[str, Callable[[Any], Callable]] = {
    "rms_norm": lambda spec: _rms_norm_forward,
    "norm_recompute": lambda spec: _norm_recompute_forward,
    "swiglu_mlp": lambda spec: _swiglu_mlp_forward,
    "fused_swiglu_mlp": lambda spec: _fused_swiglu_mlp_forward,
    "rope": lambda spec: _rope_forward(*spec),
    "gelu": lambda spec: _gelu_forward,
    "silu": lambda spec: _silu_forward,
    lm_head.KIND: lambda spec: lm_head.causal_lm_forward,
}

# Devices on which a swapped module runs its own forward (and attention transformers' own sdpa): on
# the CPU metalcore's path is its reference
# (plain torch ops behind a dispatch layer), and every swap measured slower than Hugging Face's eager
# module there (fwd+bwd, 1024 tokens, hidden 256 / intermediate 688, fp32, one thread, best of 41:
# SwiGLU 0.64x, RoPE 0.70x, SiLU 0.79x, GELU-tanh 0.88x, RMSNorm 0.93x; bench/training.md v4). The
# choice is made per call from the input's device, so a model patched on the CPU and moved to a GPU
# afterwards runs metalcore's kernels there; an explicit ``use_backend``/``METALCORE_BACKEND`` runs
# metalcore's ops on every device (tests, debugging).
OWN_CODE_DEVICES = frozenset({"cpu"})


class _Forward:
    """A swapped forward bound on one module instance, as ``module.forward`` (or accelerate's
    ``module._old_forward``). It holds its recipe — the kind of swap, its spec and the attribute it
    replaced — and is rebuilt from it when deep-copied or pickled (the RoPE forward is a clone of the
    class's forward, which pickle could not find by name), bound to the copy of the module."""

    def __init__(self, module: nn.Module, kind: str, spec: Any, slot: str = "forward", previous: Any = None):
        self.module, self.kind, self.spec, self.slot, self.previous = module, kind, spec, slot, previous
        self.fn = _FORWARDS[kind](spec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if (isinstance(first, torch.Tensor) and first.device.type in OWN_CODE_DEVICES
                and requested_backend() == "auto"):
            return self.own(*args, **kwargs)
        return self.fn(self.module, *args, **kwargs)

    def own(self, *args: Any, **kwargs: Any) -> Any:
        """The forward this one replaced: the instance's previous one (accelerate's), else the class's."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The replaced forward's signature: callers read it (``transformers.Trainer`` keeps only the
        dataset columns the model's forward names, and dropped every one for ``(*args, **kwargs)``)."""
        original = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
        return inspect.signature(original)

    def __reduce__(self) -> tuple:
        return _Forward, (self.module, self.kind, self.spec, self.slot, self.previous)

    def __repr__(self) -> str:
        return f"<metalcore {self.kind} forward of {type(self.module).__name__}>"


def _swapped_forward(module: nn.Module) -> _Forward:
    """The :class:`_Forward` bound on ``module`` (as its ``forward`` or accelerate's ``_old_forward``)."""
    swapped = module.__dict__.get("_old_forward")
    return swapped if isinstance(swapped, _Forward) else module.__dict__["forward"]


def _restore(root: nn.Module) -> None:
    """Undo every swap recorded on ``root``'s modules (see :class:`_Forward`)."""
    for module in list(root.modules()):
        for slot in ("forward", "_old_forward"):
            swapped = module.__dict__.get(slot)
            if isinstance(swapped, _Forward):
                if swapped.previous is None:
                    del module.__dict__[slot]
                else:
                    module.__dict__[slot] = swapped.previous
                module.__dict__.pop(_SPEC_ATTR, None)


# ------------------------------------------------------------------------------------ recognisers

def _silu_like(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _gelu_approximation(act: Any) -> Optional[str]:
    """``approximate`` of a transformers/torch GELU activation module, or None if it is not one."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return act.approximate
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return "tanh"
    if name == "GELUActivation":
        return "none"
    return None


def _eps_attr(module: nn.Module) -> Optional[str]:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, "missing")
        if value is None or isinstance(value, float):
            return attr
    return None


def _rms_like(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 1 and getattr(module, "bias", None) is None
            and _eps_attr(module) is not None and not list(module.children()))


@functools.cache
def _rope_variant(fn: Callable) -> Optional[tuple[str, bool]]:
    """``(variant, cast)`` such that ``_rope(partial=variant == "partial", cast=cast)`` reproduces ``fn``
    (a family's ``apply_rotary_pos_emb``) on a probe, or None (interleaved pairs, another formula)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    freqs = torch.randn(1, 5, 4, generator=g)
    for variant, half in (("partial", 2), ("full", 4)):
        emb = torch.cat([freqs[..., :half]] * 2, dim=-1)
        cos, sin = emb.cos(), emb.sin()
        try:
            ref = fn(q, k, cos, sin)
            cast = fn(q.bfloat16(), k.bfloat16(), cos, sin)[0].dtype == torch.bfloat16
        except RuntimeError:
            continue
        got = _rope(q, k, cos, sin, partial=variant == "partial")
        if all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ref, got)):
            return variant, cast
    return None


def _with_global(fn: Callable, name: str, value: Any) -> Callable:
    """A clone of ``fn`` in which the global ``name`` is ``value``; decorators (``__wrapped__`` chains
    whose closures hold the inner function) are cloned around the new inner function."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if name not in fn.__code__.co_names:
            raise LookupError(f"{fn.__qualname__} does not call {name}")
        namespace = dict(fn.__globals__)
        namespace[name] = value
        # Without ``__name__``, torch.compile reads globals from this very dict (it otherwise re-imports
        # the module by name and would see the original ``name``: measured, dynamo then traced HF's RoPE).
        del namespace["__name__"]
        clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _with_global(inner, name, value)
        cells = fn.__closure__ or ()
        held = [i for i, c in enumerate(cells) if _cell(c) is inner]
        if not held:
            raise LookupError(f"cannot see through the decorator of {fn.__qualname__}")
        closure = tuple(types.CellType(new_inner) if i in held else c for i, c in enumerate(cells))
        clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        clone.__wrapped__ = new_inner
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__, clone.__doc__, clone.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    clone.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "__wrapped__"})
    return clone


def _cell(c: types.CellType) -> Any:
    try:
        return c.cell_contents
    except ValueError:
        return None


def _rope_function(cls: type) -> Optional[Callable]:
    """The module-level ``apply_rotary_pos_emb`` that ``cls.forward`` calls, if any."""
    fn = inspect.unwrap(cls.forward)
    if "apply_rotary_pos_emb" not in getattr(getattr(fn, "__code__", None), "co_names", ()):
        return None
    return fn.__globals__.get("apply_rotary_pos_emb")


def _probe(module: nn.Module, candidate: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           rtol: float, atol: float) -> bool:
    """Does ``candidate`` reproduce the module's current forward on ``x`` (eval mode, no grad)?"""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            ref, got = module(x), candidate(x)
        return ref.shape == got.shape and torch.allclose(ref.float(), got.float(), rtol=rtol, atol=atol)
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode


# ----------------------------------------------------------------------------------------- patching

class _Patcher:
    def __init__(self, root: nn.Module, report: PatchReport):
        self.root, self.report = root, report

    def bind_forward(self, path: str, module: nn.Module, kind: str, spec: Any, what: str) -> None:
        """Bind the ``kind`` forward as ``module``'s forward (under an accelerate hook: as its ``_old_forward``)."""
        if _SPEC_ATTR in module.__dict__:
            self.report.skipped[path] = f"already patched ({module.__dict__[_SPEC_ATTR]!r})"
            return
        slot = "forward"
        if "forward" in module.__dict__:
            if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
                slot = "_old_forward"  # accelerate's hooked forward calls module._old_forward
            else:
                self.report.skipped[path] = "the instance already has its own forward (another patch or hook)"
                return
        module.__dict__[slot] = _Forward(module, kind, spec, slot, module.__dict__.get(slot))
        module.__dict__[_SPEC_ATTR] = spec
        self.report._add(path, what)

    # ---- one function per kind of swap

    def rms_norm(self, path: str, module: nn.Module, family: Optional[Family]) -> None:
        eps_attr = _eps_attr(module)
        if eps_attr is None or getattr(module, "weight", None) is None:
            self.report.skipped[path] = "RMSNorm without a weight or eps/variance_epsilon attribute"
            return
        if family is not None:
            spec = _NormSpec(eps_attr, family.norm_offset, family.norm_promotes)
        else:
            spec = self._probe_norm(path, module, eps_attr)
            if spec is None:
                return
        what = "rms_norm" + (f"(offset={spec.offset:g})" if spec.offset else "")
        self.bind_forward(path, module, "rms_norm", spec, what)

    def _probe_norm(self, path: str, module: nn.Module, eps_attr: str) -> Optional[_NormSpec]:
        if module.weight.device.type == "meta":
            self.report.skipped[path] = "RMSNorm-like module on the meta device (cannot verify its formula)"
            return None
        # Rows from tiny to large magnitudes (and one with a large mean), so that a norm which clamps
        # its input or its rms, or floors the rms instead of adding eps, differs on some row:
        # ordinary activations alone (|x| < 10) pass such a norm as an RMSNorm.
        n = module.weight.shape[0]
        scales = torch.tensor([1e-6, 1e-3, 1.0, 3.0, 1e3, 1e6], device=module.weight.device)[:, None]
        x = torch.randn(len(scales), n, device=module.weight.device) * scales
        x = torch.cat([x, torch.randn(1, n, device=x.device) + 1e4])
        for offset in (0.0, 1.0):
            spec = _NormSpec(eps_attr, offset, True)
            probe = types.SimpleNamespace(weight=module.weight, _metalcore_spec=spec,
                                          **{eps_attr: getattr(module, eps_attr)})
            if _probe(module, lambda t: _rms_norm_forward(probe, t), x, rtol=1e-4, atol=1e-5):
                return spec
        self.report.skipped[path] = (f"{type(module).__name__} looks like an RMSNorm (weight + {eps_attr}) but "
                                     "does not compute x/rms(x)·w nor x/rms(x)·(1+w)")
        return None

    def norm_recompute(self) -> None:
        """Bind the recomputing forward on every module that holds a swapped RMSNorm as a direct child
        (the decoder layers, whose projections save the norms' outputs; the backbone, for its final
        norm). A module whose forward is already swapped (Qwen3's attention, for its q/k norms) keeps
        only that swap: the outputs of its norms are then registered with the layer around it."""
        parents = {path.rpartition(".")[0] for path, whats in self.report.swapped.items()
                   if any(what.startswith("rms_norm") for what in whats)}
        for path in sorted(parents):
            module = self.root.get_submodule(path)
            if _SPEC_ATTR not in module.__dict__:
                self.bind_forward(path, module, "norm_recompute", None, "norm_recompute")

    def gated_mlp(self, path: str, module: nn.Module, fused: bool, verify: bool) -> bool:
        """SiLU-gated MLP → fused SwiGLU forward. False (nothing done) when the activation is not SiLU."""
        act = getattr(module, "activation_fn" if fused else "act_fn", None)
        if not _silu_like(act):
            return False
        fn = _fused_swiglu_mlp_forward if fused else _swiglu_mlp_forward
        if verify:
            weight = next(module.parameters(), None)
            ok = weight is not None and weight.device.type != "meta" and _probe(
                module, lambda t: fn(module, t),
                torch.randn(3, module.down_proj.out_features, device=weight.device, dtype=weight.dtype),
                rtol=2e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-4, atol=1e-4)
            if not ok:
                self.report.skipped[path] = (f"{type(module).__name__} has gate/up/down projections and SiLU but "
                                             "does not compute down(silu(gate(x))·up(x))")
                return True
        kind = "fused_swiglu_mlp" if fused else "swiglu_mlp"
        self.bind_forward(path, module, kind, kind, kind)
        return True

    def rope(self, path: str, module: nn.Module, expected: Optional[str]) -> None:
        cls = type(module)
        fn = _rope_function(cls)
        if fn is None:
            if expected is not None:
                self.report.skipped[path] = f"{cls.__name__}.forward does not call apply_rotary_pos_emb"
            return
        found = _rope_variant(fn)
        if found is None or (expected is not None and found[0] != expected):
            self.report.skipped[path] = (f"{fn.__module__}.apply_rotary_pos_emb is not the rotate_half RoPE "
                                         f"metalcore implements (probe: {found[0] if found else 'no match'})")
            return
        variant, cast = found
        try:
            _rope_forward(cls, variant, cast)
        except LookupError as e:
            self.report.skipped[path] = f"RoPE: {e}"
            return
        self.bind_forward(path, module, "rope", (cls, variant, cast), "rope" if variant == "full" else "rope(partial)")

    def activation(self, path: str, act: nn.Module) -> None:
        if _silu_like(act):
            self.bind_forward(path, act, "silu", None, "silu")
            return
        approximate = _gelu_approximation(act)
        if approximate is not None:
            self.bind_forward(path, act, "gelu", approximate, f"gelu({approximate})")


def _families_of(model: nn.Module) -> list[Family]:
    """The table entries of the model's config and its sub-configs (Gemma-3's text_config, ...)."""
    config = getattr(model, "config", None)
    found, stack, seen = [], [config], set()
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        fam = FAMILIES.get(getattr(cfg, "model_type", None))
        if fam is not None:
            found.append(fam)
        stack.extend(getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}) or {})
    return found


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper or a ``torch.compile`` wrapper."""
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def patch_model(model: nn.Module, *, rms_norm: bool = True, activations: bool = True, rope: bool = True,
                attention: bool = True, cross_entropy: bool = True, structural: bool = True,
                recompute_norms: bool = True) -> PatchReport:
    """Swap metalcore's kernels into ``model`` (a ``transformers`` model, a PEFT-wrapped one, or any
    ``nn.Module``), in place and per instance; returns a :class:`PatchReport`.

    * ``rms_norm``: RMSNorm modules → :func:`metalcore.nn.rms_norm` (fp32 statistics, as HF);
    * ``activations``: SiLU-gated MLPs → fused :func:`metalcore.nn.swiglu`; other GELU/SiLU
      activation modules → :func:`metalcore.nn.metal_gelu`/:func:`metalcore.nn.metal_silu`;
    * ``rope``: attention layers → :func:`metalcore.nn.apply_rotary_pos_emb` (see module docstring);
    * ``attention``: ``model.set_attn_implementation("metalcore")`` (masks, GQA, sliding windows);
    * ``cross_entropy``: a causal LM's training loss (``model.train()``, labels given) from
      :func:`metalcore.nn.fused_linear_cross_entropy`, with no logits returned unless the call passes
      ``return_logits=True`` (:mod:`metalcore.patch.lm_head`);
    * ``structural``: for modules that no table entry names (unknown model types), recognise
      RMSNorm-like modules, gate/up/down SiLU MLPs and RoPE attention by structure, and swap each only
      after a probe shows metalcore computes the same thing; everything declined is in ``skipped``;
    * ``recompute_norms`` (with ``rms_norm``): in training, the output of each swapped RMSNorm is not
      kept for the backward by the projections it feeds but recomputed there from the norm's own
      saved input (:mod:`metalcore.patch.recompute`): 2 × hidden × element size less per token and
      decoder layer, bit-identical gradients, one extra norm pass per norm in the backward. The
      swapped module is the norm's parent (``"norm_recompute"`` in the report).

    Call it before ``torch.compile``; whether the optimizer is built before or after does not matter
    (parameters are never replaced). ``metalcore.unpatch_model(model)`` or ``report.undo()`` reverts
    it. On the CPU the swapped modules run their own forward and attention runs transformers' sdpa
    (metalcore has nothing faster there, measured); the report says so.

    >>> report = metalcore.patch_model(model)
    >>> print(report)          # metalcore patch of llama (active): attention: 1, rms_norm: 9, rope: 4, ...
    """
    options = dict(rms_norm=rms_norm, activations=activations, rope=rope, attention=attention,
                   cross_entropy=cross_entropy, structural=structural, recompute_norms=recompute_norms)
    base = _base_model(model)
    existing = base.__dict__.get(_REPORT_ATTR)
    if existing is not None:
        if existing.options == options:
            return existing
        existing.undo()

    families = _families_of(base)
    config = getattr(base, "config", None)
    report = PatchReport(model_type=getattr(config, "model_type", None), options=options, _owner=base)
    if config is not None and not families:
        report.skipped["model_type"] = (f"{report.model_type!r} is not in metalcore's table "
                                        "(metalcore.patch.FAMILIES): patched by structure only")
    norms = {c: f for f in families for c in f.norm_classes}
    mlps = {c: f for f in families for c in f.mlp_classes}
    attns = {c: f for f in families for c in f.attention_classes}
    patcher = _Patcher(base, report)
    try:
        for path, module in list(base.named_modules()):
            name = type(module).__name__
            if rms_norm and name in norms:
                patcher.rms_norm(path, module, norms[name])
            elif rms_norm and structural and "norm" in name.lower() and _rms_like(module):
                patcher.rms_norm(path, module, None)
            swiglu_done = False
            if activations and name in mlps:
                swiglu_done = patcher.gated_mlp(path, module, mlps[name].mlp == "fused_gated", verify=False)
            elif activations and structural and all(
                    isinstance(getattr(module, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj")):
                swiglu_done = patcher.gated_mlp(path, module, fused=False, verify=True)
            if activations and not swiglu_done:
                for child_name, child in list(module.named_children()):
                    patcher.activation(f"{path}.{child_name}" if path else child_name, child)
            if rope and name in attns:
                if attns[name].rope is None:
                    report.skipped[path] = f"RoPE: {attns[name].rope_skip}"
                else:
                    patcher.rope(path, module, attns[name].rope)
            elif rope and structural and "attention" in name.lower():
                patcher.rope(path, module, None)
        if cross_entropy:
            lm_head.patch_causal_lm_head(patcher, base, known=bool(families), structural=structural)
        if recompute_norms:
            patcher.norm_recompute()
        if attention:
            _switch_attention(base, families, report)
    except BaseException:
        report.undo()
        raise
    base.__dict__[_REPORT_ATTR] = report
    return report


def _switch_attention(base: nn.Module, families: list[Family], report: PatchReport) -> None:
    from transformers import PreTrainedModel

    from metalcore.patch import attention as metal_attention

    if not isinstance(base, PreTrainedModel):
        report.skipped["attention"] = "not a transformers PreTrainedModel (no AttentionInterface to plug into)"
        return
    blockers = [b for f in families if f.attention_blocker for b in [f.attention_blocker(base.config)] if b]
    blockers += [b for b in [_softcap_blocker(base.config)] if b and not families]
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in base.modules()):
        blockers.append("attention sinks (s_aux) are not implemented by metalcore's SDPA")
    if blockers:
        report.skipped["attention"] = f"{blockers[0]}; kept {base.config._attn_implementation!r}"
        return
    before = base.config._attn_implementation
    metal_attention.register()
    try:
        base.set_attn_implementation(metal_attention.NAME)
    except (ValueError, KeyError, ImportError) as e:
        report.skipped["attention"] = f"transformers refused the metalcore implementation: {e}"
        return
    if base.config._attn_implementation != metal_attention.NAME:
        report.skipped["attention"] = (f"{type(base).__name__} does not support setting its attention implementation "
                                       f"(kept {before!r})")
        return
    report.attn_implementation = (before, metal_attention.NAME)
    report._add("", f"attention: {before} -> {metal_attention.NAME}")


def unpatch_model(model: nn.Module) -> Optional[PatchReport]:
    """Revert :func:`patch_model` on ``model``; returns the undone report (None if it was not patched)."""
    report = _base_model(model).__dict__.get(_REPORT_ATTR)
    if report is not None:
        report.undo()
    return report


def patch_report(model: nn.Module) -> Optional[PatchReport]:
    """The active report of a patched model, or None."""
    return _base_model(model).__dict__.get(_REPORT_ATTR)
