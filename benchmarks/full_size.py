"""Full-size checks: a published config with random weights through the whole toolchain, on this machine.

    python benchmarks/full_size.py --config pixart-xl-2
    python benchmarks/full_size.py --config sd3-medium

Every phase is timed and its peak resident memory recorded (VmHWM, reset before each phase),
in the process a user would run it in:

  (set-up)   random weights from the published config, saved once as a local diffusers folder
  load       load_transformer: meta-device init + memory-mapped safetensors (low_cpu_mem_usage)
  calibrate  teacher samples, cached as safetensors shards
  analyse    PPCL's block-redundancy analysis, streamed block boundary by boundary through disk,
             and the PPCL plan (linear-probe interval costs) for --ratio
  prune      the pipeline's stages: depth (the PPCL plan's blocks), then width (Torch-Pruning,
             L2) with a few steps of TD-LoRA recovery, a real distillation at full size
  save       the compressed checkpoint
  restore    (fresh process) load_compressed; outputs must equal those before saving
  export     (same process) ONNX with external data, parity-checked in ONNX Runtime
  ort        (fresh process) ONNX Runtime: load and one forward

Results: benchmarks/results/full-size-pipeline-CONFIG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from _provenance import stamp, with_header
from full_size_export import CONFIGS

from dit_compress.core.phases import PhaseMeter


class Phases(PhaseMeter):
    """The library's phase meter, printing each phase as it starts and ends (long runs)."""

    @contextmanager
    def __call__(self, name: str):
        print(f"[{name}] ...", flush=True)
        with super().__call__(name):
            yield
        print(f"[{name}] {self.rows[name]}", flush=True)


def main_process(args) -> dict:
    import diffusers
    import torch
    from safetensors.torch import save_file

    from dit_compress.core.manifest import StageRecord, base_reference, save_compressed
    from dit_compress.core.pipeline import run_stages
    from dit_compress.core.recipe import parse_recipe
    from dit_compress.data.calibration import build_calibration
    from dit_compress.models.load import load_transformer
    from dit_compress.probes.boundaries import boundary_states
    from dit_compress.probes.redundancy import analyse_states
    from dit_compress.stages.prune.hybrid import make_plans

    out = Path(args.out) / args.config
    phase = Phases()
    folder = out / "teacher"
    if not (folder / "transformer" / "config.json").is_file():  # set-up, not a toolchain phase
        config = dict(CONFIGS[args.config])
        torch.manual_seed(0)
        model = getattr(diffusers, config.pop("_class_name")).from_config(config)
        model.save_pretrained(folder / "transformer")
        del model
    recipe = parse_recipe({
        "name": f"full-size-{args.config}",
        "model": {"source": str(folder), "subfolder": "transformer", "latent_size": args.latent_size},
        "calibration": {"num_samples": args.samples, "sampling_steps": 1, "guidance_scale": 1.0},
        "stages": [{"prune": {"method": "depth", "remove": [0], "recover": None}}],  # replaced below
    }, "full-size")
    with phase("load"):
        teacher = load_transformer(str(folder), "transformer", latent_size=args.latent_size)
    params = sum(p.numel() for p in teacher.model.parameters())
    print(f"{args.config}: {params / 1e9:.3f} B parameters", flush=True)
    work = out / ".work"
    with phase("calibrate"):
        calib = build_calibration(teacher, recipe.calibration, work)
    with phase("analyse"):
        states = boundary_states(teacher.model, teacher.adapter, calib, batches=2, batch_size=args.samples,
                                 folder=work / "boundary-states")
        analysis = analyse_states(states, teacher.model, teacher.adapter)
        names = analysis.block_names
        groups = [n.rsplit(".", 1)[0] for n in names]
        protected = {i for i, ok in enumerate(analysis.removable) if not ok}
        saves = round(args.ratio * len(names))
        plans, _ = make_plans(states, groups, protected, [saves], max_len=4)
        removed = sorted(i for iv in plans[saves] for i in iv.blocks() if i != iv.anchor)
        boundary_mb = states[0].numel() * 4 / 2 ** 20
        del states
        shutil.rmtree(work / "boundary-states")
    recipe = parse_recipe({**recipe.to_dict(), "stages": [
        {"prune": {"method": "depth", "remove": removed, "recover": None}},
        {"prune": {"method": "width", "ratio": args.width, "width": {"importance": "l2"},
                   "recover": {"trainable": "td_lora", "steps": args.steps, "batch_size": 2, "warmup_steps": 0,
                               "checkpoint_every": args.steps}}},
    ]}, "full-size")
    with phase("prune"):
        student, summaries, _ = run_stages(recipe, teacher, calib, work)
    base = base_reference(teacher, recipe.model.model_dump())  # restore replays the stages on the teacher's config
    del teacher  # the rest is the student's
    with phase("save"):
        records = [StageRecord(s["name"], s["config"], s["plan"], s.get("attached")) for s in summaries]
        ckpt = save_compressed(out / "checkpoint", student.model, base, records, recipe.hash,
                               {"summaries": summaries}, student.conditioner)
    x, t, cond = student.adapter.example_inputs(2)
    with torch.no_grad():
        y = student.adapter.denoise(student.model, x, t, cond)
    reference = {"x": x, "t": t, "y": y, **{f"cond.{k}": v for k, v in cond.items()}}
    save_file({k: v.contiguous() for k, v in reference.items()}, str(out / "reference.safetensors"))
    recovery = summaries[-1]["recovery"]
    return {"config": args.config, "class_name": type(student.model).__name__, "teacher_parameters": params,
            "student_parameters": sum(p.numel() for p in student.model.parameters()),
            "latent_size": args.latent_size, "text_tokens": student.adapter.text_tokens,
            "calibration_samples": args.samples, "blocks": len(names), "removed_blocks": removed,
            "ppcl_intervals": [iv.to_json() for iv in plans[saves]], "width_ratio": args.width,
            "boundary_state_mb_each": round(boundary_mb, 1),
            "boundary_states_all_layers_mb": round(boundary_mb * len(analysis.cosine) + boundary_mb, 1),
            "recovery": {k: recovery[k] for k in ("steps", "seconds", "samples_per_second", "tokens_per_second",
                                                  "trainable_parameters", "training_memory", "final_output_mse")},
            "phases": phase.rows, "checkpoint": str(ckpt)}


