"""`ditc`: a thin command line over the library. Every command ends in one of the exit codes
below; a failure prints one `error:` line per problem (the traceback only with `ditc --debug`)."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from .cli_options import (THREADS_ENV, ConfigOption, config_option, quiet_library_warnings, resolve_field,
                          set_threads, stage_options)
from .errors import DitcError

# What a CI job reads (README "Exit codes"): click's own usage errors are EXIT_ERROR too.
EXIT_GATE, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130


class _Ditc(click.Group):
    """The top-level group: the one place where any command's exception becomes an exit code,
    so a command cannot forget it and a crash never exits 1 like a failed gate."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors, --help, --version: click prints and exits (2 for usage errors)
        except DitcError as e:  # bad input: the message names the file, the field and what was expected
            _fail(ctx, e, str(e).splitlines(), EXIT_ERROR)  # a recipe may have several problems, one per line
        except KeyboardInterrupt as e:
            _fail(ctx, e, ["interrupted"], EXIT_INTERRUPTED)
        except Exception as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            hint = "" if ctx.params.get("debug") else " (run `ditc --debug ...` for the traceback)"
            _fail(ctx, e, [f"internal error: {type(e).__name__}{': ' + first if first else ''}{hint}"], EXIT_INTERNAL)


def _fail(ctx: click.Context, e: BaseException, lines: list[str], code: int):
    if ctx.params.get("debug"):
        click.echo("".join(traceback.format_exception(e)).rstrip(), err=True)  # with its chained causes
    for line in lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[ditc] %(message)s"))
    handler.ditc = True
    log = logging.getLogger("dit_compress")
    for old in [h for h in log.handlers if getattr(h, "ditc", False)]:  # an earlier call in this process
        log.removeHandler(old)
    log.addHandler(handler)
    log.propagate = False  # libraries that configure the root logger would print every line twice
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_gate(report: dict) -> int:
    from .evaluate.gate import describe_failures

    gate = report.get("gate")
    if not gate:
        return 0
    for line in describe_failures(gate):
        click.echo(line, err=True)
    click.echo(f"quality gate: {'passed' if gate['passed'] else 'FAILED'} ({len(gate['rules'])} rules)")
    return 0 if gate["passed"] else EXIT_GATE


@click.group(cls=_Ditc, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dit_compress")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and the library warnings ditc otherwise filters out.")
@click.option("--debug", is_flag=True, help="On an error, print its Python traceback (with chained exceptions).")
@click.option("--threads", type=click.IntRange(min=1), envvar=THREADS_ENV, show_envvar=True,
              help="PyTorch and ONNX Runtime intra-op threads [default: one per core]. On a busy machine, "
                   "fewer threads than cores can be far faster (see docs/cli.md).")
def main(verbose: bool, debug: bool, threads: int | None) -> None:
    """dit_compress: compress Diffusion Transformers, export them, and gate their quality."""
    _setup_logging(verbose)
    if not verbose:
        quiet_library_warnings()
    set_threads(threads)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe field, e.g. stages.0.prune.ratio=0.25 (repeatable).")
teacher_option = click.option(
    "--teacher", metavar="PATH",
    help="Where CHECKPOINT's teacher is now, if it moved (a folder, .safetensors file, zoo:NAME or hub id) "
         "[default: the location its manifest records]; it must hold the weights the manifest's hash pins.")
