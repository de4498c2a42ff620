"""Optimizers whose update step is one fused metalcore op per parameter group."""

from metalcore.optim.adamw import MetalAdamW, adamw

__all__ = ["MetalAdamW", "adamw"]
