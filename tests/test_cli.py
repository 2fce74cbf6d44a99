"""The command line as a new user meets it: every recipe error at once, clear gate-file errors,
options that mean what the config means, thread settings, and finished runs left alone."""

from __future__ import annotations

import json
import os
import warnings

import click
import pytest
import yaml
from click.testing import CliRunner

from dit_compress.cli import PRECISIONS, main
from dit_compress.cli_options import ConfigOption, quiet_library_warnings, resolve_field
from dit_compress.core.recipe import load_recipe

RECIPE = {"name": "t", "model": {"source": "zoo:digits-dit"},
          "stages": [{"prune": {"method": "depth", "ratio": 0.5, "recover": {"steps": 2}}}],
          "gate": [{"metric": "quality.psnr_db", "min": 10}]}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _errors(res) -> list[str]:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), res.output  # no traceback, no usage text
    return lines


def test_validate_reports_every_error_with_suggestions(tmp_path):
    bad = json.loads(json.dumps(RECIPE))
    bad["modle"] = {}
    bad["model"]["source"] = "zoo:digits-dt"
    bad["stages"][0]["prune"].update(ratoi=0.5, method="depht")
    bad["stages"][0]["prune"]["recover"]["stpes"] = 3
    bad["stages"] += [{"pruen": {}}, {"moe": {"segments": 1}}]
    bad["evaluation"] = {"num_sample": 10}
    res = _cli("validate", _write(tmp_path / "r.yaml", bad))
    assert res.exit_code == 2
    text = "\n".join(_errors(res))
    for expected in ["stages[0].prune.ratoi: unknown key; did you mean `ratio`?",
                     "stages[0].prune.recover.stpes: unknown key; did you mean `steps`?",
                     "stages[0].prune.method: Input should be 'ppcl', 'ppcl-hybrid', 'depth' or 'width'",
                     "stages[1]: unknown stage 'pruen'; did you mean `prune`?",
                     "stages[2].moe.segments: Input should be greater than or equal to 2",
                     "evaluation.num_sample: unknown key; did you mean `num_samples`?",
                     "modle: unknown key; did you mean `model`?",
                     "model.source: unknown zoo model 'digits-dt'; did you mean `digits-dit`?"]:
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_validate_checks_the_model_source_as_run_will(tmp_path):
    res = _cli("validate", _write(tmp_path / "r.yaml", {**RECIPE, "model": {"source": str(tmp_path / "nope")}}))
    assert res.exit_code == 2 and "model.source: not found" in res.output
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    res = _cli("validate", _write(tmp_path / "r.yaml", {**RECIPE, "model": {"source": str(folder)}}))
    assert res.exit_code == 2 and "unsupported model class" in res.output
    # `run` checks the same only when it loads the teacher, so parsing alone still accepts it.
    assert load_recipe(tmp_path / "r.yaml").model.source == str(folder)
    res = _cli("validate", _write(tmp_path / "ok.yaml", RECIPE))
    assert res.exit_code == 0 and res.output.startswith("ok: t ")


@pytest.mark.parametrize("gate, message", [
    (None, "gate file not found"),
    ("gate: [unclosed", "not valid YAML"),
    ("gate: 3", "gate: Input should be a valid list (got 3)"),
    ("gate: [{metric: quality.psnr_db, min: '10'}]", "gate[0].min: Input should be a valid number"),
    ("gate:\n  - {metric: quality.psnr_db, maximum: 1}", "gate[0].maximum: unknown key; did you mean `max`?"),
])
def test_check_bad_gate_file_is_one_line(tmp_path, gate, message):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"quality": {"psnr_db": 20.0}}))
    gate_file = tmp_path / "gate.yaml"
    if gate is not None:
        gate_file.write_text(gate)
    res = _cli("check", report, "--gate", gate_file)
    assert res.exit_code == 2 and len(_errors(res)) == 1 and message in res.output, res.output


@pytest.mark.parametrize("content, message", [(None, "report not found"), ("{oops", "not a report (not valid JSON"),
                                              ("[1, 2]", "not a report")])
def test_check_bad_report_is_one_line(tmp_path, content, message):
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(content)
    res = _cli("check", report)
    assert res.exit_code == 2 and len(_errors(res)) == 1 and message in res.output, res.output


