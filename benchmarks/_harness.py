"""Tiny benchmark harness shared by every `benchmarks/bench_*.py` module.

Each module defines ``run(ctx: Context) -> list[Result]``. Results are ratios or rates measured
against a baseline *in the same run*, each with the target the issue set, so the table says
whether the target holds on this machine today. Never turn these into timed assertions in tests.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Result:
    """One measured figure."""

    benchmark: str  # e.g. "sealed/resnet50-load"
    metric: str  # e.g. "ratio vs plain safetensors"
    value: float
    unit: str  # "x", "GB/s", "ms", "releases/s", ...
    target: str | None = None  # e.g. "<= 1.15"
    ok: bool | None = None  # whether the target holds; None when there is no target
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """What every benchmark gets: a scratch directory and the run mode."""

    workdir: Path
    quick: bool = False  # smaller sizes / fewer repetitions (used by the test that runs them)


def check(value: float, target: str) -> bool:
    """Evaluate a target such as '<= 1.15', '>= 3', '< 10'."""
    op, _, number = target.partition(" ")
    bound = float(number)
    return {
        "<=": value <= bound,
        "<": value < bound,
        ">=": value >= bound,
        ">": value > bound,
    }[op]


def result(
    benchmark: str,
    metric: str,
    value: float,
    unit: str,
    target: str | None = None,
    **details: Any,
) -> Result:
    return Result(
        benchmark=benchmark,
        metric=metric,
        value=value,
        unit=unit,
        target=target,
        ok=None if target is None else check(value, target),
        details=details,
    )


def best_of(fn: Callable[[], Any], *, repeat: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn`` in seconds over ``repeat`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_of(fn: Callable[[], Any], *, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, by linear interpolation."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
