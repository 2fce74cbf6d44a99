"""Deployment: artifact cards, ONNX-only sampling, precision variants, graph optimisation, TensorRT, bench."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny
from test_families import _loaded
from dit_compress.cli import main
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.errors import CheckpointError, DeploymentUnsupported, ExportParityError
from dit_compress.export.artifact import card_path, deployment_card, load_artifact
from dit_compress.export.deploy import derive, variant_path
from dit_compress.export.onnx import export_onnx
from dit_compress.export.quantize import output_head_nodes
from dit_compress.sampling import NoiseSchedule, sample


def _export(family, tmp_path):
    m = _loaded(family)
    path = tmp_path / f"{family}.onnx"
    export_onnx(m.model, m.adapter, path, card=deployment_card(m, steps=4, guidance_scale=2.0))
    return m, path


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_artifact_samples_like_pytorch(family, tmp_path):
    """Same scheduler, guidance and noise: the ONNX-only loop reproduces the PyTorch loop."""
    m, path = _export(family, tmp_path)
    assert not _ops(path) & {"SplitToSequence", "SequenceAt"}, "sequence ops must be rewritten as Split"
    art = load_artifact(path)
    g = torch.Generator().manual_seed(3)
    cond = m.adapter.random_conditions(4, g)
    noise = torch.randn(4, *m.adapter.latent_shape(), generator=g)
    schedule = NoiseSchedule(m.scheduler_config)
    ref = sample(m.model, m.adapter, schedule, cond, noise, 4, 2.0)
    got = sample(art.model, art.adapter, NoiseSchedule(art.scheduler_config), cond, noise, 4, 2.0)
    assert art.adapter.null_conditions(cond).keys() == cond.keys()
    for k, v in m.adapter.null_conditions(cond).items():
        assert torch.equal(art.adapter.null_conditions(cond)[k], v), f"{family}: null condition {k} differs"
    assert (got - ref).abs().max() < 1e-3, f"{family}: ONNX loop drifts from PyTorch"


def test_precision_variants(family, tmp_path):
    m, path = _export(family, tmp_path)
    calib = build_calibration(m, CalibrationSpec(num_samples=32, sampling_steps=2))
    fp16 = derive(path, "fp16", calib)
    assert fp16["parity"]["max_rel_error"] <= 2e-2 and fp16["parity"]["finite"]
    assert {"LayerNormalization", "Softmax"} & fp16["kept_fp32_ops"].keys(), fp16["kept_fp32_ops"]
    dyn = derive(path, "int8-dynamic", calib)
    assert "MatMulInteger" in _ops(dyn["path"]) and dyn["parity"]["finite"]
    static = derive(path, "int8-static", calib)
    assert "QuantizeLinear" in _ops(static["path"]) and static["parity"]["finite"]
    head = output_head_nodes(onnx.load(static["path"]))
    assert head == static["kept_float"], "the output projection stays in float"
    for info in (fp16, dyn, static):
        card = json.loads(card_path(info["path"]).read_text())
        assert card["precision"] == info["kind"] and card["derived_from"] == path.name
        assert info["bytes"] < path.stat().st_size, f"{info['kind']} graph is not smaller than fp32"


def test_bf16_without_kernels_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: bf16 may run here")
    _, path = _export("dit", tmp_path)
    with pytest.raises(DeploymentUnsupported, match="CPUExecutionProvider"):
        derive(path, "bf16")
    assert not variant_path(path, "bf16").exists() and not list(tmp_path.glob(".*partial"))


def test_failed_parity_leaves_no_variant(tmp_path):
    _, path = _export("sd3", tmp_path)
    with pytest.raises(ExportParityError, match="fp16 parity failed"):
        derive(path, "fp16", half_rtol=1e-9)
    assert not variant_path(path, "fp16").exists() and not list(tmp_path.glob(".*partial"))


def test_artifact_errors_name_the_problem(tmp_path):
    _, path = _export("dit", tmp_path)
    card_path(path).unlink()
    with pytest.raises(CheckpointError, match="no card"):
        load_artifact(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_artifact(tmp_path / "missing.onnx")


def test_ditc_export_and_sample_bundled_teacher(tmp_path):
    """`ditc sample` from ONNX reproduces the PyTorch samples of the bundled teacher (fp32: >= 40 dB)."""
    runner = CliRunner()
    onnx_path = tmp_path / "digits.onnx"
    r = runner.invoke(main, ["export", "zoo:digits-dit", "-o", str(onnx_path), "--precision", "int8-dynamic"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["sample", str(onnx_path), "-o", str(tmp_path / "grid.png"), "--labels",
                             "0,1,2,3,4,5,6,7,8,9", "--reference", "zoo:digits-dit"])
    assert r.exit_code == 0, r.output
    psnr = float(re.search(r"PSNR vs the PyTorch path \(zoo:digits-dit; .*\): ([\d.]+) dB", r.output).group(1))
    assert psnr >= 40.0
    assert (tmp_path / "grid.png").is_file() and np.load(tmp_path / "grid.npy").shape == (10, 1, 16, 16)
    int8 = tmp_path / "digits.int8-dynamic.onnx"
    r = runner.invoke(main, ["sample", str(int8), "-o", str(tmp_path / "int8.png"), "-n", "10",
                             "--reference", "zoo:digits-dit"])
    assert r.exit_code == 0, r.output
    int8_psnr = float(re.search(r"([\d.]+) dB", r.output).group(1))
    assert 15.0 < int8_psnr < psnr, "int8 samples should be close to, but not identical with, fp32"
    r = runner.invoke(main, ["sample", str(onnx_path), "-o", str(tmp_path / "x.png"), "--labels", "3,11"])
    assert r.exit_code == 2 and "outside 0..9" in r.output


def test_text_artifact_needs_conditions(tmp_path):
    _, path = _export("pixart", tmp_path)
    r = CliRunner().invoke(main, ["sample", str(path), "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 2 and "--conditions" in r.output
    np.savez(tmp_path / "c.npz", encoder_hidden_states=np.random.randn(2, 8, 32).astype(np.float32))
    r = CliRunner().invoke(main, ["sample", str(path), "-o", str(tmp_path / "s.png"), "--conditions",
                                  str(tmp_path / "c.npz"), "--sampling-steps", "2"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npy").shape[0] == 2 and not (tmp_path / "s.png").exists()  # latents: no picture


def test_graph_optimisation_report(tmp_path):
    from dit_compress.export.onnx import ort_feeds
    from dit_compress.export.optimize import optimization_report

    m, path = _export("dit", tmp_path)
    rep = optimization_report(path, tmp_path / "levels", "dit", ort_feeds(*m.adapter.example_inputs(2)), repeats=3)
    nodes = {r["graph"]: r["nodes"] for r in rep["rows"]}
    assert nodes["ort-basic"] < nodes["ort-disabled"], "constant folding must remove nodes"
    assert all(r["latency"]["median_ms"] > 0 and r["latency_ratio"] > 0 for r in rep["rows"])


def test_bench_table(tmp_path):
    save_tiny("dit", tmp_path / "dense")
    save_tiny("dit", tmp_path / "other", seed=1)
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "dense"), str(tmp_path / "other"), "-o",
                                  str(tmp_path / "b"), "--batches", "1,4", "--thread-counts", "1", "--repeats", "3",
                                  "--precision", "int8-dynamic"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert {(x["model"], x["runtime"]) for x in rows} == {
        (m, rt) for m in ("dense", "compressed") for rt in ("pytorch-fp32", "onnx-fp32", "onnx-int8-dynamic")}
    assert len(rows) == 2 * 3 * 2
    assert all(x["vs_dense"] == 1.0 for x in rows if x["model"] == "dense")
    assert all(x["vs_onnx_fp32"] is not None for x in rows if x["runtime"].startswith("onnx"))
    assert "| compressed | onnx-int8-dynamic |" in r.output


def test_tensorrt_skip_is_explained():
    from dit_compress.export.tensorrt import unavailable_reason

    reason = unavailable_reason()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and torch.cuda.is_available():
        assert reason is None
    else:
        assert reason and ("TensorRT is not installed" in reason or "no CUDA device" in reason)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnx_runtime(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dit_compress.export.artifact import OnnxAdapter
    from dit_compress.evaluate.judge import tensorrt_section

    _, path = _export("dit", tmp_path)
    info = tensorrt_section(path, OnnxAdapter(json.loads(card_path(path).read_text())), batch=4, repeats=10)
    assert "skipped" not in info, info
    assert info["max_rel_error_vs_onnx"] < 2e-2 and info["latency"]["median_ms"] > 0


def test_duplicate_casts_from_the_fp16_converter_are_dropped():
    """ONNX Runtime 1.30's converter inserts one Cast twice when Sin and Cos read the same half
    tensor; the repaired graph defines each output once and loads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from dit_compress.export.precision import drop_duplicate_nodes

    cast = helper.make_node("Cast", ["h"], ["h32"], name="h_cast_to_fp32_node", to=TensorProto.FLOAT)
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), cast, cast,
             helper.make_node("Sin", ["h32"], ["s"]), helper.make_node("Cos", ["h32"], ["c"]),
             helper.make_node("Add", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Exception):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert drop_duplicate_nodes(model) == 1 and drop_duplicate_nodes(model) == 0
    onnx.checker.check_model(model)
    x = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(y, np.sin(x) + np.cos(x), atol=1e-3)
