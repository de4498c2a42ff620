"""The wheel ships every subpackage and the shaders (pyproject lists packages explicitly)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metalcore").rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["metalcore.shaders"] == "shaders"
    assert set(config["package-data"]["metalcore.shaders"]) >= {"*.metal", "*.h"}
    assert list((ROOT / "shaders").glob("*.metal")), "no shaders to ship"


def test_imports_and_large_paths_without_triton():
    """A Mac has no triton: metalcore imports, and the device-generic large-matrix code (blocked QR
    with GEMM larft/larfb, the QDWH SVD) that the Metal backend uses runs without it."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # import triton fails; importlib.util.find_spec returns None
import torch, metalcore
from metalcore._backend import triton_importable
from metalcore.linalg import qr_blocked, qr_blocked_metal, svd_large
assert not triton_importable()
A = torch.randn(40, 24, dtype=torch.float64)
Q, R = qr_blocked.qr_blocked(A, "reduced", nb=8, panel="geqrf")
assert torch.allclose(Q @ R, A, atol=1e-12)
U, S, Vh = svd_large.svd_large(A, False, True)
assert torch.allclose(U @ torch.diag(S) @ Vh, A, atol=1e-12)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
