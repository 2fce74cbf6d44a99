"""Attach, switch, save and load named adapters on a model, for every method the toolchain offers.

One folder per adapter: `adapter_config.json` (method + config) and `adapter_model.safetensors`
holding only the method's parameters (selected by its prefix), keyed without the adapter's
name as peft does, so an adapter loads under any name. Loading is weights-only and strict.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch.nn as nn
from peft import LoraConfig, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from safetensors.torch import load_file, save_file

from ..errors import AdapterError, CheckpointError
from .diffscaler import DiffScalerConfig, DiffScalerModel
from .td_lora import TDLoraConfig, TDLoraModel

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# method -> (config class, tuner class). Plain LoRA is peft's own.
METHODS = {
    "lora": (LoraConfig, LoraModel),
    "td_lora": (TDLoraConfig, TDLoraModel),
    "diffscaler": (DiffScalerConfig, DiffScalerModel),
}


def method_of(model: nn.Module) -> str | None:
    return getattr(model, "_ditc_adapter_method", None)


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "_ditc_adapters", {}))


def attach(model: nn.Module, method: str, config: dict, name: str = "default") -> nn.Module:
    """Add adapter `name` of `method` to `model` in place and make it the active one."""
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; available: {', '.join(METHODS)}")
    if method_of(model) not in (None, method):
        raise AdapterError(f"the model already carries {method_of(model)} adapters; one method per model")
    if name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {name!r}")
    config_cls, tuner_cls = METHODS[method]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise AdapterError(f"{method} adapter config: unknown key(s) {unknown}")
    try:
        cfg = config_cls(**config)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{method} adapter {name!r}: {e}") from None
    with warnings.catch_warnings():  # a second adapter on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            tuner_cls(model, cfg, name)
        except (TypeError, ValueError) as e:  # e.g. target_modules that name no layer of this model
            raise AdapterError(f"{method} adapter {name!r} on {type(model).__name__}: {str(e).splitlines()[0]}") \
                from None
    model._ditc_adapter_method = method
    model._ditc_adapters = {**getattr(model, "_ditc_adapters", {}), name: dict(config)}
    use(model, name)
    return model


def adapter_config(model: nn.Module, name: str) -> dict:
    return dict(model._ditc_adapters[name])


def use(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one that runs (one base model serving several tasks)."""
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    set_adapter(model, name)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`, by their full names."""
    prefix = _prefix(model)
    return {n: p for n, p in model.named_parameters() if f".{prefix}" in n and f".{name}." in n + "."}


def train_only(model: nn.Module, name: str) -> int:
    """Freeze everything but adapter `name`; returns the trainable parameter count."""
    chosen = adapter_parameters(model, name)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return sum(p.numel() for p in chosen.values())


def _prefix(model: nn.Module) -> str:
    method = method_of(model)
    if method is None:
        raise AdapterError("the model has no adapters")
    return METHODS[method][1].prefix


def _strip(key: str, name: str) -> str:
    return key.replace(f".{name}.", ".") if f".{name}." in key else key.removesuffix(f".{name}")


def save_adapter(model: nn.Module, folder: str | Path, name: str) -> Path:
    """Write adapter `name` (its config and only its parameters) to `folder`."""
    folder = Path(folder)
    params = adapter_parameters(model, name)
    if not params:
        raise AdapterError(f"no parameters for adapter {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_strip(n, name): p.detach().contiguous() for n, p in params.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"method": method_of(model)})
    (folder / CONFIG_FILE).write_text(json.dumps(
        {"method": method_of(model), "config": model._ditc_adapters[name]}, indent=2) + "\n")
    return folder


def load_adapter(model: nn.Module, folder: str | Path, name: str | None = None) -> str:
    """Attach the adapter saved in `folder` as `name` (default: the folder's name) and activate it."""
    folder = Path(folder)
    name = name or folder.name
    try:
        spec = json.loads((folder / CONFIG_FILE).read_text())
        method, config = spec["method"], spec["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not an adapter config ({e})") from None
    try:
        saved = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot read adapter weights ({e})") from None
    attach(model, method, config, name)
    params = {_strip(n, name): p for n, p in adapter_parameters(model, name).items()}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for key, p in params.items():
        if saved[key].shape != p.shape:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(saved[key].shape)}, "
                                  f"the model expects {tuple(p.shape)}")
        p.data.copy_(saved[key])
    return name


def has_adapter_layers(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def describe(model: nn.Module) -> dict | None:
    """What `reattach` needs to rebuild this model's adapters (for manifests); None without adapters."""
    if method_of(model) is None:
        return None
    active = [m.active_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)][:1]
    return {"method": method_of(model), "adapters": model._ditc_adapters, "active": active[0] if active else []}


def reattach(model: nn.Module, description: dict) -> nn.Module:
    """Rebuild the adapters `describe` recorded (weights are loaded afterwards)."""
    for name, config in description["adapters"].items():
        attach(model, description["method"], config, name)
    if description.get("active"):
        set_adapter(model, description["active"])
    return model
