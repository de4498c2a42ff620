"""Drop-in twins of ``torch.linalg``: same signatures, return types, orders and conventions."""

from metalcore.linalg.cholesky import cholesky, cholesky_ex
from metalcore.linalg.cholesky_solve import cholesky_solve
from metalcore.linalg.eigh import eigh, eigvalsh
from metalcore.linalg.householder import householder_product
from metalcore.linalg.lowrank import svd_lowrank
from metalcore.linalg.lstsq import lstsq
from metalcore.linalg.pinv import pinv
from metalcore.linalg.qr import qr
from metalcore.linalg.solve import solve, solve_ex
from metalcore.linalg.svd import svd, svdvals
from metalcore.linalg.triangular import solve_triangular

__all__ = [
    "cholesky", "cholesky_ex", "cholesky_solve", "eigh", "eigvalsh", "householder_product", "lstsq", "pinv", "qr",
    "solve", "solve_ex", "solve_triangular", "svd", "svd_lowrank", "svdvals",
]
