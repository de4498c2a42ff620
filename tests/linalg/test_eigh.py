import pytest
import torch

import metalcore
from cases import BATCHES, DTYPES, SIZES, noncontiguous, shape_id
from oracle import assert_lapack_ratio, assert_within_torch_error, orthogonality_ratio, residual_ratio


def symmetric(batch, n, dtype=torch.float64):
    X = torch.randn(*batch, n, n, dtype=torch.float64)
    return (X + X.mT).to(dtype)


def with_garbage(A, UPLO):
    """``A`` with its unread triangle replaced by noise."""
    noise = torch.randn_like(A)
    return A.tril() + noise.triu(1) if UPLO == "L" else A.triu() + noise.tril(-1)


# Batches of 2x3 skip the largest sizes: the small sizes already cover the batch logic.
CASES = [(b, n) for b in BATCHES for n in SIZES if not (len(b) == 2 and n > 33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("UPLO", ["L", "U"])
@pytest.mark.parametrize("batch,n", CASES, ids=[shape_id(b, n, n) for b, n in CASES])
def test_eigh_lapack_ratios(batch, n, UPLO, dtype):
    A = symmetric(batch, n, dtype)
    L, Q = metalcore.linalg.eigh(with_garbage(A, UPLO), UPLO=UPLO)
    assert L.shape == (*batch, n) and Q.shape == (*batch, n, n) and L.dtype == Q.dtype == dtype
    what = f"eigh {shape_id(batch, n, n)}"
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mH, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eigenvalues_within_torch_error(dtype):
    A = symmetric((7,), 65)
    expected = torch.linalg.eigvalsh(A)
    A_low = A.to(dtype)
    assert_within_torch_error(metalcore.linalg.eigh(A_low).eigenvalues, torch.linalg.eigvalsh(A_low), expected)
    assert_within_torch_error(metalcore.linalg.eigvalsh(A_low), torch.linalg.eigvalsh(A_low), expected)


def test_eigh_repeated_eigenvalues_keep_orthonormal_vectors():
    Q0, _ = torch.linalg.qr(torch.randn(4, 33, 33, dtype=torch.float64))
    L0 = torch.tensor([1.0] * 20 + [2.0] * 10 + [5.0] * 3, dtype=torch.float64)
    A = Q0 @ torch.diag_embed(L0) @ Q0.mT
    L, Q = metalcore.linalg.eigh(A)
    assert_lapack_ratio(orthogonality_ratio(Q, torch.float64), "repeated eigenvalues Q")
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), "repeated eigenvalues")


def test_eigh_noncontiguous_lowercase_uplo_out_and_return_types():
    A = symmetric((3,), 7)
    result = metalcore.linalg.eigh(noncontiguous(with_garbage(A, "U")), UPLO="u")
    assert isinstance(result, torch.return_types.linalg_eigh)
    assert_lapack_ratio(residual_ratio(A, result.eigenvectors @ torch.diag_embed(result.eigenvalues)
                                       @ result.eigenvectors.mT, torch.float64), "noncontiguous")
    out = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    result = metalcore.linalg.eigh(A, out=out)
    assert isinstance(result, torch.return_types.linalg_eigh) and result.eigenvalues is out[0]
    w = torch.empty(0, dtype=torch.float64)
    assert metalcore.linalg.eigvalsh(A, UPLO="l", out=w) is w
    torch.testing.assert_close(w, out[0])


def test_eigh_rejects_bad_input():
    with pytest.raises(ValueError, match=r"metalcore.linalg.eigh: UPLO must be one of 'L', 'U'; got 'X'"):
        metalcore.linalg.eigh(symmetric((), 3), UPLO="X")
    with pytest.raises(ValueError, match=r"metalcore.linalg.eigvalsh: A must be a square matrix"):
        metalcore.linalg.eigvalsh(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"metalcore.linalg.eigh: A must have dtype"):
        metalcore.linalg.eigh(torch.ones(3, 3, dtype=torch.float16))


def eigh_invariants(L, Q):
    """Functions of the eigendecomposition that do not depend on the eigenvectors' signs."""
    w = torch.linspace(1.0, 2.0, L.shape[-1], dtype=torch.float64)
    return L, (Q * w) @ Q.mT


@pytest.mark.parametrize("UPLO", ["L", "U"])
def test_eigh_gradcheck(UPLO):
    X = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs every entry, so the input is symmetrized first (torch's gradient is the one
    # with respect to a symmetric A, not restricted to the triangle that is read).
    torch.autograd.gradcheck(lambda X: eigh_invariants(*metalcore.linalg.eigh(X + X.mT, UPLO=UPLO)), (X,))
    torch.autograd.gradcheck(lambda X: metalcore.linalg.eigvalsh(X + X.mT, UPLO=UPLO), (X,))


@pytest.mark.parametrize("UPLO", ["L", "U"])
def test_eigh_gradient_matches_torch(UPLO):
    A = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)
    theirs = torch.linalg.eigh(A, UPLO=UPLO)
    grads = [torch.randn_like(t) for t in theirs]
    g_theirs, = torch.autograd.grad(theirs, A, grads)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigh(A, UPLO=UPLO), A, grads)
    torch.testing.assert_close(g_ours, g_theirs)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigh(A, UPLO=UPLO).eigenvectors, A, grads[1])
    g_theirs, = torch.autograd.grad(torch.linalg.eigh(A, UPLO=UPLO).eigenvectors, A, grads[1])
    torch.testing.assert_close(g_ours, g_theirs)
    g_ours, = torch.autograd.grad(metalcore.linalg.eigvalsh(A, UPLO=UPLO), A, grads[0])
    g_theirs, = torch.autograd.grad(torch.linalg.eigvalsh(A, UPLO=UPLO), A, grads[0])
    torch.testing.assert_close(g_ours, g_theirs)


def test_eigvalsh_gradient_is_finite_for_repeated_eigenvalues():
    A = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()
    g = torch.randn(2, 4, dtype=torch.float64)
    ours, = torch.autograd.grad(metalcore.linalg.eigvalsh(A), A, g)
    theirs, = torch.autograd.grad(torch.linalg.eigvalsh(A), A, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


def test_eigh_compiles_without_graph_breaks():
    A = symmetric((3,), 8, torch.float32)
    compiled = torch.compile(metalcore.linalg.eigh, fullgraph=True)
    L, Q = compiled(A)
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float32), "compiled eigh")
    torch.testing.assert_close(L, torch.linalg.eigvalsh(A))


# --- Register-tile Jacobi (eigh_batched_triton) and cuSOLVER's batched syev (cusolver_batched) ------

from linalg_matrices import KINDS, scale_of  # noqa: E402
from linalg_matrices import symmetric as family  # noqa: E402


def _register_eigh(A, UPLO="L"):
    from metalcore.linalg.eigh_batched_triton import eigh_registers
    return eigh_registers(A, UPLO == "U", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_register_eigh_matrix_families(kind, dtype, triton_backend):
    # n = 13: an odd side (one padding index in the tournament) in a 16-wide tile, 3 matrices.
    A = family(kind, (3,), 13, dtype)
    L, Q = _register_eigh(with_garbage(A, "U"), "U")
    scale = scale_of(kind, dtype)
    what = f"register eigh {kind} {dtype}"
    assert_lapack_ratio(residual_ratio(A.double() / scale, (Q.double() * (L.double() / scale).unsqueeze(-2))
                                       @ Q.double().mT, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32])
def test_register_eigh_sizes_and_many_matrices_per_program(n, triton_backend):
    from metalcore.linalg.eigh_batched_triton import eigh_registers
    A = symmetric((5,), n)
    for G in (1, 2, 8):                        # 5 matrices: a partial last program for G = 2 and 8
        L, Q = eigh_registers(A, False, True, matrices_per_program=G)
        assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), f"n={n} G={G}")
        assert_lapack_ratio(orthogonality_ratio(Q, torch.float64), f"n={n} G={G} Q")
        L2, _ = eigh_registers(A, False, False, matrices_per_program=G)
        assert torch.equal(L, L2), "eigenvalues without vectors: the same rotations, bit for bit"


def test_register_eigh_nan_stays_in_its_matrix(triton_backend):
    A = symmetric((4,), 6, torch.float32)
    A[2, 3, 1] = float("nan")
    L, Q = _register_eigh(A)
    assert L[2].isnan().all() and Q[2].isnan().all()
    good = [0, 1, 3]
    assert not L[good].isnan().any() and not Q[good].isnan().any()
    assert_lapack_ratio(residual_ratio(A[good], Q[good] @ torch.diag_embed(L[good]) @ Q[good].mT, torch.float32),
                        "the other matrices")


def test_register_eigh_serves_the_op_when_routed(triton_backend, monkeypatch):
    from metalcore import _selection
    from metalcore.linalg import eigh_triton
    calls = []
    original = eigh_triton.eigh_registers
    monkeypatch.setattr(eigh_triton, "eigh_registers", lambda *a, **k: calls.append(1) or original(*a, **k))
    A = symmetric((2,), 7)
    with _selection.use_path("eigh", "registers"):
        L, Q = metalcore.linalg.eigh(A)
    assert calls, "the 'registers' path runs the register kernel"
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), "routed")


def test_cusolver_batched_falls_back_where_missing(monkeypatch):
    from metalcore.linalg import cusolver_batched, eigh_triton
    monkeypatch.setattr(cusolver_batched, "_load", lambda: None)
    assert not cusolver_batched.available()
    with pytest.raises(RuntimeError, match="XsyevBatched"):
        cusolver_batched.syev_batched(torch.eye(3), False, True)
    # Sizes the Jacobi kernels do not take are then not the triton implementation's.
    assert not eigh_triton._cusolver_supported(torch.eye(200))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 40, 200])
def test_cusolver_batched_matches_the_contract(n, dtype):
    from metalcore.linalg import cusolver_batched
    if not cusolver_batched.available():
        pytest.skip("this libcusolver has no XsyevBatched (CUDA < 12.6.2)")
    A = symmetric((3,), n).cuda()
    A[1, 2, 0] = A[1, 0, 2] = float("nan")   # in both triangles: each UPLO reads one
    for UPLO in ("L", "U"):
        L, Q = cusolver_batched.syev_batched(with_garbage(A, UPLO).to(dtype), UPLO == "U", True)
        good = [0, 2]
        assert L[1].isnan().all() and Q[1].isnan().all() and not L[good].isnan().any()
        assert_lapack_ratio(residual_ratio(A[good], Q[good] @ torch.diag_embed(L[good]) @ Q[good].mT, dtype), "residual")
        assert_lapack_ratio(orthogonality_ratio(Q[good], dtype), "Q")
        L2, _ = cusolver_batched.syev_batched(with_garbage(A, UPLO).to(dtype), UPLO == "U", False)
        assert_within_torch_error(L2[good], torch.linalg.eigvalsh(A[good].to(dtype)), torch.linalg.eigvalsh(A[good]))


