"""Every registered stage x every family: plan, build, a 2-step phase, save -> restore identical,
ONNX parity; a family a stage does not support is refused before any work.

A new stage adds one row to ROWS (the first test fails until it does)."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from conftest import FAMILIES, LATENT, SD35_VARIANTS, tiny_loaded
from dit_compress.core.manifest import base_reference, load_compressed, save_compressed
from dit_compress.core.pipeline import apply_stage
from dit_compress.core.stage import STAGES, StageContext, get_stage
from dit_compress.errors import UnsupportedModelError
from dit_compress.export.onnx import export_onnx
from dit_compress.models.load import LoadedModel
from dit_compress.stages.prune.width import QKV

TWO_STEPS = {"steps": 2, "batch_size": 4}

# row: (stage, config). Tiny settings: the matrix checks the contract, not the methods' quality.
ROWS = {
    "prune-depth": ("prune", {"method": "depth", "ratio": 0.5, "recover": {**TWO_STEPS, "feature_weight": 1.0}}),
    "prune-width": ("prune", {"method": "width", "ratio": 0.15, "recover": TWO_STEPS}),
    "ppcl": ("prune", {"ratio": 0.5, "ratios": [0.25], "intervals": [[0, 1], [2, 3]], "recover": TWO_STEPS}),
    "moe": ("moe", {"segments": 4, "top_k": 1, "taylor_batches": 1, "recover": TWO_STEPS}),
    "mob": ("mob", {"group_size": 2, "active": 1, "recover": TWO_STEPS}),
    "lit": ("lit", {"heads": 2, "recover": TWO_STEPS}),
    "clear": ("clear", {"radius": 2, "tile": 2, "recover": TWO_STEPS}),
    "recover": ("recover", {**TWO_STEPS, "trainable": "td_lora"}),
}




def supports(row: str, family: str) -> bool:
    name, cfg = ROWS[row]
    stage = get_stage(name)
    return family in stage.supported_families(stage.config_cls.model_validate(cfg))


def check_saved(teacher: LoadedModel, student, records, folder, onnx_path, batch: int = 2):
    """Save -> restore gives identical outputs; the restored model exports with ONNX parity."""
    inputs = teacher.adapter.example_inputs(batch, seed=5)
    with torch.no_grad():
        before = teacher.with_model(student).adapter.denoise(student, *inputs)
    assert torch.isfinite(before).all()
    save_compressed(folder, student, base_reference(teacher, {"latent_size": LATENT}), records)
    restored = load_compressed(folder)
    with torch.no_grad():
        after = restored.adapter.denoise(restored.model, *inputs)
    assert torch.equal(before, after), f"save -> restore changed the outputs by {(before - after).abs().max()}"
    info = export_onnx(restored.model, restored.adapter, onnx_path, batch=2, atol=1e-4)
    assert info["parity"]["max_abs_error"] <= 1e-4
    return restored


def test_every_registered_stage_has_a_row():
    get_stage("prune")  # loads the built-in stages
    assert {name for name, _ in ROWS.values()} == set(STAGES)


# What each row's result must show beyond the contract (the method's own invariants).
def _prune_depth(teacher, student, summary, folder, onnx_path):
    n = len(teacher.adapter.blocks(teacher.model))
    assert len(teacher.adapter.blocks(student)) == n - round(0.5 * n)
    names = [f"{g.attr}.{i}" for g, i, _ in teacher.adapter.blocks(teacher.model)]
    protected = {names.index(f"{g}.{i}") for g, i in teacher.adapter.protected_blocks(teacher.model)}
    assert not protected & set(summary["plan"]["removed"]), "a block the architecture needs was removed"
    plain = type(student).from_pretrained(folder / "diffusers").eval()  # still a stock diffusers class
    x, t, cond = teacher.adapter.example_inputs(2, seed=5)
    with torch.no_grad():
        assert torch.equal(teacher.adapter.denoise(student, x, t, cond), teacher.adapter.denoise(plain, x, t, cond))


def _prune_width(teacher, student, summary, folder, onnx_path):
    assert sum(p.numel() for p in student.parameters()) < 0.85 * sum(p.numel() for p in teacher.model.parameters())
    assert not (folder / "diffusers").exists(), "a width-pruned model is not a stock class"


def _ppcl(teacher, student, summary, folder, onnx_path):
    n = len(teacher.adapter.blocks(teacher.model))
    assert len(teacher.adapter.blocks(student)) == n - 2
    assert summary["plan"]["ratio"] == 0.5 and summary["summary"]["interval_costs"]
    assert (folder / "diffusers").is_dir(), "depth-only PPCL stays a stock class"


def _moe(teacher, student, summary, folder, onnx_path):
    s = summary["summary"]
    assert s["activation"]["ffn_activated_ratio"] < 0.55  # 2 of 4 segments plus the router
    assert s["activation"]["ffns_converted"] == s["activation"]["ffns"], "every FFN converts (Flux single blocks too)"
    assert all(abs(sum(v) - 1) < 1e-3 for v in s["expert_load"].values())
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"TopK", "ScatterElements"} <= ops, "the graph must gather tokens per expert, not run experts densely"


def _mob(teacher, student, summary, folder, onnx_path):
    s, plan = summary["summary"], summary["plan"]
    protected = {i for _, i in teacher.adapter.protected_blocks(teacher.model)}
    assert set(plan["routed"]).isdisjoint(protected), "protected blocks always run"
    groups = [plan["routed"][k:k + 2] for k in range(0, len(plan["routed"]), 2)]
    assert s["block_activation_fraction"] == pytest.approx(len(groups) / len(plan["routed"]), abs=0.01)
    assert s["activation"]["activated_parameters"] < s["activation"]["parameters"]
    assert len(s["block_activation_by_noise"]["rates"]) == 3
    stage = get_stage("mob")
    pictures = stage.pictures(s, folder.parent, "stage0")
    assert (folder.parent / pictures["block_activation"]).stat().st_size > 0
    assert any("Mixture of blocks" in line for line in stage.report_lines(s, pictures))


def _lit(teacher, student, summary, folder, onnx_path):
    from dit_compress.stages.attention.lit import LiTProcessor

    blocks = len(teacher.adapter.blocks(teacher.model))
    assert len(summary["plan"]["layers"]) == blocks
    assert all(isinstance(student.get_submodule(p).processor, LiTProcessor) for p in summary["plan"]["layers"])


def _clear(teacher, student, summary, folder, onnx_path):
    modules = dict(student.named_modules())
    projections = sum(p.numel() for path in summary["plan"]["layers"] for m in ("to_q", "to_k", "to_v", "to_out.0")
                      if f"{path}.{m}" in modules for p in modules[f"{path}.{m}"].parameters())
    pooling = sum(p.numel() for n, p in student.named_parameters() if n.endswith("processor.spatial_weight"))
    assert summary["plan"]["down_factor"] == 4 and pooling == 16 * len(summary["plan"]["layers"])
    assert summary["training"]["distill"]["trainable_parameters"] == projections + pooling, \
        "only the image stream's attention projections (and the pooling weights) train"


def _recover(teacher, student, summary, folder, onnx_path):
    adapter = sum(p.numel() for n, p in student.named_parameters() if "tdlora_" in n)
    assert summary["training"]["recover"]["trainable_parameters"] == adapter > 0, "only the TD-LoRA trains"
    assert summary["attached"]["method"] == "td_lora"


CHECKS = {"prune-depth": _prune_depth, "prune-width": _prune_width, "ppcl": _ppcl, "moe": _moe, "mob": _mob,
          "lit": _lit, "clear": _clear, "recover": _recover}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("row", list(ROWS))
def test_stage_on_family(row, family, calibrated, tmp_path):
    name, raw = ROWS[row]
    stage = get_stage(name)
    cfg = stage.config_cls.model_validate(raw)
    if not supports(row, family):
        teacher = tiny_loaded(family)
        with pytest.raises(UnsupportedModelError, match=f"stage '{name}' does not support {family} models"):
            # no calibration data: the refusal comes before any work
            apply_stage(stage, cfg, copy.deepcopy(teacher.model), StageContext(teacher, None, tmp_path))
        return
    teacher, calib = calibrated(family)
    variants = {}
    ctx = StageContext(teacher, calib, tmp_path / "work",
                       save_variant=lambda label, model, plan: variants.update({label: (model, plan)}))
    student, record, summary = apply_stage(stage, cfg, copy.deepcopy(teacher.model), ctx)
    assert summary["training"] and all(run["steps"] == 2 for run in summary["training"].values())
    check_saved(teacher, student, [record], tmp_path / "ckpt", tmp_path / "student.onnx")
    CHECKS[row](teacher, student, summary, tmp_path / "ckpt", tmp_path / "student.onnx")
    if row == "ppcl":  # the other ratio of the same training run, restored from its own plan
        variant, plan = variants["ratio-0.25"]
        assert len(teacher.adapter.blocks(variant)) == len(teacher.adapter.blocks(teacher.model)) - 1
        restored = load_compressed(save_compressed(tmp_path / "variant", variant, base_reference(
            teacher, {"latent_size": LATENT}), [record.__class__(name, record.config, plan)]))
        x = teacher.adapter.example_inputs(2, seed=5)
        with torch.no_grad():
            assert torch.equal(teacher.with_model(variant).adapter.denoise(variant, *x),
                               restored.adapter.denoise(restored.model, *x))


# Head pruning on SD3.5's attention: the per-head q/k norms (head_dim weights) stay as they are while
# heads go; the dual-attention block's second attention loses heads too. Before, Torch-Pruning
# coupled the norms with the projections, skipped the head groups, and the halved head count
# re-split unpruned projections into wider heads: a shape error inside RMSNorm.
HEAD_ROWS = {
    "prune-width": ("prune", {"method": "width", "ratio": 0.4, "width": {"importance": "l2"}, "recover": TWO_STEPS}),
    "ppcl-heads": ("prune", {"method": "ppcl-hybrid", "ratio": 0.5, "recover": TWO_STEPS,
                             "width": {"heads": 0.5, "ffn": 0.25, "importance": "l2"}}),
}
HEAD_CASES = [("prune-width", v) for v in SD35_VARIANTS] + [("ppcl-heads", "sd35")]


@pytest.mark.parametrize("row, variant", HEAD_CASES, ids=[f"{r}-{v}" for r, v in HEAD_CASES])
def test_sd35_head_pruning(row, variant, calibrated, tmp_path):
    name, raw = HEAD_ROWS[row]
    stage = get_stage(name)
    teacher, calib = calibrated(variant)
    student, record, summary = apply_stage(stage, stage.config_cls.model_validate(raw),
                                           copy.deepcopy(teacher.model), StageContext(teacher, calib, tmp_path / "w"))
    heads = summary["plan"]["width"]["heads"]
    assert heads["transformer_blocks.0.attn2"] == 2 and set(heads.values()) == {2}, heads
    for block in student.transformer_blocks:
        for attn in filter(None, (block.attn, getattr(block, "attn2", None))):
            widths = {p: getattr(attn, p).out_features for p in QKV if getattr(attn, p, None) is not None}
            assert set(widths.values()) == {attn.heads * 8}, f"heads of 8 channels: {attn.heads}, {widths}"
            assert attn.norm_q.weight.shape == (8,), "a per-head norm keeps its head_dim weights"
    check_saved(teacher, student, [record], tmp_path / "ckpt", tmp_path / "student.onnx")
