"""Noising for training and the sampling loop, both driven by a stock diffusers scheduler."""

from __future__ import annotations

import torch
import torch.nn as nn

from .models.families import FamilyAdapter
from .models.load import DEFAULT_SCHEDULER


class NoiseSchedule:
    """One scheduler config, used the same way by calibration, distillation, evaluation and export."""

    def __init__(self, scheduler_config: dict | None = None):
        import diffusers

        self.config = dict(scheduler_config or DEFAULT_SCHEDULER)
        cls = getattr(diffusers, self.config.get("_class_name", ""), None)
        if cls is None or not hasattr(cls, "step"):
            raise ValueError(f"unknown scheduler class {self.config.get('_class_name')!r}")
        self._cls = cls
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.is_flow = "FlowMatch" in cls.__name__

    def new_scheduler(self):
        """A fresh scheduler: `set_timesteps` mutates state, so every sampling run gets its own."""
        return self._cls.from_config(self.config)

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps spread uniformly over the whole schedule (0..num_train_timesteps)."""
        t = torch.rand(n, generator=generator) * self.num_train_timesteps
        return t if self.is_flow else t.floor().clamp(max=self.num_train_timesteps - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.is_flow:  # rectified flow: x_t = (1 - sigma) x0 + sigma * noise, sigma = t / T
            sigma = (t / self.num_train_timesteps).view(-1, *([1] * (x0.dim() - 1)))
            return (1 - sigma) * x0 + sigma * noise
        return self.new_scheduler().add_noise(x0, noise, t.long())

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of training: velocity for flow matching, else the noise."""
        return noise - x0 if self.is_flow else noise


@torch.no_grad()
def sample(
    model: nn.Module,
    adapter: FamilyAdapter,
    schedule: NoiseSchedule,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float = 1.0,
    null: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate from `noise` to a sample with the scheduler, on the timesteps the family's pipeline
    sets; classifier-free guidance if scale != 1, against `null` (the encoded negative prompt of a
    text pipeline; default: the family's empty condition)."""
    scheduler = schedule.new_scheduler()
    adapter.set_timesteps(scheduler, steps)
    guided = guidance_scale != 1.0
    if guided:
        null = null if null is not None else adapter.null_conditions(cond)
        cond = {k: torch.cat([cond[k], null[k]]) for k in cond}
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        x_in = scheduler.scale_model_input(x_in, t) if hasattr(scheduler, "scale_model_input") else x_in
        out = adapter.denoise(model, x_in, t.expand(x_in.shape[0]).to(x.dtype), cond)
        if guided:
            out_c, out_u = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def sample_batched(model, adapter, schedule, cond, noise, steps, guidance_scale=1.0, batch_size=256,
                   desc: str | None = None, null: dict | None = None):
    """`sample` in chunks, so memory stays flat for large evaluation sets; `desc` shows progress."""
    from tqdm.auto import tqdm

    outs = []
    starts = range(0, noise.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
        c = {k: v[i : i + batch_size] for k, v in cond.items()}
        n = {k: v[i : i + batch_size] for k, v in null.items()} if null is not None else None
        outs.append(sample(model, adapter, schedule, c, noise[i : i + batch_size], steps, guidance_scale, n))
    return torch.cat(outs)
