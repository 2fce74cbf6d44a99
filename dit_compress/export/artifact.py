"""Exported artifacts that stand alone: an ONNX denoiser plus a card that says how to sample it.

The card (`NAME.json` beside `NAME.onnx`) carries what a sampling loop needs besides the
network: latent shape, condition inputs and their "no condition" values for classifier-free
guidance, the scheduler config and the default steps/guidance. `load_artifact` turns the pair
into a `LoadedModel` whose denoiser is an ONNX Runtime session, so the same `sample` loop and
the same `Evaluator` drive PyTorch models and exported graphs alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import CheckpointError, UnsupportedModelError
from ..fileio import read_json, validate
from ..models.families import FamilyAdapter, adapter_for_family
from ..models.load import LoadedModel
from .onnx import card_path, ort_session

CARD_VERSION = 1  # cards written before `card_version` read as 1
MAX_CONDITION_VALUES = 1 << 22  # values per sample of one condition input (a long prompt's embedding: ~1e6)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ConditionSpec(_Strict):
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"]
    shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(max_length=4, description="per sample")

    @model_validator(mode="after")
    def _bounded(self):
        if math.prod(self.shape) > MAX_CONDITION_VALUES:
            raise ValueError(f"shape {self.shape}: more than {MAX_CONDITION_VALUES} values per sample")
        return self


class _Fill(_Strict):
    fill: float


class SamplingDefaults(_Strict):
    steps: int = Field(ge=1, le=10_000)
    guidance_scale: float = Field(ge=0, le=1000)


class DeploymentCard(BaseModel):
    """`NAME.json` beside `NAME.onnx`: what sampling the graph needs. Free-form sections (the
    scheduler's and transformer's configs, export facts) are the libraries' own and kept as written."""

    model_config = ConfigDict(strict=True, extra="forbid")
    card_version: Literal[1] = CARD_VERSION
    family: str = Field(max_length=64)
    class_name: str = Field(max_length=256)
    source: str = Field(max_length=4096)
    latent_shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=3, max_length=3)
    num_classes: int | None = Field(None, ge=1, le=1_000_000)
    conditions: dict[str, ConditionSpec] = Field(max_length=64)
    null_conditions: dict[str, Literal["same", "zeros"] | _Fill]
    scheduler: dict[str, Any]
    sampling: SamplingDefaults
    pixel_space: bool = False
    transformer_config: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None
    precision: str | None = Field(None, max_length=64)
    derived_from: str | None = Field(None, max_length=4096)
    export: dict[str, Any] | None = None
    timestep: int | float | None = None  # an adapter graph baked at one timestep

    @model_validator(mode="after")
    def _consistent(self):
        if set(self.null_conditions) != set(self.conditions):
            raise ValueError(f"null_conditions names {sorted(self.null_conditions)}, conditions {sorted(self.conditions)}")
        c, h, w = self.latent_shape
        if c * h * w > 1 << 24:
            raise ValueError(f"latent_shape {self.latent_shape}: more than {1 << 24} values per sample")
        return self


def read_card(path: str | Path) -> dict:
    """A deployment card, validated (CheckpointError naming the file and field), as a mapping."""
    card = read_json(path, "deployment card", CheckpointError)
    validate(DeploymentCard, card, str(path), CheckpointError)
    return {"card_version": CARD_VERSION, **card}


def null_spec(adapter: FamilyAdapter, cond: dict[str, torch.Tensor]) -> dict:
    """How each condition input reads when unconditioned: "zeros", "same" (kept), or a fill value."""
    null = adapter.null_conditions(cond)
    spec = {}
    for name, v in cond.items():
        n = null[name]
        if torch.equal(n, v):
            spec[name] = "same"
        elif not n.any():
            spec[name] = "zeros"
        elif (n == n.flatten()[0]).all():
            spec[name] = {"fill": n.flatten()[0].item()}
        else:
            raise ValueError(f"cannot describe the null condition of input {name!r} in a card")
    return spec


def deployment_card(loaded: LoadedModel, steps: int, guidance_scale: float) -> dict:
    """The sampling facts of `loaded` that an exported graph cannot carry itself."""
    a = loaded.adapter
    _, _, cond = a.example_inputs(1)
    return {
        "card_version": CARD_VERSION, "family": a.family, "class_name": loaded.class_name,
        "source": loaded.source, "latent_shape": list(a.latent_shape()), "num_classes": a.num_classes,
        "conditions": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])}
                       for k, v in cond.items()},
        "null_conditions": null_spec(a, cond),
        "scheduler": loaded.scheduler_config,
        "sampling": {"steps": int(steps), "guidance_scale": float(guidance_scale)},
        "pixel_space": bool(loaded.card) and loaded.pipeline is None,  # bundled label teachers sample images
        # The family adapter rebuilt from this config sets the timesteps (and encodes prompts) as the
        # PyTorch model's adapter does.
        "transformer_config": {k: v for k, v in a.config.items() if not k.startswith("_")},
        # Where `ditc sample --prompt` finds the text encoders and VAE, and how it encodes with them.
        **({"pipeline": {**loaded.pipeline.record(), "folder": str(Path(loaded.pipeline.folder).resolve())}}
           if loaded.pipeline else {}),
    }


