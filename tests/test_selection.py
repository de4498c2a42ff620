"""The measured selection tables: the reader's rule, the sweep's coverage of every op, the committed
tables' coverage of the grid, and a smoke run of the sweep itself (Triton interpreter)."""

import dataclasses
import json

import pytest
import torch

from metalcore import _selection
from metalcore._kernels import load_kernels
from metalcore._op import registered_ops
from metalcore.bench import selection


def _point(variant, dtype, size, batch, winner):
    return dict(variant=variant, dtype=dtype, size=size, batch=batch, winner=winner)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_selection, "TABLE_DIR", tmp_path)
    _selection.reload()
    yield tmp_path
    _selection.reload()


def _write(table_dir, kind, ops):
    (table_dir / f"{kind}.json").write_text(json.dumps({"ops": ops}))


def test_reader_takes_the_kernel_only_where_every_neighbour_measured_it_faster(table_dir):
    # size 8: kernel wins at batch 16 and 256, loses at 1; size 16: kernel wins everywhere.
    points = [_point("", "float32", 8, 1, "torch"), _point("", "float32", 8, 16, "kernel"),
              _point("", "float32", 8, 256, "kernel"), _point("", "float32", 16, 1, "kernel"),
              _point("", "float32", 16, 16, "kernel"), _point("", "float32", 16, 256, "kernel")]
    t = _selection._Table({"ops": {"cholesky_ex": points}})
    assert t.prefers_kernel("cholesky_ex", "", "float32", 8, 16) is True       # a grid point
    assert t.prefers_kernel("cholesky_ex", "", "float32", 8, 1) is False
    assert t.prefers_kernel("cholesky_ex", "", "float32", 8, 100) is True      # between two kernel wins
    assert t.prefers_kernel("cholesky_ex", "", "float32", 8, 8) is False       # crossover unmeasured: torch
    assert t.prefers_kernel("cholesky_ex", "", "float32", 12, 16) is True      # between sizes, both kernel
    assert t.prefers_kernel("cholesky_ex", "", "float32", 12, 4) is False      # size 8 disagrees there
    assert t.prefers_kernel("cholesky_ex", "", "float32", 16, 10**6) is True   # past the edge: the edge decides
    assert t.prefers_kernel("cholesky_ex", "", "float32", 99, 1) is True
    assert t.prefers_kernel("cholesky_ex", "", "float64", 8, 16) is None       # dtype not measured
    assert t.prefers_kernel("eigh", "vectors", "float32", 8, 16) is None       # op not measured


def test_coordinates_locate_calls():
    A = torch.empty(4, 5, 7, 3)
    assert _selection.coordinates("qr", (A, "reduced")) == ("", "float32", 7, 20)
    assert _selection.coordinates("eigh", (torch.empty(2, 4, 4, dtype=torch.float64), "L", False)) == (
        "values", "float64", 4, 2)
    assert _selection.coordinates("cholesky_solve", (torch.empty(3, 5, 2), torch.empty(3, 5, 5), False))[2:] == (5, 3)
    assert _selection.coordinates("rms_norm_bwd", (torch.empty(2, 3, 64, dtype=torch.bfloat16),)) == (
        "", "bfloat16", 64, 6)
    assert _selection.coordinates("adamw_step_", ([],)) is None


def test_aliases_follow_their_measured_op(table_dir, monkeypatch):
    monkeypatch.setattr(_selection, "device_kind", lambda device: "nvidia-test-card")
    _write(table_dir, "nvidia-test-card", {"rms_norm_fwd": [_point("", "float32", 128, 1, "torch"),
                                                            _point("", "float32", 128, 4096, "kernel")]})
    cuda = torch.device("cpu")  # device_kind is patched: any device stands for the card
    dy = torch.empty(4096, 128)
    assert _selection.measured_choice("rms_norm_bwd", "triton", cuda, (dy, dy, None, dy, 0.0)) is True
    assert _selection.measured_choice("rms_norm_fwd", "triton", cuda, (torch.empty(1, 128), None, 1e-6, 0.0)) is False
    assert _selection.measured_choice("svd", "triton", cuda, (torch.empty(2, 3, 3), False, True)) is None


