"""TD-LoRA, DiffScaler and LoRA adapters: exact start, timestep dependence, task switching,
save/load, export with parity (exact and baked), recovery after pruning, and task fine-tuning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import check_round_trip
from test_families import _loaded
from dit_compress import adapters
from dit_compress.adapters.td_lora import bake_timestep
from dit_compress.errors import AdapterError, CheckpointError, RecipeError
from dit_compress.export.onnx import export_onnx


def _perturb(model, name: str, scale: float = 0.05, seed: int = 0) -> None:
    """Stand-in for training: give adapter `name` non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters.store.adapter_parameters(model, name).values():
        p.data.add_(torch.randn(p.shape, generator=g) * scale)


def _out(m, model, inputs):
    with torch.no_grad():
        return m.adapter.denoise(model, *inputs)


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_td_lora_starts_as_the_base_and_its_update_follows_the_timestep(family):
    m = _loaded(family)
    x, _, cond = m.adapter.example_inputs(2)
    t_early, t_late = torch.full((2,), 900.0), torch.full((2,), 100.0)
    base_early, base_late = _out(m, m.model, (x, t_early, cond)), _out(m, m.model, (x, t_late, cond))
    model = copy.deepcopy(m.model)
    adapters.attach(model, "td_lora", adapters.default_config("td_lora", model), "task")
    assert torch.equal(_out(m, model, (x, t_early, cond)), base_early), "B = 0 must reproduce the base model"
    _perturb(model, "task")
    layer = next(mod for mod in model.modules() if hasattr(mod, "tdlora_router"))
    for p in layer.tdlora_router["task"].parameters():
        p.data.normal_(0, 1.0)
    _out(m, model, (x, t_late, cond))
    g_late = layer.gates("task", model._tdlora_time.value)  # the embedding of the last call's timestep
    _out(m, model, (x, t_early, cond))
    g_early = layer.gates("task", model._tdlora_time.value)
    assert not torch.allclose(g_early, g_late, atol=1e-3), "the router must see the timestep"
    assert torch.allclose(g_early.sum(-1), torch.ones(2))
    d_early = _out(m, model, (x, t_early, cond)) - base_early
    d_late = _out(m, model, (x, t_late, cond)) - base_late
    assert d_early.abs().max() > 1e-4 and not torch.allclose(d_early, d_late, atol=1e-5)


def test_td_lora_baked_for_a_timestep_equals_the_adapter_at_that_timestep():
    m = _loaded("dit")
    model = copy.deepcopy(m.model)
    adapters.attach(model, "td_lora", adapters.default_config("td_lora", model), "task")
    _perturb(model, "task")
    x, _, cond = m.adapter.example_inputs(3)
    for t in (37.0, 640.0):
        tt = torch.full((3,), t)
        baked = bake_timestep(model, t)
        assert not adapters.store.has_adapter_layers(baked) and not baked._forward_pre_hooks
        torch.testing.assert_close(_out(m, baked, (x, tt, cond)), _out(m, model, (x, tt, cond)),
                                   atol=2e-5, rtol=1e-4)
    assert adapters.store.has_adapter_layers(model), "baking must not touch the adapted model"
    layer = next(mod for mod in model.modules() if hasattr(mod, "tdlora_router"))
    with pytest.raises(AdapterError, match="bake_timestep"):
        layer.merge()


