"""The parity check catches graphs that compute something else."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from test_families import _loaded
from dit_compress.export.onnx import DenoiserGraph, export_onnx, parity
from dit_compress.models.load import load_transformer


def test_tampered_graph_fails_parity(tmp_path):
    m = _loaded("dit")
    export_onnx(m.model, m.adapter, tmp_path / "ok.onnx")
    graph = onnx.load(str(tmp_path / "ok.onnx"))
    init = max(graph.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    assert parity(tmp_path / "bad.onnx", m.model, m.adapter, 3)["max_abs_error"] > 1e-4


def test_legacy_exporter_error_on_bundled_teacher_is_caught(tmp_path):
    """The TorchScript exporter silently mis-exports this DiT; our check must flag it."""
    teacher = load_transformer("zoo:digits-dit")
    x, t, cond = teacher.adapter.example_inputs(2)
    names = ["sample", "timestep", *cond]
    torch.onnx.export(DenoiserGraph(teacher.model, teacher.adapter, list(cond)), (x, t, *cond.values()),
                      str(tmp_path / "legacy.onnx"), dynamo=False, input_names=names,
                      output_names=["prediction"], dynamic_axes={k: {0: "b"} for k in [*names, "prediction"]})
    legacy = parity(tmp_path / "legacy.onnx", teacher.model, teacher.adapter, 3)
    if legacy["max_abs_error"] <= 1e-4:
        pytest.skip("this torch's legacy exporter is exact for the teacher: nothing to catch")
    assert legacy["max_abs_error"] > 1e-2
    good = export_onnx(teacher.model, teacher.adapter, tmp_path / "dynamo.onnx")
    assert good["parity"]["max_abs_error"] <= 1e-4
