"""Every public function, fed bad inputs, raises the documented error with a message that names the
argument — or, where that is the contract, propagates NaN (DESIGN.md §4).

The table below describes each function once: how to build good arguments, which of them are
matrices/tensors, and which structural rules apply. The cases are generated from it:

* ``rank``      — a tensor argument with too few dimensions        → ValueError naming it
* ``dtype``     — integer, bool and complex tensors                  → TypeError naming it
* ``square``    — a non-square matrix where a square one is needed  → ValueError naming it
* ``device``    — one tensor on another device (``meta``)            → RuntimeError naming both
* ``batch``     — batch dimensions that cannot broadcast             → ValueError naming both
* ``empty``     — a zero-size batch                                  → works, returns empty results
* ``nonfinite`` — NaN/Inf in the input                               → NaN out or LinAlgError
* ``extra``     — function-specific cases (bad option values, non-PD, singular, ...)
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import metalcore


def spd(*shape):
    """A symmetric positive-definite (*batch, n, n) stack from shape (*batch, n)."""
    X = torch.randn(*shape, shape[-1], dtype=torch.float64)
    return X @ X.mT + shape[-1] * torch.eye(shape[-1], dtype=torch.float64)


@dataclass
class Spec:
    fn: Callable
    make: Callable[[tuple], dict]          # batch shape -> good keyword arguments
    tensors: tuple[str, ...]               # tensor arguments, in signature order
    min_dim: dict[str, int] = field(default_factory=dict)   # default 2 (matrices)
    square: tuple[str, ...] = ()
    batched: tuple[str, ...] = ()          # arguments whose batch dims must broadcast together
    dtypes_ok: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    nonfinite: str = "nan-or-linalgerror"  # or "nan" (must propagate) or "skip" (documented below)
    extra: tuple[tuple[str, Callable[[], dict], type, str], ...] = ()


def _call(spec: Spec, kwargs: dict):
    return spec.fn(**kwargs)


SPECS: dict[str, Spec] = {
    "linalg.cholesky": Spec(
        metalcore.linalg.cholesky, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",),
        extra=(("not-positive-definite", lambda: {"A": -spd(3, 4)}, torch.linalg.LinAlgError, "(?i)batch element 0"),
               ("upper-not-bool", lambda: {"A": spd(4), "upper": "yes"}, ValueError, "upper"))),
    "linalg.cholesky_ex": Spec(
        metalcore.linalg.cholesky_ex, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",), nonfinite="skip",
        extra=(("check-errors", lambda: {"A": -spd(2, 4), "check_errors": True}, torch.linalg.LinAlgError,
                "(?i)batch element 0"),)),
    "cholesky": Spec(metalcore.cholesky, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",)),
    "linalg.solve_triangular": Spec(
        lambda A, B, **kw: metalcore.linalg.solve_triangular(A, B, upper=False, **kw),
        lambda b: {"A": spd(*b, 4).tril(), "B": torch.randn(*b, 4, 2, dtype=torch.float64)},
        ("A", "B"), square=("A",), batched=("A", "B"), nonfinite="nan",
        extra=(("rows-mismatch", lambda: {"A": spd(4).tril(), "B": torch.randn(5, 2, dtype=torch.float64)},
                ValueError, "B must have 4 rows"),
               ("dtype-mismatch", lambda: {"A": spd(4).tril(), "B": torch.randn(4, 2)}, TypeError, "same dtype"))),
    "linalg.cholesky_solve": Spec(
        metalcore.linalg.cholesky_solve,
        lambda b: {"B": torch.randn(*b, 4, 2, dtype=torch.float64), "L": torch.linalg.cholesky(spd(*b, 4))},
        ("B", "L"), square=("L",), batched=("B", "L"), nonfinite="nan"),
    "linalg.svd_lowrank": Spec(
        lambda A, **kw: metalcore.linalg.svd_lowrank(A, q=2, **kw),
        lambda b: {"A": torch.randn(*b, 6, 5, dtype=torch.float64)}, ("A",)),
    "trsm": Spec(
        metalcore.trsm, lambda b: {"A": spd(*b, 4).tril(), "B": torch.randn(*b, 4, 2, dtype=torch.float64)},
        ("A", "B"), square=("A",), batched=("A", "B"), nonfinite="nan"),
    "rms_norm": Spec(
        lambda input, **kw: metalcore.rms_norm(input, (8,), **kw),
        lambda b: {"input": torch.randn(*b, 8), "weight": torch.randn(8)}, ("input", "weight"),
        min_dim={"input": 1, "weight": 1}, dtypes_ok=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        nonfinite="nan",
        extra=(("shape-mismatch", lambda: {"input": torch.randn(3, 7)}, ValueError, "normalized_shape"),
               ("weight-shape", lambda: {"input": torch.randn(3, 8), "weight": torch.randn(7)}, ValueError,
                "weight must have shape"))),
    "fused_add_rms_norm": Spec(
        metalcore.fused_add_rms_norm,
        lambda b: {"input": torch.randn(*b, 8), "residual": torch.randn(*b, 8), "weight": torch.randn(8)},
        ("input", "residual", "weight"), min_dim={"input": 1, "residual": 1, "weight": 1},
        dtypes_ok=(torch.float16, torch.bfloat16, torch.float32, torch.float64), nonfinite="nan",
        extra=(("residual-shape", lambda: {"input": torch.randn(3, 8), "residual": torch.randn(2, 8),
                                           "weight": torch.randn(8)}, ValueError, "residual must have"),)),
    "MetalRMSNorm": Spec(
        lambda input: metalcore.MetalRMSNorm(8)(input), lambda b: {"input": torch.randn(*b, 8)}, ("input",),
        min_dim={"input": 1}, dtypes_ok=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        nonfinite="nan"),
}


_TRAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECS.update({
    "metal_gelu": Spec(
        metalcore.nn.metal_gelu, lambda b: {"input": torch.randn(*b, 8)}, ("input",), min_dim={"input": 0},
        dtypes_ok=_TRAIN_DTYPES, nonfinite="nan",
        extra=(("approximate", lambda: {"input": torch.randn(3), "approximate": "erf"}, ValueError,
                "approximate must be one of"),)),
    "metal_silu": Spec(metalcore.nn.metal_silu, lambda b: {"input": torch.randn(*b, 8)}, ("input",),
                       min_dim={"input": 0}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan"),
    "MetalGELU": Spec(lambda input: metalcore.nn.MetalGELU("tanh")(input), lambda b: {"input": torch.randn(*b, 8)},
                      ("input",), min_dim={"input": 0}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan"),
    "MetalSiLU": Spec(lambda input: metalcore.nn.MetalSiLU()(input), lambda b: {"input": torch.randn(*b, 8)},
                      ("input",), min_dim={"input": 0}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan"),
    "swiglu": Spec(
        metalcore.nn.swiglu, lambda b: {"gate": torch.randn(*b, 8), "up": torch.randn(*b, 8)}, ("gate", "up"),
        min_dim={"gate": 0, "up": 0}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan",
        extra=(("shape-mismatch", lambda: {"gate": torch.randn(3, 8), "up": torch.randn(3, 7)}, ValueError,
                "same shape"),)),
    "MetalSwiGLUMLP": Spec(lambda input: metalcore.nn.MetalSwiGLUMLP(8, 12)(input),
                           lambda b: {"input": torch.randn(*b, 8)}, ("input",), min_dim={"input": 1},
                           dtypes_ok=(torch.float32,), nonfinite="nan"),
    "swiglu_linear": Spec(
        metalcore.nn.swiglu_linear,
        lambda b: {"gate": torch.randn(*b, 8), "up": torch.randn(*b, 8), "weight": torch.randn(5, 8)},
        ("gate", "up", "weight"), min_dim={"gate": 1, "up": 1}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan",
        extra=(("weight-shape", lambda: {"gate": torch.randn(3, 8), "up": torch.randn(3, 8),
                                         "weight": torch.randn(5, 7)}, ValueError, "weight must have shape"),)),
    "fused_linear_cross_entropy": Spec(
        metalcore.nn.fused_linear_cross_entropy,
        lambda b: {"hidden": torch.randn(*b, 3, 8), "weight": torch.randn(11, 8),
                   "target": torch.randint(0, 11, (*b, 3))},
        ("hidden", "weight"), min_dim={"hidden": 1}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan",
        extra=(("target-shape", lambda: {"hidden": torch.randn(3, 8), "weight": torch.randn(11, 8),
                                         "target": torch.zeros(4, dtype=torch.long)}, ValueError,
                "target must have shape"),
               ("reduction", lambda: {"hidden": torch.randn(3, 8), "weight": torch.randn(11, 8),
                                      "target": torch.zeros(3, dtype=torch.long), "reduction": "avg"}, ValueError,
                "reduction must be one of"))),
    "FusedLinearCrossEntropyLoss": Spec(
        lambda hidden, weight, target: metalcore.nn.FusedLinearCrossEntropyLoss()(hidden, weight, target),
        lambda b: {"hidden": torch.randn(*b, 3, 8), "weight": torch.randn(11, 8),
                   "target": torch.randint(0, 11, (*b, 3))},
        ("hidden", "weight"), min_dim={"hidden": 1}, dtypes_ok=_TRAIN_DTYPES, nonfinite="nan"),
    "apply_rotary_pos_emb": Spec(
        metalcore.nn.apply_rotary_pos_emb,
        lambda b: {"q": torch.randn(*b, 4, 5, 8), "k": torch.randn(*b, 2, 5, 8), "cos": torch.randn(1, 5, 8),
                   "sin": torch.randn(1, 5, 8)},
        ("q", "k", "cos", "sin"), min_dim={"q": 4, "k": 4, "cos": 3, "sin": 3}, dtypes_ok=_TRAIN_DTYPES,
        nonfinite="nan",
        extra=(("odd-head-dim", lambda: {"q": torch.randn(1, 2, 5, 7), "k": torch.randn(1, 2, 5, 7),
                                         "cos": torch.randn(1, 5, 7), "sin": torch.randn(1, 5, 7)},
                ValueError, "head_dim must be even"),)),
    "metal_scaled_dot_product_attention": Spec(
        metalcore.nn.metal_scaled_dot_product_attention,
        lambda b: {"query": torch.randn(*b, 4, 5, 8), "key": torch.randn(*b, 4, 6, 8),
                   "value": torch.randn(*b, 4, 6, 8)},
        ("query", "key", "value"), batched=("query", "key", "value"), dtypes_ok=_TRAIN_DTYPES, nonfinite="nan",
        extra=(("mask-and-causal", lambda: {"query": torch.randn(4, 5, 8), "key": torch.randn(4, 6, 8),
                                            "value": torch.randn(4, 6, 8), "is_causal": True,
                                            "attn_mask": torch.ones(5, 6, dtype=torch.bool)},
                ValueError, "attn_mask must be None when is_causal=True"),)),
})

_F64 = dict(dtype=torch.float64)


def _mat(*shape):
    return torch.randn(*shape, **_F64)


def _reflectors(b, m=5, k=3):
    QR, tau = torch.geqrf(_mat(*b, m, k))
    return QR, tau


SPECS.update({
    "linalg.svd": Spec(metalcore.linalg.svd, lambda b: {"A": _mat(*b, 5, 3)}, ("A",)),
    "linalg.svdvals": Spec(metalcore.linalg.svdvals, lambda b: {"A": _mat(*b, 3, 5)}, ("A",)),
    "svd": Spec(metalcore.svd, lambda b: {"A": _mat(*b, 5, 3)}, ("A",)),
    "linalg.qr": Spec(
        metalcore.linalg.qr, lambda b: {"A": _mat(*b, 5, 3)}, ("A",), nonfinite="nan",
        extra=(("mode", lambda: {"A": _mat(4, 3), "mode": "economic"}, ValueError, "mode"),)),
    "qr": Spec(metalcore.qr, lambda b: {"A": _mat(*b, 4, 4)}, ("A",), nonfinite="nan"),
    "qr_batched": Spec(metalcore.qr_batched, lambda b: {"A": _mat(*b, 4, 4)}, ("A",), nonfinite="nan"),
    "linalg.eigh": Spec(
        metalcore.linalg.eigh, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",),
        extra=(("UPLO", lambda: {"A": spd(4), "UPLO": "X"}, ValueError, "UPLO"),)),
    "linalg.eigvalsh": Spec(metalcore.linalg.eigvalsh, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",)),
    "eigh": Spec(metalcore.eigh, lambda b: {"A": spd(*b, 4)}, ("A",), square=("A",)),
    "linalg.solve": Spec(
        metalcore.linalg.solve, lambda b: {"A": spd(*b, 4), "B": _mat(*b, 4, 2)}, ("A", "B"), square=("A",),
        batched=("A", "B"), nonfinite="nan-or-linalgerror",
        extra=(("singular", lambda: {"A": torch.zeros(3, 4, 4, **_F64), "B": _mat(3, 4, 2)},
                torch.linalg.LinAlgError, "(?i)batch element 0"),
               ("rows-mismatch", lambda: {"A": spd(4), "B": _mat(5, 2)}, (ValueError, RuntimeError), "B"))),
    "linalg.solve_ex": Spec(
        metalcore.linalg.solve_ex, lambda b: {"A": spd(*b, 4), "B": _mat(*b, 4, 2)}, ("A", "B"), square=("A",),
        batched=("A", "B"), nonfinite="skip",
        extra=(("check-errors", lambda: {"A": torch.zeros(2, 4, 4, **_F64), "B": _mat(2, 4, 2),
                                         "check_errors": True}, torch.linalg.LinAlgError, "(?i)batch element 0"),)),
    "solve": Spec(metalcore.solve, lambda b: {"A": spd(*b, 4), "B": _mat(*b, 4, 2)}, ("A", "B"), square=("A",),
                  batched=("A", "B")),
    "linalg.lstsq": Spec(
        metalcore.linalg.lstsq, lambda b: {"A": _mat(*b, 5, 3), "B": _mat(*b, 5, 2)}, ("A", "B"),
        batched=("A", "B"),
        extra=(("driver", lambda: {"A": _mat(5, 3), "B": _mat(5, 2), "driver": "gesvd"}, ValueError, "driver"),
               ("rows-mismatch", lambda: {"A": _mat(5, 3), "B": _mat(4, 2)}, (ValueError, RuntimeError), "B"))),
    "lstsq": Spec(metalcore.lstsq, lambda b: {"A": _mat(*b, 5, 3), "B": _mat(*b, 5, 2)}, ("A", "B"),
                  batched=("A", "B")),
    "linalg.pinv": Spec(metalcore.linalg.pinv, lambda b: {"A": _mat(*b, 5, 3)}, ("A",)),
    "pinv": Spec(metalcore.pinv, lambda b: {"A": _mat(*b, 3, 5)}, ("A",)),
    "polar": Spec(
        metalcore.polar, lambda b: {"A": _mat(*b, 5, 3)}, ("A",),
        extra=(("method", lambda: {"A": _mat(4, 4), "method": "halley"}, ValueError, "method"),
               ("svd-with-steps", lambda: {"A": _mat(4, 4), "steps": 3}, ValueError, "steps"),
               ("steps-zero", lambda: {"A": _mat(4, 4), "method": "newton_schulz", "steps": 0}, ValueError,
                "steps"),
               ("steps-bool", lambda: {"A": _mat(4, 4), "method": "newton_schulz", "steps": True}, ValueError,
                "steps"),
               ("polar-express-steps", lambda: {"A": _mat(4, 4), "method": "polar_express", "steps": 6},
                ValueError, "steps"),
               ("compute-dtype", lambda: {"A": _mat(4, 4), "method": "newton_schulz", "dtype": torch.int32},
                ValueError, "dtype"),
               ("negative-eps", lambda: {"A": _mat(4, 4), "method": "polar_express", "eps": -1.0}, ValueError,
                "eps"))),
    "geqr2": Spec(metalcore.geqr2, lambda b: {"A": _mat(*b, 5, 3)}, ("A",), nonfinite="nan"),
    "larft": Spec(
        metalcore.larft, lambda b: dict(zip(("V", "tau"), _reflectors(b))), ("V", "tau"),
        min_dim={"tau": 1}, batched=("V", "tau"), nonfinite="nan"),
    "larfb": Spec(
        metalcore.larfb,
        lambda b: {"V": _reflectors(b)[0], "T": metalcore.larft(*_reflectors(b)), "C": _mat(*b, 5, 2)},
        ("V", "T", "C"), square=("T",), batched=("V", "T", "C"), nonfinite="nan",
        extra=(("rows-mismatch", lambda: {"V": _reflectors(())[0], "T": metalcore.larft(*_reflectors(())),
                                          "C": _mat(4, 2)}, ValueError, "C must have 5"),)),
    "linalg.householder_product": Spec(
        metalcore.linalg.householder_product, lambda b: dict(zip(("A", "tau"), _reflectors(b))), ("A", "tau"),
        min_dim={"tau": 1}, batched=("A", "tau"), nonfinite="nan",
        extra=(("too-many-reflectors", lambda: {"A": _mat(5, 3), "tau": _mat(4)}, ValueError, "tau"),)),
})


def _cases():
    for name, spec in SPECS.items():
        for arg in spec.tensors:
            if spec.min_dim.get(arg, 2) > 0:  # elementwise ops take any rank, 0-d included
                yield name, "rank", arg
            yield name, "dtype", arg
        for arg in spec.square:
            yield name, "square", arg
        if len(spec.tensors) > 1:
            yield name, "device", spec.tensors[-1]
        if len(spec.batched) > 1:
            yield name, "batch", spec.batched[-1]
        yield name, "empty", None
        if spec.nonfinite != "skip":
            yield name, "nonfinite", None
        for label, *_ in spec.extra:
            yield name, "extra", label


CASES = list(_cases())


@pytest.mark.parametrize("name,kind,arg", CASES, ids=[f"{n}-{k}-{a}" for n, k, a in CASES])
def test_bad_input(name, kind, arg):
    spec = SPECS[name]
    kwargs = spec.make((2,))
    if kind == "rank":
        lo = spec.min_dim.get(arg, 2)
        kwargs[arg] = kwargs[arg].reshape(-1)[:1].reshape(()) if lo == 1 else kwargs[arg][(0,) * (kwargs[arg].dim() - lo + 1)]
        with pytest.raises(ValueError, match=rf"{arg}\b"):
            _call(spec, kwargs)
    elif kind == "dtype":
        for bad in (torch.int32, torch.int64, torch.bool, torch.complex64):
            bad_kwargs = dict(kwargs)
            bad_kwargs[arg] = kwargs[arg].to(bad) if not bad.is_complex else kwargs[arg].to(torch.float32).to(bad)
            with pytest.raises(TypeError, match=rf"{arg}\b.*dtype"):
                _call(spec, bad_kwargs)
    elif kind == "square":
        kwargs[arg] = torch.cat([kwargs[arg], kwargs[arg][..., :1, :]], dim=-2)
        with pytest.raises(ValueError, match=rf"{arg} must be a square"):
            _call(spec, kwargs)
    elif kind == "device":
        kwargs[arg] = kwargs[arg].to("meta")
        with pytest.raises(RuntimeError, match=rf"same device.*{arg} on meta"):
            _call(spec, kwargs)
    elif kind == "batch":
        kwargs[arg] = torch.cat([kwargs[arg]] * 3, dim=0)
        with pytest.raises(ValueError, match=rf"batch dimensions.*{arg}"):
            _call(spec, kwargs)
    elif kind == "empty":
        out = _call(spec, spec.make((0,)))
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o.numel() == 0 for o in outs if isinstance(o, torch.Tensor) and o.dim() > 0)
    elif kind == "nonfinite":
        first = spec.tensors[0]
        kwargs[first] = kwargs[first].clone(memory_format=torch.contiguous_format)
        kwargs[first].view(-1)[-1] = float("nan")  # the last entry lies in every triangle that is read
        try:
            out = _call(spec, kwargs)
        except torch.linalg.LinAlgError:
            assert spec.nonfinite == "nan-or-linalgerror", f"{name} must propagate NaN, not raise"
            return
        outs = out if isinstance(out, tuple) else (out,)
        assert any(o.isnan().any() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()), \
            f"{name} returned finite values for a NaN input"
    else:
        label, make, error, message = next(e for e in spec.extra if e[0] == arg)
        with pytest.raises(error, match=message):
            _call(spec, make())


def test_every_public_function_is_covered():
    """Adding a public function to metalcore without a row in SPECS fails here."""
    public = {f"linalg.{n}" for n in metalcore.linalg.__all__}
    public |= {n for n in metalcore.__all__ if callable(getattr(metalcore, n))
               and not isinstance(getattr(metalcore, n), type(metalcore)) and n not in NOT_TENSOR_FUNCTIONS}
    public |= {n for n in getattr(metalcore, "nn").__all__ if n not in SPECS and f"nn.{n}" not in SPECS
               and n not in metalcore.__all__}
    missing = sorted(n for n in public if n not in SPECS)
    assert not missing, f"no bad-input specs for: {missing}"


# Public callables that take no tensors: backend selection, the optimizer (its hyperparameter
# validation is tested in tests/optim) and model patching (tests/patch feeds it unknown modules).
NOT_TENSOR_FUNCTIONS = {"use_backend", "BackendUnavailableError", "MetalAdamW", "PatchReport", "patch_model",
                        "unpatch_model"}