@pytest.mark.parametrize("method", ["lora", "td_lora", "diffscaler"])
def test_adapter_saves_loads_and_exports_with_parity(method, tmp_path):
    m = _loaded("dit")
    model = copy.deepcopy(m.model)
    adapters.attach(model, method, adapters.default_config(method, model, num_task_classes=2), "faces")
    _perturb(model, "faces")
    inputs = m.adapter.example_inputs(3)
    before = _out(m, model, inputs)
    folder = adapters.save_adapter(model, tmp_path / "faces", "faces")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == adapters.methods.PEFT_TYPES[method]
    prefix = adapters.METHODS[method][1].prefix
    from safetensors.torch import load_file

    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert keys and all(prefix in k and ".faces" not in k for k in keys), "only the adapter, keyed without its name"
    fresh = copy.deepcopy(m.model)
    adapters.load_adapter(fresh, folder)
    assert torch.equal(_out(m, fresh, inputs), before)
    info = export_onnx(fresh, m.adapter, tmp_path / f"{method}.onnx", batch=2, atol=1e-4)
    assert info["parity"]["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("method", ["td_lora", "diffscaler"])
def test_peft_itself_loads_the_toolchain_adapter_folders(method, tmp_path):
    """Importing dit_compress.adapters registers the methods: plain peft then loads our folders."""
    from peft import PeftConfig, PeftModel

    m = _loaded("dit")
    inputs = m.adapter.example_inputs(3)
    expected = {}
    for i, task in enumerate(("faces", "photos")):
        model = copy.deepcopy(m.model)
        adapters.attach(model, method, adapters.default_config(method, model, num_task_classes=2), task)
        _perturb(model, task, seed=i)
        expected[task] = _out(m, model, inputs)
        adapters.save_adapter(model, tmp_path / task, task)
    assert not torch.allclose(expected["faces"], expected["photos"])
    config = PeftConfig.from_pretrained(str(tmp_path / "faces"))
    assert type(config) is adapters.METHODS[method][0] and config.peft_type == adapters.methods.PEFT_TYPES[method]

    served = PeftModel.from_pretrained(copy.deepcopy(m.model), str(tmp_path / "faces"))
    assert torch.equal(_out(m, served, inputs), expected["faces"])
    served.load_adapter(str(tmp_path / "photos"), adapter_name="photos")
    served.set_adapter("photos")
    assert torch.equal(_out(m, served, inputs), expected["photos"])
    served.set_adapter("default")
    assert torch.equal(_out(m, served, inputs), expected["faces"])


def test_a_bad_adapter_config_is_rejected_saying_what_is_wrong(tmp_path):
    m = _loaded("dit")
    model = copy.deepcopy(m.model)
    adapters.attach(model, "td_lora", {"r": 2, "target_modules": ["to_q"]}, "x")
    good = json.loads((adapters.save_adapter(model, tmp_path / "x", "x") / "adapter_config.json").read_text())
    cases = [
        ("{not json", r"not an adapter config"),
        (json.dumps({"method": "td_lora", "config": {"r": 2}}), r"not a peft adapter config \(it has no peft_type\)"),
        (json.dumps({**good, "peft_type": "DORA"}), r"peft_type 'DORA' is not a method the toolchain serves "
                                                     r"\(LORA, TD_LORA, DIFFSCALER\)"),
        (json.dumps({**good, "rank": 4}), r"td_lora adapter config: unknown key\(s\) \['rank'\]"),
        (json.dumps({**good, "num_experts": 0}), r"num_experts: Input should be greater than or equal to 1"),
        (json.dumps({**good, "r": 10 ** 9}), r"r: Input should be less than or equal to 1024"),  # before allocating
        (json.dumps({**good, "r": True}), r"r: Input should be a valid integer"),
    ]
    for text, message in cases:
        (tmp_path / "x" / "adapter_config.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"x/adapter_config.json: .*" + message):
            adapters.load_adapter(copy.deepcopy(m.model), tmp_path / "x")


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "sana"])
def test_td_lora_routers_see_the_timestep_on_one_scale_in_every_family(family):
    from diffusers.models.embeddings import get_timestep_embedding

    m = _loaded(family)
    model = copy.deepcopy(m.model)
    adapters.attach(model, "td_lora", adapters.default_config("td_lora", model), "task")
    x, _, cond = m.adapter.example_inputs(2)
    t = torch.tensor([250.0, 900.0])
    _out(m, model, (x, t, cond))
    expected = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(model._tdlora_time.value, expected, atol=1e-4, rtol=1e-4)


