"""PPCL (the paper's search, middle-block replacements, frozen-teacher alignment loss, FFN maps, plugs)
and ppcl-hybrid (planning, supernet, Torch-Pruning width); the stage on every family: test_stage_matrix."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import LATENT, tiny_model
from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
from dit_compress.core.pipeline import apply_stage
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.errors import RecipeError, UnsupportedModelError
from dit_compress.stages.prune.hybrid import ContiguousLayerObjective, PluggableSupernet, make_plans
from dit_compress.stages.prune.intervals import Interval, ProxyCurves, candidate_costs, plan_removal, \
    proxy_curves, select_intervals, streams
from dit_compress.stages.prune.plug import plug_sizes
from dit_compress.stages.prune.ppcl import token_normalised_mse
from dit_compress.stages.prune.width import attention_modules, replay_width_, width_prune_



# -- planning ----------------------------------------------------------------------------
def test_plan_removal_takes_cheapest_disjoint_runs_with_exact_saving():
    costs = {(0, 1): 0.5, (1, 2): 0.1, (2, 3): 0.2, (1, 3): 0.25, (4, 5): 0.05, (3, 5): 0.9}
    assert plan_removal(costs, 6, 1) == [(4, 5)]
    assert plan_removal(costs, 6, 2) == [(1, 2), (4, 5)]
    assert plan_removal(costs, 6, 3) == [(1, 3), (4, 5)]  # 0.30 beats (0,1)+(2,3)+(4,5) = 0.75
    assert plan_removal(costs, 6, 5) == [], "no disjoint runs remove 5 blocks"


def test_hybrid_plans_collapse_each_run_into_its_first_block_unless_one_is_protected():
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
        plan(method="ppcl-hybrid", ratio=0.5, ratios=[0.45])
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


# -- ppcl-hybrid with Torch-Pruning width in the same phase ---------------------------------------------
def test_hybrid_with_width_trains_all_ratios_and_restores(calibrated, tmp_path):
    teacher, calib = calibrated("sd3")
    stage = get_stage("prune")
    cfg = stage.config_cls.model_validate({"method": "ppcl-hybrid", "ratio": 0.5, "ratios": [0.25],
                                           "recover": {"steps": 2, "batch_size": 4},
                                           "width": {"heads": 0.5, "ffn": 0.25}})
    variants = {}
    ctx = StageContext(teacher, calib, tmp_path / "work",
                       save_variant=lambda label, m, plan: variants.update({label: (m, plan)}))
    student, record, summary = apply_stage(stage, cfg, copy.deepcopy(teacher.model), ctx)
    assert set(variants) == {"ratio-0.25"}
    assert summary["training"]["ppcl-hybrid"]["steps"] == 2, "one training run serves every ratio"
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


# -- PPCL as the paper defines it ---------------------------------------------------------------
def _states_with_a_turn(n_linear: int, total: int, dim: int = 6, tokens: int = 512):
    """Boundary states whose first `n_linear` blocks are residual linear maps and whose next block
    is strongly non-linear: a probe proxy tracks the first ones and loses the teacher at the turn."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(tokens, dim, generator=g)]
    for i in range(total):
        x = h[-1]
        if i < n_linear:
            h.append(x + 0.1 * x @ torch.randn(dim, dim, generator=g))
        else:
            h.append(torch.sin(3 * x) * x.abs() + torch.randn(tokens, dim, generator=g) * 0.5)
    return h


def test_turning_point_ends_the_interval_and_selection_is_exact():
    states = _states_with_a_turn(n_linear=4, total=6)
    curves = proxy_curves(states, ["blocks"] * 6, max_len=10)
    assert curves.cka[0][3] > 0.999, "four residual-linear blocks: the proxy stays exact"
    assert curves.cka[0][4] < 0.9, "the non-linear block 4 is a turning point"
    costs = candidate_costs(curves, protected=set(), turn=0.02)
    assert (0, 3) in costs and (0, 4) not in costs, "intervals end before the turning point"
    chosen, plugs = select_intervals(costs, 6, [3], protected=set())
    assert [iv.to_json() for iv in chosen] == [[0, 3, 1]], "one interval of 4 blocks, its middle block kept"
    assert plugs == {3: ["0-3"]}
    with pytest.raises(RecipeError, match="no set of non-overlapping redundant intervals"):
        select_intervals({(0, 1): 0.1}, 6, [3], protected=set())


def test_protected_block_is_the_anchor_and_smaller_sizes_are_nested_plugs():
    costs = {(0, 2): 0.01, (3, 5): 0.3, (6, 7): 0.02, (0, 1): 0.001}
    chosen, plugs = select_intervals(costs, 8, [2, 4], protected={4})
    assert [iv.to_json() for iv in chosen] == [[0, 2, 1], [3, 5, 4]], "the deepest size planned freely"
    assert plugs == {2: ["0-2"], 4: ["0-2", "3-5"]}, "a smaller size plugs a subset of its intervals"
    chosen, plugs = select_intervals(costs, 8, [1, 2, 4], protected={4})  # 1 block: no subset of those
    assert [iv.to_json() for iv in chosen] == [[0, 1, 0], [6, 7, 6], [3, 5, 4]]
    assert plugs == {1: ["0-1"], 2: ["0-1", "6-7"], 4: ["0-1", "6-7", "3-5"]}, "then smallest first, nested"
    sizes = plug_sizes({"intervals": [iv.to_json() for iv in chosen], "plugs": {f"{k}": v for k, v in plugs.items()}})
    assert sizes == [[], ["0-1"], ["6-7"], ["0-1", "6-7"], ["3-5"], ["0-1", "3-5", "6-7"]], \
        "the teacher, each interval alone and every ratio's plug once, fewest removed blocks first"
    curves = ProxyCurves({0: [1.0, 0.99, 0.98]})
    assert ProxyCurves.from_json(curves.to_json()).cka == curves.cka


