"""The ``"metalcore"`` attention implementation for ``transformers``' ``AttentionInterface``.

``transformers`` models call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``
inside their attention layers with the queries and keys *after* RoPE and the key/value cache::

    attn_output, attn_weights = fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)

``query`` is ``(B, Hq, L, D)``, ``key``/``value`` ``(B, Hkv, S, D)`` (``Hkv`` divides ``Hq``: GQA, as
``module.num_key_value_groups``); the result is ``(B, L, Hq, Dv)`` contiguous and no weights. This
function mirrors ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` argument for
argument, with :func:`metalcore.nn.metal_scaled_dot_product_attention` as the kernel (which itself
calls torch's fused SDPA wherever metalcore's kernel is not the automatic choice: CUDA and the CPU):

* masks come from ``transformers``' ``sdpa_mask`` (registered for ``"metalcore"`` in the
  ``AttentionMaskInterface``): bool ``(B, 1, L, S)`` with True = attend, already carrying padding,
  causality and sliding windows (Mistral, Qwen2, Gemma-3 sliding layers); or ``None`` when plain
  causal attention is exact, in which case ``is_causal`` is inferred exactly as for sdpa;
* ``position_bias`` (T5-style relative bias) is folded into a float mask with ``transformers``' helper;
* ``softcap`` and ``s_aux`` (attention sinks) are refused with an error — never silently ignored
  (``patch_model`` does not select this implementation for such models);
* an input the metalcore op does not take (a dtype outside fp16/bf16/fp32/fp64, a mask dtype other
  than bool/float32/the inputs') goes to transformers' sdpa, with a warning naming the reason.

Registration is explicit (:func:`register`), done by ``patch_model`` on first use, never at import.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from metalcore._backend import requested_backend
from metalcore._validation import FLOAT_DTYPES
from metalcore.nn.attention import metal_scaled_dot_product_attention
from metalcore.patch.core import OWN_CODE_DEVICES

NAME = "metalcore"


# Devices where a patched model's attention is transformers' own sdpa under automatic selection: the
# CPU (OWN_CODE_DEVICES), and CUDA, where metalcore's attention kernel is not the automatic choice
# (0.6-0.7x torch's flash SDPA on the H100) and the public function's rewrite of a padding mask (which
# gives fully masked rows its documented zeros) measured 0.37x torch's masked SDPA at 4x32x2048x128
# bf16 (bench/results/attention-public-h100-20261206-v5.log): HF's padding rows carry no loss, so the
# model's own call is both the faster and the expected one.
TORCH_ATTENTION_DEVICES = OWN_CODE_DEVICES | {"cuda"}


def _unservable(query: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[str]:
    if query.dtype not in FLOAT_DTYPES:
        return f"dtype {query.dtype} is not served by metalcore's SDPA"
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return f"mask dtype {attention_mask.dtype} is not served by metalcore's SDPA"
    return None


def metalcore_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                position_bias: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: same arguments and result as transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward

    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"metalcore attention does not implement `{name}` ({type(module).__name__}); "
                             "use the model's eager attention")
    if query.device.type in TORCH_ATTENTION_DEVICES and requested_backend() == "auto":
        # The model's own attention where metalcore has nothing faster: on the CPU metalcore's function is
        # torch's SDPA plus a NaN guard, and on CUDA torch's SDPA behind a mask rewrite (see below), so this
        # keeps patched = unpatched.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    reason = _unservable(query, attention_mask)
    if reason is not None:
        warnings.warn(f"metalcore attention: {reason}; this call runs transformers' sdpa instead", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)

    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As sdpa: the causal flag only when there is no mask, and never for one query token (decoding).
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:
        # Prefill into an empty static cache: the keys past the queries are all masked (top-left causal).
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = metal_scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             is_causal=is_causal, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"metalcore"`` in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, metalcore_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
