"""The teacher a checkpoint was made from, pinned: where it is and what it holds.

A checkpoint records its teacher's resolved location (an absolute path, a `zoo:` name or a hub
id, never a path relative to wherever the run started) and a sha256 over the teacher's class,
config and weights; every command that uses the teacher again (distil, evaluate) checks both,
so a moved teacher is an error that says how to point at it and a changed one cannot stand in.
The weights file of the checkpoint itself has its own sha256, checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..models.load import ZOO_PREFIX, LoadedModel, load_transformer, zoo_names

log = logging.getLogger("dit_compress")

TEACHER_FLAG = "--teacher"  # what every command that replays a checkpoint with its teacher takes
_CHUNK = 1 << 20
_model_digests: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (a checkpoint of any size in constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(model: nn.Module) -> str:
    """sha256 over a model's class, config (without the loader's `_` keys, which name the folder)
    and every tensor of its state dict (name, dtype, shape, bytes), tensor by tensor.

    Computed once per model object: a run pins its teacher in every stage's checkpoint."""
    cached = _model_digests.get(model)
    if cached is not None:
        return cached
    h = hashlib.sha256(type(model).__name__.encode())
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    _model_digests[model] = digest = h.hexdigest()
    return digest


def _kind(source: str) -> str:
    if source.startswith(ZOO_PREFIX):
        return "zoo"
    if Path(source).expanduser().exists():
        return "path"
    parts = source.split("/")
    if len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")):
        return "hub"
    return "memory"  # built in this process (a test's model): nothing to load it from again


def pin_teacher(teacher: LoadedModel, model_spec: dict) -> dict:
    """The manifest's `base.teacher`: resolved location, how to read it, and the content hash."""
    source = str(model_spec.get("source") or teacher.source)
    kind = _kind(source)
    config = model_spec.get("config")
    return {
        "source": str(Path(source).expanduser().resolve()) if kind == "path" else source,
        "kind": kind,
        "config": str(Path(config).expanduser().resolve()) if config and Path(config).exists() else config,
        "sha256": model_sha256(teacher.model),
    }


def _present(source: str, kind: str) -> bool:
    if kind == "zoo":
        return source[len(ZOO_PREFIX):] in zoo_names()
    if kind == "path":
        return Path(source).exists()
    return kind == "hub"  # a hub id is looked up by loading it


def load_pinned_teacher(manifest_path: Path, base: dict, override: str | None = None) -> LoadedModel:
    """The teacher recorded in a manifest's `base`, loaded and checked against its hash.

    `override` (the `--teacher` option) is where it is now, when it moved. A manifest written
    before pinning (no `base.teacher`) loads the recorded source as before, with a warning."""
    spec = dict(base.get("model_spec") or {})
    pin = base.get("teacher")
    if pin is None:
        log.warning("%s: written before teachers were pinned: the teacher %s is loaded unchecked (pass %s to "
                    "choose it; a checkpoint written now records its location and hash)", manifest_path,
                    override or spec.get("source"), TEACHER_FLAG)
        return load_transformer(override or spec.get("source") or base["source"], spec.get("subfolder"),
                                spec.get("config"), spec.get("latent_size"))
    source = override or pin["source"]
    if override is None and not _present(source, pin["kind"]):
        what = "was built in memory and never saved" if pin["kind"] == "memory" else "is not there (moved or deleted?)"
        raise CheckpointError(f"{manifest_path}: the teacher {source} {what}; pass {TEACHER_FLAG} PATH to point at it")
    try:
        teacher = load_transformer(source, spec.get("subfolder"), pin.get("config"), spec.get("latent_size"))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the teacher of {manifest_path}; pass {TEACHER_FLAG} PATH to point at it)") from None
    digest = model_sha256(teacher.model)
    if digest != pin["sha256"]:
        raise CheckpointError(f"{manifest_path}: the teacher at {source} is not the one this checkpoint was made from "
                              f"(sha256 {digest[:12]}..., recorded {pin['sha256'][:12]}...); pass {TEACHER_FLAG} "
                              f"PATH to point at the original")
    return teacher
