"""metalcore: fast linear algebra and training ops for PyTorch on Metal, CUDA and the CPU.

Every op has one contract and three backends (Triton on CUDA, Metal shaders on MPS, plain PyTorch
elsewhere); see DESIGN.md. ``metalcore.linalg`` holds drop-in twins of ``torch.linalg``; the names
below keep the original metalcore API.
"""

from metalcore import linalg, nn
from metalcore._backend import BackendUnavailableError, use_backend
from metalcore._kernels import load_kernels
from metalcore.linalg.cholesky import cholesky
from metalcore.linalg.triangular import trsm
from metalcore.nn import MetalRMSNorm, fused_add_rms_norm, rms_norm

__version__ = "0.1.0"

load_kernels()

__all__ = [
    "BackendUnavailableError", "MetalRMSNorm", "cholesky", "fused_add_rms_norm", "linalg", "nn",
    "rms_norm", "trsm", "use_backend",
]
