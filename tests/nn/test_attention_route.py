"""Who computes metalcore.metal_scaled_dot_product_attention, forward and backward.

* Where metalcore's kernel is not the automatic choice (the CPU here; CUDA, where the Triton kernel
  is ``automatic=False``; any other device), the call is torch's own fused SDPA, and so is its
  backward: the aten ops that run are torch's, and the gradients match the float64 reference.
* The backend that ran a forward runs its backward, whatever block surrounds ``backward()``.
* The materialising reference runs only when asked (``use_backend("reference")``).
* On a GPU a bool mask reaches torch as given, fully masked rows opened: safe under each conversion
  torch's kernels apply to it (-inf, or cuDNN's -65504), with such rows 0 and their gradients 0.
* The benchmark script's CPU smoke mode runs and reports every case.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import metalcore
import metalcore.nn.attention as attention
from metalcore._op import observing
from metalcore.nn import metal_scaled_dot_product_attention as sdpa
from metalcore.nn.attention import _mask_for_fused_kernels, sdpa_bwd, sdpa_fwd
from oracle import assert_close

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "scripts" / "attention_public_check.py"


class AtenOps(TorchDispatchMode):
    """Names of the aten ops that run inside the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def materialised(monkeypatch):
    """Calls of the score builder that every materialising path shares (the reference forward and
    backward, and the composite that serves dropout under ``"reference"``)."""
    calls = []
    scores = attention._scores
    monkeypatch.setattr(attention, "_scores", lambda *args: calls.append(1) or scores(*args))
    return calls


@pytest.fixture
def ran_ops():
    ran: list[tuple[str, str]] = []
    with observing(lambda op, backend: ran.append((op, backend))):
        yield ran


def leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]


def reference64(args, dout, **kwargs):
    """Output and gradients of metalcore's reference in float64 (the materialising oracle)."""
    args64 = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs = {**kwargs, "attn_mask": mask.detach().double().requires_grad_(mask.requires_grad)}
        args64.append(kwargs["attn_mask"])
    with metalcore.use_backend("reference"):
        out = sdpa(*args64[:3], **kwargs)
        grads = torch.autograd.grad(out, [a for a in args64 if a.requires_grad], dout.double())
    return out, grads


# (case id, q shape, k/v shape, keyword arguments): the decode shape of issue "never slower" scaled
# down, causal prefill, a bool padding mask with a fully masked row, a float mask with a gradient.
def _padding_mask():
    mask = torch.ones(2, 1, 9, 17, dtype=torch.bool)
    mask[0, ..., -5:] = False
    mask[1, :, 4] = False  # query row 4 of batch 1 attends to nothing
    return mask


CASES = [
    ("decode-gqa", (1, 4, 1, 64), (1, 2, 33, 64), lambda: dict(enable_gqa=True)),
    ("prefill-causal", (2, 4, 9, 16), (2, 4, 9, 16), lambda: dict(is_causal=True, scale=0.3)),
    ("bool-padding", (2, 4, 9, 16), (2, 2, 17, 16), lambda: dict(attn_mask=_padding_mask(), enable_gqa=True)),
    ("float-mask-grad", (2, 4, 9, 16), (2, 4, 17, 16),
     lambda: dict(attn_mask=torch.randn(9, 17).requires_grad_())),
    ("mask-1d", (2, 4, 9, 16), (2, 4, 17, 16), lambda: dict(attn_mask=torch.rand(17) > 0.3)),
]


@pytest.mark.parametrize("q_shape,kv_shape,make_kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cpu_route_is_torchs_fused_sdpa_forward_and_backward(q_shape, kv_shape, make_kwargs, ran_ops,
                                                             materialised):
    """Automatic on the CPU: torch's SDPA forward and its own backward (its CPU flash kernel, or the
    math backend where torch picks it: a mask that requires a gradient), no metalcore op, no
    materialising reference; outputs and every gradient match the float64 reference."""
    q, k, v = leaves(q_shape, kv_shape, kv_shape)
    kwargs = make_kwargs()
    mask = kwargs.get("attn_mask")
    with AtenOps() as ops:
        out = sdpa(q, k, v, **kwargs)
        dout = torch.randn_like(out)
        inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
        grads = torch.autograd.grad(out, inputs, dout)
    assert ran_ops == [] and materialised == []
    if mask is not None and mask.requires_grad:
        assert "aten::_safe_softmax" in ops.names  # torch's math backend: what torch runs for it
    else:
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops.names
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops.names
        assert "aten::bmm" not in ops.names and "aten::_softmax" not in ops.names
    expected, expected_grads = reference64([q, k, v], dout, **kwargs)
    assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