def test_cusolver_batched_calls_are_split_by_size():
    from metalcore.linalg import cusolver_batched
    assert cusolver_batched.chunks(65536, 33) == [(0, 32768), (32768, 32768)]
    assert cusolver_batched.chunks(10, 33, 4) == [(0, 4), (4, 4), (8, 2)]
    assert cusolver_batched.chunks(3, 33, 0) == [(0, 3)]                  # no size given
    assert cusolver_batched.chunks(2, 50000)[0] == (0, 1)                 # n·lda·batch <= 2^31 - 1


@pytest.mark.gpu
@pytest.mark.parametrize("compute_v", [True, False], ids=["vectors", "values"])
def test_cusolver_batched_splits_a_call_whose_workspace_is_over_the_cap(compute_v, monkeypatch):
    # 32768 fp64 matrices of side 33 asked for a 23 GiB workspace; a cap small enough to split 300
    # such matrices into several calls must give the same answer as one call.
    from metalcore.linalg import cusolver_batched
    if not cusolver_batched.available():
        pytest.skip("this libcusolver has no XsyevBatched (CUDA < 12.6.2)")
    A = symmetric((300,), 33, torch.float64).cuda()
    whole = cusolver_batched.syev_batched(A, False, compute_v)
    monkeypatch.setattr(cusolver_batched, "MAX_WORKSPACE_BYTES", 64 << 10)
    calls = []
    original = cusolver_batched.chunks
    monkeypatch.setattr(cusolver_batched, "chunks", lambda *a: calls.append(original(*a)) or calls[-1])
    split = cusolver_batched.syev_batched(A, False, compute_v)
    assert len(calls[-1]) > 1
    torch.testing.assert_close(split[0], whole[0])
    if compute_v:
        assert_lapack_ratio(residual_ratio(A, split[1] @ torch.diag_embed(split[0]) @ split[1].mT, torch.float64), "residual")


def test_cusolver_batched_is_chosen_only_for_measured_batches(monkeypatch):
    from metalcore.linalg import cusolver_batched, eigh_triton
    monkeypatch.setattr(cusolver_batched, "available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: cuda))
    assert eigh_triton._cusolver_preferred(torch.empty(4, 64, 64))
    assert eigh_triton._cusolver_preferred(torch.empty(2, 512, 512, dtype=torch.float64))
    assert not eigh_triton._cusolver_preferred(torch.empty(64, 64))          # a single matrix: not timed
    assert not eigh_triton._cusolver_preferred(torch.empty(8, 32, 32))       # slower than torch there
    assert not eigh_triton._cusolver_preferred(torch.empty(2, 513, 513))     # not timed
    monkeypatch.setattr(cusolver_batched, "available", lambda: False)
    assert not eigh_triton._cusolver_preferred(torch.empty(4, 64, 64))       # missing symbol: fall back


# --- cuSOLVER's batched Jacobi called directly (cusolver_syevj, the "syevj" path) --------------------

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import functools  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

from oracle import values_ratio  # noqa: E402

SYEVJ_SIZES = (1, 2, 3, 8, 16, 31, 32)


def _syevj_check(A, L, Q, dtype, what, scale=1.0):
    """LAPACK ratios of ``(L, Q)`` for the symmetric ``A`` (``scale``: the family's, divided out so
    that the float64 products neither under- nor overflow), ascending values, no NaN."""
    assert not L.isnan().any() and not Q.isnan().any(), what + ": NaN"
    A64 = A.double() / scale
    assert_lapack_ratio(residual_ratio(A64, (Q.double() * (L.double() / scale).unsqueeze(-2)) @ Q.double().mT, dtype),
                        what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), what + ": eigenvalues must be ascending"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SYEVJ_SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_syevj_matrix_families(batch, kind, n, dtype):
    from metalcore.linalg import cusolver_syevj
    if not cusolver_syevj.available():
        pytest.skip("no libcusolver with syevjBatched")
    A = family(kind, (batch,), n, dtype).cuda()
    expected = torch.linalg.eigvalsh(A.cpu().double())                 # LAPACK on the CPU: the oracle
    for UPLO in ("L", "U"):
        what = f"syevj {kind} {batch}x{n} {dtype} {UPLO}"
        L, Q = cusolver_syevj.syevj_batched(with_garbage(A, UPLO), UPLO == "U", True)
        assert L.shape == (batch, n) and Q.shape == (batch, n, n) and L.dtype == Q.dtype == dtype
        _syevj_check(A, L, Q, dtype, what, scale_of(kind, dtype))
        values, empty = cusolver_syevj.syevj_batched(with_garbage(A, UPLO), UPLO == "U", False)
        assert empty.numel() == 0 and not values.isnan().any()
        assert_lapack_ratio(values_ratio(values, expected, dtype), what + " values")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_syevj_nan_stays_in_its_matrix_and_batches_are_split(dtype, monkeypatch):
    from metalcore.linalg import cusolver_batched, cusolver_syevj
    if not cusolver_syevj.available():
        pytest.skip("no libcusolver with syevjBatched")
    A = symmetric((1000,), 16, dtype).cuda()
    A[1, 3, 2] = float("nan")                 # in the lower triangle, the one read
    A[2, 2, 3] = float("inf")                 # in the upper triangle, not read
    monkeypatch.setattr(cusolver_batched, "MAX_BATCH", 300)             # 4 library calls: 300, 300, 300, 100
    L, Q = cusolver_syevj.syevj_batched(A, False, True)
    assert L[1].isnan().all() and Q[1].isnan().all()
    good = [i for i in range(1000) if i != 1]
    _syevj_check(A[good].tril() + A[good].tril(-1).mT, L[good], Q[good], dtype, "split batch")


@pytest.mark.gpu
def test_syevj_takes_the_batch_torch_fails_on():
    # torch.linalg.eigh raised CUSOLVER_STATUS_INTERNAL_ERROR for 65536 matrices of side <= 32 on the
    # H100; this call splits them into two library calls.
    from metalcore.linalg import cusolver_syevj
    if not cusolver_syevj.available():
        pytest.skip("no libcusolver with syevjBatched")
    A = symmetric((65536,), 32, torch.float32).cuda()
    L, Q = cusolver_syevj.syevj_batched(A, False, True)
    _syevj_check(A, L, Q, torch.float32, "65536x32")


@pytest.mark.gpu
def test_syevj_serves_the_op_when_routed():
    from metalcore import _selection
    from metalcore.linalg import cusolver_syevj
    if not cusolver_syevj.available():
        pytest.skip("no libcusolver with syevjBatched")
    A = symmetric((7,), 12, torch.float32).cuda()
    with metalcore.use_backend("triton"), _selection.use_path("eigh", "syevj"):
        L, Q = metalcore.linalg.eigh(with_garbage(A, "U"), UPLO="U")
        values = metalcore.linalg.eigvalsh(A)
    _syevj_check(A, L, Q, torch.float32, "routed")
    assert_lapack_ratio(values_ratio(values, torch.linalg.eigvalsh(A.cpu().double()), torch.float32), "routed values")


def test_syevj_path_is_registered_and_offered_only_for_cuda_small_float(monkeypatch):
    from metalcore import _selection
    from metalcore.linalg import cusolver_batched, cusolver_syevj
    path = _selection.paths("eigh", "triton")["syevj"]
    assert not path.supports(torch.eye(3), "L", True)                  # CPU tensors: never
    monkeypatch.setattr(cusolver_syevj, "available", lambda: True)
    assert not cusolver_syevj.supports(torch.empty(4, 8, 8))            # still CPU
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: cuda))
    assert path.supports(torch.empty(4, 32, 32), "L", True)
    assert path.supports(torch.empty(1, 1, dtype=torch.float64), "U", False)
    assert not path.supports(torch.empty(4, 33, 33), "L", True)         # n > 32: not syevjBatched's
    assert not path.supports(torch.empty(4, 8, 8, dtype=torch.float16), "L", True)
    assert not path.supports(torch.empty(4, 8, 8, dtype=torch.complex64), "L", True)
    monkeypatch.undo()
    monkeypatch.setattr(cusolver_batched, "_load", lambda: None)        # no library: never offered
    assert not cusolver_syevj.available()
    with pytest.raises(RuntimeError, match="syevjBatched is not available"):
        cusolver_syevj.syevj_batched(torch.eye(3), False, True)


def test_syevj_forced_on_cpu_tensors_is_refused(triton_backend):
    from metalcore import BackendUnavailableError, _selection
    with _selection.use_path("eigh", "syevj"), pytest.raises(BackendUnavailableError, match="'syevj' does not"):
        metalcore.linalg.eigh(symmetric((2,), 4))


