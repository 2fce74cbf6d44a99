"""`ditc sample` writes only what a sound graph computed, and says what it wrote: a graph whose
output is non-finite or not shaped like its input is refused (exit 2, one line, nothing written);
a card that is not pixel-space gets its latents as .npy, and the message names that file alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import tiny_loaded
from dit_compress.cli import main
from dit_compress.export.artifact import card_path, deployment_card


def _graph(tmp_path, name: str, body: list, card: dict):
    """A hand-made 'denoiser' with the tiny DiT's inputs and `body` computing `out` from `sample`."""
    c, h, w = card["latent_shape"]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["N", c, h, w]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["N"]),
              helper.make_tensor_value_info("class_labels", TensorProto.INT64, ["N"])]
    graph = helper.make_graph(body, name, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    card_path(path).write_text(json.dumps({**card, "precision": "fp32"}))
    return path


@pytest.fixture(scope="module")
def card():
    return deployment_card(tiny_loaded("dit"), 2, 1.0)


def _sample(path, tmp_path):
    return CliRunner().invoke(main, ["sample", str(path), "-o", str(tmp_path / "g.png"), "--labels", "1,2"])


def test_non_finite_graph_output_is_refused(card, tmp_path):
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    path = _graph(tmp_path, "nan", [helper.make_node("Constant", [], ["k"], value=nan),
                                    helper.make_node("Mul", ["sample", "k"], ["out"])], card)
    res = _sample(path, tmp_path)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {path}: the graph returned non-finite values (NaN or inf) at timestep 1000; "
                     "nothing written"], res.output
    assert not list(tmp_path.glob("g.*"))


def test_mis_shaped_graph_output_is_refused(card, tmp_path):
    path = _graph(tmp_path, "mean", [helper.make_node("ReduceMean", ["sample"], ["out"], keepdims=1)], card)
    res = _sample(path, tmp_path)
    assert res.exit_code == 2 and "the graph returned shape (1, 1, 1, 1) for a sample of shape (2, 4, 8, 8)" \
        in res.output, res.output
    assert not list(tmp_path.glob("g.*"))


def test_non_pixel_card_says_it_wrote_only_latents(card, tmp_path):
    path = _graph(tmp_path, "identity", [helper.make_node("Identity", ["sample"], ["out"])], card)
    assert not card.get("pixel_space")
    res = _sample(path, tmp_path)
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'g.npy'} (2 samples, latents: the card is not pixel-space" in res.output
    assert "g.png" not in res.output and not (tmp_path / "g.png").exists()
    assert np.load(tmp_path / "g.npy").shape == (2, 4, 8, 8)
