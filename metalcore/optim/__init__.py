"""Optimizers: MetalAdamW (one fused op per parameter group) and the Muon family."""

from metalcore.optim.adamw import MetalAdamW, adamw
from metalcore.optim.muon import Muon, muon_update
from metalcore.optim.muon_adamw import CombinedOptimizer, MuonWithAuxAdamW, muon_param_groups

__all__ = ["CombinedOptimizer", "MetalAdamW", "Muon", "MuonWithAuxAdamW", "adamw", "muon_param_groups", "muon_update"]
