"""A compressed checkpoint is trusted only as far as it can be checked (issue 26): its manifest is
validated field by field (one error line naming the file and the field, exit 2), its teacher is
pinned by absolute location and content hash (moved: an error naming --teacher; changed: refused),
its weights by their sha256 (swapped same-shape weights: refused); older manifests load with a
warning. Weights that do not fit their config.json are an error, not a library warning."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from conftest import save_tiny
from dit_compress.cli import main
from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, load_teacher, save_compressed
from dit_compress.core.pin import model_sha256
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.errors import CheckpointError
from dit_compress.models.load import load_transformer


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _errors(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith("error:")]


def _checkpoint(folder, teacher, source: str):
    """A checkpoint of `teacher` with block 1 removed, its recipe carried (so `ditc eval` can run)."""
    stage = get_stage("prune")
    config = stage.config_cls.model_validate({"method": "depth", "remove": [1], "recover": None})
    model = copy.deepcopy(teacher.model)
    plan = stage.plan(model, teacher.adapter, None, config, StageContext(teacher, None, folder / "work"))
    model = stage.build(model, teacher.adapter, config, plan)
    recipe = {"name": "t", "model": {"source": source}, "stages": [{"prune": config.model_dump(mode="json")}]}
    return save_compressed(folder / "ckpt", model, base_reference(teacher, {"source": source}),
                           [StageRecord("prune", config.model_dump(mode="json"), plan.choices)], "h",
                           {"recipe": recipe})


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """(checkpoint, teacher folder): the teacher given as a relative path, as users type it."""
    monkeypatch.chdir(tmp_path)
    save_tiny("dit", tmp_path / "models" / "x")
    teacher = load_transformer("models/x")
    ckpt = _checkpoint(tmp_path, teacher, "models/x")
    monkeypatch.chdir(ckpt)  # run from another folder from now on
    return ckpt, tmp_path / "models" / "x"


def test_teacher_is_pinned_by_absolute_location_and_hash(pinned):
    ckpt, folder = pinned
    pin = json.loads((ckpt / "manifest.json").read_text())["base"]["teacher"]
    assert pin["source"] == str(folder.resolve()) and pin["kind"] == "path"
    teacher = load_teacher(ckpt)  # from another working folder: the pinned place, not ./models/x
    assert model_sha256(teacher.model) == pin["sha256"]


@pytest.mark.parametrize("command", ["distill", "eval"])
def test_moved_teacher_is_refused_with_the_flag_to_point_at_it(pinned, command, tmp_path):
    ckpt, folder = pinned
    moved = folder.with_name("y")
    folder.rename(moved)
    res = _cli(command, ckpt, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert _errors(res) == [f"error: {ckpt / 'manifest.json'}: the teacher {folder.resolve()} is not there "
                            "(moved or deleted?); pass --teacher PATH to point at it"], res.output
    assert not (tmp_path / "out").exists()
    assert model_sha256(load_teacher(ckpt, teacher=str(moved)).model) == model_sha256(load_transformer(str(moved)).model)
    if command == "distill":  # pointed at its new place, it runs, and the new checkpoint pins that place
        res = _cli("distill", ckpt, "--teacher", moved, "--steps", "1", "-o", tmp_path / "out")
        assert res.exit_code == 0, res.output
        assert load_teacher(tmp_path / "out") is not None
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["base"]["teacher"]["source"] == str(moved)


def test_changed_teacher_is_refused(pinned, tmp_path):
    ckpt, folder = pinned
    shutil.rmtree(folder)
    save_tiny("dit", folder, seed=1)  # same place, same architecture, other weights
    res = _cli("distill", ckpt, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    (line,) = _errors(res)
    assert f"the teacher at {folder.resolve()} is not the one this checkpoint was made from" in line
    assert "pass --teacher PATH to point at the original" in line
    save_tiny("dit", tmp_path / "other", seed=2)
    with pytest.raises(CheckpointError, match="is not the one this checkpoint was made from"):
        load_teacher(ckpt, teacher=str(tmp_path / "other"))


def test_zoo_teacher_is_pinned_by_name_and_hash(tmp_path):
    teacher = load_transformer("zoo:digits-dit")
    ckpt = save_compressed(tmp_path / "ckpt", teacher.model, base_reference(teacher, {"source": "zoo:digits-dit"}), [])
    pin = json.loads((ckpt / "manifest.json").read_text())["base"]["teacher"]
    assert pin == {"source": "zoo:digits-dit", "kind": "zoo", "config": None, "sha256": model_sha256(teacher.model)}
    assert load_teacher(ckpt).model is not teacher.model


def test_swapped_weights_are_refused(tmp_path):
    save_tiny("dit", tmp_path / "a")
    save_tiny("dit", tmp_path / "b", seed=1)
    a = _checkpoint(tmp_path / "ca", load_transformer(str(tmp_path / "a")), "a")
    b = _checkpoint(tmp_path / "cb", load_transformer(str(tmp_path / "b")), "b")
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # same shapes: loads cleanly without the hash
    res = _cli("export", a, "-o", tmp_path / "a.onnx")
    assert res.exit_code == 2 and _errors(res) == [
        f"error: {a / 'model.safetensors'}: not the weights this checkpoint was saved with (its sha256 differs "
        "from manifest.json's weights_sha256): replaced or edited after saving"], res.output
    assert not (tmp_path / "a.onnx").exists()


def _drop(m, *path):
    for key in path[:-1]:
        m = m[key]
    del m[path[-1]]


def _set(value, *path):
    def edit(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    return edit


# (edit of a valid manifest, the field the one error line must name, what it must say)
MUTATIONS = {
    "base removed": (lambda m: _drop(m, "base"), "base", "missing"),
    "a list": (lambda m: m.clear() or None, None, "not a manifest (expected a JSON object, got list)"),
    "stages as a mapping": (lambda m: m.update(stages={"prune": m["stages"][0]}), "stages", "valid list"),
    "unknown stage": (_set("pruen", "stages", 0, "name"), "stages[0].name", "unknown stage 'pruen'"),
    "stage config out of range": (_set(5.0, "stages", 0, "config", "ratio"), "stages[0].config.ratio",
                                  "less than 1"),
    "stage config unknown key": (_set(1, "stages", 0, "config", "ratoi"), "stages[0].config.ratoi", "unknown field"),
    "string for an int": (_set("8", "base", "latent_size"), "base.latent_size", "valid integer"),
    "bool for an int": (_set(True, "base", "model_spec", "latent_size"), "base.model_spec.latent_size",
                        "valid integer"),
    "unsupported class": (_set("UNet2DModel", "base", "class_name"), "base.class_name", "DiTTransformer2DModel"),
    "huge layer count": (_set(10 ** 9, "base", "config", "num_layers"), "base.config.num_layers", "out of range"),
    "no weights hash": (lambda m: _drop(m, "weights_sha256"), "weights_sha256", "missing"),
    "bad teacher hash": (_set("xyz", "base", "teacher", "sha256"), "base.teacher.sha256", "pattern"),
    "unknown format": (_set("ditc-compressed/9", "format"), "format", "unknown format 'ditc-compressed/9'"),
    "unknown top-level field": (_set(1, "extra"), "extra", "unknown field"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_bad_manifest_is_one_error_naming_the_field(mutation, tmp_path):
    edit, field, says = MUTATIONS[mutation]
    save_tiny("dit", tmp_path / "t")
    ckpt = _checkpoint(tmp_path, load_transformer(str(tmp_path / "t")), str(tmp_path / "t"))
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    if mutation == "a list":
        manifest = [manifest]
    else:
        edit(manifest)
    path.write_text(json.dumps(manifest))
    for args in (["export", ckpt, "-o", tmp_path / "x.onnx"], ["distill", ckpt, "-o", tmp_path / "d"],
                 ["eval", ckpt, "-o", tmp_path / "e"]):
        res = _cli(*args)
        assert res.exit_code == 2, (args[0], res.output)
        (line,) = _errors(res)
        assert line.startswith(f"error: {path}: " + (f"{field}: " if field else "")) and says in line, line
        assert "Traceback" not in res.output


def test_manifest_before_pinning_loads_with_a_warning(tmp_path, caplog):
    save_tiny("dit", tmp_path / "t")
    ckpt = _checkpoint(tmp_path, load_transformer(str(tmp_path / "t")), str(tmp_path / "t"))
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = "ditc-compressed/2"
    del manifest["weights_sha256"], manifest["base"]["teacher"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="dit_compress"):
        restored = load_compressed(ckpt)
        teacher = load_teacher(ckpt)
    assert len(restored.model.transformer_blocks) == 3 and len(teacher.model.transformer_blocks) == 4
    assert "records no weights hash" in caplog.text and "written before teachers were pinned" in caplog.text


@pytest.mark.parametrize("layers, which", [(2, "unexpected"), (6, "missing")])
def test_weights_that_do_not_fit_the_config_are_an_error(layers, which, tmp_path):
    save_tiny("dit", tmp_path / "m")  # 4 blocks
    cfg_path = tmp_path / "m" / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_layers": layers}))
    with pytest.raises(CheckpointError, match=rf"the weights do not match config.json .*: weights {which} 38 "
                                              rf"\(e\.g\. transformer_blocks\.[2-5]\."):
        load_transformer(str(tmp_path / "m"))
    res = _cli("export", tmp_path / "m", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 2 and len(_errors(res)) == 1, res.output
