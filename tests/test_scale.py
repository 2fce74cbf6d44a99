"""Memory-lean handling: boundary states streamed through disk, sharded calibration cache,
checkpoints restored on the meta device."""

from __future__ import annotations

import torch

from conftest import LATENT, tiny_model
from dit_compress.data import calibration
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.models.families import get_adapter
from dit_compress.models.load import LoadedModel
from dit_compress.probes import boundaries
from dit_compress.probes.boundaries import boundary_states
from dit_compress.probes.redundancy import cka_matrix, linear_cka
from dit_compress.sampling import DEFAULT_SCHEDULER


def _teacher(family="sd3"):
    model = tiny_model(family)
    return LoadedModel(model, get_adapter(model, LATENT), dict(DEFAULT_SCHEDULER), f"tiny:{family}")


def test_streamed_boundary_states_are_the_seeded_sample_of_all_states(tmp_path, monkeypatch):
    teacher = _teacher()
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=1))
    args = (teacher.model, teacher.adapter, calib, 3, 8)
    monkeypatch.setattr(boundaries, "FORWARD_TOKENS", 40)  # 16 tokens per sample: chunks of 2 samples
    full = boundary_states(*args, max_tokens=None)
    streamed = boundary_states(*args, max_tokens=100, folder=tmp_path / "states")
    assert len(list((tmp_path / "states").glob("batch-*.safetensors"))) == 3
    total = len(full[0])
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:100]
    for i in range(len(full)):
        assert torch.equal(streamed[i], full[i][keep]), f"boundary {i}"
    assert len(streamed._cache) <= 2, "the analysis holds at most two boundaries"


def test_cka_matrix_equals_pairwise_cka():
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(200, 12, generator=g) @ torch.randn(12, 12, generator=g) for _ in range(4)]
    m = cka_matrix(h)
    for i in range(4):
        for j in range(4):
            assert abs(m[i][j] - (1.0 if i == j else linear_cka(h[i], h[j]))) < 1e-5


def test_calibration_shards_resume_to_the_same_pool(tmp_path, monkeypatch):
    teacher = _teacher("dit")
    spec = CalibrationSpec(num_samples=10, sampling_steps=2)
    monkeypatch.setattr(calibration, "SHARD_TOKENS", 16 * 4)  # 16 tokens per sample: shards of 4 samples
    first = build_calibration(teacher, spec, tmp_path)
    shards = sorted(tmp_path.glob("calibration-*/shard-*.safetensors"))
    assert len(shards) == 3
    shards[1].unlink()  # an interrupted calibration: the next run samples only what is missing
    resumed = build_calibration(teacher, spec, tmp_path)
    assert torch.equal(first.x0, resumed.x0)
    assert all(torch.equal(first.cond[k], resumed.cond[k]) for k in first.cond)
    monkeypatch.setattr(calibration, "SHARD_TOKENS", 65536)
    whole = build_calibration(teacher, spec)  # one chunk, no cache
    assert torch.allclose(first.x0, whole.x0, atol=1e-5)  # only float reduction order differs
