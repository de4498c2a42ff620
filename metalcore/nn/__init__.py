"""Training ops: fused modules and their functional forms."""

from metalcore.nn.rms_norm import MetalRMSNorm, fused_add_rms_norm, rms_norm

__all__ = ["MetalRMSNorm", "fused_add_rms_norm", "rms_norm"]
