"""manifest.json, as a schema: strict types, bounded sizes, versioned; validated before any field
is used. Every problem is one `CheckpointError` line naming the file, the field and what was
expected (the CLI's exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ..errors import CheckpointError, RecipeError
from ..models.families import SUPPORTED_CLASSES
from .stage import get_stage

FORMAT = "ditc-compressed/3"  # /3: the teacher pinned (location + sha256) and the weights' sha256
LEGACY = "ditc-compressed/2"  # read with a warning: nothing to check the teacher or the weights against
MAX_MANIFEST_BYTES = 64 << 20
MAX_STAGES = 256
MAX_INT = 1 << 20  # no transformer config holds a larger integer (widths, lengths, sizes)
MAX_BLOCKS = 1024  # per block list: more would only make the restore build for minutes
BLOCK_KEYS = ("num_layers", "num_single_layers", "num_attention_heads")

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, StringConstraints(max_length=4096)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
JsonObject = Annotated[dict[Name, Any], Field(max_length=1024)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TeacherPin(_Strict):
    source: Text = Field(description="absolute path, zoo:NAME or hub id")
    kind: Literal["path", "zoo", "hub", "memory"]
    config: Text | None = None
    sha256: Sha256


class ModelSpecRecord(_Strict):
    source: Text | None = None
    subfolder: Text | None = None
    config: Text | None = None
    latent_size: int | None = Field(None, ge=2, le=4096)


class BaseRecord(_Strict):
    source: Text
    model_spec: ModelSpecRecord
    class_name: Literal[tuple(SUPPORTED_CLASSES)]  # type: ignore[valid-type]
    config: JsonObject
    latent_size: int | None = Field(None, ge=2, le=4096)
    scheduler_config: JsonObject
    card: JsonObject | None = None
    pipeline: JsonObject | None = None
    teacher: TeacherPin | None = None


class StageEntry(_Strict):
    name: Name
    config: JsonObject
    plan: JsonObject
    attached: JsonObject | None = None


class Manifest(_Strict):
    format: Literal[FORMAT, LEGACY]  # type: ignore[valid-type]
    dit_compress_version: Name
    base: BaseRecord
    stages: list[StageEntry] = Field(max_length=MAX_STAGES)
    recipe_hash: Name | None = None
    weights_sha256: Sha256 | None = None
    recipe: JsonObject | None = None
    summaries: list[JsonObject] | None = Field(None, max_length=MAX_STAGES)
    resume_key: Name | None = None
    variant: Name | None = None


def _where(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fail(path: Path, field: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {field}: {what}" if field else f"{path}: {what}")


def _describe(e: ValidationError, path: Path, prefix: str = "") -> CheckpointError:
    err = e.errors()[0]
    field = _where([*([prefix] if prefix else []), *err["loc"]])
    more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return _fail(path, field, f"unknown field{more}")
    if err["type"] == "missing":
        return _fail(path, field, f"missing{more}")
    got = repr(err.get("input"))
    return _fail(path, field, f"{err['msg']} (got {got[:60] + '...' if len(got) > 60 else got}){more}")


def _check_config_sizes(config: dict, path: Path) -> None:
    for key, value in config.items():
        field = f"base.config.{key}"
        if isinstance(value, bool):
            continue
        top = MAX_BLOCKS if key in BLOCK_KEYS else MAX_INT
        if isinstance(value, int) and not -MAX_INT <= value <= top:
            raise _fail(path, field, f"{value} is out of range (at most {top})")
        if isinstance(value, (list, dict)) and len(value) > MAX_BLOCKS:
            raise _fail(path, field, f"{len(value)} entries (at most {MAX_BLOCKS})")


def validate_manifest(raw: Any, path: Path) -> dict:
    """The manifest `raw` (parsed JSON) checked field by field; returns it unchanged when valid."""
    if not isinstance(raw, dict):
        raise _fail(path, "", f"not a manifest (expected a JSON object, got {type(raw).__name__})")
    fmt = raw.get("format")
    if fmt not in (FORMAT, LEGACY):
        raise _fail(path, "format", f"unknown format {str(fmt)[:60]!r} (this dit_compress reads {FORMAT} and "
                                    f"{LEGACY}; a newer one may have written it)")
    try:
        m = Manifest.model_validate(raw)
    except ValidationError as e:
        raise _describe(e, path) from None
    if fmt == FORMAT:
        for field, value in (("base.teacher", m.base.teacher), ("weights_sha256", m.weights_sha256)):
            if value is None:
                raise _fail(path, field, f"missing ({FORMAT} pins the teacher and the weights)")
    _check_config_sizes(m.base.config, path)
    for i, stage in enumerate(m.stages):
        try:
            cls = get_stage(stage.name).config_cls
        except RecipeError as e:
            raise _fail(path, f"stages[{i}].name", str(e)) from None
        try:
            cls.model_validate(stage.config)
        except ValidationError as e:
            raise _describe(e, path, f"stages[{i}].config") from None
    return raw


def read_manifest_file(path: Path) -> dict:
    """Read and validate one manifest.json (size-bounded before parsing)."""
    if not path.is_file():
        raise CheckpointError(f"not a compressed checkpoint: {path} is missing")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt manifest (not JSON: {str(e).splitlines()[0][:120]})") from None
    return validate_manifest(raw, path)
