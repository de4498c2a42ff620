"""Compile the small-matrix cholesky, trsm/cholesky_solve and LU kernels for an H100 (sm_90) without
a GPU and print what the main loop costs: layout conversions and reductions per iteration (TTGIR),
PTX instruction count, shared-memory accesses and barriers, local-memory (spill) accesses.

    python bench/scripts/small_linalg_aot.py [--target 90]

Triton compiles ahead of time for a ``GPUTarget`` with the ptxas shipped in its wheel, so this runs
on any machine with triton installed. Counts are static (instructions in the code, not executed).
"""

from __future__ import annotations

import argparse
import inspect
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from metalcore.linalg import cholesky_triton, solve_triton, triangular_triton
from metalcore.linalg._small_triton import warps

# (BN, G) as the launchers pick them on CUDA for the six benchmark shapes.
SHAPES = [(4, 32), (8, 8), (16, 2), (32, 1), (64, 1), (128, 1)]


def compile_for(kernel, target: GPUTarget, constexprs: dict, num_warps: int, pointers: dict):
    fn = JITFunction(kernel.fn)
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        signature[name] = "constexpr" if name in constexprs else pointers.get(name, "i32")
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                          options={"num_warps": num_warps})


def loop_stats(compiled) -> dict:
    lines = compiled.asm["ttgir"].splitlines()
    first = next(i for i, line in enumerate(lines) if "scf.for" in line)
    depth, body = 0, []
    for line in lines[first:]:      # the first loop (the factorization's), nested loops included
        body.append(line)
        depth += line.count("{") - line.count("}")
        if depth <= 0 and len(body) > 1:
            break
    loop = "\n".join(body)
    ptx = compiled.asm["ptx"]
    instructions = [s for s in (line.strip() for line in ptx.splitlines())
                    if s and not s.startswith(("//", ".", "$", "{", "}"))]
    return {"convert_layout/iter": loop.count("ttg.convert_layout"), "reductions/iter": loop.count('"tt.reduce"'),
            "ptx instructions": len(instructions), "shared ld/st": len(re.findall(r"(ld|st)\.shared", ptx)),
            "barriers": len(re.findall(r"bar\.sync|barrier\.sync", ptx)),
            "local ld/st": len(re.findall(r"(ld|st)\.local", ptx))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.target, 32)
    f32 = {"A": "*fp32", "B": "*fp32", "L": "*fp32", "X": "*fp32", "INFO": "*i32"}
    rows = []
    for BN, G in SHAPES:
        w = warps(G * BN * BN)
        c = compile_for(cholesky_triton._cholesky_kernel, target, {"G": G, "BN": BN, "UPPER": False}, w, f32)
        rows.append((f"cholesky BN={BN} G={G} w={w}", loop_stats(c)))
        BK = min(BN, 64)
        wt = warps(G * BN * BK)
        c = compile_for(triangular_triton._trsm_kernel, target,
                        {"G": G, "BN": BN, "BK": BK, "LOWER": True, "UNIT": False, "CHOL": False}, wt, f32)
        rows.append((f"trsm BN={BN} BK={BK} G={G} w={wt}", loop_stats(c)))
        for implicit in (False, True):
            c = compile_for(solve_triton._lu_solve_kernel, target,
                            {"G": G, "BN": BN, "BK": 2, "IMPLICIT": implicit}, w, f32)
            rows.append((f"lu BN={BN} G={G} w={w} IMPLICIT={int(implicit)}", loop_stats(c)))
    keys = list(rows[0][1])
    print(f"{'kernel':44s} " + " ".join(f"{k:>18s}" for k in keys))
    for name, stats in rows:
        print(f"{name:44s} " + " ".join(f"{stats[k]:>18d}" for k in keys))


if __name__ == "__main__":
    main()