def test_card_without_table_uses_its_vendors_measured_card(table_dir, monkeypatch):
    _write(table_dir, "nvidia-h100-80gb-hbm3", {"qr": [_point("", "float32", 4, 1, "kernel")]})
    assert _selection._load("nvidia-a100-sxm4-40gb").prefers_kernel("qr", "", "float32", 4, 1) is True
    assert _selection._load("mps") is None


def test_sweep_covers_every_registered_kernel():
    load_kernels()
    swept = {s.key for s in selection.sweeps()}
    with_kernel = {name for name, op in registered_ops().items() if op.kernels}
    missing = with_kernel - swept - set(selection.NOT_SWEPT)
    assert not missing, f"ops with a kernel neither swept nor listed in NOT_SWEPT with a reason: {missing}"
    assert not (swept & set(selection.NOT_SWEPT)), "an op is both swept and excluded"
    for name, op in registered_ops().items():
        if name in selection.NOT_SWEPT and name in _selection._ALIAS:
            assert _selection._ALIAS[name] in swept, f"{name} follows {_selection._ALIAS[name]}, which is not swept"


def test_committed_tables_cover_the_grid():
    tables = sorted(_selection.TABLE_DIR.glob("*.json"))
    for path in tables:
        data = json.loads(path.read_text())
        assert data["meta"]["device"]["name"], f"{path.name}: no card name"
        assert data["meta"]["date"], f"{path.name}: no date"
        for s in selection.sweeps():
            have = {(p["variant"], p["dtype"], p["size"], p["batch"]) for p in data["ops"].get(s.key, [])}
            for dtype in s.dtypes:
                for size, batch in selection.grid_points(s):
                    key = (s.variant, str(dtype).removeprefix("torch."), size, batch)
                    assert key in have, f"{path.name}: {s.name} has no point {key}"


def test_the_rule():
    assert selection._violates(dict(torch_s=50e-6, auto_s=60e-6)) is False     # 0.83x, host-bound: >= 0.8
    assert selection._violates(dict(torch_s=50e-6, auto_s=70e-6)) is True      # 0.71x
    assert selection._violates(dict(torch_s=200e-6, auto_s=205e-6)) is False   # 0.976x
    assert selection._violates(dict(torch_s=200e-6, auto_s=220e-6)) is True    # 0.91x
    assert selection._violates(dict(torch_s=200e-6, auto_s=None)) is True      # metalcore failed, torch did not
    assert selection._violates(dict(torch_s=None, auto_s=1e-3)) is False       # torch failed (cuSOLVER's limit)