def test_shipped_release_gate_is_a_valid_gate_file():
    from pathlib import Path

    gate = Path(__file__).parents[1] / "recipes" / "release-gate.yaml"
    res = _cli("validate", gate)
    assert res.exit_code == 0 and "gate file" in res.output, res.output


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_config_options_match_their_config_fields():
    """Every option that sets a config field shows that field's default and choices, and a flag
    means the same field in every command that has it."""
    meaning: dict[str, tuple] = {}
    seen = 0
    for name, cmd in _commands(main):
        ctx = click.Context(cmd, info_name=name)
        for param in cmd.params:
            if not isinstance(param, ConfigOption):
                continue
            seen += 1
            fields = param.fields()
            help_text = param.get_help_record(ctx)[1]
            for section, field in fields.items():
                shown = ",".join(map(str, field.default)) if isinstance(field.default, (list, tuple)) \
                    else str(field.default)
                assert shown in help_text or (field.default is None and "default: none" in help_text), \
                    f"{name} {param.opts[0]}: {section} default {field.default!r} not in {help_text!r}"
                if field.choices:
                    assert param.make_metavar(ctx) == "[" + "|".join(field.choices) + "]"
                owner = (field.owner.__name__, field.name)
                assert meaning.setdefault(param.opts[0], owner) == owner, \
                    f"{param.opts[0]} means {meaning[param.opts[0]]} elsewhere but {owner} in {name}"
    assert seen > 20
    assert meaning["--steps"] == ("DistillConfig", "steps") and "--heads" not in meaning
    assert list(resolve_field("export", "precisions").annotation.__args__[0].__args__) == PRECISIONS


def test_stage_commands_take_their_options_from_the_config():
    """A compression command has no option that bypasses its config (beyond these few)."""
    plain = {"analyse_only", "method", "overrides", "out", "redo_eval", "help"}
    for name in ("prune", "moe", "attention"):
        cmd = main.commands[name]
        loose = {p.name for p in cmd.params if isinstance(p, click.Option) and not isinstance(p, ConfigOption)}
        assert loose <= plain, f"{name}: {loose - plain} set config values without the config's defaults"


@pytest.fixture
def captured(monkeypatch):
    """The recipe a one-off command would run, without running it."""
    import dit_compress.core.pipeline as pipeline

    runs = []
    monkeypatch.setattr(pipeline, "run_recipe", lambda recipe, out, **kw: runs.append((recipe, kw)))
    return runs