def test_alignment_loss_is_the_official_per_token_normalised_mse():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ref = torch.nn.functional.mse_loss(s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True),
                                       reduction="none").sum(-1).mean()
    assert torch.allclose(token_normalised_mse(s, t), ref)
    scale = torch.rand(2, 5, 1, generator=g) + 0.1  # per-token scale does not matter
    assert torch.allclose(token_normalised_mse(s * scale, t), ref, atol=1e-6)


def _ppcl(calibrated, tmp_path, family, **cfg):
    teacher, calib = calibrated(family)
    stage = get_stage("prune")
    config = stage.config_cls.model_validate({"ratio": 0.5, "ratios": [0.25], "turn": 1.0,
                                              "recover": {"steps": 3, "batch_size": 4, "lr": 1e-2}, **cfg})
    variants = {}
    ctx = StageContext(teacher, calib, tmp_path / "work",
                       save_variant=lambda label, m, plan: variants.update({label: (m, plan)}))
    student, record, summary = apply_stage(stage, config, copy.deepcopy(teacher.model), ctx)
    return teacher, student, record, summary, variants


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_only_replacements_train_and_teacher_blocks_stay_frozen(family, calibrated, tmp_path):
    teacher, student, record, summary, _ = _ppcl(calibrated, tmp_path, family)
    plan = record.plan
    intervals = [Interval(*iv) for iv in plan["intervals"]]
    assert sum(iv.saves for iv in intervals) == 2 and all(iv.anchor == (iv.first + iv.last) // 2 or
                                                          iv.anchor in iv.blocks() for iv in intervals)
    t_blocks = [b for _, _, b in teacher.adapter.blocks(teacher.model)]
    s_blocks = [b for _, _, b in teacher.adapter.blocks(student)]
    kept = [i for i in range(len(t_blocks)) if i not in plan["removed"]]
    anchors = {iv.anchor for iv in intervals}
    for pos, i in enumerate(kept):
        same = all(torch.equal(a, b) for a, b in zip(t_blocks[i].state_dict().values(),
                                                     s_blocks[pos].state_dict().values()))
        assert same != (i in anchors), f"block {i}: {'trained' if i in anchors else 'frozen'} expected"
    names = {n for n, _ in student.named_parameters()}
    assert names == {n for n, _ in copy.deepcopy(student).named_parameters()}
    trained = summary["training"]["ppcl"]
    replacements = sum(p.numel() for iv in intervals for p in t_blocks[iv.anchor].parameters())
    assert trained["trainable_parameters"] == replacements, "only the replacements train"


def test_ffn_maps_replace_the_best_fitted_ffns_and_restore(calibrated, tmp_path):
    teacher, student, record, summary, variants = _ppcl(calibrated, tmp_path, "sd3", ratio=0.25, ratios=[],
                                                        replace_ffn=0.25)
    plan = record.plan
    errors = summary["summary"]["ffn_errors"]
    assert plan["ffn"] and set(plan["ffn"]) <= set(errors)
    worst_taken = max(errors[p] for p in plan["ffn"])
    assert all(errors[p] >= worst_taken for p in errors if p not in plan["ffn"]), "lowest error first"
    modules = dict(student.named_modules())
    assert all(isinstance(modules[p], torch.nn.Linear) for p in plan["ffn_deployed"])
    assert not get_stage("prune").is_stock(plan)
    base = base_reference(teacher, {"latent_size": LATENT})
    for name, (model, p) in {"main": (student, plan), **variants}.items():
        restored = load_compressed(save_compressed(tmp_path / name, model, base, [StageRecord("prune", record.config, p)]))
        x = teacher.adapter.example_inputs(2, seed=7)
        with torch.no_grad():
            a = teacher.adapter.denoise(model, *x)
            assert torch.isfinite(a).all()
            assert torch.equal(a, restored.adapter.denoise(restored.model, *x))


def test_ppcl_config_keeps_the_methods_apart():
    cls = get_stage("prune").config_cls
    with pytest.raises(ValueError, match="smaller plugs"):
        cls(ratio=0.25, ratios=[0.5])
    with pytest.raises(ValueError, match="PPCL's own width is `replace_ffn`"):
        cls(ratio=0.5, width={"heads": 0.5})
    with pytest.raises(ValueError, match="`contiguous_weight` belongs to method ppcl-hybrid"):
        cls(ratio=0.5, contiguous_weight=0.1)
    with pytest.raises(ValueError, match="`replace_ffn` belongs to method ppcl"):
        cls(method="ppcl-hybrid", ratio=0.5, replace_ffn=0.2)
    with pytest.raises(ValueError, match="leave `recover.trainable` unset"):
        cls(ratio=0.5, recover={"trainable": ["*attn*"]})
    assert cls(ratio=0.5).longest_interval() == 10 and cls(method="ppcl-hybrid", ratio=0.5).longest_interval() == 2