def restore_and_export(args) -> dict:
    """Fresh process: restore the checkpoint, compare with the reference outputs, export."""
    import torch
    from safetensors.torch import load_file

    from dit_compress.core.manifest import load_compressed
    from dit_compress.export.onnx import export_onnx

    out = Path(args.out) / args.config
    phase = Phases()
    with phase("restore"):
        student = load_compressed(out / "checkpoint")
    ref = load_file(str(out / "reference.safetensors"))
    cond = {k[5:]: v for k, v in ref.items() if k.startswith("cond.")}
    with torch.no_grad():
        y = student.adapter.denoise(student.model, ref["x"], ref["t"], cond)
    identical = bool(torch.equal(y, ref["y"]))
    with phase("export"):
        info = export_onnx(student.model, student.adapter, out / "onnx" / "student.onnx", batch=2, atol=args.atol)
    files = {f.name: f.stat().st_size for f in (out / "onnx").glob("student.onnx*")}
    return {"restore_identical": identical, "restore_max_abs_diff": float((y - ref["y"]).abs().max()),
            "parity": info["parity"], "onnx_gb": round(sum(files.values()) / 1e9, 2), "phases": phase.rows}


def run_ort(args) -> dict:
    """Fresh process, as a deployment would: ONNX Runtime loads the graph and runs one forward."""
    import numpy as np
    from safetensors.torch import load_file

    from dit_compress.export.onnx import ort_feeds, ort_session

    out = Path(args.out) / args.config
    phase = Phases()
    ref = load_file(str(out / "reference.safetensors"))
    cond = {k[5:]: v for k, v in ref.items() if k.startswith("cond.")}
    with phase("ort"):
        sess = ort_session(str(out / "onnx" / "student.onnx"))
        y = sess.run(None, ort_feeds(ref["x"], ref["t"], cond))[0]
    return {"ort_max_abs_diff": float(np.abs(y - ref["y"].numpy()).max()), "phases": phase.rows}


