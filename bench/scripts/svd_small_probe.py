"""Probe the Triton Jacobi SVD at n <= 8 on the GPU: each case in its own subprocess with a timeout,
printing ok/TIMEOUT/ERROR, the largest sweep count and the relative residual.

    python bench/scripts/svd_small_probe.py [--timeout 30] [--only SUBSTRING] [--out DIR]
    TRITON_INTERPRET=1 python bench/scripts/svd_small_probe.py --device cpu --tiny     # smoke test of the probe

Groups of cases:
* "reported": the shapes from the hang report (Jacobi kernel alone, svd_launch with and without QR
  preconditioning, 2 and 4 warps, 10000x3), with the current kernel (SPLIT barrier as _jacobi sets it).
* "split": the same kernel with the load/store barrier forced on (SPLIT=True) at 1 warp.
* "ieee0": IEEE32=False (approximate division/sqrt, so none of ptxas's div.rn/sqrt.rn slow-path
  subroutine calls in the loop): a hang that disappears here points at those calls.
* "sm": batches of SMs, SMs+1 and 2*SMs: a hang that starts exactly past one program per SM points
  at programs sharing an SM rather than at the data.
* "same": one matrix repeated over the whole batch (data identical, only concurrency varies).
* "serial": the 200 matrices of the 200x8 case one launch each; on a hang the index reached is
  printed (a data-dependent hang names its matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CODE = r"""
import json, sys, time, torch
from metalcore.linalg import _jacobi_triton as jac, svd_triton as S
spec = json.loads(sys.argv[1])
dev = spec["device"]
torch.manual_seed(0)
b, n = spec["batch"], spec["n"]
A = torch.randn(b, n, n, device=dev)
if spec.get("same"):
    A = A[:1].expand(b, n, n).contiguous()

