"""Load a transformer from the zoo, a local diffusers folder, a hub id, or a safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..errors import CheckpointError
from .families import SUPPORTED_CLASSES, FamilyAdapter, adapter_for_class, get_adapter
from .load_weights import load_weights_
from .pipeline import TextPipeline, quiet_loading

# A model that ships no scheduler is sampled as rectified flow.
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

ZOO_DIR = Path(__file__).parent / "zoo"
ZOO_PREFIX = "zoo:"


@dataclass
class LoadedModel:
    """A model with everything the pipeline needs to run it."""

    model: nn.Module
    adapter: FamilyAdapter
    scheduler_config: dict
    source: str
    card: dict = field(default_factory=dict)  # zoo card (classes, classifier, sampling) or {}
    latent_size: int | None = None
    conditioner: nn.Module | None = None  # label -> prompt embeddings, for label-driven text families
    pipeline: "TextPipeline | None" = None  # the text-to-image pipeline the transformer came in

    def __post_init__(self):
        # Example and synthetic prompts laid out as the pipeline's encoded ones (length, padding mask):
        # an exported graph's text axis is static, so this is what encoded prompts must fit.
        if self.pipeline is not None and not self.adapter.num_classes:
            self.adapter.follow_pipeline(self.pipeline.text_tokens)

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    def with_model(self, model: nn.Module) -> "LoadedModel":
        """The same setting (scheduler, card, conditioner, pipeline) around another model, e.g. a student."""
        return LoadedModel(model, get_adapter(model, self.latent_size, self.conditioner), self.scheduler_config,
                           self.source, self.card, self.latent_size, self.conditioner, self.pipeline)


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "ditc_zoo.json").is_file())


def resolve_source(source: str, subfolder: str | None) -> tuple[str, str | None, dict]:
    """Map `zoo:NAME` to its folder; default a pipeline folder's subfolder to `transformer`."""
    if source.startswith(ZOO_PREFIX):
        name = source[len(ZOO_PREFIX):]
        folder = ZOO_DIR / name
        if not (folder / "ditc_zoo.json").is_file():
            raise CheckpointError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names()) or 'none'}")
        source, subfolder = str(folder), subfolder or "transformer"
    path = Path(source)
    # A folder with a zoo card (the bundled models, or one written by `ditc zoo-train --out`).
    card = json.loads((path / "ditc_zoo.json").read_text()) if (path / "ditc_zoo.json").is_file() else {}
    if path.is_dir() and subfolder is None and not (path / "config.json").is_file() \
            and (path / "transformer" / "config.json").is_file():
        subfolder = "transformer"  # a pipeline folder: the denoiser lives in transformer/
    return source, subfolder, card


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _class_of(config: dict, where: str) -> type[nn.Module]:
    import diffusers

    name = config.get("_class_name")
    if name is None:
        raise CheckpointError(f"{where}: config has no '_class_name'; is this a diffusers model config?")
    adapter_for_class(name)  # raises with the list of supported classes
    return getattr(diffusers, name)


def _scheduler_config(source: str) -> dict:
    """The scheduler that ships beside the transformer in a pipeline folder, else rectified flow."""
    cfg = Path(source) / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())
    return dict(DEFAULT_SCHEDULER)


def load_transformer(
    source: str, subfolder: str | None = None, config: str | None = None, latent_size: int | None = None
) -> LoadedModel:
    """Load a supported diffusers transformer.

    `source` is `zoo:NAME`, a local folder (a pipeline folder or a model folder), a hub id
    (`org/name`, same code path as a folder), or a `.safetensors` file with `config` naming its
    config.json.
    """
    source_in = source
    source, subfolder, card = resolve_source(source, subfolder)
    path = Path(source)
    if path.suffix == ".safetensors":
        model = _load_safetensors_file(path, config)
    elif path.exists() or _looks_like_hub_id(source):
        model = _load_pretrained(source, subfolder)
    else:
        raise CheckpointError(f"model source not found: {source!r} (expected zoo:NAME, a folder, "
                              f"a hub id org/name, or a .safetensors file)")
    model.eval().requires_grad_(False)
    conditioner = None
    if card.get("conditioner"):
        from .conditioner import LabelConditioner

        conditioner = LabelConditioner.load(Path(source) / card["conditioner"])
    pipeline = TextPipeline.find(path, card) if path.is_dir() and subfolder == "transformer" else None
    latent_size = latent_size or card.get("latent_size")
    if latent_size is None and pipeline is not None and not model.config.get("sample_size"):
        latent_size = adapter_for_class(type(model).__name__).pipeline_latent_size
    return LoadedModel(model, get_adapter(model, latent_size, conditioner), _scheduler_config(source),
                       source_in, card, latent_size, conditioner, pipeline)


def _read_config(source: str, subfolder: str | None) -> dict:
    """config.json of a local folder, or of a hub repository (downloaded like from_pretrained does)."""
    local = Path(source) / (subfolder or "") / "config.json"
    if Path(source).exists():
        path = local
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "config.json", subfolder=subfolder))
    return json.loads(path.read_text())


def _load_pretrained(source: str, subfolder: str | None) -> nn.Module:
    where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        cfg = _read_config(source, subfolder)
    except Exception as e:  # missing file, bad JSON, or hub errors (offline, unknown repo)
        raise CheckpointError(f"cannot read the model config of {where}: {str(e).splitlines()[0]}") from None
    cls = _class_of(cfg, where)
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(source, subfolder=subfolder, low_cpu_mem_usage=True,
                                              output_loading_info=True)
    except Exception as e:
        raise CheckpointError(f"cannot load weights of {where}: {str(e).splitlines()[0]}") from None
    check_loading_info(info, where)
    return model


def check_loading_info(info: dict, where: str) -> None:
    """Weights that do not fit the config are an error: diffusers only logs a warning, then drops
    the extra blocks or leaves the missing ones at their random initialisation."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in info.get("mismatched_keys") or []]
    if missing or unexpected or mismatched:
        parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:2])})" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if keys]
        raise CheckpointError(f"{where}: the weights do not match config.json (a wrong num_layers or width?): "
                              f"weights {'; '.join(parts)}")


def _load_safetensors_file(path: Path, config: str | None) -> nn.Module:
    if config is None:
        raise CheckpointError(f"{path}: a bare .safetensors file needs `config:` naming its config.json")
    cfg_path = Path(config)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read model config {cfg_path}: {e}") from None
    from accelerate import init_empty_weights

    with init_empty_weights():  # the file's tensors become the weights: one copy in memory
        model = _class_of(cfg, str(cfg_path)).from_config(cfg)
    return load_weights_(model, path, f"its config {cfg_path}", assign=True)


def build_from_config(config: dict) -> nn.Module:
    """Instantiate a supported class from a config dict (weights left at their initialisation)."""
    cls = _class_of(config, "config")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


__all__ = ["LoadedModel", "SUPPORTED_CLASSES", "build_from_config", "load_transformer", "zoo_names"]
