import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, orthogonality_ratio, residual_ratio
from metalcore.linalg.qr import qr_batched


def matrix_shapes(n):
    """Square, tall and wide shapes with largest side n."""
    return [(n, n)] if n == 1 else [(n, n), (n, (n + 1) // 2), ((n + 1) // 2, n)]


# Batches of 2x3 skip the largest sizes: the small sizes already cover the batch logic.
CASES = [(b, mn) for b in BATCHES for n in SIZES for mn in matrix_shapes(n) if not (len(b) == 2 and n > 33)]
CASE_IDS = [shape_id(b, *mn) for b, mn in CASES]


def check_qr(A, Q, R, mode, dtype, what):
    *batch, m, n = A.shape
    k = min(m, n)
    q_cols = m if mode == "complete" else k
    assert Q.shape == (*batch, m, q_cols) and R.shape == (*batch, q_cols, n)
    assert Q.dtype == R.dtype == dtype
    assert torch.equal(R, R.triu()), "R must be exactly upper triangular"
    assert_lapack_ratio(residual_ratio(A, Q @ R, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,mn", CASES, ids=CASE_IDS)
def test_qr_lapack_ratios(batch, mn, dtype):
    A = torch.randn(*batch, *mn, dtype=dtype)
    Q, R = metalcore.linalg.qr(A)
    check_qr(A, Q, R, "reduced", dtype, f"qr {shape_id(batch, *mn)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(33, 16), (16, 33), (31, 31), (65, 1)], ids=str)
def test_qr_complete_and_r_modes(m, n, dtype):
    A = torch.randn(7, m, n, dtype=dtype)
    Q, R = metalcore.linalg.qr(A, mode="complete")
    check_qr(A, Q, R, "complete", dtype, "qr complete")
    Q, R = metalcore.linalg.qr(A, mode="r")
    assert Q.shape == (0,) and R.shape == (7, min(m, n), n)
    assert torch.equal(R, R.triu())
    # R alone is judged by RᴴR = AᴴA (its rows' signs are free): the LAPACK ratio of that product.
    assert_lapack_ratio(residual_ratio(A.mH @ A, R.mH @ R, dtype), "qr mode='r'")


def test_qr_noncontiguous_out_and_return_type():
    A = torch.randn(3, 9, 6, dtype=torch.float64)
    result = metalcore.linalg.qr(noncontiguous(A))
    assert isinstance(result, torch.return_types.linalg_qr)
    check_qr(A, result.Q, result.R, "reduced", torch.float64, "noncontiguous")
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    result = metalcore.linalg.qr(A, out=out)
    assert isinstance(result, torch.return_types.linalg_qr) and result.Q is out[0] and result.R is out[1]
    check_qr(A, *out, "reduced", torch.float64, "out")


def test_qr_batched_is_qr():
    assert qr_batched is metalcore.linalg.qr
    A = torch.randn(500, 16, 16, dtype=torch.float32)
    Q, R = qr_batched(A)
    check_qr(A, Q, R, "reduced", torch.float32, "qr_batched")


def test_qr_rejects_bad_input():
    A = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"metalcore.linalg.qr: mode must be one of 'reduced', 'complete', 'r'; got 'full'"):
        metalcore.linalg.qr(A, mode="full")
    with pytest.raises(TypeError, match=r"metalcore.linalg.qr: A must have dtype"):
        metalcore.linalg.qr(A.to(torch.complex128))
    with pytest.raises(ValueError, match=r"metalcore.linalg.qr: A must be a matrix"):
        metalcore.linalg.qr(torch.randn(3, dtype=torch.float64))


def well_conditioned(batch, m, n):
    """Random columns plus a scaled identity block: R's diagonal stays far from zero."""
    return torch.randn(*batch, m, n, dtype=torch.float64) + 3 * torch.eye(m, n, dtype=torch.float64)


@pytest.mark.parametrize("mode,m,n", [("reduced", 5, 3), ("reduced", 3, 5), ("reduced", 4, 4), ("reduced", 1, 3),
                                      ("complete", 3, 5), ("complete", 4, 4)], ids=str)
def test_qr_gradcheck_and_matches_torch(mode, m, n):
    A = well_conditioned((2,), m, n).requires_grad_()
    torch.autograd.gradcheck(lambda X: metalcore.linalg.qr(X, mode=mode), (A,))
    ours = metalcore.linalg.qr(A, mode=mode)
    theirs = torch.linalg.qr(A, mode=mode)
    grads = [torch.randn_like(t) for t in theirs]
    torch.testing.assert_close(torch.autograd.grad(ours, A, grads)[0], torch.autograd.grad(theirs, A, grads)[0])
    g_ours, = torch.autograd.grad(metalcore.linalg.qr(A, mode=mode).R, A, grads[1])
    g_theirs, = torch.autograd.grad(torch.linalg.qr(A, mode=mode).R, A, grads[1])
    torch.testing.assert_close(g_ours, g_theirs)


def test_qr_backward_errors_like_torch():
    A = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="mode='r'"):
        metalcore.linalg.qr(A, mode="r").R.sum().backward()
    with pytest.raises(RuntimeError, match="mode='complete' and nrows > ncols"):
        metalcore.linalg.qr(A, mode="complete").Q.sum().backward()


def test_qr_compiles_without_graph_breaks():
    A = torch.randn(3, 9, 5, dtype=torch.float32)
    compiled = torch.compile(metalcore.linalg.qr, fullgraph=True)
    Q, R = compiled(A)
    check_qr(A, Q, R, "reduced", torch.float32, "compiled qr")