def test_sweep_smoke_on_the_interpreter(monkeypatch, tmp_path):
    """One op, two batches, through the real sweep: both paths timed, output agreement checked, a
    winner recorded, and the table merged into a file that the reader indexes."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    load_kernels()
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    points = selection.measure_row(s, torch.device("cpu"), "triton", torch.float32, 3, [1, 2], lambda msg: None)
    assert [p["batch"] for p in points] == [1, 2]
    for p in points:
        assert p["served_by"] == "triton" and p["agree"] is True
        assert p["torch_s"] > 0 and p["kernel_s"] > 0 and p["winner"] in ("kernel", "torch")
    path = tmp_path / "card.json"
    table = selection.merge_into(path, {"cholesky_ex": points}, {"device": {"name": "test"}})
    assert len(table["ops"]["cholesky_ex"]) == 2
    again = selection.merge_into(path, {"cholesky_ex": points[:1]}, {"device": {"name": "test"}})
    assert len(again["ops"]["cholesky_ex"]) == 2  # the re-measured row replaced, the rest kept
    parsed = _selection._Table(json.loads(path.read_text()))
    assert parsed.prefers_kernel("cholesky_ex", "", "float32", 3, 1) is (points[0]["winner"] == "kernel")


def test_check_confirms_a_violation_on_more_calls(monkeypatch):
    """A point that fails on the check's few calls is timed again on more, and that timing decides;
    the first stays in the point. A failure that the second timing repeats stays a violation."""
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    for second, violates in (({"torch": 200e-6, "auto": 201e-6}, False), ({"torch": 200e-6, "auto": 230e-6}, True)):
        calls = []

        def timed(fns, device, budget_s, max_reps, min_reps=selection.MIN_REPS, second=second):
            calls.append(max_reps)
            return {"torch": 200e-6, "auto": 240e-6} if len(calls) == 1 else dict(second)

        monkeypatch.setattr(selection, "wall_times", timed)
        points, violations = selection.check(torch.device("cpu"), [s], lambda m: None, [torch.float64], [2], [1])
        (p,) = points
        assert calls == [selection.CHECK_MAX_REPS, selection.CONFIRM_REPS]
        assert p["first"] == {"torch_s": 200e-6, "auto_s": 240e-6}
        assert p["auto_s"] == second["auto"] and p["violation"] is violates and len(violations) == int(violates)


def test_sweep_confirms_a_narrow_win_against_torch_alone(monkeypatch):
    """A kernel that beat torch by less than CONFIRM_BELOW is timed again against torch alone on more
    calls, and that decides (fp64 solve n = 32 on the H100: torch 241 µs in the sweep, 178 in the
    check); a clear win is not re-timed."""
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    monkeypatch.setattr(selection, "_agrees", lambda *a: True)
    monkeypatch.setattr(selection, "_reference", lambda *a: (None, None))
    for first, second, winner, confirmed in (({"torch": 241e-6, "kernel": 214e-6}, {"torch": 178e-6, "kernel": 193e-6}, "torch", True),
                                             ({"torch": 241e-6, "kernel": 160e-6}, {"torch": 230e-6, "kernel": 161e-6}, "kernel", True),
                                             ({"torch": 500e-6, "kernel": 200e-6}, None, "kernel", False)):
        calls = []

        def timed(fns, device, budget_s=selection.BUDGET_S, max_reps=selection.MAX_REPS, min_reps=selection.MIN_REPS,
                  first=first, second=second):
            calls.append((sorted(fns), max_reps))
            return {n: (first if len(calls) == 1 else second)[n] for n in fns}

        monkeypatch.setattr(selection, "wall_times", timed)
        monkeypatch.setattr(selection, "_build", lambda *a: (torch.eye(2, dtype=torch.float64),))
        monkeypatch.setattr(selection._registered(s), "backend_for", lambda *a: "triton")
        (p,) = selection.measure_row(s, torch.device("cpu"), "triton", torch.float64, 2, [1], lambda m: None)
        assert p["winner"] == winner
        if confirmed:
            assert calls[1] == (["kernel", "torch"], selection.CONFIRM_REPS)
            assert p["first"] == {"torch_s": first["torch"], "kernel": first["kernel"]}
            assert (p["torch_s"], p["kernel_s"]) == (second["torch"], second["kernel"])
        else:
            assert len(calls) == 1 and "first" not in p


def test_check_says_which_points_torch_serves(monkeypatch):
    """A point below the rule where the table gives the call to torch is marked so (the route's host
    cost in front of torch's call, not a wrong choice), in the point and in the summary line."""
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    monkeypatch.setattr(selection, "wall_times", lambda fns, *a, **k: {"torch": 200e-6, "auto": 230e-6})
    for served_by, served in (("reference", "torch"), ("triton", "metalcore")):
        monkeypatch.setattr(selection._registered(s), "backend_for", lambda *a, b=served_by: b)
        points, violations = selection.check(torch.device("cpu"), [s], lambda m: None, [torch.float64], [2], [1])
        assert violations == points and points[0]["served"] == served
        line = selection.summary_line(points, violations, "cpu")
        assert ("1 of the points below the rule served by torch's own call" in line) is (served == "torch")


def test_check_reports_what_a_failing_automatic_call_raised(monkeypatch):
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    monkeypatch.setattr(selection, "wall_times", lambda fns, *a, **k: {"torch": 1e-4, "auto": None})

    def failing(*args):
        raise RuntimeError("CUSOLVER_STATUS_INTERNAL_ERROR")

    s = dataclasses.replace(s, metalcore=failing)
    points, violations = selection.check(torch.device("cpu"), [s], lambda m: None, [torch.float64], [2], [1])
    assert violations == points and points[0]["auto_error"] == "RuntimeError: CUSOLVER_STATUS_INTERNAL_ERROR"


def test_a_violation_refutes_the_points_paths(tmp_path):
    # At the violating point every path that had beaten torch is refuted: torch serves it; the
    # neighbouring point keeps its choice; a violation where torch already serves changes nothing.
    points = [_timed("vectors", "float64", 3, 16, 256e-6, 224e-6, {"registers": (213e-6, True)}),
              _timed("vectors", "float64", 3, 256, 258e-6, 217e-6, {"registers": (214e-6, True)}),
              _timed("vectors", "float64", 4, 16, 100e-6, 99e-6, {"registers": (98e-6, True)})]
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"ops": {"eigh": points}}))
    bad = [dict(op="eigh:vectors", dtype="float64", size=3, batch=16), dict(op="eigh:vectors", dtype="float64", size=4, batch=16)]
    assert selection.refute(path, bad) == ["eigh:vectors float64 size=3 batch=16: registers -> torch"]
    table = json.loads(path.read_text())["ops"]["eigh"]
    assert table[0]["refuted"] == ["kernel", "registers"] and table[0]["winner"] == "torch"
    assert _selection.faster_paths(table[0]) == {} and _selection.winner(table[1]) == "registers"
    assert "refuted" not in table[2]


