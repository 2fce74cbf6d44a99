"""PPCL's width pruning: FFN sub-modules replaced by linear maps fitted by least squares.

Each FFN (image `ff`, and the text stream's `ff_context` in MMDiT / Flux double blocks) is a
candidate. On calibration inputs its input X and output Y are accumulated as Gram matrices
(float64, so no activation is kept); the least-squares linear map [W; b] = argmin |[X 1] A - Y|²
replaces it, and the FFNs with the lowest relative error |[X 1] A - Y|² / |Y|² are the ones
replaced. The map takes the FFN's place inside its block, after the block's norm and AdaLN
modulation and before its gate (docs/methods/ppcl.md: paper | ours).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...models.families import FamilyAdapter
from ...probes.capture import block_input

FFN_NAMES = ("ff", "ff_context")


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def ffn_modules(adapter: FamilyAdapter, model: nn.Module, blocks: set[int] | None = None) -> dict[str, nn.Module]:
    """{path: module} of the replaceable FFNs of the given global block indices (all by default).
    A diffusers FeedForward qualifies; Sana's convolutional GLU (it needs the image's height and
    width) does not."""
    from diffusers.models.attention import FeedForward

    out = {}
    for i, (g, j, block) in enumerate(adapter.blocks(model)):
        if blocks is not None and i not in blocks:
            continue
        for name in FFN_NAMES:
            m = getattr(block, name, None)
            if isinstance(m, FeedForward):
                out[f"{g.attr}.{j}.{name}"] = m
    return out


def ffn_shape(module: nn.Module) -> tuple[int, int]:
    lin = _linears(module)
    return lin[0].in_features, lin[-1].out_features


@torch.no_grad()
def fit_ffns(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, paths: list[str],
             batches: int = 4, batch_size: int = 64) -> dict[str, dict]:
    """For each FFN: the least-squares linear map (weight, bias) and its relative error."""
    modules = dict(model.named_modules())
    grams: dict[str, dict[str, torch.Tensor]] = {}

    def on(name, value):
        args, kwargs = value[0]
        x = block_input(args, kwargs).flatten(0, -2).double()
        y = value[1].flatten(0, -2).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        g = grams.setdefault(name, {"xx": 0, "xy": 0, "yy": 0})
        g["xx"] = g["xx"] + xa.T @ xa
        g["xy"] = g["xy"] + xa.T @ y
        g["yy"] = g["yy"] + (y * y).sum()

    first = calib.stream("prune/ffn-least-squares")
    with _CallAndOutput({p: modules[p] for p in paths}, on):
        for k in range(batches):
            b = calib.batch(first + k, batch_size)
            adapter.denoise(model, b.x_t, b.t, b.cond)
    fits = {}
    for path, g in grams.items():
        lam = 1e-6 * g["xx"].diagonal().mean()
        a = torch.linalg.solve(g["xx"] + lam * torch.eye(len(g["xx"]), dtype=torch.float64), g["xy"])
        # |XA - Y|² = |Y|² - 2 tr(Aᵀ XᵀY) + tr(Aᵀ XᵀX A), from the Gram matrices alone
        sse = g["yy"] - 2 * (a * g["xy"]).sum() + (a * (g["xx"] @ a)).sum()
        fits[path] = {"weight": a[:-1].T.float().contiguous(), "bias": a[-1].float().contiguous(),
                      "error": float(sse.clamp_min(0) / g["yy"].clamp_min(1e-12))}
    return fits


class _CallAndOutput:
    """Hooks that hand each module's ((args, kwargs), output) to `on` as the forward passes."""

    def __init__(self, modules: dict[str, nn.Module], on):
        self.modules, self.on = modules, on

    def __enter__(self):
        self.handles = [m.register_forward_hook(
            lambda _m, args, kwargs, out, name=name: self.on(name, ((args, kwargs), out)), with_kwargs=True)
            for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def replace_ffns_(model: nn.Module, shapes: dict[str, list[int]], init: dict[str, torch.Tensor] | None = None) -> None:
    """Put an nn.Linear(in, out) in place of each FFN path (with the fitted weights when given)."""
    modules = dict(model.named_modules())
    for path, (d_in, d_out) in shapes.items():
        owner, _, attr = path.rpartition(".")
        old = modules[path]
        ref = next(old.parameters(), None)
        lin = nn.Linear(d_in, d_out, device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None else None)
        if init is not None:
            lin.weight.data.copy_(init[f"{path}.weight"])
            lin.bias.data.copy_(init[f"{path}.bias"])
        setattr(modules[owner], attr, lin)

