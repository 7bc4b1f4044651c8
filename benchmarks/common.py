"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
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


# The child reports its own peak RSS (VmHWM of its own address space). ru_maxrss from wait4
# or getrusage would also count the parent's pages: a child started with fork or vfork
# inherits the parent's high-water mark when it execs.
_CHILD = """
import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_KB " + line.split()[1] + "\\n")
atexit.register(peak)
sys.argv = ["kdcli", *sys.argv[1:]]
runpy.run_module("kdcli", run_name="__main__")
"""


def kdcli_peak_rss(args: list[str]) -> tuple[float, float]:
    """Run ``kdcli ARGS`` in a child process; return (its peak RSS in MB, wall seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    kb = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK_KB")]
    if r.returncode != 0 or not kb:
        raise SystemExit(f"kdcli {' '.join(args[:1])} failed: {r.stderr[-500:]}")
    return int(kb[0]) / 1024, seconds
