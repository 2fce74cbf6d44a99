"""Dense2MoE against PPCL at the same activated-parameter budget, side by side in one run.

PPCL removes half of the parameters; Dense2MoE keeps them all but activates fewer per token:
FFN -> MoE (shared + top-2 of 7 routed experts, 62.5 % fewer activated FFN parameters) and,
to reach PPCL's 50 % budget, Mixture of Blocks on top (1 of every 2 routed blocks runs per
sample). Every method gets the same teacher, calibration set, evaluator and total number of
recovery steps (the MoE + MoB run splits them 2:1 between its two distillation phases).

  ppcl       PPCL at ratio 0.5
  moe        FFN -> MoE only (fewer activated FFN parameters, every block runs)
  moe-mob    FFN -> MoE, then Mixture of Blocks

Usage:
  python benchmarks/moe_vs_ppcl.py --teacher zoo:digits-dit --out exports/bench-moe-dit
Writes results.json and results.md under --out, plus one run folder per method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _provenance import stamp, with_header
from ppcl_vs_baselines import _f, add_budget_args, main_run, recipe_for, row

from dit_compress.core.pipeline import load_teacher, run_recipe
from dit_compress.core.recipe import parse_recipe
from dit_compress.data.calibration import build_calibration
from dit_compress.evaluate.evaluator import Evaluator


def stages(args) -> dict[str, tuple[str, dict]]:
    def recover(steps: int) -> dict:
        return {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "feature_weight": 1.0,
                "checkpoint_every": 100}

    moe = {"segments": 8, "shared_segments": 1, "top_k": 2}
    first = round(args.steps * 2 / 3)
    return {
        "ppcl": [("prune", {"method": "ppcl", "ratio": 0.5, "recover": recover(args.steps)})],
        "moe": [("moe", {**moe, "recover": recover(args.steps)})],
        "moe-mob": [("moe", {**moe, "recover": recover(first)}),
                    ("mob", {"group_size": 2, "active": 1, "recover": recover(args.steps - first)})],
    }


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher({"source": args.teacher})
    teacher_params = sum(p.numel() for p in teacher.model.parameters())
    plan = stages(args)
    base = parse_recipe(recipe_for("base", args.teacher, plan["ppcl"][0][1], args), "benchmark")
    calib = build_calibration(teacher, base.calibration, out / ".work")
    evaluator = Evaluator(teacher, calib, base.evaluation)
    rows, t0 = [], time.time()
    for method in args.methods:
        recipe = recipe_for(method, args.teacher, plan[method][0][1], args)
        recipe["stages"] = [{kind: stage} for kind, stage in plan[method]]
        r = run_recipe(parse_recipe(recipe, "benchmark"), out / method, teacher, calib, evaluator)
        meta = r["stages"][-1]["summary"]  # the last stage's activation counts every stage's
        seconds = sum(st["recovery"].get("seconds", 0) for st in r["stages"] if st.get("recovery"))
        item = row(method, 0.5, r, {"steps": args.steps, "seconds": round(seconds, 1)})
        activated = meta.get("activation", {}).get("activated_parameters")
        item["activated_ratio"] = round(activated / teacher_params, 4) if activated else item["param_ratio"]
        item["block_activation_fraction"] = meta.get("block_activation_fraction")
        rows.append(item)
        (out / "results.partial.json").write_text(json.dumps(rows, indent=2))
    result = {"teacher": args.teacher, "steps": args.steps, "batch_size": args.batch_size,
              "calibration_samples": args.calibration, "eval_samples": args.samples, "eval_seeds": args.seeds,
              "teacher_quality": {k: v for k, v in r["quality"].items() if k.endswith("_teacher")},
              "wall_seconds": round(time.time() - t0, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write_table(out / "results.md", result)
    return result


def write_table(path: Path, result: dict) -> None:
    tq = result["teacher_quality"]
    lines = [f"# Dense2MoE vs PPCL on `{result['teacher']}` at PPCL's 50 % budget", "",
             f"Same calibration set ({result['calibration_samples']} teacher samples), same total recovery "
             f"({result['steps']} steps, batch {result['batch_size']}), same evaluator "
             f"({result['eval_samples']} samples x {result['eval_seeds']} seeds). Teacher: guided accuracy "
             f"{_f(tq.get('guided_accuracy_teacher'))}, unguided {_f(tq.get('unguided_accuracy_teacher'))}.", "",
             "| method | params stored | params activated / token | MACs | FD ratio | PSNR dB | guided acc | "
             "unguided acc | ONNX latency | PyTorch latency | recovery s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {_f(r['param_ratio'])} | {_f(r['activated_ratio'])} | {_f(r['macs_ratio'])} | "
            f"{_f(r['fd_ratio'])} | {_f(r['psnr_db'], '{:.2f}')} | {_f(r['guided_accuracy'])} | "
            f"{_f(r['unguided_accuracy'])} | {_f(r['onnx_latency_ratio'])} | {_f(r['torch_latency_ratio'])} | "
            f"{_f(r['recovery_seconds'], '{:.0f}')} |")
    lines += ["", "Ratios are against the dense teacher; latencies are timed in alternation with it (batch 16)."]
    path.write_text(with_header("\n".join(lines) + "\n", result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="zoo:digits-dit")
    p.add_argument("--out", default="exports/bench-moe")
    p.add_argument("--methods", nargs="+", default=["ppcl", "moe-mob", "moe"], choices=["ppcl", "moe", "moe-mob"])
    add_budget_args(p)
    main_run(run, p.parse_args())

if __name__ == "__main__":
    main()