redo_option = click.option("--redo-eval", is_flag=True,
                           help="Export and evaluate again even if OUT holds the report of this same recipe "
                                "(finished stages are still restored, not retrained).")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@set_option
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without loading any weights: every error at once (types, ranges, stage names,
    keys, with "did you mean"), and the model source as `run` will find it (zoo name, path, class).

    A file holding only a `gate:` list (for `ditc check --gate`) is checked as a gate file."""
    from .core.recipe import load_recipe
    from .errors import RecipeError
    from .evaluate.gate import gate_rules
    from .fileio import read_yaml

    raw = read_yaml(recipe, "recipe", RecipeError)
    if isinstance(raw, dict) and set(raw) - {"version"} == {"gate"}:
        rules = gate_rules(raw, recipe)
        click.echo(f"ok: gate file {recipe} ({len(rules)} rules)")
        return
    r = load_recipe(recipe, list(overrides), check_source=True)
    click.echo(f"ok: {r.name} ({len(r.stages)} stage(s): {', '.join(s.name for s in r.stages)}; hash {r.hash})")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@set_option
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (default exports/NAME).")
@redo_option
def run(recipe: Path, overrides: tuple[str, ...], out: Path | None, redo_eval: bool) -> None:
    """Run RECIPE end to end; exit 1 if its quality gate fails. Re-running resumes; a finished run
    of the same recipe reuses its report and re-applies the gate."""
    from .core.pipeline import run_recipe
    from .core.recipe import load_recipe

    r = load_recipe(recipe, list(overrides))
    out = out or Path("exports") / r.name
    report = run_recipe(r, out, reuse_report=not redo_eval)
    _finish(report, out)


def _figures(r: dict) -> str:
    q, c = r["quality"], r["cost"]
    parts = [f"params x{c['param_ratio']}", f"MACs x{c['macs_ratio']}", f"PSNR {q['psnr_db']:.2f} dB"]
    if "fd_ratio" in q:
        parts.append(f"FD ratio {q['fd_ratio']:.3f}")
    if "adherence" in q:  # a text-to-image pipeline teacher: every attribute of the prompt right
        a = q["adherence"]["all"]
        parts.append(f"prompt adherence {a['teacher']:.3f} -> {a['student']:.3f}")
    elif "guided_accuracy_teacher" in q:
        parts.append(f"guided acc {q['guided_accuracy_teacher']:.3f} -> {q['guided_accuracy_student']:.3f}")
    if "onnx_latency_ratio" in c:
        parts.append(f"ONNX latency x{c['onnx_latency_ratio']}")
    return ", ".join(parts)


def _finish(report: dict | None, out: Path) -> None:
    """Print the run's figures and exit with its gate's status (a non-main process of a
    distributed launch has no report and exits quietly)."""
    if report is None:
        sys.exit(0)
    _summary(report, out)
    sys.exit(_print_gate(report))


def _summary(report: dict, out: Path) -> None:
    click.echo(f"{out}/report.md: " + _figures(report))
    for label, v in (report.get("variants") or {}).items():
        click.echo(f"  variant {label} ({v['checkpoint']}): " + _figures(v))


def one_off_options(fn):
    """What every one-off compression command shares: the model's location, a quick-trial
    evaluation size, overrides, the output folder and --redo-eval."""
    for decorator in reversed([
        config_option("--subfolder", section="model", path="subfolder",
                      help="Subfolder of MODEL holding the transformer."),
        config_option("--latent-size", section="model", path="latent_size"),
        config_option("--eval-samples", section="evaluation", path="num_samples",
                      help="Samples per seed for the class and Fréchet metrics; e.g. 50 for a quick trial."),
        config_option("--eval-seeds", section="evaluation", path="seeds",
                      help="Comma-separated evaluation seeds; e.g. 0 for a quick trial."),
        set_option,
        click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Run folder."),
        redo_option,
    ]):
        fn = decorator(fn)
    return fn


def _one_off(ctx: click.Context, params: dict, stage: str, model: str, out: Path, where: str):
    """The recipe of a one-off command: its stage's options, the model and evaluation options."""
    from .core.recipe import apply_overrides, parse_recipe

    raw = {"name": out.name, "model": {"source": model, **stage_options(params, ctx, "model")},
           "evaluation": stage_options(params, ctx, "evaluation"),
           "stages": [{stage: stage_options(params, ctx, stage)}]}
    return parse_recipe(apply_overrides(raw, list(params["overrides"])), where)


def _run_one_off(ctx: click.Context, params: dict, stage: str, model: str, out: Path, where: str) -> None:
    from .core.pipeline import run_recipe

    recipe = _one_off(ctx, params, stage, model, out, where)
    _finish(run_recipe(recipe, out, reuse_report=not params["redo_eval"]), out)


@main.command()
@click.argument("model")
@config_option("--method", section="prune", path="method",
               help="ppcl: PPCL as its paper defines it; ppcl-hybrid: this project's earlier variant; "
                    "depth / width: the naive baselines.")
@config_option("--ratio", section="prune", path="ratio")
@config_option("--ratios", section="prune", path="ratios", help="ppcl: comma-separated smaller sizes plugged from "
               "the same run (written as variants).")
@config_option("--replace-ffn", section="prune", path="replace_ffn",
               help="ppcl: fraction of FFNs replaced by least-squares linear maps.")
