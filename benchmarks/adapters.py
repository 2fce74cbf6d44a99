"""Task adaptation side by side: full fine-tuning, LoRA, TD-LoRA and DiffScaler at the same steps,
and TD-LoRA as recovery after pruning against full distillation, in one run.

Part 1, for each task (faces, photos) and method, the learning rate chosen on the task's
validation split from a small grid: held-out denoising loss (fixed noise and timesteps), trainable parameters, bytes stored per task, training memory (weights + gradients +
AdamW + saved activations), steps/s, and one sample grid per task (held-out images, then each
method's samples from the same noise).
Part 2: the bundled teacher depth-pruned to half its blocks (evenly spaced), recovered once by
distilling every weight and once by distilling a TD-LoRA adapter only, same steps, same
calibration set and evaluator; quality against the teacher and training memory.

Usage:
  python benchmarks/adapters.py --out exports/bench-adapters
Writes results.json, results.md and samples-TASK.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from _provenance import stamp, with_header
from ppcl_vs_baselines import _f, main_run

from dit_compress.adapters.serve import task_samples
from dit_compress.core.pipeline import load_teacher, run_recipe
from dit_compress.core.recipe import parse_recipe
from dit_compress.data.calibration import build_calibration
from dit_compress.data.tasks import load_task
from dit_compress.evaluate.evaluator import Evaluator
from dit_compress.evaluate.report import save_image_rows
from dit_compress.sampling import NoiseSchedule
from dit_compress.train.finetune import METHODS, FinetuneConfig, finetune, stored_bytes

SAMPLES_PER_GRID = 10


def adapt(args, teacher, out: Path) -> list[dict]:
    import torch

    rows = []
    schedule = NoiseSchedule(teacher.scheduler_config)
    for task_name in args.tasks:
        task = load_task(task_name)
        labels = torch.arange(SAMPLES_PER_GRID) % task.num_classes
        grid = [("held-out images", task.heldout_images[:SAMPLES_PER_GRID]),
                ("teacher (no adaptation)", task_samples(teacher, labels, args.sample_steps, 1.0))]
        for method in args.methods:
            tried, best = [], None
            for lr in (args.full_lrs if method == "full" else args.adapter_lrs):
                result = finetune(teacher.model, teacher.adapter, schedule, task,
                                  FinetuneConfig(method, steps=args.steps, batch_size=args.batch_size, lr=lr,
                                                 eval_every=args.eval_every))
                tried.append({"lr": lr, "validation_loss": result.metrics["validation_loss"],
                              "heldout_loss": result.metrics["heldout_loss"]})
                if best is None or result.metrics["validation_loss"] < best.metrics["validation_loss"]:
                    best = result
            with tempfile.TemporaryDirectory() as tmp:
                stored = stored_bytes(best, Path(tmp) / method)
            row = {**{k: v for k, v in best.metrics.items() if k != "adapter_config"}, "stored_bytes": stored,
                   "lr_search": tried}
            rows.append(row)
            grid.append((method, task_samples(teacher.with_model(best.model), labels, args.sample_steps, 1.0)))
            logging.info("%s %s: held-out loss %.4f -> %.4f (lr %g chosen on validation)", task_name, method,
                         row["heldout_loss_before"], row["heldout_loss"], row["lr"])
        save_image_rows(out / f"samples-{task_name}.png", grid,
                        f"{task_name}: held-out images, then samples from the same noise ({args.steps} steps each)")
    return rows


def recover(args, teacher, out: Path) -> list[dict]:
    base = {
        "model": {"source": args.teacher},
        "calibration": {"num_samples": args.calibration},
        "evaluation": {"num_samples": args.samples, "seeds": list(range(args.seeds))},
    }
    prune = {"method": "depth", "ratio": 0.5, "select": "even"}
    plans = {
        "full distillation": {"steps": args.recovery_steps, "batch_size": args.batch_size, "lr": args.full_recovery_lr},
        "TD-LoRA distillation": {"steps": args.recovery_steps, "batch_size": args.batch_size,
                                 "lr": args.recovery_adapter_lr, "trainable": "td_lora"},
    }
    first = parse_recipe({**base, "name": "base", "stages": [{"prune": {**prune, "recover": plans["full distillation"]}}]})
    calib = build_calibration(teacher, first.calibration, out / ".work")
    evaluator = Evaluator(teacher, calib, first.evaluation)
    rows = []
    for label, plan in plans.items():
        name = "recover-full" if "full" in label else "recover-td-lora"
        recipe = parse_recipe({**base, "name": name, "stages": [{"prune": {**prune, "recover": plan}}]}, "benchmark")
        r = run_recipe(recipe, out / name, teacher, calib, evaluator)
        rec = r["stages"][0]["recovery"]
        q, c = r["quality"], r["cost"]
        rows.append({"method": label, "steps": rec["steps"], "lr": plan["lr"],
                     "trainable_parameters": rec["trainable_parameters"], "seconds": rec["seconds"],
                     "training_memory": rec["training_memory"], "final_output_mse": rec["final_output_mse"],
                     "fd_ratio": q.get("fd_ratio"), "psnr_db": q.get("psnr_db"),
                     "guided_accuracy": q.get("guided_accuracy_student"),
                     "guided_accuracy_teacher": q.get("guided_accuracy_teacher"), "param_ratio": c.get("param_ratio")})
    return rows


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher({"source": args.teacher})
    t0 = time.time()
    result = {"teacher": args.teacher, "steps": args.steps, "batch_size": args.batch_size,
              "adapter_lrs": args.adapter_lrs, "full_lrs": args.full_lrs,
              "tasks": {t: load_task(t).source for t in args.tasks}}
    result["adaptation"] = adapt(args, teacher, out)
    (out / "results.partial.json").write_text(json.dumps(result, indent=2))
    result["recovery"] = recover(args, teacher, out) if args.recovery_steps else []
    result["wall_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write_table(out / "results.md", result)
    return result


def write_table(path: Path, result: dict) -> None:
    lines = [f"# Task adaptation of `{result['teacher']}`", "",
             f"Every method: {result['steps']} steps, batch {result['batch_size']}, cosine schedule; learning rate "
             f"chosen per method and task on the validation split from {result['adapter_lrs']} (adapters) or "
             f"{result['full_lrs']} (full). Held-out loss: the teacher's flow-matching loss on the held-out split "
             "at fixed noise and timesteps (8 draws per image).", ""]
    for task, source in result["tasks"].items():
        rows = [r for r in result["adaptation"] if r["task"] == task]
        full = next((r["heldout_loss"] for r in rows if r["method"] == "full"), None)
        lines += [f"## {task}", "", f"Data: {source}.", "",
                  "| method | lr | held-out loss (before -> after) | vs full | trainable params | % of model | "
                  "stored per task | training memory MB (grads+Adam / activations) | steps/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["training_memory"]
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {r['heldout_loss_before']:.4f} -> {r['heldout_loss']:.4f} | "
                f"{_f(r['heldout_loss'] / full if full else None)} | {r['trainable_parameters']:,} | "
                f"{100 * r['trainable_fraction']:.2f} | {r['stored_bytes'] / 1024:.0f} KiB | "
                f"{m['total_mb']:.1f} ({m['gradients_and_adam_mb']:.1f} / {m['saved_activations_mb']:.1f}) | "
                f"{r['steps_per_second']:.2f} |")
        lines += ["", f"![samples](samples-{task}.png)", ""]
    if result["recovery"]:
        lines += ["## TD-LoRA as recovery after pruning", "",
                  "Half the blocks removed (evenly spaced), then the same distillation steps on the same "
                  "calibration set; quality from the same evaluator.", "",
                  "| recovery | steps | trainable params | training memory MB (grads+Adam / activations) | "
                  "final output MSE | FD ratio | PSNR dB | guided acc | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["recovery"]:
            m = r["training_memory"]
            lines.append(
                f"| {r['method']} | {r['steps']} | {r['trainable_parameters']:,} | {m['total_mb']:.1f} "
                f"({m['gradients_and_adam_mb']:.1f} / {m['saved_activations_mb']:.1f}) | "
                f"{_f(r['final_output_mse'], '{:.4f}')} | {_f(r['fd_ratio'])} | {_f(r['psnr_db'], '{:.2f}')} | "
                f"{_f(r['guided_accuracy'])} | {r['seconds']:.0f} |")
    path.write_text(with_header("\n".join(lines) + "\n", result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="zoo:digits-dit")
    p.add_argument("--out", default="exports/bench-adapters")
    p.add_argument("--tasks", nargs="+", default=["faces", "photos"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--adapter-lrs", type=float, nargs="+", default=[2e-3, 6e-3])
    p.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--recovery-steps", type=int, default=600, help="0 skips part 2")
    p.add_argument("--full-recovery-lr", type=float, default=5e-4)
    p.add_argument("--recovery-adapter-lr", type=float, default=2e-3)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--seeds", type=int, default=3)
    main_run(run, p.parse_args())


if __name__ == "__main__":
    main()