def test_a_sweep_and_its_check_in_one_run_refute_a_choice_the_check_finds_slower(monkeypatch, tmp_path):
    """`--selection --check`: the sweep times the kernel faster than torch, the check times the
    automatic call slower; the run ends with the point refuted in the table it wrote."""
    pytest.importorskip("triton")
    from metalcore.bench import harness

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_selection, "TABLE_DIR", tmp_path)
    times = {"torch": 1e-3, "kernel": 1e-4, "auto": 3e-3}
    monkeypatch.setattr(selection, "wall_times", lambda fns, *a, **k: {n: times[n] for n in fns})
    load_kernels()
    code = harness.main(["--selection", "--check", "--device", "cpu", "--ops", "cholesky_ex", "--dtypes", "float64",
                         "--sizes", "2", "--batches", "1", "--out-dir", str(tmp_path / "out")])
    assert code == 1                                           # the check's violation
    (table,) = tmp_path.glob("*.json")
    (point,) = json.loads(table.read_text())["ops"]["cholesky_ex"]
    assert point["refuted"] == ["kernel"] and point["winner"] == "torch"
    _selection.reload()


def test_check_extrapolates_the_automatic_path_where_it_is_torchs_long_call(monkeypatch):
    """Where the automatic path gives the inputs to torch and torch's call is extrapolated, the
    automatic one is too, with torch's time, whatever it took at the previous batch."""
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    monkeypatch.setattr(selection, "LONG_CALL_S", 0.5)
    monkeypatch.setattr(selection, "wall_times", lambda fns, *a, **k: {n: {"torch": 1.0, "auto": 1e-6}[n] for n in fns})
    points, _ = selection.check(torch.device("cpu"), [s], lambda m: None, [torch.float64], [2], [1, 16])
    assert points[1]["torch_s"] == points[1]["auto_s"] == 16.0
    assert sorted(points[1]["extrapolated"]) == ["auto", "torch"]


