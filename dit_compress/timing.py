"""Wall-clock timing of repeated calls: the one latency protocol of evaluation, export and benchmarks."""

from __future__ import annotations

import time

import numpy as np


def time_calls(fn, repeats: int, warmup: int = 3) -> dict:
    """Median and interquartile range (ms) of `repeats` calls of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return _summary(times)


def paired_latency(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[dict, dict]:
    """`time_calls` for two callables in alternation, so load drift on a shared machine hits both alike."""
    out = alternating_latency({"a": fn_a, "b": fn_b}, repeats, warmup)
    return out["a"], out["b"]


def alternating_latency(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """{name: median/IQR summary} of callables timed in turn, round after round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: _summary(v) for k, v in times.items()}


def _summary(times_ms: list[float]) -> dict:
    q1, med, q3 = np.percentile(times_ms, [25, 50, 75])
    return {"median_ms": round(float(med), 3), "iqr_ms": round(float(q3 - q1), 3), "runs": len(times_ms)}
