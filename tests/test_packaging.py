"""The wheel ships every subpackage, the shaders and the CPU executor for Metal (pyproject lists
packages explicitly)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metalcore").rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["metalcore.shaders"] == "shaders"
    assert set(config["package-data"]["metalcore.shaders"]) >= {"*.metal", "*.h"}
    assert list((ROOT / "shaders").glob("*.metal")), "no shaders to ship"
    assert set(config["package-data"]["metalcore.executor"]) >= {"*.cpp", "*.h"}
    assert {p.suffix for p in (ROOT / "metalcore" / "executor").iterdir()} >= {".cpp", ".h"}


def test_installed_wheel_runs_a_shader_on_cpu_tensors(tmp_path):
    """pip wheel, install into a fresh venv, and run a metalcore op through the Metal shaders on CPU
    tensors (use_backend("metal")) from outside the source tree."""
    from metalcore import _metal
    from backends import unavailable

    if not _metal.executor_available():
        unavailable(f"the CPU executor for Metal cannot run here: {_metal.executor_missing_reason()}")
    src = tmp_path / "src"  # a copy, so that the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "metalcore", src / "metalcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "shaders", src / "shaders")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("metalcore-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # torch and the rest come from this interpreter's site-packages (a plain path: its .pth files, such as
    # an editable install of this checkout, are not processed).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, timeout=300, capture_output=True)

    code = textwrap.dedent("""
        import torch, metalcore
        from pathlib import Path
        assert Path(metalcore.__file__).is_relative_to(Path(SITE)), metalcore.__file__
        x, w = torch.randn(6, 40), torch.randn(40)
        with metalcore.use_backend("metal"):
            y = metalcore.rms_norm(x, (40,), w, eps=1e-6)
        ref = torch.nn.functional.rms_norm(x.double(), (40,), w.double(), eps=1e-6).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        from metalcore import _metal
        assert "rms_norm_fwd_float" in _metal.launched
        print("ok")
    """).replace("SITE", repr(str(site)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METALCORE_BACKEND")}
    env["METALCORE_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_metal_on_cpu_tensors_without_clang_says_what_to_install(tmp_path):
    code = textwrap.dedent("""
        import torch, metalcore
        try:
            with metalcore.use_backend("metal"):
                metalcore.rms_norm(torch.randn(2, 8), (8,), torch.randn(8))
        except metalcore.BackendUnavailableError as e:
            print(e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "METALCORE_CLANG"}
    env.update(PYTHONPATH=str(ROOT), PATH=str(tmp_path))  # no clang++ on PATH
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cannot run on cpu tensors" in out.stdout and "clang++ >= 17" in out.stdout
    assert "METALCORE_CLANG" in out.stdout and "apt-get install clang-19" in out.stdout


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
