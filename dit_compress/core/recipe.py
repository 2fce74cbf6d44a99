"""Recipes: YAML (safe-loaded) -> a validated, hashed description of one reproducible compression."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..config import StrictConfig
from ..data.calibration import CalibrationSpec
from ..errors import RecipeError
from ..fileio import describe_errors, did_you_mean, read_yaml, yaml_value
from ..train.distill import DistillConfig
from ..train.trainable import trainable_policy
from .stage import get_stage


class ModelSpec(StrictConfig):
    source: str = Field(description="zoo:NAME, a diffusers folder, a hub id, or a .safetensors file")
    subfolder: str | None = None
    config: str | None = Field(None, description="config.json for a bare .safetensors file")
    latent_size: int | None = Field(None, ge=2, description="latent height/width if not in the config")


class EvaluationSpec(StrictConfig):
    num_samples: int = Field(500, ge=10, le=1_000_000, description="samples per seed for class and Fréchet metrics")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    compare_samples: int = Field(100, ge=1, le=1_000_000, description="student-vs-teacher samples for PSNR/SSIM")
    sampling_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=1.0)
    denoiser_samples: int = Field(256, ge=8, le=1_000_000)
    timestep_bands: int = Field(4, ge=1, le=20)
    latency_batch: int = Field(16, ge=1)
    latency_repeats: int = Field(20, ge=3)
    memory_batch: int = Field(256, ge=1, description="batch of the peak-memory forward pass")
    prompts: str | None = Field(None, description=(
        "prompt file (one per line, or a JSON list) a text-to-image pipeline teacher is evaluated on; default: "
        "the bundled teacher's evaluation prompts, else the calibration prompts"))


class GateRule(StrictConfig):
    metric: str = Field(description="dotted path into report.json, e.g. quality.fd_ratio")
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of `max` or `min`")
        return self


class ExportSpec(StrictConfig):
    onnx: bool = True
    batch: int = Field(2, ge=2, description="example batch used for tracing (>= 2: torch.export specialises "
                                            "a batch of 1 into the graph)")
    opset: int | None = Field(None, ge=17)
    parity_atol: float = Field(1e-4, gt=0)
    precisions: list[Literal["fp16", "bf16", "int8-dynamic", "int8-static"]] = Field(
        default_factory=list, description="deployment variants of the student graph, each evaluated")
    half_rtol: float = Field(2e-2, gt=0, description="fp16/bf16 parity: max error relative to the output range")
    int8_calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    optimize: bool = Field(False, description="measure ONNX Runtime's graph optimisation levels and fusions")
    tensorrt: bool = Field(False, description="build and time a TensorRT engine when a GPU and TensorRT exist")

    @model_validator(mode="after")
    def _needs_onnx(self):
        if not self.onnx and (self.precisions or self.optimize or self.tensorrt):
            raise ValueError("precisions, optimize and tensorrt work on the ONNX export: set onnx: true")
        return self


class StageSpec(StrictConfig):
    name: str
    config: StrictConfig


RECIPE_VERSION = 1


class Recipe(StrictConfig):
    version: Literal[1] = Field(RECIPE_VERSION, description="recipe schema version (a recipe without it is 1)")
    name: str
    description: str = ""
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[StageSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gate: list[GateRule] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)

    def to_dict(self) -> dict:
        # The schema version is not part of what a run computes, so not of its hash.
        d = self.model_dump(mode="json", exclude={"stages", "version"})
        d["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in self.stages]
        return d

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i]) or 'recipe'} has no item {part!r}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}  # `--set stages.0.prune.recover.steps=5` may create a section
                node = node[part]
        else:
            raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i])} is a value, not a section")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars (1e-4, true, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml_value(raw, f"--set {item}", RecipeError))
    return data


def check_model_source(spec: ModelSpec) -> list[str]:
    """What `run` will find wrong with `model:` before loading weights: unknown zoo names, missing
    folders or files, configs of unsupported classes. Hub ids are not looked up (offline)."""
    from ..errors import DitcError
    from ..models.families import adapter_for_class
    from ..models.load import ZOO_PREFIX, resolve_source, zoo_names

    where = "model.source"
    if spec.source.startswith(ZOO_PREFIX) and spec.source[len(ZOO_PREFIX):] not in zoo_names():
        name = spec.source[len(ZOO_PREFIX):]
        return [f"{where}: unknown zoo model {name!r}{did_you_mean(name, zoo_names())} "
                f"(available: {', '.join(zoo_names())})"]
    source, subfolder, _ = resolve_source(spec.source, spec.subfolder)
    path = Path(source)
    if path.suffix == ".safetensors":
        if not path.is_file():
            return [f"{where}: file not found: {path}"]
        if spec.config is None:
            return [f"{where}: a bare .safetensors file needs `model.config` naming its config.json"]
        config = Path(spec.config)
    elif path.exists():
        config = path / (subfolder or "") / "config.json"
    elif len(spec.source.split("/")) == 2 and not spec.source.startswith((".", "/", "~")):
        return []  # a hub id: read when the run starts
    else:
        return [f"{where}: not found: {spec.source!r} (expected zoo:NAME, a folder, a hub id org/name, "
                "or a .safetensors file)"]
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        return [f"{where}: cannot read the model config {config}: {e}"]
    try:
        adapter_for_class(class_name)
    except DitcError as e:
        return [f"{where}: {e}"]
    return []


def parse_recipe(data: Any, where: str = "recipe", check_source: bool = False) -> Recipe:
    """Validate a recipe mapping. Every problem is collected and raised together, one per line;
    `check_source` also checks `model.source` as `run` will (without loading weights)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    errors: list[str] = []
    raw_stages = data.get("stages")
    stages = []
    if not isinstance(raw_stages, list) or not raw_stages:
        errors.append(f"{where}: stages: give a non-empty list like `- prune: {{ratio: 0.5}}`")
        raw_stages = []
    for i, item in enumerate(raw_stages):
        if not isinstance(item, dict) or len(item) != 1:
            errors.append(f"{where}: stages[{i}]: each stage is a one-key mapping `- NAME: {{config}}`")
            continue
        (name, cfg), = item.items()
        try:
            cls = get_stage(name).config_cls
        except RecipeError:
            from .stage import STAGES

            errors.append(f"{where}: stages[{i}]: unknown stage {name!r}{did_you_mean(name, STAGES)} "
                          f"(available: {', '.join(sorted(STAGES))})")
            continue
        try:
            stages.append(StageSpec(name=name, config=cls.model_validate(cfg or {})))
        except ValidationError as e:
            errors += describe_errors(e, f"{where}: stages[{i}].{name}", cls)
    if not errors:
        for i, spec in enumerate(stages):  # an adapter a phase attaches stays on the model
            distills = [(f".{key}", v) for key, v in spec.config if isinstance(v, DistillConfig)]
            if isinstance(spec.config, DistillConfig):  # a stage whose config is its distillation (recover)
                distills.append(("", spec.config))
            for key, value in distills:
                if not trainable_policy(value.trainable).attaches:
                    continue
                field = f"{where}: stages[{i}].{spec.name}{key}.trainable: {value.trainable[0]}"
                if not get_stage(spec.name).adapter_allowed(spec.config):
                    errors.append(f"{field}: {spec.name} trains new weights inside its method, which an adapter "
                                  "on frozen weights cannot")
                elif i < len(stages) - 1:
                    errors.append(f"{field}: the adapter stays on the model, so it must be the last stage's "
                                  "training")
    if "model" not in data:
        errors.append(f"{where}: model: missing (add `model: {{source: zoo:digits-dit}}`)")
    # The other sections, validated whatever the stages' state (a placeholder stands in for them).
    placeholder = [StageSpec.model_construct(name="-", config=StrictConfig())]
    recipe = None
    try:
        recipe = Recipe.model_validate({**data, "stages": stages if len(stages) == len(raw_stages) and stages
                                        else placeholder})
    except ValidationError as e:
        errors += describe_errors(e, f"{where}:", Recipe, skip={("model", "missing")})
    if check_source and isinstance(data.get("model"), dict) and isinstance(data["model"].get("source"), str):
        errors += [f"{where}: {line}" for line in check_model_source(ModelSpec.model_construct(
            source=data["model"]["source"], subfolder=data["model"].get("subfolder"),
            config=data["model"].get("config")))]
    if errors:
        raise RecipeError("\n".join(errors))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_source: bool = False) -> Recipe:
    data = read_yaml(path, "recipe", RecipeError)
    return parse_recipe(apply_overrides(data or {}, overrides or []), str(path), check_source)
