"""Train the bundled Flux pipeline teacher `zoo:scenes-flux` on digit scenes, VAE first, then transformer.

    ditc zoo-train --only scenes-flux                  # on this machine's CPU (see CPU_RUN for its cost)
    python benchmarks/gpu_train_scenes_flux.py --out D   # the full run on a GPU, a few minutes

The VAE learns 32x32x3 renders -> 8x8 latents with a reconstruction loss and a small KL term; its
latents are then normalised FLUX's way (`(z - shift_factor) * scaling_factor`, the inverse of what
`FluxPipeline` applies before decoding). The transformer learns rectified flow in FluxPipeline's own
convention: x_sigma = (1 - sigma) x0 + sigma noise, target noise - x0, `timestep` = sigma, with sigmas
drawn logit-normal and shifted as the scheduler shifts them for 16 image tokens. Captions are dropped
to the empty prompt (which the pipeline encodes like any prompt) so that true classifier-free guidance,
`true_cfg_scale` with `negative_prompt=""`, works at sampling time. Everything is seeded: the same seed,
steps and device give the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.scenes import scene_split
from .scenes_pipeline import SCENES_FLUX, ScenesFluxConfig, build_pipeline, save_pipeline

CAPTION_DROPOUT = 0.1
# How the teacher is sampled: true CFG against the empty prompt, at the T5 length it was trained with.
# In the zoo card's terms (`steps`, `guidance_scale`), which `pipeline_kwargs` turns into FluxPipeline's.
SAMPLING = {"steps": 20, "guidance_scale": 4.0, "negative_prompt": "",
            "max_sequence_length": SCENES_FLUX.t5_max_length, "height": 32, "width": 32}
CALIBRATION_PROMPTS = 1024  # distinct training captions shipped as the teacher's calibration prompt set


def pipeline_kwargs(sampling: dict) -> dict:
    """FluxPipeline call arguments for the card's sampling settings."""
    rest = {k: v for k, v in sampling.items() if k not in ("steps", "guidance_scale")}
    return {"num_inference_steps": sampling["steps"], "true_cfg_scale": sampling["guidance_scale"], **rest}
# The default runs. GPU: caps for benchmarks/gpu_train_scenes_flux.py, which fits the step counts to
# a time budget (VAE + transformer in about 4.5 minutes on an H200). CPU: what two cores finish in
# about an hour, under 1 % of the GPU run's training samples: a much weaker teacher, not expected to
# reach the adherence targets. Measured on this project's shared 2-core machine under load: a VAE
# step at batch 32 took 3.8-5.9 s, a transformer step at batch 32 about 8.7 s (5-12 s), so this
# schedule takes about 55 minutes there; the GPU schedule would take about two weeks.
GPU_RUN = {"vae_steps": 3000, "vae_batch": 256, "steps": 6000, "batch": 1024, "n_train": 32768}
CPU_RUN = {"vae_steps": 200, "vae_batch": 32, "steps": 300, "batch": 32, "n_train": 8192}


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1).add(1).mul(127.5).round()


def _cosine(steps: int, warmup: int, floor: float = 0.1):
    return lambda s: min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _autocast(device: str):
    # bf16 matmuls on CUDA; the loss, optimiser and weights stay float32. DITC_FP32=1 turns it off
    # (on the H200 with torch 2.11 a bf16 backward GEMM failed with CUBLAS_STATUS_EXECUTION_FAILED).
    fp32 = os.environ.get("DITC_FP32") == "1"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and not fp32)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, device: str,
              lr: float = 1e-3, kl_weight: float = 1e-6) -> float:
    """Reconstruction (MSE) plus a small KL term; returns the mean loss of the last 100 steps."""
    vae.to(device).train().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, 100))
    losses = []
    for _ in tqdm(range(steps), desc="scenes-flux vae", leave=False):
        x = images[torch.randint(0, len(images), (batch,), generator=g)].to(device, non_blocking=True)
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
            recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
    vae.eval().requires_grad_(False)
    return torch.stack(losses[-100:]).mean().item()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: str, chunk: int = 1024) -> torch.Tensor:
    """Posterior means (deterministic), un-normalised, float32 on `device`."""
    out = []
    for i in range(0, len(images), chunk):
        with _autocast(device):
            out.append(vae.encode(images[i : i + chunk].to(device)).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, device: str) -> float:
    """Reconstruction PSNR (dB) of uint8 renders through the posterior mean, over the whole set."""
    z = encode_latents(vae, images, device)
    recon = torch.cat([vae.decode(z[i : i + 1024]).sample.float() for i in range(0, len(z), 1024)])
    mse = (_to_uint8(recon) - _to_uint8(images.to(device))).pow(2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


def set_latent_normalisation(vae, latents: torch.Tensor) -> None:
    """FLUX's latent normalisation, fitted to the training latents: zero mean, unit variance."""
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int, device: str, chunk: int = 512):
    """T5 sequences and CLIP pooled vectors of each caption, through the pipeline's own encode_prompt."""
    seqs, pooled = [], []
    for i in range(0, len(captions), chunk):
        seq, pool, _ = pipe.encode_prompt(prompt=captions[i : i + chunk], prompt_2=None, device=torch.device(device),
                                          max_sequence_length=max_sequence_length)
        seqs.append(seq.float())
        pooled.append(pool.float())
    return torch.cat(seqs), torch.cat(pooled)


