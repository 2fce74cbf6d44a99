"""`ditc sample`: the sampling loop around an exported graph, no PyTorch network involved.

The loop is the library's own `sample` (diffusers scheduler, classifier-free guidance), with
the denoiser being an ONNX Runtime session; so an artifact samples exactly as the PyTorch
model it came from, which `--reference` measures on the same noise.
"""

from __future__ import annotations

import io
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..fileio import read_bytes, save_array, save_image
from ..export.artifact import load_artifact
from ..sampling import NoiseSchedule, sample_batched
from .metrics import psnr_ssim


class CheckedGraph:
    """An exported denoiser whose every output is checked before the sampler uses it: finite, and
    shaped like its `sample` input. A graph that breaks either gives one error and writes nothing
    (ONNX Runtime returns whatever the graph computes, NaN or a wrong shape included)."""

    def __init__(self, denoiser):
        self.denoiser, self.path = denoiser, denoiser.path

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.denoiser(x, t, cond)
        if tuple(out.shape) != tuple(x.shape):
            raise CheckpointError(f"{self.path}: the graph returned shape {tuple(out.shape)} for a sample of shape "
                                  f"{tuple(x.shape)}; it does not fit its card (export it again)")
        if not bool(torch.isfinite(out).all()):
            raise CheckpointError(f"{self.path}: the graph returned non-finite values (NaN or inf) at timestep "
                                  f"{float(t.flatten()[0]):.4g}; nothing written")
        return out


MAX_SAMPLES = 10_000  # rows of a --conditions file


def read_conditions(path: Path, specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The condition arrays of an .npz, each checked against its card entry (dtype, per-sample
    shape, one row count) from the array's header, before the array is read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(read_bytes(path, "conditions file", CheckpointError)))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not an .npz file (not a zip archive)") from None
    out, rows = {}, set()
    with archive:
        missing = sorted(k for k in specs if f"{k}.npy" not in archive.namelist())
        if missing:
            raise CheckpointError(f"{path}: missing condition array(s) {missing}; the card asks for {sorted(specs)}")
        for name, spec in specs.items():
            where = f"{path}: {name}"
            try:
                with archive.open(f"{name}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(f))
                    got = (str(dtype), tuple(shape[1:]))
                    if not shape or got != (spec["dtype"], tuple(spec["shape"])) or not 1 <= shape[0] <= MAX_SAMPLES:
                        raise CheckpointError(
                            f"{where}: expected {spec['dtype']} of shape (N, {', '.join(map(str, spec['shape']))}) "
                            f"with 1 <= N <= {MAX_SAMPLES}, got {dtype} of shape {tuple(shape)}")
                with archive.open(f"{name}.npy") as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise CheckpointError(f"{where}: unreadable array ({str(e).splitlines()[0][:200]})") from None
            rows.add(shape[0])
            out[name] = torch.from_numpy(array.copy())
    if len(rows) > 1:
        raise CheckpointError(f"{path}: the condition arrays have different row counts {sorted(rows)}")
    return out


def artifact_conditions(adapter, labels: str | None, num: int, conditions: Path | None) -> dict[str, torch.Tensor]:
    """Conditions from --labels (class-conditional cards) or an .npz of arrays named like the card's inputs."""
    card = adapter.card
    if conditions is not None:
        cond = read_conditions(conditions, card["conditions"])
        labels_ = cond.get("class_labels")
        if labels_ is not None and adapter.num_classes and not bool(((labels_ >= 0) & (labels_ <= adapter.num_classes)).all()):
            raise CheckpointError(f"{conditions}: class_labels outside 0..{adapter.num_classes} "
                                  f"({adapter.num_classes}: unconditioned)")
        return cond
    if not adapter.num_classes:
        raise CheckpointError(f"this artifact is conditioned on {sorted(card['conditions'])}, not class labels: "
                              "pass --conditions FILE.npz")
    if labels is None:
        return {"class_labels": torch.arange(num) % adapter.num_classes}
    try:
        ids = [int(v) for v in labels.split(",")]
    except ValueError:
        raise CheckpointError(f"--labels: expected comma-separated integers, got {labels!r}") from None
    bad = [i for i in ids if not 0 <= i < adapter.num_classes]
    if bad:
        raise CheckpointError(f"--labels: {bad} outside 0..{adapter.num_classes - 1}")
    return {"class_labels": torch.tensor(ids)}


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 10, labels: list[str] | None = None,
                    scale: int = 4) -> None:
    """Pixel-space samples in [-1, 1] as one PNG grid, each image's label (its class) beneath it."""
    from PIL import Image, ImageDraw, ImageFont

    n, c, h, w = images.shape
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    font = ImageFont.load_default(size=10) if labels else None
    cell_w, cell_h = w * scale, h * scale + (14 if labels else 0)
    grid = Image.new("L" if c == 1 else "RGB", (min(n, columns) * cell_w, -(-n // columns) * cell_h))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, col = divmod(i, columns)
        tile = Image.fromarray(pixels[i][..., 0] if c == 1 else pixels[i]).resize((cell_w, h * scale), Image.NEAREST)
        grid.paste(tile, (col * cell_w, r * cell_h))
        if labels:
            x = col * cell_w + (cell_w - draw.textlength(labels[i], font=font)) / 2
            draw.text((x, r * cell_h + h * scale + 1), labels[i], fill=255 if c == 1 else (255, 255, 255), font=font)
    save_image(grid, path)


def sample_artifact(artifact: Path, out: Path, labels: str | None = None, num: int = 20,
                    conditions: Path | None = None, steps: int | None = None, guidance: float | None = None,
                    seed: int = 0, threads: int | None = None, reference: str | None = None) -> dict:
    loaded = load_artifact(artifact, threads)
    card = loaded.adapter.card
    steps = steps or card["sampling"]["steps"]
    guidance = card["sampling"]["guidance_scale"] if guidance is None else guidance
    cond = artifact_conditions(loaded.adapter, labels, num, conditions)
    n = next(iter(cond.values())).shape[0]
    noise = torch.randn(n, *loaded.adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))
    schedule = NoiseSchedule(loaded.scheduler_config)
    start = time.time()
    images = sample_batched(CheckedGraph(loaded.model), loaded.adapter, schedule, cond, noise, steps, guidance,
                            desc=f"sampling {Path(artifact).name}")
    result = {"num": n, "steps": steps, "guidance": guidance, "seconds": time.time() - start}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_array(images.numpy(), out.with_suffix(".npy"))
    # Latents of a non-pixel card are no picture: only the .npy is written, and said so.
    result["written"] = [str(out.with_suffix(".npy"))]
    if card.get("pixel_space"):
        result["written"].insert(0, str(out))
        labels = cond.get("class_labels")
        save_image_grid(images, out, labels=[str(int(v)) for v in labels] if labels is not None
                        else [f"#{i}" for i in range(n)])  # --conditions: the row of the .npz arrays
    if reference is not None:
        from ..core.manifest import load_any

        ref = load_any(reference)
        ref_images = sample_batched(ref.model, ref.adapter, schedule, cond, noise, steps, guidance,
                                    desc=f"sampling {reference} (PyTorch reference)")
        result["psnr_db_vs_reference"] = psnr_ssim(ref_images, images)[0]  # capped at 100 dB
        result["max_abs_diff_vs_reference"] = float((ref_images - images).abs().max())
    return result
