"""End to end on a tiny local DiT: recipe -> prune + recover -> checkpoint, ONNX, report, gate."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import TINY_RUN, save_tiny
from dit_compress.cli import main
from dit_compress.core.manifest import load_compressed
from dit_compress.models.load import load_transformer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    save_tiny("dit", tmp / "teacher")
    recipe = {
        "name": "tiny",
        "model": {"source": str(tmp / "teacher")},
        "calibration": {"num_samples": 16, "sampling_steps": 2},
        "stages": [{"prune": {"method": "depth", "remove": [1, 2], "recover": {"steps": 4, "batch_size": 8, "feature_weight": 1.0}}}],
        "evaluation": {"num_samples": 10, "seeds": [0], "compare_samples": 4, "sampling_steps": 2,
                       "denoiser_samples": 8, "timestep_bands": 2, "latency_batch": 2, "latency_repeats": 3},
        # Deliberately impossible: the run must finish, write its report, and exit 1.
        "gate": [{"metric": "quality.psnr_db", "min": 200.0}, {"metric": "cost.param_ratio", "max": 0.9},
                 {"metric": "deployment.int8-dynamic.quality.psnr_db", "min": 5.0}],
        "export": {"precisions": ["fp16", "bf16", "int8-dynamic"], "optimize": True, "tensorrt": True},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp / "out")])
    return tmp, path, res


def test_run_writes_every_artifact_and_fails_gate(run_dir):
    tmp, _, res = run_dir
    assert res.exit_code == 1, res.output
    assert "gate failed: quality.psnr_db" in res.output and "violates min 200" in res.output
    out = tmp / "out"
    for f in ("report.json", "report.md", "samples.png", "curves.png", "onnx/student.onnx",
              "checkpoint/manifest.json", "checkpoint/model.safetensors", "checkpoint/diffusers/config.json"):
        assert (out / f).is_file(), f"missing {f}"
    report = json.loads((out / "report.json").read_text())
    assert report["gate"]["passed"] is False
    assert [r["ok"] for r in report["gate"]["rules"]] == [False, True, True]
    assert report["export"]["parity"]["max_abs_error"] <= 1e-4
    assert report["quality"]["outputs_finite"]
    assert 0.4 < report["cost"]["param_ratio"] < 0.9
    assert report["stages"][0]["plan"]["removed"] == [1, 2]
    phases = report["phases"]  # time and peak memory of each phase, in the report
    for name in ("calibration", "stage 0 prune: plan", "stage 0 prune: build", "stage 0 prune: recover", "ONNX export + parity",
                 "evaluation", "deployment variants"):
        assert phases[name]["seconds"] >= 0 and phases[name]["peak_rss_gb"] > 0.1, name
    recovery = report["stages"][0]["recovery"]
    assert recovery["processes"] == 1 and recovery["samples_per_second"] > 0
    assert recovery["tokens_per_second"] == pytest.approx(recovery["samples_per_second"] * 16, rel=0.01)
    assert "## Run: time and memory" in (out / "report.md").read_text()


def test_deployment_variants_are_judged(run_dir):
    """Each precision is sampled and scored like the student, and timed against fp32 in the same run."""
    tmp, _, _ = run_dir
    out = tmp / "out"
    d = json.loads((out / "report.json").read_text())["deployment"]
    for kind in ("fp16", "int8-dynamic"):
        assert (out / "onnx" / f"student.{kind}.onnx").is_file() and (out / "onnx" / f"student.{kind}.json").is_file()
        assert d[kind]["quality"]["outputs_finite"] and d[kind]["quality"]["psnr_db"] > 5
        assert d[kind]["latency_ratio_vs_fp32"] > 0 and d[kind]["size_ratio_vs_fp32"] < 1
    if not torch.cuda.is_available():
        assert "CPUExecutionProvider" in d["bf16"]["skipped"]
    assert [r["graph"].split(" ")[0] for r in d["graph_optimisation"]["rows"]] == [
        "ort-disabled", "ort-basic", "ort-extended", "ort-all", "transformer-fused"]
    assert "skipped" in d["tensorrt"] or d["tensorrt"]["latency"]["median_ms"] > 0
    md = (out / "report.md").read_text()
    assert "## Deployment artifacts" in md and "| int8-dynamic |" in md and "### TensorRT" in md


def test_checkpoint_restores_and_loads_with_plain_diffusers(run_dir):
    from diffusers import DiTTransformer2DModel

    tmp, _, _ = run_dir
    restored = load_compressed(tmp / "out" / "checkpoint")
    plain = DiTTransformer2DModel.from_pretrained(tmp / "out" / "checkpoint" / "diffusers").eval()
    assert plain.config.num_layers == 2
    x, t, cond = restored.adapter.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(restored.adapter.denoise(restored.model, x, t, cond),
                           restored.adapter.denoise(plain, x, t, cond))
    teacher = load_transformer(str(tmp / "teacher"))
    with torch.no_grad():
        assert not torch.equal(teacher.adapter.denoise(teacher.model, x, t, cond),
                               restored.adapter.denoise(restored.model, x, t, cond))


def test_rerun_resumes_finished_stage(run_dir):
    tmp, path, _ = run_dir
    before = (tmp / "out" / "checkpoint" / "model.safetensors").read_bytes()
    res = CliRunner().invoke(main, ["-v", "run", str(path), "-o", str(tmp / "out")])
    assert res.exit_code == 1
    assert (tmp / "out" / "checkpoint" / "model.safetensors").read_bytes() == before


def test_eval_checkpoint_with_its_recipe(run_dir):
    tmp, _, _ = run_dir
    res = CliRunner().invoke(main, ["eval", str(tmp / "out" / "checkpoint"), "-o", str(tmp / "eval"),
                                    "--set", "gate.0.min=0"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp / "eval" / "report.json").read_text())
    first = json.loads((tmp / "out" / "report.json").read_text())
    assert report["gate"]["passed"]
    assert report["quality"]["psnr_db"] == first["quality"]["psnr_db"], "same seeds must give the same figures"


def test_distill_continues_from_checkpoint(run_dir):
    tmp, _, _ = run_dir
    res = CliRunner().invoke(main, ["distill", str(tmp / "out" / "checkpoint"), "--steps", "3",
                                    "--feature-weight", "1.0", "-o", str(tmp / "more")])
    assert res.exit_code == 0, res.output
    a, b = load_compressed(tmp / "out" / "checkpoint"), load_compressed(tmp / "more")
    x, t, cond = a.adapter.example_inputs(2)
    with torch.no_grad():
        ya, yb = a.adapter.denoise(a.model, x, t, cond), b.adapter.denoise(b.model, x, t, cond)
    assert torch.isfinite(yb).all() and not torch.equal(ya, yb)
    assert json.loads((tmp / "more" / "manifest.json").read_text())["recipe"]["name"] == "tiny"


def test_ditc_prune_one_off(run_dir, tmp_path):
    tmp, _, _ = run_dir
    res = CliRunner().invoke(main, ["prune", str(tmp / "teacher"), "--method", "depth", "--remove", "2,3",
                                    "--steps", "3", "-o", str(tmp_path / "p"), *TINY_RUN])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "p" / "checkpoint" / "manifest.json").read_text())
    assert manifest["stages"][0]["plan"]["removed"] == [2, 3]
    assert (tmp_path / "p" / "onnx" / "student.onnx").is_file()


def test_ditc_prune_ppcl_writes_every_size_of_one_run_and_plugs_any(run_dir, tmp_path):
    tmp, _, _ = run_dir
    out = tmp_path / "ppcl"
    res = CliRunner().invoke(main, ["prune", str(tmp / "teacher"), "--ratio", "0.5", "--ratios", "0.25",
                                    "--set", "stages.0.prune.intervals=[[0,1],[2,3]]",
                                    "--steps", "3", "-o", str(out), *TINY_RUN])
    assert res.exit_code == 0, res.output
    assert "variant ratio-0.25" in res.output
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["recovery"]["steps"] == 3, "PPCL trains inside the stage, once"
    assert len(stage["plan"]["removed"]) == 2 and stage["summary"]["interval_costs"]
    variant = report["variants"]["ratio-0.25"]
    assert len(variant["stage"]["removed"]) == 1
    assert variant["export"]["parity"]["max_abs_error"] <= 1e-4
    assert variant["cost"]["param_ratio"] > report["cost"]["param_ratio"]
    for f in ("variants/ratio-0.25/manifest.json", "onnx/ratio-0.25.onnx", stage["pictures"]["analysis"],
              stage["pictures"]["search"]):
        assert (out / f).is_file(), f"missing {f}"
    assert "## Variants of the same run" in (out / "report.md").read_text()
    restored = load_compressed(out / "variants" / "ratio-0.25")
    assert len(restored.model.transformer_blocks) == 3

    # Pluggable: the main checkpoint and its teacher hold every size.
    from dit_compress import load_transformer, plug

    ckpt, x = out / "checkpoint", restored.adapter.example_inputs(2, seed=3)
    teacher = load_transformer(str(tmp / "teacher"))
    with torch.no_grad():
        none = plug(ckpt, [])
        assert torch.equal(none.adapter.denoise(none.model, *x), teacher.adapter.denoise(teacher.model, *x))
        one = plug(ckpt, variant["stage"]["plugged"])
        assert torch.equal(one.adapter.denoise(one.model, *x), restored.adapter.denoise(restored.model, *x))
    res = CliRunner().invoke(main, ["export", str(ckpt), "--plug", variant["stage"]["plugged"][0],
                                    "-o", str(tmp_path / "plugged.onnx")])
    assert res.exit_code == 0 and "parity" in res.output, res.output
    bad = CliRunner().invoke(main, ["export", str(ckpt), "--plug", "1-3", "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "not an interval this run trained" in bad.output, bad.output
    bad = CliRunner().invoke(main, ["export", str(out / "variants" / "ratio-0.25"), "--plug",
                                    stage["plan"]["plugged"][-1] if stage["plan"]["plugged"][-1] not in
                                    variant["stage"]["plugged"] else stage["plan"]["plugged"][0],
                                    "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "plug" in bad.output, bad.output
