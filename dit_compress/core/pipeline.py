"""Run a recipe end to end: load -> calibrate -> stages (+ recovery) -> save -> export -> evaluate -> gate.

Outputs, in the output folder:
    checkpoint/          manifest.json + model.safetensors (+ diffusers/ when still a stock class)
    onnx/student.onnx    the compressed denoiser, parity-checked (teacher.onnx for latency)
    report.json, report.md, samples.png, curves.png
    .work/               calibration cache, per-stage checkpoints, distillation checkpoints (resume)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from .. import __version__
from ..data.calibration import CalibrationSpec, build_calibration
from ..evaluate.evaluator import Evaluator
from ..evaluate.gate import REPORT_VERSION, check_gate
from ..evaluate.report import save_curves, save_grid, write_json, write_markdown
from ..export.artifact import deployment_card
from ..evaluate.judge import judge_deployment
from ..export.onnx import export_onnx
from ..models.load import LoadedModel, load_transformer
from ..train.distill import DistillConfig, Distiller
from ..errors import CheckpointError, RecipeError, UnsupportedModelError
from ..fileio import read_json
from .phases import PhaseMeter
from .processes import process_local, process_state
from .manifest import MANIFEST, StageRecord, base_reference, load_compressed, read_manifest, save_compressed
from .pin import load_pinned_teacher, pin_teacher
from .recipe import Recipe, apply_overrides, parse_recipe
from .stage import Plan, StageContext, get_stage

log = logging.getLogger("dit_compress")


def load_teacher(spec: dict) -> LoadedModel:
    """The teacher named by a recipe's `model:` section (also stored in every manifest)."""
    return load_transformer(spec["source"], spec.get("subfolder"), spec.get("config"), spec.get("latent_size"))


def _stage_dir(work: Path, i: int, name: str) -> Path:
    return work / f"stage{i}-{name}"


def run_stages(recipe: Recipe, teacher: LoadedModel, calib, work: Path, meter: PhaseMeter | None = None
               ) -> tuple[LoadedModel, list[dict], dict[str, Path]]:
    """Run each stage on a copy of the teacher (plan -> build -> phases -> finish); resumable
    per stage, and per phase inside a stage.

    Returns the student, the stage summaries, and the variants (other results of the last
    stage, such as PPCL's other ratios) as checkpoint folders by label. Launched on several
    processes, all of them run the stages and only the main one writes."""
    state = process_state()
    meter = meter or PhaseMeter()
    base = base_reference(teacher, recipe.model.model_dump())
    with meter("student copy"):
        model = copy.deepcopy(teacher.model)
    records: list[StageRecord] = []
    summaries: list[dict] = []
    variants: dict[str, Path] = {}
    for i, spec in enumerate(recipe.stages):
        stage = get_stage(spec.name)
        done = _stage_dir(work, i, spec.name)
        variant_dir = done.with_suffix(".variants")
        if variants:
            log.warning("stage %d (%s) follows a stage with variants; only the main model goes on "
                        "(variants stay in %s)", i, spec.name, next(iter(variants.values())).parent)
        variants = {}
        resume_key = _resume_key(recipe, i)
        if (done / MANIFEST).is_file() and read_manifest(done).get("resume_key") == resume_key:
            log.info("stage %d (%s): already done, restoring from %s", i, spec.name, done)
            with meter(f"stage {i} {spec.name}: restored"):
                model = load_compressed(done).model
            manifest = read_manifest(done)
            records = [StageRecord(**r) for r in manifest["stages"]]
            summaries = manifest["summaries"]
            variants = {p.name: p for p in sorted(variant_dir.glob("*")) if (p / MANIFEST).is_file()}
            continue
        config_json = spec.config.model_dump(mode="json")

        def save_variant(label: str, variant, plan: dict, _prior=list(records), _name=spec.name,
                         _config=config_json) -> None:
            if not state.is_main_process:
                return
            variants[label] = save_compressed(
                variant_dir / label, variant, base, [*_prior, StageRecord(_name, _config, plan)], recipe.hash,
                {"variant": label}, teacher.conditioner, teacher.pipeline)

        if state.is_main_process:
            shutil.rmtree(variant_dir, ignore_errors=True)
        ctx = StageContext(teacher=teacher, calibration=calib, work_dir=done.with_suffix(".work"),
                           seed=recipe.calibration.seed, save_variant=save_variant)
        model, record, summary = apply_stage(stage, spec.config, model, ctx, meter, f"stage {i} {spec.name}",
                                             resume_key)
        records.append(record)
        summaries.append(summary)
        if state.is_main_process:
            with meter("checkpoints"):
                save_compressed(done, model, base, records, recipe.hash,
                                {"resume_key": resume_key, "summaries": summaries}, teacher.conditioner)
        state.wait_for_everyone()
    return teacher.with_model(model), summaries, variants


