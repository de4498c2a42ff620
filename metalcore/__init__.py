"""metalcore: fast linear algebra and training ops for PyTorch on Metal, CUDA and the CPU.

Every op has one contract and up to three backends (Triton on CUDA, Metal shaders on MPS, plain
PyTorch elsewhere). ``metalcore.linalg`` holds drop-in twins of ``torch.linalg``; the names below
keep the original metalcore API (``svd`` returns ``(U, S, V)`` with ``A = U diag(S) Vᵀ``).
"""

from metalcore import linalg, nn, optim
from metalcore._backend import BackendUnavailableError, use_backend
from metalcore._kernels import load_kernels
from metalcore.linalg.cholesky import cholesky
from metalcore.linalg.eigh import eigh
from metalcore.linalg.householder import geqr2, larfb, larft
from metalcore.linalg.lstsq import lstsq
from metalcore.linalg.pinv import pinv
from metalcore.linalg.polar import polar
from metalcore.linalg.qr import qr, qr_batched
from metalcore.linalg.solve import solve
from metalcore.linalg.svd import seed_svd as svd
from metalcore.linalg.triangular import trsm
from metalcore.nn import (
    MetalGELU,
    MetalRMSNorm,
    MetalSiLU,
    MetalSwiGLUMLP,
    apply_rotary_pos_emb,
    fused_add_rms_norm,
    metal_gelu,
    metal_scaled_dot_product_attention,
    metal_silu,
    rms_norm,
    swiglu,
)
from metalcore.optim import MetalAdamW
from metalcore.patch import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"

load_kernels()

__all__ = [
    "BackendUnavailableError", "MetalAdamW", "MetalGELU", "MetalRMSNorm", "MetalSiLU", "MetalSwiGLUMLP",
    "PatchReport", "apply_rotary_pos_emb", "cholesky", "eigh", "fused_add_rms_norm", "geqr2", "larfb",
    "larft", "linalg", "lstsq", "metal_gelu", "metal_scaled_dot_product_attention", "metal_silu", "nn",
    "optim", "patch_model", "pinv", "polar", "qr", "qr_batched", "rms_norm", "solve", "svd", "swiglu", "trsm",
    "unpatch_model", "use_backend",
]
