"""Fine-tune a model on a new task with one of four trainable sets, and measure what it cost.

Methods: `full` (every weight), `lora` (peft LoRA), `td_lora`, `diffscaler`. The task loss is
the teacher's own training loss (denoising / flow matching on the task's images). Held-out
loss uses fixed noise and timesteps, so methods and runs compare exactly. Training memory is
counted (see `memory.py`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import adapters
from ..data.tasks import TaskData
from ..errors import AdapterError
from ..models.families import FamilyAdapter
from ..sampling import NoiseSchedule
from .memory import saved_activation_bytes, training_memory
from .schedule import lr_factor

METHODS = ("full", "lora", "td_lora", "diffscaler")


@dataclass
class FinetuneConfig:
    method: str
    steps: int = 800
    batch_size: int = 64
    lr: float | None = None  # default: 1e-4 for full fine-tuning, 2e-3 for adapters
    adapter: dict | None = None  # adapter config; default: adapters.default_config(method, ...)
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise AdapterError(f"unknown fine-tuning method {self.method!r}; available: {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise AdapterError("steps and batch_size must be >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-4 if self.method == "full" else 2e-3)


@dataclass
class FinetuneResult:
    model: nn.Module
    metrics: dict = field(default_factory=dict)


def _noised(images, labels, schedule: NoiseSchedule, g: torch.Generator):
    noise = torch.randn(images.shape, generator=g)
    t = schedule.draw_timesteps(len(images), g)
    return schedule.add_noise(images, noise, t), t, {"class_labels": labels}, schedule.target(images, noise)


def task_loss(model, family: FamilyAdapter, x_t, t, cond, target) -> torch.Tensor:
    return torch.mean((family.denoise(model, x_t, t, cond) - target) ** 2)


@torch.no_grad()
def heldout_loss(model: nn.Module, family: FamilyAdapter, schedule: NoiseSchedule, task: TaskData,
                 split: str = "heldout", repeats: int = 8, seed: int = 1234) -> float:
    """Mean task loss on a split's images (`heldout` or `validation`), each at `repeats` fixed
    (noise, timestep) draws."""
    g = torch.Generator().manual_seed(seed)
    images = getattr(task, f"{split}_images").repeat(repeats, 1, 1, 1)
    labels = getattr(task, f"{split}_labels").repeat(repeats)
    total, n = 0.0, 0
    x_t, t, cond, target = _noised(images, labels, schedule, g)
    for i in range(0, len(images), 256):
        sl = slice(i, i + 256)
        loss = task_loss(model, family, x_t[sl], t[sl], {k: v[sl] for k, v in cond.items()}, target[sl])
        total, n = total + loss.item() * len(x_t[sl]), n + len(x_t[sl])
    return total / n


def prepare(model: nn.Module, config: FinetuneConfig, task: TaskData, name: str) -> int:
    """Attach the method's adapter (if any) named `name`; returns the trainable parameter count."""
    if config.method == "full":
        model.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    cfg = config.adapter or adapters.default_config(config.method, model, task.num_classes)
    adapters.attach(model, config.method, cfg, name)
    return adapters.train_only(model, name)


def finetune(model: nn.Module, family: FamilyAdapter, schedule: NoiseSchedule, task: TaskData,
             config: FinetuneConfig, name: str | None = None, progress: bool = True) -> FinetuneResult:
    """Train a copy of `model` on `task`; the copy carries adapter `name` (default: the task's name)."""
    name = name or task.name
    if tuple(task.train_images.shape[1:]) != family.latent_shape():
        raise AdapterError(f"task {task.name!r} has images of shape {tuple(task.train_images.shape[1:])}, the model "
                           f"takes latents of shape {family.latent_shape()}; the tasks are pixel data for the "
                           "bundled digits teachers (zoo:digits-dit, zoo:digits-sd3)")
    torch.manual_seed(config.seed)
    model = copy.deepcopy(model).eval()  # eval: no label dropout; the DiTs here have no dropout
    base_params = sum(p.numel() for p in model.parameters())
    before = heldout_loss(model, family, schedule, task)
    trainable = prepare(model, config, task, name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    curve = [{"step": 0, "heldout_loss": round(before, 5)}]
    activation_peak = 0
    t0 = time.time()
    for step in tqdm(range(config.steps), desc=f"{task.name} {config.method}", disable=not progress,
                     mininterval=2.0):
        for group in opt.param_groups:
            group["lr"] = config.learning_rate * lr_factor(step, config.steps, floor=0.1)
        idx = torch.randint(0, len(task.train_images), (config.batch_size,), generator=g)
        x_t, t, cond, target = _noised(task.train_images[idx], task.train_labels[idx], schedule, g)
        peak, loss = saved_activation_bytes(model, lambda: task_loss(model, family, x_t, t, cond, target))
        activation_peak = max(activation_peak, peak)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curve.append({"step": step + 1, "heldout_loss": round(heldout_loss(model, family, schedule, task), 5)})
    seconds = time.time() - t0
    memory = training_memory(model, activation_peak)
    model.eval().requires_grad_(False)
    return FinetuneResult(model, {
        "task": task.name, "method": config.method, "adapter_name": None if config.method == "full" else name,
        "steps": config.steps, "batch_size": config.batch_size, "lr": config.learning_rate,
        "adapter_config": None if config.method == "full" else adapters.store.adapter_config(model, name),
        "trainable_parameters": trainable, "trainable_fraction": round(trainable / base_params, 5),
        "heldout_loss_before": round(before, 5), "heldout_loss": curve[-1]["heldout_loss"], "curve": curve,
        "validation_loss": round(heldout_loss(model, family, schedule, task, "validation"), 5),
        "seconds": round(seconds, 1), "steps_per_second": round(config.steps / seconds, 2),
        "training_memory": memory,
    })


def stored_bytes(result: FinetuneResult, folder: Path) -> int:
    """Save what one task needs on disk (the adapter, or the whole model for full fine-tuning)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if result.metrics["method"] == "full":
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(path))
        return path.stat().st_size
    out = adapters.save_adapter(result.model, folder, result.metrics["adapter_name"])
    return sum(p.stat().st_size for p in out.iterdir())
