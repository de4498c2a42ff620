"""``out=`` of every ``metalcore.linalg`` twin accepts and refuses the dtypes torch does: the result's
dtype for torch's native functions, any safe cast for its composite ones (pinv, householder_product,
cholesky_solve)."""

import pytest
import torch

import metalcore


def _arguments():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64)
    spd = A @ A.mT + 3 * torch.eye(3, dtype=torch.float64)
    L = torch.linalg.cholesky(spd)
    B = torch.randn(3, 2, dtype=torch.float64)
    QR, tau = torch.geqrf(A)
    return {"cholesky": (spd,), "cholesky_ex": (spd,), "cholesky_solve": (B, L), "eigh": (spd,),
            "eigvalsh": (spd,), "householder_product": (QR, tau), "pinv": (A,), "qr": (A,), "solve": (spd, B),
            "solve_ex": (spd, B), "solve_triangular": (L, B), "svd": (A,), "svdvals": (A,)}


ARGUMENTS = _arguments()


def _outs(name, dtype):
    n = {"cholesky_ex": 2, "eigh": 2, "qr": 2, "solve_ex": 2, "svd": 3}.get(name, 1)
    outs = [torch.empty(0, dtype=dtype) for _ in range(n)]
    if name.endswith("_ex"):
        outs[1] = torch.empty(0, dtype=torch.int32)  # info
    return outs[0] if n == 1 else tuple(outs)


def _outcome(fn, name, dtype):
    kwargs = {"upper": False} if name == "solve_triangular" else {}
    try:
        fn(*ARGUMENTS[name], out=_outs(name, dtype), **kwargs)
    except RuntimeError:
        return "raises"
    return "accepts"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64], ids=str)
@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_out_dtype_accepted_or_refused_like_torch(name, dtype):
    theirs = getattr(torch.linalg, name, None) or getattr(torch, name)
    assert _outcome(getattr(metalcore.linalg, name), name, dtype) == _outcome(theirs, name, dtype)
