"""Attach, switch, save and load named adapters on a model, for every method the toolchain offers.

The adapters are peft's own, used through `peft.functional` (peft's API for integrations such as
diffusers'): `inject_adapter_in_model` adds one to the diffusers model in place, which stays the
model every family adapter drives, and peft records its config in `model.peft_config`.

A saved adapter is a peft adapter folder, written as `PeftModel.save_pretrained` writes one:
`adapter_config.json` in peft's schema (its `peft_type` names the method) and
`adapter_model.safetensors` keyed as a `PeftModel` keys its parameters, without the adapter's
name, so it loads under any name, here or with `PeftModel.from_pretrained(base, folder)`.
Anything else a tool keeps about an adapter (metrics, samples) goes in files beside the folder.
Loading here is weights-only and strict: every key and shape must fit.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch.nn as nn
from peft import PeftConfig
from pydantic import BaseModel, ConfigDict, Field
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_adapter, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from ..errors import AdapterError, CheckpointError
from ..fileio import atomic_folder, read_json, validate
from .methods import METHODS, PEFT_TYPES, method_for

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_MODEL_PREFIX = "base_model.model."  # how a PeftModel names its base model's parameters


def _configs(model: nn.Module) -> dict[str, PeftConfig]:
    return getattr(model, "peft_config", {})


def adapter_names(model: nn.Module) -> list[str]:
    return list(_configs(model))


def method_of(model: nn.Module) -> str | None:
    """The method of the model's adapters (one per model), None without adapters."""
    for name, config in _configs(model).items():
        method = method_for(config.peft_type)
        if method is None:
            raise AdapterError(f"adapter {name!r} is a {config.peft_type} adapter, which the toolchain does not serve")
        return method
    return None


def make_config(method: str, config: dict) -> PeftConfig:
    """`method`'s peft config from a dict: the method's own fields, or a whole `adapter_config.json`."""
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; available: {', '.join(METHODS)}")
    config_cls = METHODS[method][0]
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise AdapterError(f"{method} adapter config: unknown key(s) {unknown}")
    peft_type = config.get("peft_type", PEFT_TYPES[method])
    if getattr(peft_type, "value", peft_type) != PEFT_TYPES[method]:
        raise AdapterError(f"{method} adapter config: peft_type is {peft_type!r}, not {PEFT_TYPES[method]!r}")
    try:
        return config_cls(**config)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{method} adapter config: {e}") from None


def attach(model: nn.Module, method: str, config: dict, name: str = "default") -> nn.Module:
    """Add adapter `name` of `method` to `model` in place and make it the active one."""
    _inject(model, make_config(method, config), name)
    return model


def _inject(model: nn.Module, config: PeftConfig, name: str) -> None:
    method = method_for(config.peft_type)
    if method_of(model) not in (None, method):
        raise AdapterError(f"the model already carries {method_of(model)} adapters; one method per model")
    if name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {name!r}")
    with warnings.catch_warnings():  # a second adapter on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            inject_adapter_in_model(config, model, name)
        except (TypeError, ValueError) as e:  # e.g. target_modules that name no layer of this model
            _configs(model).pop(name, None)  # peft records the config before injecting
            raise AdapterError(f"{method} adapter {name!r} on {type(model).__name__}: {str(e).splitlines()[0]}") \
                from None
    use(model, name)


def config_dict(config: PeftConfig) -> dict:
    """A peft config as JSON-safe data, in the schema of `adapter_config.json`."""
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    out["peft_type"] = getattr(config.peft_type, "value", config.peft_type)
    return out


def adapter_config(model: nn.Module, name: str) -> dict:
    return config_dict(_configs(model)[name])


