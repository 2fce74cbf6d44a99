"""Every family: the denoiser contract, ONNX parity, and save -> restore identity after a stage."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import LATENT, tiny_model
from dit_compress.core.manifest import base_reference, load_compressed, save_compressed
from dit_compress.core.pipeline import apply_stage
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
    student, rec, _ = apply_stage(stage, cfg, copy.deepcopy(model), StageContext(teacher, calib, tmp_path / "w"))
    assert 3 not in rec.plan["removed"], "SD3's last joint block must stay"
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


# -- the layout ----------------------------------------------------------------------------------
def _variant(name):
    """Tiny models beyond conftest's: SD3.5 (dual attention in blocks 0-1, RMS q/k norm), Flux with
    guidance embeddings."""
    import diffusers

    torch.manual_seed(0)
    if name == "sd3.5":
        return diffusers.SD3Transformer2DModel(
            sample_size=LATENT, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
            caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=24, out_channels=4,
            dual_attention_layers=(0, 1), qk_norm="rms_norm").eval()
    if name == "flux-guidance":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[2, 2, 4], guidance_embeds=True).eval()
    return tiny_model(name)


# name: blocks by kind, attentions by kind, attentions with q/k norm, FFNs by stream, FFN forms, dual-attention blocks
LAYOUTS = {
    "dit": ({"dit": 4}, {"self": 4}, 0, {"image": 4}, {"feedforward"}, 0),
    "pixart": ({"dit": 4}, {"self": 4, "cross": 4}, 0, {"image": 4}, {"feedforward"}, 0),
    # the last SD3 block has no text FFN (context_pre_only)
    "sd3": ({"joint": 4}, {"joint": 4}, 0, {"image": 4, "text": 3}, {"feedforward"}, 0),
    "sd3.5": ({"joint": 4}, {"joint": 4, "self": 2}, 6, {"image": 4, "text": 3}, {"feedforward"}, 2),
    "flux": ({"joint": 2, "single": 2}, {"joint": 4}, 4, {"image": 2, "text": 2, "both": 2},
             {"feedforward", "fused"}, 0),
    "flux-guidance": ({"joint": 2, "single": 2}, {"joint": 4}, 4, {"image": 2, "text": 2, "both": 2},
                      {"feedforward", "fused"}, 0),
    "sana": ({"dit": 4}, {"self": 4, "cross": 4}, 0, {"image": 4}, {"glumbconv"}, 0),
}


def _count(items):
    out = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_counts_parts_by_kind(name):
    model = _variant(name)
    adapter = get_adapter(model, LATENT)
    layout = adapter.layout(model)
    blocks, attentions, qk_norm, streams, forms, dual = LAYOUTS[name]
    assert _count(b.kind for b in layout.blocks) == blocks
    assert [b.path for b in layout.blocks] == [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    assert _count(a.kind for a in layout.attentions()) == attentions
    assert sum(a.qk_norm for a in layout.attentions()) == qk_norm
    assert _count(f.stream for f in layout.ffns()) == streams
    assert {f.form for f in layout.ffns()} == forms
    assert sum(b.dual_attention for b in layout.blocks) == dual and layout.dual_attention == bool(dual)
    assert all(a.linear == (name == "sana" and a.kind == "self") for a in layout.attentions())
    for kind, n in blocks.items():
        assert len(adapter.blocks(model, kind)) == len(layout.blocks_of(kind)) == n


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_paths_name_the_parts(name):
    """Every path resolves in the model and in a copy; views hold the modules their paths name."""
    model = _variant(name)
    layout = get_adapter(model, LATENT).layout(model)
    copy_names = {n for n, _ in copy.deepcopy(model).named_modules()} | {n for n, _ in model.named_parameters()}
    paths = [*layout.modulation, *layout.embedding, *layout.text_embedding]
    paths += [p for a in layout.attentions() for p in (a.path, *a.image_projections, *a.text_projections)]
    paths += [p for f in layout.ffns() for p in (f.path, f.up, f.down)]
    assert paths and not [p for p in paths if p not in copy_names]
    assert all(model.get_submodule(a.path) is a.module for a in layout.attentions())
    assert all(model.get_submodule(b.path) is b.module for b in layout.blocks)
    assert layout.embedding and layout.modulation
    for a in layout.attentions():
        # image Q/K/V always; text projections only on joint attention with encoder states
        assert len(a.image_projections) >= 3
        assert not a.text_projections or a.kind == "joint"


def test_layout_flux_single_block_mlp_view():
    """The Flux single-stream MLP: proj_mlp up, then the MLP columns of proj_out, which the view
    describes; applied by hand, the view reproduces the block's MLP branch contribution."""
    model = _variant("flux")
    layout = get_adapter(model, LATENT).layout(model)
    for block in layout.blocks_of("single"):
        (mlp,) = block.ffns
        up, down = model.get_submodule(mlp.up), model.get_submodule(mlp.down)
        a, b = mlp.down_columns
        assert (mlp.form, mlp.stream, mlp.name) == ("fused", "both", "mlp")
        assert up.out_features == mlp.hidden == b - a and down.in_features == b and a == up.in_features
        x, attn_out = torch.randn(3, up.in_features), torch.randn(3, a)
        hidden = block.module.act_mlp(up(x))
        with torch.no_grad():
            full = down(torch.cat([attn_out, hidden], 1))
            parts = attn_out @ down.weight[:, :a].T + hidden @ down.weight[:, a:b].T + down.bias
        assert torch.allclose(full, parts, atol=1e-6)
    assert [a.output_projection for a in layout.attentions()] == \
        ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_out.0", None, None]