def test_one_base_model_serves_two_tasks_by_switching_adapters(tmp_path):
    m = _loaded("dit")
    inputs = m.adapter.example_inputs(4)
    base_out = _out(m, m.model, inputs)
    expected = {}
    for i, (task, classes) in enumerate((("faces", 2), ("photos", 1))):
        alone = copy.deepcopy(m.model)
        adapters.attach(alone, "diffscaler", adapters.default_config("diffscaler", alone, classes), task)
        _perturb(alone, task, seed=i)
        adapters.save_adapter(alone, tmp_path / task, task)
        expected[task] = _out(m, alone, inputs)
    assert not torch.allclose(expected["faces"], expected["photos"])
    served = copy.deepcopy(m.model)
    for task in ("faces", "photos"):
        adapters.load_adapter(served, tmp_path / task)
    for task in ("photos", "faces", "photos"):
        adapters.use(served, task)
        assert torch.equal(_out(m, served, inputs), expected[task]), f"switching to {task}"
    with pytest.raises(AdapterError, match="no adapter named 'sketches'"):
        adapters.use(served, "sketches")
    assert torch.equal(_out(m, m.model, inputs), base_out), "the base model itself is never modified"


def test_diffscaler_task_classes_start_from_the_unconditional_row():
    m = _loaded("dit")
    model = copy.deepcopy(m.model)
    adapters.attach(model, "diffscaler", adapters.default_config("diffscaler", model, 2), "faces")
    x, t, _ = m.adapter.example_inputs(3)
    null = torch.full((3,), m.adapter.num_classes)
    task_labels = torch.tensor([0, 1, 0])
    unconditional = _out(m, m.model, (x, t, {"class_labels": null}))
    assert torch.equal(_out(m, model, (x, t, {"class_labels": task_labels})), unconditional)
    assert torch.equal(_out(m, model, (x, t, {"class_labels": null})), unconditional), "null label unchanged"


def test_bad_adapters_are_rejected_with_the_file_named(tmp_path):
    m = _loaded("dit")
    model = copy.deepcopy(m.model)
    with pytest.raises(AdapterError, match="unknown adapter method 'dora'"):
        adapters.attach(model, "dora", {}, "x")
    with pytest.raises(AdapterError, match="unknown key"):
        adapters.attach(model, "td_lora", {"rank": 4, "target_modules": ["to_q"]}, "x")
    with pytest.raises(AdapterError, match="DiTTransformer2DModel"):
        adapters.attach(model, "td_lora", {"target_modules": ["no_such_layer"]}, "x")
    adapters.attach(model, "td_lora", {"r": 2, "target_modules": ["to_q"]}, "x")
    folder = adapters.save_adapter(model, tmp_path / "x", "x")
    other = copy.deepcopy(m.model)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*shape"):
        adapters.load_adapter(other, folder)
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read adapter weights"):
        adapters.load_adapter(copy.deepcopy(m.model), folder)


def test_td_lora_recovery_trains_only_the_adapter_and_restores_from_the_manifest(tmp_path):
    from dit_compress.adapters.store import describe
    from dit_compress.data.calibration import CalibrationSpec, build_calibration
    from dit_compress.stages.prune.config import PruneConfig
    from dit_compress.stages.prune.stage import remove_blocks_
    from dit_compress.train.distill import DistillConfig, Distiller

    teacher = _loaded("dit")
    calib = build_calibration(teacher, CalibrationSpec(num_samples=32, sampling_steps=2))
    student = copy.deepcopy(teacher.model)
    remove_blocks_(student, teacher.adapter, [1, 2])
    frozen = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(steps=40, batch_size=16, lr=3e-3, trainable="td_lora", checkpoint_every=40)
    res = Distiller(teacher.model, student, teacher.adapter, calib, cfg, tmp_path / "work").run()
    assert res["final_output_mse"] < 0.8 * res["history"][0]["output_mse"], "TD-LoRA recovery did not learn"
    assert res["trainable_parameters"] == sum(p.numel() for n, p in student.named_parameters() if "tdlora_" in n)
    after = student.state_dict()
    for k, v in frozen.items():  # every base weight is untouched (peft renames wrapped layers' weights)
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], v), f"{k} changed"
    student.eval().requires_grad_(False)
    plan = {"removed": [1, 2]}
    check_round_trip(teacher, student, "prune", PruneConfig(method="depth", remove=[1, 2]), plan, tmp_path,
                     attached=describe(student))


