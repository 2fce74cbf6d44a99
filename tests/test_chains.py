"""Stages in chains through the pipeline: each stage works on the previous one's result, the
checkpoint replays every stage's plan (and the adapter a phase attached), restores identical
outputs and exports with ONNX parity. The shipped chain recipes validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import save_tiny
from dit_compress.core.manifest import load_compressed, read_manifest
from dit_compress.core.pipeline import load_teacher, run_stages
from dit_compress.core.recipe import load_recipe, parse_recipe
from dit_compress.data.calibration import build_calibration
from dit_compress.export.onnx import export_onnx
from dit_compress.stages.attention.lit import LiTProcessor
from dit_compress.stages.mob.blocks import RoutedBlock
from dit_compress.stages.moe.layer import MoEFeedForward

RECIPES = Path(__file__).parent.parent / "recipes"
TWO = {"steps": 2, "batch_size": 4}

CHAINS = {
    "prune-moe-lit-tdlora": [
        {"prune": {"method": "depth", "ratio": 0.5, "select": "even", "recover": {**TWO, "feature_weight": 1.0}}},
        {"moe": {"segments": 4, "top_k": 1, "taylor_batches": 1, "recover": TWO}},
        {"lit": {"heads": 2, "recover": TWO}},
        {"recover": {**TWO, "trainable": "td_lora"}},
    ],
    "moe-mob": [
        {"moe": {"segments": 4, "top_k": 1, "taylor_batches": 1, "recover": TWO}},
        {"mob": {"group_size": 2, "active": 1, "recover": TWO}},
    ],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_saves_restores_identical_and_exports(chain, tmp_path):
    save_tiny("dit", tmp_path / "teacher")
    recipe = parse_recipe({"name": chain, "model": {"source": str(tmp_path / "teacher")},
                           "calibration": {"num_samples": 16, "sampling_steps": 2}, "stages": CHAINS[chain]})
    teacher = load_teacher(recipe.model.model_dump())
    calib = build_calibration(teacher, recipe.calibration)
    student, summaries, _ = run_stages(recipe, teacher, calib, tmp_path / "work")
    assert [s["name"] for s in summaries] == [s.name for s in recipe.stages]
    model = student.model
    assert any(isinstance(m, MoEFeedForward) for m in model.modules())
    if chain == "moe-mob":
        assert any(isinstance(m, RoutedBlock) for m in model.modules())
    else:
        assert len(model.transformer_blocks) == 2, "depth pruning kept half the blocks"
        assert any(isinstance(m, LiTProcessor) for m in model.modules())
        assert summaries[-1]["attached"]["method"] == "td_lora"
    last = tmp_path / "work" / f"stage{len(summaries) - 1}-{summaries[-1]['name']}"
    assert [s["name"] for s in read_manifest(last)["stages"]] == [s.name for s in recipe.stages]
    restored = load_compressed(last)
    x, t, cond = teacher.adapter.example_inputs(3, seed=4)
    with torch.no_grad():
        before = student.adapter.denoise(model, x, t, cond)
        after = restored.adapter.denoise(restored.model, x, t, cond)
    assert torch.isfinite(before).all()
    assert torch.equal(before, after), f"{chain}: restored output differs by {(before - after).abs().max()}"
    info = export_onnx(restored.model, restored.adapter, tmp_path / f"{chain}.onnx", batch=2, atol=1e-4)
    assert info["parity"]["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("name", ["digits-dit-depth-moe-lit-tdlora", "digits-dit-moe-mob"])
def test_chain_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert len(recipe.stages) >= 2 and recipe.model.source == "zoo:digits-dit"
