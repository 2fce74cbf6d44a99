"""Forward hooks that capture what named modules receive or return, as one context manager.

    with Capture(modules, at="output", transform=image_hidden) as cap:
        model(...)
    cap.values["transformer_blocks.3"]

`at` is "input" (the hidden states a module is called with), "output" (what it returns) or
"call" (its (args, kwargs)); one for every module, or one per name. `transform` maps each
value before it is kept. With `on`, every value goes to `on(name, value)` as the forward
passes and nothing is kept: a probe that reduces or samples activations then never holds a
whole forward's worth of them.

Hooks are removed on leaving the `with` block, or by `close()` for captures that live as long
as an objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

At = Literal["input", "output", "call"]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module is called with (passed by keyword or first)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def image_hidden(output) -> torch.Tensor:
    """The image stream of a block's output: joint blocks (SD3, Flux) return (text, image)."""
    return output[-1] if isinstance(output, (tuple, list)) else output


def first_tensor(output) -> torch.Tensor:
    """The first tensor a model returns (a tuple's first item, or a diffusers output's `sample`)."""
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


class Capture:
    """Forward hooks on `modules` ({name: module}); see the module docstring."""

    def __init__(self, modules: Mapping[str, nn.Module], at: At | Mapping[str, At] = "output",
                 transform: Callable[[Any], Any] | None = None, on: Callable[[str, Any], None] | None = None):
        where = {name: at[name] if isinstance(at, Mapping) else at for name in modules}
        wrong = {w for w in where.values() if w not in ("input", "output", "call")}
        if wrong:
            raise ValueError(f"capture at {sorted(wrong)}: expected 'input', 'output' or 'call'")
        self.values: dict[str, Any] = {}
        self._transform, self._on = transform, on
        self._handles = []
        for name, module in modules.items():
            at = where[name]
            if at == "output":
                hook = self._output_hook(name)
                self._handles.append(module.register_forward_hook(hook))
            else:
                hook = self._input_hook(name, at)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _keep(self, name: str, value) -> None:
        if self._transform is not None:
            value = self._transform(value)
        if self._on is not None:
            self._on(name, value)
        else:
            self.values[name] = value

    def _output_hook(self, name):
        def hook(_module, _args, output):
            self._keep(name, output)
        return hook

    def _input_hook(self, name, at):
        def hook(_module, args, kwargs):
            self._keep(name, (args, kwargs) if at == "call" else block_input(args, kwargs))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def named(model: nn.Module, paths) -> dict[str, nn.Module]:
    """{path: module} of `model` for module paths (e.g. from a family layout)."""
    return {p: model.get_submodule(p) for p in paths}