class FakeSyevj:
    """cusolverDn{S,D}syevjBatched as documented, on host memory (LAPACK in float64 underneath):
    matrices column-major with leading dimension n, only the ``uplo`` triangle read, eigenvalues
    returned descending (the order of an unsorted Jacobi is arbitrary; sorting is switched off),
    eigenvectors over A with ``jobz`` = 1 and A left as garbage otherwise, ``info = n + 1`` for a
    non-zero matrix with a zero diagonal (standing in for one that does not converge), finite garbage with
    ``info = 0`` for a matrix that is not finite (nothing promises NaN there)."""

    def __init__(self):
        self.calls, self.largest, self.size_queries, self.infos, self.settings = [], [], 0, 0, {}
        names = ["cusolverDnCreate", "cusolverDnSetStream", "cusolverDnCreateParams", "cusolverDnCreateSyevjInfo",
                 "cusolverDnXsyevjSetTolerance", "cusolverDnXsyevjSetMaxSweeps", "cusolverDnXsyevjSetSortEig"]
        for name in names:
            setattr(self, name, self._function(getattr(self, "_" + name[len("cusolverDn"):])))
        for p, dtype in (("S", torch.float32), ("D", torch.float64)):
            setattr(self, f"cusolverDn{p}syevjBatched_bufferSize", self._function(self._size))
            setattr(self, f"cusolverDn{p}syevjBatched", self._function(functools.partial(self._run, dtype)))

    @staticmethod
    def _function(method):
        return lambda *args: method(*args)     # a plain function: ctypes' argtypes can be set on it

    @staticmethod
    def _out(ref, value):
        ref._obj.value = value
        return 0

    def _Create(self, ref):
        return self._out(ref, 1)

    def _SetStream(self, handle, stream):
        return 0

    def _CreateParams(self, ref):
        return self._out(ref, 2)

    def _CreateSyevjInfo(self, ref):
        self.infos += 1
        return self._out(ref, 3)

    def _XsyevjSetTolerance(self, params, tol):
        self.settings["tol"] = tol
        return 0

    def _XsyevjSetMaxSweeps(self, params, sweeps):
        self.settings["sweeps"] = sweeps
        return 0

    def _XsyevjSetSortEig(self, params, sort):
        self.settings["sort"] = sort
        return 0

    def _size(self, handle, jobz, uplo, n, A, lda, W, lwork, params, batch):
        self.size_queries += 1
        return self._out(lwork, 5 * batch)

    @staticmethod
    def _memory(address, count, dtype):
        ctype = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double, torch.int32: ctypes.c_int32}[dtype]
        return torch.frombuffer((ctype * count).from_address(address), dtype=dtype)

    def _run(self, dtype, handle, jobz, uplo, n, A, lda, W, work, lwork, info, params, batch):
        assert lda == n and work and lwork >= 5 * batch and params == 3
        a = self._memory(A, batch * n * n, dtype).view(batch, n, n)          # a[k, j, i] = A_k(i, j)
        M = a.mT.double()
        triangle = M.tril() if uplo == 0 else M.triu()
        self.largest.append(triangle.abs().amax(dim=(-2, -1)))
        finite = triangle.isfinite().all(-1).all(-1)
        L, V = torch.linalg.eigh(torch.where(finite[:, None, None], M, 0.0), UPLO="L" if uplo == 0 else "U")
        L = torch.where(finite[:, None], L, 123.0)                              # garbage, not NaN
        self._memory(W, batch * n, dtype).view(batch, n).copy_(L.flip(-1))
        if jobz == 1:
            a.copy_(V.flip(-1).mT)                                               # column j = vector j
        else:
            a.fill_(7.0)
        unconverged = M.diagonal(dim1=-2, dim2=-1).eq(0).all(-1) & triangle.ne(0).any(-1).any(-1)
        self._memory(info, batch, torch.int32).copy_(torch.where(unconverged, n + 1, 0))
        self.calls.append(batch)
        return 0


@pytest.fixture
def fake_syevj(monkeypatch, triton_backend):
    """The syevj module on CPU tensors against :class:`FakeSyevj` (the CUDA stream and device calls
    stubbed, its two kernels under the Triton interpreter), with empty caches."""
    from metalcore.linalg import cusolver_batched, cusolver_syevj
    fake = FakeSyevj()
    lib = cusolver_batched.Library(fake)
    monkeypatch.setattr(cusolver_batched, "_load", lambda: lib)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cusolver_syevj, "_lwork", {})
    monkeypatch.setattr(cusolver_syevj, "_local", threading.local())
    return fake


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("UPLO", ["L", "U"])
@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_syevj_layout_triangle_scale_and_order(n, UPLO, dtype, fake_syevj):
    from metalcore.linalg import cusolver_syevj
    A = symmetric((2, 3), n, dtype)
    A[0, 1] *= 1e-25                          # tiny and huge matrices: divided by their largest entry
    A[1, 2] *= 1e25
    L, Q = cusolver_syevj.syevj_batched(with_garbage(A, UPLO), UPLO == "U", True)
    assert L.shape == (2, 3, n) and Q.shape == (2, 3, n, n)
    assert Q.mT.is_contiguous(), "eigenvectors in the column-major layout torch.linalg.eigh returns"
    scale = A.abs().amax(dim=(-2, -1), keepdim=True).double()
    for i in range(2):
        for j in range(3):
            _syevj_check(A[i, j], L[i, j], Q[i, j], dtype, f"fake {n} {UPLO} [{i},{j}]", scale[i, j].item())
    largest = torch.cat(fake_syevj.largest)
    torch.testing.assert_close(largest, torch.ones_like(largest), rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert fake_syevj.settings == {"tol": n * torch.finfo(dtype).eps, "sweeps": cusolver_syevj.MAX_SWEEPS, "sort": 0}
    values, empty = cusolver_syevj.syevj_batched(with_garbage(A, UPLO), UPLO == "U", False)
    assert empty.numel() == 0
    torch.testing.assert_close(values, L, rtol=0, atol=0)


def test_syevj_nan_and_unconverged_matrices_stay_in_their_matrix(fake_syevj):
    from metalcore.linalg import cusolver_syevj
    A = symmetric((5,), 6, torch.float32)
    A[1, 4, 2] = float("nan")                 # in the read (lower) triangle
    A[2].diagonal().zero_()                   # the fake's stand-in for no convergence (info = n + 1)
    A[3, 0, 5] = float("inf")                 # in the unread triangle: ignored
    A[4] = 0.0                                # the zero matrix: no division by zero
    L, Q = cusolver_syevj.syevj_batched(A, False, True)
    for bad in (1, 2):
        assert L[bad].isnan().all() and Q[bad].isnan().all()
    good = [0, 3, 4]
    _syevj_check(A[good].tril() + A[good].tril(-1).mT, L[good], Q[good], torch.float32, "the other matrices")
    assert torch.equal(L[4], torch.zeros(6))
    values, _ = cusolver_syevj.syevj_batched(A, False, False)
    assert values[[1, 2]].isnan().all() and not values[good].isnan().any()


class FakeSyev(FakeSyevj):
    """:class:`FakeSyevj` with cusolverDnXsyevBatched as documented, on host memory: column-major,
    the ``uplo`` triangle read, eigenvalues ascending, a device workspace of ``per_matrix`` bytes a
    matrix (so that a test can put a call over ``MAX_WORKSPACE_BYTES``)."""

    per_matrix = 1000

    def __init__(self):
        super().__init__()
        self.cusolverDnXsyevBatched_bufferSize = self._function(self._syev_size)
        self.cusolverDnXsyevBatched = self._function(self._syev)

    def _syev_size(self, handle, params, jobz, uplo, n, type_a, A, lda, type_w, W, compute, dev, host, batch):
        self.size_queries += 1
        self._out(host, 0)
        return self._out(dev, self.per_matrix * batch)

    def _syev(self, handle, params, jobz, uplo, n, type_a, A, lda, type_w, W, compute, ws, ws_bytes, host_ws,
              host_bytes, info, batch):
        assert lda == n and ws_bytes >= self.per_matrix * batch
        dtype = (torch.float32, torch.float64)[type_a]
        a = self._memory(A, batch * n * n, dtype).view(batch, n, n)          # a[k, j, i] = A_k(i, j)
        L, V = torch.linalg.eigh(a.mT.double(), UPLO="L" if uplo == 0 else "U")
        self._memory(W, batch * n, dtype).view(batch, n).copy_(L)
        if jobz == 1:
            a.copy_(V.mT)                                                        # column j = vector j
        self._memory(info, batch, torch.int32).zero_()
        self.calls.append(batch)
        return 0


@pytest.mark.parametrize("compute_v", [True, False], ids=["vectors", "values"])
def test_cusolver_batched_splits_calls_to_fit_the_workspace_cap(compute_v, fake_syevj, monkeypatch):
    from metalcore.linalg import cusolver_batched
    fake = FakeSyev()
    monkeypatch.setattr(cusolver_batched, "_load", lambda: cusolver_batched.Library(fake))
    A = symmetric((10,), 5, torch.float64)
    L, Q = cusolver_batched.syev_batched(A, False, compute_v)
    assert fake.calls == [10]
    monkeypatch.setattr(cusolver_batched, "MAX_WORKSPACE_BYTES", 3500)    # 3 matrices' workspace
    L3, Q3 = cusolver_batched.syev_batched(A, False, compute_v)
    assert fake.calls[1:] == [3, 3, 3, 1]
    assert fake.size_queries == 1 + 3, "one query per distinct call size (10; then 10, 3, 1)"
    torch.testing.assert_close(L3, torch.linalg.eigvalsh(A))
    torch.testing.assert_close(L3, L)
    if compute_v:
        torch.testing.assert_close(Q3 @ torch.diag_embed(L3) @ Q3.mT, A)


def test_syevj_splits_large_batches_and_caches_its_setup(fake_syevj, monkeypatch):
    from metalcore.linalg import cusolver_batched, cusolver_syevj
    monkeypatch.setattr(cusolver_batched, "MAX_BATCH", 4)
    A = symmetric((10,), 3, torch.float32)
    L, Q = cusolver_syevj.syevj_batched(A, False, True)
    assert fake_syevj.calls == [4, 4, 2]
    _syevj_check(A, L, Q, torch.float32, "split")
    cusolver_syevj.syevj_batched(A, False, True)
    assert fake_syevj.size_queries == 2, "workspace sizes queried once per call shape (4 and 2 matrices)"
    assert fake_syevj.infos == 1, "syevjInfo created once per thread, device and dtype"
    cusolver_syevj.syevj_batched(A.double(), False, True)
    assert fake_syevj.infos == 2 and fake_syevj.size_queries == 4


def test_syevj_rejects_what_it_cannot_take_and_handles_empty_input(fake_syevj):
    from metalcore.linalg import cusolver_syevj
    with pytest.raises(ValueError, match="n <= 32"):
        cusolver_syevj.syevj_batched(torch.zeros(2, 33, 33), False, True)
    with pytest.raises(TypeError, match="float32 or float64"):
        cusolver_syevj.syevj_batched(torch.zeros(2, 3, 3, dtype=torch.float16), False, True)
    L, Q = cusolver_syevj.syevj_batched(torch.zeros(0, 4, 4), False, True)
    assert L.shape == (0, 4) and Q.shape == (0, 4, 4) and not fake_syevj.calls


# --- cusolver_syevj's kernels around the library call (prepare, finish), against the torch ops they
# replaced, under the Triton interpreter on the CPU. Compiled, they run inside the syevj tests above
# (H100: matrix families, NaN, 65536×32², all passing). A compiled twin of these two tests failed on
# the H100 when it compiled a new variant of the prepare kernel after interpreted launches in the same
# process: the compiler met `tl.tensor.to` still patched by Triton 3.6's interpreter ("'ir.value'
# object has no attribute 'dtype'"), a test-process hazard, not the kernel's.

FUSE_SIZES = (1, 2, 3, 16, 31, 32)
# (device, matrices a program): the default launch shape (one program for the whole batch on the CPU)
# and 2 matrices a program, so that batch 5 is 3 programs, the last one half empty.
LAUNCHES = [("cpu", None), ("cpu", 2)]


def _prepare_oracle(A3, upper):
    """What syevj_batched computed with torch ops before the prepare kernel."""
    work = (A3.triu() if upper else A3.tril()).contiguous()
    amax = torch.linalg.vector_norm(work, ord=float("inf"), dim=(-2, -1))
    scale = amax.clamp_min(torch.finfo(A3.dtype).tiny)
    return work / scale[:, None, None], scale


@pytest.mark.parametrize("device,G", LAUNCHES, ids=["cpu", "cpu-G2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("UPLO", ["L", "U"])
@pytest.mark.parametrize("n", FUSE_SIZES)
def test_syevj_prepare_is_the_scaled_triangle(n, UPLO, dtype, G, device, triton_backend):
    from metalcore.linalg import cusolver_syevj
    upper = UPLO == "U"
    X = torch.randn(12, n, n, dtype=dtype, device=device)
    A3 = X.mT[::2]                        # 6 matrices, strides (2n², 1, n): not contiguous, not transposed-contiguous
    A3 *= torch.tensor([1e-25, 1e25, 0.0, 1.0, 3.0, 1e-30], dtype=dtype, device=device)[:, None, None]
    if n > 1:
        # Matrix 3: a NaN (upper) or an infinity (lower) in the read triangle, a NaN in the other; matrix 4
        # an infinity in the unread triangle only (ignored: a finite matrix).
        (i, j), (k, l) = ((0, n - 1), (n - 1, 0)) if upper else ((n - 1, 0), (0, n - 1))
        A3[3, i, j] = float("nan") if upper else float("inf")
        A3[3, k, l] = float("nan")
        A3[4, k, l] = float("inf")
    for batch in (A3[:1], A3[:5], A3):
        expected_work, expected_scale = _prepare_oracle(batch, upper)
        work, scale = cusolver_syevj.prepare(batch, upper, matrices_per_program=G)
        assert work.is_contiguous() and work.shape == batch.shape and scale.shape == batch.shape[:1]
        what = f"prepare n={n} {UPLO} {dtype} batch {batch.shape[0]}"
        finite = expected_scale.isfinite()
        # Bit for bit where the triangle is finite; the zero matrix's scale is finfo.tiny.
        assert torch.equal(work[finite], expected_work[finite]), what + ": work"
        assert torch.equal(scale[finite], expected_scale[finite]), what + ": scale"
        # A NaN or infinity in the triangle: scale NaN (finish turns that matrix NaN), zeros to cuSOLVER.
        assert scale[~finite].isnan().all() and (work[~finite] == 0).all(), what + ": non-finite matrix"
        assert int((~finite).sum()) == (1 if batch.shape[0] > 3 and n > 1 else 0), what + ": which matrices"
    assert scale[2] == torch.finfo(dtype).tiny and (work[2] == 0).all()           # the zero matrix


def _finish_oracle(W, info, scale, vectors):
    """What syevj_batched computed with torch ops before the finish kernel (stable sort: tied
    eigenvalues keep their order)."""
    ok = (info == 0) & ~scale.isnan()
    L, order = W.sort(dim=-1, stable=True)
    L = torch.where(ok[:, None], L * scale[:, None], float("nan"))
    rows = vectors.gather(-2, order[:, :, None].expand_as(vectors))
    return L, torch.where(ok[:, None, None], rows, float("nan"))


@pytest.mark.parametrize("device,G", LAUNCHES, ids=["cpu", "cpu-G2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FUSE_SIZES)
def test_syevj_finish_sorts_scales_and_masks(n, dtype, G, device, triton_backend):
    from metalcore.linalg import cusolver_syevj
    nb = 7
    W = torch.randn(nb, n, dtype=dtype, device=device)
    W[1] = torch.randint(-2, 3, (n,), dtype=dtype, device=device)          # many ties
    W[2] = 0.5                                                             # all tied
    W[3, ::2] = -0.0                                                       # ±0 are ties too
    W[3, 1::2] = 0.0
    W[5] = float("nan")                                                    # garbage in a failed matrix
    info = torch.zeros(nb, dtype=torch.int32, device=device)
    info[5] = n + 1                                                        # not converged
    info[6] = -3
    scale = torch.rand(nb, dtype=dtype, device=device) * 10.0 ** torch.arange(-3, nb - 3, device=device)
    scale[4] = float("nan")                                                # non-finite input
    vectors = torch.randn(nb, n, n, dtype=dtype, device=device)
    for count in (1, 6, nb):                                               # 6: a non-multiple of 2 and 4
        expected_L, expected_rows = _finish_oracle(W[:count], info[:count], scale[:count], vectors[:count])
        L, rows = cusolver_syevj.finish(W[:count], info[:count], scale[:count], vectors[:count],
                                        matrices_per_program=G)
        what = f"finish n={n} {dtype} batch {count}"
        torch.testing.assert_close(L, expected_L, rtol=0, atol=0, equal_nan=True, msg=what + ": values")
        torch.testing.assert_close(rows, expected_rows, rtol=0, atol=0, equal_nan=True, msg=what + ": vectors")
        values, none = cusolver_syevj.finish(W[:count], info[:count], scale[:count], None, matrices_per_program=G)
        assert none is None
        torch.testing.assert_close(values, expected_L, rtol=0, atol=0, equal_nan=True, msg=what + ": values only")
    assert L[:4].isfinite().all() and L[4:].isnan().all() and rows[4:].isnan().all()


# --- One-sided Jacobi on the shifted matrix (eigh_shifted_triton) ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_shifted_eigh_matrix_families(kind, dtype, triton_backend):
    from metalcore.linalg.eigh_shifted_triton import eigh_shifted
    A = family(kind, (3,), 13, dtype)
    for UPLO in ("L", "U"):
        L, Q = eigh_shifted(with_garbage(A, UPLO), UPLO == "U", True)
        scale = scale_of(kind, dtype)
        what = f"shifted eigh {kind} {dtype} {UPLO}"
        assert not L.isnan().any(), what + ": NaN"
        assert_lapack_ratio(residual_ratio(A.double() / scale, (Q.double() * (L.double() / scale).unsqueeze(-2))
                                           @ Q.double().mT, dtype), what + " residual")
        assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
        assert_lapack_ratio(values_ratio(L.double(), torch.linalg.eigvalsh(A.double()), dtype), what + " values")
        assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "cluster", "graded"])
def test_shifted_eigh_at_its_largest_side(kind, dtype, triton_backend):
    """n = 64, the kernel's bound (MAX_N): the shift's O(ε‖A‖_F) error grows with n, and the clustered
    family's fp64 orthogonality ratio was the highest there on the interpreter (20.6)."""
    from metalcore.linalg.eigh_shifted_triton import MAX_N, eigh_shifted
    A = family(kind, (2,), MAX_N, dtype)
    L, Q = eigh_shifted(A, False, True)
    scale = scale_of(kind, dtype)
    what = f"shifted eigh n={MAX_N} {kind} {dtype}"
    assert_lapack_ratio(residual_ratio(A.double() / scale, (Q.double() * (L.double() / scale).unsqueeze(-2))
                                       @ Q.double().mT, dtype), what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), what + " Q")
    assert_lapack_ratio(values_ratio(L.double(), torch.linalg.eigvalsh(A.double()), dtype), what + " values")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), "eigenvalues must be ascending"


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32, 33])
def test_shifted_eigh_sizes_groups_and_values_only(n, triton_backend):
    from metalcore.linalg.eigh_shifted_triton import eigh_shifted
    A = symmetric((5,), n)
    for G in (1, 2, 8):                        # 5 matrices: a partial last program for G = 2 and 8
        sweeps = torch.zeros(5, dtype=torch.int32)
        L, Q = eigh_shifted(A, False, True, matrices_per_program=G, sweeps=sweeps)
        assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), f"n={n} G={G}")
        assert_lapack_ratio(orthogonality_ratio(Q, torch.float64), f"n={n} G={G} Q")
        assert bool((sweeps >= 1).all()) and bool((sweeps < 30).all())
        L2, _ = eigh_shifted(A, False, False, matrices_per_program=G)
        assert torch.equal(L, L2), "eigenvalues without vectors: the same rotations, bit for bit"


