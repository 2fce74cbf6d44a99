"""A trained codec on disk: `config.json` (teacher, channels, lambda) + `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models.load import load_transformer
from ..models.load_weights import load_weights_
from .model import DiTCodec


def save_codec(codec: DiTCodec, folder: str | Path, teacher: str, lam: float, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # config.json last and by rename: its presence marks a complete codec (`ditc codec train` resumes on it).
    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"teacher": teacher, "channels": codec.channels, "hyper_channels": codec.hyper_channels,
              "width": codec.g_a[0][0].out_channels, "lambda": lam, **(extra or {})}
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(folder / "config.json")
    return folder


def load_codec(folder: str | Path) -> tuple[DiTCodec, dict]:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/config.json: not a codec ({e})") from None
    codec = DiTCodec(load_transformer(config["teacher"]).model, config["channels"], config["hyper_channels"],
                     config["width"])
    load_weights_(codec, folder / "model.safetensors", f"codec config {folder}/config.json")
    return codec.eval().requires_grad_(False), config
