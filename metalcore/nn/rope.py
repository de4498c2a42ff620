"""Rotary position embedding (RoPE) in Hugging Face's ``rotate_half`` convention.

``x_out = x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = cat(−x[..., D/2:], x[..., :D/2])``:
dimension ``i`` is paired with ``i + D/2`` (the "half-split" layout of Llama, Mistral, Qwen, Gemma in
``transformers``, not the interleaved pairs of the original RoFormer). Two registered ops:

* ``metalcore::rope_fwd(q, k, cos, sin) -> (q_out, k_out)``
* ``metalcore::rope_bwd(dq_out, dk_out, cos, sin) -> (dq, dk)``, the adjoint
  ``dx = dy·cos − rotate_half(dy·sin)``: the rotation by −θ when, as Hugging Face's rotary
  embedding builds them, the two halves of ``cos`` and ``sin`` are equal — and exact for any
  ``cos``/``sin`` otherwise.

Op layout: ``q`` is ``(B, Hq, S, D)`` and ``k`` is ``(B, Hk, S, D)`` (head counts may differ: GQA),
any strides (the ``(B, S, H, D)`` layout arrives as a transposed view); ``cos``/``sin`` are
``(B, S, D)`` or ``(1, S, D)``. Outputs are fresh with the input's memory layout (``empty_like``) and
dtype ``promote_types(x.dtype, cos.dtype)`` — the dtype Hugging Face's ``q * cos`` gives; the math
runs in float32 (float64 when that dtype is float64). ``cos`` and ``sin`` get no gradient through
the ops: when either requires one, :func:`apply_rotary_pos_emb` takes the composite path below.
"""

from typing import Optional

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

_FN = "metalcore.apply_rotary_pos_emb"


def rotate_half(x: Tensor) -> Tensor:
    """``cat(−x₂, x₁)`` over the two halves of the last dimension (Hugging Face's helper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _acc_for(out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, *, adjoint: bool) -> Tensor:
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    acc = _acc_for(out.dtype)
    xf, c, s = x.to(acc), cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    out.copy_(xf * c - rotate_half(xf * s) if adjoint else xf * c + rotate_half(xf) * s)
    return out


@metalcore_op("rope_fwd")
def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Reference forward: Hugging Face's formula, in float32 (float64)."""
    return _rotate(q, cos, sin, adjoint=False), _rotate(k, cos, sin, adjoint=False)


@rope_fwd.register_fake
def _(q, k, cos, sin):
    return (torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype)),
            torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype)))


@metalcore_op("rope_bwd")
def rope_bwd(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Reference backward: ``dx = dy·cos − rotate_half(dy·sin)`` (outputs in the incoming grads' dtypes)."""
    return _rotate(dq_out, cos, sin, adjoint=True), _rotate(dk_out, cos, sin, adjoint=True)


@rope_bwd.register_fake
def _(dq_out, dk_out, cos, sin):
    return (torch.empty_like(dq_out, dtype=torch.promote_types(dq_out.dtype, cos.dtype)),
            torch.empty_like(dk_out, dtype=torch.promote_types(dk_out.dtype, cos.dtype)))


def _setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.dtypes = (q.dtype, k.dtype)
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq_out, dk_out):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("metalcore::rope_fwd does not differentiate cos and sin; "
                           "metalcore.apply_rotary_pos_emb does (through its composite path)")
    cos, sin = ctx.saved_tensors
    dq, dk = rope_bwd(dq_out, dk_out, cos, sin)
    # A bf16 q with float32 cos/sin gives a float32 q_out: its gradient returns to q's dtype.
    return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), None, None


rope_fwd.register_autograd(_backward, setup_context=_setup)