def test_shifted_eigh_sign_of_opposite_eigenvalues(triton_backend):
    """λ and −λ have the same singular value: only the shift keeps their vectors apart."""
    from metalcore.linalg.eigh_shifted_triton import eigh_shifted
    Qr, _ = torch.linalg.qr(torch.randn(2, 6, 6, dtype=torch.float64))
    d = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    A = (Qr * d) @ Qr.mT
    L, Q = eigh_shifted(A, False, True)
    assert_lapack_ratio(values_ratio(L, d.expand(2, 6), torch.float64), "±λ values")
    assert_lapack_ratio(residual_ratio(A, Q @ torch.diag_embed(L) @ Q.mT, torch.float64), "±λ residual")


def test_shifted_eigh_nan_stays_in_its_matrix_and_serves_the_op_when_routed(triton_backend):
    from metalcore import _selection
    A = symmetric((4,), 6, torch.float32)
    A[2, 3, 1] = float("inf")
    with _selection.use_path("eigh", "shifted"):
        L, Q = metalcore.linalg.eigh(A)
    assert L[2].isnan().all() and Q[2].isnan().all()
    good = [0, 1, 3]
    assert not L[good].isnan().any() and not Q[good].isnan().any()
    assert_lapack_ratio(residual_ratio(A[good], Q[good] @ torch.diag_embed(L[good]) @ Q[good].mT, torch.float32),
                        "the other matrices")


@pytest.mark.parametrize("path,launcher,values_only", [("shifted", "eigh_shifted_launcher", False),
                                                       ("tridiag", "eigh_tridiag_launcher", True)])
def test_eigh_path_is_specialized_once_per_signature(path, launcher, values_only, triton_backend, monkeypatch):
    """An alternative path's ``specialize`` is kept in the op's plan like the kernel's: the launch is
    bound once per call signature, and other strides make another."""
    from metalcore import _selection
    from metalcore.linalg import eigh_triton
    built = []
    original = getattr(eigh_triton, launcher)
    monkeypatch.setattr(eigh_triton, launcher, lambda A, *a, **k: built.append(A.stride()) or original(A, *a, **k))
    _selection._clear_plans()
    A = symmetric((3,), 5)
    call = metalcore.linalg.eigvalsh if values_only else (lambda A: metalcore.linalg.eigh(A)[0])
    with _selection.use_path("eigh", path):
        for _ in range(3):
            L = call(A)
        L2 = call(A.mT.contiguous().mT)                                   # column-major: another signature
    assert built == [A.stride(), A.mT.contiguous().mT.stride()]
    assert torch.equal(L, L2)
    assert_lapack_ratio(values_ratio(L, torch.linalg.eigvalsh(A), torch.float64), f"specialized {path} path")


