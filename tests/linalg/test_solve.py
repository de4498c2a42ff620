import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, noncontiguous, shape_id
from oracle import assert_within_torch_error


def well_conditioned(batch, n, dtype=torch.float64):
    A = torch.randn(*batch, n, n, dtype=torch.float64) / n ** 0.5 + 2 * torch.eye(n, dtype=torch.float64)
    return A.to(dtype)


SOLVE_CASES = [(b, n, k) for b in BATCHES for n, k in [(1, 1), (2, 3), (31, 5), (33, 1), (65, 2)]
               if not (len(b) == 2 and n > 33)] + [((), 127, 65)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("batch,n,k", SOLVE_CASES, ids=[shape_id(b, n, k) for b, n, k in SOLVE_CASES])
def test_solve_matches_oracle(batch, n, k, left, dtype):
    A = well_conditioned(batch, n, dtype)
    B = torch.randn(*batch, *((n, k) if left else (k, n)), dtype=dtype)
    X = metalcore.linalg.solve(A, B, left=left)
    expected = torch.linalg.solve(A.double(), B.double(), left=left)
    assert X.shape == expected.shape and X.dtype == dtype
    assert_within_torch_error(X, torch.linalg.solve(A, B, left=left), expected)


# (A shape, B shape, left): vectors, batches of vectors, broadcasting, and shapes torch rejects.
SHAPE_CASES = [
    ((3, 4, 4), (4,), True), ((3, 4, 4), (3, 4), True), ((3, 4, 4), (4, 2), True), ((3, 4, 4), (2, 1, 4, 2), True),
    ((1, 4, 4), (5, 4, 2), True), ((4, 4), (4,), True), ((4, 4, 4), (4, 4), True), ((4, 4), (3, 4), False),
    ((2, 1, 4, 4), (3, 2, 4), False), ((0, 4, 4), (4,), True), ((0, 4, 4), (0, 4, 3), True),
    # rejected by torch: vector right-hand sides with left=False, mismatched sizes and batches
    ((3, 4, 4), (4,), False), ((4, 4, 4), (4, 4), False), ((4, 4), (3, 4), True), ((3, 4, 4), (2, 3, 4), True),
    ((3, 4, 4), (2, 3, 4), False), ((1, 1), (1,), False),
]


@pytest.mark.parametrize("a_shape,b_shape,left", SHAPE_CASES, ids=str)
def test_solve_shapes_follow_torch(a_shape, b_shape, left):
    A = well_conditioned(a_shape[:-2], a_shape[-1])
    B = torch.randn(*b_shape, dtype=torch.float64)
    try:
        expected = torch.linalg.solve_ex(A, B, left=left)
    except RuntimeError:
        with pytest.raises(ValueError, match=r"metalcore.linalg.solve_ex: .*B"):
            metalcore.linalg.solve_ex(A, B, left=left)
        return
    X, info = metalcore.linalg.solve_ex(A, B, left=left)
    assert X.shape == expected.result.shape and info.shape == expected.info.shape and info.dtype == torch.int32
    torch.testing.assert_close(X, expected.result)


def test_solve_noncontiguous_and_out():
    A = well_conditioned((3,), 9)
    B = torch.randn(3, 9, 4, dtype=torch.float64)
    expected = torch.linalg.solve(A, B)
    torch.testing.assert_close(metalcore.linalg.solve(noncontiguous(A), noncontiguous(B)), expected)
    out = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.solve(A, B, out=out) is out
    torch.testing.assert_close(out, expected)
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int32))
    result = metalcore.linalg.solve_ex(A, B, out=out)
    assert isinstance(result, torch.return_types.linalg_solve_ex) and result.result is out[0] and result.info is out[1]


def singular_batch():
    A = well_conditioned((5,), 6)
    A[1] = 0.0
    A[3, :, 2] = 0.0
    return A


def test_solve_ex_info_matches_torch():
    A = singular_batch()
    B = torch.randn(5, 6, 2, dtype=torch.float64)
    X, info = metalcore.linalg.solve_ex(A, B)
    assert torch.equal(info, torch.linalg.solve_ex(A, B).info)
    assert info.tolist() == [0, 1, 0, 3, 0]
    ok = info == 0
    torch.testing.assert_close(X[ok], torch.linalg.solve(A[ok], B[ok]))


def test_singular_solve_raises_naming_the_batch_element():
    A = singular_batch()
    B = torch.randn(5, 6, 2, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\): The solver failed because the input "
                                                       r"matrix is singular"):
        metalcore.linalg.solve(A, B)
    with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 1\)"):
        metalcore.linalg.solve_ex(A, B, check_errors=True)
    with pytest.raises(torch.linalg.LinAlgError, match="^linalg.solve: The solver failed"):
        metalcore.linalg.solve(A[1], B[1])


def test_solve_rejects_bad_input():
    A = well_conditioned((), 3)
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: A must be a square matrix"):
        metalcore.linalg.solve(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.solve: expected all tensors to have the same dtype"):
        metalcore.linalg.solve(A, torch.randn(3))
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: B must have at least 1 dimensions"):
        metalcore.linalg.solve(A, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"metalcore.linalg.solve: B .* only supported with left=True"):
        metalcore.linalg.solve(A, torch.randn(3, dtype=torch.float64), left=False)


@pytest.mark.parametrize("a_batch,b_shape,left", [((2,), (2, 4, 3), True), ((2,), (2, 3, 4), False),
                                                  ((2,), (4,), True), ((1,), (3, 4, 2), True),
                                                  ((3,), (1, 2, 4), False)], ids=str)
def test_solve_gradcheck_and_matches_torch(a_batch, b_shape, left):
    A = well_conditioned(a_batch, 4).requires_grad_()
    B = torch.randn(*b_shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda A, B: metalcore.linalg.solve(A, B, left=left), (A, B))
    torch.autograd.gradcheck(lambda A, B: metalcore.linalg.solve_ex(A, B, left=left).result, (A, B))
    theirs = torch.linalg.solve(A, B, left=left)
    g = torch.randn_like(theirs)
    for o, t in zip(torch.autograd.grad(metalcore.linalg.solve(A, B, left=left), (A, B), g),
                    torch.autograd.grad(theirs, (A, B), g)):
        torch.testing.assert_close(o, t)


def test_solve_compiles_without_graph_breaks():
    A = well_conditioned((3,), 8, torch.float32)
    B = torch.randn(3, 8, dtype=torch.float32)
    compiled = torch.compile(metalcore.linalg.solve, fullgraph=True)
    torch.testing.assert_close(compiled(A, B), torch.linalg.solve(A, B))
    with pytest.raises(torch.linalg.LinAlgError, match="batch element 0"):
        compiled(torch.zeros_like(A), B)