def apply_stage(stage, config, model, ctx: StageContext, meter: PhaseMeter | None = None, label: str = "",
                resume_key: str = "") -> tuple:
    """plan -> build -> one distillation per phase -> finish, on `model` (a copy of the teacher or
    the previous stage's result). Returns (model, its StageRecord, its summary for the report).

    The plan is cached in the work folder (JSON + safetensors) so an interrupted stage resumes
    with the same choices; each phase resumes from its own distillation checkpoint."""
    meter = meter or PhaseMeter()
    label = label or stage.name
    teacher = ctx.teacher
    t0 = time.time()
    stage.check_family(teacher.adapter.family, config)  # before any work
    adapter = teacher.with_model(model).adapter
    with meter(f"{label}: plan"):
        plan = _cached_plan(stage, model, adapter, config, ctx, resume_key)
    with meter(f"{label}: build"):
        model = stage.build(model, adapter, config, plan)
    try:
        adapter = teacher.with_model(model).adapter  # surgery may have changed the config
    except UnsupportedModelError:
        pass  # a training wrapper around the model (PPCL's supernet) keeps the model's adapter
    stats = stage.inspect(model, adapter, ctx, config, plan)
    training: dict[str, dict] = {}
    attached = None
    for k, phase in enumerate(stage.phases(config, plan, adapter)):
        log.info("%s: phase %s (%d steps)", label, phase.name, phase.distill.steps)
        objective = phase.objective(teacher.adapter, model) if phase.objective else None
        model.requires_grad_(True)
        distiller = Distiller(teacher.model, model, teacher.adapter, ctx.calibration, phase.distill,
                              ctx.work_dir / f"phase{k}-{phase.name}", phase.layer_map,
                              f"{stage.name} {phase.name}", objective, phase.trainable)
        with meter(f"{label}: {phase.name}"):
            training[phase.name] = distiller.run()
        model.eval().requires_grad_(False)
        attached = distiller.policy.record(model) or attached
    model, choices, finished = stage.finish(model, adapter, ctx, config, plan)
    config_json = config.model_dump(mode="json")
    summary = {"name": stage.name, "config": config_json, "plan": choices, "attached": attached,
               "summary": stage.summary(config, choices, {**plan.notes, **stats, **finished}),
               "training": training, "apply_seconds": round(time.time() - t0, 2)}
    if training:
        summary["recovery"] = list(training.values())[-1]  # the last phase: what the student ends with
    return model, StageRecord(stage.name, config_json, choices, attached), summary


def _cached_plan(stage, model, adapter, config, ctx: StageContext, key: str) -> Plan:
    """The stage's plan, computed once per stage run and kept for a resumed run."""
    folder = ctx.work_dir / "plan"
    meta = folder / "plan.json"
    if key and meta.is_file():
        saved = read_json(meta, "stage plan", CheckpointError)
        if not (isinstance(saved, dict) and isinstance(saved.get("key"), str) and isinstance(saved.get("notes"), dict)
                and "choices" in saved):
            raise CheckpointError(f"{meta}: not a stage plan (expected key, choices, notes); delete {folder} "
                                  "to plan this stage again")
        if saved.get("key") == key:
            init = load_file(str(folder / "init.safetensors")) if (folder / "init.safetensors").is_file() else {}
            return Plan(saved["choices"], init, saved["notes"])
    plan = stage.plan(model, adapter, ctx.calibration, config, ctx)
    if key and process_state().is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if plan.init:
            save_file({k: v.detach().contiguous() for k, v in plan.init.items()}, str(folder / "init.safetensors"))
        tmp = meta.with_suffix(".tmp")  # written last and renamed: a reader never sees half a plan
        tmp.write_text(json.dumps({"key": key, "choices": plan.choices, "notes": plan.notes}))
        tmp.replace(meta)
    return plan


