"""The pass counts of torch's OpInfo samples (tests/linalg/test_opinfo.py) per backend, printed at the
end of a run that includes them: the figures the issue's closing note reports for each backend."""

import collections

KINDS = {"test_sample_matches_torch": "samples", "test_sample_gradient_matches_torch": "gradients",
         "test_error_input_raises_torchs_exception": "error inputs"}
OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "error")


def pytest_terminal_summary(terminalreporter):
    counts = collections.defaultdict(collections.Counter)
    for outcome in OUTCOMES:
        for report in terminalreporter.stats.get(outcome, []):
            test, _, params = getattr(report, "nodeid", "").partition("test_opinfo.py::")[2].partition("[")
            if test in KINDS:
                counts[params.split("-", 1)[0]][(KINDS[test], outcome)] += 1
    if not counts:
        return
    terminalreporter.section("OpInfo samples per backend")
    for backend, by in sorted(counts.items()):
        parts = []
        for kind in KINDS.values():
            total = sum(n for (k, _), n in by.items() if k == kind)
            if total:
                others = ", ".join(f"{by[kind, o]} {o}" for o in OUTCOMES[1:] if by[kind, o])
                parts.append(f"{kind} {by[kind, 'passed']}/{total} passed" + (f" ({others})" if others else ""))
        terminalreporter.write_line(f"{backend:>9}: " + "; ".join(parts))
