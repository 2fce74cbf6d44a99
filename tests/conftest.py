"""Tiny configs of the real diffusers classes, one per supported family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

LATENT = 8


def tiny_model(family: str, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    configs = {
        "dit": ("DiTTransformer2DModel", dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            sample_size=LATENT, patch_size=2, num_embeds_ada_norm=10)),
        "pixart": ("PixArtTransformer2DModel", dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            sample_size=LATENT, patch_size=2, cross_attention_dim=16, caption_channels=32,
            norm_type="ada_norm_single", use_additional_conditions=False)),
        "sd3": ("SD3Transformer2DModel", dict(
            sample_size=LATENT, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
            pooled_projection_dim=24, out_channels=4)),
        "flux": ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[2, 2, 4])),
        "sana": ("SanaTransformer2DModel", dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=32, sample_size=LATENT, patch_size=1)),
    }
    # SD3.5's real config: per-head q/k RMSNorm (LayerNorm in some checkpoints) and, in medium, dual
    # attention in the first blocks; 4 heads, so that head pruning has heads to remove.
    sd35 = dict(configs["sd3"][1], num_attention_heads=4, caption_projection_dim=32, dual_attention_layers=(0,))
    configs["sd35"] = ("SD3Transformer2DModel", dict(sd35, qk_norm="rms_norm"))
    configs["sd35-layernorm"] = ("SD3Transformer2DModel", dict(sd35, qk_norm="layer_norm"))
    cls_name, cfg = configs[family]
    # Frozen like every loaded model: requires_grad alone changes which CPU kernels run.
    return getattr(diffusers, cls_name)(**cfg).eval().requires_grad_(False)


FAMILIES = ["dit", "pixart", "sd3", "flux", "sana"]
SD35_VARIANTS = ["sd35", "sd35-layernorm"]  # tiny_model names of the sd3 family with SD3.5's attention


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def save_tiny(family: str, folder, seed: int = 0):
    """A local diffusers pipeline-style folder (transformer/ subfolder) of a tiny model."""
    model = tiny_model(family, seed)
    model.save_pretrained(folder / "transformer")
    return model


# `--set` overrides that make a CLI run of the full pipeline take seconds.
TINY_RUN = ["--set", "evaluation.num_samples=10", "--set", "evaluation.compare_samples=4",
            "--set", "evaluation.denoiser_samples=8", "--set", "evaluation.latency_repeats=3",
            "--set", "calibration.num_samples=16", "--set", "calibration.sampling_steps=2"]


def check_round_trip(teacher, student, stage_name: str, cfg, plan: dict, tmp_path, batch: int = 2,
                     attached: dict | None = None):
    """A stage's student gives finite outputs, survives save -> restore unchanged and exports with
    ONNX parity <= 1e-4. Returns (its outputs, the inputs they came from)."""
    from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
    from dit_compress.export.onnx import export_onnx

    inputs = teacher.adapter.example_inputs(batch)
    adapter = teacher.with_model(student).adapter
    with torch.no_grad():
        before = adapter.denoise(student, *inputs)
    assert torch.isfinite(before).all()
    folder = save_compressed(tmp_path / "ckpt", student, base_reference(teacher, {"source": "tiny"}),
                             [StageRecord(stage_name, cfg.model_dump(), plan, attached)], "h")
    restored = load_compressed(folder)
    with torch.no_grad():
        assert torch.equal(before, restored.adapter.denoise(restored.model, *inputs)), \
            f"{adapter.family}: save -> restore changed the outputs"
    info = export_onnx(restored.model, restored.adapter, tmp_path / f"{stage_name}.onnx", batch=2, atol=1e-4)
    assert info["parity"]["max_abs_error"] <= 1e-4
    return before, inputs


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """`get(family)`: the folder of a tiny random pipeline of `family` (tests/pipelines.py), saved once
    per session. Tests read it and never write into it."""
    from pipelines import save_tiny_pipeline

    folders = {}

    def get(family: str):
        if family not in folders:
            folders[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(f"pipeline-{family}"))
        return folders[family]
    return get


def tiny_loaded(family: str):
    """A tiny model of `family` as the pipeline loads a teacher (rectified-flow schedule)."""
    from dit_compress.models.families import get_adapter
    from dit_compress.models.load import LoadedModel
    from dit_compress.sampling import DEFAULT_SCHEDULER

    model = tiny_model(family)
    return LoadedModel(model, get_adapter(model, LATENT), dict(DEFAULT_SCHEDULER), f"tiny:{family}",
                       latent_size=LATENT)


@pytest.fixture(scope="session")
def calibrated():
    """calibrated(family) -> (tiny teacher, a 16-sample calibration set), built once per family."""
    from dit_compress.data.calibration import CalibrationSpec, build_calibration

    cache = {}

    def get(family):
        if family not in cache:
            teacher = tiny_loaded(family)
            cache[family] = teacher, build_calibration(teacher, CalibrationSpec(num_samples=16, sampling_steps=2))
        return cache[family]
    return get