def test_torch_route_keeps_torchs_backward_inside_a_backend_block(ran_ops, materialised):
    """A forward on torch's route and ``backward()`` inside ``use_backend("reference")``: autograd
    runs torch's backward, recorded with the forward; the block changes nothing."""
    q, k, v = leaves((1, 4, 1, 64), (1, 2, 33, 64), (1, 2, 33, 64))
    out = sdpa(q, k, v, enable_gqa=True)
    with metalcore.use_backend("reference"), AtenOps() as ops:
        out.sum().backward()
    assert ran_ops == [] and materialised == []
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops.names


@pytest.mark.parametrize("case", ["causal", "bool-mask-gqa", "float-mask"])
def test_a_forward_only_triton_block_keeps_the_backward_on_triton(case, triton_backend, ran_ops, materialised):
    """``use_backend("triton")`` around the forward only (as a user wraps the model call): the
    backward runs the Triton kernels (interpreted here), never the materialising reference, and
    the gradients match the float64 reference."""
    q, k, v = leaves((1, 4, 9, 64), (1, 2 if case == "bool-mask-gqa" else 4, 13, 64),
                     (1, 2 if case == "bool-mask-gqa" else 4, 13, 64), dtype=torch.float16)
    kwargs = {"causal": dict(is_causal=True),
              "bool-mask-gqa": dict(attn_mask=torch.rand(1, 1, 9, 13) > 0.3, enable_gqa=True),
              "float-mask": dict(attn_mask=torch.randn(9, 13, dtype=torch.float16))}[case]
    out = sdpa(q, k, v, **kwargs)              # inside the fixture's use_backend("triton") block
    dout = torch.randn_like(out)
    with metalcore.use_backend("auto"):        # the backward outside it
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert ran_ops == [("sdpa_fwd", "triton"), ("sdpa_bwd", "triton")]
    assert materialised == []
    expected, expected_grads = reference64([q, k, v], dout, **kwargs)
    assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


def test_materialising_reference_only_when_asked(triton_backend, materialised, ran_ops):
    """Every automatic call, and every call under an explicit kernel backend whose kernel does not
    take it (float32 for Triton, dropout, a mask with a gradient, empty inputs), runs torch's SDPA
    forward and backward; ``use_backend("reference")`` runs the materialising reference."""
    def call(dtype=torch.float32, L=5, **kwargs):
        q, k, v = leaves((1, 4, L, 64), (1, 2, 7, 64), (1, 2, 7, 64), dtype=dtype)
        out = sdpa(q, k, v, enable_gqa=True, **kwargs)
        out.float().sum().backward()
        assert torch.isfinite(q.grad).all()

    def each_call():
        call()
        call(is_causal=True)
        call(attn_mask=torch.rand(5, 7) > 0.3)
        call(attn_mask=torch.randn(5, 7).requires_grad_())
        call(dropout_p=0.25)
        # In the Triton kernels' scope (fp16, E = 64), but kernels do no dropout and launch on nothing.
        call(torch.float16, dropout_p=0.25)
        call(torch.float16, L=0)

    with metalcore.use_backend("auto"):
        each_call()
    each_call()                                # inside the fixture's use_backend("triton") block
    assert materialised == [] and ran_ops == []
    with metalcore.use_backend("reference"):
        call(attn_mask=torch.rand(5, 7) > 0.3)
    assert len(materialised) == 2 and [op for op, _ in ran_ops] == ["sdpa_fwd", "sdpa_bwd"]


