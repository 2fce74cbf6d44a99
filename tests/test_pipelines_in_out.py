"""Text-to-image pipelines in and out, for every family with text encoders (issue 24): tiny random
PixArt-Σ, SD3 and Flux pipeline folders -> prompt calibration through their own text encoders -> a stage
-> checkpoint/pipeline/ -> stock diffusers loads it and generates.

The stage runs as `run_recipe` runs it (`run_stages`, then `save_compressed` with the teacher's
pipeline) without the evaluation; one test goes through `ditc run` end to end."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import dit_compress
from conftest import LATENT as BARE_LATENT
from conftest import save_tiny
from pipelines import FAMILIES, LATENT, PROMPTS, generate, save_tiny_pipeline
from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, read_manifest, save_compressed
from dit_compress.core.pipeline import apply_stage, load_teacher, run_stages
from dit_compress.core.recipe import parse_recipe
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.data.calibration import CalibrationSpec, build_calibration, calibration_prompts
from dit_compress.errors import RecipeError
from dit_compress.models.families import get_adapter
from dit_compress.models.load import LoadedModel, load_transformer
from dit_compress.sampling import DEFAULT_SCHEDULER

TWO_STEPS = {"steps": 2, "batch_size": 4}
STAGES = {
    "depth": {"prune": {"method": "depth", "ratio": 0.5, "recover": TWO_STEPS}},
    "moe": {"moe": {"segments": 4, "top_k": 1, "taylor_batches": 1, "recover": TWO_STEPS}},
    "lit": {"lit": {"heads": 2, "recover": TWO_STEPS}},
}
# The pipelines' own prompt length (their __call__ default), which no folder here overrides.
MAX_SEQUENCE_LENGTH = {"pixart": 300, "sd3": 256, "flux": 512}


def recipe_dict(folder, prompts, stage: str) -> dict:
    return {"name": f"pipeline-{stage}", "model": {"source": str(folder), "latent_size": LATENT},
            "calibration": {"prompts": str(prompts), "num_samples": 8, "sampling_steps": 2, "guidance_scale": 2.0},
            "stages": [STAGES[stage]]}


@pytest.fixture(scope="module")
def compressed(tiny_pipeline, tmp_path_factory):
    """`get(family, stage)`: the family's pipeline compressed by one stage, as `run_recipe` does it."""
    runs = {}

    def get(family: str, stage: str = "depth"):
        if (family, stage) not in runs:
            tmp = tmp_path_factory.mktemp(f"{family}-{stage}")
            prompts = tmp / "prompts.txt"
            prompts.write_text("# calibration prompts\n" + "\n".join(PROMPTS) + "\n\n")
            recipe = parse_recipe(recipe_dict(tiny_pipeline(family), prompts, stage))
            teacher = load_teacher(recipe.model.model_dump())
            calib = build_calibration(teacher, recipe.calibration, tmp / "work")
            student, summaries, _ = run_stages(recipe, teacher, calib, tmp / "work")
            records = [StageRecord(s["name"], s["config"], s["plan"], s.get("attached")) for s in summaries]
            ckpt = save_compressed(tmp / "checkpoint", student.model, base_reference(teacher, recipe.model.model_dump()),
                                   records, recipe.hash, pipeline=teacher.pipeline)
            runs[family, stage] = SimpleNamespace(teacher=teacher, calib=calib, student=student.model, ckpt=ckpt)
        return runs[family, stage]
    return get