def test_one_off_options_keep_the_configs_other_defaults(captured, tmp_path):
    res = _cli("moe", "zoo:digits-dit", "--steps", "50", "--eval-samples", "50", "--eval-seeds", "0",
               "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output
    recipe, kw = captured[-1]
    moe = recipe.stages[0].config
    assert moe.recover.steps == 50 and moe.recover.feature_weight == 1.0, "--steps must not reset `recover`"
    assert moe.segments == resolve_field("moe", "segments").default
    assert recipe.evaluation.num_samples == 50 and recipe.evaluation.seeds == [0]
    assert kw == {"reuse_report": True}

    res = _cli("prune", "zoo:digits-dit", "--method", "ppcl-hybrid", "--ratio", "0.5", "--head-fraction", "0.25",
               "-o", tmp_path / "p",
               "--redo-eval")
    assert res.exit_code == 0, res.output
    recipe, kw = captured[-1]
    prune = recipe.stages[0].config
    assert prune.width.heads == 0.25 and prune.width.importance == "taylor" and prune.recover.feature_weight == 1.0
    assert recipe.evaluation.num_samples == 500 and recipe.evaluation.seeds == [0, 1, 2], "full evaluation by default"
    assert kw == {"reuse_report": False}

    res = _cli("attention", "zoo:digits-dit", "--method", "lit", "--linear-heads", "3", "-o", tmp_path / "a")
    assert res.exit_code == 0 and captured[-1][0].stages[0].config.heads == 3
    res = _cli("attention", "zoo:digits-dit", "--method", "lit", "--radius", "3", "-o", tmp_path / "a")
    assert res.exit_code == 2 and "--radius applies to --method clear" in res.output
    res = _cli("prune", "zoo:digits-dit", "--ratio", "1.5", "-o", tmp_path / "p")
    assert res.exit_code == 2 and "less than 1" in res.output


def test_threads_option_sets_pytorch_and_onnx_runtime(tmp_path, monkeypatch):
    import onnx
    import torch
    from onnx import TensorProto, helper

    from dit_compress.export.onnx import ort_session

    monkeypatch.delenv("DITC_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        res = _cli("--threads", "1", "validate", _write(tmp_path / "r.yaml", RECIPE))
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1 and os.environ["DITC_THREADS"] == "1"
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
        assert ort_session(tmp_path / "g.onnx").get_session_options().intra_op_num_threads == 1
        assert _cli("--threads", "0", "validate", tmp_path / "r.yaml").exit_code == 2
    finally:
        torch.set_num_threads(before)


def test_library_noise_is_filtered_and_other_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "copyreg.py", 105, module="copyreg")
        warnings.warn_explicit("Matrix is singular. The result might be inaccurate", UserWarning,
                               "metrics.py", 63, module="dit_compress.evaluate.metrics")
        warnings.warn_explicit("something a user should see", FutureWarning, "x.py", 1, module="x")
    assert [str(w.message) for w in caught] == ["something a user should see"]


def _finished_run(tmp_path, recipe_path):
    recipe = load_recipe(recipe_path)
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "manifest.json").write_text("{}")
    (out / "checkpoint" / "model.safetensors").write_bytes(b"")
    report = {"recipe_hash": recipe.hash, "recipe": recipe.to_dict(), "quality": {"psnr_db": 8.0},
              "cost": {"param_ratio": 0.5, "macs_ratio": 0.5}, "variants": {}}
    (out / "report.json").write_text(json.dumps(report))
    return out


def test_rerun_of_a_finished_run_reuses_its_report(tmp_path, monkeypatch):
    import dit_compress.core.pipeline as pipeline
    from dit_compress.errors import CheckpointError

    def no_teacher(spec):
        raise CheckpointError("the teacher was loaded")

    monkeypatch.setattr(pipeline, "load_teacher", no_teacher)
    path = _write(tmp_path / "r.yaml", RECIPE)
    out = _finished_run(tmp_path, path)
    res = _cli("run", path, "-o", out)
    assert res.exit_code == 1, res.output  # the gate is applied again: psnr 8 < 10
    assert "reusing its report" in res.output and "gate failed: quality.psnr_db" in res.output
    assert not (out / ".work").exists()
    res = _cli("run", path, "-o", out, "--redo-eval")
    assert res.exit_code == 2 and "the teacher was loaded" in res.output
    res = _cli("run", path, "-o", out, "--set", "stages.0.prune.recover.steps=3")  # another recipe
    assert res.exit_code == 2 and "the teacher was loaded" in res.output
    (out / "checkpoint" / "model.safetensors").unlink()
    res = _cli("run", path, "-o", out)
    assert res.exit_code == 2 and "the teacher was loaded" in res.output


def test_other_commands_defaults_are_their_library_defaults():
    """Commands over dataclass configs or functions show those defaults, not their own."""
    import dataclasses
    import inspect

    from dit_compress.codec.train import CodecTrainConfig
    from dit_compress.train.finetune import METHODS, FinetuneConfig
    from dit_compress.train.zoo import train_zoo

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def options(*path):
        cmd = main
        for name in path:
            cmd = cmd.commands[name]
        return {p.name: p for p in cmd.params}

    adapter = options("adapter", "train")
    assert {k: adapter[k].default for k in ("steps", "batch_size")} == \
        {k: defaults(FinetuneConfig)[k] for k in ("steps", "batch_size")}
    assert set(adapter["method"].type.choices) == set(METHODS)
    codec = options("codec", "train")
    assert {k: codec[k].default for k in ("transform_steps", "decoder_steps")} == \
        {k: defaults(CodecTrainConfig)[k] for k in ("transform_steps", "decoder_steps")}
    zoo = options("zoo-train")
    signature = inspect.signature(train_zoo).parameters
    assert (zoo["steps"].default, zoo["seed"].default) == (signature["steps"].default, signature["seed"].default)