# --- Tridiagonalisation, bisection and inverse iteration (eigh_tridiag_triton) ----------------------


def assert_tridiag_eigh(A, L, Q, dtype, what):
    """LAPACK's residual, orthogonality and eigenvalue ratios of ``(L, Q)`` for ``A``, no NaN,
    eigenvalues ascending."""
    assert not L.isnan().any() and not Q.isnan().any(), what + ": NaN"
    A64, L64, Q64 = A.double().cpu(), L.double().cpu(), Q.double().cpu()
    scale = A64.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    assert_lapack_ratio(residual_ratio(A64 / scale, (Q64 * (L64 / scale[..., 0]).unsqueeze(-2)) @ Q64.mT, dtype),
                        what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Q64, dtype), what + " Q")
    assert_lapack_ratio(values_ratio(L64, torch.linalg.eigvalsh(A64), dtype), what + " eigenvalues")
    assert bool((L[..., :-1] <= L[..., 1:]).all()), what + ": ascending"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_tridiag_eigh_matrix_families(kind, dtype, triton_backend):
    """n = 13, 3 matrices, garbage in the other triangle (the lower one read in fp32, the upper in
    fp64); the eigenvalues without vectors are the same bit for bit (the same reduction and bisection)."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    A = family(kind, (3,), 13, dtype)
    UPLO = "L" if dtype == torch.float32 else "U"
    G = with_garbage(A, UPLO)
    L, Q = eigh_tridiag(G, UPLO == "U", True)
    assert_tridiag_eigh(A, L, Q, dtype, f"tridiag eigh {kind} {dtype} {UPLO}")
    values, none = eigh_tridiag(G, UPLO == "U", False)
    assert torch.equal(values, L) and none.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["cluster", "graded"])
def test_tridiag_eigh_at_its_largest_side(kind, dtype, triton_backend):
    """n = 128 (MAX_N): the whole matrix in one register tile, 126 reflectors, 128 lanes bisecting and
    solving."""
    from metalcore.linalg.eigh_tridiag_triton import MAX_N, eigh_tridiag
    A = family(kind, (1,), MAX_N, dtype)
    assert_tridiag_eigh(A, *eigh_tridiag(A, False, True), dtype, f"n={MAX_N} {kind} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tridiag_eigh_repeated_and_decoupled_eigenvalues(dtype, triton_backend):
    """Clusters: eigenvalues of multiplicity 20, 10 and 3 at n = 33 (one cluster's vectors are any
    orthonormal basis of its subspace), the identity, zero, a diagonal matrix with repeats (T decouples:
    e = 0), and Wilkinson's W21+ (pairs equal to ~1e-14)."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    Q0, _ = torch.linalg.qr(torch.randn(1, 33, 33, dtype=torch.float64))
    L0 = torch.tensor([1.0] * 20 + [2.0] * 10 + [5.0] * 3, dtype=torch.float64)
    wilkinson = (torch.diag(torch.arange(21, dtype=torch.float64).sub(10).abs())
                 + torch.diag(torch.ones(20, dtype=torch.float64), 1) + torch.diag(torch.ones(20, dtype=torch.float64), -1))
    cases = {"repeated": Q0 @ torch.diag_embed(L0) @ Q0.mT, "identity": torch.eye(5, dtype=torch.float64)[None],
             "diagonal": torch.diag(torch.tensor([3.0, 1, 1, 2, 3], dtype=torch.float64))[None],
             "wilkinson": wilkinson[None]}
    for name, A in cases.items():
        assert_tridiag_eigh(A, *eigh_tridiag(A.to(dtype), False, True), dtype, f"{name} {dtype}")
    L, Q = eigh_tridiag(torch.zeros(1, 4, 4, dtype=dtype), False, True)
    assert torch.equal(L, torch.zeros(1, 4, dtype=dtype)), f"zero matrix: {L}"    # not bisection's ±pivmin
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"zero {dtype} Q")


def test_tridiag_eigh_multiple_eigenvalues_share_one_shift(triton_backend):
    """Lanes whose eigenvalues lie within bisection's error share one shift (``shifts()``). On this
    batch of the cluster family (n = 33, about 8 eigenvalues at each of ±1 and ±2) one shift a lane
    measured an orthogonality ratio of 10.6 in the interpreter, and such matrices reached 30-2400 on
    ~1% of the family on the H100; the shared shift measures 1.0. The bound is 3, not LAPACK's 30, so
    that the test tells the two apart."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    torch.manual_seed(1)
    A = family("cluster", (2,), 33, torch.float32)
    L, Q = eigh_tridiag(A, False, True)
    assert_tridiag_eigh(A, L, Q, torch.float32, "cluster 2×33²")
    assert orthogonality_ratio(Q.double(), torch.float32) <= 3.0


@pytest.mark.parametrize("n", [1, 2, 3, 8, 33])
def test_tridiag_eigh_sizes_and_batch_shapes(n, triton_backend):
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    A = symmetric((2, 1), n)
    L, Q = eigh_tridiag(A, False, True)
    assert L.shape == (2, 1, n) and Q.shape == (2, 1, n, n)
    assert_tridiag_eigh(A, L, Q, torch.float64, f"n={n}")
    T = A.mT.contiguous().mT                                                       # column-major strides
    L2, Q2 = eigh_tridiag(T, False, True)
    assert torch.equal(L2, L) and torch.equal(Q2, Q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tridiag_bisection_and_multisection_find_the_same_eigenvalues(dtype, triton_backend):
    """One point a lane (28 or 55 passes) or eight (9 or 18 passes): both to within LAPACK's bound,
    and to a few ε of each other."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    A = symmetric((3,), 20, dtype)
    expected = torch.linalg.eigvalsh(A.double())
    found = [eigh_tridiag(A, False, False, sections=k)[0] for k in (1, 8)]
    for k, L in zip((1, 8), found):
        assert_lapack_ratio(values_ratio(L.double(), expected, dtype), f"{k} sections {dtype}")
    scale = expected.abs().amax(-1, keepdim=True)
    assert ((found[0] - found[1]).abs() <= 8 * torch.finfo(dtype).eps * scale.to(dtype)).all()


