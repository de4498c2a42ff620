"""shaders/linalg.metal through the metal backend on CPU tensors (the shader executor): batched
small-matrix Cholesky, triangular solve and LU solve in float32, judged by LAPACK's test ratios
(tests/oracle.py) over odd sizes, batch shapes and hard matrix families, with info and NaN
confinement per batch element compared with torch.

Sizes stop at METALCORE_LINALG_MAX_N (64, the largest float32 tile that leaves room in Apple's
32 KiB of threadgroup memory); beyond it, and for float64, the ops stay on the reference.
"""

import sys
from pathlib import Path

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.linalg.cholesky import cholesky_ex_op
from oracle import assert_lapack_ratio, residual_ratio

sys.path.insert(0, str(Path(__file__).parent.parent / "triton_linalg"))
from linalg_matrices import BATCHES, case_id, scale_of, spd  # noqa: E402

F32 = torch.float32
MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
SIZES = (1, 2, 3, 5, 16, 31, 33, MAX_N)
# Each size meets two batch shapes; each batch shape meets every size's neighbours.
CASES = [(BATCHES[(i + j) % 4], n) for i, n in enumerate(SIZES) for j in (0, 2)]
CASE_IDS = [case_id(b, n) for b, n in CASES]
HARD = ("ill", "cluster", "graded", "tiny", "huge")


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


# --- cholesky ---------------------------------------------------------------------------------

def _cholesky(A, upper=False):
    assert cholesky_ex_op.backend_for(A, upper, False) == "metal"
    L, info = metalcore.linalg.cholesky_ex(A, upper=upper)
    assert L.shape == A.shape and L.dtype == F32 and L.is_contiguous()
    assert info.shape == A.shape[:-2] and info.dtype == torch.int32
    return L, info


@pytest.mark.parametrize("batch,n", CASES, ids=CASE_IDS)
def test_cholesky_lapack_ratio(batch, n):
    A = spd("random", batch, n, F32)
    upper = n % 2 == 1
    L, info = _cholesky(A, upper)
    assert not info.any()
    assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    recon = L.mH @ L if upper else L @ L.mH
    assert_lapack_ratio(residual_ratio(A, recon, F32), f"cholesky {case_id(batch, n, n)}")


@pytest.mark.parametrize("kind", HARD)
def test_cholesky_hard_matrices(kind):
    A = spd(kind, (3,), 33, F32)
    L, info = _cholesky(A)
    assert not info.any()
    s = scale_of(kind, F32)
    L64 = L.double() / s ** 0.5
    assert_lapack_ratio(residual_ratio(A.double() / s, L64 @ L64.mT, F32), f"cholesky {kind}")


def test_cholesky_reads_one_triangle():
    A = spd("random", (4,), 13, F32)
    for upper in (False, True):
        nan = torch.full_like(A, float("nan"))
        garbage = A.triu() + nan.tril(-1) if upper else A.tril() + nan.triu(1)
        L, _ = _cholesky(garbage, upper)
        torch.testing.assert_close(L, torch.linalg.cholesky(A, upper=upper), rtol=1e-5, atol=1e-5)


def test_cholesky_info_and_nan_stay_in_their_batch_element():
    A = spd("random", (6,), 9, F32)
    A[1, 3, 3] = -100.0        # leading minor of order 4 is indefinite
    A[2, 5, 2] = float("nan")  # read (lower triangle): reaches the pivot of order 6
    A[4] = -A[4]               # order 1
    L, info = _cholesky(A)
    assert torch.equal(info, torch.linalg.cholesky_ex(A).info)
    assert info.tolist() == [0, 4, 6, 0, 1, 0]
    good = [0, 3, 5]
    assert L[good].isfinite().all()
    torch.testing.assert_close(L[good], torch.linalg.cholesky(A[good]), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\).*order 4"):
        metalcore.linalg.cholesky(A)


def test_cholesky_limits_route_to_the_reference():
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N + 1), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(4, dtype=torch.float64), False, False) == "reference"
    assert cholesky_ex_op.backend_for(torch.eye(MAX_N), False, False) == "metal"
