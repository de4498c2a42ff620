"""Where the GPU time of the `tridiag` eigh and `bidiag` svd paths goes: each stage removed or cut in a
copy of the kernels, GPU ms per call (CUDA events over back-to-back launches) and LAPACK's residual
and orthogonality ratios of the vectors (bench/linalg_triton.md v19).

    python bench/scripts/tridiag_stages.py                        # H100: ~2-3 minutes, compilation included
    python bench/scripts/tridiag_stages.py --against old=DIR      # also time the modules in DIR

Variants: ``vectors`` and ``values`` as committed; ``no-back-transformation`` (the reflections of the
vectors skipped: a copy of the modules with that loop emptied); ``rounds1`` (one round of inverse
iteration); ``no-clusters`` (no Gram-Schmidt); ``tile-warps`` (``_small_triton.warps`` of the tile,
the width before ``chain_warps``); ``split-16``/``split-32`` (the back-transformation in
``_reflect_kernel``, 16 or 32 columns a program, v23). ``--against NAME=DIR`` adds the
``vectors`` time of another ``eigh_tridiag_triton.py``/``svd_bidiag_triton.py`` pair, e.g. a previous
commit's (``git show REV:metalcore/linalg/eigh_tridiag_triton.py > DIR/...``). The times of a cut
variant are not results; their differences from ``vectors`` are the stage costs.
"""

import argparse
import importlib
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jacobi_check import ratios_eigh, ratios_svd  # noqa: E402  (same-folder script)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = os.path.join(ROOT, "metalcore", "linalg")
NO_BACK = {"eigh_tridiag_triton.py": ("for t in range(0, count):\n", "for t in range(0, 0):\n"),
           "svd_bidiag_triton.py": ("for t in range(0, n):\n", "for t in range(0, 0):\n")}
CASES = [("eigh", 64, 128), ("svd", 1000, 32), ("eigh", 100, 64), ("svd", 64, 128)]


def copy_modules(name: str, source: str, workdir: str, cut: dict | None = None):
    """Import a copy of the two kernel modules from ``source`` as package ``name`` (the svd module
    imports the eigh module's copy), each with ``cut``'s text replaced."""
    package = os.path.join(workdir, name)
    os.makedirs(package, exist_ok=True)
    open(os.path.join(package, "__init__.py"), "w").close()
    for file in ("eigh_tridiag_triton.py", "svd_bidiag_triton.py"):
        text = open(os.path.join(source, file)).read()
        if cut and file in cut:
            old, new = cut[file]
            assert old in text, (file, old)
            text = text.replace(old, new)
        text = text.replace("from metalcore.linalg.eigh_tridiag_triton import", f"from {name}.eigh_tridiag_triton import")
        open(os.path.join(package, file), "w").write(text)
    if workdir not in sys.path:
        sys.path.insert(0, workdir)
    return (importlib.import_module(f"{name}.eigh_tridiag_triton"), importlib.import_module(f"{name}.svd_bidiag_triton"))


def gpu_ms(fn, launches: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return statistics.median(times)


def ratios(op: str, A: torch.Tensor, out) -> str:
    """LAPACK's residual and orthogonality ratios (worst matrix), as the Jacobi check computes them."""
    if op == "eigh":
        r = ratios_eigh(A, *out[:2])
        return f"residual {r['res']:.2f} orthogonality {r['orth_q']:.2f}"
    r = ratios_svd(A, *out[:3])
    return f"residual {r['res']:.2f} orthogonality U {r['orth_u']:.2f} V {r['orth_v']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", action="append", default=[], help="NAME=DIR of other kernel modules")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if ROOT not in sys.path:                      # the copies import metalcore from this checkout
        sys.path.insert(0, ROOT)
    from metalcore.linalg._small_triton import block, warps
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    workdir = tempfile.mkdtemp(prefix="tridiag-stages-")
    modules = {"committed": copy_modules("stages_committed", SOURCES, workdir),
               "no-back-transformation": copy_modules("stages_noback", SOURCES, workdir, NO_BACK)}
    for spec in args.against:
        name, source = spec.split("=", 1)
        modules[name] = copy_modules(f"stages_{name.replace('-', '_')}", source, workdir)
    for op, batch, n in CASES:
        torch.manual_seed(0)
        X = torch.randn(batch, n, n, dtype=dtype, device="cuda")
        A = X + X.mT if op == "eigh" else X
        for name, (eigh_module, svd_module) in modules.items():
            variants = [("vectors", True, {})]
            if name == "committed":
                variants += [("values", False, {}), ("rounds1", True, {"ROUNDS": 1}),
                             ("no-clusters", True, {"ORTOL_N": 1e-30}),
                             ("tile-warps", True, {"num_warps": warps(block(n) ** 2)})]
                variants += [("split-16", True, {"split_back": 16}), ("split-32", True, {"split_back": 32})]
            for variant, vectors, knobs in variants:
                saved = {k: (getattr(eigh_module, k), getattr(svd_module, k)) for k in ("ROUNDS", "ORTOL_N") if k in knobs}
                try:
                    for k in saved:
                        setattr(eigh_module, k, knobs[k])
                        setattr(svd_module, k, knobs[k])
                    width = knobs.get("num_warps")
                    split = {"split_back": knobs["split_back"]} if "split_back" in knobs else {}
                    run = (eigh_module.eigh_tridiag_launcher(A, False, vectors, num_warps=width, **split) if op == "eigh"
                           else svd_module.svd_bidiag_launcher(A, vectors, num_warps=width, **split))
                    ms = gpu_ms(lambda: run(A))
                    accuracy = ratios(op, A, run(A)) if vectors else ""
                    print(f"{op} {batch}x{n}^2 {args.dtype} {name:24s} {variant:12s} {ms:8.3f} ms  {accuracy}", flush=True)
                except Exception as e:  # one variant failing to compile must not lose the others
                    print(f"{op} {batch}x{n}^2 {name} {variant} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
                finally:
                    for k, (e_value, s_value) in saved.items():
                        setattr(eigh_module, k, e_value)
                        setattr(svd_module, k, s_value)


if __name__ == "__main__":
    main()
