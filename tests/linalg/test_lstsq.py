import pytest
import torch

import metalcore
from cases import DTYPES, noncontiguous, shape_id
from oracle import assert_within_torch_error

DRIVERS = ("gels", "gelsy", "gelsd", "gelss")
SHAPES = [((), 1, 1, 1), ((7,), 33, 16, 3), ((2, 3), 16, 31, 2), ((0,), 5, 3, 2), ((), 65, 65, 1), ((3,), 127, 31, 4)]


def well_conditioned(batch, m, n):
    """Random, plus a scaled identity block: square cases are not left to chance conditioning."""
    A = torch.randn(*batch, m, n, dtype=torch.float64) / max(m, n) ** 0.5
    return A + 2 * torch.eye(m, n, dtype=torch.float64)


def rank_deficient(batch, m, n, r):
    return torch.randn(*batch, m, r, dtype=torch.float64) @ torch.randn(*batch, r, n, dtype=torch.float64)


def assert_same_layout(ours, theirs):
    """Same fields filled, with the same shapes and dtypes, as torch.linalg.lstsq."""
    assert isinstance(ours, torch.return_types.linalg_lstsq)
    for name in ("solution", "residuals", "rank", "singular_values"):
        o, t = getattr(ours, name), getattr(theirs, name)
        assert o.shape == t.shape and o.dtype == t.dtype, f"{name}: {o.shape} {o.dtype} vs torch's {t.shape} {t.dtype}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("batch,m,n,k", SHAPES, ids=[shape_id(b, m, n, k) for b, m, n, k in SHAPES])
def test_lstsq_full_rank_matches_torch(batch, m, n, k, driver, dtype):
    A = well_conditioned(batch, m, n)
    B = torch.randn(*batch, m, k, dtype=torch.float64)
    expected = torch.linalg.lstsq(A, B, driver=driver)
    same_dtype = torch.linalg.lstsq(A.to(dtype), B.to(dtype), driver=driver)
    ours = metalcore.linalg.lstsq(A.to(dtype), noncontiguous(B.to(dtype)), driver=driver)
    assert_same_layout(ours, same_dtype)
    assert_within_torch_error(ours.solution, same_dtype.solution, expected.solution)
    if ours.residuals.numel():
        assert_within_torch_error(ours.residuals, same_dtype.residuals, expected.residuals)
    assert torch.equal(ours.rank, same_dtype.rank)
    if ours.singular_values.numel():
        assert_within_torch_error(ours.singular_values, same_dtype.singular_values, expected.singular_values)


@pytest.mark.parametrize("driver", DRIVERS[1:])
@pytest.mark.parametrize("m,n,r", [(9, 6, 4), (6, 9, 2), (7, 7, 6), (5, 3, 0)], ids=str)
def test_lstsq_rank_deficient_matches_torch(m, n, r, driver):
    # Batch element 1 has full rank: residuals stay empty unless every matrix has full rank.
    A = torch.stack([rank_deficient((), m, n, r), torch.randn(m, n, dtype=torch.float64)])
    B = torch.randn(2, m, 2, dtype=torch.float64)
    theirs = torch.linalg.lstsq(A, B, driver=driver)
    ours = metalcore.linalg.lstsq(A, B, driver=driver)
    assert_same_layout(ours, theirs)
    assert ours.rank.tolist() == [r, min(m, n)] == theirs.rank.tolist()
    # The minimum-norm solution is unique: compare it outright.
    torch.testing.assert_close(ours.solution, theirs.solution)
    if ours.singular_values.numel():
        torch.testing.assert_close(ours.singular_values, theirs.singular_values)


def test_lstsq_rcond_sets_the_rank():
    A = torch.randn(4, 6, 6, dtype=torch.float64)
    A[..., :, -1] = 1e-9 * torch.randn(4, 6, dtype=torch.float64)  # σ_min / σ_max ≈ 1e-10
    B = torch.randn(4, 6, 2, dtype=torch.float64)
    for rcond, rank in ((None, 6), (1e-6, 5), (-1.0, 6)):
        ours, theirs = metalcore.linalg.lstsq(A, B, rcond, driver="gelsd"), torch.linalg.lstsq(A, B, rcond, driver="gelsd")
        assert ours.rank.tolist() == theirs.rank.tolist() == [rank] * 4
        torch.testing.assert_close(ours.solution, theirs.solution)


def test_lstsq_default_driver_and_vector_rhs():
    A = well_conditioned((4,), 6, 4)
    b = torch.randn(4, 6, dtype=torch.float64)
    ours, theirs = metalcore.linalg.lstsq(A, b), torch.linalg.lstsq(A, b)
    assert_same_layout(ours, theirs)  # gelsy on the CPU: rank only
    assert ours.rank.tolist() == [4] * 4 and ours.solution.shape == (4, 4)
    torch.testing.assert_close(ours.solution, theirs.solution)
    ours, theirs = metalcore.linalg.lstsq(A[0], b[0], driver="gels"), torch.linalg.lstsq(A[0], b[0], driver="gels")
    assert_same_layout(ours, theirs)
    torch.testing.assert_close(ours.solution, theirs.solution)
    torch.testing.assert_close(ours.residuals, theirs.residuals)


