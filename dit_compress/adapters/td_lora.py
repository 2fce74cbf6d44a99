"""TD-LoRA (DyDiT++): a timestep-dynamic low-rank update, built as a peft tuner.

Each targeted linear layer W gets K low-rank experts B_k A_k and a router on the timestep
embedding: y = W x + (alpha / r) * sum_k g_k(t) B_k A_k x, g = softmax(router(emb(t))).
B starts at zero, so the adapted model starts exactly as the base model. The timestep reaches
the layers through a forward pre-hook on the adapted model that embeds its `timestep`
argument once per call (sinusoidal, as diffusers embeds timesteps); each layer's router
is its own. Parameters carry the `tdlora_` prefix, so an adapter is a filter on state-dict keys.
The config's peft type is `TD_LORA`; `dit_compress.adapters.methods` registers it with peft.

Because the update depends on t, there is no single merged weight: `bake_timestep` merges the
update for one timestep of a fixed sampling schedule into plain linear layers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..errors import AdapterError

TD_LORA, PREFIX = "TD_LORA", "tdlora_"  # peft type and parameter prefix


@dataclass
class TDLoraConfig(PeftConfig):
    r: int = field(default=4, metadata={"help": "rank of each expert"})
    num_experts: int = field(default=4, metadata={"help": "low-rank experts mixed by the timestep router"})
    lora_alpha: float = field(default=4.0, metadata={"help": "update scale is lora_alpha / r"})
    time_dim: int = field(default=64, metadata={"help": "size of the sinusoidal timestep embedding"})
    time_scale: float = field(default=1.0, metadata={"help": "multiplies the timestep before embedding "
                                                             "(1000 for models fed t in [0, 1])"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = TD_LORA
        if self.r < 1 or self.num_experts < 1:
            raise ValueError(f"TD-LoRA needs r >= 1 and num_experts >= 1, got r={self.r}, "
                             f"num_experts={self.num_experts}")
        if self.target_modules is None:
            raise ValueError("TD-LoRA: name the layers to adapt in target_modules")


class TimestepFeatures:
    """The embedded timestep of the current forward call, shared by every TD-LoRA layer."""

    def __init__(self, dim: int, scale: float):
        self.dim, self.scale = dim, scale
        self.value: torch.Tensor | None = None

    def hook(self, _module, args, kwargs):
        from diffusers.models.embeddings import get_timestep_embedding

        t = timestep_argument(args, kwargs)
        self.value = get_timestep_embedding(t * self.scale, self.dim, flip_sin_to_cos=True, downscale_freq_shift=0)

    @staticmethod
    def of(model: nn.Module, config: TDLoraConfig, adapter_name: str) -> TimestepFeatures:
        """The model's shared timestep features, installed with its first TD-LoRA adapter."""
        time = getattr(model, "_tdlora_time", None)
        if time is None:
            time = TimestepFeatures(config.time_dim, config.time_scale)
            model._tdlora_time = time
            model.register_forward_pre_hook(time.hook, with_kwargs=True)
        elif (time.dim, time.scale) != (config.time_dim, config.time_scale):
            raise ValueError(f"TD-LoRA adapter {adapter_name!r}: time_dim/time_scale must match the adapters "
                             f"already on the model ({time.dim}, {time.scale})")
        return time