def _resume_key(recipe: Recipe, i: int) -> str:
    # A stage's result depends on the model, calibration and stages up to and including it.
    d = recipe.to_dict()
    key = [d["model"], d["calibration"], d["stages"][: i + 1]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_recipe(recipe: Recipe, out_dir: str | Path, teacher: LoadedModel | None = None, calib=None,
               evaluator: Evaluator | None = None, reuse_report: bool = True) -> dict | None:
    """Run `recipe`, writing everything under `out_dir`; returns the report (with gate result),
    or None in a process other than the main one of a distributed launch.

    A caller comparing several recipes on one teacher (benchmarks) may pass the loaded teacher,
    its calibration set and an evaluator, so that all runs share data and teacher samples.
    A finished run of the same recipe (its report and checkpoint in `out_dir`) is not exported and
    evaluated again unless `reuse_report` is False; its gate is re-applied."""
    state, meter = process_state(), PhaseMeter()
    finished = _finished_report(recipe, Path(out_dir)) if reuse_report else None
    if finished is not None:
        log.info("%s: finished run of this recipe (hash %s); reusing its report (--redo-eval evaluates again)",
                 out_dir, recipe.hash)
        finished["gate"] = check_gate(finished, [r.model_dump() for r in recipe.gate]) if recipe.gate else None
        return finished if state.is_main_process else None
    t_start = time.time()
    with meter("load teacher"):
        teacher = teacher or load_teacher(recipe.model.model_dump())  # fails before anything is written
    for spec in recipe.stages:  # a stage that refuses this family fails now, before calibration
        get_stage(spec.name).check_family(teacher.adapter.family, spec.config)
    out = Path(out_dir)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    if calib is None:
        log.info("calibration: %d teacher samples", recipe.calibration.num_samples)
        with meter("calibration"), state.main_process_first():  # the main process samples and caches
            calib = build_calibration(teacher, recipe.calibration, work)
    # Built before the stages: a bad evaluation prompt file fails now, not after hours of compression.
    evaluator = evaluator or Evaluator(teacher, calib, recipe.evaluation)
    student, summaries, variants = run_stages(recipe, teacher, calib, work, meter)
    if not state.is_main_process:
        return None  # export, evaluation and the report are the main process's

    base = base_reference(teacher, recipe.model.model_dump())
    records = [StageRecord(s["name"], s["config"], s["plan"], s.get("attached")) for s in summaries]
    with meter("checkpoints"):
        ckpt = save_compressed(out / "checkpoint", student.model, base, records, recipe.hash,
                               {"recipe": recipe.to_dict(), "summaries": summaries}, teacher.conditioner,
                               teacher.pipeline)
    published = {}
    for label, folder in variants.items():
        published[label] = out / "variants" / label
        shutil.rmtree(published[label], ignore_errors=True)
        shutil.copytree(folder, published[label])
    return export_and_report(recipe, teacher, student, calib, summaries, ckpt, out, t_start, published, evaluator,
                             meter)


def _finished_report(recipe: Recipe, out: Path) -> dict | None:
    """The report of a finished run of `recipe` in `out`, or None (none, another recipe, unreadable,
    or its checkpoint gone)."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    from .manifest import WEIGHTS

    ckpt = out / "checkpoint"
    if report.get("recipe_hash") != recipe.hash or not (ckpt / MANIFEST).is_file() or not (ckpt / WEIGHTS).is_file():
        return None
    return report


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
                        student: LoadedModel | None = None, teacher: str | None = None) -> dict:
    """Export, evaluate and gate an existing compressed checkpoint with the recipe it was made by,
    against its pinned teacher (`teacher`: where that teacher is now, if it moved); `student`: a
    model derived from it, such as a PPCL checkpoint with other intervals plugged."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest.get("recipe") is None:
        raise RecipeError(f"{checkpoint}: the manifest carries no recipe to evaluate with")
    recipe = parse_recipe(apply_overrides(copy.deepcopy(manifest["recipe"]), overrides or []),
                          f"{checkpoint}/{MANIFEST}")
    if recipe.model.source != (manifest["recipe"].get("model") or {}).get("source"):
        teacher = teacher or recipe.model.source  # `--set model.source=...` points at the teacher too
    student = student or load_compressed(checkpoint)
    teacher = load_pinned_teacher(checkpoint / MANIFEST, manifest["base"], teacher)
    out = Path(out_dir)
    (out / ".work").mkdir(parents=True, exist_ok=True)
    calib = build_calibration(teacher, recipe.calibration, out / ".work")
    summaries = manifest.get("summaries") or manifest["stages"]
    return export_and_report(recipe, teacher, student, calib, summaries, checkpoint, out, time.time())


def export_and_report(recipe: Recipe, teacher: LoadedModel, student: LoadedModel, calib, summaries: list[dict],
                      ckpt: Path, out: Path, t_start: float, variants: dict[str, Path] | None = None,
                      evaluator: Evaluator | None = None, meter: PhaseMeter | None = None) -> dict:
    """ONNX export with parity, evaluation against the teacher, pictures, report and gate.

    Variants are exported and evaluated the same way and reported beside the main student;
    the gate judges the main student only."""
    e = recipe.export
    meter = meter or PhaseMeter()
    with meter("evaluation"):
        ev = evaluator or Evaluator(teacher, calib, recipe.evaluation)

    def to_onnx(model: LoadedModel, name: str) -> tuple[dict, Path]:
        path = out / "onnx" / f"{name}.onnx"
        card = deployment_card(model, ev.steps, ev.guidance)
        with meter("ONNX export + parity"):
            return export_onnx(model.model, model.adapter, path, e.batch, e.opset, e.parity_atol, card), path

    teacher_onnx = to_onnx(teacher, "teacher")[1] if e.onnx else None  # for latency ratios in this run

    def judge(model: LoadedModel, name: str, checkpoint: Path):
        export_info = onnx_path = None
        if e.onnx:
            log.info("exporting %s to ONNX (dynamo) with parity check", name)
            export_info, onnx_path = to_onnx(model, name)
        with meter("evaluation"):
            quality, pictures = ev.quality(model, name)
        with meter("cost (latency, memory)"):
            cost = ev.cost(model, onnx_path, teacher_onnx, str(checkpoint))
        return quality, pictures, cost, export_info, onnx_path

    quality, pictures, cost, export_info, student_onnx = judge(student, "student", ckpt)
    variant_reports = {}
    for label, folder in (variants or {}).items():
        log.info("evaluating variant %s", label)
        q, _, c, x, path = judge(load_compressed(folder), label, folder)
        variant_reports[label] = {"checkpoint": str(folder), "onnx": str(path) if path else None,
                                  "quality": q, "cost": c, "export": x,
                                  "stage": read_manifest(folder)["stages"][-1]["plan"]}
    deployment = None
    if e.precisions or e.optimize or e.tensorrt:
        with meter("deployment variants"):
            deployment = judge_deployment(e, student_onnx, ev, calib, out / ".work")
    report = {
        "report_version": REPORT_VERSION, "version": __version__, "recipe": recipe.to_dict(), "recipe_hash": recipe.hash,
        "teacher": teacher.source, "family": teacher.adapter.family,
        "quality": quality, "cost": cost, "export": export_info, "stages": summaries,
        "artifacts": {"checkpoint": str(ckpt), "onnx": str(student_onnx) if student_onnx else None},
        "variants": variant_reports,
        "deployment": deployment,
        "wall_seconds": round(time.time() - t_start, 1),
        "phases": meter.rows,
    }
    report["gate"] = check_gate(report, [r.model_dump() for r in recipe.gate]) if recipe.gate else None
    for i, st in enumerate(summaries):  # each stage draws its own figures
        st["pictures"] = get_stage(st["name"]).pictures(st["summary"], out, f"stage{i}")
    save_grid(out / "samples.png", pictures["teacher"], pictures["student"], pictures["labels"],
              prompts=pictures.get("prompts"))
    save_curves(out / "curves.png", report)
    write_markdown(out / "report.md", report)
    write_json(out / "report.json", report)
    return report


def distill_checkpoint(checkpoint: str | Path, out: str | Path, steps: int = 300, lr: float = 2e-4,
                       feature_weight: float = 0.0, teacher: str | None = None) -> Path:
    """More recovery for an existing compressed checkpoint, against the teacher it came from (checked
    against its pin; `teacher`: where it is now, if it moved). The new checkpoint pins it again."""
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = read_manifest(checkpoint)
    student = load_compressed(checkpoint)
    teacher = load_pinned_teacher(checkpoint / MANIFEST, manifest["base"], teacher)
    work = out.with_name(out.name + ".work")
    state = process_state()
    with state.main_process_first():
        calib = build_calibration(teacher, CalibrationSpec(), work)
    records = [StageRecord(**r) for r in manifest["stages"]]
    layer_map = []
    if feature_weight > 0 and records:
        layer_map = get_stage(records[-1].name).layer_map(records[-1].plan)
    student.model.requires_grad_(True)
    config = DistillConfig(steps=steps, lr=lr, feature_weight=feature_weight)
    Distiller(teacher.model, student.model, teacher.adapter, calib, config, work, layer_map, "distill").run()
    student.model.eval().requires_grad_(False)
    if not state.is_main_process:
        return out
    carried = {k: manifest[k] for k in ("recipe", "summaries") if manifest.get(k) is not None}
    spec = {**manifest["base"]["model_spec"], "source": teacher.source}  # where the teacher is now
    base = {**manifest["base"], "teacher": pin_teacher(teacher, spec)}
    return save_compressed(out, student.model, base, records, manifest.get("recipe_hash"), carried,
                           student.conditioner, student.pipeline)


def analyse(model_spec: dict, out: str | Path, calibration: CalibrationSpec | None = None) -> dict:
    """`ditc prune --analyse-only`: block redundancy of a model, as analysis.json + analysis.png."""
    from ..probes.redundancy import analyse_redundancy, plot_analysis

    teacher = load_teacher(model_spec)
    out = Path(out)
    (out / ".work").mkdir(parents=True, exist_ok=True)
    calib = build_calibration(teacher, calibration or CalibrationSpec(), out / ".work")
    analysis = analyse_redundancy(teacher.model, teacher.adapter, calib, folder=process_local(out / ".work" / "boundary-states"))
    plot_analysis(analysis, out / "analysis.png")
    result = analysis.to_json()
    write_json(out / "analysis.json", {"model": model_spec, **result})
    return result
