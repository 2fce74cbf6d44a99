"""PPCL: interval planning, the pluggable supernet, width pruning, and the stage on every family."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import LATENT, tiny_model
from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
from dit_compress.core.pipeline import apply_stage
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.errors import RecipeError, UnsupportedModelError
from dit_compress.stages.prune.ppcl import ContiguousLayerObjective, Interval, PluggableSupernet, make_plans, \
    plan_removal, streams
from dit_compress.stages.prune.width import attention_modules, replay_width_, width_prune_



# -- planning ----------------------------------------------------------------------------
def test_plan_removal_takes_cheapest_disjoint_runs_with_exact_saving():
    costs = {(0, 1): 0.5, (1, 2): 0.1, (2, 3): 0.2, (1, 3): 0.25, (4, 5): 0.05, (3, 5): 0.9}
    assert plan_removal(costs, 6, 1) == [(4, 5)]
    assert plan_removal(costs, 6, 2) == [(1, 2), (4, 5)]
    assert plan_removal(costs, 6, 3) == [(1, 3), (4, 5)]  # 0.30 beats (0,1)+(2,3)+(4,5) = 0.75
    assert plan_removal(costs, 6, 5) == [], "no disjoint runs remove 5 blocks"


def test_plans_collapse_each_run_into_its_first_block_unless_one_is_protected():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(256, 8, generator=g) for _ in range(5)]
    plans, _ = make_plans(states, ["blocks"] * 4, {3}, [2], max_len=2)
    assert [iv.to_json() for iv in plans[2]] == [[0, 1, 0], [2, 3, 3]]


def test_stage_rejects_ratios_that_collide_or_remove_nothing(calibrated, tmp_path):
    teacher, calib = calibrated("dit")
    stage = get_stage("prune")
    ctx = StageContext(teacher, calib, tmp_path)

    def plan(**cfg):
        return stage.plan(teacher.model, teacher.adapter, calib, stage.config_cls(**cfg), ctx)
    with pytest.raises(RecipeError, match="round to the same block counts"):
        plan(ratio=0.5, ratios=[0.45])
    with pytest.raises(RecipeError, match="removes no block"):
        plan(ratio=0.1)
    with pytest.raises(RecipeError, match="outside blocks 0..3"):
        plan(ratio=0.25, intervals=[[2, 4]])


# -- the supernet's non-sequential block losses ----------------------------------------------
def test_block_losses_take_teacher_inputs_so_errors_do_not_propagate(calibrated):
    teacher, calib = calibrated("sd3")
    student = copy.deepcopy(teacher.model)
    plan = [Interval(1, 2, 1)]
    net = PluggableSupernet(student, teacher.adapter, [plan])
    with torch.no_grad():
        for p in net.blocks()[0].parameters():  # damage block 0 only
            p.add_(0.5 * torch.randn_like(p))
    objective = ContiguousLayerObjective(teacher.adapter, net, contiguous_weight=1.0, feature_weight=1.0)
    objective.attach(teacher.model, net)
    try:
        b = calib.batch(0, 4)
        with torch.no_grad():
            teacher.adapter.denoise(teacher.model, b.x_t, b.t, b.cond)
            _, _, outputs = net(b.x_t, b.t, b.cond, objective.calls, 0)
        err = {k: max(float((s - t).abs().max())
                      for s, t in zip(streams(v), streams(objective.outs[objective.targets[k]])))
               for k, v in outputs.items()}
    finally:
        objective.close()
    assert err["block0"] > 1e-2, "the damaged block must show its error"
    assert err["block3"] == 0.0, "a later block fed teacher inputs must be unaffected by block 0"
    assert err["1-2"] > 0, "the replacement (one block for two) cannot match the run before training"


# -- width pruning -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dit", "pixart", "sd3"])
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_width_pruning_keeps_whole_heads_and_replays(family, importance, calibrated):
    teacher, calib = calibrated(family)
    model = copy.deepcopy(teacher.model)
    before = sum(p.numel() for p in model.parameters())
    record = width_prune_(model, teacher.adapter, calib, heads=0.5, ffn=0.5, importance=importance)
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    for view in teacher.adapter.layout(model).attentions():
        attn = view.module
        assert attn.heads == 1 and attn.to_q.out_features == attn.to_k.out_features == 8  # 1 head x 8
    fresh = tiny_model(family)
    replay_width_(fresh, record)
    fresh.load_state_dict(model.state_dict())
    x, t, cond = teacher.adapter.example_inputs(2, seed=3)
    with torch.no_grad():
        a = teacher.adapter.denoise(model, x, t, cond)
        assert torch.isfinite(a).all()
        assert torch.equal(a, teacher.adapter.denoise(fresh, x, t, cond))


def test_taylor_and_magnitude_rank_channels_differently(calibrated):
    teacher, calib = calibrated("dit")
    kept = {}
    for importance in ("l2", "taylor"):
        model = copy.deepcopy(teacher.model)
        width_prune_(model, teacher.adapter, calib, heads=0.0, ffn=0.5, importance=importance)
        up = model.transformer_blocks[1].ff.net[0].proj.weight
        full = teacher.model.transformer_blocks[1].ff.net[0].proj.weight
        kept[importance] = {int((full - row).abs().sum(1).argmin()) for row in up}
    assert len(kept["l2"]) == len(kept["taylor"]) == full.shape[0] // 2
    assert kept["l2"] != kept["taylor"]


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_width_pruning_refuses_families_it_cannot_trace(family, calibrated):
    teacher, calib = calibrated(family)
    with pytest.raises(UnsupportedModelError, match=f"not {family}.*depth pruning"):
        width_prune_(copy.deepcopy(teacher.model), teacher.adapter, calib, 0.5, 0.5)


# -- PPCL with width pruning in the same phase (every family, without width: the stage matrix) ---------
def test_ppcl_with_width_trains_all_ratios_and_restores(calibrated, tmp_path):
    teacher, calib = calibrated("sd3")
    stage = get_stage("prune")
    cfg = stage.config_cls.model_validate({"ratio": 0.5, "ratios": [0.25], "recover": {"steps": 2, "batch_size": 4},
                                           "width": {"heads": 0.5, "ffn": 0.25}})
    variants = {}
    ctx = StageContext(teacher, calib, tmp_path / "work",
                       save_variant=lambda label, m, plan: variants.update({label: (m, plan)}))
    student, record, summary = apply_stage(stage, cfg, copy.deepcopy(teacher.model), ctx)
    assert set(variants) == {"ratio-0.25"}
    assert summary["training"]["ppcl"]["steps"] == 2, "one training run serves every ratio"
    n = len(teacher.adapter.blocks(teacher.model))
    assert len(teacher.adapter.blocks(student)) == n - 2
    assert len(teacher.adapter.blocks(variants["ratio-0.25"][0])) == n - 1
    assert not stage.is_stock(record.plan)
    base = base_reference(teacher, {"latent_size": LATENT})
    for name, (model, plan) in {"main": (student, record.plan), **variants}.items():
        save_compressed(tmp_path / name, model, base, [StageRecord("prune", record.config, plan)])
        assert not (tmp_path / name / "diffusers").exists(), "width-pruned: not a stock class"
        restored = load_compressed(tmp_path / name)
        x, t, cond = teacher.adapter.example_inputs(2, seed=7)
        with torch.no_grad():
            a = teacher.adapter.denoise(model, x, t, cond)
            b = restored.adapter.denoise(restored.model, x, t, cond)
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"{name}: restored output differs by {(a - b).abs().max()}"
        for attns in attention_modules(restored.adapter, restored.model):
            assert all(attn.heads == 1 for _, attn in attns)
