"""metalcore.bench.peers: the subprocess protocol (with the numpy runner, which runs anywhere) and the
graceful answers for a peer that is not installed, times out, or is asked for wrongly."""

import importlib.util

import pytest

from metalcore.bench import peers


def test_numpy_runner_returns_a_median_per_case():
    cases = [peers.case("eigh", 4, 5), peers.case("svd", 3, 4, m=6, dtype="float64"), peers.case("solve", 2, 3),
             peers.case("qr", 2, 4), peers.case("cholesky", 2, 4)]
    out = peers.peer_timings("numpy", cases, budget_s=0.01, max_reps=5)
    assert out["available"] and out["peer"] == "numpy"
    assert [(r["op"], r["batch"], r["m"], r["n"], r["dtype"]) for r in out["results"]] == \
        [(c["op"], c["batch"], c["m"], c["n"], c["dtype"]) for c in cases]
    for r in out["results"]:
        assert "error" not in r, r
        assert r["ms"] > 0 and 3 <= r["reps"] <= 5


def test_a_failing_case_does_not_lose_the_others():
    # A non-square "eigh" is an error in numpy; the next case still gets its time.
    out = peers.peer_timings("numpy", [peers.case("eigh", 2, 4, m=5), peers.case("qr", 2, 4)], budget_s=0.01)
    assert "error" in out["results"][0] and out["results"][1]["ms"] > 0


@pytest.mark.parametrize("runner", ["jax", "cupy"])
def test_missing_peer_is_reported_not_raised(runner):
    if importlib.util.find_spec(runner) is not None:
        pytest.skip(f"{runner} is installed here")
    out = peers.peer_timings(runner, [peers.case("eigh", 2, 4)])
    assert out == {"peer": runner, "available": False, "reason": f"not importable: No module named '{runner}'",
                   "results": []}


def test_timeout_is_reported():
    out = peers.peer_timings("numpy", [peers.case("eigh", 2, 4)], timeout_s=0.001)
    assert not out["available"] and "timed out" in out["reason"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="runner"):
        peers.peer_timings("matlab", [])
    with pytest.raises(ValueError, match="op"):
        peers.case("lu", 2, 3)


# --- the peers grid (python -m metalcore.bench --peers) -------------------------------------------

import json  # noqa: E402
import textwrap  # noqa: E402

import torch  # noqa: E402

from metalcore.bench import harness, linalg_peers  # noqa: E402

# A CuPy stand-in on numpy, with the calls the runner makes: timings come back through the real
# subprocess protocol and the real "cupy" branch of the runner.
FAKE_CUPY = textwrap.dedent("""
    import time
    import numpy
    from numpy import *  # noqa: F401,F403
    __version__ = "0.0+numpy-stand-in"
    random = numpy.random

    class linalg:
        eigh, eigvalsh, qr, cholesky, solve = (numpy.linalg.eigh, numpy.linalg.eigvalsh, numpy.linalg.qr,
                                               numpy.linalg.cholesky, numpy.linalg.solve)

        @staticmethod
        def svd(a, full_matrices=True, compute_uv=True):
            if a.shape[-1] == 7:                      # the "slow" size of the timeout test
                time.sleep(60)
            return numpy.linalg.svd(a, full_matrices=full_matrices, compute_uv=compute_uv)

    class cuda:
        class Device:
            def synchronize(self):
                return None

        class runtime:
            @staticmethod
            def getDeviceProperties(index):
                return {"name": b"numpy stand-in"}
""")


