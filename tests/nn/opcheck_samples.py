"""Arguments for ``torch.library.opcheck`` on every metalcore.nn op (tests/test_opcheck.py runs them).

Float64 inputs; ``requires_grad`` on the differentiable inputs of forward ops; odd sizes, a
non-contiguous view and the optional-argument variants of each op.
"""

from collections.abc import Callable

import torch

from metalcore.nn.attention import sdpa_fwd
from metalcore.nn.rms_norm import rms_norm_fwd


def t(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


def transposed(*shape: int, grad: bool = True) -> torch.Tensor:
    """A non-contiguous view (last two dims swapped in memory)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).mT.requires_grad_(grad)


def rms_norm_bwd_args(weight: bool) -> tuple:
    x, w = t(3, 33, grad=False), (t(33, grad=False) if weight else None)
    _, rstd = rms_norm_fwd.reference(x, w, 1e-6, 0.0)
    return t(3, 33, grad=False), x, w, rstd, 0.0


def sdpa_bwd_args(mask: torch.Tensor | None, is_causal: bool) -> tuple:
    q, k, v = t(2, 4, 5, 8, grad=False), t(2, 2, 7, 8, grad=False), t(2, 2, 7, 3, grad=False)
    out, lse = sdpa_fwd.reference(q, k, v, mask, is_causal, 0.35)
    return torch.randn_like(out), q, k, v, out, lse, mask, is_causal, 0.35


def rope_cos_sin(batch: int, seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(batch, seq, dim // 2, dtype=torch.float64) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


SAMPLES: dict[str, list[Callable[[], tuple]]] = {
    "rms_norm_fwd": [
        lambda: (t(3, 33), t(33), 1e-6, 0.0),
        lambda: (t(5, 1), None, 1e-6, 1.0),
    ],
    "rms_norm_bwd": [
        lambda: rms_norm_bwd_args(weight=True),
        lambda: rms_norm_bwd_args(weight=False),
    ],
    "fused_add_rms_norm_fwd": [
        lambda: (t(3, 33), t(3, 33), t(33), 1e-6, 0.0),
    ],
    "gelu_fwd": [
        lambda: (t(3, 33), "none"),
        lambda: (transposed(4, 31), "tanh"),
    ],
    "gelu_bwd": [
        lambda: (t(3, 33, grad=False), t(3, 33, grad=False), "none"),
        lambda: (t(1, grad=False), t(1, grad=False), "tanh"),
    ],
    "silu_fwd": [
        lambda: (t(3, 33),),
        lambda: (transposed(4, 31),),
    ],
    "silu_bwd": [
        lambda: (t(3, 33, grad=False), t(3, 33, grad=False)),
    ],
    "swiglu_fwd": [
        lambda: (t(3, 33), t(3, 33)),
        lambda: (transposed(4, 31), t(4, 31)),
    ],
    "swiglu_bwd": [
        lambda: (t(3, 33, grad=False), t(3, 33, grad=False), t(3, 33, grad=False)),
    ],
    "rope_fwd": [
        lambda: (t(2, 4, 5, 8), t(2, 2, 5, 8), *rope_cos_sin(1, 5, 8)),
        # (B, S, H, D) projections viewed heads-first, as with unsqueeze_dim=2.
        lambda: (t(2, 5, 4, 8).transpose(1, 2), t(2, 5, 2, 8).transpose(1, 2), *rope_cos_sin(2, 5, 8)),
    ],
    "rope_bwd": [
        lambda: (t(2, 4, 5, 8, grad=False), t(2, 2, 5, 8, grad=False), *rope_cos_sin(2, 5, 8)),
    ],
    "sdpa_fwd": [
        lambda: (t(2, 4, 5, 8), t(2, 2, 7, 8), t(2, 2, 7, 3), None, True, 0.35),
        lambda: (t(1, 3, 33, 8), t(1, 3, 31, 8), t(1, 3, 31, 8), torch.rand(1, 1, 33, 31) > 0.3, False, 0.5),
        lambda: (t(2, 4, 5, 8), t(2, 4, 7, 8), t(2, 4, 7, 8), t(1, 4, 5, 7, grad=False), False, 0.35),
    ],
    "sdpa_bwd": [
        lambda: sdpa_bwd_args(None, True),
        lambda: sdpa_bwd_args(torch.rand(2, 1, 5, 7) > 0.3, False),
        lambda: sdpa_bwd_args(t(1, 1, 5, 1, grad=False), False),
    ],
    "cross_entropy_chunk_": [
        lambda: (t(5, 33, grad=False), torch.tensor([0, 32, -100, 7, 3]), torch.tensor(0.2, dtype=torch.float64),
                 -100, 0.1, 1e-3, 2.0, True),
        lambda: (t(3, 17, grad=False), torch.tensor([1, 2, 3]), torch.rand(3, dtype=torch.float64), -100, 0.0, 0.0,
                 None, False),
    ],
    # (hidden, weight, target, bias, num_items, ignore_index, smoothing, z_loss, softcap, reduction, budget,
    #  grad_hidden, grad_weight, grad_bias); budgets of 2 rows so that the samples cross chunk boundaries.
    "fused_linear_cross_entropy_fwd": [
        lambda: (t(5, 8), t(33, 8), torch.tensor([0, 32, -100, 7, 3]), t(33), None, -100, 0.1, 1e-3, 2.0, "mean",
                 2 * 33 * 8, True, True, True),
        lambda: (t(4, 8), t(17, 8), torch.tensor([1, -100, 3, 4]), None, torch.tensor(6.0), -100, 0.0, 0.0, None,
                 "mean", 2 * 17 * 8, True, True, False),
        lambda: (t(4, 8), t(17, 8), torch.tensor([1, 2, 3, 4]), t(17), None, -100, 0.0, 0.0, None, "none",
                 2 * 17 * 8, True, True, True),
    ],
    "fused_linear_cross_entropy_bwd": [
        lambda: (t(4, grad=False), t(4, 8, grad=False), t(17, 8, grad=False), torch.tensor([1, -100, 3, 4]),
                 t(17, grad=False), -100, 0.1, 0.0, 3.0, 2 * 17 * 8, True, True, True),
    ],
}
