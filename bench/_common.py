"""What several benchmarks report the same way: percentiles and median-of-runs lines.

Imported by its sibling scripts as `_common` (they run as `python bench/NAME.py`, which puts
this folder first on sys.path).
"""

from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank below (no interpolation)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def median_of_runs(values: list[float]) -> str:
    """'median M (runs: a, b, c)', two decimals each."""
    return (f"median {statistics.median(values):.2f} "
            f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
