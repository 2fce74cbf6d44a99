"""One teacher-student distillation loop for every stage, on `accelerate`.

The default objective is MSE(student output, teacher output) + feature_weight * mean over
mapped layers of the teacher-normalised MSE between hidden states; a stage may bring its own
objective (PPCL's contiguous-layer distillation). The same code runs on one CPU, one GPU, or
several processes under `accelerate launch` / `torchrun` (DDP): each process takes its shard of
the global batch, gradients are averaged so that an update equals the one-process update on the
whole batch, metrics are reduced over the global batch, and only the main process writes
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import StrictConfig
from ..data.calibration import Batch, CalibrationSet
from ..errors import CheckpointError, DistillationDiverged
from ..fileio import read_json, validate
from ..models.families import FamilyAdapter
from ..probes.capture import image_hidden
from .memory import saved_activation_bytes, training_memory
from .schedule import lr_factor
from .trainable import Patterns, trainable_policy


TD_LORA = "td_lora"
RESUME_VERSION = 1  # state.json's `version`; states written before it have none and read as 1


class _HistoryRow(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    step: int = Field(ge=0)
    output_mse: float


class ResumeState(BaseModel):
    """A distillation checkpoint's state.json: where an interrupted run resumes."""

    model_config = ConfigDict(strict=True, extra="forbid")
    version: Literal[1] = RESUME_VERSION
    step: int = Field(ge=0, le=10 ** 9)
    fingerprint: str = Field(max_length=64)
    # torch's optimizer settings: numbers, flags, (beta) pairs and parameter ids; nothing else
    param_groups: list[dict[str, int | float | bool | None | list[int | float]]] = Field(max_length=1024)
    history: list[_HistoryRow] = Field(max_length=10 ** 7)


