"""Checks against the float64 oracle: elementwise closeness, the 2×-torch rule, LAPACK ratios."""

import torch

from tolerances import ABS_FLOOR, LAPACK_RATIO_MAX, TOL, TORCH_ERROR_FACTOR


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def float64(x):
    """``x`` for the float64 oracle: floating tensors (also inside lists and tuples) in float64, the
    rest unchanged."""
    if isinstance(x, torch.Tensor):
        return x.detach().double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(float64(v) for v in x)
    return x


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``actual`` (computed in ``dtype``) matches the float64 oracle within ``TOL[dtype]``."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected64.double(), **TOL[dtype])


def assert_within_torch_error(actual: torch.Tensor, torch_same_dtype: torch.Tensor,
                              expected64: torch.Tensor) -> None:
    """Our error against the oracle is at most TORCH_ERROR_FACTOR × torch's own error in that dtype."""
    ours = (actual.double() - expected64).abs().max().item() if actual.numel() else 0.0
    theirs = (torch_same_dtype.double() - expected64).abs().max().item() if actual.numel() else 0.0
    bound = TORCH_ERROR_FACTOR * theirs + ABS_FLOOR[actual.dtype] * max(1.0, expected64.abs().max().item()
                                                                         if expected64.numel() else 1.0)
    assert ours <= bound, f"error {ours:.3e} exceeds {TORCH_ERROR_FACTOR}x torch's {theirs:.3e} (bound {bound:.3e})"


def _outputs(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def assert_like_torch(actual, torch_fn, *args, **kwargs) -> None:
    """The 2×-torch rule against ``torch_fn``: run on ``args`` as given (torch in the same dtype) and on
    ``args`` in float64 (the oracle); ``actual`` may be a tuple of outputs."""
    theirs, expected = torch_fn(*args, **kwargs), torch_fn(*float64(args), **kwargs)
    for a, t, e in zip(_outputs(actual), _outputs(theirs), _outputs(expected), strict=True):
        assert_within_torch_error(a, t, e)


def vjp(fn):
    """``(*inputs, dy) -> (dinput, ...)``: the vector-Jacobian product of ``fn`` at fresh leaves (to judge
    gradients with :func:`assert_like_torch`)."""
    def grads(*args):
        *inputs, dy = args
        leaves = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad(fn(*leaves), leaves, dy)
    return grads


def _fro(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x.double(), ord="fro")


def residual_ratio(A: torch.Tensor, reconstruction: torch.Tensor, dtype: torch.dtype) -> float:
    """LAPACK's ‖A − recon‖_F / (‖A‖_F · max(m, n) · ε), worst over the batch."""
    if A.numel() == 0:
        return 0.0
    n = max(A.shape[-1], A.shape[-2])
    num = _fro(A.double() - reconstruction.double())
    den = _fro(A).clamp_min(torch.finfo(torch.float64).tiny) * n * eps(dtype)
    return (num / den).max().item()


def orthogonality_ratio(Q: torch.Tensor, dtype: torch.dtype, *, rows: bool = False) -> float:
    """LAPACK's ‖QᴴQ − I‖_F / (k · ε) for the k columns of Q (rows of Q when ``rows``)."""
    if Q.numel() == 0:
        return 0.0
    Q = Q.double()
    G = Q @ Q.mH if rows else Q.mH @ Q
    k = G.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=Q.device)
    return (_fro(G - eye) / (max(k, 1) * eps(dtype))).max().item()


def values_ratio(values: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> float:
    """Eigen- or singular values against float64, in units of LAPACK's ``n · ε · max|λ|`` per matrix
    (the bound a backward-stable decomposition meets, Weyl), worst over the batch."""
    if values.numel() == 0:
        return 0.0
    expected64 = expected64.double().cpu()
    n = max(expected64.shape[-1], 1)
    norm = expected64.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return ((values.double().cpu() - expected64).abs().amax(-1) / (norm * n * eps(dtype))).max().item()


def assert_lapack_ratio(ratio: float, what: str) -> None:
    assert ratio <= LAPACK_RATIO_MAX, f"{what}: LAPACK ratio {ratio:.2f} > {LAPACK_RATIO_MAX}"


def assert_unary_matches_oracle(fn, oracle, x: torch.Tensor) -> None:
    """``fn(x)`` and its gradient match ``oracle`` run in float64, within ``TOL[x.dtype]``; the
    output is contiguous, of ``x``'s dtype and shape."""
    x = x.detach().requires_grad_()
    y = fn(x)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    x64 = x.detach().double().requires_grad_()
    y64 = oracle(x64)
    assert_close(y, y64, x.dtype)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert dx.dtype == x.dtype
    assert_close(dx, dx64, x.dtype)
