"""Prompt calibration against synthetic embeddings on the bundled Flux pipeline teacher, side by side.

The same compression, `recipes/scenes-flux-depth50.yaml` (12 of the 24 blocks of zoo:scenes-flux
removed by Block Influence, recovered by output + hidden-state distillation), run twice in one
process on one teacher and one evaluator:

  prompts    calibration from the teacher's prompt set, encoded by its own CLIP and T5, guided
             against the encoded empty prompt (what a pipeline folder gets)
  synthetic  calibration on seeded random prompt embeddings, guided against zeros (what a bare
             transformer gets): every calibration sample and distillation target off-distribution

Both students are judged on the 100 held-out prompts (evaluation seeds as in the recipe): prompt
adherence per attribute, FD on the scene classifier's features, PSNR against the teacher from
identical noise. The table reports each student's adherence drop against the teacher with its
standard error over seeds, and what synthetic calibration costs against prompts.

Usage:
  python benchmarks/scenes_flux_calibration.py --out exports/bench-scenes-calibration [--steps N] [--samples N]
Writes results.json and results.md under --out, plus one run folder per calibration.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from _provenance import stamp, with_header

from dit_compress.core.pipeline import load_teacher, run_recipe
from dit_compress.core.recipe import load_recipe, parse_recipe
from dit_compress.data.calibration import build_calibration
from dit_compress.evaluate.adherence import ATTRIBUTES
from dit_compress.evaluate.evaluator import Evaluator

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "scenes-flux-depth50.yaml"
KINDS = ("prompts", "synthetic")


def recipe_for(kind: str, args):
    d = copy.deepcopy(load_recipe(RECIPE).to_dict())
    d["name"] = f"scenes-flux-depth50-{kind}"
    d["calibration"]["embeddings"] = "encoded" if kind == "prompts" else "synthetic"
    if args.samples:
        d["calibration"]["num_samples"] = args.samples
    if args.steps:
        d["stages"][0]["prune"]["recover"]["steps"] = args.steps
    d["evaluation"]["seeds"] = list(range(args.seeds))
    d["export"] = {"onnx": False}
    return parse_recipe(d, f"benchmark ({kind})")


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = {k: recipe_for(k, args) for k in KINDS}
    teacher = load_teacher(recipes["prompts"].model.model_dump())
    calibs = {k: build_calibration(teacher, r.calibration, out / ".work") for k, r in recipes.items()}
    # One evaluator (built on the prompt calibration: the distribution the pipeline meets) for both.
    evaluator = Evaluator(teacher, calibs["prompts"], recipes["prompts"].evaluation)
    rows = {}
    for kind in KINDS:
        t0 = time.time()
        report = run_recipe(recipes[kind], out / kind, teacher=teacher, calib=calibs[kind], evaluator=evaluator,
                            reuse_report=not args.redo)
        q = report["quality"]
        rows[kind] = {"adherence": q["adherence"], "adherence_drop": q["adherence_drop"],
                      "fd_teacher": q["fd_teacher"], "fd_student": q["fd_student"], "fd_ratio": q["fd_ratio"],
                      "psnr_db": q["psnr_db"], "param_ratio": report["cost"]["param_ratio"],
                      "removed": report["stages"][0]["plan"]["removed"], "minutes": round((time.time() - t0) / 60, 1)}
    r = recipes["prompts"]
    return {"recipe": str(RECIPE.relative_to(RECIPE.parent.parent)), "samples": r.calibration.num_samples,
            "steps": r.stages[0].config.recover.steps, "seeds": args.seeds, "rows": rows}


def _pm(entry: dict, who: str) -> str:
    err = entry.get(f"{who}_stderr")
    return f"{entry[who]:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Prompt calibration vs synthetic embeddings: zoo:scenes-flux, half its blocks removed", "",
        f"`{result['recipe']}` with {result['samples']} calibration samples and {result['steps']} recovery steps, "
        f"run twice on one teacher and one evaluator; adherence on the held-out prompts over {result['seeds']} "
        "seeds (mean ± standard error over seeds; drops paired by seed).", "",
        "| attribute | teacher | student (prompts) | student (synthetic) | drop (prompts) | drop (synthetic) |",
        "|---|---|---|---|---|---|",
    ]
    keys = [*ATTRIBUTES, "all"] + (["all_novel_pairs"] if "all_novel_pairs" in rows["prompts"]["adherence"] else [])
    for key in keys:
        p, s = rows["prompts"]["adherence"][key], rows["synthetic"]["adherence"][key]
        lines.append(f"| {key} | {_pm(p, 'teacher')} | {_pm(p, 'student')} | {_pm(s, 'student')} | "
                     f"{_pm(p, 'drop')} | {_pm(s, 'drop')} |")
    lines += ["", "| calibration | FD (teacher {:.1f}) | FD ratio | PSNR vs teacher dB | params | blocks removed | "
              "minutes |".format(rows["prompts"]["fd_teacher"]), "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['fd_student']:.1f} | {r['fd_ratio']:.3f} | {r['psnr_db']:.2f} | "
                     f"{r['param_ratio']:.3f} | {r['removed']} | {r['minutes']} |")
    cost = rows["synthetic"]["adherence_drop"] - rows["prompts"]["adherence_drop"]
    lines += ["", f"Synthetic calibration costs {cost:+.3f} in every-attribute adherence against prompt "
              f"calibration (drop {rows['synthetic']['adherence_drop']:.3f} vs {rows['prompts']['adherence_drop']:.3f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, help="recovery steps (default: the recipe's)")
    ap.add_argument("--samples", type=int, help="calibration samples (default: the recipe's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--redo", action="store_true", help="evaluate finished runs again")
    args = ap.parse_args()
    result = stamp(run(args))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(with_header(render(result), result))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