def _rope_composite(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The same math from differentiable torch ops, so that gradients also reach ``cos`` and ``sin``."""
    out = []
    for x in (q, k):
        out_dtype = torch.promote_types(x.dtype, cos.dtype)
        acc = _acc_for(out_dtype)
        xf, c, s = x.to(acc), cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
        out.append((xf * c + rotate_half(xf) * s).to(out_dtype))
    return out[0], out[1]


def _rope_torch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`apply_rotary_pos_emb` by the composite, in either layout."""
    if unsqueeze_dim in (1, -3):
        return _rope_composite(q, k, cos, sin)
    q_out, k_out = _rope_composite(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


@rope_fwd.torch_route(_rope_torch)
def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                         unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``, same arguments, layout and result, fused.

    ``q``: ``(B, Hq, S, D)`` and ``k``: ``(B, Hk, S, D)`` with ``unsqueeze_dim=1`` (the default), or
    ``(B, S, Hq, D)`` / ``(B, S, Hk, D)`` with ``unsqueeze_dim=2``; ``Hq`` and ``Hk`` may differ (GQA)
    and ``D`` must be even. ``cos``, ``sin``: ``(B, S, D)`` or ``(1, S, D)``, as the model's rotary
    embedding returns them (``emb = cat(freqs, freqs)``), same dtype. Returns ``(q_embed, k_embed)``
    in ``q``'s layout with dtype ``promote_types(q.dtype, cos.dtype)``, exactly as Hugging Face's
    ``q * cos + rotate_half(q) * sin`` does (but computed in float32 and rounded once).

    ``position_ids`` is accepted and ignored, as in ``transformers`` (where it is deprecated and
    unused: ``cos`` and ``sin`` are already gathered at the positions).

    Gradients reach ``q`` and ``k`` through the fused backward. When ``cos`` or ``sin`` requires a
    gradient (learned or differentiated frequencies — Hugging Face's rotary embedding never does),
    the same math runs as a composite of differentiable torch ops instead, so that no gradient is
    dropped.

    >>> cos, sin = model.model.rotary_emb(hidden, position_ids)
    >>> q, k = metalcore.apply_rotary_pos_emb(q, k, cos, sin)
    """
    del position_ids  # deprecated and unused in transformers; kept for call compatibility
    q = check_tensor(_FN, "q", q, dtypes=FLOAT_DTYPES)
    k = check_tensor(_FN, "k", k, dtypes=FLOAT_DTYPES)
    cos = check_tensor(_FN, "cos", cos, dtypes=FLOAT_DTYPES)
    sin = check_tensor(_FN, "sin", sin, dtypes=FLOAT_DTYPES)
    check_same_device(_FN, q=q, k=k, cos=cos, sin=sin)
    check_same_dtype(_FN, q=q, k=k)
    check_same_dtype(_FN, cos=cos, sin=sin)
    if unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"{_FN}: unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 (q, k as (B, S, H, D)); "
                         f"got {unsqueeze_dim!r}")
    heads_dim = 1 if unsqueeze_dim in (1, -3) else 2
    layout = "(B, H, S, D)" if heads_dim == 1 else "(B, S, H, D)"
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4:
            raise ValueError(f"{_FN}: {name} must be 4-D {layout} for unsqueeze_dim={unsqueeze_dim}; "
                             f"got shape {tuple(x.shape)}")
    if cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"{_FN}: cos and sin must both have shape (B, S, D) or (1, S, D); got cos "
                         f"{tuple(cos.shape)} and sin {tuple(sin.shape)}")
    # The ops take heads-first (B, H, S, D): the seq-first layout is passed as a transposed view.
    qh, kh = (q, k) if heads_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    B, _, S, D = qh.shape
    if kh.shape[0] != B or kh.shape[2:] != qh.shape[2:]:
        raise ValueError(f"{_FN}: q and k must agree on batch, sequence and head_dim (they may differ in "
                         f"heads); got q {tuple(q.shape)} and k {tuple(k.shape)} as {layout}")
    if D % 2:
        raise ValueError(f"{_FN}: head_dim must be even (rotate_half pairs dimension i with i + D/2); got {D}")
    if cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        raise ValueError(f"{_FN}: cos and sin must have shape ({B}, {S}, {D}) or (1, {S}, {D}) to match q "
                         f"{tuple(q.shape)} as {layout}; got {tuple(cos.shape)}")

    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        # The composite is differentiable in cos and sin; the ops are not.
        return _rope_torch(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    plan = rope_fwd.plan(qh, kh, cos, sin)
    if plan.prefers_torch:
        # Hugging Face's own composite, where the fused kernel is not the measured winner.
        return apply_rotary_pos_emb.by_torch(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q_out, k_out = rope_fwd.call_planned(plan, qh, kh, cos, sin)
    return (q_out, k_out) if heads_dim == 1 else (q_out.transpose(1, 2), k_out.transpose(1, 2))