def test_other_devices_run_torch_automatically(materialised, ran_ops):
    """A device where metalcore's attention kernel is not the automatic choice (here meta tensors,
    like CUDA, where the Triton kernel is registered ``automatic=False``): torch's SDPA, with the
    GPU mask handling (a bool mask stays bool), never the reference."""
    assert not sdpa_fwd.automatic_kernel("triton") and not sdpa_bwd.automatic_kernel("triton")
    q, k, v = (torch.empty(2, 4, 9, 64, device="meta"), torch.empty(2, 2, 13, 64, device="meta"),
               torch.empty(2, 2, 13, 64, device="meta"))
    for kwargs in (dict(is_causal=True), dict(attn_mask=torch.ones(2, 1, 9, 13, dtype=torch.bool, device="meta")),
                   dict(attn_mask=torch.empty(9, 13, device="meta"))):
        assert sdpa(q, k, v, enable_gqa=True, **kwargs).shape == (2, 4, 9, 64)
    assert materialised == [] and ran_ops == []


def cudnn_style(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as torch hands it to cuDNN attention: False → -65504 (finite), True → 0."""
    return torch.where(mask, 0.0, -65504.0).to(dtype)


def minus_inf(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as torch's other kernels read it: False → -inf."""
    return torch.where(mask, 0.0, -math.inf).to(dtype)


@pytest.mark.parametrize("convert", [cudnn_style, minus_inf], ids=["cudnn", "minus-inf"])
def test_gpu_bool_route_under_each_kernel_conversion(convert):
    """What the public function hands torch on a GPU for a bool mask — the mask itself, dead rows
    opened — then the output times the rows' "attends to something" flags: under either conversion
    torch's kernels apply, every row's largest value is 0 (so no lse near -65504, where cuDNN's
    backward broke, pytorch#196678), and the result is the reference's, a dead row 0 with zero
    gradients."""
    q, k, v = leaves((2, 4, 9, 16), (2, 4, 17, 16), (2, 4, 17, 16), dtype=torch.float64)
    mask = _padding_mask()
    opened, alive, sunk = _mask_for_fused_kernels(mask, q.dtype)
    assert opened.dtype == torch.bool and sunk is None and not alive[1, 0, 4]
    bias = convert(opened, q.dtype)
    assert (bias.amax(-1) == 0).all()
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, bias) * alive
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected, expected_grads = reference64([q, k, v], dout, attn_mask=mask)
    assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)
    assert (out[1, :, 4] == 0).all() and (grads[0][1, :, 4] == 0).all()


def test_nan_in_the_query_reaches_the_output_on_the_cpu_route():
    """torch's CPU kernel returns 0 for a query row holding a NaN; the route's guard keeps NaN in,
    NaN out (at the NaN's column when E = Ev, on the whole row otherwise), and no other row."""
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 7, 64)
    q[0, 1, 2, 5] = float("nan")
    for Ev in (64, 32):
        out = sdpa(q, k, torch.randn(1, 2, 7, Ev), enable_gqa=True)
        nan = out.isnan()
        assert nan[0, 1, 2].any() and nan.any(-1).sum() == 1
        assert nan[0, 1, 2].all() == (Ev != 64)


def _load_script():
    spec = importlib.util.spec_from_file_location("attention_public_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_cpu_smoke_mode(tmp_path, monkeypatch, capsys):
    """``--device cpu --tiny`` runs every semantic check and every timed case, and writes its JSON."""
    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["attention_public_check.py", "--device", "cpu", "--tiny", "--calls", "2",
                                      "--repeats", "1", "--out", str(out)])
    assert _load_script().main() == 0
    report = json.loads(out.read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"]), report["checks"]
    cases = {(r["case"], r["direction"]) for r in report["timings"]}
    for case in ("prefill full", "prefill causal", "prefill padding", "decode full"):
        assert {(case, "fwd"), (case, "fwd+bwd")} <= cases
    variants = {r["variant"] for r in report["timings"] if r["case"] == "prefill padding"}
    assert {"torch", "metalcore"} <= variants
    assert all(r["wall_us"] > 0 and math.isfinite(r["ratio_vs_torch"]) for r in report["timings"])
    assert "worst wall ratio" in capsys.readouterr().out