@config_option("--remove", section="prune", path="remove",
               help="depth: comma-separated block indices to remove instead of --ratio.")
@config_option("--select", section="prune", path="select")
@config_option("--head-fraction", section="prune", path="width.heads",
               help="ppcl-hybrid: fraction of attention heads to prune in every block.")
@config_option("--ffn-fraction", section="prune", path="width.ffn",
               help="ppcl-hybrid: fraction of FFN hidden channels to prune in every block.")
@config_option("--importance", section="prune", path="width.importance")
@config_option("--steps", section="prune", path="recover.steps", help="Recovery distillation steps.")
@click.option("--analyse-only", is_flag=True,
              help="Only analyse block redundancy (similarity, CKA, linear probes, intervals); prune nothing.")
@one_off_options
@click.pass_context
def prune(ctx: click.Context, model: str, out: Path, analyse_only: bool, **params) -> None:
    """Prune MODEL (zoo:NAME, folder, hub id), recover it, export and report; writes a run folder."""
    if analyse_only:
        from .core.pipeline import analyse

        spec = {"source": model, **stage_options(params, ctx, "model")}
        result = analyse(spec, out)
        intervals = "; ".join(f"blocks {iv['blocks']} (probe R² {iv['probe_r2']:.3f})" for iv in result["intervals"])
        click.echo(f"wrote {out}/analysis.json and analysis.png; redundant intervals: {intervals or 'none'}")
        return
    _run_one_off(ctx, params, "prune", model, out, "ditc prune")


@main.command()
@click.argument("model")
@config_option("--segments", section="moe", path="segments", help="Equal parts each FFN is cut into.")
@config_option("--shared-segments", section="moe", path="shared_segments",
               help="Parts that form the always-on shared expert (the most important neurons).")
@config_option("--top-k", section="moe", path="top_k", help="Routed experts run per token.")
@config_option("--schedule", section="moe", path="schedule")
@config_option("--balance-weight", section="moe", path="balance_weight")
@config_option("--steps", section="moe", path="recover.steps", help="Distillation steps.")
@one_off_options
@click.pass_context
def moe(ctx: click.Context, model: str, out: Path, **params) -> None:
    """Dense2MoE: turn MODEL's FFNs into mixtures of experts, distil, export and report."""
    _run_one_off(ctx, params, "moe", model, out, "ditc moe")


ATTENTION = ("lit", "clear")


@main.command()
@click.argument("model")
@click.option("--method", type=click.Choice(ATTENTION), required=True,
              help="lit: LiT linear attention; clear: CLEAR local attention.")
@config_option("--linear-heads", section="lit", path="heads")
@config_option("--radius", section="clear", path="radius")
@config_option("--steps", section=ATTENTION, path="recover.steps", help="Distillation steps.")
@config_option("--lr", section=ATTENTION, path="recover.lr", help="Learning rate.")
@config_option("--feature-weight", section=ATTENTION, path="recover.feature_weight")
@one_off_options
@click.pass_context
def attention(ctx: click.Context, model: str, method: str, out: Path, **params) -> None:
    """Replace MODEL's softmax attention by LiT linear or CLEAR local attention, distil, export and report."""
    for param in ctx.command.params:
        if isinstance(param, ConfigOption) and params.get(param.name) is not None and method not in param.sections:
            raise click.UsageError(f"{param.opts[0]} applies to --method {'/'.join(param.sections)}, not {method}")
    _run_one_off(ctx, params, method, model, out, f"ditc attention --method {method}")


def _distill_default(name: str):
    import inspect

    from .core.pipeline import distill_checkpoint

    return inspect.signature(distill_checkpoint).parameters[name].default


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@config_option("--steps", section="distill", path="steps", help="Distillation steps.",
               default_of=lambda: _distill_default("steps"))
@config_option("--lr", section="distill", path="lr", help="Learning rate.", default_of=lambda: _distill_default("lr"))
@config_option("--feature-weight", section="distill", path="feature_weight",
               help="Weight of hidden-state matching at the last stage's mapped layers.",
               default_of=lambda: _distill_default("feature_weight"))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="New checkpoint folder.")
