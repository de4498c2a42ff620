"""SwiGLU on Metal: the host side of ``shaders/swiglu.metal`` (the math is in swiglu.py)."""

from torch import Tensor

from metalcore.nn.activations_metal import elementwise, supported
from metalcore.nn.swiglu import swiglu_bwd, swiglu_fwd

_SHADER = "swiglu"


@swiglu_fwd.implement("metal", supports=lambda gate, up: supported(_SHADER, "swiglu_fwd", gate, up))
def _swiglu_fwd_metal(gate: Tensor, up: Tensor) -> Tensor:
    return elementwise(_SHADER, "swiglu_fwd", (gate, up), 1)[0]


@swiglu_bwd.implement("metal", supports=lambda dy, gate, up: supported(_SHADER, "swiglu_bwd", gate, up, dy))
def _swiglu_bwd_metal(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = elementwise(_SHADER, "swiglu_bwd", (dy, gate, up), 2)
    return dgate, dup