def _sigma_shift(pipe, image_tokens: int) -> float:
    """exp(mu): the sigma shift FluxPipeline applies for this many image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    if not c.use_dynamic_shifting:
        return float(c.shift)
    return math.exp(calculate_shift(image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))


def train_transformer(pipe, latents: torch.Tensor, caption_ids: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor],
                      steps: int, batch: int, seed: int, device: str, lr: float = 3e-4,
                      ema_decay: float = 0.999) -> tuple[torch.nn.Module, float]:
    """Rectified flow with caption dropout; returns the EMA transformer and the final mean loss.

    `latents` are normalised [N, C, h, w]; `text` holds the (T5 sequence, CLIP pooled) table indexed
    by `caption_ids`, whose last row is the empty prompt."""
    from diffusers import FluxPipeline

    model = pipe.transformer.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    seq_table, pooled_table = (t.to(device) for t in text)
    n, c, h, w = latents.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(seq_table.shape[1], 3, device=device)
    shift = _sigma_shift(pipe, (h // 2) * (w // 2))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, 200))
    empty = len(seq_table) - 1
    losses = []
    bar = tqdm(range(steps), desc="scenes-flux transformer", leave=False)
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        cap = caption_ids[idx].clone()
        cap[torch.rand(batch, generator=g) < CAPTION_DROPOUT] = empty
        x0 = FluxPipeline._pack_latents(latents[idx.to(latents.device)].to(device), batch, c, h, w)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.sigmoid(torch.randn(batch, generator=g))
        sigma = (shift * t / (1 + (shift - 1) * t)).to(device)  # the scheduler's shift, exp(mu)/(exp(mu)+1/t-1)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        cap = cap.to(device)
        with _autocast(device):
            pred = model(hidden_states=x_t, timestep=sigma, guidance=None, pooled_projections=pooled_table[cap],
                         encoder_hidden_states=seq_table[cap], txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        losses.append(loss.detach())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{torch.stack(losses[-100:]).mean().item():.4f}")
    return ema, torch.stack(losses[-200:]).mean().item()


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seed: int, sampling: dict = SAMPLING, chunk: int = 256) -> np.ndarray:
    """uint8 [N, 32, 32, 3] images of `prompts` from the pipeline, sampled as the teacher is meant to be;
    the evaluator's `generate(prompts, seed)` once bound to a pipeline."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), chunk):
        part = prompts[i : i + chunk]
        g = torch.Generator().manual_seed(seed * 100003 + i)
        side = sampling["height"] // pipe.vae_scale_factor
        latents = torch.randn(len(part), pipe.transformer.config.in_channels // 4, side, side, generator=g)
        latents = pipe._pack_latents(latents, len(part), latents.shape[1], side, side).to(pipe.device)
        kwargs = dict(pipeline_kwargs(sampling), negative_prompt=[sampling["negative_prompt"]] * len(part))
        images = pipe(part, latents=latents, output_type="np", **kwargs).images
        out.append(np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)


def write_prompt_sets(out_dir: Path, seed: int = 0) -> None:
    """The teacher's prompt sets: training captions for calibration, the held-out prompts for evaluation."""
    from ..data.scenes import HELDOUT_PROMPTS

    train = sorted(set(scene_split("train", n=4 * CALIBRATION_PROMPTS, seed=seed + 2).captions))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(train, size=min(CALIBRATION_PROMPTS, len(train)), replace=False).tolist())
    header = "# {} prompts of the teacher's training distribution (data/scenes.py), for calibration\n"
    (Path(out_dir) / "prompts.txt").write_text(header.format(len(chosen)) + "\n".join(chosen) + "\n")
    held = [text for _, text in HELDOUT_PROMPTS]
    (Path(out_dir) / "eval_prompts.txt").write_text(
        f"# the {len(held)} held-out prompts of the adherence evaluator (evaluate/adherence.py)\n" + "\n".join(held) + "\n")