class DistillConfig(StrictConfig):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(25, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    feature_weight: float = Field(0.0, ge=0, description="weight of hidden-state matching at mapped layers")
    trainable: list[str] = Field(default_factory=lambda: ["*"],
                                 description="glob patterns over parameter names, or [td_lora]: train a "
                                             "timestep-dynamic LoRA on the student instead of its weights")
    td_lora: dict = Field(default_factory=dict, description="TD-LoRA config overrides for trainable: [td_lora]")

    @field_validator("trainable", mode="before")
    @classmethod
    def _one_name(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _td_lora_alone(self):
        if TD_LORA in self.trainable and self.trainable != [TD_LORA]:
            raise ValueError(f"trainable: {TD_LORA} cannot be combined with other patterns")
        if self.td_lora and self.trainable != [TD_LORA]:
            raise ValueError("td_lora options given but trainable is not [td_lora]")
        if self.td_lora:
            import dataclasses

            from ..adapters.td_lora import TDLoraConfig

            unknown = sorted(set(self.td_lora) - {f.name for f in dataclasses.fields(TDLoraConfig)})
            if unknown:
                raise ValueError(f"td_lora: unknown option(s) {unknown} (e.g. r, num_experts, lora_alpha)")
        return self
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of MSE / the teacher's variance in that sample: scale-free across layers,
    and a mean of per-sample terms, so that shards of a batch average to the whole batch's value."""
    dims = tuple(range(1, teacher.dim()))
    mse = torch.mean((student - teacher) ** 2, dim=dims)
    return torch.mean(mse / (teacher.var(dim=dims) + 1e-6))


class _Capture:
    """Forward hooks that keep the image hidden state of named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.values[name] = image_hidden(output)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class Objective(ABC):
    """What a distillation step minimises. `loss` returns (total loss, output MSE for logging)."""

    def attach(self, teacher: nn.Module, student: nn.Module) -> None:
        pass

    def describe(self) -> str:
        """Everything that makes this objective's runs differ (part of the resume fingerprint)."""
        return type(self).__name__

    @abstractmethod
    def loss(self, step: int, batch: Batch, teacher: nn.Module, student: nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, output MSE against the teacher) for one calibration batch."""

    def close(self) -> None:
        pass


class OutputFeatureObjective(Objective):
    """MSE to the teacher's output + feature_weight * teacher-normalised MSE at mapped layers."""

    def __init__(self, adapter: FamilyAdapter, layer_map: list[tuple[str, str]], feature_weight: float):
        self.adapter, self.feature_weight = adapter, feature_weight
        self.layer_map = layer_map if feature_weight > 0 else []

    def describe(self):
        return f"output+feature {self.feature_weight} {self.layer_map}"

    def attach(self, teacher, student):
        self.s_cap = _Capture(student, [s for s, _ in self.layer_map])
        self.t_cap = _Capture(teacher, [t for _, t in self.layer_map])

    def loss(self, step, batch, teacher, student):
        _, out_loss = self.predictions(batch, teacher, student)
        return out_loss + self.feature_loss(), out_loss

    def predictions(self, batch: Batch, teacher: nn.Module, student: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(student prediction, its MSE to the teacher's) on the batch; runs both models (and the hooks)."""
        x, t, cond = batch.x_t, batch.t, batch.cond
        with torch.no_grad():
            target = self.adapter.denoise(teacher, x, t, cond)
        pred = self.adapter.denoise(student, x, t, cond)
        return pred, torch.mean((pred - target) ** 2)

    def feature_loss(self) -> torch.Tensor | float:
        """feature_weight x mean teacher-normalised MSE at the mapped layers of the last forward."""
        if not self.layer_map:
            return 0.0
        feat = [normalised_mse(self.s_cap.values[s], self.t_cap.values[t_]) for s, t_ in self.layer_map]
        return self.feature_weight * torch.stack(feat).mean()

    def close(self):
        self.s_cap.close()
        self.t_cap.close()


class _LossStep(nn.Module):
    """The student with the objective as its forward, so that DDP's gradient hooks see every step,
    including objectives that call blocks directly (PPCL's block losses, MoE experts)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, objective: Objective):
        super().__init__()
        self.student = student
        self._frozen = (teacher, objective)  # not a submodule: DDP neither syncs nor buckets the teacher

    def forward(self, step: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        teacher, objective = self._frozen
        return objective.loss(step, batch, teacher, self.student)


def select_trainable_(model: nn.Module, patterns: list[str]) -> int:
    """Freeze everything except parameters whose names match a pattern; returns the count."""
    return Patterns(patterns).select_(model)


class Distiller:
    def __init__(self, teacher: nn.Module, student: nn.Module, adapter: FamilyAdapter,
                 calibration: CalibrationSet, config: DistillConfig, work_dir: Path,
                 layer_map: list[tuple[str, str]] | None = None, desc: str = "distill",
                 objective: Objective | None = None, trainable: list[str] | None = None):
        self.teacher, self.student, self.adapter = teacher, student, adapter
        # what trains: the config's selection unless the phase overrides it (see train/trainable.py)
        self.policy = trainable_policy(trainable or config.trainable, config.td_lora)
        self.calib, self.config, self.work_dir = calibration, config, Path(work_dir)
        self.objective = objective or OutputFeatureObjective(adapter, layer_map or [], config.feature_weight)
        self.desc = desc
        self.ckpt = self.work_dir / "checkpoint"
        self.fingerprint = ""  # set in run(): config + what is trained + the objective

    # -- checkpoints: safetensors + JSON, nothing pickled ------------------------------
    def _save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, history: list) -> None:
        tmp = self.ckpt.with_name("checkpoint.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "student.safetensors"))
        state = opt.state_dict()
        tensors = {f"{pid}.{k}": v.contiguous() for pid, s in state["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "version": RESUME_VERSION, "step": step, "fingerprint": self.fingerprint, "param_groups": state["param_groups"],
            "history": history}))
        shutil.rmtree(self.ckpt, ignore_errors=True)
        tmp.rename(self.ckpt)

    def _load(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
        meta_path = self.ckpt / "state.json"
        if not meta_path.is_file():
            return 0, []
        restart = f"; delete {self.ckpt} to restart this training from step 0"
        try:
            state = validate(ResumeState, read_json(meta_path, "resume state", CheckpointError), str(meta_path),
                             CheckpointError)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{restart}") from None
        if state.fingerprint != self.fingerprint:
            return 0, []  # a different config: start over rather than mix runs
        if state.step > self.config.steps:
            raise CheckpointError(f"{meta_path}: step {state.step} is past this run's {self.config.steps} steps{restart}")
        try:
            params = dict(model.named_parameters())
            saved = load_file(str(self.ckpt / "student.safetensors"))
            wrong = sorted(n for n, v in saved.items() if n not in params or params[n].shape != v.shape)
            if wrong or set(saved) != {n for n, p in params.items() if p.requires_grad}:
                raise ValueError(f"its tensors do not fit the trained parameters (e.g. {wrong[:2]})")
            for n, v in saved.items():
                params[n].data.copy_(v)
            flat = load_file(str(self.ckpt / "optimizer.safetensors"))
            opt_state: dict[int, dict] = {}
            for key, v in flat.items():
                pid, k = key.split(".", 1)
                opt_state.setdefault(int(pid), {})[k] = v
            opt.load_state_dict({"state": opt_state, "param_groups": state.param_groups})
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file: the same advice
            raise CheckpointError(f"{self.ckpt}: cannot resume ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}){restart}") from None
        return state.step, [row.model_dump() for row in state.history]

    def _lr_factor(self, step: int) -> float:
        c = self.config
        return lr_factor(step, c.steps, c.warmup_steps, floor=0.1)  # cosine to 10 %

    def run(self) -> dict:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        c = self.config
        # Unused parameters are normal here: an MoE expert no token chose, a PPCL ratio not sampled this step.
        acc = Accelerator(cpu=not torch.cuda.is_available(),
                          kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        torch.manual_seed(c.seed)
        n_trainable = self.policy.select_(self.student)
        # A checkpoint resumes only the same run: same config, same trainable tensors, same objective.
        shapes = [(n, tuple(p.shape)) for n, p in self.student.named_parameters() if p.requires_grad]
        self.fingerprint = hashlib.sha256(
            (c.model_dump_json() + repr(shapes) + self.objective.describe()).encode()).hexdigest()[:12]
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        # Eval mode: DiT label embeddings would drop labels in train mode; no stage uses dropout.
        self.student.eval()
        self.teacher.eval().requires_grad_(False)
        teacher = self.teacher.to(acc.device)
        step_module, opt = acc.prepare(_LossStep(self.student, teacher, self.objective), opt)
        student = acc.unwrap_model(step_module).student
        start, history = self._load(student, opt)
        if start:
            acc.print(f"resuming {self.desc} from step {start}")
        self.objective.attach(teacher, student)
        rank, world = acc.process_index, acc.num_processes
        shard_size = (rank + 1) * c.batch_size // world - rank * c.batch_size // world
        # DDP averages gradients over processes; weighting each shard's mean loss by its share of
        # the global batch makes that average the gradient of the global batch's mean loss.
        shard_weight = shard_size * world / c.batch_size
        t0, memory = time.time(), None
        bar = tqdm(range(start, c.steps), desc=self.desc, initial=start, total=c.steps,
                   disable=not acc.is_main_process, mininterval=2.0)
        try:
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = c.lr * self._lr_factor(step)
                batch = self.calib.batch(step, c.batch_size, (rank, world)).to(acc.device)
                if step == start:  # what this run's trainable set costs in memory, counted once
                    saved, (loss, out_loss) = saved_activation_bytes(student, lambda: step_module(step, batch))
                    memory = training_memory(student, saved)
                else:
                    loss, out_loss = step_module(step, batch)
                if not torch.isfinite(loss):
                    where = (f"last good checkpoint: {self.ckpt} (step {history[-1]['step']})"
                             if history else "no checkpoint yet")
                    raise DistillationDiverged(
                        f"{self.desc}: loss became {loss.item()} at step {step}; {where}; "
                        f"lower the learning rate (lr={c.lr}) or the batch size")
                opt.zero_grad(set_to_none=True)
                acc.backward(loss * shard_weight)
                acc.clip_grad_norm_(params, c.grad_clip)
                opt.step()
                if step % 10 == 0 or step == c.steps - 1:
                    total = acc.reduce(out_loss.detach().reshape(1) * shard_size, "sum")
                    value = total.item() / c.batch_size  # the global batch's mean, whatever the shards
                    history.append({"step": step, "output_mse": round(value, 6)})
                    bar.set_postfix(mse=f"{value:.4g}")
                done = step + 1
                if acc.is_main_process and (done % c.checkpoint_every == 0 or done == c.steps):
                    self._save(done, student, opt, history)
        finally:
            self.objective.close()
        acc.wait_for_everyone()
        seconds = time.time() - t0
        samples_per_s = (c.steps - start) * c.batch_size / max(seconds, 1e-9)
        return {"steps": c.steps, "resumed_from": start, "trainable_parameters": n_trainable,
                "seconds": round(seconds, 1), "processes": world, "training_memory": memory,
                "samples_per_second": round(samples_per_s, 2),
                "tokens_per_second": round(samples_per_s * math.prod(self.adapter.token_grid()), 1),
                "final_output_mse": history[-1]["output_mse"] if history else None,
                "history": history[::max(1, len(history) // 40)]}
