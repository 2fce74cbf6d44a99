"""Bad recipes and bad checkpoints: one clear error line, exit code 2, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import save_tiny
from dit_compress.cli import main
from dit_compress.core.manifest import load_compressed
from dit_compress.core.recipe import load_recipe
from dit_compress.errors import CheckpointError, RecipeError, UnsupportedModelError
from dit_compress.models.load import load_transformer

GOOD = {
    "name": "t",
    "model": {"source": "zoo:digits-dit"},
    "stages": [{"prune": {"ratio": 0.5, "recover": {"steps": 2}}}],
    "gate": [{"metric": "quality.psnr_db", "min": 10}],
}


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _cli(*args):
    return CliRunner().invoke(main, list(args))


def test_good_recipe_validates_and_hash_is_stable(tmp_path):
    p = _write(tmp_path, GOOD)
    a, b = load_recipe(p), load_recipe(p)
    assert a.hash == b.hash
    assert load_recipe(p, ["stages.0.prune.ratio=0.25"]).hash != a.hash
    assert load_recipe(p, ["stages.0.prune.recover.steps=7"]).stages[0].config.recover.steps == 7


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["stages"][0]["prune"].update(ratoi=0.5), "stages[0].prune.ratoi: unknown key"),
    (lambda d: d["stages"][0]["prune"].update(ratio="half"), "stages[0].prune.ratio"),
    (lambda d: d["stages"][0]["prune"].update(ratio=1.5), "less than 1"),
    (lambda d: d["stages"][0]["prune"].update(remove=[1, 2]), "`remove` belongs to method depth, not ppcl"),
    (lambda d: d["stages"][0]["prune"].update(method="depth", ratios=[0.25]), "`ratios`, `intervals` and `max_interval` belong to the ppcl methods"),
    (lambda d: d["stages"][0]["prune"].update(intervals=[[3, 1]]), "first < last"),
    (lambda d: d["stages"][0]["prune"].update(method="width", width={"heads": 0.5}), "follow from `ratio`"),
    (lambda d: d["stages"][0]["prune"].update(recover=None), "cannot be null"),
    (lambda d: d.pop("model"), "model: missing"),
    (lambda d: d["stages"].append({"shrink": {}}), "unknown stage 'shrink'"),
    (lambda d: d.update(evaluation={"seeds": "abc"}), "evaluation.seeds"),
    (lambda d: d["gate"].append({"metric": "x", "max": 1, "min": 0}), "exactly one of `max` or `min`"),
])
def test_bad_recipe_one_clear_line_no_output(tmp_path, mutate, message):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    p = _write(tmp_path, data)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(p)
    out = tmp_path / "out"
    res = _cli("run", str(p), "-o", str(out))
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(p) in lines[0]
    assert not out.exists(), "a bad recipe must not create output"


def test_missing_model_source_is_clear_and_writes_nothing(tmp_path):
    p = _write(tmp_path, {**GOOD, "model": {"source": str(tmp_path / "nope")}})
    out = tmp_path / "out"
    res = _cli("run", str(p), "-o", str(out))
    assert res.exit_code == 2 and "model source not found" in res.output
    assert not out.exists()


def test_unknown_zoo_name(tmp_path):
    with pytest.raises(CheckpointError, match="unknown zoo model 'nope'"):
        load_transformer("zoo:nope")


def test_loading_paths(tmp_path):
    """Pipeline folder (subfolder defaulted), explicit subfolder, bare safetensors + config."""
    model = save_tiny("dit", tmp_path / "pipe")
    a = load_transformer(str(tmp_path / "pipe"))
    b = load_transformer(str(tmp_path / "pipe"), subfolder="transformer")
    c = load_transformer(str(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"),
                         config=str(tmp_path / "pipe" / "transformer" / "config.json"))
    ref = model.state_dict()
    for loaded in (a, b, c):
        assert all((loaded.model.state_dict()[k] == v).all() for k, v in ref.items())
    with pytest.raises(CheckpointError, match="needs `config:`"):
        load_transformer(str(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_unsupported_class_in_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UnsupportedModelError, match="unsupported model class .UNet2DConditionModel'.*DiT"):
        load_transformer(str(folder))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot read the model config of org-x/model-y"):
        load_transformer("org-x/model-y")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "corrupt manifest"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "not the weights this checkpoint was saved with"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_corrupt_or_missing_checkpoint(tmp_path, damage, message):
    from test_families import _loaded
    from dit_compress.core.manifest import base_reference, save_compressed

    t = _loaded("dit")
    ckpt = save_compressed(tmp_path / "ckpt", t.model, base_reference(t, {"latent_size": 8}), [])
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_compressed(ckpt)
    out = tmp_path / "x.onnx"
    res = _cli("export", str(ckpt) if (ckpt / "manifest.json").exists() else str(ckpt / "nothing"),
               "-o", str(out))
    assert res.exit_code == 2 and res.output.startswith("error:")
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    res = _cli("validate", str(path))
    assert res.exit_code == 0 and res.output.startswith("ok: "), res.output


def test_sample_counts_are_bounded_at_validation():
    # A huge count must fail as a recipe error naming the field, not later as an allocation.
    from dit_compress.core.recipe import parse_recipe
    from dit_compress.errors import RecipeError

    base = {"name": "big", "model": {"source": "zoo:digits-dit"}, "stages": [{"prune": {"method": "depth", "ratio": 0.5}}]}
    for section, field in (("calibration", "num_samples"), ("evaluation", "num_samples"),
                           ("evaluation", "compare_samples")):
        with pytest.raises(RecipeError, match=f"{section}.{field}"):
            parse_recipe({**base, section: {field: 2_000_000}})
