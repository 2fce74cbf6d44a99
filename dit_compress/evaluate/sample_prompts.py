"""`ditc sample --prompt`: prompts end to end around an exported graph.

The pipeline's own text encoders encode the prompts (and its negative prompt, which guidance pushes
away from), the ONNX Runtime session denoises in the library's sampling loop, and the pipeline's VAE
decodes. A PyTorch reference gets the same conditions and noise and the same VAE, so what differs
between the two is the exported graph alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.manifest import MANIFEST, PIPELINE, load_any, read_manifest
from ..errors import CheckpointError, RecipeError
from ..fileio import save_array, save_image
from ..export.artifact import load_artifact
from ..models.families import adapter_for_pipeline
from ..models.load import ZOO_PREFIX, resolve_source
from ..models.pipeline import INDEX, MAX_PROMPT_CHARS, TextPipeline
from ..sampling import NoiseSchedule, sample_batched
from .metrics import psnr_ssim
from .sample import CheckedGraph

MIN_CELL = 128      # images are scaled up (nearest) to at least this many pixels wide
COLUMNS = 8
FONT, LINE_H = 10, 12
CAPTION_LINES = 3   # a prompt is wrapped to this many lines under its images, the last one shortened
CAPTION_BAND = CAPTION_LINES * LINE_H + 4
LABEL_W = 48        # left margin naming each row (ONNX, PyTorch) when there are several
GAP = 2             # black pixels after each image, so that neighbours with equal backgrounds stay apart


def _pipeline_folder(spec: str | Path) -> tuple[Path, dict] | None:
    """(pipeline folder, its model card) for zoo:NAME, a pipeline folder, a compressed checkpoint
    folder or a `compressed:FOLDER` source; None when `spec` names none of these."""
    spec = str(spec).removeprefix("compressed:")
    if spec.startswith(ZOO_PREFIX):
        source, _, card = resolve_source(spec, None)
        return Path(source), card
    path = Path(spec)
    if (path / MANIFEST).is_file():  # a checkpoint: its pipeline/, and the teacher's card from the manifest
        return (path / PIPELINE, read_manifest(path)["base"].get("card") or {}) \
            if (path / PIPELINE / INDEX).is_file() else None
    if not (path / INDEX).is_file():
        return None
    return path, resolve_source(spec, None)[2]


def find_pipeline(artifact: Path, card: dict, folder: str | None = None) -> TextPipeline:
    """The text encoders and VAE for `artifact`: `folder` (--pipeline), else the pipeline its card
    records, else the run's `checkpoint/` beside its `onnx/`, else the card's source. The
    prompt length and negative prompt are those the card records, so prompts are encoded as they
    were for the model the graph came from."""
    recorded = card.get("pipeline") or {}
    candidates = [folder] if folder is not None else \
        [recorded.get("folder"), artifact.parent.parent / "checkpoint", card.get("source")]
    found = next(filter(None, (_pipeline_folder(c) for c in candidates if c)), None)
    if found is None:
        if folder is not None:
            raise CheckpointError(f"--pipeline {folder}: not a diffusers pipeline folder (no {INDEX}), zoo:NAME "
                                  "or compressed checkpoint with pipeline/")
        looked = ", ".join(str(c) for c in candidates if c)
        raise CheckpointError(f"{artifact}: no pipeline folder for its text encoders and VAE (looked at {looked}); "
                              "pass --pipeline FOLDER")
    path, zoo_card = found
    sampling = {**zoo_card.get("sampling", {}),
                **{k: recorded[k] for k in ("max_sequence_length", "negative_prompt") if k in recorded}}
    pipe = TextPipeline.find(path, {**zoo_card, "sampling": sampling})
    if pipe is None:
        raise CheckpointError(f"{path}: this pipeline folder has no text encoders to encode prompts with")
    family = adapter_for_pipeline(pipe.class_name).family
    if family != card["family"]:
        raise CheckpointError(f"{path} is a {pipe.class_name} (family {family}), but {artifact} is a "
                              f"{card['class_name']} (family {card['family']})")
    return pipe


def _describe(spec: dict[str, tuple[str, tuple]]) -> str:
    return ", ".join(f"{k} {dtype}{list(shape)}" for k, (dtype, shape) in sorted(spec.items()))


def check_conditions(cond: dict[str, torch.Tensor], card: dict, artifact: Path, pipe: TextPipeline) -> None:
    """The encoded prompts must be exactly the inputs the graph was traced with (its text axis is static)."""
    want = {k: (v["dtype"], tuple(v["shape"])) for k, v in card["conditions"].items()}
    got = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape[1:])) for k, v in cond.items()}
    if want != got:
        raise CheckpointError(
            f"{artifact} takes {_describe(want)}, but the text encoders of {pipe.folder} (max_sequence_length "
            f"{pipe.max_sequence_length}) give {_describe(got)}: use the pipeline the graph was exported from")


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts:
        raise RecipeError("no prompts given")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise RecipeError(f"prompt {long + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts


def sample_prompts(artifact: Path, out: Path, prompts: list[str], pipeline: str | None = None,
                   steps: int | None = None, guidance: float | None = None, seed: int = 0,
                   threads: int | None = None, reference: str | None = None) -> dict:
    """Images for `prompts` from the exported `artifact`, a captioned grid at `out` (and the images as
    .npy beside it); with `reference`, the PyTorch path on the same inputs, compared in image space."""
    artifact = Path(artifact)
    prompts = check_prompts(list(prompts))
    loaded = load_artifact(artifact, threads)
    card = loaded.adapter.card
    if card.get("num_classes"):
        raise CheckpointError(f"{artifact} is conditioned on class labels: pass --labels, not prompts")
    pipe = find_pipeline(artifact, card, pipeline)
    steps = steps or card["sampling"]["steps"]
    guidance = card["sampling"]["guidance_scale"] if guidance is None else guidance
    cond = pipe.encode(prompts, loaded.adapter)
    check_conditions(cond, card, artifact, pipe)
    null = pipe.encode([pipe.negative_prompt] * len(prompts), loaded.adapter) if guidance != 1.0 else None
    noise = torch.randn(len(prompts), *loaded.adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))
    schedule = NoiseSchedule(loaded.scheduler_config)
    start = time.time()
    images = pipe.decode(sample_batched(CheckedGraph(loaded.model), loaded.adapter, schedule, cond, noise, steps, guidance,
                                        desc=f"sampling {artifact.name}", null=null))
    result = {"num": len(prompts), "steps": steps, "guidance": guidance, "seconds": time.time() - start,
              "pipeline": str(pipe.folder)}
    rows, labels = [images], None
    if reference is not None:
        ref = load_any(reference, latent_size=loaded.adapter.latent_size)
        if ref.adapter.family != card["family"]:
            raise CheckpointError(f"--reference {reference} is a {ref.class_name}, but {artifact} is a "
                                  f"{card['class_name']}")
        try:
            ref_latents = sample_batched(ref.model, ref.adapter, schedule, cond, noise, steps, guidance,
                                         desc=f"sampling {reference} (PyTorch reference)", null=null)
        except (RuntimeError, ValueError) as e:  # e.g. another pipeline's transformer (other text width)
            raise CheckpointError(f"--reference {reference} cannot denoise {artifact}'s inputs: "
                                  f"{str(e).splitlines()[0]}") from None
        ref_images = pipe.decode(ref_latents)
        result["psnr_db_vs_reference"] = psnr_ssim(ref_images, images)[0]  # capped at 100 dB
        result["max_abs_diff_vs_reference"] = float((ref_images - images).abs().max())
        rows, labels = [images, ref_images], ["ONNX", "PyTorch"]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_array(images.numpy(), out.with_suffix(".npy"))
    save_prompt_grid(rows, prompts, out, labels)
    result["written"] = [str(out), str(out.with_suffix(".npy"))]
    return result


def save_prompt_grid(rows: list[torch.Tensor], prompts: list[str], path: Path,
                     row_labels: list[str] | None = None, columns: int = COLUMNS) -> None:
    """Images in [-1, 1] as one PNG: per prompt a column of `rows` (e.g. ONNX above PyTorch), the
    prompt wrapped beneath; `row_labels` name the rows in a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = rows[0].shape
    scale = -(-MIN_CELL // w)
    cell_w, cell_h = w * scale, h * scale
    pitch_w, pitch_h = cell_w + GAP, cell_h + GAP
    block_h = len(rows) * pitch_h + CAPTION_BAND
    margin = LABEL_W if row_labels else 0
    grid = Image.new("RGB", (margin + min(n, columns) * pitch_w, -(-n // columns) * block_h))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=FONT)
    tiles = [((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
             for r in rows]
    for i in range(n):
        b, col = divmod(i, columns)
        x, y = margin + col * pitch_w, b * block_h
        for r, pixels in enumerate(tiles):
            grid.paste(Image.fromarray(pixels[i]).resize((cell_w, cell_h), Image.NEAREST), (x, y + r * pitch_h))
        for k, line in enumerate(wrap_caption(prompts[i] or "(empty prompt)", cell_w - 4, draw, font)):
            draw.text((x + 2, y + len(rows) * pitch_h + k * LINE_H), line, fill=(255, 255, 255), font=font)
    for b in range(-(-n // columns) if row_labels else 0):
        for r, label in enumerate(row_labels):
            draw.text((2, b * block_h + r * pitch_h + (cell_h - LINE_H) // 2), label, fill=(255, 255, 255),
                      font=font)
    save_image(grid, path)


def wrap_caption(text: str, width: float, draw, font, lines: int = CAPTION_LINES) -> list[str]:
    """`text` in at most `lines` lines of at most `width` pixels, broken at spaces (inside a word
    too long for one line); the last line ends in "..." when the text does not fit."""
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    out, line = [], ""
    for word in text.split():
        while word:
            candidate = f"{line} {word}" if line else word
            if fits(candidate):
                line, word = candidate, ""
            elif line:
                out.append(line)
                line = ""
            else:  # one word wider than the line: cut it
                cut = next(k for k in range(len(word), 0, -1) if k == 1 or fits(word[:k]))
                out.append(word[:cut])
                word = word[cut:]
    out.append(line)
    out = [s for s in out if s]
    if len(out) > lines:
        last = out[lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        out = out[: lines - 1] + [last.rstrip() + "..."]
    return out
