"""DiffScaler: small per-task transforms on a frozen DiT, built as a peft tuner.

On each targeted frozen linear W: y = (1 + a) * Wx + b + s * W_up ReLU(W_down x), with a, b, s,
W_down, W_up trained per task (a = b = W_up = 0 at the start, so the model starts as the base).
On the class-label embedding tables, a task brings its own class rows, initialised from the
unconditional (null-label) row: while the task's adapter is active, labels 0..n-1 are the
task's classes and the null label keeps the base row, so guidance works unchanged.
Several tasks live in one model as named adapters; `set_adapter(name)` switches between them.
The config's peft type is `DIFFSCALER`; `dit_compress.adapters.methods` registers it with peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..errors import AdapterError

DIFFSCALER, PREFIX = "DIFFSCALER", "diffscaler_"  # peft type and parameter prefix


@dataclass
class DiffScalerConfig(PeftConfig):
    bottleneck: int = field(default=4, metadata={"help": "width of the W_down/W_up branch"})
    num_task_classes: int = field(default=1, metadata={"help": "class rows the task adds to each label table"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = DIFFSCALER
        if self.bottleneck < 1 or self.num_task_classes < 1:
            raise ValueError(f"DiffScaler needs bottleneck >= 1 and num_task_classes >= 1, got "
                             f"{self.bottleneck}, {self.num_task_classes}")
        if self.target_modules is None:
            raise ValueError("DiffScaler: name the layers to adapt in target_modules")


class DiffScalerLayer(BaseTunerLayer):
    adapter_layer_names = ("diffscaler_scale", "diffscaler_shift", "diffscaler_gain", "diffscaler_down",
                           "diffscaler_up", "diffscaler_classes")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict() if name != "diffscaler_down" and name != "diffscaler_up"
                    else nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters = []

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise AdapterError("DiffScaler's ReLU branch cannot be merged into the frozen weight")

    def unmerge(self) -> None:
        pass

    def _active(self):
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.diffscaler_scale or a in self.diffscaler_classes]


class _DiffScalerModule(nn.Module, DiffScalerLayer):
    """Wraps one base layer; subclasses say how a task's parameters are made and applied."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DiffScalerConfig, **kwargs):
        super().__init__()
        DiffScalerLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)


class DiffScalerLinear(_DiffScalerModule):
    def update_layer(self, adapter_name: str, config: DiffScalerConfig) -> None:
        base = self.get_base_layer()
        out_f, in_f, d = base.out_features, base.in_features, config.bottleneck
        self.diffscaler_scale[adapter_name] = nn.Parameter(torch.zeros(out_f))
        self.diffscaler_shift[adapter_name] = nn.Parameter(torch.zeros(out_f))
        self.diffscaler_gain[adapter_name] = nn.Parameter(torch.ones(1))
        self.diffscaler_down[adapter_name] = nn.Linear(in_f, d, bias=False)
        self.diffscaler_up[adapter_name] = nn.Linear(d, out_f, bias=False)
        nn.init.kaiming_uniform_(self.diffscaler_down[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.diffscaler_up[adapter_name].weight)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for name in self._active():
            branch = self.diffscaler_up[name](F.relu(self.diffscaler_down[name](x)))
            y = (1 + self.diffscaler_scale[name]) * y + self.diffscaler_shift[name] \
                + self.diffscaler_gain[name] * branch
        return y


class DiffScalerEmbedding(_DiffScalerModule):
    """A class-label table whose first `num_task_classes` labels become the task's own rows."""

    def update_layer(self, adapter_name: str, config: DiffScalerConfig) -> None:
        base = self.get_base_layer()
        null_row = base.weight.detach()[base.num_embeddings - 1]  # diffusers' LabelEmbedding: last id = no label
        if config.num_task_classes >= base.num_embeddings:
            raise ValueError(f"DiffScaler: {config.num_task_classes} task classes do not fit a table of "
                             f"{base.num_embeddings - 1} labels")
        self.diffscaler_classes[adapter_name] = nn.Parameter(null_row.repeat(config.num_task_classes, 1).clone())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, labels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(labels, *args, **kwargs)
        for name in self._active():
            rows = self.diffscaler_classes[name]
            n = rows.shape[0]
            own = F.embedding(labels.clamp(max=n - 1), rows)
            y = torch.where((labels < n).unsqueeze(-1), own, y)
        return y


class DiffScalerModel(BaseTuner):
    """peft tuner: `DiffScalerModel(model, DiffScalerConfig(...), "task")` adapts `model` in place."""

    prefix: str = PREFIX
    tuner_layer_cls = DiffScalerLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, DiffScalerLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            new = DiffScalerLinear(target, adapter_name, config)
        elif isinstance(base, nn.Embedding):
            new = DiffScalerEmbedding(target, adapter_name, config)
        else:
            raise TypeError(f"DiffScaler adapts nn.Linear and class-label nn.Embedding layers; "
                            f"{current_key} is {type(base).__name__}")
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)
