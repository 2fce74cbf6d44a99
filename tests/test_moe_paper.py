"""Dense2MoE as its paper defines it: every FFN converted and counted (Flux single blocks' fused MLPs
included), the two training phases of the MoE (shared expert, then routed experts and routers), and
the Mixture-of-Blocks router on the AdaLN embedding."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_loaded
from dit_compress.core.stage import get_stage
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.errors import RecipeError
from dit_compress.stages.moe.fused import AttentionOutput
from dit_compress.stages.moe.layer import MoEFeedForward
from dit_compress.stages.moe.stage import MoEObjective, SharedExpertObjective, activation_stats, moe_layers


def _calibrated(family):
    teacher = tiny_loaded(family)
    return teacher, build_calibration(teacher, CalibrationSpec(num_samples=16, sampling_steps=2))


def _converted(teacher, calib, **raw):
    stage = get_stage("moe")
    cfg = stage.config_cls.model_validate({"segments": 4, "taylor_batches": 1, **raw})
    model = copy.deepcopy(teacher.model)
    plan = stage.plan(model, teacher.adapter, calib, cfg, None)
    return stage, cfg, plan, stage.build(model, teacher.adapter, cfg, plan)


def _flux_ffn_parameters(model) -> tuple[int, int]:
    """(double-stream ff + ff_context, single-stream MLPs: proj_mlp and proj_out's MLP columns + bias)."""
    double = sum(p.numel() for b in model.transformer_blocks for ff in (b.ff, b.ff_context) for p in ff.parameters())
    single = sum(sum(p.numel() for p in b.proj_mlp.parameters()) + b.proj_out.weight[:, b.proj_mlp.in_features:].numel()
                 + b.proj_out.bias.numel() for b in model.single_transformer_blocks)
    return double, single


def test_flux_single_blocks_convert_exactly_and_count():
    teacher, calib = _calibrated("flux")
    double, single = _flux_ffn_parameters(teacher.model)
    # top_k = every routed expert and a zero router: gates are 1, so the MoE model is the dense one
    _, _, plan, student = _converted(teacher, calib, top_k=3)
    for b in student.single_transformer_blocks:
        assert isinstance(b.proj_mlp, MoEFeedForward) and isinstance(b.proj_out, AttentionOutput)
    assert sum(s.get("fused", False) for s in plan["moe"].values()) == len(student.single_transformer_blocks)
    for m in moe_layers(student).values():
        torch.nn.init.zeros_(m.router.weight), torch.nn.init.zeros_(m.router.bias)
    x, t, cond = teacher.adapter.example_inputs(2, seed=3)
    with torch.no_grad():
        ref, got = teacher.adapter.denoise(teacher.model, x, t, cond), teacher.adapter.denoise(student, x, t, cond)
    assert torch.allclose(got, ref, atol=1e-5), f"conversion changed the output by {(got - ref).abs().max()}"
    stats = activation_stats(student, plan.notes)
    assert stats["ffn_dense_parameters"] == double + single
    assert stats["ffns_converted"] == stats["ffns"] == 2 * len(student.transformer_blocks) + len(
        student.single_transformer_blocks)

    # Leaving the single blocks dense: they still count, in full, as activated FFN parameters.
    _, _, plan, student = _converted(teacher, calib, top_k=1, targets=("ff", "ff_context"))
    assert not any(isinstance(b.proj_mlp, MoEFeedForward) for b in student.single_transformer_blocks)
    stats = activation_stats(student, plan.notes)
    routed = sum(m.activated_parameters() for m in moe_layers(student).values())
    assert stats["ffn_dense_parameters"] == double + single
    assert stats["ffn_activated_parameters"] == routed + single
    assert stats["activated_parameters"] < stats["parameters"] and 0 < stats["activated_ratio"] < 1


def test_paper_schedule_trains_shared_experts_then_routed_experts(tmp_path):
    from dit_compress.train.distill import Distiller

    teacher, calib = _calibrated("dit")
    stage, cfg, plan, model = _converted(teacher, calib, top_k=2, recover={"steps": 2, "batch_size": 4})
    phases = stage.phases(cfg, plan, teacher.adapter)
    assert [p.name for p in phases] == ["shared", "experts"]
    layers = moe_layers(model)
    names = {n for n, _ in model.named_parameters()}
    shared = {n for n in names if n.rpartition(".")[0].rpartition(".")[2] in ("shared_up", "shared_down")}
    routed = {n for n in names for path in layers if n.startswith(path + ".")} - shared
    assert shared and routed and all(n.startswith(tuple(layers)) for n in shared)
    seen = []
    for m in layers.values():
        m.register_forward_hook(lambda mod, inp, out: seen.append(mod.shared_only))
    for k, (phase, expect, objective_cls) in enumerate(zip(phases, (shared, routed),
                                                           (SharedExpertObjective, MoEObjective))):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        objective = phase.objective(teacher.adapter, model)
        assert type(objective) is objective_cls
        model.requires_grad_(True)
        seen.clear()
        Distiller(teacher.model, model, teacher.adapter, calib, phase.distill, tmp_path / f"phase{k}",
                  phase.layer_map, phase.name, objective, phase.trainable).run()
        model.eval().requires_grad_(False)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == expect, f"phase {phase.name} changed {sorted(changed ^ expect)[:4]} wrongly"
        assert seen and all(flag == (k == 0) for flag in seen), "only the shared experts run in the first phase"
    assert objective.balance_weight == 0.01 and not any(m.shared_only for m in layers.values())

    joint = stage.config_cls.model_validate({"schedule": "joint"})
    (only,) = stage.phases(joint, plan, teacher.adapter)
    assert only.trainable is None and joint.balance == 0.05


def test_schedule_options_are_checked():
    from dit_compress.core.stage import parse_stage_config

    with pytest.raises(RecipeError, match="shared_recover is the first phase of schedule paper"):
        parse_stage_config("moe", {"schedule": "joint", "shared_recover": {"steps": 2}}, "r.yaml stages.0.moe:")
    with pytest.raises(RecipeError, match="recover.trainable: schedule paper sets what each phase trains"):
        parse_stage_config("moe", {"recover": {"trainable": ["*.ff.*"]}}, "r.yaml stages.0.moe:")
    with pytest.raises(RecipeError, match="router"):
        parse_stage_config("mob", {"router": "timestep"}, "r.yaml stages.0.mob:")


def _routed_first_block(teacher, router):
    """A MoB model on `teacher` with random router weights, its first routed block, and that
    block's call (args, kwargs) in one forward."""
    stage = get_stage("mob")
    cfg = stage.config_cls.model_validate({"group_size": 2, "active": 1, "router": router})
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2))
    model = copy.deepcopy(teacher.model)
    plan = stage.plan(model, teacher.adapter, calib, cfg, None)
    model = stage.build(model, teacher.adapter, cfg, plan).requires_grad_(False)  # frozen, as after a stage
    torch.manual_seed(0)
    for r in model.mob.routers:  # the router reads its input through random weights, no bias
        torch.nn.init.normal_(r.proj_y.weight if router == "adaln" else r.proj.weight)
        torch.nn.init.zeros_(r.bias if router == "adaln" else r.proj.bias)
    block = getattr(model, plan["attr"])[plan["routed"][0]]
    calls = []
    handle = block.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    x, t, cond = teacher.adapter.example_inputs(16, seed=1)
    with torch.no_grad():
        teacher.adapter.denoise(model, x, t, cond)
    handle.remove()
    return model, cfg, plan, block, calls[0], cond


