"""Tiny random text-to-image pipelines of every family with text encoders, built from configs.

Each is a real diffusers pipeline class with the components its published checkpoints ship, at test
size: PixArt-Σ (T5 + DPM-Solver, learned variance), SD3 (two projected CLIPs + T5, flow matching with
shift 3) and Flux (the bundled teacher's tiny build: CLIP + T5, FLUX.1-dev's dynamic shift). The
tokenizers are made here over a small vocabulary (nothing is downloaded); every weight is random from
the seed. No folder carries a model card, so everything is read as from a user's own pipeline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# The prompts tests use are made of these words (others tokenize letter by letter).
WORDS = ("a", "an", "the", "red", "blue", "green", "cat", "dog", "bird", "house", "tree", "on", "under", "near",
         "small", "large", "photo", "of", "painting", "at", "night")
PROMPTS = ["a photo of a red cat", "a painting of a blue house at night", "a small green bird on a tree",
           "a large dog near the house"]
FAMILIES = {"pixart": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# Latent side of the images tests generate, and the transformer's blocks (depth pruning halves them).
LATENT = 8
CLIP_LENGTH, T5_LENGTH = 16, 32
WIDTH = 16  # text encoders' width


def _vae(levels: int, latent_channels: int, scaling: float, shift: float | None, quant: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=LATENT * 2 ** (levels - 1), scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=quant, use_post_quant_conv=quant).eval()


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=T5_LENGTH, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)).eval()


def _clip_with_projection(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, bos_token_id=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)).eval()


def build_pixart(tmp: Path):
    """PixArt-Σ's layout: T5 states of width caption_channels, learned variance (8 output channels), no
    resolution conditioning, the DPM-Solver++ scheduler it ships."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from dit_compress.train.scenes_pipeline import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(tmp / "t5", T5_LENGTH, WORDS)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, sample_size=LATENT,
        patch_size=2, cross_attention_dim=16, caption_channels=WIDTH, norm_type="ada_norm_single",
        use_additional_conditions=False)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", solver_order=2)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer, WIDTH),
                               vae=_vae(2, 4, 0.13025, None, True), transformer=transformer, scheduler=scheduler)


def build_sd3(tmp: Path):
    """SD3's layout: the two CLIPs' penultimate states side by side, padded to T5's width, then T5's;
    pooled = both CLIPs' projections; 16-channel-style VAE without quant convs; flow matching, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from dit_compress.train.scenes_pipeline import build_clip_tokenizer, build_t5_tokenizer

    clip_1 = build_clip_tokenizer(tmp / "clip1", CLIP_LENGTH, WORDS)
    clip_2 = build_clip_tokenizer(tmp / "clip2", CLIP_LENGTH, WORDS)
    t5 = build_t5_tokenizer(tmp / "t5", T5_LENGTH, WORDS)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=2 * WIDTH,
        pooled_projection_dim=WIDTH + 8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(2, 4, 1.5305, 0.0609, False),
        text_encoder=_clip_with_projection(clip_1, WIDTH, WIDTH), tokenizer=clip_1,
        text_encoder_2=_clip_with_projection(clip_2, WIDTH, 8), tokenizer_2=clip_2,
        text_encoder_3=_t5(t5, 2 * WIDTH), tokenizer_3=t5)


def build_flux(tmp: Path, guidance_embeds: bool = False):
    """The bundled teacher's tiny build (1 double + 1 single block, made 2 + 2 so depth pruning can
    halve it); with `guidance_embeds`, FLUX.1-dev's configuration (distilled guidance as an input)."""
    from dataclasses import replace

    from diffusers import FluxTransformer2DModel

    from dit_compress.train.scenes_pipeline import ScenesFluxConfig, build_pipeline

    pipe = build_pipeline(replace(ScenesFluxConfig.tiny(), double_blocks=2, single_blocks=2), seed=torch.initial_seed())
    if guidance_embeds:
        pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": True})
    return pipe


BUILDERS = {"pixart": build_pixart, "sd3": build_sd3, "flux": build_flux,
            "flux-dev": lambda tmp: build_flux(tmp, guidance_embeds=True)}


def build_tiny_pipeline(family: str, seed: int = 0):
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = BUILDERS[family](Path(tmp))
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return pipe


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """`folder`: a pipeline folder as `save_pretrained` writes it, with T5 tokenizers named by the class
    that loads tokenizer.json under transformers 4 and 5 (as the published folders do)."""
    pipe = build_tiny_pipeline(family, seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    for key, value in index.items():
        if key.startswith("tokenizer") and value[1] == "T5Tokenizer":
            index[key] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def generate(pipe, prompt: str, steps: int = 2, seed: int = 0):
    """Images (numpy, B x H x W x 3) from a loaded pipeline of any of the families, at LATENT."""
    size = LATENT * pipe.vae_scale_factor
    kwargs = {"use_resolution_binning": False, "clean_caption": False} if type(pipe).__name__.startswith("PixArt") else {}
    return pipe(prompt, height=size, width=size, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images
