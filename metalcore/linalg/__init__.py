"""Drop-in twins of ``torch.linalg``: same signatures, return types, orders and conventions."""

from metalcore.linalg.cholesky import cholesky, cholesky_ex
from metalcore.linalg.triangular import solve_triangular

__all__ = ["cholesky", "cholesky_ex", "solve_triangular"]