# (A shape, B shape): vector right-hand sides, broadcasting, and shapes torch rejects.
SHAPE_CASES = [((5, 3), (5,)), ((4, 5, 3), (4, 5)), ((4, 1, 5, 3), (1, 2, 5, 2)), ((1, 5, 3), (4, 5, 2)),
               ((5, 3), (4, 5, 2)), ((4, 5, 3), (5,)), ((4, 5, 3), (1, 5)), ((4, 5, 3), (5, 2)), ((5, 3), (4, 2)),
               ((4, 5, 3), (2, 5, 2))]


@pytest.mark.parametrize("driver", ["gels", "gelsd"])
@pytest.mark.parametrize("a_shape,b_shape", SHAPE_CASES, ids=str)
def test_lstsq_shapes_follow_torch(a_shape, b_shape, driver):
    A = torch.randn(*a_shape, dtype=torch.float64)
    B = torch.randn(*b_shape, dtype=torch.float64)
    try:
        theirs = torch.linalg.lstsq(A, B, driver=driver)
    except RuntimeError:
        with pytest.raises(ValueError, match=r"metalcore.linalg.lstsq: .*B"):
            metalcore.linalg.lstsq(A, B, driver=driver)
        return
    ours = metalcore.linalg.lstsq(A, B, driver=driver)
    assert_same_layout(ours, theirs)
    torch.testing.assert_close(ours.solution, theirs.solution)


def test_lstsq_rejects_bad_input():
    A = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"metalcore.linalg.lstsq: driver must be one of 'gels', 'gelsy', 'gelsd', "
                                         r"'gelss'; got 'gelsx'"):
        metalcore.linalg.lstsq(A, torch.randn(5, 1, dtype=torch.float64), driver="gelsx")
    with pytest.raises(TypeError, match=r"metalcore.linalg.lstsq: expected all tensors to have the same dtype"):
        metalcore.linalg.lstsq(A, torch.randn(5, 1))
    with pytest.raises(ValueError, match=r"metalcore.linalg.lstsq: B must have 5 rows"):
        metalcore.linalg.lstsq(A, torch.randn(4, 1, dtype=torch.float64))


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_lstsq_gradcheck_and_matches_torch(m, n, driver):
    A = (torch.randn(2, m, n, dtype=torch.float64) + 2 * torch.eye(m, n, dtype=torch.float64)).requires_grad_()
    B = torch.randn(2, m, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda A, B: metalcore.linalg.lstsq(A, B, driver=driver).solution, (A, B))
    g = torch.randn(2, n, 2, dtype=torch.float64)
    ours = torch.autograd.grad(metalcore.linalg.lstsq(A, B, driver=driver).solution, (A, B), g)
    theirs = torch.autograd.grad(torch.linalg.lstsq(A, B, driver=driver).solution, (A, B), g)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("driver", ["gelsd", "gelss", "gelsy", "gels"])
@pytest.mark.parametrize("m,n", [(5, 3), (4, 4)], ids=str)
def test_lstsq_gradient_with_orthonormal_columns(m, n, driver, backend):
    """Every singular value is 1: the SVD's backward is 0/0 there, the solution is smooth."""
    A = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64)).Q.requires_grad_()
    B = torch.randn(m, 2, dtype=torch.float64, requires_grad=True)
    ours = lambda A, B: metalcore.linalg.lstsq(A, B, driver=driver).solution  # noqa: E731
    torch.autograd.gradcheck(ours, (A, B))
    g = torch.randn(n, 2, dtype=torch.float64)
    got = torch.autograd.grad(ours(A, B), (A, B), g)
    want = torch.autograd.grad(torch.linalg.lstsq(A, B, driver=driver).solution, (A, B), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("driver", ["gelsd", "gelss"])
def test_lstsq_gradient_at_repeated_singular_values(driver):
    Q1 = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    A = ((Q1 * torch.tensor([2.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ Q2.mT).requires_grad_()
    B = torch.randn(6, 3, dtype=torch.float64)
    torch.autograd.gradcheck(lambda A: metalcore.linalg.lstsq(A, B, driver=driver).solution, (A,))


def test_lstsq_too_few_dimensions_raise_torchs_runtime_error():
    for A, B in ((torch.tensor(1.0), torch.tensor(1.0)), (torch.randn(3), torch.randn(3))):
        with pytest.raises(RuntimeError, match="A must have at least 2 dimensions"):
            metalcore.linalg.lstsq(A, B)
        with pytest.raises(RuntimeError):
            torch.linalg.lstsq(A, B)
    with pytest.raises(ValueError):  # still a ValueError, metalcore's convention for a wrong rank
        metalcore.linalg.lstsq(torch.tensor(1.0), torch.tensor(1.0))
