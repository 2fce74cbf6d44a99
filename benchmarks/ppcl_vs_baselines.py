"""PPCL against naive pruning, side by side in one run on one teacher.

Every method gets the same teacher, the same calibration data (built once), the same number of
recovery steps and batch size, and the same evaluator (teacher samples generated once, the
same noise and labels for every student). Methods:

  ppcl         PPCL as its paper defines it: one training yields every size (plugged intervals)
  ppcl-hybrid  this project's earlier variant (docs/methods/ppcl.md), one run for every ratio
  depth-last   drop the last removable blocks, recover by distillation
  depth-even   drop evenly spaced blocks, same recovery
  width-l2     Torch-Pruning L2-magnitude pruning of heads and FFN channels, same recovery
  depth-bi     (optional) the foundation's Block Influence depth pruning, same recovery

The baselines recover with the foundation's standard distillation (the teacher's prediction,
`--baseline-feature-weight 0`). `--baseline-feature-weight 1` also gives them the hidden-state
matching at every run's end that PPCL's contiguous-layer distillation uses: an ablation that
leaves PPCL only its probe-planned intervals and its block losses on teacher inputs.

With `--budget-s S` every trained model gets the same recovery wall time instead of the same
steps: each method's step rate is timed on a few steps first, and its steps set to fill S (PPCL's
two methods train every size in one run, so each of their runs gets S for all sizes).

Usage:
  python benchmarks/ppcl_vs_baselines.py --teacher zoo:digits-dit --out exports/bench-ppcl-dit
Writes results.json, results.md and results.png under --out, plus one run folder per student.
`--calibration-seed 1` repeats the run on other training data (a replicate);
`benchmarks/ppcl_replicates.py` puts replicates side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

from _provenance import stamp, with_header

from dit_compress.core.pipeline import apply_stage, load_teacher, run_recipe
from dit_compress.core.recipe import parse_recipe
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.data.calibration import build_calibration
from dit_compress.errors import RecipeError, UnsupportedModelError
from dit_compress.evaluate.evaluator import Evaluator

PPCL_METHODS = ("ppcl", "ppcl-hybrid")

BASELINES = {
    "depth-last": {"method": "depth", "select": "last"},
    "depth-even": {"method": "depth", "select": "even"},
    "width-l2": {"method": "width", "width": {"importance": "l2"}},
    "depth-bi": {"method": "depth", "select": "block_influence"},
}


def recipe_for(name: str, teacher: str, stage: dict, args) -> dict:
    return {
        "name": name,
        "model": {"source": teacher},
        "calibration": {"num_samples": args.calibration, "seed": args.calibration_seed},
        "stages": [{"prune": stage}],
        "evaluation": {"num_samples": args.samples, "seeds": list(range(args.seeds)), "compare_samples": 100},
        "export": {"onnx": True},
    }


def row(method: str, target: float, report: dict, recovery: dict) -> dict:
    q, c = report["quality"], report["cost"]
    return {
        "method": method, "target_ratio": target,
        "param_ratio": c["param_ratio"], "macs_ratio": c["macs_ratio"],
        "fd_ratio": q.get("fd_ratio"), "fd_student": q.get("fd_student"), "fd_student_std": q.get("fd_student_std"),
        "psnr_db": q["psnr_db"], "ssim": q["ssim"],
        "guided_accuracy": q.get("guided_accuracy_student"), "unguided_accuracy": q.get("unguided_accuracy_student"),
        "adherence": (q.get("adherence") or {}).get("all", {}).get("student"),
        "adherence_stderr": (q.get("adherence") or {}).get("all", {}).get("student_stderr"),
        "adherence_drop": q.get("adherence_drop"),
        "onnx_latency_ratio": c.get("onnx_latency_ratio"), "torch_latency_ratio": c["torch_latency_ratio"],
        "recovery_steps": recovery.get("steps"), "recovery_seconds": recovery.get("seconds"),
        "shared": recovery.get("shared", False),
        "parity": (report.get("export") or {}).get("parity", {}).get("max_abs_error"),
    }


def steps_for_budget(stage: dict, teacher, calib, args, work: Path) -> int:
    """Steps that fill `args.budget_s` of recovery at this method's measured step rate."""
    trial = {**stage, "recover": {**stage["recover"], "steps": 8, "checkpoint_every": 1000}}
    prune = get_stage("prune")
    _, _, summary = apply_stage(prune, prune.config_cls.model_validate(trial), copy.deepcopy(teacher.model),
                                StageContext(teacher, calib, work))
    run = next(iter(summary["training"].values()))
    return max(10, int(args.budget_s * run["steps"] / max(run["seconds"], 1e-6)))


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher({"source": args.teacher})
    base = parse_recipe(recipe_for("base", args.teacher, {"method": "ppcl", "ratio": 0.5}, args), "benchmark")
    calib = build_calibration(teacher, base.calibration, out / ".work")
    evaluator = Evaluator(teacher, calib, base.evaluation)
    recover = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "checkpoint_every": 100}
    baseline_recover = {**recover, "feature_weight": args.baseline_feature_weight}
    ratios = sorted(args.ratios)
    rows, t0, teacher_row = [], time.time(), None

    def add_teacher_row(q: dict) -> None:
        rows.append({"method": "teacher", "target_ratio": 0.0, "fd_student": q.get("fd_teacher"),
                     "fd_student_std": q.get("fd_teacher_std"),
                     "guided_accuracy": q.get("guided_accuracy_teacher"),
                     "unguided_accuracy": q.get("unguided_accuracy_teacher"),
                     "adherence": (q.get("adherence") or {}).get("all", {}).get("teacher"),
                     "adherence_stderr": (q.get("adherence") or {}).get("all", {}).get("teacher_stderr"),
                     "param_ratio": 1.0, "macs_ratio": 1.0, "fd_ratio": 1.0, "onnx_latency_ratio": 1.0})

    jobs = [(m, None) for m in args.methods if m in PPCL_METHODS]
    jobs += [(m, r) for m in args.methods if m not in PPCL_METHODS for r in ratios]
    for method, ratio in jobs:
        if method in PPCL_METHODS:
            stage = {"method": method, "ratio": ratios[-1], "ratios": ratios[:-1],
                     "recover": {**recover, "feature_weight": 1.0} if method == "ppcl-hybrid" else recover}
            name = method
        else:
            stage = {**BASELINES[method], "ratio": ratio, "recover": baseline_recover}
            name = f"{method}-{ratio:g}"
        try:
            if args.budget_s:
                stage["recover"] = {**stage["recover"], "steps": steps_for_budget(stage, teacher, calib, args,
                                                                                   out / ".timing" / name)}
            r = run_recipe(parse_recipe(recipe_for(name, args.teacher, stage, args), "benchmark"), out / name,
                           teacher, calib, evaluator)
        except (UnsupportedModelError, RecipeError) as e:  # a method that does not apply is a row saying so
            rows.append({"method": method, "target_ratio": ratio if ratio is not None else ratios[-1],
                         "refused": str(e)})
            continue
        training = r["stages"][0]["recovery"]
        rows.append(row(method, stage["ratio"], r, training))
        for v in (r.get("variants") or {}).values():
            rows.append(row(method, v["stage"]["ratio"], v, {**training, "shared": True}))
        if teacher_row is None:
            teacher_row = True
            add_teacher_row(r["quality"])
        (out / "results.partial.json").write_text(json.dumps(rows, indent=2))
    result = {"teacher": args.teacher, "steps": args.steps, "budget_s": args.budget_s, "batch_size": args.batch_size,
              "baseline_feature_weight": args.baseline_feature_weight,
              "calibration_samples": args.calibration, "calibration_seed": args.calibration_seed,
              "eval_samples": args.samples, "eval_seeds": args.seeds,
              "wall_seconds": round(time.time() - t0, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write_table(out / "results.md", result)
    plot(out / "results.png", result)
    return result


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _fd_error(r: dict, result: dict) -> str:
    """Standard error of the FD ratio over the evaluator's seeds (the teacher's FD taken as exact)."""
    teacher = next((t for t in result["rows"] if t["method"] == "teacher"), None)  # only runs with ppcl have it
    if r.get("fd_student_std") is None or not teacher or not teacher.get("fd_student"):
        return ""
    return f" ± {r['fd_student_std'] / result['eval_seeds'] ** 0.5 / teacher['fd_student']:.3f}"


def _baseline_features(result: dict) -> str:
    w = result.get("baseline_feature_weight", 1.0)  # results before the option matched features
    return f" and, with weight {w:g}, the teacher's hidden state at each run's end" if w else ""


def _budget(result: dict) -> str:
    if result.get("budget_s"):
        return f"{result['budget_s']:g} s of recovery wall time per training run, steps set from each method's step rate"
    return f"{result['steps']} steps"


def write_table(path: Path, result: dict) -> None:
    lines = [f"# PPCL vs baselines on `{result['teacher']}`", "",
             f"Same calibration set ({result['calibration_samples']} teacher samples, seed "
             f"{result.get('calibration_seed', 0)}), same recovery "
             f"({_budget(result)}, batch {result['batch_size']}; baselines distil the teacher's prediction"
             f"{_baseline_features(result)}), same evaluator "
             f"({result['eval_samples']} samples x {result['eval_seeds']} seeds, the same noise and labels for "
             "every model; ± is the standard error over the seeds). The PPCL methods train once for all sizes.",
             "", "| method | target | params | MACs | FD ratio | PSNR dB | guided acc | prompt adherence (all) | "
             "ONNX latency | recovery steps / s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["target_ratio"], r["method"] != "ppcl", r["method"])):
        if r.get("refused"):
            lines.append(f"| {r['method']} | {r['target_ratio']:g} | refused: {r['refused']} |||||||")
            continue
        shared = " (same run)" if r.get("shared") else ""
        adherence = _f(r.get("adherence")) + (f" ± {r['adherence_stderr']:.3f}" if r.get("adherence_stderr") else "")
        lines.append(
            f"| {r['method']} | {r['target_ratio']:g} | {_f(r.get('param_ratio'))} | {_f(r.get('macs_ratio'))} | "
            f"{_f(r.get('fd_ratio'))}{_fd_error(r, result)} | {_f(r.get('psnr_db'), '{:.2f}')} | "
            f"{_f(r.get('guided_accuracy'))} | {adherence} | {_f(r.get('onnx_latency_ratio'))} | "
            f"{r.get('recovery_steps') or 'n/a'} / {_f(r.get('recovery_seconds'), '{:.0f}')}{shared} |")
    lines += ["", "![results](results.png)"]
    path.write_text(with_header("\n".join(lines) + "\n", result))


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    measured = [r for r in result["rows"] if r["method"] != "teacher" and not r.get("refused")]
    prompted = any(r.get("adherence") is not None for r in measured)
    for m in sorted({r["method"] for r in measured}):
        rs = sorted((r for r in measured if r["method"] == m), key=lambda r: r["param_ratio"])
        a.plot([r["param_ratio"] for r in rs], [r["fd_ratio"] for r in rs], "o-", label=m)
        b.plot([r["param_ratio"] for r in rs], [r["adherence" if prompted else "guided_accuracy"] for r in rs],
               "o-", label=m)
    a.axhline(1.0, color="k", lw=0.5)
    a.set_xlabel("parameters / teacher")
    a.set_ylabel("Fréchet distance / teacher's")
    a.set_title("quality vs size (lower is better)")
    b.set_xlabel("parameters / teacher")
    b.set_ylabel("prompt adherence (every attribute right)" if prompted else "guided class accuracy")
    b.set_title("prompt adherence" if prompted else "class fidelity")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="zoo:digits-dit")
    p.add_argument("--out", default="exports/bench-ppcl")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=["ppcl", "ppcl-hybrid", "depth-last", "depth-even", "width-l2"],
                   choices=[*PPCL_METHODS, *BASELINES])
    p.add_argument("--budget-s", type=float, default=None,
                   help="recovery wall time per training run (steps then follow each method's step rate)")
    add_budget_args(p)
    p.add_argument("--baseline-feature-weight", type=float, default=0.0,
                   help="the baselines' hidden-state matching weight (0: output distillation only)")
    main_run(run, p.parse_args())


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """What every method of a side-by-side gets alike: recovery budget, calibration and evaluation."""
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the calibration set every student trains on: another seed is a training replicate "
                        "(other teacher samples, noise and batch order; the evaluator stays the same)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--seeds", type=int, default=3)


def main_run(run, args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    print((Path(args.out) / "results.md").read_text())
    print(f"total {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
