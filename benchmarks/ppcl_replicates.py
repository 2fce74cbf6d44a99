"""Training replicates of `ppcl_vs_baselines.py`: how much of a side-by-side's ordering survives
another calibration seed (other teacher samples, noise and batch order; same evaluator).

Usage:
  python benchmarks/ppcl_replicates.py --out benchmarks/results/ppcl-replicates-digits-sd3.md \
      exports/bench-ppcl-sd3/results.json exports/bench-ppcl-sd3-seed1/results.json

For every method and ratio it lists each run's score, their mean and half their range, and for
every run which method was best, so that a lead smaller than the spread between replicates is
not read as a result. The score is prompt adherence (every attribute right, higher is better)
where the runs measured it (a text-to-image pipeline teacher), else the FD ratio (lower is better);
`--metric` chooses another of the rows' keys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _provenance import with_header


METRICS = {"adherence": ("prompt adherence (every attribute right)", max),
           "fd_ratio": ("FD ratio against the teacher", min),
           "psnr_db": ("PSNR against the teacher (dB)", max),
           "onnx_latency_ratio": ("ONNX Runtime latency against the teacher", min)}


def default_metric(results: list[dict]) -> str:
    prompted = any(r.get("adherence") is not None for res in results for r in res["rows"])
    return "adherence" if prompted else "fd_ratio"


def score_table(results: list[dict], metric: str) -> dict[tuple[float, str], list[float]]:
    """(target ratio, method) -> `metric` of each run, in the order of `results`."""
    table: dict[tuple[float, str], list[float]] = {}
    for k, result in enumerate(results):
        for r in result["rows"]:
            if r["method"] != "teacher" and r.get(metric) is not None:
                table.setdefault((r["target_ratio"], r["method"]), [None] * len(results))[k] = r[metric]
    return table


def render(results: list[dict], sources: list[str], metric: str) -> str:
    teachers = {r["teacher"] for r in results}
    if len(teachers) != 1:
        raise SystemExit(f"replicates must share one teacher, got {sorted(teachers)}")
    what, best_of = METRICS[metric]
    table = score_table(results, metric)
    present = {key: [f for f in fds if f is not None] for key, fds in table.items()}
    means = {key: sum(fs) / len(fs) for key, fs in present.items()}
    seeds = [r.get("calibration_seed", 0) for r in results]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"# PPCL vs baselines on `{teachers.pop()}`: training replicates", "",
             "Each column is one run of `benchmarks/ppcl_vs_baselines.py` with its own calibration seed "
             "(the students' training data: teacher samples, noise, batch order); the evaluator, steps and "
             f"everything else are the same. Score: {what}; ± is half the range over runs.", "",
             "Runs: " + ", ".join(f"`{s}`" for s in sources), "",
             f"| ratio | method | {head} | mean ± half-range |", "|---|---|" + "---|" * len(seeds) + "---|"]
    for (ratio, method), fds in sorted(table.items()):
        done = present[(ratio, method)]
        cells = " | ".join("n/a" if f is None else f"{f:.3f}" for f in fds)
        spread = (max(done) - min(done)) / 2 if len(done) > 1 else float("nan")
        lines.append(f"| {ratio:g} | {method} | {cells} | {means[(ratio, method)]:.3f} ± {spread:.3f} |")
    lines += ["", "| ratio | " + head + " | best by mean |", "|---|" + "---|" * len(seeds) + "---|"]
    for ratio in sorted({r for r, _ in table}):
        rows = {m: fds for (r, m), fds in table.items() if r == ratio}
        best = []
        for k in range(len(results)):
            scored = {m: fds[k] for m, fds in rows.items() if fds[k] is not None}
            best.append(best_of(scored, key=scored.get) if scored else "n/a")
        by_mean = best_of(rows, key=lambda m: means[(ratio, m)])
        lines.append(f"| {ratio:g} | " + " | ".join(best) + f" | {by_mean} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="results.json of each run (one teacher)")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--metric", choices=sorted(METRICS), default=None,
                   help="score to compare (default: adherence where measured, else fd_ratio)")
    args = p.parse_args()
    results = [json.loads(Path(r).read_text()) for r in args.results]
    text = with_header(render(results, args.results, args.metric or default_metric(results)), {})
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
