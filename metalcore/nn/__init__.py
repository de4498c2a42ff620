"""Training ops: fused modules and their functional forms."""

from metalcore.nn.activations import MetalGELU, MetalSiLU, metal_gelu, metal_silu
from metalcore.nn.attention import metal_scaled_dot_product_attention
from metalcore.nn.cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from metalcore.nn.rms_norm import MetalRMSNorm, fused_add_rms_norm, rms_norm
from metalcore.nn.rope import apply_rotary_pos_emb
from metalcore.nn.swiglu import MetalSwiGLUMLP, swiglu, swiglu_linear

__all__ = [
    "FusedLinearCrossEntropyLoss", "MetalGELU", "MetalRMSNorm", "MetalSiLU", "MetalSwiGLUMLP", "apply_rotary_pos_emb",
    "fused_add_rms_norm", "fused_linear_cross_entropy", "metal_gelu", "metal_scaled_dot_product_attention",
    "metal_silu", "rms_norm", "swiglu", "swiglu_linear",
]
