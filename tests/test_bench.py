"""The benchmark harness, run in-process on the CPU with --quick: table, JSON, failure reporting."""

import json
import math

import pytest
import torch

from metalcore.bench import harness
from metalcore.bench.harness import Bench, Case, Skip


def _run_cli(tmp_path, capsys, *args):
    out_json = tmp_path / "bench.json"
    code = harness.main(["--device", "cpu", "--quick", "--json", str(out_json),
                         "--png", str(tmp_path / "bench.png"), *args])
    return code, capsys.readouterr().out, json.loads(out_json.read_text())


def test_quick_cpu_run_table_and_json(tmp_path, capsys):
    code, table, record = _run_cli(tmp_path, capsys, "--ops", "rms_norm,cholesky")
    assert code == 0

    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["versions"]["torch"] == torch.__version__
    assert {"commit", "dirty"} <= set(record["git"])
    assert record["date"][:4].isdigit()
    assert record["partial"] is False  # rewritten with partial=True after each row, then final
    assert record["ceilings"]["copy_gbps"] > 0 and record["ceilings"]["gemm_tflops"]["float32"] > 0

    rows = record["rows"]
    ids = {r["id"] for r in rows}
    assert "rms_norm/1024x4096/fp32/fwd" in ids and "rms_norm/1024x4096/fp32/fwd+bwd" in ids
    assert "cholesky/500x16x16/fp32/fwd" in ids
    assert len(ids) == len(rows), "row ids must be unique"
    for r in rows:
        assert r["status"] == "ok", r
        assert r["backend"] in ("torch", "reference")  # on the CPU no kernel: torch's own op, or the reference
        assert r["metalcore"]["median_s"] > 0 and r["metalcore"]["reps"] >= 3
        assert r["metalcore"]["q1_s"] <= r["metalcore"]["median_s"] <= r["metalcore"]["q3_s"]
        assert r["peers"], "the baseline must be timed in the same run"
        best = r["best_peer"]
        assert r["peers"][best]["median_s"] == min(p["median_s"] for p in r["peers"].values())
        assert math.isclose(r["ratio"], r["peers"][best]["median_s"] / r["metalcore"]["median_s"])
        # On the CPU the wall time per call is the measured time itself; the headline ratio uses it.
        assert r["metalcore"]["wall_s"] == r["metalcore"]["median_s"]
        wall_best = r["best_peer_wall"]
        assert math.isclose(r["wall_ratio"], r["peers"][wall_best]["wall_s"] / r["metalcore"]["wall_s"])
        assert r["check_rel_err"] is not None and r["check_rel_err"] <= 1e-3
        assert 0 < r["roofline"] and r["bound"] in ("memory", "compute")

    header = next(line for line in table.splitlines() if line.startswith("op "))
    for column in ("wall", "wall ratio", "metalcore", "best peer", "ratio", "achieved", "roof", "backend"):
        assert column in header
    chol = next(line for line in table.splitlines() if line.startswith("cholesky") and "500x16x16" in line)
    chol_row = next(r for r in rows if r["id"] == "cholesky/500x16x16/fp32/fwd")
    assert chol_row["backend"] in chol and chol_row["best_peer"] in chol and f"{chol_row['ratio']:.2f}x" in chol
    if harness.importlib.util.find_spec("matplotlib") is not None:
        # One chart per op family among the timed rows.
        families = {r["family"] for r in rows if r["ratio"] is not None}
        assert sorted(p.name for p in tmp_path.glob("bench-*.png")) == sorted(f"bench-{f}.png" for f in families)


def _fake_cases(monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    def pending(ctx):
        raise Skip("metalcore.nn.fake does not exist yet")

    def wrong(ctx):
        x = torch.randn(64, 64)
        return Bench(metalcore=lambda: x + 1, peers={"torch": lambda: x.clone()}, shape="64x64",
                     dtype=torch.float32, bytes=2 * x.numel() * 4)

    def peerless(ctx):
        x = torch.randn(8)

        def broken_peer():
            raise RuntimeError("not on this device")
        return Bench(metalcore=lambda: x + 1, peers={"torch": broken_peer}, shape="8", dtype=torch.float32)

    def right(ctx):
        x = torch.randn(64, 64)
        return Bench(metalcore=lambda: x + 1, peers={"torch": lambda: x.add(1)}, shape="64x64",
                     dtype=torch.float32, bytes=2 * x.numel() * 4)

    for name, setup in (("fake_broken", broken), ("fake_pending", pending), ("fake_wrong", wrong),
                        ("fake_peerless", peerless), ("fake_right", right)):
        monkeypatch.setitem(harness.CASES, name, Case(name, "training", setup, ({},), ({},), ("fwd",)))


def test_failures_are_reported_and_fail_the_run(tmp_path, capsys, monkeypatch):
    harness.load_cases()
    _fake_cases(monkeypatch)
    code, table, record = _run_cli(tmp_path, capsys, "--ops", "fake_broken,fake_pending,fake_wrong,fake_peerless,fake_right")
    assert code == 1
    by_op = {}
    for r in record["rows"]:
        by_op.setdefault(r["op"], []).append(r)
    assert by_op["fake_broken"][0]["status"] == "error" and "boom" in by_op["fake_broken"][0]["reason"]
    assert by_op["fake_pending"][0]["status"] == "skipped"
    assert by_op["fake_wrong"][0]["status"] == "mismatch"
    peerless = by_op["fake_peerless"][0]
    assert peerless["status"] == "error" and "no peer could run" in peerless["reason"]
    assert peerless["peer_errors"]["torch"].startswith("RuntimeError: not on this device")
    assert by_op["fake_right"][0]["status"] == "ok", "one broken case must not stop the others"
    assert "not timed: fake_pending" in table and "error: fake_broken" in table and "mismatch: fake_wrong" in table


def test_list_and_bad_names(capsys):
    assert harness.main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("rms_norm", "sdpa", "adamw", "svd", "cholesky"):
        assert name in listing
    with pytest.raises(SystemExit):
        harness.main(["--device", "cpu", "--ops", "no_such_op"])