def test_a_row_swept_from_a_later_batch_extrapolates_torch_from_the_table(monkeypatch):
    """``--batches 16``: torch's time at batch 1 in the table already written predicts batch 16
    past LONG_CALL_S, so torch is extrapolated, not run, in the sweep and in the check; without a
    table it runs."""
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    monkeypatch.setattr(selection, "LONG_CALL_S", 0.5)
    ran = []
    monkeypatch.setattr(selection, "wall_times", lambda fns, *a, **k: ran.append(sorted(fns)) or {n: 1e-3 for n in fns})
    table = {"ops": {"cholesky_ex": [dict(variant="", dtype="float64", size=2, batch=b, torch_s=t)
                                     for b, t in ((1, 0.1), (256, None))]}}
    assert selection.torch_seed(table, s, torch.float64, 2, 16) == {"torch": (1, 0.1)}
    assert selection.torch_seed(table, s, torch.float64, 2, 1) == {} and selection.torch_seed(None, s, torch.float64, 2, 16) == {}
    for previous, extrapolated in ((table, True), (None, False)):
        ran.clear()
        with torch.no_grad():
            ops = selection.sweep(torch.device("cpu"), "reference", [s], lambda m: None, [torch.float64], [2], [16], previous)
        (p,) = ops["cholesky_ex"]
        assert ("torch" in p["extrapolated"]) is extrapolated and all(("torch" in r) is not extrapolated for r in ran)
        if extrapolated:
            assert p["torch_s"] == pytest.approx(1.6)
        points, _ = selection.check(torch.device("cpu"), [s], lambda m: None, [torch.float64], [2], [16], previous)
        assert ("torch" in points[0]["extrapolated"]) is extrapolated


def test_extrapolates_calls_past_the_long_call_limit(monkeypatch):
    """A point predicted longer than LONG_CALL_S from the previous batch is not run but scaled."""
    monkeypatch.setattr(selection, "LONG_CALL_S", 0.0)
    s = next(s for s in selection.sweeps() if s.key == "cholesky_ex")
    with torch.no_grad():
        points = selection.measure_row(s, torch.device("cpu"), "reference", torch.float64, 2, [1, 8], lambda m: None)
    first, second = points
    assert not first["extrapolated"] and sorted(second["extrapolated"]) == ["kernel", "torch"]
    assert second["torch_s"] == pytest.approx(first["torch_s"] * 8)


# --- alternative paths ---------------------------------------------------------------------------

def _timed(variant, dtype, size, batch, torch_s, kernel_s, paths=None, agree=True):
    """A point as the sweep writes it: every path's median, whether it agreed with torch."""
    point = dict(variant=variant, dtype=dtype, size=size, batch=batch, torch_s=torch_s, kernel_s=kernel_s,
                 agree=agree, paths={name: {"s": s, "agree": ok} for name, (s, ok) in (paths or {}).items()})
    point["winner"] = _selection.winner(point)
    return point


def test_reader_takes_a_path_only_where_every_neighbour_measured_that_path_faster():
    # size 8: registers fastest at batch 16, only the kernel beats torch at 256; registers disagrees at 4096.
    # size 16 (committed-table format, winner only): the kernel everywhere.
    points = [_timed("vectors", "float32", 8, 16, 100e-6, 80e-6,
                     {"registers": (50e-6, True), "cusolver": (None, None)}),
              _timed("vectors", "float32", 8, 256, 100e-6, 90e-6, {"registers": (120e-6, True)}),
              _timed("vectors", "float32", 8, 4096, 1e-3, 2e-3, {"registers": (0.1e-3, False)}),
              _point("vectors", "float32", 16, 16, "kernel"), _point("vectors", "float32", 16, 256, "kernel")]
    assert [p["winner"] for p in points[:3]] == ["registers", "kernel", "torch"]
    t = _selection._Table({"ops": {"eigh": points}})
    known = frozenset({"kernel", "registers", "cusolver"})
    assert t.path("eigh", "vectors", "float32", 8, 16, known) == "registers"      # a grid point: its winner
    assert t.path("eigh", "vectors", "float32", 8, 100, known) == "kernel"        # registers lost at 256
    assert t.path("eigh", "vectors", "float32", 8, 4096, known) == "torch"        # a wrong fast answer never wins
    assert t.path("eigh", "vectors", "float32", 8, 1000, known) == "torch"        # no path won on both sides
    assert t.path("eigh", "vectors", "float32", 12, 16, known) == "kernel"        # size 16 measured the kernel only
    assert t.path("eigh", "vectors", "float32", 8, 16) == "kernel"                # registers unknown: the kernel
    assert t.prefers_kernel("eigh", "vectors", "float32", 8, 16) is True
    assert t.path("eigh", "values", "float32", 8, 16, known) is None              # not measured


