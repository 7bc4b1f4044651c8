"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timings of ``fn()``, in seconds (least disturbed by noise)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name: str, rows: list[tuple[str, str]], result: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"== {name}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("JSON " + json.dumps(result))
