"""What a distillation phase trains: a policy of the training layer.

`trainable` is either glob patterns over parameter names (those weights train, the rest freeze)
or the name of an adapter method ([td_lora]): an adapter is attached for the phase and only it
trains. An attached adapter stays on the model, so the policy also records it, and `replay`
rebuilds it on a restored model before its weights load (the manifest keeps the record).
"""

from __future__ import annotations

import fnmatch

import torch.nn as nn

ADAPTER_METHODS = ("td_lora",)  # adapter methods a phase may train instead of the weights
PHASE_ADAPTER = "recovery"  # the name the phase's adapter is attached under


class Patterns:
    """Train the parameters whose names match one of the glob patterns."""

    attaches = False

    def __init__(self, patterns: list[str]):
        self.patterns = patterns

    def select_(self, model: nn.Module) -> int:
        n = 0
        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatch(name, pat) for pat in self.patterns))
            n += p.numel() if p.requires_grad else 0
        if n == 0:
            raise ValueError(f"trainable patterns {self.patterns} match no parameter")
        return n

    def record(self, model: nn.Module) -> dict | None:
        return None


class AttachedAdapter:
    """Attach an adapter of `method` (options over its defaults) and train only it."""

    attaches = True

    def __init__(self, method: str, options: dict):
        self.method, self.options = method, options

    def select_(self, model: nn.Module) -> int:
        from .. import adapters

        if PHASE_ADAPTER not in adapters.adapter_names(model):  # a resumed phase finds it attached
            config = {**adapters.default_config(self.method, model), **self.options}
            adapters.attach(model, self.method, config, PHASE_ADAPTER)
        return adapters.train_only(model, PHASE_ADAPTER)

    def record(self, model: nn.Module) -> dict | None:
        from ..adapters.store import describe

        return describe(model)


def trainable_policy(trainable: list[str], options: dict | None = None) -> Patterns | AttachedAdapter:
    if len(trainable) == 1 and trainable[0] in ADAPTER_METHODS:
        return AttachedAdapter(trainable[0], options or {})
    return Patterns(trainable)


def replay(model: nn.Module, record: dict) -> nn.Module:
    """Rebuild what a policy attached (weights are loaded afterwards)."""
    from ..adapters.store import reattach  # peft loads only for checkpoints that need it

    return reattach(model, record)
