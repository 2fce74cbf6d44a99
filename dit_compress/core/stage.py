"""Stages: a validated config, a data-driven `apply`, and a deterministic `restore`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch.nn as nn

from ..config import StrictConfig
from ..errors import RecipeError

if TYPE_CHECKING:
    from ..data.calibration import CalibrationSet
    from ..models.families import FamilyAdapter
    from ..models.load import LoadedModel


@dataclass
class StageContext:
    """What a stage may look at while it transforms the student."""

    teacher: "LoadedModel"
    calibration: "CalibrationSet"
    work_dir: Path
    seed: int = 0
    # save_variant(label, model, metadata): keep another result of the same run (e.g. PPCL's
    # other pruning ratios) as a checkpoint of its own, evaluated beside the main one.
    save_variant: Callable[[str, nn.Module, dict], None] | None = None


class Stage(ABC):
    """One compression method. `apply` records every data-driven choice in its metadata so that
    `restore` can rebuild the same architecture on a fresh base model without data."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StrictConfig]]

    @abstractmethod
    def apply(self, model: nn.Module, config: StrictConfig, ctx: StageContext) -> tuple[nn.Module, dict]:
        """Transform `model` (a copy of the teacher or of the previous stage's output)."""

    @abstractmethod
    def restore(self, model: nn.Module, config: StrictConfig, metadata: dict,
                adapter: "FamilyAdapter") -> nn.Module:
        """Replay the transformation recorded in `metadata`; weights are loaded afterwards."""

    def recovery(self, config: StrictConfig):
        """The DistillConfig the pipeline recovers with after `apply` (None: no generic recovery)."""
        return getattr(config, "recover", None)

    def is_stock(self, metadata: dict) -> bool:
        """True when the result is still a stock diffusers class that `from_pretrained` can load."""
        return True

    def pictures(self, metadata: dict, out: Path, prefix: str) -> dict[str, str]:
        """Write this stage's figures into `out` (names start with `prefix`); {label: file name}."""
        return {}

    def report_lines(self, metadata: dict, pictures: dict[str, str]) -> list[str]:
        """This stage's section of report.md (its figures and the tables a person reads them with)."""
        return []

    def layer_map(self, metadata: dict) -> list[tuple[str, str]]:
        """(student module, teacher module) pairs whose outputs recovery may match."""
        return []


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in STAGES:
        raise ValueError(f"stage {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


def get_stage(name: str) -> Stage:
    from .. import stages  # noqa: F401  (registers the built-in stages)

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
    field = (f"{where} {loc}" if where.endswith(":") else f"{where}.{loc}") if loc else where.rstrip(":")
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown key (check the spelling; see `ditc validate --help`)"
    return f"{field}: {err['msg']} (got {err.get('input')!r})"