def test_reader_ranks_paths_by_time_relative_to_the_fastest():
    # Between batches 16 and 256 both paths beat torch on both sides: registers is 2x faster at 16,
    # the kernel 1.1x faster at 256, so registers has the smaller total (1 + 1.1 against 2 + 1).
    points = [_timed("", "float64", 4, 16, 1.0, 0.2, {"registers": (0.1, True)}),
              _timed("", "float64", 4, 256, 1.0, 0.5, {"registers": (0.55, True)})]
    t = _selection._Table({"ops": {"svd": points}})
    assert t.path("svd", "", "float64", 4, 100, frozenset({"kernel", "registers"})) == "registers"


def test_a_near_tie_with_torch_goes_to_torch():
    # 5% faster than torch is within run-to-run noise (WIN_MARGIN): torch; 20% faster: the path.
    point = _timed("", "float32", 8, 4096, 100e-6, 95e-6, {"registers": (83e-6, True)})
    assert _selection.faster_paths(point) == {"registers": 1.0}
    assert point["winner"] == "registers"
    point = _timed("", "float32", 8, 4096, 100e-6, 95e-6, {"registers": (96e-6, True)})
    assert _selection.faster_paths(point) == {} and point["winner"] == "torch"


def test_torch_failing_at_a_point_leaves_it_to_any_path_that_works():
    point = _timed("", "float32", 3, 65536, None, 2e-3, {"registers": (1e-3, True)})
    assert _selection.faster_paths(point) == {"registers": 1.0, "kernel": 2.0}
    assert point["winner"] == "registers"


@pytest.fixture
def card_table(table_dir, monkeypatch):
    """A table for a made-up card that CPU tensors stand for (device_kind patched)."""
    monkeypatch.setattr(_selection, "device_kind", lambda device: "nvidia-test-card")

    def write(points):
        _write(table_dir, "nvidia-test-card", {"eigh": points})
        _selection.reload()

    return write


def test_a_table_naming_a_path_routes_to_it(card_table, triton_backend, launches):
    from metalcore.linalg import eigh_triton
    import metalcore.linalg

    card_table([_timed("vectors", "float64", 5, 2, 1e-3, 9e-4, {"registers": (1e-4, True)})])
    A = torch.randn(2, 5, 5, dtype=torch.float64)
    A = A + A.mT
    args = (A, "L", True)
    assert _selection.measured_path("eigh", "triton", A.device, args) == "registers"
    assert _selection.measured_choice("eigh", "triton", A.device, args) is True
    assert _selection.route("eigh", "triton", args).name == "registers"
    registers = launches(eigh_triton, "eigh_registers")
    scratch = launches(eigh_triton, "eigh_launch")
    L, Q = metalcore.linalg.eigh(A)
    assert registers and not scratch
    torch.testing.assert_close(L, torch.linalg.eigvalsh(A))
    with _selection.use_path("eigh", "kernel"):    # the kernel's own routing, whatever the table says
        metalcore.linalg.eigh(A)
    assert scratch and len(registers) == 1


