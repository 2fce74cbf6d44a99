"""`ditc sample --prompt`: text encoders -> exported ONNX transformer -> VAE, against the PyTorch path.

A tiny FluxPipeline folder (a plain diffusers folder: no zoo card, so FluxPipeline's default prompt
length of 512 applies) is the teacher; a compressed checkpoint of it with no stages carries its
pipeline/, and its transformer is exported beside it as a run lays them out (checkpoint/, onnx/)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dit_compress.cli import main
from dit_compress.core.manifest import base_reference, load_compressed, save_compressed
from dit_compress.evaluate.sample_prompts import CAPTION_BAND, GAP, LABEL_W, wrap_caption
from dit_compress.export.artifact import deployment_card, load_artifact
from dit_compress.export.onnx import export_onnx
from dit_compress.models.load import load_transformer
from dit_compress.train.scenes_pipeline import ScenesFluxConfig, build_pipeline, save_pipeline

TINY = ScenesFluxConfig.tiny()
PROMPTS = ["a large blue three at the centre on a black background", "a small red seven at the top left"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-sample")
    folder = root / "tiny-flux"
    save_pipeline(build_pipeline(TINY, seed=0), folder)
    teacher = load_transformer(str(folder), latent_size=TINY.latent_size)
    ckpt = save_compressed(root / "out" / "checkpoint", teacher.model, base_reference(
        teacher, {"source": str(folder), "latent_size": TINY.latent_size}), [], pipeline=teacher.pipeline)
    student = load_compressed(ckpt)
    onnx_path = root / "out" / "onnx" / "student.onnx"
    # As core.pipeline.export_and_report's to_onnx does.
    export_onnx(student.model, student.adapter, onnx_path, 2, None, 1e-4, deployment_card(student, 3, 3.0))
    return {"folder": folder, "ckpt": ckpt, "onnx": onnx_path, "root": root}


def _sample(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def _error(r) -> str:
    """The one `error:` line of a failed command (exit 2, no traceback); progress bars of the
    pipeline's loading may come before it."""
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def test_prompts_end_to_end_match_the_pytorch_pipeline(run, tmp_path):
    card = json.loads(run["onnx"].with_suffix(".json").read_text())
    # Traced at the pipeline's prompt length, so encoded prompts fit the graph's static text axis.
    assert card["conditions"]["encoder_hidden_states"]["shape"] == [512, 16]
    assert card["pipeline"]["folder"] == str((run["ckpt"] / "pipeline").resolve())
    out = tmp_path / "grid.png"
    r = _sample(run["onnx"], "-o", out, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--reference", run["ckpt"])
    assert r.exit_code == 0, r.output
    assert f"text encoders and VAE of {(run['ckpt'] / 'pipeline').resolve()}" in r.output
    psnr = float(re.search(r"PSNR vs the PyTorch path .*: ([\d.]+) dB", r.output).group(1))
    assert psnr > 40.0
    images = np.load(tmp_path / "grid.npy")
    assert images.shape == (2, 3, 32, 32) and np.abs(images[0] - images[1]).max() > 0.05  # prompts matter
    grid = np.asarray(Image.open(out))
    cell = 128 + GAP  # 32x32 images shown at 4x
    assert grid.shape == (2 * cell + CAPTION_BAND, LABEL_W + 2 * cell, 3)  # ONNX row, PyTorch row, prompts
    assert grid[2 * cell:, LABEL_W:].max() > 200 and grid[:2 * cell, :LABEL_W].max() > 200  # text drawn


def test_prompt_file_explicit_pipeline_and_run_layout(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two scenes\n" + "\n".join(PROMPTS) + "\n\na green one\n")
    r = _sample(run["onnx"], "-o", tmp_path / "a.png", "--prompts", prompts, "--pipeline", run["folder"],
                "--sampling-steps", "2", "--guidance", "1")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "a.png").size == (3 * (128 + GAP), 128 + GAP + CAPTION_BAND)
    # A card that records no pipeline: the run's checkpoint/ beside onnx/ supplies it.
    card_path = run["onnx"].with_suffix(".json")
    card = json.loads(card_path.read_text())
    moved = run["root"] / "out" / "onnx" / "bare.onnx"
    shutil.copy(run["onnx"], moved)
    moved.with_suffix(".json").write_text(json.dumps({**{k: v for k, v in card.items() if k != "pipeline"},
                                                      "source": "elsewhere"}))
    r = _sample(moved, "-o", tmp_path / "b.png", "--prompt", PROMPTS[0], "--sampling-steps", "2")
    assert r.exit_code == 0, r.output
    assert f"VAE of {run['ckpt'] / 'pipeline'}" in r.output
    # ... and away from the run, there is none to find.
    alone = tmp_path / "alone" / "x" / "bare.onnx"
    alone.parent.mkdir(parents=True)
    shutil.copy(moved, alone)
    shutil.copy(moved.with_suffix(".json"), alone.with_suffix(".json"))
    r = _sample(alone, "-o", tmp_path / "c.png", "--prompt", PROMPTS[0])
    assert "pass --pipeline FOLDER" in _error(r)


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    out = tmp_path / "x.png"
    r = _sample(run["onnx"], "-o", out, "--prompt", "a red one", "--pipeline", tmp_path)
    assert "not a diffusers pipeline folder" in _error(r)
    # Another pipeline's text encoders (width 64, not 16) do not give what the graph takes.
    r = _sample(run["onnx"], "-o", out, "--prompt", "a red one", "--pipeline", "zoo:scenes-flux")
    line = _error(r)
    assert "takes encoder_hidden_states float32[512, 16]" in line and "give encoder_hidden_states float32[512, 64]" in line
    r = _sample(run["onnx"], "-o", out, "--prompt", "a red one", "--sampling-steps", "1",
                "--reference", "zoo:scenes-flux")
    assert "--reference zoo:scenes-flux cannot denoise" in _error(r)
    r = _sample(run["onnx"], "-o", out, "--prompt", "x" * 2001)
    assert "longer than 2000" in _error(r)
    r = _sample(run["onnx"], "-o", out, "--prompt", "a red one", "--labels", "1")
    assert r.exit_code == 2 and "replace --labels" in r.output
    assert not out.exists()


def test_onnx_adapter_sets_the_family_timesteps(run):
    """Flux shifts its sigmas by the image's token count (2x2-packed latents) and uses its own sigmas:
    the artifact's adapter must set the same timesteps as the PyTorch model's."""
    from dit_compress.sampling import NoiseSchedule

    artifact, student = load_artifact(run["onnx"]), load_compressed(run["ckpt"])
    got, want = NoiseSchedule(artifact.scheduler_config).new_scheduler(), NoiseSchedule(
        student.scheduler_config).new_scheduler()
    artifact.adapter.set_timesteps(got, 5)
    student.adapter.set_timesteps(want, 5)
    assert np.allclose(got.timesteps.numpy(), want.timesteps.numpy())
    assert artifact.adapter.token_grid() == (4, 4)


def test_captions_wrap_and_shorten():
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (8, 8))), ImageFont.load_default(size=10)
    lines = wrap_caption(" ".join(["a large blue three at the centre"] * 5), 124, draw, font)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(draw.textlength(s, font=font) <= 124 for s in lines)
    assert wrap_caption("short", 124, draw, font) == ["short"]
    assert all(draw.textlength(s, font=font) <= 30 for s in wrap_caption("x" * 40, 30, draw, font))
