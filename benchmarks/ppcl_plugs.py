"""PPCL's pluggable sizes: every size one PPCL training holds, each exported and evaluated.

A PPCL checkpoint keeps its teacher's blocks beside the trained replacements, so any subset of its
intervals can be switched in (`ditc eval --plug`). This script takes the run folder of one PPCL
training (a `ditc run` output, or `<bench>/ppcl` of `ppcl_vs_baselines.py`) and evaluates, with the
run's own recipe, calibration and evaluator settings: each interval alone, the run's nested sizes
(its `ratios`), and every interval together. Each size is exported to ONNX (parity checked) and
timed against the teacher in the same process, in alternation.

Usage:
  python benchmarks/ppcl_plugs.py /work/runs/bench-ppcl-flux/ppcl --out benchmarks/results/ppcl-plugs-scenes-flux
Writes results.json, results.md and results.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from _provenance import stamp, with_header
from ppcl_vs_baselines import _f

from dit_compress.core.manifest import read_manifest
from dit_compress.core.pin import load_pinned_teacher
from dit_compress.core.recipe import parse_recipe
from dit_compress.data.calibration import build_calibration
from dit_compress.evaluate.evaluator import Evaluator
from dit_compress.export.onnx import export_onnx
from dit_compress.stages.prune.plug import plug, plug_sizes, ppcl_plan


def run(args) -> dict:
    folder = Path(args.run)
    ckpt = folder / "checkpoint"
    plan = ppcl_plan(ckpt)
    manifest = read_manifest(ckpt)
    recipe = parse_recipe(manifest["recipe"], f"{ckpt}/manifest.json")
    teacher = load_pinned_teacher(ckpt / "manifest.json", manifest["base"], args.teacher)
    # The run's own calibration cache: the same noised teacher samples for the latency inputs.
    calib = build_calibration(teacher, recipe.calibration, folder / ".work")
    ev = Evaluator(teacher, calib, recipe.evaluation)
    out = Path(args.out)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    e = recipe.export

    def to_onnx(model, name: str) -> tuple[dict, Path]:
        path = out / "onnx" / f"{name}.onnx"
        return export_onnx(model.model, model.adapter, path, e.batch, e.opset, e.parity_atol), path

    teacher_onnx = to_onnx(teacher, "teacher")[1]
    rows, t0, teacher_row = [], time.time(), None
    for keys in plug_sizes(plan):
        label = ",".join(keys) or "none"
        logging.info("size with %s plugged", label)
        model = plug(ckpt, keys, args.teacher)
        info, path = to_onnx(model, label.replace(",", "_"))
        q, _ = ev.quality(model, label)
        c = ev.cost(model, path, teacher_onnx, None)
        adherence = (q.get("adherence") or {}).get("all", {})
        if teacher_row is None:
            teacher_row = {"fd": q.get("fd_teacher"), "adherence": adherence.get("teacher"),
                           "adherence_stderr": adherence.get("teacher_stderr")}
        rows.append({"plugged": keys, "blocks": sum(1 for _ in model.adapter.blocks(model.model)),
                     "param_ratio": c["param_ratio"], "macs_ratio": c["macs_ratio"],
                     "onnx_latency_ratio": c.get("onnx_latency_ratio"), "torch_latency_ratio": c["torch_latency_ratio"],
                     "parity": (info or {}).get("parity", {}).get("max_abs_error"),
                     "fd_ratio": q.get("fd_ratio"), "psnr_db": q["psnr_db"],
                     "guided_accuracy": q.get("guided_accuracy_student"),
                     "adherence": adherence.get("student"), "adherence_stderr": adherence.get("student_stderr"),
                     "adherence_drop": q.get("adherence_drop")})
        (out / "results.partial.json").write_text(json.dumps(rows, indent=2))
    result = {"run": str(folder), "teacher": recipe.model.source, "intervals": plan["intervals"],
              "ratios": plan["ratios"], "teacher_quality": teacher_row,
              "eval_samples": recipe.evaluation.num_samples, "eval_seeds": len(recipe.evaluation.seeds),
              "wall_seconds": round(time.time() - t0, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write_table(out / "results.md", result)
    plot(out / "results.png", result)
    return result


def write_table(path: Path, result: dict) -> None:
    t = result["teacher_quality"] or {}
    ivs = ", ".join(f"{iv[0]}..{iv[1]}" for iv in result["intervals"])
    lines = [f"# PPCL's pluggable sizes on `{result['teacher']}`", "",
             f"One PPCL training (`{result['run']}`, intervals {ivs}; the run's ratios "
             f"{', '.join(f'{r:g}' for r in result['ratios'])}). Each row switches the listed intervals in and "
             "keeps the teacher's blocks elsewhere; evaluated with the run's evaluator "
             f"({result['eval_samples']} samples x {result['eval_seeds']} seeds; ± is the standard error over "
             "the seeds), ONNX latency timed against the teacher in alternation in this run.", "",
             f"Teacher: prompt adherence {_f(t.get('adherence'))}"
             + (f" ± {t['adherence_stderr']:.3f}" if t.get("adherence_stderr") else ""), "",
             "| intervals plugged | blocks | params | MACs | ONNX latency | FD ratio | PSNR dB | prompt adherence (all) "
             "| adherence drop | ONNX parity (max abs) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a = _f(r.get("adherence")) + (f" ± {r['adherence_stderr']:.3f}" if r.get("adherence_stderr") else "")
        lines.append(f"| {', '.join(r['plugged']) or 'none (the teacher)'} | {r['blocks']} | {_f(r['param_ratio'])} | "
                     f"{_f(r['macs_ratio'])} | {_f(r.get('onnx_latency_ratio'))} | {_f(r.get('fd_ratio'))} | "
                     f"{_f(r.get('psnr_db'), '{:.2f}')} | {a} | {_f(r.get('adherence_drop'))} | "
                     f"{_f(r.get('parity'), '{:.1e}')} |")
    lines += ["", "![sizes](results.png)"]
    path.write_text(with_header("\n".join(lines) + "\n", result))


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["plugged"]]
    prompted = any(r.get("adherence") is not None for r in rows)
    key = "adherence" if prompted else "fd_ratio"
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter([r["param_ratio"] for r in rows], [r[key] for r in rows])
    for r in rows:
        ax.annotate(",".join(r["plugged"]), (r["param_ratio"], r[key]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    t = (result["teacher_quality"] or {}).get("adherence") if prompted else 1.0
    if t is not None:
        ax.axhline(t, color="k", lw=0.5, label="teacher")
        ax.legend(fontsize=7)
    ax.set_xlabel("parameters / teacher")
    ax.set_ylabel("prompt adherence (every attribute right)" if prompted else "Fréchet distance / teacher's")
    ax.set_title("sizes from one PPCL training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="the run folder of one PPCL training (holds checkpoint/ and .work/)")
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="where the pinned teacher is now, if it moved")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    print((Path(args.out) / "results.md").read_text())
    print(f"total {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