@teacher_option
def distill(checkpoint: Path, steps: int | None, lr: float | None, feature_weight: float | None, out: Path,
            teacher: str | None) -> None:
    """Continue distilling a compressed CHECKPOINT from its teacher; writes a new checkpoint.

    (Attention conversion is `ditc attention`.)"""
    from .core.pipeline import distill_checkpoint

    given = {"steps": steps, "lr": lr, "feature_weight": feature_weight}
    distill_checkpoint(checkpoint, out, teacher=teacher, **{k: v for k, v in given.items() if v is not None})
    click.echo(f"wrote {out}")


PRECISIONS = ["fp16", "bf16", "int8-dynamic", "int8-static"]


@main.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output .onnx path.")
@config_option("--batch", section="export", path="batch", help="Tracing batch (the axis stays dynamic).")
@config_option("--atol", section="export", path="parity_atol", help="Parity limit (max abs error).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="Also write this deployment variant beside the fp32 graph (repeatable).")
@click.option("--sampling-steps", "steps", type=click.IntRange(min=1),
              help="Default sampling steps written to the card [default: the model card's, else 16].")
@click.option("--guidance", type=click.FloatRange(min=1.0),
              help="Default guidance scale written to the card [default: the model card's, else 1].")
@config_option("--latent-size", section="model", path="latent_size")
@click.option("--plug", "plug_keys", metavar="INTERVALS",
              help="PPCL checkpoint: switch in exactly these trained intervals (e.g. 8-17,20-22; 'none').")
@teacher_option
def export(model: str, out: Path, batch: int | None, atol: float | None, precisions: tuple[str, ...],
           steps: int | None, guidance: float | None, latent_size: int | None, plug_keys: str | None,
           teacher: str | None) -> None:
    """Export MODEL (a compressed checkpoint or any loadable model) to ONNX with a parity check.

    Writes OUT and its card OUT.json (what `ditc sample` needs), and each --precision variant."""
    from .core.manifest import load_any
    from .data.calibration import CalibrationSpec, build_calibration, resolved_sampling
    from .errors import DeploymentUnsupported
    from .export.artifact import deployment_card
    from .export.deploy import derive
    from .export.onnx import export_onnx

    batch = batch or resolve_field("export", "batch").default
    atol = atol or resolve_field("export", "parity_atol").default
    if teacher is not None and plug_keys is None:
        raise click.UsageError("--teacher applies with --plug (plugging takes blocks back from the teacher)")
    if plug_keys is not None:
        from .stages.prune.plug import parse_plug, plug

        loaded = plug(model, parse_plug(plug_keys), teacher)
    else:
        loaded = load_any(model, latent_size)
    card = deployment_card(loaded, *resolved_sampling(loaded, steps, guidance))
    info = export_onnx(loaded.model, loaded.adapter, out, batch=batch, atol=atol, card=card)
    click.echo(f"wrote {out}: parity max abs error {info['parity']['max_abs_error']:.3g} (limit {atol:g})")
    calib = None
    if "int8-static" in precisions:  # activation ranges from the model's own samples
        calib = build_calibration(loaded, CalibrationSpec(num_samples=128), out.parent / ".calibration")
    for kind in precisions:
        try:
            d = derive(out, kind, calib)
        except DeploymentUnsupported as e:
            click.echo(f"{kind} skipped: {e}", err=True)
            continue
        click.echo(f"wrote {d['path']}: max relative error vs fp32 {d['parity']['max_rel_error']:.3g}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output image grid (.png); the raw samples go beside it as .npy.")
@click.option("--labels", help="Comma-separated class labels (class-conditional artifacts).")
@click.option("-n", "--num", type=int, default=20, show_default=True,
              help="Samples when neither --labels nor prompts are given.")
@click.option("--conditions", type=click.Path(path_type=Path), help=".npz of condition arrays (text families).")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT",
              help="A prompt (repeatable), encoded by the pipeline's text encoders; images are decoded by its VAE.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="A prompt file (one per line, # comments; or a JSON list), as --prompt.")
@click.option("--pipeline", "pipeline_folder", metavar="FOLDER",
              help="Pipeline folder (or zoo:NAME, or a compressed checkpoint) whose text encoders and VAE "
                   "--prompt uses [default: the one recorded in ARTIFACT's card, else the run's checkpoint/ "
                   "beside ARTIFACT's folder].")
@click.option("--sampling-steps", "steps", type=click.IntRange(min=1), help="Sampling steps [default: the card's].")
@click.option("--guidance", type=click.FloatRange(min=1.0),
              help="Classifier-free guidance scale [default: the card's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reference", metavar="MODEL",
              help="A PyTorch model or compressed checkpoint (e.g. the one ARTIFACT was exported from) sampled "
                   "through PyTorch with the same noise, conditions, steps and guidance; prints the PSNR of "
                   "ARTIFACT's samples against it (100 dB: identical). With prompts, in image space after the "
                   "same VAE, and the grid shows ONNX above PyTorch.")
def sample(artifact: Path, out: Path, labels: str | None, num: int, conditions: Path | None,
           prompt_texts: tuple[str, ...], prompts_file: Path | None, pipeline_folder: str | None,
           steps: int | None, guidance: float | None, seed: int, reference: str | None) -> None:
    """Generate samples from an exported ARTIFACT (.onnx + card) through ONNX Runtime alone.

    With --prompt/--prompts (an artifact of a pipeline's transformer), prompts run end to end: the
    pipeline's text encoders, the graph in the sampling loop (guided against the encoded negative
    prompt), its VAE; the grid shows each image above its prompt. Otherwise the grid labels each
    image with its class label (or condition index)."""
    from .evaluate.sample import sample_artifact

    prompted = bool(prompt_texts) or prompts_file is not None
    if prompted and (labels is not None or conditions is not None):
        raise click.UsageError("--prompt/--prompts replace --labels and --conditions; give one of them")
    if pipeline_folder is not None and not prompted:
        raise click.UsageError("--pipeline applies with --prompt/--prompts")
    if prompted:
        from .evaluate.sample_prompts import sample_prompts
        from .models.pipeline import read_prompts

        prompts = [*prompt_texts, *(read_prompts(prompts_file) if prompts_file is not None else [])]
        result = sample_prompts(artifact, out, prompts, pipeline_folder, steps, guidance, seed, reference=reference)
        what = f"{result['num']} prompts; text encoders and VAE of {result['pipeline']}"
    else:
        result = sample_artifact(artifact, out, labels, num, conditions, steps, guidance, seed, reference=reference)
        what = f"{result['num']} samples"
    written = " and ".join(result["written"])
    if not prompted and len(result["written"]) == 1:  # latents of a non-pixel card: no picture to draw
        what += ", latents: the card is not pixel-space, so no image grid"
    click.echo(f"wrote {written} ({what}; {result['steps']} steps, guidance {result['guidance']:g}, "
               f"{result['seconds']:.1f} s)")
    if "psnr_db_vs_reference" in result:
        space = "images after the same VAE" if prompted else "samples"
        click.echo(f"PSNR vs the PyTorch path ({reference}; same noise, conditions, steps and guidance; {space}): "
                   f"{result['psnr_db_vs_reference']:.2f} dB (max abs difference "
                   f"{result['max_abs_diff_vs_reference']:.3g})")


@main.command()
@click.argument("dense")
@click.argument("compressed", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Folder for graphs and tables.")
@click.option("--batches", "batches", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--thread-counts", "threads", default="1,2", show_default=True,
              help="Comma-separated CPU thread counts, each timed (the global --threads does not apply).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              default=("fp16", "int8-dynamic"), show_default=True, help="ONNX variants to time besides fp32.")
@click.option("--repeats", type=int, default=20, show_default=True)
@config_option("--latent-size", section="model", path="latent_size")
def bench(dense: str, compressed: str | None, out: Path, batches: str, threads: str, precisions: tuple[str, ...],
          repeats: int, latent_size: int | None) -> None:
    """Latency table: DENSE vs COMPRESSED, PyTorch vs ONNX Runtime precisions, batches, threads."""
    from .evaluate.bench import run_bench

    models = {"dense": dense, **({"compressed": compressed} if compressed else {})}
    run_bench(models, out, _ints(batches, "--batches"), _ints(threads, "--thread-counts"), list(precisions),
                       repeats, latent_size)
    click.echo((out / "bench.md").read_text())


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=option)
    return values


@main.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@set_option
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option("--plug", "plug_keys", metavar="INTERVALS",
              help="PPCL checkpoint: evaluate the size with exactly these intervals switched in (e.g. 8-17).")
@teacher_option
def eval_(checkpoint: Path, overrides: tuple[str, ...], out: Path, plug_keys: str | None, teacher: str | None) -> None:
    """Evaluate a compressed CHECKPOINT against its teacher (report + gate, exit 1 if it fails)."""
    from .core.pipeline import evaluate_checkpoint

    student = None
    if plug_keys is not None:
        from .stages.prune.plug import parse_plug, plug

        student = plug(checkpoint, parse_plug(plug_keys), teacher)
    report = evaluate_checkpoint(checkpoint, out, list(overrides), student, teacher)
    _finish(report, out)


@main.command()
@click.argument("report", type=click.Path(path_type=Path))
@click.option("--gate", "gate_file", type=click.Path(path_type=Path),
              help="YAML gate file (a `gate:` list) or recipe whose gate to check instead of the report's own.")
def check(report: Path, gate_file: Path | None) -> None:
    """Re-check the quality gate of REPORT (report.json); exit 1 if it is violated, 2 if REPORT or the
    gate file cannot be read."""
    from .errors import RecipeError
    from .evaluate.gate import check_gate, gate_rules, read_gate_file, read_report

    data = read_report(report)
    if gate_file is not None:
        rules = read_gate_file(gate_file)
    else:
        rules = (data.get("recipe") or {}).get("gate")
        if not rules:
            raise RecipeError(f"{report}: no gate rules (add a `gate:` section or pass --gate)")
        rules = gate_rules(rules, report)
    data["gate"] = check_gate(data, rules)
    sys.exit(_print_gate(data))


@main.command("zoo-train")
@click.option("--out", type=click.Path(path_type=Path), help="Zoo folder (default: the package's own).")
@click.option("--steps", type=int, default=None,
              help="Training steps (default: 6000 for digit teachers, the device's schedule for pipeline teachers).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--only", help="Retrain just this teacher (e.g. digits-sd3), keeping the classifier.")
def zoo_train(out: Path | None, steps: int | None, seed: int, only: str | None) -> None:
    """Retrain the bundled digits classifier and teachers (about 30 CPU minutes each)."""
    from .models.load import ZOO_DIR
    from .train.zoo import PIPELINE_TEACHERS, TEACHERS, train_zoo

    names = [*TEACHERS, *PIPELINE_TEACHERS]
    if only is not None and only not in names:
        raise click.BadParameter(f"unknown teacher {only!r}; choose from {', '.join(names)}", param_hint="--only")
    from .evaluate.adherence import evaluate_adherence

    click.echo(json.dumps(train_zoo(out or ZOO_DIR, steps=steps, seed=seed, only=only,
                                    measure=evaluate_adherence), indent=2))


ADAPT_METHODS = ["td_lora", "diffscaler", "lora", "full"]


@main.group()
def adapter() -> None:
    """Task adapters on a frozen model (TD-LoRA, DiffScaler, LoRA): train, sample, export."""


@adapter.command("train")
@click.argument("source")
@click.option("--task", type=click.Choice(["faces", "photos"]), required=True,
              help="New data: faces = scikit-image lfw_subset; photos = patches of its sample photos.")
@click.option("--method", type=click.Choice(ADAPT_METHODS), default="td_lora", show_default=True)
@click.option("--steps", type=int, default=800, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, help="Learning rate [default: 2e-3 for adapters, 1e-4 for full].")
@click.option("--name", help="Adapter name [default: the task's].")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Folder: the adapter (or the full model), metrics.json and samples.png.")
def adapter_train(source: str, task: str, method: str, steps: int, batch_size: int, lr: float | None,
                  name: str | None, out: Path) -> None:
    """Adapt SOURCE (a model or compressed checkpoint) to a new task; the base weights stay frozen."""
    from .adapters.serve import task_samples
    from .core.manifest import load_any
    from .data.tasks import load_task
    from .evaluate.report import save_image_rows
    from .sampling import NoiseSchedule
    from .train.finetune import FinetuneConfig, finetune, stored_bytes

    loaded = load_any(source)
    data = load_task(task)
    result = finetune(loaded.model, loaded.adapter, NoiseSchedule(loaded.scheduler_config), data,
                      FinetuneConfig(method, steps=steps, batch_size=batch_size, lr=lr), name)
    name = name or task
    metrics = {**result.metrics, "source": source, "data": data.source,
               "stored_bytes": stored_bytes(result, out / (name if method != "full" else "model"))}
    labels = torch_labels(data.num_classes, 10)
    samples = task_samples(loaded.with_model(result.model), labels)
    save_image_rows(out / "samples.png", [("held-out images", data.heldout_images[:10]),
                                          (f"{method} samples", samples)], f"{task}: {method}, {steps} steps")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    click.echo(f"{task} {method}: held-out loss {metrics['heldout_loss_before']:.4f} -> {metrics['heldout_loss']:.4f}, "
               f"{metrics['trainable_parameters']} trainable ({100 * metrics['trainable_fraction']:.2f} %), "
               f"{metrics['stored_bytes'] / 1024:.0f} KiB stored; wrote {out}")


def torch_labels(num_classes: int, n: int):
    import torch

    return torch.arange(n) % num_classes


@adapter.command("sample")
@click.argument("source")
@click.option("--load", "folders", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Adapter folder, named after the folder (repeatable: one model, several tasks).")
@click.option("--use", "active", help="The adapter that runs (required when several are loaded).")
@click.option("--labels", help="Comma-separated task class labels [default: 0,1,...].")
@click.option("-n", "--num", type=int, default=10, show_default=True)
@click.option("--sampling-steps", "steps", type=click.IntRange(min=1),
              help="Sampling steps [default: the model card's].")
@click.option("--guidance", type=click.FloatRange(min=1.0), help="Guidance scale [default: the model card's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Image grid (.png).")
def adapter_sample(source: str, folders: tuple[Path, ...], active: str | None, labels: str | None, num: int,
                   steps: int | None, guidance: float | None, seed: int, out: Path) -> None:
    """Sample SOURCE with task adapters loaded by folder and one of them switched on by name."""
    import torch

    from .adapters.serve import task_samples, with_adapters
    from .adapters.store import adapter_config, adapter_names
    from .core.manifest import load_any
    from .evaluate.report import save_image_rows

    loaded = with_adapters(load_any(source), list(folders), active)
    active = active or adapter_names(loaded.model)[0]
    n_classes = adapter_config(loaded.model, active).get("num_task_classes", 1)
    lab = torch.tensor(_ints(labels, "--labels")) if labels else torch_labels(n_classes, num)
    samples = task_samples(loaded, lab, steps, guidance, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_rows(out, [(f"{active}: labels {lab.tolist()}", samples)], f"{source} + adapter {active}",
                    columns=len(lab))
    click.echo(f"wrote {out} ({len(lab)} samples with adapter {active})")


@adapter.command("export")
@click.argument("source")
@click.option("--load", "folders", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Adapter folder (repeatable).")
@click.option("--use", "active", help="The adapter to export (required when several are loaded).")
@click.option("--bake-steps", type=int,
              help="TD-LoRA: merge the update per timestep of an N-step schedule (one graph per step) "
                   "instead of keeping the low-rank path in one graph.")
@config_option("--atol", section="export", path="parity_atol", help="Parity limit (max abs error).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output .onnx path, or a folder with --bake-steps.")
def adapter_export(source: str, folders: tuple[Path, ...], active: str | None, bake_steps: int | None,
                   atol: float | None, out: Path) -> None:
    """Export SOURCE with an adapter to ONNX, with the parity check."""
    from .adapters.export import export_baked
    from .adapters.serve import with_adapters
    from .adapters.store import method_of
    from .core.manifest import load_any
    from .data.calibration import resolved_sampling
    from .errors import AdapterError
    from .export.artifact import deployment_card
    from .export.onnx import export_onnx

    atol = atol or resolve_field("export", "parity_atol").default
    loaded = with_adapters(load_any(source), list(folders), active)
    card = deployment_card(loaded, *resolved_sampling(loaded, bake_steps, None))
    if bake_steps:
        if method_of(loaded.model) != "td_lora":
            raise AdapterError("--bake-steps applies to TD-LoRA adapters (the others have one fixed update)")
        schedule = export_baked(loaded, out, bake_steps, atol, card)
        worst = max(g["max_abs_error_vs_td_lora"] for g in schedule["graphs"])
        click.echo(f"wrote {len(schedule['graphs'])} graphs to {out}: max abs error vs the TD-LoRA model {worst:.3g}")
        return
    info = export_onnx(loaded.model, loaded.adapter, out, atol=atol, card=card)
    click.echo(f"wrote {out}: parity max abs error {info['parity']['max_abs_error']:.3g} (limit {atol:g})")


@main.group()
def codec() -> None:
    """DiT-IC image codec: train, encode files to bytes, decode them, evaluate against JPEG/WebP."""


@codec.command("train")
@click.option("--teacher", default="zoo:digits-dit", show_default=True, help="The DiT the decoder starts from.")
@click.option("--lambda", "lams", type=click.FloatRange(min=0, min_open=True), multiple=True, required=True,
              help="Rate weight (repeatable: one codec per value; larger = fewer bits).")
@click.option("--transform-steps", type=click.IntRange(min=1), default=4000, show_default=True,
              help="Phase 1: the transforms and entropy model, decoding without the DiT.")
@click.option("--decoder-steps", type=click.IntRange(min=0), default=500, show_default=True,
              help="Phase 2: the encoder frozen, the synthesis transform and DiT learn the one-step decode.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Folder; each codec goes to OUT/lambda-VALUE.")
def codec_train(teacher: str, lams: tuple[float, ...], transform_steps: int, decoder_steps: int, out: Path) -> None:
    """Train codecs on patches of scikit-image's photos (held-out photos are never used).
    Codecs already complete in OUT are kept, so an interrupted run resumes with the next rate."""
    from .codec.store import save_codec
    from .codec.train import CodecTrainConfig, train_codec
    from .models.load import load_transformer

    dit = load_transformer(teacher).model
    for lam in lams:
        if (out / f"lambda-{lam:g}" / "config.json").exists():
            click.echo(f"kept {out / f'lambda-{lam:g}'}: already trained")
            continue
        config = CodecTrainConfig(lam=lam, transform_steps=transform_steps, decoder_steps=decoder_steps)
        model, info = train_codec(dit, config)
        folder = save_codec(model, out / f"lambda-{lam:g}", teacher, lam, {"training": info})
        last = info["history"][-1]
        click.echo(f"wrote {folder}: training bpp {last['bpp']:.3f}, mse {last['mse']:.5f} ({info['seconds']:.0f} s)")


def _read_gray(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    try:
        img = Image.open(path).convert("L")
    except OSError as e:
        from .errors import DitcError

        raise DitcError(f"{path}: not an image Pillow can read ({e})") from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).unsqueeze(0)


@codec.command("encode")
@click.argument("codec_dir", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path, exists=True))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The .ditc file.")
def codec_encode(codec_dir: Path, image: Path, out: Path) -> None:
    """Compress IMAGE (converted to grayscale) to a .ditc file with the codec in CODEC_DIR."""
    from .codec.files import compress
    from .codec.store import load_codec
    from .fileio import write_atomic

    model, config = load_codec(codec_dir)
    x = _read_gray(image)
    data, _ = compress(model, x, str(codec_dir), config["lambda"])
    write_atomic(out, data)
    click.echo(f"wrote {out}: {len(data)} bytes, {8 * len(data) / (x.shape[1] * x.shape[2]):.4f} bpp")


@codec.command("decode")
@click.argument("codec_dir", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(path_type=Path, exists=True))
@click.option("--sampling-steps", "steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="DiT steps (the method is one).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Decoded image (.png).")
def codec_decode(codec_dir: Path, file: Path, steps: int, out: Path) -> None:
    """Decode a .ditc FILE with the codec that wrote it."""
    import io

    import numpy as np
    from PIL import Image

    from .codec.files import decompress
    from .codec.store import load_codec
    from .fileio import read_bytes, write_atomic

    model, _ = load_codec(codec_dir)
    from .codec.bitstream import BitstreamError

    x_hat, _ = decompress(model, read_bytes(file, "codec file", BitstreamError), str(file), steps=steps)
    arr = ((x_hat[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(arr, mode="L").save(png, format="PNG")
    write_atomic(out, png.getvalue())
    click.echo(f"wrote {out} ({arr.shape[1]}x{arr.shape[0]})")


@codec.command("eval")
@click.argument("codec_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
def codec_eval(codec_dirs: tuple[Path, ...], out: Path) -> None:
    """Rate-distortion of the codecs against JPEG and WebP on held-out photos (report.md, rd.png)."""
    from .codec.evaluate import evaluate_codecs

    report = evaluate_codecs(list(codec_dirs), out)
    bd = report["bd_rate_vs_jpeg_percent"]
    click.echo((out / "report.md").read_text())
    click.echo(f"BD-rate vs JPEG: {'n/a' if bd is None else f'{bd:+.1f} %'}")


if __name__ == "__main__":
    main()
