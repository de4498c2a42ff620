"""Python cost of metalcore's thinnest paths on the CPU, each against torch's own call in the same run.

    python bench/scripts/host_route_micro.py [--calls 1000] [--rounds 300] [--out result.json]

What each row times (µs per call; thread CPU time, min over ``--rounds`` interleaved blocks of
``--calls`` calls, torch on one thread; "over" is metalcore's time minus its peer's):

* ``attention decode, CUDA branch``: the public attention's CUDA fast path (no mask, no dropout,
  GQA) on CPU tensors, made to take that branch by giving ``torch.Tensor`` the ``is_cpu`` attribute
  as ``is_cuda`` (the same C getter, so the same cost); the CPU-only NaN guard is replaced by an
  identity (a version that tests ``is_cpu`` after torch's call would otherwise run it). Peer: torch's
  SDPA on the same tensors. ``(torch stubbed)``: both sides call the same Python stand-in for
  ``F.scaled_dot_product_attention``, leaving the Python layer alone.
* ``metal_gelu``/``metal_silu`` on 1×0 (torch's call does no work, so the route's cost is not
  lost in the kernel's noise) and 1×4096: the torch route.
* ``cholesky``/``solve``/``solve_triangular``/``cholesky_solve`` on 1×3×3: the torch route.
* ``route``: the torch route of :mod:`metalcore._route` around a cheap C method (``contiguous``,
  ``type_as``, a Python function with one keyword), against calling it directly: the route alone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import metalcore
import metalcore.linalg as mla
from metalcore import _route
from metalcore.nn import attention


def best(variants: dict, calls: int, rounds: int) -> dict[str, float]:
    for fn in variants.values():
        for _ in range(calls):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.thread_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.thread_time() - t) / calls * 1e6)
    return {name: min(s) for name, s in samples.items()}


def pair(rows: dict, name: str, ours, peer, calls: int, rounds: int) -> None:
    r = best({"metalcore": ours, "torch": peer}, calls, rounds)
    rows[name] = {"metalcore": r["metalcore"], "torch": r["torch"], "over": r["metalcore"] - r["torch"]}


def attention_rows(rows: dict, calls: int, rounds: int) -> None:
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    sdpa, guard = F.scaled_dot_product_attention, attention._nan_guard
    mc = metalcore.metal_scaled_dot_product_attention

    def stand_in(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return q

    torch.Tensor.is_cuda = torch._C.TensorBase.is_cpu
    attention._nan_guard = lambda out, query, value: out
    try:
        assert q.is_cuda
        pair(rows, "attention decode, CUDA branch", lambda: mc(q, k, v, enable_gqa=True),
             lambda: sdpa(q, k, v, enable_gqa=True), calls, rounds)
        F.scaled_dot_product_attention = stand_in
        pair(rows, "attention decode, CUDA branch (torch stubbed)", lambda: mc(q, k, v, enable_gqa=True),
             lambda: stand_in(q, k, v, enable_gqa=True), calls, rounds)
    finally:
        F.scaled_dot_product_attention = sdpa
        attention._nan_guard = guard
        del torch.Tensor.is_cuda


def route_rows(rows: dict, calls: int, rounds: int) -> None:
    def routed(twin):
        @_route.torch_route(twin, {})
        def public(*args, **kwargs):
            return public.by_torch(*args, **kwargs)
        return public

    def keyword_twin(L, B, *, upper):
        return B

    A, B = torch.randn(1, 3, 3), torch.randn(1, 3, 2)
    one, two, kw = routed(torch.Tensor.contiguous), routed(torch.Tensor.type_as), routed(keyword_twin)
    pair(rows, "route, 1 tensor", lambda: one(A), lambda: A.contiguous(), calls, rounds)
    pair(rows, "route, 2 tensors", lambda: two(A, B), lambda: A.type_as(B), calls, rounds)
    pair(rows, "route, 2 tensors + keyword", lambda: kw(A, B, upper=False),
         lambda: keyword_twin(A, B, upper=False), calls, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls, rounds = args.calls, args.rounds
    rows: dict[str, dict[str, float]] = {}
    attention_rows(rows, calls, rounds)
    for shape in ((1, 0), (1, 4096)):
        x = torch.randn(shape)
        size = "x".join(map(str, shape))
        pair(rows, f"metal_gelu {size}", lambda: metalcore.metal_gelu(x), lambda: F.gelu(x), calls, rounds)
        pair(rows, f"metal_silu {size}", lambda: metalcore.metal_silu(x), lambda: F.silu(x), calls, rounds)
    A = torch.randn(1, 3, 3, dtype=torch.float64)
    A = A @ A.mT + 3 * torch.eye(3, dtype=torch.float64)
    B, L = torch.randn(1, 3, 2, dtype=torch.float64), torch.linalg.cholesky(A)
    with torch.no_grad():
        pair(rows, "cholesky 1x3x3", lambda: mla.cholesky(A), lambda: torch.linalg.cholesky(A), calls, rounds)
        pair(rows, "solve 1x3x3", lambda: mla.solve(A, B), lambda: torch.linalg.solve(A, B), calls, rounds)
        pair(rows, "solve_triangular 1x3x3", lambda: mla.solve_triangular(L, B, upper=False),
             lambda: torch.linalg.solve_triangular(L, B, upper=False), calls, rounds)
        pair(rows, "cholesky_solve 1x3x3", lambda: mla.cholesky_solve(B, L),
             lambda: torch.cholesky_solve(B, L), calls, rounds)
    route_rows(rows, calls, rounds)
    print(f"{'case':48s} {'metalcore':>10s} {'torch':>8s} {'over':>7s}")
    for name, r in rows.items():
        print(f"{name:48s} {r['metalcore']:10.3f} {r['torch']:8.3f} {r['over']:+7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
