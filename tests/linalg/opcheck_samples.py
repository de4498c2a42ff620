"""Sample arguments for ``torch.library.opcheck`` on every registered linalg op.

``SAMPLES[name]`` lists zero-argument functions, each returning one args tuple for
``opcheck(registered_ops()[name].custom_op, args)``: float64, odd sizes, batch dimensions, and inputs
requiring grad wherever the op is differentiable for those arguments (opcheck then runs the backward
under AOTAutograd too). Ops whose backward raises by design for some arguments (``qr`` with
``mode='r'``, ``svd``/``eigh`` without vectors, ``geqr2``) get those samples without grad.
"""

from collections.abc import Callable

import torch

_F64 = torch.float64


def _randn(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=_F64, requires_grad=grad)


def _spd(*batch: int, n: int, grad: bool = False) -> torch.Tensor:
    X = torch.randn(*batch, n, n, dtype=_F64)
    return (X @ X.mT + n * torch.eye(n, dtype=_F64)).requires_grad_(grad)


def _well_conditioned(*batch: int, n: int, grad: bool = False) -> torch.Tensor:
    A = torch.randn(*batch, n, n, dtype=_F64) / n ** 0.5 + 2 * torch.eye(n, dtype=_F64)
    return A.requires_grad_(grad)


def _triangular(*batch: int, n: int, upper: bool, grad: bool = False) -> torch.Tensor:
    A = _well_conditioned(*batch, n=n)
    return (A.triu() if upper else A.tril()).requires_grad_(grad)


def _reflectors(*batch: int, m: int, k: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    QR, tau = torch.geqrf(torch.randn(*batch, m, k, dtype=_F64))
    return QR.requires_grad_(grad), tau.requires_grad_(grad)


def _larfb_sample(left: bool, transpose: bool) -> tuple:
    V, tau = _reflectors(2, m=7, k=3)
    T = torch.randn(2, 3, 3, dtype=_F64).triu().requires_grad_()
    C = _randn(2, *((7, 5) if left else (5, 7)), grad=True)
    return V.requires_grad_(), T, C, left, transpose


SAMPLES: dict[str, list[Callable[[], tuple]]] = {
    "cholesky_ex": [
        lambda: (_spd(3, n=5, grad=True), False, False),
        lambda: (_spd(2, 1, n=7, grad=True), True, True),
    ],
    "cholesky_solve": [
        lambda: (_randn(3, 5, 2, grad=True), torch.linalg.cholesky(_spd(3, n=5)).requires_grad_(), False),
        lambda: (_randn(2, 7, 3, grad=True), torch.linalg.cholesky(_spd(2, n=7), upper=True).requires_grad_(), True),
    ],
    "solve_triangular": [
        lambda: (_triangular(2, n=5, upper=True, grad=True), _randn(2, 5, 3, grad=True), True, True, False),
        lambda: (_triangular(3, n=7, upper=False, grad=True), _randn(3, 2, 7, grad=True), False, False, True),
    ],
    "svd": [
        lambda: (_randn(3, 7, 5, grad=True), False, True),
        lambda: (_randn(2, 5, 9, grad=True), True, True),
        lambda: (_randn(2, 7, 7), False, False),
    ],
    "qr": [
        lambda: (_randn(3, 7, 5, grad=True), "reduced"),
        lambda: (_randn(2, 5, 9, grad=True), "complete"),
        lambda: (_randn(2, 9, 5), "complete"),
        lambda: (_randn(2, 9, 5), "r"),
    ],
    "eigh": [
        lambda: (_randn(3, 7, 7, grad=True), "L", True),
        lambda: (_randn(2, 5, 5, grad=True), "U", True),
        lambda: (_randn(2, 5, 5), "L", False),
    ],
    "solve_ex": [
        lambda: (_well_conditioned(3, n=5, grad=True), _randn(3, 5, 2, grad=True), True, False),
        lambda: (_well_conditioned(2, 1, n=7, grad=True), _randn(3, 3, 7, grad=True), False, True),
        lambda: (_well_conditioned(3, n=5, grad=True), _randn(5, 1, grad=True), True, True),
    ],
    "geqr2": [
        lambda: (_randn(3, 7, 5),),
        lambda: (_randn(2, 5, 9),),
    ],
    "larft": [
        lambda: _reflectors(3, m=7, k=5, grad=True),
        lambda: _reflectors(2, m=5, k=5, grad=True),
    ],
    "larfb": [
        lambda: _larfb_sample(True, False),
        lambda: _larfb_sample(False, True),
    ],
    "householder_product": [
        lambda: _reflectors(3, m=7, k=5, grad=True),
        lambda: (_randn(2, 9, 5, grad=True), torch.rand(2, 3, dtype=_F64, requires_grad=True)),
    ],
    "gram_poly": [
        lambda: (_randn(3, 5, 7, grad=True), -4.775, 2.0315),
        lambda: (_randn(2, 7, 4, grad=True), 0.5, -1.0),
    ],
}