def test_td_lora_recovery_only_where_it_fits():
    from dit_compress.core.recipe import parse_recipe

    recipe = {"model": {"source": "zoo:digits-dit"}, "stages": [
        {"prune": {"method": "depth", "remove": [1], "recover": {"trainable": "td_lora"}}},
        {"prune": {"method": "depth", "remove": [2]}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\].prune.recover.trainable: td_lora"):
        parse_recipe(recipe)
    with pytest.raises(RecipeError, match="moe trains new weights inside its method"):
        parse_recipe({"model": {"source": "zoo:digits-dit"}, "stages": [{"moe": {"recover": {"trainable": "td_lora"}}}]})
    with pytest.raises(RecipeError, match=r"td_lora: unknown option\(s\) \['rank'\]"):
        parse_recipe({"model": {"source": "zoo:digits-dit"}, "stages": [
            {"prune": {"method": "depth", "remove": [1], "recover": {"trainable": "td_lora", "td_lora": {"rank": 4}}}}]})
    with pytest.raises(RecipeError, match="cannot be combined"):
        parse_recipe({"model": {"source": "zoo:digits-dit"}, "stages": [
            {"prune": {"method": "depth", "remove": [1], "recover": {"trainable": ["td_lora", "*"]}}}]})


def test_finetuning_an_adapter_on_a_new_task_lowers_its_heldout_loss():
    from dit_compress.data.tasks import load_task
    from dit_compress.models.load import load_transformer
    from dit_compress.sampling import NoiseSchedule
    from dit_compress.train.finetune import FinetuneConfig, finetune

    teacher = load_transformer("zoo:digits-dit")
    task = load_task("faces")
    assert len(task.heldout_images) == 40 and not any(
        torch.equal(a, b) for a in task.heldout_images[:5] for b in task.train_images)
    res = finetune(teacher.model, teacher.adapter, NoiseSchedule(teacher.scheduler_config), task,
                   FinetuneConfig("td_lora", steps=30, batch_size=32, eval_every=30), progress=False)
    m = res.metrics
    assert m["heldout_loss"] < 0.8 * m["heldout_loss_before"]
    assert m["trainable_fraction"] <= 0.05
    assert m["training_memory"]["saved_activations_mb"] > 0
    assert adapters.adapter_names(res.model) == ["faces"] and not adapters.adapter_names(teacher.model)


def test_cli_trains_samples_and_exports_task_adapters(tmp_path):
    from conftest import save_tiny

    save_tiny("dit", tmp_path / "tiny")
    run = CliRunner()
    res = run.invoke(main_cli(), ["adapter", "train", str(tmp_path / "tiny"), "--task", "faces", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "task 'faces' has images of shape (1, 16, 16)" in res.output
    assert not (tmp_path / "x").exists()
    for task in ("faces", "photos"):
        res = run.invoke(main_cli(), ["adapter", "train", "zoo:digits-dit", "--task", task, "--method",
                                      "td_lora", "--steps", "3", "--batch-size", "4", "-o", str(tmp_path / task)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / task / task / "adapter_model.safetensors").is_file()
        assert (tmp_path / task / "samples.png").is_file()
    loads = ["--load", str(tmp_path / "faces" / "faces"), "--load", str(tmp_path / "photos" / "photos")]
    res = run.invoke(main_cli(), ["adapter", "sample", "zoo:digits-dit", *loads, "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 2 and "choose one with --use" in res.output
    res = run.invoke(main_cli(), ["adapter", "sample", "zoo:digits-dit", *loads, "--use", "photos",
                                  "--sampling-steps", "2", "-n", "3", "-o", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    res = run.invoke(main_cli(), ["adapter", "export", "zoo:digits-dit", *loads, "--use", "faces",
                                  "--bake-steps", "2", "-o", str(tmp_path / "baked")])
    assert res.exit_code == 0, res.output
    schedule = json.loads((tmp_path / "baked" / "schedule.json").read_text())
    assert len(schedule["graphs"]) == 2 and all(g["max_abs_error_vs_td_lora"] <= 1e-4 for g in schedule["graphs"])


def main_cli():
    from dit_compress.cli import main

    return main