@pytest.mark.parametrize("router", ["adaln", "hidden"])
def test_mob_router_reads_the_adaln_embedding(router, tmp_path):
    """With the hidden states (and text) entering the group fixed, another timestep changes the
    choice of the paper's router, and not that of the hidden-state router. The adaln router's
    model restores with the same routing and exports with parity (the embedding hook is in the graph)."""
    teacher = tiny_loaded("sd3")
    model, cfg, plan, block, (args, kwargs), cond = _routed_first_block(teacher, router)
    if router == "adaln":
        assert plan["embedding"] == "time_text_embed" and plan["embedding_dim"] == plan["dim"]
        assert plan["context_dim"] == plan["dim"], "SD3's joint blocks receive the text stream"
    choices = []
    with torch.no_grad():
        for t in (10.0, 900.0):
            # the family's AdaLN embedding of this timestep and the same prompts (the hook keeps it)
            model.time_text_embed(torch.full((16,), t), cond["pooled_projections"])
            block(*args, **kwargs)
            choices.append(block.router.choice.clone())
    if router == "adaln":
        assert not torch.equal(*choices), "the timestep must change the adaln router's choice"
        _restores_and_exports(teacher, model, cfg, plan, tmp_path)

    else:
        assert torch.equal(*choices), "the hidden-state router reads only the hidden state"


def _restores_and_exports(teacher, model, cfg, plan, tmp_path):
    """Save -> restore (same routing, identical outputs) and ONNX parity."""
    from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
    from dit_compress.export.onnx import export_onnx

    inputs = teacher.adapter.example_inputs(4)
    folder = save_compressed(tmp_path / "ckpt", model, base_reference(teacher, {"source": "tiny"}),
                             [StageRecord("mob", cfg.model_dump(), plan.choices, None)], "h")
    restored = load_compressed(folder)
    with torch.no_grad():
        before = teacher.adapter.denoise(model, *inputs)
        choice = model.mob.choices()
        after = restored.adapter.denoise(restored.model, *inputs)
    assert not (choice.all(0) | ~choice.any(0)).all(), "routing must differ between samples"
    assert torch.equal(choice, restored.model.mob.choices()) and torch.equal(before, after)
    info = export_onnx(restored.model, restored.adapter, tmp_path / "mob.onnx", batch=4, atol=1e-4)
    assert info["parity"]["max_abs_error"] <= 1e-4