class OnnxDenoiser:
    """An ONNX Runtime session with the denoiser's call: (sample, timestep, conditions) -> prediction."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        self.path = Path(path)
        try:
            self.session = ort_session(self.path, threads, providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors (InvalidProtobuf, Fail, ...) share no base
            if type(e).__module__.startswith("onnxruntime"):
                raise CheckpointError(f"{self.path}: not an ONNX graph ONNX Runtime can load "
                                      f"({str(e).splitlines()[0][:200]})") from None
            raise
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {"sample": x, "timestep": t, **cond}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise CheckpointError(f"{self.path}: graph input(s) {missing} not given; have {sorted(feeds)}")
        arrays = {n: feeds[n].detach().cpu().numpy() for n in self.input_names}
        arrays["timestep"] = arrays["timestep"].astype(np.float32)
        return torch.from_numpy(self.session.run(None, arrays)[0]).float()


class OnnxAdapter(FamilyAdapter):
    """The family interface of an exported graph, read from its card."""

    def __init__(self, card: dict):
        self.card = card
        self.family, self.class_name = card["family"], card["class_name"]
        self.config = dict(card.get("transformer_config") or {})
        self._latent_shape = tuple(card["latent_shape"])
        # Cards written before transformer_config: the generic timestep rule (exact for unshifted schedulers).
        self._family = adapter_for_family(self.family)(SimpleNamespace(config=self.config), self._latent_shape[1]) \
            if self.config else None

    @property
    def in_channels(self) -> int:
        return self._latent_shape[0]

    @property
    def latent_size(self) -> int:
        return self._latent_shape[1]

    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape

    @property
    def num_classes(self) -> int | None:
        return self.card.get("num_classes")

    def token_grid(self):
        return self._family.token_grid() if self._family else super().token_grid()

    def set_timesteps(self, scheduler, steps):
        (self._family or super()).set_timesteps(scheduler, steps)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        if self._family is None:
            raise CheckpointError("this artifact's card predates prompt sampling (no transformer_config); "
                                  "export it again")
        return self._family.encode_prompts(pipe, prompts, max_sequence_length)

    def random_conditions(self, n, generator):
        out = {}
        for name, spec in self.card["conditions"].items():
            dtype = getattr(torch, spec["dtype"])
            if name == "class_labels" and self.num_classes:
                out[name] = torch.randint(0, self.num_classes, (n,), generator=generator)
            elif not dtype.is_floating_point:  # a prompt's padding mask: every token attended
                out[name] = torch.ones(n, *spec["shape"], dtype=dtype)
            else:
                out[name] = torch.randn(n, *spec["shape"], generator=generator).to(dtype)
        return out

    def null_conditions(self, cond):
        out = {}
        for name, v in cond.items():
            spec = self.card["null_conditions"][name]
            out[name] = v if spec == "same" else (torch.zeros_like(v) if spec == "zeros"
                                                  else torch.full_like(v, spec["fill"]))
        return out

    def denoise(self, model, x, t, cond):
        return model(x, t, cond)

    def _embedding(self, model):
        raise UnsupportedModelError("an exported graph has no module layout; surgery needs the PyTorch model")


def load_artifact(onnx_path: str | Path, threads: int | None = None,
                  providers: list[str] | None = None) -> LoadedModel:
    """An exported graph and its card as a `LoadedModel` (the model being an ONNX Runtime session)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"ONNX artifact not found: {onnx_path}")
    cp = card_path(onnx_path)
    if not cp.is_file():
        raise CheckpointError(f"{onnx_path}: no card {cp.name} beside it (export with `ditc export` or `ditc run`)")
    card = read_card(cp)
    denoiser = OnnxDenoiser(onnx_path, threads, providers)
    described = {"sample", "timestep", *card["conditions"]}
    if not set(denoiser.input_names) <= described:  # a graph may leave out an input it does not use
        raise CheckpointError(f"{onnx_path}: graph inputs {sorted(denoiser.input_names)}, its card {cp.name} "
                              f"describes {sorted(described)}")
    return LoadedModel(denoiser, OnnxAdapter(card), card["scheduler"], str(onnx_path))
