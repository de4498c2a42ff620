"""The one table of the Hugging Face patch: ``model_type → what to swap``.

A :class:`Family` names the classes of one ``transformers`` architecture whose instances
:func:`metalcore.patch_model` may swap, and the few facts that differ between architectures:

* ``norm_offset``: Gemma's RMSNorm scales by ``(1 + w)`` instead of ``w``;
* ``norm_promotes``: Llama-style norms return ``w * x̂.to(input_dtype)``, whose dtype is
  ``promote_types(w.dtype, x.dtype)`` (fp32 weights on bf16 activations give fp32); Gemma/OLMo-2
  norms cast back to the input's dtype;
* ``mlp``: ``"gated"`` (``gate_proj``/``up_proj``/``down_proj`` + ``act_fn``) or ``"fused_gated"``
  (Phi-3's ``gate_up_proj`` split in two halves + ``activation_fn``);
* ``rope``: ``"full"`` (Hugging Face's ``rotate_half`` RoPE over the whole head), ``"partial"``
  (only the first ``cos.shape[-1]`` dimensions rotate: Phi-3) or ``None`` with the reason in
  ``rope_skip`` (GLM and Helium rotate interleaved pairs, which metalcore's RoPE does not implement);
* ``attention_blocker``: a function of the config returning why metalcore's attention cannot serve
  the model (``None`` when it can), e.g. Gemma-2's logit soft-capping, which neither metalcore's
  SDPA nor torch's implements.

Adding an architecture is one line here plus a tiny-config case in ``tests/patch``. A model type
that is not in the table is patched by structure (see :mod:`metalcore.patch.core`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional


def _softcap_blocker(config: Any) -> Optional[str]:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return (f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping}) is not "
                "implemented by metalcore's SDPA (nor by torch's)")
    return None


_INTERLEAVED = "this family's RoPE rotates interleaved pairs (x[0::2], x[1::2]); metalcore's rotates halves"


@dataclass(frozen=True)
class Family:
    """What to swap in one architecture; class names are ``f"{prefix}RMSNorm"`` etc. unless given."""

    prefix: str
    norm_offset: float = 0.0
    norm_promotes: bool = True
    mlp: Literal["gated", "fused_gated"] = "gated"
    rope: Optional[Literal["full", "partial"]] = "full"
    rope_skip: Optional[str] = None
    attention_blocker: Optional[Callable[[Any], Optional[str]]] = None

    @property
    def norm_classes(self) -> tuple[str, ...]:
        return (f"{self.prefix}RMSNorm",)

    @property
    def mlp_classes(self) -> tuple[str, ...]:
        return (f"{self.prefix}MLP",)

    @property
    def attention_classes(self) -> tuple[str, ...]:
        return (f"{self.prefix}Attention",)


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "ministral": Family("Ministral"),
    "mixtral": Family("Mixtral"),          # experts are fused 3-D weights: norms, RoPE and attention only
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),              # + per-head q_norm/k_norm (Qwen3RMSNorm)
    "qwen3_moe": Family("Qwen3Moe"),       # dense Qwen3MoeMLP layers only; fused experts stay
    "gemma": Family("Gemma", norm_offset=1.0, norm_promotes=False),
    "gemma2": Family("Gemma2", norm_offset=1.0, norm_promotes=False, attention_blocker=_softcap_blocker),
    "gemma3_text": Family("Gemma3", norm_offset=1.0, norm_promotes=False, attention_blocker=_softcap_blocker),
    "phi3": Family("Phi3", mlp="fused_gated", rope="partial"),
    "glm": Family("Glm", mlp="fused_gated", rope=None, rope_skip=_INTERLEAVED),
    "olmo2": Family("Olmo2", norm_promotes=False),
    "olmo3": Family("Olmo3", norm_promotes=False),
    "granite": Family("Granite"),
    "helium": Family("Helium", norm_promotes=False, rope=None, rope_skip=_INTERLEAVED),
    "smollm3": Family("SmolLM3"),
}
