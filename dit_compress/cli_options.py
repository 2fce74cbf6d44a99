"""What `ditc` needs besides its commands: options derived from the config classes, thread
settings, and the filters that keep uninformative library warnings off the terminal.

A `ConfigOption` names the config field it sets (`"prune", "recover.steps"`); its type, choices,
bounds, help and shown default are read from that field when needed, so every default lives in
the config class. The option itself defaults to None, and only the values a user gives are written
into the stage's config: the rest keep the config's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import click

THREADS_ENV = "DITC_THREADS"

# Recipe sections an option may set besides a stage's config; `distill` is a distillation run's
# settings (`ditc distill`).
SECTIONS = ("model", "calibration", "evaluation", "export")


def config_class(section: str):
    """The pydantic class of a recipe section, of a registered stage's config, or `distill`."""
    from .core.recipe import Recipe
    from .core.stage import get_stage

    if section in SECTIONS:
        return Recipe.model_fields[section].annotation
    if section == "distill":
        from .train.distill import DistillConfig

        return DistillConfig
    return get_stage(section).config_cls


def _model_in(annotation):
    """The pydantic model inside `X | None` (or None if there is none)."""
    from pydantic import BaseModel

    for a in (annotation, *get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


@dataclass(frozen=True)
class Field:
    """One config field as an option sees it."""

    owner: type          # the class that declares the field
    name: str
    annotation: Any
    metadata: tuple      # pydantic constraints (ge, lt, ...)
    default: Any
    description: str | None

    @property
    def choices(self) -> tuple | None:
        inner = [a for a in (self.annotation, *get_args(self.annotation)) if get_origin(a) is Literal]
        return get_args(inner[0]) if inner else None

    @property
    def is_list(self) -> bool:
        return any(get_origin(a) in (list, tuple) for a in (self.annotation, *get_args(self.annotation)))


def resolve_field(section: str, path: str) -> Field:
    """The field at dotted `path` of `section`, with its effective default (a nested model's
    default instance counts: `recover.steps` of `moe` is 1200, not DistillConfig's 600)."""
    cls = config_class(section)
    value: Any = cls.model_construct()  # defaults without the cross-field checks
    parts = path.split(".")
    for i, part in enumerate(parts):
        info = cls.model_fields[part]
        value = getattr(value, part) if value is not None else info.get_default(call_default_factory=True)
        if i < len(parts) - 1:
            cls = _model_in(info.annotation)
            if value is None:  # an optional section that is off by default (e.g. prune's `width`)
                value = cls.model_construct()
    return Field(cls, parts[-1], info.annotation, tuple(info.metadata), value, info.description)


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


class ConfigOption(click.Option):
    """An option that sets one field of one or more config sections (several: `ditc attention`,
    whose stage is chosen by --method; the shown default then lists each)."""

    def __init__(self, *args, sections: tuple[str, ...], path: str, default_of=None, **kwargs):
        kwargs.setdefault("default", None)
        super().__init__(*args, **kwargs)
        self.sections, self.path, self.default_of = sections, path, default_of
        self.extra_help = self.help

    def fields(self) -> dict[str, Field]:
        """The field per section; `default_of` (a callable) replaces the default where a library
        function, not the config, decides it (`ditc distill`: `distill_checkpoint`'s arguments)."""
        fields = {s: resolve_field(s, self.path) for s in self.sections}
        if self.default_of is not None:
            fields = {s: dataclasses.replace(f, default=self.default_of()) for s, f in fields.items()}
        return fields

    def get_help_record(self, ctx):
        first = next(iter(self.fields().values()))
        self.help = self.extra_help or first.description or ""
        return super().get_help_record(ctx)

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        defaults = {s: _shown(f.default) for s, f in self.fields().items()}
        if len(set(defaults.values())) == 1:
            extra["default"] = next(iter(defaults.values()))
        else:
            extra["default"] = "; ".join(f"{s}: {d}" for s, d in defaults.items())
        return extra

    def make_metavar(self, ctx) -> str:
        field = next(iter(self.fields().values()))
        if field.choices:
            return "[" + "|".join(map(str, field.choices)) + "]"
        kinds = {int: "INTEGER", float: "FLOAT", str: "TEXT"}
        inner = [kinds[a] for a in (field.annotation, *get_args(field.annotation), *(
            b for a in get_args(field.annotation) for b in get_args(a))) if a in kinds]
        kind = inner[0] if inner else "VALUE"
        return f"{kind},..." if field.is_list else kind

    def type_cast_value(self, ctx, value):
        if value is None:
            return None
        from pydantic import TypeAdapter, ValidationError
        from typing_extensions import Annotated

        field = next(iter(self.fields().values()))
        raw: Any = value
        if field.is_list and isinstance(value, str):
            raw = [v.strip() for v in value.split(",") if v.strip()]
        annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        try:
            return TypeAdapter(annotation).validate_python(raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise click.BadParameter(f"{err['msg']} (got {value!r})", ctx, self) from None


def config_option(*flags: str, section: str | tuple[str, ...], path: str, help: str | None = None,
                  default_of=None):
    """A click option setting `path` of `section` (a stage name or a recipe section)."""
    sections = (section,) if isinstance(section, str) else section
    return click.option(*flags, cls=ConfigOption, sections=sections, path=path, help=help, default_of=default_of)


def stage_options(params: dict[str, Any], ctx: click.Context, section: str) -> dict:
    """The config mapping of `section` from the ConfigOptions of the current command that the user
    gave. A nested section starts from its default (so `--steps` keeps `recover`'s other values)."""
    config: dict = {}
    for param in ctx.command.params:
        if not isinstance(param, ConfigOption) or section not in param.sections:
            continue
        value = params.get(param.name)
        if value is None:
            continue
        node, owner = config, config_class(section).model_construct()
        parts = param.path.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None) if owner is not None else None
            if part not in node:
                node[part] = owner.model_dump(mode="json") if owner is not None else {}
            node = node[part]
        node[parts[-1]] = value
    return config


def set_threads(threads: int | None) -> None:
    """PyTorch and ONNX Runtime intra-op threads (None: their defaults, one per core)."""
    threads = threads or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV, "").isdigit() else None)
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    os.environ[THREADS_ENV] = str(threads)  # ONNX Runtime sessions and child processes read it


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_warnings() -> None:
    """Silence library messages that tell a user of `ditc` nothing they can act on (shown with -v):

    - torch's ONNX exporter registers torchvision's operators and says, four times per export,
      that torchvision is not installed (ditc exports no torchvision operator);
    - torch.export's pickling of tree specs raises its own LeafSpec deprecation warning;
    - the exporter notes that the dynamic `batch` axis is named twice (it is the same axis);
    - Fréchet distance on few samples (a quick trial) has a singular covariance product; the
      metric then retries with a small diagonal offset, as the reference implementation does.
    """
    logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
        _DropMessages("torchvision is not installed"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used, since it shares the same "
                            "shape constraints", category=UserWarning, module=r"torch\.onnx\..*")
    warnings.filterwarnings("ignore", message=r"Matrix is singular", module=r"dit_compress\.evaluate\.metrics")


__all__ = ["ConfigOption", "config_option", "quiet_library_warnings", "resolve_field", "set_threads",
           "stage_options"]