def test_tridiag_eigh_persistent_programs_loop_over_the_batch(triton_backend):
    """More matrices than programs: each program takes every ``programs``-th matrix, its scratch reused."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    A = symmetric((5,), 9)
    L, Q = eigh_tridiag(A, False, True, programs=2)
    assert_tridiag_eigh(A, L, Q, torch.float64, "5 matrices on 2 programs")
    assert torch.equal(eigh_tridiag(A, False, True)[1], Q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tridiag_eigh_back_transformation_in_a_separate_kernel(dtype, triton_backend):
    """``split_back``: the reflectors applied by ``_reflect_kernel``, a program per (matrix, block of
    16 or 32 columns), instead of the eigh kernel's own loop. The same arithmetic column by column:
    equal results in the interpreter (on a GPU the reductions' order differs), LAPACK's ratios on
    clustered input with n not a multiple of the block, NaN confined to its matrix."""
    from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag
    torch.manual_seed(6)
    A = family("cluster", (3,), 37, dtype)
    A[1, 30, 2] = float("nan")
    L0, Q0 = eigh_tridiag(A, False, True)
    for columns in (16, 32):
        L, Q = eigh_tridiag(A, False, True, split_back=columns)
        assert torch.equal(L.nan_to_num(), L0.nan_to_num()) and torch.equal(Q.nan_to_num(), Q0.nan_to_num())
        assert L[1].isnan().all() and Q[1].isnan().all()
        assert_tridiag_eigh(A[[0, 2]], L[[0, 2]], Q[[0, 2]], dtype, f"split back {columns} {dtype}")


def test_tridiag_eigh_nan_stays_in_its_matrix_and_serves_the_op_when_routed(triton_backend):
    from metalcore import _selection
    A = symmetric((4,), 20, torch.float32)
    A[2, 3, 1] = float("nan")
    with _selection.use_path("eigh", "tridiag"):
        L, Q = metalcore.linalg.eigh(A)
        assert torch.equal(metalcore.linalg.eigvalsh(A).nan_to_num(), L.nan_to_num())
    assert L[2].isnan().all() and Q[2].isnan().all()
    good = [0, 1, 3]
    assert_tridiag_eigh(A[good], L[good], Q[good], torch.float32, "the other matrices")


GPU_PATH_CASES = [("tridiag", b, n) for b, n in [(100, 64), (64, 128), (1024, 33), (16, 100), (5000, 64)]] + [
    ("twostage", b, n) for b, n in [(64, 256), (4, 1024), (2, 300)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,batch,n", GPU_PATH_CASES, ids=str)
def test_gpu_eigh_path_full_size(path, batch, n, dtype, triton_backend, device):
    """The compiled paths at the sizes the sweep times them (issue 18's for ``twostage``), on every
    matrix family, with and without vectors; 5000 matrices of 64² run on fewer persistent programs
    than matrices. The values alone agree with the values beside the vectors to LAPACK's bound, not
    bit for bit: at fp32 128² tiles the two run at different widths (``chain_warps``: 8 warps with
    vectors, 16 without), which reorders the reductions."""
    from metalcore import _selection
    for kind in KINDS:
        A = family(kind, (batch,), n, dtype).to(device)
        with _selection.use_path("eigh", path):
            L, Q = metalcore.linalg.eigh(A)
            values = metalcore.linalg.eigvalsh(A)
        what = f"{path} eigh {kind} {batch}×{n} {dtype}"
        assert_tridiag_eigh(A, L, Q, dtype, what)
        assert_lapack_ratio(values_ratio(values.double().cpu(), L.double().cpu(), dtype), what + ": values alone")


# --- Two-stage reduction above the register tile (eigh_twostage, eigh_band_triton) --------------------


def band_of(batch, n, b, dtype):
    """Random symmetric matrices with ``b`` nonzero diagonals on each side of the main one."""
    A = symmetric(batch, n)
    i = torch.arange(n)
    return torch.where((i[:, None] - i[None, :]).abs() <= b, A, 0.0).to(dtype)


def lower_band(S, b):
    """The symmetric matrix the lower band of ``S`` (width ``b``) stands for, and whether every entry
    below that band is exactly zero."""
    n = S.shape[-1]
    i = torch.arange(n, device=S.device)
    low = S.tril()
    return low + low.tril(-1).mT, bool((S[..., (i[:, None] - i[None, :]) > b] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,b", [(30, 4), (21, 8), (11, 16), (17, 1)], ids=str)
def test_symmetric_band_is_an_orthogonal_similarity(n, b, dtype, triton_backend):
    """Stage 1: ``Q₁ᵀ A Q₁`` is the lower band of width ``b`` (zeros below it, exactly), ``Q₁`` from the
    kept panels is orthogonal; a last panel shorter than ``b`` (21 = 8 + 8 + 5) and a matrix already
    inside the band (11 ≤ 16 + 1) are included."""
    from metalcore.linalg.eigh_twostage import symmetric_band
    from metalcore.linalg.householder_gemm import larfb_gemm
    A = symmetric((3,), n, dtype)
    S = A.clone()
    blocks = symmetric_band(S, b, True)
    B, zeros = lower_band(S, b)
    assert zeros, f"entries below the band of width {b}"
    Q = torch.eye(n, dtype=dtype).expand(3, n, n).contiguous()
    for row, V, T in reversed(blocks):
        larfb_gemm(V, T, Q[:, row:, :], True, False, inplace=True)
    assert_lapack_ratio(residual_ratio(A.double(), Q.double() @ B.double() @ Q.double().mT, dtype), "A = Q₁ B Q₁ᵀ")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), "Q₁")
    S2 = A.clone()
    assert symmetric_band(S2, b, False) == [] and torch.equal(S2.tril(), S.tril())


# One dtype a case where the interpreter's time is seconds (~1 s a 10 steps of the wave).
BAND_CASES = [(14, 3, "wave", torch.float32), (14, 3, "wave", torch.float64), (14, 3, "sweeps", torch.float64),
              (9, 16, "wave", torch.float32), (9, 16, "sweeps", torch.float64), (12, 1, "wave", torch.float32),
              (2, 2, "wave", torch.float64), (3, 2, "sweeps", torch.float32), (14, 3, "wave-launches", torch.float64),
              (21, 4, "wave-launches", torch.float32), (12, 1, "wave-launches", torch.float32)]


@pytest.mark.parametrize("n,b,schedule,dtype", BAND_CASES, ids=str)
def test_band_to_tridiag_is_an_orthogonal_similarity(n, b, schedule, dtype, triton_backend):
    """Stage 2: bulge chasing turns the lower band (the upper triangle holds garbage, never read) into
    ``T`` with ``T = Q₂ᵀ B Q₂``; ``Q₂`` (the kept reflectors applied to ``I``) is orthogonal. Every
    schedule: the sweeps one after another, and every sweep in flight at once (14: 4 steps in the
    first sweep, 2 slots), in one launch or a launch a time step (21: 3 slots, 2 programs). Width 1 is already tridiagonal (no reflector changes anything), and a band
    wider than the matrix is a dense matrix."""
    from metalcore.linalg.eigh_band_triton import BACK_SCHEDULES, apply_band_reflectors, band_to_tridiag
    B = band_of((2,), n, b, dtype)
    S = B.tril() + torch.full_like(B, 7.0).triu(1)
    d, e, W = band_to_tridiag(S, b, True, schedule)
    assert d.shape == e.shape == (2, n) and bool((e[:, -1] == 0).all())
    T = torch.diag_embed(d) + torch.diag_embed(e[:, :-1], 1) + torch.diag_embed(e[:, :-1], -1)
    back = schedule if schedule in BACK_SCHEDULES else "wave"
    Q = apply_band_reflectors(W, torch.eye(n, dtype=dtype).expand(2, n, n).contiguous(), b, 8, back)
    assert_lapack_ratio(residual_ratio(B.double(), Q.double() @ T.double() @ Q.double().mT, dtype), "B = Q₂ T Q₂ᵀ")
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), "Q₂")
    # The back-transformation's schedule is chosen apart from stage 2's: the others read the same
    # reflectors and apply them in another order of disjoint steps, to rounding.
    for other in BACK_SCHEDULES:
        Q_other = apply_band_reflectors(W, torch.eye(n, dtype=dtype).expand(2, n, n).contiguous(), b, 8, other)
        assert (Q_other - Q).abs().max() <= 8 * torch.finfo(dtype).eps, other
    d2, e2, none = band_to_tridiag(B.tril() + torch.full_like(B, 7.0).triu(1), b, False, schedule)
    assert none is None and torch.equal(d2, d) and torch.equal(e2, e)
    if schedule == "wave-launches":   # the wave's windows, the same arithmetic: the same bits
        d3, e3, W3 = band_to_tridiag(B.tril() + torch.full_like(B, 7.0).triu(1), b, True, "wave")
        Q3 = apply_band_reflectors(W3, torch.eye(n, dtype=dtype).expand(2, n, n).contiguous(), b, 8, back)
        assert torch.equal(d3, d) and torch.equal(e3, e) and torch.equal(Q3, Q)
    if b == 1:
        assert torch.equal(d, B.diagonal(dim1=-2, dim2=-1)) and torch.equal(e[:, :-1], B.diagonal(-1, -2, -1))


def test_band_wave_takes_its_windows_in_chunks(triton_backend, monkeypatch):
    """More sweeps in flight than one window tile holds (n = 1024 at band 16 on a GPU: 32 slots, tiles
    of 16): with ``WAVE_TILE`` cut to one window the slots go one a chunk, and since the windows of a
    time step are independent the result is the same to the bit, reduction and back-transformation;
    the same for a sweep's reflectors in the 'sweep-tiles' back-transformation (4 a sweep at n = 14)."""
    from metalcore.linalg import eigh_band_triton as band
    B = band_of((1,), 14, 3, torch.float64)
    d, e, W = band.band_to_tridiag(B.clone(), 3, True, "wave")
    Q = band.apply_band_reflectors(W, torch.eye(14, dtype=torch.float64)[None].clone(), 3, 8, "wave")
    Qs = band.apply_band_reflectors(W, torch.eye(14, dtype=torch.float64)[None].clone(), 3, 8, "sweep-tiles")
    monkeypatch.setattr(band, "WAVE_TILE", 16)
    d1, e1, W1 = band.band_to_tridiag(B.clone(), 3, True, "wave")
    Q1 = band.apply_band_reflectors(W1, torch.eye(14, dtype=torch.float64)[None].clone(), 3, 8, "wave")
    assert torch.equal(d1, d) and torch.equal(e1, e) and torch.equal(Q1, Q)
    Qs1 = band.apply_band_reflectors(W1, torch.eye(14, dtype=torch.float64)[None].clone(), 3, 8, "sweep-tiles")
    assert torch.equal(Qs1, Qs)
    with pytest.raises(ValueError, match="schedule must be one of"):
        band.apply_band_reflectors(W1, torch.eye(14, dtype=torch.float64)[None].clone(), 3, 8, "diagonal")


# --- Tridiagonal eigensolver of any order (tridiag_eig_triton, stage 3 of the two-stage eigh) ------
# Against float64 LAPACK (torch.linalg.eigh of the dense T): LAPACK's residual, orthogonality and
# eigenvalue ratios, ascending order. Lanes of 8 or 16 give several programs a matrix, so that
# clusters and multiple eigenvalues cross the blocks' edges.

# 64 Sturm points a lane: 5 passes in fp32 and 10 in fp64 where bisection takes 28 and 55 — the same
# arithmetic in a fifth of the interpreter's dependent steps (each is ~3 ms of numpy calls).
FAST = 64


def dense(d, e):
    """The symmetric tridiagonal matrices of ``d`` ``(nb, n)`` and ``e`` (``e[:, i] = T[i, i+1]``), float64."""
    d, e = d.double(), e[:, :-1].double()
    return torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)


def assert_tridiag_eig(d, e, lam, Z, dtype, what):
    """LAPACK's ratios of ``(lam, Z)`` for ``T(d, e)``, no NaN, eigenvalues ascending."""
    nb, n = d.shape
    assert lam.shape == (nb, n) and Z.shape == (nb, n, n) and lam.dtype == Z.dtype == dtype, what + ": shapes"
    assert not lam.isnan().any() and not Z.isnan().any(), what + ": NaN"
    T = dense(d, e)
    L64, Z64 = lam.double(), Z.double()
    scale = T.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    assert_lapack_ratio(residual_ratio(T / scale, (Z64 * (L64 / scale[..., 0]).unsqueeze(-2)) @ Z64.mT, dtype),
                        what + " residual")
    assert_lapack_ratio(orthogonality_ratio(Z64, dtype), what + " Z")
    assert_lapack_ratio(values_ratio(L64, torch.linalg.eigvalsh(T), dtype), what + " eigenvalues")
    assert bool((lam[:, :-1] <= lam[:, 1:]).all()), what + ": ascending"


def glued_wilkinson(copies, glue):
    """``copies`` of Wilkinson's W21+ (diagonal |10 − i|, off-diagonal 1; its eigenvalues come in
    pairs equal to ~1e-14) joined by off-diagonals ``glue``: clusters of ``2 · copies`` eigenvalues
    within ~``glue``."""
    d = torch.arange(21, dtype=torch.float64).sub(10).abs().repeat(copies)
    e = torch.ones(21 * copies, dtype=torch.float64)
    e[20::21] = glue
    return d[None], e[None]


@pytest.fixture(params=["triton", "metal"])
def tridiag_solver(request):
    """The any-order tridiagonal eigensolver of each backend, called as the Triton one is
    (``solver(d, e, compute_v, lanes=..., sections=...)``; the Metal one takes neither option: one
    thread a lane, bisection). Metal has no float64: those cases are the Triton solver's alone."""
    if request.param == "metal":
        if request.node.callspec.params.get("dtype") == torch.float64:
            pytest.skip("Metal has no float64")
        request.getfixturevalue("metal_backend")
        from metalcore.linalg.tridiag_eig_metal import tridiag_eig_metal
        return lambda d, e, compute_v, lanes=None, sections=None: tridiag_eig_metal(d, e, compute_v)
    request.getfixturevalue("triton_backend")
    from metalcore.linalg.tridiag_eig_triton import tridiag_eig
    return tridiag_eig


@pytest.mark.parametrize("n,lanes,dtype", [(1, 8, torch.float32), (2, 8, torch.float64), (5, 8, torch.float32),
                                           (37, 8, torch.float64), (40, 16, torch.float32)], ids=str)
def test_tridiag_eig_random(n, lanes, dtype, tridiag_solver):
    """Random T, 2 matrices (1 from n = 37: the interpreter's time), given as non-contiguous views."""
    nb = 1 if n > 30 else 2
    d, e = torch.randn(2, n, nb, dtype=torch.float64).mT
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=lanes, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"random {nb}×{n} lanes={lanes} {dtype}")