def test_layout_flux_guidance_embedding():
    for name, guided in (("flux", False), ("flux-guidance", True)):
        model = _variant(name)
        adapter = get_adapter(model, LATENT)
        (embedding,) = adapter.layout(model).embedding
        assert hasattr(model.get_submodule(embedding), "guidance_embedder") == guided
        assert ("guidance" in adapter.example_inputs(1)[2]) == guided


def test_label_conditioned_adapter_has_its_base_layout():
    from dit_compress.models.conditioner import LabelConditioner

    model = tiny_model("sd3")
    cond = LabelConditioner(num_classes=10, tokens=3, token_dim=32, pooled_dim=24)
    assert get_adapter(model, LATENT, cond).layout(model) == get_adapter(model, LATENT).layout(model)


def test_export_fusion_type_follows_the_block_kinds():
    from dit_compress.export.optimize import fusion_model_type

    assert [fusion_model_type(f) for f in ("dit", "pixart", "sd3", "flux", "sana")] == \
        ["vit", "vit", "mmdit", "mmdit", "vit"]
    with pytest.raises(UnsupportedModelError, match="unknown family"):
        fusion_model_type("unet")


# -- capture -------------------------------------------------------------------------------------
def _blocks(family):
    m = _loaded(family)
    return m, {f"{g.attr}.{i}": b for g, i, b in m.adapter.blocks(m.model)}


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_capture_inputs_outputs_and_calls(family):
    from dit_compress.probes.capture import Capture, image_hidden

    m, blocks = _blocks(family)
    names = list(blocks)
    x, t, cond = m.adapter.example_inputs(2)
    with Capture(blocks, at="input") as ins, Capture(blocks, transform=image_hidden) as outs, \
            Capture(blocks, at="call") as calls, torch.no_grad():
        pred = m.adapter.denoise(m.model, x, t, cond)
    for a, b in zip(names, names[1:]):  # the image stream flows from each block into the next
        assert torch.equal(outs.values[a], ins.values[b])
    args, kwargs = calls.values[names[1]]
    with torch.no_grad():
        assert torch.equal(image_hidden(blocks[names[1]](*args, **kwargs)), outs.values[names[1]])
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks.values()), "hooks outlive the with"
    with torch.no_grad():
        assert torch.equal(pred, m.adapter.denoise(m.model, x, t, cond))


def test_capture_callback_keeps_nothing_and_sees_forward_order():
    from dit_compress.probes.capture import Capture

    m, blocks = _blocks("flux")
    seen = []
    with Capture(blocks, on=lambda name, out: seen.append(name)) as cap, torch.no_grad():
        m.adapter.denoise(m.model, *m.adapter.example_inputs(1))
    assert seen == list(blocks) and cap.values == {}


def test_capture_per_name_points_and_errors():
    from dit_compress.probes.capture import Capture

    lin = torch.nn.Linear(3, 2)
    seq = torch.nn.Sequential(lin, torch.nn.ReLU())
    x = torch.randn(4, 3)
    with Capture({"in": lin, "out": seq}, at={"in": "input", "out": "output"}) as cap:
        y = seq(x)
    assert torch.equal(cap.values["in"], x) and torch.equal(cap.values["out"], y)
    with pytest.raises(ValueError, match="expected 'input', 'output' or 'call'"):
        Capture({"x": lin}, at="gradient")