def launch(X, want_v, warps, ieee, split, sweeps):
    # _jacobi with the constexprs overridable (same launch otherwise).
    nb, m, k = X.shape
    Sv = torch.empty(nb, k, device=dev); W = torch.empty(nb, m, k, device=dev); V = torch.empty(nb, k, k, device=dev)
    BM, BN = jac.block_of(m), jac.block_of(k)
    AS = torch.empty(nb, BN, BM, device=dev); VS = torch.empty(nb, BN, BN, device=dev)
    w = warps or jac.jacobi_warps(BN, svd=True)
    sp = jac.replicated(BN // 2, BN, w) if split is None else split
    eps, tiny = torch.finfo(X.dtype).eps, torch.finfo(X.dtype).tiny
    S._jacobi_svd_kernel[(nb,)](X, W, Sv, V, AS, VS, sweeps, m, k, X.stride(0), X.stride(1), X.stride(2),
        m * eps, tiny / eps, S.MAX_SWEEPS, BM=BM, BN=BN, BH=BN // 2, WANT_V=want_v, WANT_SWEEPS=True,
        IEEE32=ieee, SPLIT=sp, num_warps=w)
    return Sv, W, V

t = time.perf_counter()
sw = torch.zeros(b, dtype=torch.int32, device=dev)
kind = spec["kind"]
if kind == "svd":
    U, s, Vh = S.svd_launch(A, False, True, sweeps=sw, precondition=spec["precondition"], num_warps=spec["warps"])
    rec = U @ torch.diag_embed(s) @ Vh
elif kind == "serial":
    for i in range(b):
        print("at", i, flush=True)
        launch(A[i:i + 1], True, spec["warps"], True, None, sw[i:i + 1])
        if dev == "cuda":
            torch.cuda.synchronize()
    s = torch.linalg.svdvals(A); rec = A
else:
    s, W, V = launch(A, spec["want_v"], spec["warps"], spec["ieee"], spec["split"], sw)
    amax = A.abs().amax(dim=(-2, -1), keepdim=True)
    rec = (W @ V.mT) * amax if spec["want_v"] else A
if dev == "cuda":
    torch.cuda.synchronize()
el = time.perf_counter() - t
res = float(((rec - A).norm(dim=(-2, -1)) / A.norm(dim=(-2, -1))).nan_to_num(float("inf")).max())
sv = float(((s - torch.linalg.svdvals(A)).abs().amax(-1) / torch.linalg.svdvals(A)[..., 0]).nan_to_num(float("inf")).max())
print(json.dumps({"ok": True, "s": round(el, 3), "sweeps": int(sw.max()), "nan": int(s.isnan().any(-1).sum()),
                  "resid": res, "sv_err": sv}))
"""


def cases(tiny: bool, sms: int):
    big = [4096, 600, 200] if not tiny else [6]
    jac = {"kind": "jacobi", "want_v": True, "warps": None, "ieee": True, "split": None, "n": 8}
    out = []
    for b in big:
        out.append(("reported", f"jacobi {b}x8", dict(jac, batch=b)))
    out.append(("reported", f"jacobi {big[0]}x8 no-V", dict(jac, batch=big[0], want_v=False)))
    out.append(("reported", f"jacobi {big[0]}x8 2 warps", dict(jac, batch=big[0], warps=2)))
    for b, n in [(16, 8), (1, 8), (big[0], 8), (10000 if not tiny else 5, 3)]:
        for pre in (True, False):
            out.append(("reported", f"svd_launch {b}x{n} pre={int(pre)}",
                        {"kind": "svd", "batch": b, "n": n, "precondition": pre, "warps": None}))
    out.append(("reported", f"svd_launch {big[0]}x8 4 warps",
                {"kind": "svd", "batch": big[0], "n": 8, "precondition": True, "warps": 4}))
    out.append(("reported", f"svd_launch {big[0]}x16 (control)",
                {"kind": "svd", "batch": big[0], "n": 16, "precondition": True, "warps": None}))
    out.append(("split", f"jacobi {big[0]}x8 SPLIT=1", dict(jac, batch=big[0], split=True)))
    out.append(("split", f"jacobi {big[0]}x3 SPLIT=1", dict(jac, batch=big[0], n=3, split=True)))
    out.append(("ieee0", f"jacobi {big[0]}x8 IEEE32=0", dict(jac, batch=big[0], ieee=False)))
    out.append(("ieee0", f"jacobi {big[0]}x3 IEEE32=0", dict(jac, batch=big[0], n=3, ieee=False)))
    for b in ([sms, sms + 1, 2 * sms, 4 * sms] if not tiny else [2]):
        out.append(("sm", f"jacobi {b}x8 (SMs={sms})", dict(jac, batch=b)))
    out.append(("same", f"jacobi {big[0]}x8 one matrix repeated", dict(jac, batch=big[0], same=True)))
    out.append(("serial", f"jacobi 200x8 one launch per matrix" if not tiny else "serial 3x8",
                {"kind": "serial", "batch": 200 if not tiny else 3, "n": 8, "warps": None}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small batches (for the CPU interpreter)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--only", default="", help="run only cases whose group or name contains this")
    ap.add_argument("--out", default=None, help="folder for probe.json")
    args = ap.parse_args()
    sms = 132
    if args.device == "cuda":
        import torch
        sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for group, name, spec in cases(args.tiny, sms):
        if args.only and args.only not in group and args.only not in name:
            continue
        spec["device"] = args.device
        t = time.time()
        try:
            p = subprocess.run([sys.executable, "-c", CODE, json.dumps(spec)], capture_output=True, text=True,
                               timeout=args.timeout, env=env)
            last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
            if p.returncode == 0 and last.startswith("{"):
                r = json.loads(last)
                status = f"ok  sweeps {r['sweeps']:2d}  nan {r['nan']}  resid {r['resid']:.2e}  sv_err {r['sv_err']:.2e}  {r['s']:.2f} s"
            else:
                r = {"ok": False, "error": p.stderr.strip()[-600:]}
                status = "ERROR " + " | ".join(p.stderr.strip().splitlines()[-2:])[-300:]
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")).strip().splitlines()
            r = {"ok": False, "timeout": True, "last": tail[-1] if tail else ""}
            status = "TIMEOUT" + (f" (last: {tail[-1]})" if tail else "")
        rows.append({"group": group, "name": name, "spec": spec, "result": r, "wall": round(time.time() - t, 1)})
        print(f"{group:9s} {name:42s} {status}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "svd_small_probe.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