def test_an_unknown_path_is_refused(card_table, triton_backend, launches):
    from metalcore.linalg import eigh_triton
    import metalcore.linalg

    # Only a path this metalcore lacks beat torch: the table's choice is torch, with a warning naming it.
    card_table([_timed("vectors", "float64", 5, 2, 1e-3, 2e-3, {"warp_speed": (1e-5, True)})])
    A = torch.randn(2, 5, 5, dtype=torch.float64)
    args = (A, "L", True)
    refusal = r"names path\(s\) warp_speed for eigh.*it has: cusolver, kernel, registers, shifted, syevj, tridiag"
    with pytest.warns(RuntimeWarning, match=refusal):
        assert _selection.measured_path("eigh", "triton", A.device, args) == "torch"
    assert _selection.measured_choice("eigh", "triton", A.device, args) is False
    assert _selection.route("eigh", "triton", args) is None
    scratch = launches(eigh_triton, "eigh_launch")
    metalcore.linalg.eigh(A + A.mT)                # forced triton: the kernel's own routing
    assert scratch
    unknown = "metalcore.eigh has no path 'warp_speed'; it has: kernel, cusolver, registers, shifted, syevj, tridiag"
    with pytest.raises(ValueError, match=unknown):
        with _selection.use_path("eigh", "warp_speed"):
            pass
    with pytest.raises(ValueError, match="path name"):
        _selection.register_path("eigh", "triton", "torch", supports=lambda *a: True)


def test_a_forced_path_that_does_not_take_the_input_raises(triton_backend):
    import metalcore.linalg
    from metalcore import BackendUnavailableError

    A = torch.eye(40, dtype=torch.float64).expand(2, 40, 40)
    with _selection.use_path("eigh", "registers"), pytest.raises(BackendUnavailableError, match="'registers' does not"):
        metalcore.linalg.eigh(A)
    with _selection.use_path("eigh", "cusolver"), pytest.raises(BackendUnavailableError, match="'cusolver' does not"):
        metalcore.linalg.eigh(A[:, :4, :4])      # cuSOLVER: CUDA only


@pytest.mark.parametrize("automatic", ["triton", "reference"])
def test_the_sweep_forces_only_the_swept_op_on_the_devices_own_backend(automatic, card_table, executions, monkeypatch):
    """A path is timed as automatic selection runs it: on the device's own backend only the swept op
    is forced, and an op the path calls chooses by its table (here cholesky_ex: torch). Forcing
    another backend forces it for every op, as ``use_backend`` does."""
    pytest.importorskip("triton")
    import metalcore.linalg
    from metalcore._backend import requested_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: automatic)
    monkeypatch.setattr(selection, "automatic_backend", lambda device: automatic)
    _write(_selection.TABLE_DIR, "nvidia-test-card",
           {"eigh": [_timed("vectors", "float64", 5, 2, 1e-4, 1e-3, {"registers": (2e-4, True)})],
            "cholesky_ex": [_timed("", "float64", 5, 2, 1e-4, 1e-3)]})
    _selection.reload()
    s = next(s for s in selection.sweeps() if s.key == "eigh" and s.variant == "vectors")
    inputs = selection._build(s, torch.device("cpu"), torch.float64, 5, 2)
    forced = selection._Forced(s, "triton", "registers", inputs, choose=True)
    spd = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    with forced.forcing():
        assert requested_backend() == ("auto" if automatic == "triton" else "triton")
        L, _ = forced.bare()
        C, _ = metalcore.linalg.cholesky_ex(spd)
    torch.testing.assert_close(L, torch.linalg.eigvalsh(inputs[0]))
    torch.testing.assert_close(C, spd)
    assert ("eigh", "triton") in executions
    # The torch route calls torch directly (no op execution to observe); the kernel would be seen.
    assert (("cholesky_ex", "triton") in executions) is (automatic != "triton")