def train_scenes_flux(out_dir: Path, device: str = "cpu", steps: int | None = None, seed: int = 0,
                      vae_steps: int | None = None, batch: int | None = None, vae_batch: int | None = None,
                      n_train: int | None = None, heldout_renders: int = 1024, measure=None,
                      cfg: ScenesFluxConfig = SCENES_FLUX) -> dict:
    """Train VAE then transformer and write the pipeline folder, its zoo card and metrics.json.

    Unset sizes come from GPU_RUN on CUDA and CPU_RUN otherwise. `measure(generate) -> dict` (the caller's
    prompt-adherence evaluator, `evaluate/adherence.py`, which sits above training) is recorded as the
    teacher's adherence; None skips it."""
    defaults = GPU_RUN if device.startswith("cuda") else CPU_RUN
    steps = defaults["steps"] if steps is None else steps
    vae_steps = defaults["vae_steps"] if vae_steps is None else vae_steps
    batch, vae_batch = batch or defaults["batch"], vae_batch or defaults["vae_batch"]
    n_train = n_train or defaults["n_train"]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(out_dir)
    start = time.time()
    pipe = build_pipeline(cfg, seed)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)

    train = scene_split("train", n=n_train, seed=seed)
    heldout = scene_split("heldout", n=heldout_renders, seed=seed + 1)
    images = _to_unit(train.images)
    render_s = time.time() - start

    t0 = time.time()
    vae_loss = train_vae(pipe.vae, images, vae_steps, vae_batch, seed, device)
    psnr = vae_psnr(pipe.vae, _to_unit(heldout.images), device)
    raw = encode_latents(pipe.vae, images, device)
    set_latent_normalisation(pipe.vae, raw)
    latents = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    vae_s = time.time() - t0

    t0 = time.time()
    captions = sorted(set(train.captions))
    lookup = {text: i for i, text in enumerate(captions)}
    text = encode_captions(pipe, captions + [""], cfg.t5_max_length, device)
    caption_ids = torch.tensor([lookup[text_] for text_ in train.captions])
    ema, loss = train_transformer(pipe, latents, caption_ids, text, steps, batch, seed, device)
    pipe.transformer = ema
    transformer_s = time.time() - t0

    pipe.to("cpu")
    save_pipeline(pipe, out_dir)
    t0 = time.time()
    adherence = None
    if measure is not None:
        pipe.to(device)
        adherence = measure(lambda prompts, s: generate_images(pipe, prompts, s))
    adherence_s = time.time() - t0
    metrics = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "seed": seed, "train_renders": n_train, "distinct_train_captions": len(captions),
        "vae": {"steps": vae_steps, "batch": vae_batch, "final_loss": round(vae_loss, 6),
                "heldout_psnr_db": round(psnr, 2), "heldout_renders": len(heldout.captions),
                "latent_shape": [cfg.latent_channels, cfg.latent_size, cfg.latent_size]},
        "transformer": {"steps": steps, "batch": batch, "caption_dropout": CAPTION_DROPOUT,
                        "final_loss": round(loss, 5), "blocks": [cfg.double_blocks, cfg.single_blocks],
                        "parameters": sum(p.numel() for p in pipe.transformer.parameters())},
        "seconds": {"render": round(render_s, 1), "vae": round(vae_s, 1), "transformer": round(transformer_s, 1),
                    "adherence": round(adherence_s, 1), "total": round(time.time() - start, 1)},
        "weights_mb": round(sum(p.stat().st_size for p in out_dir.rglob("*.safetensors")) / 2 ** 20, 2),
        "sampling": SAMPLING,
        "adherence": adherence,
    }
    card = {
        "name": "scenes-flux",
        "description": f"FluxPipeline for 32x32 digit scenes: FluxTransformer2DModel ({cfg.double_blocks} double + "
                       f"{cfg.single_blocks} single blocks, width {cfg.heads * cfg.head_dim}) over an 8x8x"
                       f"{cfg.latent_channels} AutoencoderKL, frozen random CLIP and T5 text encoders with "
                       "tokenizers over the scenes vocabulary; rectified flow with caption dropout.",
        "dataset": "digit-scenes-32x32", "pipeline": "FluxPipeline", "sampling": SAMPLING,
        "latent_size": cfg.latent_size, "classifier": "scenes-classifier", "adherence": "digit-scenes",
        "prompts": "prompts.txt", "eval_prompts": "eval_prompts.txt",
        "config": cfg.to_dict(), "training": metrics, "retrain": "ditc zoo-train --only scenes-flux",
    }
    write_prompt_sets(out_dir, seed)
    (out_dir / "ditc_zoo.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
