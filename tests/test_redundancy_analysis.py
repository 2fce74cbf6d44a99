"""PPCL's redundancy analysis: CKA and probe properties, interval finding, progress, and the CLI."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from conftest import LATENT, save_tiny, tiny_model
from dit_compress.cli import main
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.models.families import get_adapter
from dit_compress.models.load import LoadedModel
from dit_compress.probes.boundaries import block_influence
from dit_compress.probes.redundancy import analyse_redundancy, find_intervals, linear_cka, probe_r2
from dit_compress.sampling import DEFAULT_SCHEDULER


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert abs(linear_cka(x, x) - 1) < 1e-6
    assert abs(linear_cka(x, 3.0 * x @ q + 1.0) - 1) < 1e-5, "CKA must ignore rotation, scale and shift"
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.2


def test_probe_r2_finds_linear_maps_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 12, generator=g)
    w = torch.randn(12, 8, generator=g)
    assert probe_r2(x, x @ w + 0.5) > 0.999
    assert probe_r2(x, torch.randn(800, 8, generator=g)) < 0.05
    assert probe_r2(x, torch.sin(3 * x[:, :8])) < 0.5


def test_find_intervals_are_flat_high_runs_of_removable_blocks():
    sim = [0.5, 0.9, 0.91, 0.92, 0.4, 0.95, 0.96, 0.6]  # median 0.905
    assert find_intervals(sim, [True] * 8, flat=0.05) == [[2, 3], [5, 6]]
    assert find_intervals(sim, [True, True, True, False, True, True, True, True], flat=0.05) == [[2], [5, 6]]
    # a steep step inside a high region splits it: the trend is not flat there
    assert find_intervals([0.9, 0.99, 0.91, 0.2], [True] * 4, flat=0.05) == [[1], [2]]


def test_analyse_only_cli(tmp_path):
    save_tiny("dit", tmp_path / "m")
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "m"), "--analyse-only", "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "a" / "analysis.json").read_text())
    n = len(a["block_names"])
    assert len(a["cka"]) == len(a["cosine"]) == len(a["probe_r2"]) == n and len(a["trend"]) == n - 1
    assert len(a["cka_matrix"]) == n + 1 and all(abs(a["cka_matrix"][i][i] - 1) < 1e-9 for i in range(n + 1))
    assert a["removable"][0] is False, "DiT's block 0 is protected"
    assert all(0 not in iv["blocks"] for iv in a["intervals"])
    assert (tmp_path / "a" / "analysis.png").stat().st_size > 10_000
    assert not (tmp_path / "a" / "checkpoint").exists(), "--analyse-only prunes nothing"


def test_probes_say_what_they_probe(capfd):
    """The analysis shows progress, each bar naming its probe (it ran ~67 silent seconds)."""
    model = tiny_model("dit")
    teacher = LoadedModel(model, get_adapter(model, LATENT), dict(DEFAULT_SCHEDULER), "tiny:dit", latent_size=LATENT)
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2))
    capfd.readouterr()
    analyse_redundancy(model, teacher.adapter, calib, batches=2, batch_size=4)
    block_influence(model, teacher.adapter, calib, batches=2, batch_size=4)
    err = capfd.readouterr().err
    for probe in ("block boundary states", "block similarity and linear probes", "CKA between block boundaries",
                  "block influence"):
        assert f"probe: {probe}" in err