def test_sweep_times_every_alternative_path_on_the_interpreter(monkeypatch):
    """eigvalsh n = 3 through the real sweep: the kernel, the register tile, the shifted one-sided
    kernel and the tridiagonal bisection all timed (the cuSOLVER paths do not take CPU tensors), each
    checked against torch, the fastest of all recorded."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    load_kernels()
    s = next(s for s in selection.sweeps() if s.name == "eigh:values")
    point, = selection.measure_row(s, torch.device("cpu"), "triton", torch.float64, 3, [2], lambda msg: None)
    assert point["kernel_s"] > 0 and point["agree"] is True
    assert set(point["paths"]) == {"registers", "shifted", "tridiag"}
    for path in ("registers", "shifted", "tridiag"):
        assert point["paths"][path]["s"] > 0 and point["paths"][path]["agree"] is True
    assert point["winner"] == _selection.winner(point)
    assert point["winner"] == "torch"            # the interpreter is far slower than LAPACK


def test_sweep_checks_paths_where_torch_cannot_answer_the_full_batch(monkeypatch):
    """Where torch's call fails (cuSOLVER's batch limit), a path is still checked against torch on the
    first matrices, so a wrong answer cannot win by default."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    load_kernels()
    s = next(s for s in selection.sweeps() if s.name == "eigh:values")

    def torch_limited(A, *rest):
        if A.shape[0] > selection.REFERENCE_SLICE:
            raise RuntimeError("CUSOLVER_STATUS_INTERNAL_ERROR")
        return torch.linalg.eigvalsh(A, *rest)

    def wrong_registers(A, UPLO, compute_v):
        L, Q = torch.linalg.eigh(A)
        return L + 1.0, Q

    monkeypatch.setattr(selection, "REFERENCE_SLICE", 2)
    s = dataclasses.replace(s, torch=torch_limited)
    registers = _selection.paths("eigh", "triton")["registers"]
    monkeypatch.setitem(_selection._PATHS["eigh", "triton"], "registers",
                        dataclasses.replace(registers, fn=wrong_registers))
    point, = selection.measure_row(s, torch.device("cpu"), "triton", torch.float64, 3, [4], lambda msg: None)
    assert point["torch_s"] is None
    assert point["agree"] is True and point["paths"]["registers"]["agree"] is False
    assert point["winner"] in ("kernel", "shifted")     # the right answers; never the wrong one


def test_a_forced_path_is_part_of_the_plan_not_a_reason_to_drop_plans(triton_backend, launches):
    """The sweep forces a path on every timed call: entering and leaving ``use_path`` keeps every
    plan, a call inside the block runs the forced path and the same call outside the kernel's own
    routing, alternating as often as the sweep alternates them."""
    from metalcore.linalg import eigh_triton
    from metalcore.linalg.eigh import eigh_op
    import metalcore.linalg

    A = torch.randn(2, 5, 5, dtype=torch.float64)
    A = A + A.mT
    registers = launches(eigh_triton, "eigh_registers")
    scratch = launches(eigh_triton, "eigh_launch")
    for _ in range(3):
        with _selection.use_path("eigh", "registers"):
            metalcore.linalg.eigh(A)
        plans = dict(eigh_op._plans)
        with _selection.use_path("eigh", "kernel"):
            metalcore.linalg.eigh(A)
        assert all(eigh_op._plans.get(key) is plan for key, plan in plans.items()), "use_path dropped plans"
    assert len(registers) == 3 and len(scratch) == 3


def test_the_torch_route_steps_aside_while_a_path_is_forced():
    """A signature the torch route decided is decided again by the full path inside ``use_path``
    (whose plan key holds the forced path), and takes the route again after the block."""
    from metalcore.linalg.cholesky import cholesky_ex_op
    import metalcore.linalg

    A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    metalcore.linalg.cholesky(A)
    metalcore.linalg.cholesky(A)                   # a route hit: no plan asked for
    asked = []
    original = cholesky_ex_op.plan
    cholesky_ex_op.plan = lambda *args: asked.append(args) or original(*args)
    try:
        metalcore.linalg.cholesky(A)
        assert not asked
        with _selection.use_path("cholesky_ex", "kernel"):
            metalcore.linalg.cholesky(A)
        assert len(asked) == 1
        metalcore.linalg.cholesky(A)
        assert len(asked) == 1
    finally:
        del cholesky_ex_op.plan