def pipeline_encode(pipe, family: str, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The transformer's conditions straight from the pipeline's own `encode_prompt`."""
    n = MAX_SEQUENCE_LENGTH[family]
    with torch.no_grad():
        if family == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=n,
                                                    clean_caption=False)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                      max_sequence_length=n)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=n)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def _stock(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibration_conditions_are_the_pipelines_encoded_prompts(family, compressed, tiny_pipeline):
    run = compressed(family)
    pipe = _stock(tiny_pipeline(family))
    expected, empty = pipeline_encode(pipe, family, PROMPTS), pipeline_encode(pipe, family, [""])
    cond, null = run.calib.cond, run.calib.null_cond
    assert set(cond) == set(null) == set(expected)
    rows = []
    for i in range(len(run.calib)):
        hits = [j for j in range(len(PROMPTS)) if all(_same(cond[k][i], expected[k][j]) for k in expected)]
        assert len(hits) == 1, f"calibration sample {i} is not exactly one prompt's encoding"
        rows += hits
        assert all(_same(null[k][i], empty[k][0]) for k in empty), "the null condition is the encoded empty prompt"
    assert Counter(rows) == {j: 2 for j in range(len(PROMPTS))}  # 8 samples, every prompt equally often
    assert torch.isfinite(run.calib.x0).all() and run.calib.x0.shape[1:] == run.teacher.adapter.latent_shape()
    # Example inputs (ONNX export, deployment card, timing) are laid out as the pipeline's conditions.
    _, _, example = run.teacher.adapter.example_inputs(2)
    assert {k: (v.shape[1:], v.dtype) for k, v in example.items()} == \
        {k: (v.shape[1:], v.dtype) for k, v in cond.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_out_loads_in_stock_diffusers_and_generates(family, compressed, tiny_pipeline):
    run = compressed(family)
    adapter = run.teacher.adapter
    index = json.loads((run.ckpt / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[family]
    assert read_manifest(run.ckpt)["base"]["pipeline"]["class_name"] == FAMILIES[family]
    pipe = _stock(run.ckpt / "pipeline")
    assert type(pipe).__name__ == FAMILIES[family]
    blocks = len(adapter.blocks(run.teacher.model))
    assert len(adapter.blocks(pipe.transformer)) == len(adapter.blocks(run.student)) == blocks // 2
    inputs = adapter.example_inputs(2, seed=3)
    restored = load_compressed(run.ckpt)
    with torch.no_grad():
        want = adapter.denoise(run.student, *inputs)
        assert torch.equal(want, adapter.denoise(pipe.transformer, *inputs))
        assert torch.equal(want, restored.adapter.denoise(restored.model, *inputs)), "save -> restore changed it"
    images = generate(pipe, PROMPTS[0])
    side = LATENT * pipe.vae_scale_factor
    assert images.shape == (1, side, side, 3) and np.isfinite(images).all()
    # The same pictures through dit_compress.load_pipeline (to float rounding: its weights sit in fresh
    # aligned allocations, from_pretrained's where the file put them, and batch-1 CPU kernels round by
    # alignment); other ones from the teacher's pipeline.
    assert np.allclose(images, generate(dit_compress.load_pipeline(run.ckpt), PROMPTS[0]), atol=1e-6)
    assert not np.array_equal(images, generate(_stock(tiny_pipeline(family)), PROMPTS[0]))


@pytest.mark.parametrize("family,stage", [("flux", "moe"), ("pixart", "lit")])
def test_non_stock_stage_pipeline_loads_through_dit_compress(family, stage, compressed):
    run = compressed(family, stage)
    folder = run.ckpt / "pipeline"
    assert (folder / "model_index.json").is_file() and not (folder / "transformer").exists()
    assert not (run.ckpt / "diffusers").exists(), f"{stage} is not a stock diffusers class"
    pipe = dit_compress.load_pipeline(run.ckpt)
    assert type(pipe).__name__ == FAMILIES[family]
    restored = load_compressed(run.ckpt)
    inputs = run.teacher.adapter.example_inputs(2, seed=3)
    with torch.no_grad():
        got = restored.adapter.denoise(pipe.transformer, *inputs)
        assert torch.equal(got, restored.adapter.denoise(restored.model, *inputs))
        assert torch.equal(got, run.teacher.adapter.denoise(run.student, *inputs))
    images = generate(pipe, PROMPTS[1])
    assert images.shape[0] == 1 and np.isfinite(images).all()
    assert np.array_equal(images, generate(dit_compress.load_pipeline(folder), PROMPTS[1]))  # the folder's name too


def test_onnx_graph_takes_the_pipelines_conditions(compressed, tmp_path):
    """PixArt's pipeline passes a padding mask and 300 T5 states: the exported graph and its card take
    them, and match PyTorch on the calibration's real encoded prompts."""
    from dit_compress.export.artifact import deployment_card, load_artifact
    from dit_compress.export.onnx import export_onnx, ort_feeds, ort_session

    run = compressed("pixart")
    restored = load_compressed(run.ckpt)
    card = deployment_card(restored, 2, 2.0)
    assert card["conditions"]["encoder_attention_mask"] == {"dtype": "int64", "shape": [300]}
    assert card["conditions"]["encoder_hidden_states"]["shape"] == list(run.calib.cond["encoder_hidden_states"].shape[1:])
    info = export_onnx(restored.model, restored.adapter, tmp_path / "student.onnx", batch=2, card=card)
    assert "encoder_attention_mask" in info["inputs"]
    batch = run.calib.batch(0, 3)
    assert not batch.cond["encoder_attention_mask"].all()  # real prompts, padded
    got = ort_session(tmp_path / "student.onnx").run(None, ort_feeds(batch.x_t, batch.t, batch.cond))[0]
    with torch.no_grad():
        want = restored.adapter.denoise(restored.model, batch.x_t, batch.t, batch.cond).numpy()
    assert np.abs(got - want).max() <= 1e-4
    # The stand-alone artifact makes inputs from its card: random states, every token attended.
    artifact = load_artifact(tmp_path / "student.onnx")
    x, t, cond = artifact.adapter.example_inputs(2)
    assert torch.equal(cond["encoder_attention_mask"], torch.ones(2, 300, dtype=torch.long))
    with torch.no_grad():
        want = restored.adapter.denoise(restored.model, x, t, cond)
    assert (artifact.adapter.denoise(artifact.model, x, t, cond) - want).abs().max() <= 1e-4
    # `ditc sample --prompt`: the pipeline's encoded prompts (states and mask) fit the graph.
    from dit_compress.cli import main

    r = CliRunner().invoke(main, ["sample", str(tmp_path / "student.onnx"), "-o", str(tmp_path / "grid.png"),
                                  "--prompt", PROMPTS[0], "--reference", str(run.ckpt)])
    assert r.exit_code == 0, r.output
    assert float(re.search(r"PSNR vs the PyTorch path .*: ([\d.]+) dB", r.output).group(1)) > 40.0


def test_ditc_run_writes_a_pipeline_that_generates(tiny_pipeline, tmp_path):
    from dit_compress.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    recipe = {**recipe_dict(tiny_pipeline("sd3"), prompts, "depth"),
              "evaluation": {"num_samples": 10, "seeds": [0], "compare_samples": 2, "sampling_steps": 2,
                             "denoiser_samples": 8, "timestep_bands": 1, "latency_batch": 2, "latency_repeats": 3,
                             "memory_batch": 2},
              "export": {"onnx": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "out" / "checkpoint"
    assert (tmp_path / "out" / "report.json").is_file()
    pipe = _stock(ckpt / "pipeline")
    assert pipe.transformer.config.num_layers == 2
    assert np.isfinite(generate(pipe, PROMPTS[2])).all()


# -- FLUX.1-dev's configuration: a guidance embedding ------------------------------------------------
GUIDED_ROWS = ["prune-depth", "ppcl", "moe", "mob", "lit", "clear"]


def test_flux_with_guidance_embedding_calibrates_and_runs_every_stage(tmp_path):
    """The calibration cache stores the condition and its null; their guidance tensors once shared
    memory, which safetensors refuses, so every stage failed."""
    from test_families import _variant
    from test_stage_matrix import ROWS

    model = _variant("flux-guidance").requires_grad_(False)
    teacher = LoadedModel(model, get_adapter(model, BARE_LATENT), dict(DEFAULT_SCHEDULER), "tiny:flux-guidance",
                          latent_size=BARE_LATENT)
    spec = CalibrationSpec(num_samples=16, sampling_steps=2, guidance_scale=2.0)
    calib = build_calibration(teacher, spec, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("calibration-*/shard-*.safetensors"))
    cached = build_calibration(teacher, spec, tmp_path / "cache")  # read back from the shards
    assert torch.equal(cached.x0, calib.x0) and torch.equal(cached.null_cond["guidance"], calib.cond["guidance"])
    inputs = teacher.adapter.example_inputs(2, seed=5)
    for row in GUIDED_ROWS:
        name, raw = ROWS[row]
        stage = get_stage(name)
        ctx = StageContext(teacher, cached, tmp_path / row, save_variant=lambda *a: None)
        student, _, summary = apply_stage(stage, stage.config_cls.model_validate(raw), copy.deepcopy(model), ctx)
        assert all(r["steps"] == 2 for r in summary["training"].values()), row
        with torch.no_grad():
            assert torch.isfinite(teacher.with_model(student).adapter.denoise(student, *inputs)).all(), row


def test_flux_dev_pipeline_calibrates_with_its_guidance_input(tmp_path):
    folder = save_tiny_pipeline("flux-dev", tmp_path / "flux-dev")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    teacher = load_transformer(str(folder), latent_size=LATENT)
    spec = CalibrationSpec(prompts=str(prompts), num_samples=8, sampling_steps=1, guidance_scale=2.0)
    calib = build_calibration(teacher, spec, tmp_path / "cache")
    again = build_calibration(teacher, spec, tmp_path / "cache")
    assert torch.equal(calib.x0, again.x0)
    assert (calib.cond["guidance"] == 3.5).all() and (again.null_cond["guidance"] == 3.5).all()


# -- prompt files and embeddings -------------------------------------------------------------------
BAD_PROMPTS = {
    "empty.txt": (b"", "no prompts"),
    "comments.txt": (b"# only a comment\n\n   \n", "no prompts"),
    "latin1.txt": ("a caf\xe9 at night".encode("latin-1"), "not UTF-8"),
    "mapping.json": (b'{"prompts": ["a red cat"]}', "a JSON prompt file must be a list of strings"),
    "numbers.json": (b'["a red cat", 3]', "a JSON prompt file must be a list of strings"),
    "broken.json": (b'["a red cat",', "not valid JSON"),
    "empty.json": (b"[]", "no prompts"),
    "long.txt": (b"a red cat\n" + b"a " * 1001 + b"\n", "prompt 2 is longer than 2000 characters"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompt_file_is_one_clear_error(name, tiny_pipeline, tmp_path):
    content, message = BAD_PROMPTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    teacher = load_transformer(str(tiny_pipeline("pixart")))
    with pytest.raises(RecipeError, match=message) as e:
        calibration_prompts(teacher, CalibrationSpec(prompts=str(path)))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_prompt_file_through_ditc_run(tiny_pipeline, tmp_path):
    from dit_compress.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_pipeline("pixart"), tmp_path / "nowhere.txt", "depth")))
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f"error: cannot read prompt file {tmp_path / 'nowhere.txt'}" in res.output


def test_prompts_on_a_bare_transformer_are_refused(tmp_path):
    save_tiny("pixart", tmp_path / "bare")
    teacher = load_transformer(str(tmp_path / "bare"))
    assert teacher.pipeline is None
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    with pytest.raises(RecipeError, match="is not a pipeline folder with text encoders"):
        build_calibration(teacher, CalibrationSpec(prompts=str(prompts), num_samples=8, sampling_steps=1))


@pytest.fixture
def ditc_log(caplog):
    """Warnings of the `dit_compress` logger (which `ditc` stops from propagating to the root)."""
    log = logging.getLogger("dit_compress")
    log.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    log.removeHandler(caplog.handler)


def _off_distribution(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "off-distribution" in r.getMessage()]


def test_synthetic_embeddings_on_a_text_family_warn(tiny_pipeline, tmp_path, ditc_log):
    teacher = load_transformer(str(tiny_pipeline("pixart")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    assert calibration_prompts(teacher, CalibrationSpec(prompts=str(prompts))) == ["a red cat"]
    assert not _off_distribution(ditc_log)  # encoded prompts: no warning

    calib = build_calibration(teacher, CalibrationSpec(embeddings="synthetic", num_samples=8, sampling_steps=1))
    (message,) = _off_distribution(ditc_log)
    assert "calibration.embeddings is 'synthetic'" in message
    assert calib.cond["encoder_hidden_states"].shape[1:] == (300, 16)  # the pipeline's layout, random values
    ditc_log.clear()

    save_tiny("pixart", tmp_path / "bare")
    calibration_prompts(load_transformer(str(tmp_path / "bare")), CalibrationSpec())
    (message,) = _off_distribution(ditc_log)
    assert "this transformer comes without text encoders" in message
    ditc_log.clear()

    save_tiny("dit", tmp_path / "labels")
    assert calibration_prompts(load_transformer(str(tmp_path / "labels")), CalibrationSpec()) is None
    assert not _off_distribution(ditc_log)  # class labels are the model's own conditions
