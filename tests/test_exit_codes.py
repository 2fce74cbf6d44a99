"""The exit codes a CI job reads: 0 done, 1 gate failed, 2 bad input, 3 internal error, 130
interrupted; each failure is one `error:` line, with the traceback only under `--debug`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import dit_compress.evaluate.gate as gate
from dit_compress.cli import main

REPORT = {"quality": {"psnr_db": 20.0}, "recipe": {"gate": [{"metric": "quality.psnr_db", "min": 10}]}}


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.strip()]


@pytest.fixture
def report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    return path


def _crash(*args, **kwargs):
    try:
        raise ValueError("the root cause")
    except ValueError as e:
        raise RuntimeError("boom\nsecond line") from e


def test_internal_error_is_one_line_and_debug_shows_the_chain(report, monkeypatch):
    monkeypatch.setattr(gate, "check_gate", _crash)
    res = _cli("check", report)
    assert res.exit_code == 3, res.output
    assert _lines(res) == ["error: internal error: RuntimeError: boom (run `ditc --debug ...` for the traceback)"]
    res = _cli("--debug", "check", report)
    assert res.exit_code == 3, res.output
    assert "Traceback (most recent call last)" in res.output and "ValueError: the root cause" in res.output
    assert "direct cause of the following exception" in res.output and "RuntimeError: boom" in res.output
    assert _lines(res)[-1] == "error: internal error: RuntimeError: boom"


def test_zoo_train_goes_through_the_same_handling(monkeypatch):
    import dit_compress.train.zoo as zoo

    monkeypatch.setattr(zoo, "train_zoo", _crash)
    res = _cli("zoo-train", "--steps", "1")
    assert res.exit_code == 3 and len(_lines(res)) == 1 and "Traceback" not in res.output, res.output
    assert _cli("zoo-train", "--only", "nope").exit_code == 2  # click's usage error


def test_interrupt_exits_130_without_traceback(report, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gate, "check_gate", interrupt)
    res = _cli("check", report)
    assert res.exit_code == 130 and _lines(res) == ["error: interrupted"], res.output


def test_gate_failure_bad_input_and_usage_errors(report, tmp_path):
    assert _cli("check", report).exit_code == 0
    strict = tmp_path / "gate.yaml"
    strict.write_text("gate: [{metric: quality.psnr_db, min: 30}]")
    res = _cli("check", report, "--gate", strict)
    assert res.exit_code == 1 and "gate failed: quality.psnr_db" in res.output, res.output
    report.write_text("[1, 2]")
    res = _cli("check", report)
    assert res.exit_code == 2 and _lines(res) == [f"error: {report}: not a report (expected a JSON object)"]
    res = _cli("--debug", "check", report)  # a bad-input error under --debug: its traceback, then its line
    assert res.exit_code == 2 and "Traceback" in res.output and _lines(res)[-1].startswith("error: "), res.output
    assert _cli("check", report, "--no-such-option").exit_code == 2
    assert _cli("no-such-command").exit_code == 2


def test_run_summary_names_prompt_adherence_for_pipeline_teachers():
    # A pipeline teacher's report has adherence and FD but no class accuracy: the summary line must
    # say what it has (it raised KeyError on 'guided_accuracy_teacher' after a finished run).
    from dit_compress.cli import _figures

    report = {"quality": {"psnr_db": 30.0, "fd_ratio": 1.5,
                          "adherence": {"all": {"teacher": 0.68, "student": 0.39}}},
              "cost": {"param_ratio": 0.66, "macs_ratio": 0.5}}
    assert "prompt adherence 0.680 -> 0.390" in _figures(report) and "guided acc" not in _figures(report)
