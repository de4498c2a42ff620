"""Where backend kernels are loaded: the one list of modules that plug kernels into the ops.

An op's reference and contract live in ``<op>.py``; its kernels sit beside it in
``<op>_triton.py`` and ``<op>_metal.py`` and register themselves with ``op.implement(...)`` on
import. Triton modules are imported only when triton is installed, so a CPU-only install never
needs it; Metal modules compile their shaders lazily and import anywhere.
"""

import importlib

from metalcore._backend import triton_importable

TRITON_MODULES: tuple[str, ...] = (
    "metalcore.nn.rms_norm_triton",
    "metalcore.nn.activations_triton",
    "metalcore.nn.swiglu_triton",
    "metalcore.nn.rope_triton",
    "metalcore.nn.attention_triton",
    "metalcore.nn.cross_entropy_triton",
    "metalcore.optim.adamw_triton",
    "metalcore.linalg.cholesky_triton",
    "metalcore.linalg.triangular_triton",
    "metalcore.linalg.qr_triton",
    "metalcore.linalg.householder_triton",
    "metalcore.linalg.solve_triton",
    "metalcore.linalg.eigh_triton",
    "metalcore.linalg.svd_triton",
    "metalcore.linalg.syrk_triton",
)
METAL_MODULES: tuple[str, ...] = (
    "metalcore.nn.rms_norm_metal",
    "metalcore.nn.activations_metal",
    "metalcore.nn.swiglu_metal",
    "metalcore.nn.attention_metal",
    "metalcore.nn.rope_metal",
    "metalcore.nn.cross_entropy_metal",
    "metalcore.optim.adamw_metal",
    "metalcore.linalg.cholesky_metal",
    "metalcore.linalg.triangular_metal",
    "metalcore.linalg.cholesky_solve_metal",
    "metalcore.linalg.solve_metal",
    "metalcore.linalg.qr_metal",
    "metalcore.linalg.householder_metal",
    "metalcore.linalg.eigh_metal",
    "metalcore.linalg.eigh_twostage_metal",
    "metalcore.linalg.svd_metal",
    "metalcore.linalg.syrk_metal",
)


def load_kernels() -> None:
    modules = METAL_MODULES + (TRITON_MODULES if triton_importable() else ())
    for name in modules:
        importlib.import_module(name)