def child(args, role: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--role", role]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{role} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> str:
    rec, mem = r["recovery"], r["recovery"]["training_memory"]
    lines = [f"# Full-size pipeline: {r['config']} ({r['class_name']}, random weights)", "",
             f"{r['teacher_parameters'] / 1e9:.3f} B -> {r['student_parameters'] / 1e9:.3f} B parameters: PPCL plan "
             f"for {len(r['removed_blocks'])} of {r['blocks']} blocks (runs {r['ppcl_intervals']} as [first, last, "
             f"kept]), then width pruning of {r['width_ratio']:.0%} of the parameters, then {rec['steps']} TD-LoRA "
             f"recovery steps. Latent {r['latent_size']}x{r['latent_size']}, {r['text_tokens']} text tokens, "
             f"{r['calibration_samples']} calibration samples.", "",
             "Peak RSS is the process's resident peak during the phase (VmHWM, reset before each). `load` "
             "memory-maps the safetensors, so the teacher's pages count from the first forward that reads them "
             "(calibrate).", "",
             "| phase | process | time (s) | peak RSS (GB) |", "|---|---|---|---|"]
    process = {"restore": "fresh", "export": "fresh (same as restore)", "ort": "fresh"}
    for name, row in r["phases"].items():
        lines.append(f"| {name} | {process.get(name, 'main')} | {row['seconds']} | {row['peak_rss_gb']} |")
    lines += ["", "| check | value |", "|---|---|",
              f"| restore: outputs identical to before saving | {r['restore_identical']} "
              f"(max abs diff {r['restore_max_abs_diff']:.3g}) |",
              f"| ONNX parity vs PyTorch (batch {r['parity']['batch']}) | max abs {r['parity']['max_abs_error']:.3g}, "
              f"max rel {r['parity']['max_rel_error']:.3g} |",
              f"| ONNX size (external data) | {r['onnx_gb']} GB |",
              f"| ONNX Runtime (fresh process) vs reference outputs | max abs {r['ort_max_abs_diff']:.3g} |",
              f"| analysis: one boundary's sampled states / all {r['blocks'] + 1} boundaries | "
              f"{r['boundary_state_mb_each']} MB / {r['boundary_states_all_layers_mb']} MB (streamed through disk) |",
              f"| recovery: samples/s, tokens/s | {rec['samples_per_second']}, {rec['tokens_per_second']} |",
              f"| recovery: trainable parameters | {rec['trainable_parameters'] / 1e6:.2f} M |",
              f"| recovery: training memory (weights + grads + AdamW + saved activations) | "
              f"{mem['total_mb'] / 1024:.2f} GB |" if mem else "| recovery memory | - |"]
    return with_header("\n".join(lines) + "\n", r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), required=True)
    p.add_argument("--out", default="exports/full-size")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=8, help="calibration samples (>= 8)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of blocks the PPCL plan removes")
    p.add_argument("--width", type=float, default=0.2, help="fraction of parameters width pruning removes")
    p.add_argument("--steps", type=int, default=2, help="TD-LoRA recovery steps")
    p.add_argument("--atol", type=float, default=1e-3, help="parity limit; deep random-weight stacks amplify fp32 noise")
    p.add_argument("--role", choices=["restore", "ort"], help=argparse.SUPPRESS)  # internal: fresh processes
    args = p.parse_args()
    if args.role:
        print(json.dumps({"restore": restore_and_export, "ort": run_ort}[args.role](args)))
        return
    result = main_process(args)
    for role in ("restore", "ort"):
        extra = child(args, role)
        result["phases"].update(extra.pop("phases"))
        result.update(extra)
    results = Path(__file__).parent / "results"
    (results / f"full-size-pipeline-{args.config}.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    (results / f"full-size-pipeline-{args.config}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
