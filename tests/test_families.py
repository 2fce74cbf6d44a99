"""Every family: the denoiser contract, ONNX parity, and save -> restore identity after a stage."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import LATENT, tiny_model
from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.errors import UnsupportedModelError
from dit_compress.export.onnx import export_onnx
from dit_compress.models.families import get_adapter
from dit_compress.models.load import LoadedModel
from dit_compress.sampling import DEFAULT_SCHEDULER


def _loaded(family):
    model = tiny_model(family)
    return LoadedModel(model, get_adapter(model, LATENT), dict(DEFAULT_SCHEDULER), f"tiny:{family}", latent_size=LATENT)


def test_denoise_shape_and_finite(family):
    m = _loaded(family)
    x, t, cond = m.adapter.example_inputs(3)
    with torch.no_grad():
        out = m.adapter.denoise(m.model, x, t, cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_onnx_parity(family, tmp_path):
    m = _loaded(family)
    info = export_onnx(m.model, m.adapter, tmp_path / "model.onnx", batch=2, atol=1e-4)
    assert info["parity"]["batch"] == 3, "parity must run at a batch other than the traced one"
    assert info["parity"]["max_abs_error"] <= 1e-4, f"{family}: {info['parity']}"
    assert (tmp_path / "model.onnx").is_file() and not list(tmp_path.glob(".*partial"))


def test_prune_save_restore_identical(family, tmp_path):
    teacher = _loaded(family)
    calib = build_calibration(teacher, CalibrationSpec(num_samples=16, sampling_steps=2))
    stage = get_stage("prune")
    cfg = stage.config_cls(method="depth", ratio=0.5, recover=None)
    student = copy.deepcopy(teacher.model)
    student, meta = stage.apply(student, cfg, StageContext(teacher, calib, tmp_path / "work"))
    n_before = len(teacher.adapter.blocks(teacher.model))
    assert len(teacher.adapter.blocks(student)) == n_before - round(0.5 * n_before)
    names = [f"{g.attr}.{i}" for g, i, _ in teacher.adapter.blocks(teacher.model)]
    protected = {names.index(f"{g}.{i}") for g, i in teacher.adapter.protected_blocks(teacher.model)}
    assert not protected & set(meta["removed"]), "a block the architecture needs was removed"
    rec = StageRecord("prune", cfg.model_dump(mode="json"), meta)
    save_compressed(tmp_path / "ckpt", student, base_reference(teacher, {"latent_size": LATENT}), [rec])
    restored = load_compressed(tmp_path / "ckpt")
    x, t, cond = teacher.adapter.example_inputs(2, seed=5)
    with torch.no_grad():
        a = teacher.adapter.denoise(student, x, t, cond)
        b = restored.adapter.denoise(restored.model, x, t, cond)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"{family}: restored output differs by {(a - b).abs().max()}"


def test_unsupported_class_names_supported_ones():
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel.*FluxTransformer2DModel"):
        get_adapter(torch.nn.Linear(2, 2))


def test_label_conditioned_text_family_prunes_restores_and_exports(tmp_path):
    """SD3 driven by class labels through a learned conditioner (the bundled SD3 teacher's setup)."""
    from dit_compress.models.conditioner import LabelConditioner

    model = tiny_model("sd3")
    torch.manual_seed(1)
    cond = LabelConditioner(num_classes=10, tokens=3, token_dim=32, pooled_dim=24).eval().requires_grad_(False)
    teacher = LoadedModel(model, get_adapter(model, LATENT, cond), dict(DEFAULT_SCHEDULER), "tiny:sd3",
                          {}, LATENT, cond)
    assert teacher.adapter.num_classes == 10
    calib = build_calibration(teacher, CalibrationSpec(num_samples=16, sampling_steps=2))
    assert set(calib.cond) == {"class_labels"} and int(calib.null_cond["class_labels"][0]) == 10
    stage = get_stage("prune")
    cfg = stage.config_cls(method="depth", ratio=0.5, recover=None)
    student, meta = stage.apply(copy.deepcopy(model), cfg, StageContext(teacher, calib, tmp_path / "w"))
    assert 3 not in meta["removed"], "SD3's last joint block must stay"
    rec = StageRecord("prune", cfg.model_dump(mode="json"), meta)
    save_compressed(tmp_path / "ckpt", student, base_reference(teacher, {"latent_size": LATENT}), [rec],
                    conditioner=cond)
    restored = load_compressed(tmp_path / "ckpt")
    x, t, c = teacher.adapter.example_inputs(2, seed=3)
    with torch.no_grad():
        assert torch.equal(teacher.with_model(student).adapter.denoise(student, x, t, c),
                           restored.adapter.denoise(restored.model, x, t, c))
    info = export_onnx(restored.model, restored.adapter, tmp_path / "m.onnx")
    assert info["inputs"] == ["sample", "timestep", "class_labels"]
    assert info["parity"]["max_abs_error"] <= 1e-4


def test_pixart_implicit_additional_conditions():
    """PixArt-XL-2-1024's config leaves use_additional_conditions None; diffusers turns it on.

    (Inner width 24: the size and aspect-ratio embeddings take a third of it each.)"""
    import diffusers

    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2, sample_size=128,
        patch_size=2, cross_attention_dim=24, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=None).eval()
    assert model.use_additional_conditions and model.config.use_additional_conditions is None
    adapter = get_adapter(model, LATENT)
    x, t, cond = adapter.example_inputs(2)
    with torch.no_grad():
        assert torch.isfinite(adapter.denoise(model, x, t, cond)).all()