def test_tridiag_eig_values_alone_are_the_values_beside_the_vectors(tridiag_solver):
    """The same launch of the values kernel either way (default sections: bisection, 28 passes)."""
    d, e = torch.randn(2, 1, 19)
    lam, Z = tridiag_solver(d, e, True, lanes=8)
    values, none = tridiag_solver(d, e, False, lanes=8)
    assert torch.equal(values, lam) and none.numel() == 0
    assert_tridiag_eig(d, e, lam, Z, torch.float32, "default sections")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_tridiag_eig_multiple_eigenvalues_across_blocks(dtype, tridiag_solver):
    """Multiplicities above ``lanes`` = 8: a diagonal T (e = 0) with eigenvalues of multiplicity 20, 10
    and 3 in shuffled order. Lanes seeded by their place in the block alone would repeat one start
    vector (and one shift) across blocks; a multiple eigenvalue's vectors may be any orthonormal basis
    of its subspace."""
    L0 = torch.tensor([1.0] * 20 + [2.0] * 10 + [5.0] * 3, dtype=torch.float64)
    d = L0[torch.randperm(33)][None]
    e = torch.zeros_like(d)
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"diagonal 1×20, 2×10, 5×3 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_tridiag_eig_identical_blocks(dtype, tridiag_solver):
    """5 identical random blocks of 7 (e = 0 at the seams): every eigenvalue 5 times, lanes = 8, so most
    groups of 5 cross an edge."""
    d, e = torch.randn(2, 1, 7, dtype=torch.float64).repeat(1, 1, 5)
    e[:, 6::7] = 0.0
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"5 identical blocks of 7 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_tridiag_eig_wilkinson(dtype, tridiag_solver):
    """W21+: pairs of eigenvalues equal to ~1e-14, lanes = 8."""
    d, e = glued_wilkinson(1, 0.0)
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"W21+ {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_tridiag_eig_glued_wilkinson(dtype, tridiag_solver):
    """Two W21+ glued by 1e-9: clusters of 4 within ~1e-9, some across an edge of lanes = 16 (42
    eigenvalues in 3 blocks)."""
    d, e = glued_wilkinson(2, 1e-9)
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=16, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"glued W21+ ×2 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tridiag_eig_cluster_straddles_a_block_edge(dtype, tridiag_solver):
    """Eigenvalues 5 to 10 of 16 within ~1e-4 of each other (closer than ORTOL_N / n = 0.016, far apart
    for the shifts), lanes = 8: the cluster's lanes sit in both blocks, and Gram-Schmidt must cross."""
    from metalcore.linalg.eigh_tridiag_triton import ORTOL_N
    d = torch.cat([torch.linspace(-1, -0.2, 5), 0.3 + 1e-4 * torch.arange(6), torch.linspace(0.6, 1, 5)])
    d = d.double()[None]
    e = 1e-5 * torch.randn_like(d)
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    gaps = lam.double().diff()[0]
    assert bool((gaps[5:10] < ORTOL_N / 16).all()) and bool((gaps[[4, 10]] > ORTOL_N / 16).all()), "one cluster, 5..10"
    assert_tridiag_eig(d, e, lam, Z, dtype, f"cluster across lanes 7|8 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_tridiag_eig_one_cluster_of_36_unsplit(dtype, tridiag_solver):
    """36 eigenvalues within ~2e-4 of 0.3 (closer than ORTOL_N / n = 0.007) and off-diagonals 1e-5 to
    2e-5, above the split tolerance: one cluster across 5 blocks of lanes, Gram-Schmidt in 3 blocks of
    16 (two projections by tl.dot)."""
    torch.manual_seed(6)
    d = (0.3 + 1e-5 * torch.randn(1, 36)).double()
    e = 1e-5 * (1.0 + torch.rand(1, 36, dtype=torch.float64))
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert float(lam[0, -1] - lam[0, 0]) < 0.25 / 36, "one cluster"
    assert_tridiag_eig(d, e, lam, Z, dtype, f"one cluster of 36 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tridiag_eig_splits_at_rounding_level_off_diagonals(dtype, tridiag_solver):
    """The tridiagonal form of a rank-deficient matrix: an eigenvalue 0 of multiplicity 24 whose rows
    are coupled by off-diagonals of a few ε (what the reduction leaves), beside a random block of 16,
    in shuffled order. T splits there (split_blocks), so each zero's vector lies on its own block's
    rows, without a cluster of 24 to orthogonalise; the eigenvalues are T's to LAPACK's ratios."""
    from metalcore.linalg.tridiag_host import segments, split_blocks
    torch.manual_seed(7)
    n, eps = 40, torch.finfo(dtype).eps
    d = torch.zeros(1, n, dtype=torch.float64)
    e = 3 * eps * torch.randn(1, n, dtype=torch.float64)
    rows = torch.randperm(n - 15)[:2].sort().values     # two random blocks of 8 among the zeros
    for r in rows + torch.tensor([0, 8]):
        d[0, r:r + 8] = torch.randn(8, dtype=torch.float64)
        e[0, r:r + 7] = torch.rand(7, dtype=torch.float64) + 0.5
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert_tridiag_eig(d, e, lam, Z, dtype, f"zeros split by {e[0, 0]:.1e}-size off-diagonals {dtype}")
    scaled = (e / torch.maximum(d.abs().amax(), e[:, :-1].abs().amax())).to(dtype)
    first, last = segments(split_blocks(scaled, eps))
    assert int((first == last).sum()) >= 24, "every zero row its own block"
    support = Z[0].abs() > 0
    rows_of = torch.arange(n)[:, None].expand(n, n)
    lo = torch.where(support, rows_of, n).amin(0)
    hi = torch.where(support, rows_of, -1).amax(0)
    assert torch.equal(first[0, lo], first[0, hi]), "each vector on one block's rows"


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_tridiag_eig_zero_and_extreme_scales(dtype, tridiag_solver):
    """The zero matrix: eigenvalues exactly 0 (not bisection's ±pivmin), the unit vectors (T splits
    at every row). T scaled by 1e30 and 1e-30 (its squares over- and underflow fp32)."""
    zero = torch.zeros(1, 36, dtype=dtype)
    lam, Z = tridiag_solver(zero, zero, True, lanes=8, sections=FAST)
    assert torch.equal(lam, zero), f"zero matrix: {lam}"
    assert_lapack_ratio(orthogonality_ratio(Z, dtype), f"zero {dtype} Z")
    d, e = torch.randn(2, 2, 13, dtype=torch.float64)
    for scale in (1e30, 1e-30):
        lam, Z = tridiag_solver((d * scale).to(dtype), (e * scale).to(dtype), True, lanes=8, sections=FAST)
        assert_tridiag_eig(d * scale, e * scale, lam, Z, dtype, f"scale {scale:g} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_tridiag_eig_nan_stays_in_its_matrix(dtype, tridiag_solver):
    """NaN in one matrix's d and Inf in another's e give NaN eigenvalues and vectors there only; the
    last column of e is not read (Inf there changes nothing)."""
    d, e = torch.randn(2, 4, 11, dtype=torch.float64)
    d[1, 3] = float("nan")
    e[2, 0] = float("inf")
    e[0, -1] = float("inf")
    lam, Z = tridiag_solver(d.to(dtype), e.to(dtype), True, lanes=8, sections=FAST)
    assert bool(lam[1:3].isnan().all()) and bool(Z[1:3].isnan().all())
    assert_tridiag_eig(d[[0, 3]], e[[0, 3]], lam[[0, 3]], Z[[0, 3]], dtype, f"finite matrices beside NaN {dtype}")



@pytest.fixture(params=["triton", "metal"])
def tridiag_plan(request):
    """``(prepare(d, e, block), vector_plan(problem, LS, block))`` of each backend: the Triton launches
    (``block``: entries a tile) and the Metal shaders (one thread a matrix; float32 only)."""
    if request.param == "metal":
        if request.node.callspec.params.get("dtype") == torch.float64:
            pytest.skip("Metal has no float64")
        request.getfixturevalue("metal_backend")
        from metalcore import _metal
        from metalcore.linalg import tridiag_eig_metal as m
        lib = lambda x: _metal.library(m.SHADER, x.device)           # noqa: E731
        return (lambda d, e, block: m.prepare_metal(lib(d), d, e),
                lambda problem, LS, block: m.vector_plan_metal(lib(LS), problem, LS))
    request.getfixturevalue("triton_backend")
    from metalcore.linalg import tridiag_plan_triton as t
    return (lambda d, e, block: t.prepare(d, e, block=block),
            lambda problem, LS, block: t.vector_plan(problem, LS, block=block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,block", [(1, None), (2, None), (7, None), (70, 16), (129, 32), (300, None)], ids=str)
def test_tridiag_plan_kernels_are_the_torch_steps(n, block, dtype, tridiag_plan):
    """Each backend's fused steps around the stage-3 kernels (Triton: tridiag_plan_triton's two launches;
    Metal: two one-thread-a-matrix shaders) give exactly what tridiag_host's torch steps give: every
    output equal, over tiles smaller than n (the Triton scans' carries), splits at rounding level,
    groups of eigenvalues within a few ε and clusters, a zero matrix, NaN and Inf in d and e, NaN in e's
    unread last column."""
    from metalcore.linalg import tridiag_host
    prepare, vector_plan = tridiag_plan
    torch.manual_seed(n)
    nb, eps = 5, torch.finfo(dtype).eps
    d, e = torch.randn(2, nb, n, dtype=dtype)
    e[:, ::5] = eps * torch.rand(nb, len(range(0, n, 5)), dtype=dtype)    # splits
    d[1], e[1] = 0.0, 0.0
    d[2, min(3, n - 1)] = float("nan")
    e[3, 0] = float("inf")
    e[0, n - 1] = float("nan")
    torch_steps, fused = tridiag_host.prepare(d, e), prepare(d, e, block)
    for field in ("D", "E", "scale", "finite", "first_row", "last_row", "low", "high"):
        expected, got = getattr(torch_steps, field), getattr(fused, field)
        assert got.dtype == expected.dtype and torch.equal(got, expected), f"{field}: {got} != {expected}"
    if n > 1:
        assert int((fused.first_row[4] == torch.arange(n)).sum()) > 1, "T splits"
    LS = torch.randn(nb, n, dtype=dtype).sort(1).values
    LS[:, 1::3] = LS[:, 0::3][:, : LS[:, 1::3].shape[1]] + 2 * eps     # groups within TIGHT · ε
    for got, expected, name in zip(vector_plan(fused, LS, block),
                                   tridiag_host.vector_plan(torch_steps, LS), ("shift", "first", "todo", "count")):
        assert got.dtype == expected.dtype and torch.equal(got, expected), f"{name}: {got} != {expected}"


def test_sturm_kernels_take_the_smallest_pivot_as_a_constexpr(triton_backend):
    """A Python float argument reaches a compiled Triton kernel as fp32, where float64's smallest
    normal (2.2e-308) is 0: a zero pivot then stays zero, and with ``e = 0`` after it (a split T) the
    rest of the Sturm recurrence is NaN. As a constexpr it is compiled in as a float64 constant
    (checked in the sm_90 PTX, bench/linalg_triton.md). The interpreter keeps Python floats as
    float64, so only the signature can be checked here."""
    import inspect

    import triton.language as tl

    from metalcore.linalg import eigh_tridiag_triton, svd_bidiag_triton, tridiag_eig_triton, tridiag_plan_triton
    for kernel, name in ((eigh_tridiag_triton._tridiag_eigh_kernel, "PIVMIN"),
                         (svd_bidiag_triton._bidiag_svd_kernel, "PIVMIN"), (tridiag_eig_triton._values_kernel, "PIVMIN"),
                         (tridiag_plan_triton._prepare_kernel, "TINY")):
        parameters = inspect.signature(kernel.fn).parameters
        assert parameters[name].annotation in (tl.constexpr, "tl.constexpr"), kernel.fn.__name__


def test_tridiag_eig_rejects_bad_arguments(triton_backend):
    from metalcore.linalg.tridiag_eig_triton import tridiag_eig
    d = torch.randn(2, 5)
    with pytest.raises(ValueError, match="lanes"):
        tridiag_eig(d, d, True, lanes=12)
    with pytest.raises(ValueError, match="float32 or float64"):
        tridiag_eig(d, d.double(), True)
    with pytest.raises(ValueError, match=r"\(nb, n\)"):
        tridiag_eig(d[0], d[0], True)
    lam, Z = tridiag_eig(d[:, :0], d[:, :0], True)
    assert lam.shape == (2, 0) and Z.shape == (2, 0, 0)


# --- The two-stage path end to end (eigh_twostage) -----------------------------------------------


@pytest.mark.parametrize("dtype,kinds", [(torch.float32, KINDS[:4]), (torch.float64, KINDS[3:])], ids=str)
def test_twostage_eigh_matrix_families(dtype, kinds, triton_backend):
    """The matrix families in two batches (n = 12, band 3: 3 panels, bulges; lanes of 32), the upper
    triangle read in fp64 with garbage in the lower; without vectors the same eigenvalues bit for bit
    (the same reduction and bisection)."""
    from metalcore.linalg.eigh_twostage import eigh_twostage
    torch.manual_seed(4)
    A = torch.cat([family(kind, (1,), 12, dtype) for kind in kinds])
    UPLO = "L" if dtype == torch.float32 else "U"
    G = with_garbage(A, UPLO)
    L, Q = eigh_twostage(G, UPLO == "U", True, band=3, sections=FAST)
    for i, kind in enumerate(kinds):
        assert_tridiag_eigh(A[i:i + 1], L[i:i + 1], Q[i:i + 1], dtype, f"two-stage {kind} {dtype}")
    values, none = eigh_twostage(G, UPLO == "U", False, band=3, sections=FAST)
    assert torch.equal(values, L) and none.numel() == 0


def test_twostage_eigh_repeated_eigenvalues_and_the_sequential_schedule(triton_backend):
    """Multiplicities 8, 4 and 3 at n = 15 (band 3): each cluster's vectors span its subspace; with
    the sweeps one after another, the same to LAPACK's bounds."""
    from metalcore.linalg.eigh_twostage import eigh_twostage
    torch.manual_seed(5)
    Q0, _ = torch.linalg.qr(torch.randn(1, 15, 15, dtype=torch.float64))
    A = Q0 @ torch.diag_embed(torch.tensor([1.0] * 8 + [2.0] * 4 + [5.0] * 3, dtype=torch.float64)) @ Q0.mT
    L, Q = eigh_twostage(A.float(), False, True, band=3, sections=FAST)
    assert_tridiag_eigh(A, L, Q, torch.float32, "repeated, wave")
    L2, Q2 = eigh_twostage(A.float(), False, True, band=3, schedule="sweeps", back_schedule="sweeps",
                          sections=FAST)
    assert_tridiag_eigh(A, L2, Q2, torch.float32, "repeated, sweeps")


@pytest.fixture(params=["triton", "metal"])
def twostage_route(request, monkeypatch):
    """``(backend, n)``: the backend whose ``twostage`` path the routing tests force, entered, and the
    order they use: 9 on Triton (the interpreter's time; the path's lower bound moved to n = 1, and the
    default band of 16 > 9: stage 1 has nothing to do, stage 2 chases a dense 9²), 70 on Metal (above
    the Jacobi shader's tile, where the path is the kernel's only when forced)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
        from metalcore.linalg import eigh_triton
        monkeypatch.setattr(eigh_triton, "TWOSTAGE_MIN_N", 1)
        return "triton", 9
    request.getfixturevalue("metal_backend")
    return "metal", 70


def test_twostage_eigh_nan_stays_in_its_matrix_and_serves_the_op_when_routed(twostage_route):
    """Through ``metalcore.linalg.eigh`` with the path forced: batch shape (3, 1), NaN in one matrix
    (that matrix only is NaN); ``eigvalsh`` agrees; an empty batch and n = 1."""
    from metalcore import _selection
    _, n = twostage_route
    A = symmetric((3, 1), n, torch.float32)
    A[1, 0, 5, 2] = float("nan")
    with _selection.use_path("eigh", "twostage"):
        L, Q = metalcore.linalg.eigh(A)
        assert torch.equal(metalcore.linalg.eigvalsh(A).nan_to_num(), L.nan_to_num())
        assert metalcore.linalg.eigh(torch.zeros(0, 3, 3))[1].shape == (0, 3, 3)
        one = torch.tensor([[[-2.5]]])
        L1, Q1 = metalcore.linalg.eigh(one)
        assert torch.equal(L1, one[..., 0]) and torch.equal(Q1, torch.ones_like(one))
    assert L.shape == (3, 1, n) and Q.shape == (3, 1, n, n)
    assert L[1, 0].isnan().all() and Q[1, 0].isnan().all()
    assert_tridiag_eigh(A[[0, 2]], L[[0, 2]], Q[[0, 2]], torch.float32, "the other matrices")


def test_twostage_eigh_gradient_matches_the_reference(twostage_route):
    """Autograd through the forced path: torch's formulas on its outputs, so the gradient of a
    sign-invariant function of ``(L, Q)`` equals the reference backend's (float64 on Triton; Metal has
    only float32)."""
    from metalcore import _selection
    backend, _ = twostage_route
    dtype, tol = (torch.float64, 1e-9) if backend == "triton" else (torch.float32, 1e-3)
    A = symmetric((1,), 9, dtype).requires_grad_()

    def loss(L, Q):
        return ((Q * torch.exp(L / 4).unsqueeze(-2)) @ Q.mT).sum() + (L ** 2).sum()

    with _selection.use_path("eigh", "twostage"):
        grad, = torch.autograd.grad(loss(*metalcore.linalg.eigh(A)), A)
    with metalcore.use_backend("reference"):
        expected, = torch.autograd.grad(loss(*metalcore.linalg.eigh(A)), A)
    torch.testing.assert_close(grad, expected, rtol=tol, atol=tol)


def test_twostage_path_is_offered_above_the_register_tile(triton_backend):
    from metalcore import _selection
    from metalcore.linalg import eigh_triton
    supported = _selection.paths("eigh", "triton")["twostage"].supports
    assert supported(torch.zeros(1, 129, 129), "L", True) and not supported(torch.zeros(1, 128, 128), "L", True)
    assert not supported(torch.zeros(1, 200, 200, dtype=torch.float16), "L", True)
    assert eigh_triton.TWOSTAGE_MIN_N == 129


# --- The two-stage path on Metal (eigh_twostage_metal: the shaders through the executor) -----------


def test_twostage_eigh_metal_matrix_families(metal_backend, poison):
    """Every matrix family in float32 through the Metal stages at n = 12 (band 3: 3 panels of the panel
    shader, bulges) and n = 70 (above the Jacobi shader's tile of 64; the default band 16), the upper
    triangle read with garbage in the lower; without vectors the same eigenvalues bit for bit; a band
    wider than the shader's window is refused. ``poison``: every entry a shader reads was written."""
    from metalcore.linalg.eigh_twostage_metal import eigh_twostage_metal
    torch.manual_seed(8)
    for n, band, kinds in ((12, 3, KINDS), (70, 16, ("random", "rank", "cluster"))):
        A = torch.cat([family(kind, (1,), n, torch.float32) for kind in kinds])
        G = with_garbage(A, "U")
        L, Q = eigh_twostage_metal(G, True, True, band=band)
        for i, kind in enumerate(kinds):
            assert_tridiag_eigh(A[i:i + 1], L[i:i + 1], Q[i:i + 1], torch.float32, f"Metal two-stage {kind} n={n}")
        values, none = eigh_twostage_metal(G, True, False, band=band)
        assert torch.equal(values, L) and none.numel() == 0
    with pytest.raises(ValueError, match=r"band must be in \[1, 32\]; got 33"):
        eigh_twostage_metal(torch.zeros(1, 40, 40), False, True, band=33)


def test_twostage_eigh_metal_is_taken_only_when_forced(metal_backend):
    """Not timed on Apple hardware, so not automatic: above the Jacobi tile the Metal backend leaves
    eigh to the reference unless ``use_path`` forces the two-stage path (or a measured table names it);
    forced, a float64 input (no such type on Apple GPUs) is refused, not silently sent elsewhere."""
    from metalcore import _selection
    from metalcore._backend import BackendUnavailableError
    from metalcore.linalg.eigh import eigh_op
    A = symmetric((2,), 70, torch.float32)
    assert eigh_op.backend_for(A, "L", True) == "reference"
    with _selection.use_path("eigh", "twostage"):
        assert eigh_op.backend_for(A, "L", True) == "metal"
        with pytest.raises(BackendUnavailableError, match="does not take this input"):
            metalcore.linalg.eigh(A.double())