@pytest.fixture
def fake_peers(tmp_path, monkeypatch):
    """``cupy`` is the numpy stand-in, ``jax`` an installed-looking package whose import fails."""
    (tmp_path / "cupy.py").write_text(FAKE_CUPY)
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("raise ImportError('jax stand-in: not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def test_grids():
    headline = linalg_peers.grid("headline", ["eigh", "svd"], [torch.float32, torch.float64])
    assert len(headline) == 2 * 2 * 6
    assert {(p.batch, p.n) for p in headline} == set(linalg_peers.HEADLINE)
    full = linalg_peers.grid("full", ["svdvals"], [torch.float32], sizes=[33, 128], batches=[1, 65536])
    assert [(p.n, p.batch) for p in full] == [(33, 1), (33, 65536), (128, 1), (128, 65536)]
    with pytest.raises(ValueError, match="grid"):
        linalg_peers.grid("everything", ["eigh"], [torch.float32])


def test_peer_cases_past_the_call_limit_are_extrapolated_not_run():
    cases = [peers.case("eigh", 2, 4), peers.case("eigh", 200_000, 4)]
    out = peers.peer_timings("numpy", cases, budget_s=0.01, max_reps=3, max_call_s=1e-9)
    first, second = out["results"]
    assert first["ms"] > 0 and "ms" not in second
    assert second["predicted_ms"] == pytest.approx(first["ms"] * 100_000)
    assert "predicted" in second["skipped"]


def test_a_peer_cut_short_keeps_the_cases_it_finished(fake_peers):
    cases = [peers.case("eigh", 2, 4), peers.case("svd", 2, 7), peers.case("eigh", 2, 5)]
    out = peers.peer_timings("cupy", cases, budget_s=0.01, max_reps=3, timeout_s=10)
    assert out["available"] and "stopped after 1 of 3 cases: timed out" in out["reason"]
    first, slow, never = out["results"]
    assert first["ms"] > 0
    assert slow["error"].startswith("not run: stopped after 1 of 3") and never["error"] == slow["error"]


def test_peers_grid_absent_peer_and_fake_peer(fake_peers, tmp_path, capsys):
    """Through the command line on the CPU: the absent peer is noted in every row, the stand-in peer
    is timed, and the ratio is the best of torch and the peer over metalcore's time."""
    out_json = tmp_path / "peers.json"
    code = harness.main(["--peers", "--device", "cpu", "--grid", "full", "--sizes", "3", "--batches", "1,16",
                         "--ops", "eigh,svdvals", "--dtypes", "float64", "--peer-runners", "jax,cupy",
                         "--json", str(out_json)])
    assert code == 0
    table = capsys.readouterr().out
    record = json.loads(out_json.read_text())
    assert record["partial"] is False
    assert record["peers"]["jax"] == {"available": False, "version": None, "device": None,
                                      "reason": "not importable: jax stand-in: not installed"}
    assert record["peers"]["cupy"]["available"] and record["peers"]["cupy"]["version"] == "0.0+numpy-stand-in"
    rows = record["rows"]
    assert [(r["op"], r["n"], r["batch"]) for r in rows] == [("eigh", 3, 1), ("eigh", 3, 16),
                                                            ("svdvals", 3, 1), ("svdvals", 3, 16)]
    for r in rows:
        assert r["jax_s"] is None and r["notes"]["jax"].startswith("not importable")
        assert r["torch_s"] > 0 and r["cupy_s"] > 0 and r["metalcore_s"] > 0
        assert r["served_by"] == "torch" and r["agree"] is True      # the CPU: torch's own function
        best = min(("torch", "cupy"), key=lambda k: r[f"{k}_s"])
        assert r["best_peer"] == best
        assert r["ratio"] == pytest.approx(r[f"{best}_s"] / r["metalcore_s"])
    header = next(line for line in table.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "dtype", "batch", "x", "n", "x", "n", "torch", "jax", "cupy", "metalcore",
                              "served", "by", "best", "peer", "ratio"]
    line = next(line for line in table.splitlines() if line.startswith("svdvals") and "16x3x3" in line)
    assert " n/a " in line and f"{rows[-1]['ratio']:.2f}x" in line
    assert "jax: not importable: jax stand-in: not installed" in table


def test_rows_flag_extrapolated_times_and_peer_errors():
    p = linalg_peers.Point("eigh", "float32", 64, 4096)
    ours = {p: {"metalcore_s": 2e-3, "torch_s": 4.0, "extrapolated": ["torch"], "served_by": "triton:kernel",
                "agree": None}}
    theirs = {"jax": {"available": True, "results": [dict(peers.case("eigh", 4096, 64), ms=1.0)]},
              "cupy": {"available": True, "results": [dict(peers.case("eigh", 4096, 64), error="OutOfMemoryError")]}}
    row, = linalg_peers.rows([p], ours, theirs)
    assert row["jax_s"] == 1e-3 and row["cupy_s"] is None and row["notes"] == {"cupy": "OutOfMemoryError"}
    assert row["best_peer"] == "jax" and row["ratio"] == pytest.approx(0.5)
    text = linalg_peers.format_table([row], ["jax", "cupy"])
    assert "~4 s" in text and "0.50x" in text and "n/a" in text