def timestep_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """The `timestep` a diffusers transformer is called with, as a float vector."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise ValueError("TD-LoRA: the adapted model must be called with `timestep`")
    return torch.as_tensor(t, dtype=torch.float32).reshape(-1)


class _Seen(Exception):
    pass


def timestep_scale(model: nn.Module) -> float:
    """What brings the timestep `model` is called with to the 0..1000 scale the router embeds.

    Measured, not looked up: the family's own denoise call at t = 1000 is stopped as it enters the
    model, and the `timestep` it passes is read (1000 for DiT-style families, 1 for Flux's [0, 1]).
    """
    from ..models.families import get_adapter

    family = get_adapter(model)
    seen: list[torch.Tensor] = []

    def stop(_module, args, kwargs):
        seen.append(timestep_argument(args, kwargs))
        raise _Seen

    device = next(model.parameters()).device
    x, _, cond = family.example_inputs(1)
    handle = model.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            family.denoise(model, x.to(device), torch.full((1,), 1000.0, device=device),
                           {k: v.to(device) for k, v in cond.items()})
    except _Seen:
        pass
    finally:
        handle.remove()
    if not seen or not float(seen[0][0]) > 0:
        raise ValueError(f"TD-LoRA: cannot read the timestep scale of {type(model).__name__}")
    return 1000.0 / float(seen[0][0])


class TDLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("tdlora_A", "tdlora_B", "tdlora_router")
    other_param_names = ("r", "num_experts", "scaling")

    def __init__(self, base_layer: nn.Module, time: TimestepFeatures, **kwargs) -> None:
        self.base_layer = base_layer
        self.time = time
        self.tdlora_A = nn.ModuleDict()
        self.tdlora_B = nn.ModuleDict()
        self.tdlora_router = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: TDLoraConfig) -> None:
        k, r = config.num_experts, config.r
        self.r[adapter_name], self.num_experts[adapter_name] = r, k
        self.scaling[adapter_name] = config.lora_alpha / r
        # The K experts are stored stacked: A is (K*r, in), B is (out, K*r).
        self.tdlora_A[adapter_name] = nn.Linear(self.in_features, k * r, bias=False)
        self.tdlora_B[adapter_name] = nn.Linear(k * r, self.out_features, bias=False)
        self.tdlora_router[adapter_name] = nn.Linear(config.time_dim, k)
        for i in range(k):  # each expert initialised as an independent LoRA A
            nn.init.kaiming_uniform_(self.tdlora_A[adapter_name].weight[i * r:(i + 1) * r], a=math.sqrt(5))
        nn.init.zeros_(self.tdlora_B[adapter_name].weight)
        nn.init.normal_(self.tdlora_router[adapter_name].weight, std=0.02)
        nn.init.zeros_(self.tdlora_router[adapter_name].bias)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def gates(self, adapter_name: str, features: torch.Tensor) -> torch.Tensor:
        router = self.tdlora_router[adapter_name]
        return torch.softmax(router(features.to(router.weight.dtype)), dim=-1)


class TDLoraLinear(nn.Module, TDLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TDLoraConfig, time: TimestepFeatures,
                 **kwargs) -> None:
        super().__init__()
        TDLoraLayer.__init__(self, base_layer, time)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def delta_weight(self, adapter_name: str, features: torch.Tensor) -> torch.Tensor:
        """sum_k g_k B_k A_k * scaling for one timestep's features (1, time_dim): shape (out, in)."""
        k, r = self.num_experts[adapter_name], self.r[adapter_name]
        g = self.gates(adapter_name, features).reshape(k, 1).repeat_interleave(r, dim=0)  # (K*r, 1)
        a, b = self.tdlora_A[adapter_name].weight, self.tdlora_B[adapter_name].weight
        return (b @ (g * a)) * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise AdapterError("TD-LoRA's update depends on the timestep, so it has no single merged weight; "
                                  "use dit_compress.adapters.td_lora.bake_timestep for a fixed schedule")

    def unmerge(self) -> None:
        pass

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.tdlora_A:
                continue
            if self.time.value is None:
                raise RuntimeError("TD-LoRA: no timestep seen; call the adapted model, not a layer on its own")
            k, r = self.num_experts[name], self.r[name]
            g = self.gates(name, self.time.value.to(x.device))  # (B, K)
            if g.shape[0] not in (1, x.shape[0]):
                raise RuntimeError(f"TD-LoRA: {g.shape[0]} timesteps for a batch of {x.shape[0]}")
            g = g.reshape(g.shape[0], *([1] * (x.dim() - 2)), k, 1)
            h = self.tdlora_A[name](x.to(self.tdlora_A[name].weight.dtype))
            h = (h.unflatten(-1, (k, r)) * g).flatten(-2)
            result = result + (self.tdlora_B[name](h) * self.scaling[name]).to(result.dtype)
        return result


class TDLoraModel(BaseTuner):
    """peft tuner: `TDLoraModel(model, TDLoraConfig(...), "name")` adapts `model` in place."""

    prefix: str = PREFIX
    tuner_layer_cls = TDLoraLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # Here rather than in a pre-injection hook: peft's add_adapter/load_adapter inject without one.
        time = TimestepFeatures.of(self.model, config, adapter_name)
        if isinstance(target, TDLoraLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"TD-LoRA adapts nn.Linear layers only; {current_key} is {type(base).__name__}")
        new = TDLoraLinear(target, adapter_name, config, time)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


def bake_timestep(model: nn.Module, timestep: float, adapter_name: str | None = None) -> nn.Module:
    """A copy of `model` whose TD-LoRA layers are plain linears with the update merged for `timestep`."""
    from diffusers.models.embeddings import get_timestep_embedding

    baked = copy.deepcopy(model)
    time = getattr(baked, "_tdlora_time", None)
    if time is None:
        raise ValueError("bake_timestep: the model has no TD-LoRA adapter")
    feats = get_timestep_embedding(torch.tensor([float(timestep)]) * time.scale, time.dim,
                                   flip_sin_to_cos=True, downscale_freq_shift=0)
    modules = dict(baked.named_modules())
    for name, layer in list(modules.items()):
        if not isinstance(layer, TDLoraLinear):
            continue
        base = layer.get_base_layer()
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          dtype=base.weight.dtype, device=base.weight.device)
        with torch.no_grad():
            delta = sum(layer.delta_weight(a, feats) for a in (
                [adapter_name] if adapter_name else layer.active_adapters) if a in layer.tdlora_A)
            plain.weight.copy_(base.weight + delta)
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else baked, child, plain)
    for key, hook in list(baked._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is time:
            del baked._forward_pre_hooks[key]
            baked._forward_pre_hooks_with_kwargs.pop(key, None)
    del baked._tdlora_time
    return baked
