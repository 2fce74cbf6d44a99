"""Compressed checkpoints: manifest.json (base reference + stage history) + safetensors weights.

`load_compressed` validates the manifest (manifest_schema.py), checks the weights file against
its recorded sha256, rebuilds the base architecture from the stored config, replays every
stage's `build` on its recorded plan (and what its training attached), then loads the weights
strictly. Nothing is pickled. The teacher is pinned (pin.py): `load_teacher` gives it back,
checked, for commands that distil or evaluate again.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_file

from .. import __version__
from ..errors import CheckpointError
from ..models.families import get_adapter
from ..models.load import LoadedModel, build_from_config, load_weights_
from ..models.pipeline import TextPipeline
from ..sampling import NoiseSchedule
from ..train.trainable import replay
from .manifest_schema import FORMAT, LEGACY, read_manifest_file, validate_manifest
from .pin import file_sha256, load_pinned_teacher, pin_teacher
from .stage import Plan, get_stage

log = logging.getLogger("dit_compress")

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


@dataclass
class StageRecord:
    """What restores a stage: its config, its plan, and what its training attached (an adapter)."""

    name: str
    config: dict
    plan: dict
    attached: dict | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config, "plan": self.plan,
                **({"attached": self.attached} if self.attached else {})}


def base_reference(teacher: LoadedModel, model_spec: dict) -> dict:
    """What `restore` needs (class + config) and the teacher pinned: its resolved location and
    content hash (for distilling or evaluating again)."""
    return {
        "source": teacher.source,
        "model_spec": model_spec,
        "class_name": teacher.class_name,
        "config": {k: v for k, v in dict(teacher.model.config).items() if not k.startswith("_")},
        "latent_size": model_spec.get("latent_size") or teacher.latent_size,
        "scheduler_config": teacher.scheduler_config,
        "card": teacher.card,
        "pipeline": teacher.pipeline.record() if teacher.pipeline else None,
        "teacher": pin_teacher(teacher, model_spec),
    }


CONDITIONER = "conditioner"
DIFFUSERS = "diffusers"
PIPELINE = "pipeline"


def save_compressed(folder: Path, model: nn.Module, base: dict, stages: list[StageRecord],
                    recipe_hash: str | None = None, extra: dict | None = None,
                    conditioner: nn.Module | None = None, pipeline: TextPipeline | None = None) -> Path:
    """Write the checkpoint atomically: a reader never sees a half-written folder.

    With the teacher's `pipeline`, the checkpoint also carries `pipeline/`: that pipeline with the
    compressed transformer in place (loadable by stock `from_pretrained` while the transformer is
    a stock class, else by `dit_compress.load_pipeline`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "dit_compress_version": __version__,
        "base": base,
        "stages": [s.to_json() for s in stages],
        "recipe_hash": recipe_hash,
        **(extra or {}),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    manifest["weights_sha256"] = file_sha256(tmp / WEIGHTS)  # same-shape weights swapped in fail the load
    if conditioner is not None:  # tiny, and it makes the checkpoint self-contained
        conditioner.save(tmp / CONDITIONER)
    text = json.dumps(manifest, indent=2) + "\n"
    validate_manifest(json.loads(text), folder / MANIFEST)  # what a reader will get: never write what it refuses
    (tmp / MANIFEST).write_text(text)
    stock = all(get_stage(s.name).is_stock(s.plan) and not s.attached for s in stages)
    if stock:  # still a stock diffusers class: also a folder that plain `from_pretrained` loads
        model.save_pretrained(tmp / DIFFUSERS)
    if pipeline is not None:
        pipeline.write(tmp / PIPELINE, tmp / DIFFUSERS if stock else None)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_manifest(folder: Path) -> dict:
    """The folder's manifest.json, validated (one error naming the file and the field)."""
    return read_manifest_file(Path(folder) / MANIFEST)


def check_weights(folder: Path, manifest: dict) -> None:
    """The weights file is the one the manifest was written with (a manifest before /3: a warning)."""
    path = folder / WEIGHTS
    if manifest["format"] == LEGACY:
        log.warning("%s: format %s records no weights hash: the weights are loaded unchecked (re-save with "
                    "`ditc distill` to pin them)", folder / MANIFEST, LEGACY)
        return
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if file_sha256(path) != manifest["weights_sha256"]:
        raise CheckpointError(f"{path}: not the weights this checkpoint was saved with (its sha256 differs from "
                              f"{MANIFEST}'s weights_sha256): replaced or edited after saving")


def load_compressed(folder: str | Path) -> LoadedModel:
    """Rebuild a compressed model from its folder; outputs equal those before saving."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    manifest = read_manifest(folder)
    check_weights(folder, manifest)
    base = manifest["base"]
    where = folder / MANIFEST
    try:
        NoiseSchedule(base["scheduler_config"])
    except Exception as e:  # noqa: BLE001 - whatever diffusers makes of a bad config: one line
        raise CheckpointError(f"{where}: base.scheduler_config: {str(e).splitlines()[0][:200]}") from None
    conditioner = None
    if (folder / CONDITIONER).is_dir():
        from ..models.conditioner import LabelConditioner

        conditioner = LabelConditioner.load(folder / CONDITIONER)
    # The architecture is built and replayed on the meta device and the saved tensors are then
    # assigned to it: no random initialisation, and one copy of the weights in memory, not two.
    with init_empty_weights():
        try:
            model = build_from_config({"_class_name": base["class_name"], **base["config"]})
            adapter = get_adapter(model, base.get("latent_size"), conditioner)
        except Exception as e:  # noqa: BLE001 - a config diffusers cannot build: one line
            raise CheckpointError(f"{where}: base.config: cannot build {base['class_name']} from it "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        model = _replay_stages(model, manifest["stages"], adapter, folder)
    load_weights_(model, folder / WEIGHTS, "the architecture replayed from the manifest", assign=True)
    model.eval().requires_grad_(False)
    card = base.get("card") or {}
    pipeline = TextPipeline.find(folder / PIPELINE, card)
    return LoadedModel(model, adapter, base["scheduler_config"], f"compressed:{folder}", card,
                       base.get("latent_size"), conditioner, pipeline)


def load_teacher(folder: str | Path, teacher: str | None = None) -> LoadedModel:
    """The teacher a compressed checkpoint was made from, checked against the checkpoint's pin.

    `teacher`: where it is now, if it moved (the CLI's `--teacher`); it must hold the same weights."""
    folder = Path(folder)
    return load_pinned_teacher(folder / MANIFEST, read_manifest(folder)["base"], teacher)


def _replay_stages(model: nn.Module, stages: list[dict], adapter, folder: Path) -> nn.Module:
    for i, rec in enumerate(stages):  # names and configs were validated with the manifest
        stage = get_stage(rec["name"])
        config = stage.config_cls.model_validate(rec["config"])
        try:
            model = stage.build(model, adapter, config, Plan(rec["plan"]))
            if rec.get("attached"):
                model = replay(model, rec["attached"])
        except Exception as e:
            raise CheckpointError(f"{folder}: cannot replay stage {i} ({rec['name']}): {e}") from None
    return model


def load_any(source: str | Path, latent_size: int | None = None) -> LoadedModel:
    """A compressed checkpoint folder (it has a manifest), or anything `load_transformer` takes."""
    from ..models.load import load_transformer

    if (Path(source) / MANIFEST).is_file():
        return load_compressed(source)
    return load_transformer(str(source), latent_size=latent_size)


def load_pipeline(folder: str | Path, device: str = "cpu"):
    """A compressed checkpoint (or its `pipeline/` folder) as a stock diffusers pipeline object: the
    teacher's text encoders, VAE and scheduler around the compressed transformer, whatever stages
    it went through."""
    folder = Path(folder)
    if folder.name == PIPELINE and (folder.parent / MANIFEST).is_file():
        folder = folder.parent
    student = load_compressed(folder)
    if student.pipeline is None:
        raise CheckpointError(f"{folder}: the checkpoint carries no pipeline/ (its teacher was a bare transformer)")
    return student.pipeline.with_transformer(student.model).to(device)
