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
