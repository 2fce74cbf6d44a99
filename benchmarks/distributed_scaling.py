"""Distillation on 1 and 2 processes: the same result, and what the second process buys.

    python benchmarks/distributed_scaling.py [--steps 150]

Runs the main recipe (recipes/digits-dit-depth50.yaml, depth pruning + recovery) end to end with
`torchrun -m dit_compress.cli run`, short recovery and a small evaluation, three times:

  1 process x 1 thread,  2 processes x 1 thread (gloo),  1 process x 2 threads

on the same global batch. It reports each recovery's samples/s and tokens/s, the scaling
efficiency from 1 to 2 processes (throughput ratio / 2), and how far the 2-process student's
weights are from the 1-process student's (relative to how far recovery moved them).
Results: benchmarks/results/distributed-scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _provenance import stamp, with_header

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-dit-depth50.yaml"
SMALL_RUN = ["calibration.num_samples=256", "evaluation.num_samples=50", "evaluation.seeds=[0]", "evaluation.compare_samples=8",
             "evaluation.denoiser_samples=16", "evaluation.latency_repeats=3", "export.precisions=[]",
             "export.optimize=false", "export.tensorrt=false", "gate=[]"]


def launch(processes: int, threads: int, steps: int, out: Path) -> dict:
    overrides = [*SMALL_RUN, f"stages.0.prune.recover.steps={steps}", f"stages.0.prune.recover.checkpoint_every={steps}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(29500 + processes * 10 + threads), "-m", "dit_compress.cli", "run", str(RECIPE),
           "-o", str(out), *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    rec = report["stages"][0]["recovery"]
    return {"processes": rec["processes"], "threads_per_process": threads, "wall_seconds": round(time.time() - t0, 1),
            "recovery_seconds": rec["seconds"], "samples_per_second": rec["samples_per_second"],
            "tokens_per_second": rec["tokens_per_second"], "final_output_mse": rec["final_output_mse"],
            "fd_ratio": report["quality"].get("fd_ratio"), "checkpoint": report["artifacts"]["checkpoint"]}


def weight_gap(a: str, b: str, teacher: str = "zoo:digits-dit") -> dict:
    """|w_b - w_a| relative to |w_a - w_teacher| over the kept blocks' parameters."""
    from safetensors.torch import load_file

    from dit_compress.models.load import load_transformer

    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    base = load_transformer(teacher).model.state_dict()
    differ = sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in wa) ** 0.5
    moved = sum(float(((wa[k] - base[k]) ** 2).sum()) for k in wa if k in base and base[k].shape == wa[k].shape) ** 0.5
    return {"weights_diff_over_update": differ / moved, "max_abs_weight_diff": max(float((wa[k] - wb[k]).abs().max())
                                                                                   for k in wa)}


def markdown(r: dict) -> str:
    lines = ["# Distillation on 1 and 2 processes (CPU, gloo)", "",
             "Recipe "
             f"`recipes/digits-dit-depth50.yaml`, {r['steps']} recovery steps at global batch {r['batch_size']}, "
             "launched with `torchrun --nproc_per_node N -m dit_compress.cli run`.", "",
             "| run | processes x threads | recovery (s) | samples/s | tokens/s | final output MSE | FD ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        lines.append(f"| {name} | {row['processes']} x {row['threads_per_process']} | {row['recovery_seconds']} | "
                     f"{row['samples_per_second']} | {row['tokens_per_second']} | {row['final_output_mse']} | "
                     f"{row['fd_ratio']:.3f} |")
    g = r["equality"]
    lines += ["", f"- Scaling efficiency 1 -> 2 processes (1 thread each): **{r['scaling_efficiency']:.2f}** "
                  f"(throughput x{r['speedup_2p_over_1p']:.2f}); 2 processes vs 1 process with 2 threads: "
                  f"x{r['speedup_2p_over_1p2t']:.2f}.",
              f"- 2-process student vs 1-process student: weight difference {g['weights_diff_over_update']:.1e} of "
              f"the recovery update (max abs {g['max_abs_weight_diff']:.1e}).", ""]
    return with_header("\n".join(lines), r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="exports/distributed-scaling")
    args = p.parse_args()
    out = ROOT / args.out
    runs = {"1 process": launch(1, 1, args.steps, out / "p1t1"),
            "2 processes": launch(2, 1, args.steps, out / "p2t1"),
            "1 process, 2 threads": launch(1, 2, args.steps, out / "p1t2")}
    one, two, threads = (runs[k]["samples_per_second"] for k in runs)
    result = {"steps": args.steps, "batch_size": 64, "runs": runs,
              "speedup_2p_over_1p": two / one, "scaling_efficiency": two / (2 * one),
              "speedup_2p_over_1p2t": two / threads,
              "equality": weight_gap(runs["1 process"]["checkpoint"], runs["2 processes"]["checkpoint"])}
    results = Path(__file__).parent / "results"
    (results / "distributed-scaling.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    (results / "distributed-scaling.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
