"""The quality gate: violated bounds give a non-zero exit and say which metric and by how much."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from dit_compress.cli import main
from dit_compress.evaluate.gate import check_gate, describe_failures

REPORT = {"quality": {"fd_ratio": 1.4, "psnr_db": 22.0}, "cost": {"param_ratio": 0.5},
          "recipe": {"gate": [{"metric": "quality.fd_ratio", "max": 2.0}]}}


def test_check_gate_rules():
    g = check_gate(REPORT, [{"metric": "quality.fd_ratio", "max": 1.2}, {"metric": "quality.psnr_db", "min": 20}])
    assert not g["passed"]
    bad = [r for r in g["rules"] if not r["ok"]]
    assert len(bad) == 1 and bad[0]["metric"] == "quality.fd_ratio" and abs(bad[0]["by"] - 0.2) < 1e-9
    missing = check_gate(REPORT, [{"metric": "quality.nope", "min": 0}])
    assert not missing["passed"] and missing["rules"][0]["value"] is None


def test_ditc_check_exit_codes(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(path)])
    assert ok.exit_code == 0, ok.output
    strict = tmp_path / "gate.yaml"
    strict.write_text(yaml.safe_dump({"gate": [{"metric": "quality.fd_ratio", "max": 1.1}]}))
    bad = runner.invoke(main, ["check", str(path), "--gate", str(strict)])
    assert bad.exit_code == 1
    assert "quality.fd_ratio = 1.4 violates max 1.1 (by 0.3)" in bad.output


def test_gate_reaches_into_lists():
    report = {"stages": [{"metadata": {"activation": {"ffn_activated_ratio": 0.38}}}]}
    g = check_gate(report, [{"metric": "stages.0.metadata.activation.ffn_activated_ratio", "max": 0.4},
                            {"metric": "stages.1.metadata.x", "max": 1}])
    assert [r["ok"] for r in g["rules"]] == [True, False] and g["rules"][1]["value"] is None


def test_non_finite_metrics_fail_every_rule():
    # -inf satisfies any `max` and +inf any `min` arithmetically; NaN compares false both ways:
    # a diverged metric must fail its rule, not pass it.
    rules = [{"metric": "quality.fd_ratio", "max": 1.5}, {"metric": "quality.psnr_db", "min": 12.0},
             {"metric": "quality.ssim", "min": 0.5}]
    report = {"quality": {"fd_ratio": float("-inf"), "psnr_db": float("inf"), "ssim": float("nan")}}
    gate = check_gate(report, rules)
    assert not gate["passed"] and not any(r["ok"] for r in gate["rules"])
    assert all("not a finite number" in line for line in describe_failures(gate))
