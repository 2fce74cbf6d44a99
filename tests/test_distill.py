"""The distillation engine: it learns, resumes bit-exactly after an interrupt, and stops on NaN."""

from __future__ import annotations

import copy

import pytest
import torch

from test_families import _loaded
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.errors import DistillationDiverged
from dit_compress.stages.prune.stage import remove_blocks_
from dit_compress.train.distill import DistillConfig, Distiller


@pytest.fixture(scope="module")
def setup():
    teacher = _loaded("dit")
    calib = build_calibration(teacher, CalibrationSpec(num_samples=32, sampling_steps=2))
    return teacher, calib


def _student(teacher):
    s = copy.deepcopy(teacher.model)
    remove_blocks_(s, teacher.adapter, [1, 2])
    return s.requires_grad_(True)


def test_distillation_reduces_error(setup, tmp_path):
    teacher, calib = setup
    s = _student(teacher)
    cfg = DistillConfig(steps=40, batch_size=16, lr=3e-3, checkpoint_every=40)
    res = Distiller(teacher.model, s, teacher.adapter, calib, cfg, tmp_path).run()
    first, last = res["history"][0]["output_mse"], res["final_output_mse"]
    assert last < 0.7 * first, f"distillation did not learn: {first} -> {last}"


def test_resume_is_bit_exact(setup, tmp_path, monkeypatch):
    teacher, calib = setup
    cfg = DistillConfig(steps=12, batch_size=8, lr=1e-3, checkpoint_every=4, feature_weight=1.0)
    layer_map = [("transformer_blocks.1", "transformer_blocks.3")]
    full = _student(teacher)
    Distiller(teacher.model, full, teacher.adapter, calib, cfg, tmp_path / "a", layer_map).run()

    interrupted = _student(teacher)
    d = Distiller(teacher.model, interrupted, teacher.adapter, calib, cfg, tmp_path / "b", layer_map)
    real_batch = calib.batch

    def crash_at_9(index, *a, **k):
        if index == 9:
            raise KeyboardInterrupt
        return real_batch(index, *a, **k)

    monkeypatch.setattr(calib, "batch", crash_at_9)
    with pytest.raises(KeyboardInterrupt):
        d.run()
    monkeypatch.setattr(calib, "batch", real_batch)
    resumed = _student(teacher)
    res = Distiller(teacher.model, resumed, teacher.adapter, calib, cfg, tmp_path / "b", layer_map).run()
    assert res["resumed_from"] == 8
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs after resume"


def test_nan_guard_keeps_last_good_checkpoint(setup, tmp_path, monkeypatch):
    teacher, calib = setup
    cfg = DistillConfig(steps=10, batch_size=8, checkpoint_every=3)
    s = _student(teacher)
    real_batch = calib.batch

    def poisoned(index, *a, **k):
        b = real_batch(index, *a, **k)
        if index == 7:
            b.x_t[0, 0, 0, 0] = float("nan")
        return b

    monkeypatch.setattr(calib, "batch", poisoned)
    with pytest.raises(DistillationDiverged, match=r"loss became nan at step 7; last good checkpoint: .* \(step"):
        Distiller(teacher.model, s, teacher.adapter, calib, cfg, tmp_path).run()
    import json
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 6


def test_checkpoint_of_another_structure_is_not_resumed(setup, tmp_path):
    """Same config, same folder, different student (e.g. a PPCL plan changed): start over."""
    teacher, calib = setup
    cfg = DistillConfig(steps=3, batch_size=8, checkpoint_every=1)
    Distiller(teacher.model, _student(teacher), teacher.adapter, calib, cfg, tmp_path).run()
    other = copy.deepcopy(teacher.model)
    remove_blocks_(other, teacher.adapter, [1])
    res = Distiller(teacher.model, other.requires_grad_(True), teacher.adapter, calib, cfg, tmp_path).run()
    assert res["resumed_from"] == 0
    again = Distiller(teacher.model, other, teacher.adapter, calib, cfg, tmp_path).run()
    assert again["resumed_from"] == 3
