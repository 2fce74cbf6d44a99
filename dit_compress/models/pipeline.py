"""Text-to-image pipeline folders around a transformer: prompts in through the pipeline's own text
encoders, latents out through its VAE, and the folder handed back with a compressed transformer.

A pipeline folder is what `DiffusionPipeline.save_pretrained` writes: `model_index.json` and one
subfolder per component. The transformer is loaded by `models/load.py` like any model; this module
loads the other components (text encoders, tokenizers, VAE) once, without the transformer.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, RecipeError
from .families import FamilyAdapter, adapter_for_pipeline

log = logging.getLogger("dit_compress")

INDEX = "model_index.json"
PROMPT_CHUNK = 64  # prompts encoded per text-encoder call
MAX_PROMPTS = 1_000_000
MAX_PROMPT_CHARS = 2000


@dataclass
class TextPipeline:
    """A pipeline folder's components other than the transformer, loaded on first use."""

    folder: Path
    class_name: str
    max_sequence_length: int        # the T5 (or Gemma) length prompts are encoded at
    text_tokens: int                # length of the prompt states the transformer is given
    negative_prompt: str = ""       # what guidance pushes away from
    card: dict = field(default_factory=dict)
    _pipe: object = field(default=None, repr=False)

    @classmethod
    def find(cls, folder: Path, card: dict | None = None) -> "TextPipeline | None":
        """The pipeline in `folder`, or None when it is not a pipeline folder with text encoders."""
        index_path = Path(folder) / INDEX
        if not index_path.is_file():
            return None
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: unreadable pipeline index ({e})") from None
        if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
            raise CheckpointError(f"{index_path}: no '_class_name'; is this a diffusers pipeline folder?")
        name = index["_class_name"]
        encoders = [k for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0]]
        if not encoders:
            return None
        family = adapter_for_pipeline(name)  # raises with the supported pipelines
        sampling = (card or {}).get("sampling", {})
        length = int(sampling.get("max_sequence_length") or _call_default(name, "max_sequence_length"))
        return cls(Path(folder), name, length, family.pipeline_text_tokens(Path(folder), length),
                   str(sampling.get("negative_prompt", "")), card or {})

    # -- components ------------------------------------------------------------------
    def components(self):
        """The diffusers pipeline without its transformer (text encoders, tokenizers, VAE, scheduler)."""
        if self._pipe is None:
            import diffusers

            try:
                with quiet_loading():
                    self._pipe = getattr(diffusers, self.class_name).from_pretrained(
                        str(self.folder), transformer=None, dtype=torch.float32)
            except Exception as e:
                raise CheckpointError(f"cannot load the pipeline in {self.folder}: {str(e).splitlines()[0]}") from None
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def with_transformer(self, transformer: torch.nn.Module):
        """A stock diffusers pipeline of this folder's components around `transformer`."""
        import diffusers

        parts = {k: v for k, v in self.components().components.items() if k != "transformer"}
        return getattr(diffusers, self.class_name)(transformer=transformer, **parts)

    # -- prompts -> conditions ---------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], adapter: FamilyAdapter) -> dict[str, torch.Tensor]:
        """The transformer's conditions for each prompt, as the pipeline computes them; each distinct
        prompt is encoded once."""
        distinct = sorted(set(prompts))
        pipe = self.components()
        parts = [adapter.encode_prompts(pipe, distinct[i : i + PROMPT_CHUNK], self.max_sequence_length)
                 for i in range(0, len(distinct), PROMPT_CHUNK)]
        table = {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}
        index = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([index[p] for p in prompts])
        return {k: (v.float() if v.is_floating_point() else v)[rows].contiguous() for k, v in table.items()}

    def card_prompts(self, key: str) -> list[str] | None:
        """A prompt set the bundled teacher ships (`prompts` for calibration, `eval_prompts` for evaluation)."""
        name = self.card.get(key)
        return read_prompts(self.folder / name) if name else None

    # -- latents -> images -------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) from the transformer's (unpacked) latents, through the VAE
        as the pipeline decodes them."""
        vae = self.components().vae
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
        out = [vae.decode(latents[i : i + chunk] / scale + shift, return_dict=False)[0]
               for i in range(0, latents.shape[0], chunk)]
        return torch.cat(out).clamp(-1, 1)

    def record(self) -> dict:
        """What a checkpoint's manifest keeps of the pipeline."""
        return {"class_name": self.class_name, "max_sequence_length": self.max_sequence_length,
                "negative_prompt": self.negative_prompt}

    # -- pipeline out ------------------------------------------------------------------
    def write(self, out: Path, transformer_dir: Path | None) -> Path:
        """`out`: this pipeline's folder with `transformer_dir` (a diffusers model folder) as its
        transformer. Without one (a model no stock class loads), `transformer/` is left out and
        `dit_compress.load_pipeline` supplies the compressed transformer. Large files are hard-linked
        where the file system allows, else copied."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(self.folder.iterdir()):
            if item.name in ("transformer", "ditc_zoo.json", "metrics.json") or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, out / item.name, copy_function=_link_or_copy)
            elif item.is_file():
                _link_or_copy(item, out / item.name)
        if transformer_dir is not None:
            shutil.copytree(transformer_dir, out / "transformer", copy_function=_link_or_copy)
        return out


@contextmanager
def quiet_loading():
    """No per-component loading bars (a run's own progress bars say what it is doing) or import chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Importing a pipeline class imports image processors that warn about torchvision, unused here.
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _link_or_copy(src, dst) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def _call_default(class_name: str, name: str):
    import diffusers

    return inspect.signature(getattr(diffusers, class_name).__call__).parameters[name].default


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped) or a JSON
    list of strings."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROMPTS * 200:
            raise RecipeError(f"{path}: prompt file too large ({path.stat().st_size} bytes)")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: prompt file is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RecipeError(f"{path}: a JSON prompt file must be a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise RecipeError(f"{path}: no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise RecipeError(f"{path}: {len(prompts)} prompts, more than {MAX_PROMPTS}")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise RecipeError(f"{path}: prompt {long + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts
