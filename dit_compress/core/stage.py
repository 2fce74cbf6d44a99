"""The stage contract: a stage declares, the pipeline trains.

A stage declares
    plan     its data-driven choices (JSON), from the model, its family and the calibration data;
    build    deterministic surgery from config + plan; the same function restores a checkpoint;
    phases   the training phases that follow the surgery (the pipeline runs one distillation each);
    finish   optional: variants and statistics after training (architecture it decides goes in the plan);
    summary  what the report shows, as data.
The pipeline runs plan -> build -> phases -> finish and records {name, config, plan}; restore is
build on the recorded plan, then the weights.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..config import StrictConfig
from ..errors import RecipeError, UnsupportedModelError

if TYPE_CHECKING:
    from ..data.calibration import CalibrationSet
    from ..models.families import FamilyAdapter
    from ..models.load import LoadedModel
    from ..train.distill import DistillConfig, Objective


@dataclass
class Plan:
    """A stage's data-driven choices. `choices` is JSON and is recorded in the manifest; `init`
    holds data-derived initial tensors (a fitted router, say) that `build` uses when applying
    the stage only (a restore loads the trained weights instead); `notes` is what planning
    measured on the way, for the summary."""

    choices: dict
    init: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.choices[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.choices.get(key, default)


@dataclass
class Phase:
    """One distillation run of a stage: `objective(teacher_adapter, student)` builds what it
    minimises (None: output + feature matching over `layer_map`), `trainable` overrides
    `distill.trainable` (glob patterns, or an adapter policy such as [td_lora])."""

    name: str
    distill: "DistillConfig"
    objective: Callable[["FamilyAdapter", nn.Module], "Objective"] | None = None
    layer_map: list[tuple[str, str]] = field(default_factory=list)
    trainable: list[str] | None = None


@dataclass
class StageContext:
    """What a stage may look at while it plans and finishes."""

    teacher: "LoadedModel"
    calibration: "CalibrationSet"
    work_dir: Path
    seed: int = 0
    # save_variant(label, model, plan): keep another result of the same run (e.g. PPCL's other
    # ratios) as a checkpoint of its own, evaluated beside the main one.
    save_variant: Callable[[str, nn.Module, dict], None] | None = None


class Stage:
    """One compression method (see the module docstring for the contract)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StrictConfig]]
    families: ClassVar[tuple[str, ...]]  # families it supports; the others are refused before any work

    def supported_families(self, config: StrictConfig) -> tuple[str, ...]:
        return self.families

    def check_family(self, family: str, config: StrictConfig) -> None:
        supported = self.supported_families(config)
        if family not in supported:
            raise UnsupportedModelError(f"stage {self.name!r} does not support {family} models "
                                        f"(it supports {', '.join(supported)})")

    def plan(self, model: nn.Module, adapter: "FamilyAdapter", calibration: "CalibrationSet",
             config: StrictConfig, ctx: StageContext) -> Plan:
        """The stage's data-driven choices; `model` must not be changed."""
        return Plan({})

    def build(self, model: nn.Module, adapter: "FamilyAdapter", config: StrictConfig, plan: Plan) -> nn.Module:
        """The surgery; on restore it runs on the meta device and the weights are assigned after."""
        raise NotImplementedError

    def inspect(self, model: nn.Module, adapter: "FamilyAdapter", ctx: StageContext, config: StrictConfig,
                plan: Plan) -> dict:
        """Statistics of the built model before any training (e.g. the conversion error)."""
        return {}

    def phases(self, config: StrictConfig, plan: Plan, adapter: "FamilyAdapter") -> list[Phase]:
        return []

    def finish(self, model: nn.Module, adapter: "FamilyAdapter", ctx: StageContext, config: StrictConfig,
               plan: Plan) -> tuple[nn.Module, dict, dict]:
        """(model, plan choices, statistics) after training; architecture decided here goes in the plan."""
        return model, plan.choices, {}

    def summary(self, config: StrictConfig, plan: dict, stats: dict) -> dict:
        """What the report shows of this stage, as data."""
        return {**plan, **stats}

    def adapter_allowed(self, config: StrictConfig) -> bool:
        """Whether a phase may train an adapter on frozen weights (False where the method's own
        new weights must train)."""
        return False

    def is_stock(self, plan: dict) -> bool:
        """True when the result is still a stock diffusers class that `from_pretrained` can load."""
        return True

    def pictures(self, summary: dict, out: Path, prefix: str) -> dict[str, str]:
        """Render this stage's figures from its summary into `out`; {label: file name}."""
        return {}

    def report_lines(self, summary: dict, pictures: dict[str, str]) -> list[str]:
        """Render this stage's section of report.md from its summary."""
        return []

    def layer_map(self, plan: dict) -> list[tuple[str, str]]:
        """(student module, teacher module) pairs whose outputs further recovery may match."""
        return []


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from names and numbers (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@contextmanager
def seeded(seed: int):
    """Random initialisation inside `build` draws from `seed`, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


STAGES: dict[str, type[Stage]] = {}
_BUILT_IN = "dit_compress.stages"  # registers the built-in stages when imported


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        import importlib

        importlib.import_module(_BUILT_IN)  # by name: core does not depend on the stages it runs
    if name not in STAGES:
        raise RecipeError(f"unknown stage {name!r}; available: {', '.join(sorted(STAGES))}")
    return STAGES[name]()


def parse_stage_config(name: str, raw: Any, where: str) -> StrictConfig:
    """Validate a stage's config mapping; errors name the field and the recipe location."""
    from pydantic import ValidationError

    try:
        stage = get_stage(name)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    try:
        return stage.config_cls.model_validate(raw or {})
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where)) from None


def format_validation_error(e, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field_ = (f"{where} {loc}" if where.endswith(":") else f"{where}.{loc}") if loc else where.rstrip(":")
    if err["type"] == "extra_forbidden":
        return f"{field_}: unknown key (check the spelling; see `ditc validate --help`)"
    return f"{field_}: {err['msg']} (got {err.get('input')!r})"
