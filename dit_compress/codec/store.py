"""A trained codec on disk: `config.json` (teacher, channels, lambda) + `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..fileio import read_json, validate, write_atomic
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
    write_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


class CodecConfig(BaseModel):
    """A codec folder's config.json; what else training recorded (`training`) is carried as written."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    teacher: str
    channels: int = Field(ge=1, le=1024)
    hyper_channels: int = Field(ge=1, le=1024)
    width: int = Field(ge=1, le=4096)
    lam: float = Field(alias="lambda", ge=0)


def load_codec(folder: str | Path) -> tuple[DiTCodec, dict]:
    path = Path(folder) / "config.json"
    config = read_json(path, "codec config", CheckpointError)
    c = validate(CodecConfig, config, str(path), CheckpointError)
    codec = DiTCodec(load_transformer(c.teacher).model, c.channels, c.hyper_channels, c.width)
    folder = Path(folder)
    load_weights_(codec, folder / "model.safetensors", f"codec config {folder}/config.json")
    return codec.eval().requires_grad_(False), config
