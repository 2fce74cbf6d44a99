"""The evaluator on a text-to-image pipeline teacher: prompts through its encoders, images through its
VAE, digit-scene adherence of teacher and student, and the report's pictures and table."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dit_compress.core.recipe import EvaluationSpec
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.data.scenes import HELDOUT_PROMPTS, scene_split
from dit_compress.errors import RecipeError
from dit_compress.evaluate import prompted
from dit_compress.evaluate.evaluator import Evaluator
from dit_compress.evaluate.report import save_grid, write_markdown
from dit_compress.models.load import load_transformer
from dit_compress.train.scenes_pipeline import ScenesFluxConfig, build_pipeline, save_pipeline

TINY = ScenesFluxConfig.tiny()
EVAL_PROMPTS = [text for _, text in HELDOUT_PROMPTS[:6]]
SPEC = dict(num_samples=10, seeds=[0, 1], compare_samples=4, sampling_steps=2, denoiser_samples=8,
            timestep_bands=2, latency_batch=2, latency_repeats=3)


def _pipeline_folder(folder, adherence: bool = True):
    """A tiny FluxPipeline folder with a card like zoo:scenes-flux's (2 sampling steps)."""
    save_pipeline(build_pipeline(TINY, seed=0), folder)
    (folder / "prompts.txt").write_text("# calibration\n" + "\n".join(sorted(set(scene_split("train", 8).captions))))
    card = {"sampling": {"steps": 2, "guidance_scale": 2.0, "negative_prompt": "",
                         "max_sequence_length": TINY.t5_max_length},
            "latent_size": TINY.latent_size, "prompts": "prompts.txt"}
    if adherence:
        (folder / "eval_prompts.txt").write_text("# held out\n" + "\n".join(EVAL_PROMPTS) + "\n")
        card.update(classifier="scenes-classifier", adherence="digit-scenes", eval_prompts="eval_prompts.txt")
    (folder / "ditc_zoo.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = load_transformer(str(_pipeline_folder(tmp_path_factory.mktemp("tiny-flux"))))
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2))
    return teacher, calib


def _perturbed(teacher):
    model = copy.deepcopy(teacher.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.proj_out.weight.add_(0.5 * torch.randn(model.proj_out.weight.shape, generator=g))
    return teacher.with_model(model)


def test_pipeline_teacher_is_evaluated_on_prompts_with_adherence(setup, monkeypatch, tmp_path):
    teacher, calib = setup
    assert teacher.pipeline is not None and calib.prompts is not None
    calls = []
    real = prompted.sample_batched
    monkeypatch.setattr(prompted, "sample_batched", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    ev = Evaluator(teacher, calib, EvaluationSpec(**SPEC))
    assert ev.classifier is None and ev.prompted.prompts == EVAL_PROMPTS  # the card's evaluation set

    same, pictures = ev.quality(teacher, "itself")
    teacher_runs = [c for c in calls if c.startswith("sampling teacher")]
    assert len(teacher_runs) == 2  # one per seed, shared by PSNR and adherence
    assert same["psnr_db"] == 100.0 and same["ssim"] == pytest.approx(1.0) and same["outputs_finite"]
    a = same["adherence"]
    assert a["prompts"] == 6 and a["seeds"] == [0, 1]
    for key in ("digit", "size", "colour", "position", "background", "all"):
        row = a[key]
        assert set(row) == {"teacher", "teacher_stderr", "student", "student_stderr", "drop", "drop_stderr"}
        assert row["teacher"] == row["student"] and row["drop"] == 0 and 0 <= row["teacher"] <= 1
    assert same["adherence_drop"] == 0 and same["fd_ratio"] == 1.0 and same["fd_teacher"] == same["fd_student"]
    assert pictures["prompts"] == EVAL_PROMPTS and pictures["teacher"].shape == (6, 3, 32, 32)
    assert -1 <= pictures["teacher"].min() and pictures["teacher"].max() <= 1

    calls.clear()
    student = _perturbed(teacher)
    q, pictures = ev.quality(student, "student")
    assert not any(c.startswith("sampling teacher") for c in calls)  # the teacher's results are cached
    assert q["adherence"]["all"]["teacher"] == a["all"]["teacher"] and q["fd_teacher"] == same["fd_teacher"]
    assert q["psnr_db"] < 40 and q["ssim"] < 0.99 and q["fd_student"] != q["fd_teacher"]
    assert q["denoiser_relative_error"] > 0.01
    drops = [q["adherence"][k]["drop"] for k in ("digit", "size", "colour", "position", "background", "all")]
    assert drops == [round(q["adherence"][k]["teacher"] - q["adherence"][k]["student"], 4)
                     for k in ("digit", "size", "colour", "position", "background", "all")]

    # Cost measures on the calibration's encoded prompts, as for any teacher.
    c = ev.cost(student, None, None, None)
    assert c["param_ratio"] == 1.0 and c["teacher"]["macs_per_sample"] > 0

    save_grid(tmp_path / "samples.png", pictures["teacher"], pictures["student"], pictures["labels"],
              prompts=pictures["prompts"])
    assert (tmp_path / "samples.png").stat().st_size > 1000
    report = {"recipe": {"name": "tiny"}, "teacher": "tiny", "recipe_hash": "h", "version": "0", "quality": q,
              "cost": c}
    write_markdown(tmp_path / "report.md", report)
    md = (tmp_path / "report.md").read_text()
    assert "| attribute | teacher | student | drop |" in md
    assert f"| all | {q['adherence']['all']['teacher']:.4g}" in md


def test_without_a_card_set_the_calibration_prompts_are_evaluated(tmp_path):
    teacher = load_transformer(str(_pipeline_folder(tmp_path / "plain", adherence=False)))
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2))
    ev = Evaluator(teacher, calib, EvaluationSpec(**SPEC))
    assert ev.prompted.prompts == list(dict.fromkeys(calib.prompts))
    q, pictures = ev.quality(_perturbed(teacher))
    assert "adherence" not in q and "fd_ratio" not in q and 0 < q["psnr_db"] < 100
    assert pictures["prompts"] == ev.prompted.prompts_for(4) and pictures["student"].shape[0] == 4


def test_evaluation_prompts_are_validated(setup, tmp_path):
    teacher, calib = setup
    bad = tmp_path / "bad.txt"
    bad.write_text(EVAL_PROMPTS[0] + "\na photo of a cat\n")
    with pytest.raises(RecipeError, match="prompt 2 .* not a digit-scene caption"):
        Evaluator(teacher, calib, EvaluationSpec(**SPEC, prompts=str(bad)))
    with pytest.raises(RecipeError, match="cannot read prompt file"):
        Evaluator(teacher, calib, EvaluationSpec(**SPEC, prompts=str(tmp_path / "missing.txt")))
    custom = tmp_path / "custom.txt"
    custom.write_text("\n".join(EVAL_PROMPTS[2:4]))
    assert Evaluator(teacher, calib, EvaluationSpec(**SPEC, prompts=str(custom))).prompted.prompts == EVAL_PROMPTS[2:4]


def test_evaluation_prompts_need_a_pipeline(tmp_path):
    from conftest import save_tiny

    save_tiny("flux", tmp_path)
    teacher = load_transformer(str(tmp_path))
    assert teacher.pipeline is None
    (tmp_path / "p.txt").write_text("a prompt\n")
    with pytest.raises(RecipeError, match="not a pipeline folder"):
        Evaluator(teacher, None, EvaluationSpec(prompts=str(tmp_path / "p.txt")))
    assert Evaluator(teacher, None, EvaluationSpec()).prompted is None
