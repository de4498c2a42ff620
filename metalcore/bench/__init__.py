"""The benchmark harness: ``python -m metalcore.bench`` (DESIGN.md §7; bench/README.md).

One setup function per op, registered with :func:`case`, returns a :class:`Bench`; the harness
times metalcore against the best peers on the device in the same process and reports the ratio
and the fraction of the device's measured roofline as a table, JSON and a PNG chart.
"""

from metalcore.bench.harness import (CASES, MODES, Bench, Case, Context, Result, Row, Skip, case, load_cases,
                                     main, run)

__all__ = ["CASES", "MODES", "Bench", "Case", "Context", "Result", "Row", "Skip", "case", "load_cases", "main",
           "run"]