def use(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one that runs (one base model serving several tasks)."""
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    set_adapter(model, name)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`, by their full names."""
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    prefix = METHODS[method_of(model)][1].prefix
    return {n: p for n, p in model.named_parameters() if f".{prefix}" in n and f".{name}." in n + "."}


def train_only(model: nn.Module, name: str) -> int:
    """Freeze everything but adapter `name`; returns the trainable parameter count."""
    chosen = adapter_parameters(model, name)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return sum(p.numel() for p in chosen.values())


def _state(model: nn.Module, name: str) -> dict:
    """Adapter `name`'s tensors keyed as in its folder (peft's keys, without the adapter's name)."""
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {PEFT_MODEL_PREFIX + k: v for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, name: str) -> Path:
    """Write adapter `name` (its peft config and only its parameters) to `folder`."""
    folder = Path(folder)
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    tensors = _state(model, name)
    if not tensors:
        raise AdapterError(f"no parameters for adapter {name!r}")
    config = copy.deepcopy(_configs(model)[name])
    config.inference_mode = True  # as peft saves: a loaded adapter serves until asked to train
    with atomic_folder(folder) as tmp:  # the folder appears whole, weights and config together
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp), auto_mapping_dict={"base_model_class": type(model).__name__,
                                                            "parent_library": type(model).__module__})
    return folder


class AdapterSizes(BaseModel):
    """The fields of an `adapter_config.json` that size the tensors an adapter allocates, bounded
    and strictly typed before peft sees them; the rest is peft's schema, checked by its config
    class (its `peft_type` is the schema's name, peft's version field its version)."""

    model_config = ConfigDict(strict=True, extra="allow")
    peft_type: str = Field(max_length=64)
    r: int = Field(4, ge=1, le=1024)
    num_experts: int = Field(4, ge=1, le=64)
    time_dim: int = Field(64, ge=2, le=4096)
    bottleneck: int = Field(4, ge=1, le=4096)
    num_task_classes: int = Field(1, ge=1, le=100_000)
    lora_alpha: float = Field(8, ge=0, le=1e6)
    target_modules: list[str] | str | None = None


def read_config(folder: str | Path) -> tuple[str, PeftConfig]:
    """The method and peft config of the adapter saved in `folder`, or a CheckpointError saying what is wrong."""
    path = Path(folder) / CONFIG_FILE
    spec = read_json(path, "adapter config", CheckpointError, max_bytes=1 << 20)
    if not isinstance(spec, dict) or "peft_type" not in spec:
        raise CheckpointError(f"{path}: not a peft adapter config (it has no peft_type)")
    validate(AdapterSizes, spec, str(path), CheckpointError)  # before peft builds anything
    method = method_for(spec["peft_type"])
    if method is None:
        raise CheckpointError(f"{path}: peft_type {spec['peft_type']!r} is not a method the toolchain serves "
                              f"({', '.join(PEFT_TYPES.values())})")
    try:
        return method, make_config(method, spec)
    except AdapterError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, folder: str | Path, name: str | None = None) -> str:
    """Attach the adapter saved in `folder` as `name` (default: the folder's name) and activate it."""
    folder = Path(folder)
    name = name or folder.name
    _, config = read_config(folder)
    try:
        saved = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot read adapter weights ({e})") from None
    _inject(model, config, name)
    expected = _state(model, name)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for key, p in expected.items():
        if saved[key].shape != p.shape:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(saved[key].shape)}, "
                                  f"the model expects {tuple(p.shape)}")
    set_peft_model_state_dict(model, saved, adapter_name=name)
    return name


def has_adapter_layers(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def describe(model: nn.Module) -> dict | None:
    """What `reattach` needs to rebuild this model's adapters (for manifests); None without adapters.

    Each adapter is recorded by its peft config, as its `adapter_config.json` would hold it.
    """
    if method_of(model) is None:
        return None
    active = [m.active_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)][:1]
    adapters = {name: {**config_dict(config), "inference_mode": True} for name, config in _configs(model).items()}
    return {"method": method_of(model), "adapters": adapters, "active": active[0] if active else []}


def reattach(model: nn.Module, description: dict) -> nn.Module:
    """Rebuild the adapters `describe` recorded (weights are loaded afterwards)."""
    for name, config in description["adapters"].items():
        attach(model, description["method"], config, name)
    if description.get("active"):
        set_adapter(model, description["active"])
    return model
