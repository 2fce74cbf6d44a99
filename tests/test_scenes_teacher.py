"""The bundled Flux pipeline teacher's build: tokenizers, the pipeline folder, its training script.

Everything runs on the tiny configuration of the same build; the real one is only sized here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dit_compress.data.scenes import HELDOUT_PROMPTS, VOCABULARY
from dit_compress.evaluate.adherence import evaluate_adherence
from dit_compress.train.scenes_pipeline import (SCENES_FLUX, ScenesFluxConfig, build_clip_tokenizer,
                                                 build_pipeline, build_t5_tokenizer, build_transformer,
                                                 build_vae, save_pipeline)
from dit_compress.train.scenes_teacher import generate_images, train_scenes_flux

CAPTION = "a large blue three at the centre on a black background"
TINY = ScenesFluxConfig.tiny()


def test_tokenizers_load_with_the_pipeline_classes_and_round_trip(tmp_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    build_clip_tokenizer(tmp_path / "clip", max_length=24)
    build_t5_tokenizer(tmp_path / "t5", max_length=32)
    clip = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    t5 = T5TokenizerFast.from_pretrained(tmp_path / "t5")

    ids = clip(CAPTION).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and len(ids) == len(CAPTION.split()) + 2
    assert clip.decode(ids, skip_special_tokens=True) == CAPTION
    assert clip(CAPTION.upper()).input_ids == ids  # CLIP lower-cases
    ids = t5(CAPTION).input_ids
    assert ids[-1] == t5.eos_token_id and len(ids) == len(CAPTION.split()) + 1
    assert t5.decode(ids, skip_special_tokens=True) == CAPTION
    # Every vocabulary word is one token in both, and no word is unknown.
    for word in VOCABULARY:
        assert len(clip(word).input_ids) == 3 and clip(word).input_ids[1] != clip.unk_token_id
        assert len(t5(word).input_ids) == 2 and t5(word).input_ids[0] != t5.unk_token_id
    padded = t5([CAPTION, ""], padding="max_length", max_length=32).input_ids
    assert [len(p) for p in padded] == [32, 32] and padded[1][:2] == [t5.eos_token_id, t5.pad_token_id]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-scenes-flux")
    save_pipeline(build_pipeline(TINY, seed=0), folder)
    return folder


def test_tiny_pipeline_folder_loads_with_plain_flux_pipeline_and_generates(tiny_folder):
    from diffusers import FluxPipeline

    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    weights = load_file(tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # stored as FLUX ships it

    pipe = FluxPipeline.from_pretrained(tiny_folder)
    assert pipe.transformer.dtype == torch.float32  # loading casts back to the text encoders' dtype
    assert pipe.vae_scale_factor == TINY.vae_scale_factor == 4
    out = pipe("a large blue three at the centre", height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    latents = pipe(CAPTION, height=32, width=32, num_inference_steps=2, max_sequence_length=TINY.t5_max_length,
                   negative_prompt="", true_cfg_scale=3.0, output_type="latent").images
    assert latents.shape == (1, (TINY.latent_size // 2) ** 2, 4 * TINY.latent_channels)  # 8x8 latents, 2x2 packed

    sampling = {"steps": 2, "guidance_scale": 2.0, "negative_prompt": "",
                "max_sequence_length": TINY.t5_max_length, "height": 32, "width": 32}
    prompts = [text for _, text in HELDOUT_PROMPTS[:3]]
    images = generate_images(pipe, prompts, seed=0, sampling=sampling)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[:2], generate_images(pipe, prompts[:2], seed=0, sampling=sampling))
    # The evaluator's `generate`: an untrained pipeline gets every attribute right only by chance.
    result = evaluate_adherence(lambda p, s: generate_images(pipe, p, s, sampling=sampling), seeds=(0,),
                                prompts=HELDOUT_PROMPTS[:20], real_draws=1)
    assert 0 <= result["all"]["mean"] < 0.5


def test_bundled_configuration_is_deep_and_fits_the_size_limits():
    cfg = SCENES_FLUX
    assert cfg.double_blocks + cfg.single_blocks >= 24 and cfg.latent_size % 2 == 0
    assert sum(cfg.rope_axes) == cfg.head_dim
    transformer_mb = sum(p.numel() for p in build_transformer(cfg).parameters()) * 2 / 2 ** 20  # bf16
    vae_mb = sum(p.numel() for p in build_vae(cfg).parameters()) * 4 / 2 ** 20
    assert transformer_mb + vae_mb < 40 and vae_mb < 15  # the transformer is sharded under 15 MB


def _weights(folder):
    return {f"{part}/{k}": v for part in ("vae", "transformer")
            for k, v in load_file(folder / part / "diffusion_pytorch_model.safetensors").items()}


def test_training_runs_writes_the_folder_and_is_deterministic(tmp_path):
    kwargs = dict(steps=2, vae_steps=2, batch=4, vae_batch=4, n_train=32, heldout_renders=8,
                  cfg=TINY, seed=3)
    metrics = train_scenes_flux(tmp_path / "a", **kwargs)
    train_scenes_flux(tmp_path / "b", **kwargs)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = build_pipeline(TINY, seed=3)
    assert not torch.equal(a["transformer/proj_out.weight"].float(), untrained.transformer.proj_out.weight.bfloat16().float())

    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["transformer"]["steps"] == 2 and np.isfinite(metrics["vae"]["heldout_psnr_db"])
    vae_config = json.loads((tmp_path / "a" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0 and vae_config["shift_factor"] != 0.0  # fitted to the latents
    card = json.loads((tmp_path / "a" / "ditc_zoo.json").read_text())
    assert card["pipeline"] == "FluxPipeline" and card["sampling"]["negative_prompt"] == ""
