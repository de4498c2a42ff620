"""GELU and SiLU on Metal: the host side of ``shaders/activations.metal`` (the math is in
activations.py). One thread per element; float/half/bfloat; float64 stays on the reference."""

from torch import Tensor

from metalcore import _metal
from metalcore.nn.activations import gelu_bwd, gelu_fwd, silu_bwd, silu_fwd

_SHADER = "activations"


def supported(shader: str, kernel: str, x: Tensor, *others: Tensor) -> bool:
    """Whether ``<kernel>_<dtype>`` of ``shaders/<shader>.metal`` takes these elementwise inputs."""
    if x.dtype not in _metal.KERNEL_DTYPES or x.numel() >= 2**31:
        return False
    if any(t.dtype != x.dtype or t.shape != x.shape for t in others):
        return False
    return _metal.has_kernel(_metal.library(shader, x.device), f"{kernel}_{_metal.dtype_suffix(x.dtype)}")


def elementwise(shader: str, kernel: str, inputs: tuple[Tensor, ...], n_out: int, *scalars) -> list[Tensor]:
    """Launch ``<kernel>_<dtype>(inputs..., outputs..., scalars..., numel)`` over one thread per element."""
    x = inputs[0]
    flat = [t.contiguous() for t in inputs]
    outs = [_metal.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(n_out)]
    n = x.numel()
    if n:
        group = _metal.constants()["METALCORE_ELEMENTWISE_GROUP"]
        _metal.launch(_metal.library(shader, x.device), f"{kernel}_{_metal.dtype_suffix(x.dtype)}", *flat, *outs,
                      *scalars, n, threads=n, group_size=min(group, n))
    return outs


@gelu_fwd.implement("metal", supports=lambda x, approximate: supported(_SHADER, "gelu_fwd", x))
def _gelu_fwd_metal(x: Tensor, approximate: str) -> Tensor:
    if approximate not in ("none", "tanh"):
        return gelu_fwd.reference(x, approximate)  # raises the reference's error
    return elementwise(_SHADER, "gelu_fwd", (x,), 1, int(approximate == "tanh"))[0]


@gelu_bwd.implement("metal", supports=lambda dy, x, approximate: supported(_SHADER, "gelu_bwd", x, dy))
def _gelu_bwd_metal(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    if approximate not in ("none", "tanh"):
        return gelu_bwd.reference(dy, x, approximate)
    return elementwise(_SHADER, "gelu_bwd", (dy, x), 1, int(approximate == "tanh"))[0]


@silu_fwd.implement("metal", supports=lambda x: supported(_SHADER, "silu_fwd", x))
def _silu_fwd_metal(x: Tensor) -> Tensor:
    return elementwise(_SHADER, "silu_fwd", (x,), 1)[0]


@silu_bwd.implement("metal", supports=lambda dy, x: supported(_SHADER, "silu_bwd", x, dy))
def _silu_bwd_metal(dy: Tensor, x: Tensor) -> Tensor:
    return elementwise(_SHADER, "silu_bwd", (dy, x), 1)[0]
