"""Optimizers: MetalAdamW (one fused op per parameter group), the Muon family, and the second-order
SOAP and Shampoo (their preconditioner refreshes batched into one linalg call per matrix size)."""

from metalcore.optim.adamw import MetalAdamW, adamw
from metalcore.optim.muon import Muon, muon_update
from metalcore.optim.muon_adamw import CombinedOptimizer, MuonWithAuxAdamW, muon_param_groups
from metalcore.optim.shampoo import Shampoo, shampoo_update
from metalcore.optim.soap import SOAP, soap_update

__all__ = ["CombinedOptimizer", "MetalAdamW", "Muon", "MuonWithAuxAdamW", "adamw", "muon_param_groups", "muon_update",
           "SOAP", "Shampoo", "shampoo_update", "soap_update"]
