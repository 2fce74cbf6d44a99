"""Family adapters: the one place that knows each DiT family's layout and call signature.

Every other module talks to a model through its adapter's *denoiser contract*:

    adapter.denoise(model, x, t, cond) -> prediction shaped like x

where `x` is an image-shaped latent (B, C, H, W), `t` the scheduler timestep of each sample
(B,) on the 0..1000 scale that diffusers schedulers use, and `cond` a dict of batch-first
condition tensors (class labels, or prompt embeddings for text families). Adapters also
name the transformer block lists (for depth surgery) and make example inputs for export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockGroup:
    """A ModuleList of transformer blocks and the config key that counts them."""

    attr: str
    config_key: str


class FamilyAdapter(ABC):
    """Base adapter; subclasses set the class-level fields and the forward call."""

    family: str = ""
    class_name: str = ""
    block_groups: tuple[BlockGroup, ...] = (BlockGroup("transformer_blocks", "num_layers"),)
    text_tokens: int = 8  # prompt length used for synthetic text conditions

    def __init__(self, model: nn.Module, latent_size: int | None = None):
        self.config = dict(model.config)
        self._latent_size = latent_size

    # -- geometry and conditions -------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def latent_size(self) -> int:
        return int(self._latent_size or self.config.get("sample_size") or 16)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.latent_size, self.latent_size)

    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tokens the transformer blocks see (row-major order)."""
        side = self.latent_size // int(self.config.get("patch_size") or 1)
        return side, side

    @property
    def num_classes(self) -> int | None:
        """Number of class labels for class-conditional families, else None."""
        return None

    @abstractmethod
    def random_conditions(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Seeded conditions for calibration: class labels, or synthetic prompt embeddings."""

    def null_conditions(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional input for classifier-free guidance (empty prompt -> zeros)."""
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    # -- forward ---------------------------------------------------------------------
    @abstractmethod
    def denoise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model's prediction for latent `x` at timesteps `t`, shaped like `x`."""

    def _first_channels(self, out: torch.Tensor) -> torch.Tensor:
        # Learned-variance models (DiT/PixArt) return 2*C channels; the prediction is the first C.
        return out[:, : self.in_channels]

    # -- structure -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[tuple[BlockGroup, int, nn.Module]]:
        return [(g, i, b) for g in self.block_groups for i, b in enumerate(getattr(model, g.attr))]

    def protected_blocks(self, model: nn.Module) -> set[tuple[str, int]]:
        """Blocks that depth pruning must keep, as (group attr, index)."""
        return set()

    def remove_blocks_(self, model: nn.Module, group: BlockGroup, keep: list[int]) -> None:
        """Keep only blocks `keep` of `group` (in order) and update the config so it reloads."""
        blocks = getattr(model, group.attr)
        setattr(model, group.attr, nn.ModuleList([blocks[i] for i in keep]))
        model.register_to_config(**{group.config_key: len(keep)})
        self.config = dict(model.config)

    # -- export ----------------------------------------------------------------------
    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.latent_shape(), generator=g)
        t = torch.rand(batch, generator=g) * 1000
        return x, t, self.random_conditions(batch, g)


class DiTAdapter(FamilyAdapter):
    family, class_name = "dit", "DiTTransformer2DModel"

    @property
    def num_classes(self) -> int:
        return int(self.config["num_embeds_ada_norm"])

    def random_conditions(self, n, generator):
        return {"class_labels": torch.randint(0, self.num_classes, (n,), generator=generator)}

    def null_conditions(self, cond):
        # diffusers' LabelEmbedding reserves id == num_classes for "no label".
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}

    def denoise(self, model, x, t, cond):
        out = model(x, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]
        return self._first_channels(out)

    def protected_blocks(self, model):
        # The output head reads block 0's timestep/label embedding (norm1.emb).
        return {("transformer_blocks", 0)}


class PixArtAdapter(FamilyAdapter):
    family, class_name = "pixart", "PixArtTransformer2DModel"

    def random_conditions(self, n, generator):
        d = int(self.config["caption_channels"])
        return {"encoder_hidden_states": torch.randn(n, self.text_tokens, d, generator=generator)}

    def denoise(self, model, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        # The config may leave it None: diffusers then turns it on for sample_size 128 (PixArt-XL-2-1024).
        if getattr(model, "use_additional_conditions", self.config.get("use_additional_conditions")):
            b = x.shape[0]
            size = float(self.latent_size * 8)
            like = {"device": x.device, "dtype": x.dtype}
            added = {"resolution": torch.full((b, 2), size, **like), "aspect_ratio": torch.ones(b, 1, **like)}
        out = model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                    added_cond_kwargs=added, return_dict=False)[0]
        return self._first_channels(out)


class SD3Adapter(FamilyAdapter):
    family, class_name = "sd3", "SD3Transformer2DModel"

    def random_conditions(self, n, generator):
        return {
            "encoder_hidden_states": torch.randn(
                n, self.text_tokens, int(self.config["joint_attention_dim"]), generator=generator),
            "pooled_projections": torch.randn(
                n, int(self.config["pooled_projection_dim"]), generator=generator),
        }

    def denoise(self, model, x, t, cond):
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=t, return_dict=False)[0]

    def protected_blocks(self, model):
        # The last joint block is built with context_pre_only=True (no text output path);
        # another block in its place would not reload from the config.
        return {("transformer_blocks", len(model.transformer_blocks) - 1)}

    def remove_blocks_(self, model, group, keep):
        super().remove_blocks_(model, group, keep)
        dual = self.config.get("dual_attention_layers") or ()
        if dual:  # SD3.5: re-index the blocks that carry a second attention
            model.register_to_config(dual_attention_layers=tuple(keep.index(i) for i in dual if i in keep))
            self.config = dict(model.config)


class FluxAdapter(FamilyAdapter):
    """Flux takes 2x2-packed latent tokens plus positional ids; the adapter packs and unpacks."""

    family, class_name = "flux", "FluxTransformer2DModel"
    block_groups = (
        BlockGroup("transformer_blocks", "num_layers"),
        BlockGroup("single_transformer_blocks", "num_single_layers"),
    )
    guidance_scale = 3.5  # distilled-guidance models take it as an input

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"]) // 4

    def token_grid(self):
        return self.latent_size // 2, self.latent_size // 2  # 2x2-packed latents

    def random_conditions(self, n, generator):
        cond = {
            "encoder_hidden_states": torch.randn(
                n, self.text_tokens, int(self.config["joint_attention_dim"]), generator=generator),
            "pooled_projections": torch.randn(
                n, int(self.config["pooled_projection_dim"]), generator=generator),
        }
        if self.config.get("guidance_embeds"):
            cond["guidance"] = torch.full((n,), self.guidance_scale)
        return cond

    def null_conditions(self, cond):
        null = super().null_conditions(cond)
        if "guidance" in cond:
            null["guidance"] = cond["guidance"]
        return null

    def denoise(self, model, x, t, cond):
        b, c, h, w = x.shape
        hh, ww = h // 2, w // 2
        tokens = x.view(b, c, hh, 2, ww, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww, c * 4)
        rows = torch.arange(hh, dtype=x.dtype, device=x.device)[:, None].expand(hh, ww)
        cols = torch.arange(ww, dtype=x.dtype, device=x.device)[None, :].expand(hh, ww)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        txt = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, dtype=x.dtype, device=x.device)
        out = model(tokens, encoder_hidden_states=txt, pooled_projections=cond["pooled_projections"],
                    timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids,
                    guidance=cond.get("guidance"), return_dict=False)[0]
        return out.view(b, hh, ww, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class SanaAdapter(FamilyAdapter):
    family, class_name = "sana", "SanaTransformer2DModel"

    def random_conditions(self, n, generator):
        d = int(self.config["caption_channels"])
        return {"encoder_hidden_states": torch.randn(n, self.text_tokens, d, generator=generator)}

    def denoise(self, model, x, t, cond):
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t, return_dict=False)[0]


class LabelConditionedAdapter(FamilyAdapter):
    """A text-conditioned family driven by class labels through a learned conditioner.

    The conditioner is frozen and shared by teacher and student; it is traced into the exported
    graph, whose condition input is then `class_labels`."""

    def __init__(self, base: FamilyAdapter, conditioner: nn.Module):
        self.base, self.conditioner = base, conditioner
        self.family, self.class_name, self.block_groups = base.family, base.class_name, base.block_groups

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def latent_size(self) -> int:
        return self.base.latent_size

    def token_grid(self):
        return self.base.token_grid()

    @property
    def num_classes(self) -> int:
        return int(self.conditioner.num_classes)

    def random_conditions(self, n, generator):
        return {"class_labels": torch.randint(0, self.num_classes, (n,), generator=generator)}

    def null_conditions(self, cond):
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}

    def denoise(self, model, x, t, cond):
        return self.base.denoise(model, x, t, self.conditioner(cond["class_labels"]))

    def blocks(self, model):
        return self.base.blocks(model)

    def protected_blocks(self, model):
        return self.base.protected_blocks(model)

    def remove_blocks_(self, model, group, keep):
        self.base.remove_blocks_(model, group, keep)


ADAPTERS: tuple[type[FamilyAdapter], ...] = (DiTAdapter, PixArtAdapter, SD3Adapter, FluxAdapter, SanaAdapter)
SUPPORTED_CLASSES = tuple(a.class_name for a in ADAPTERS)


def adapter_for_class(class_name: str) -> type[FamilyAdapter]:
    for a in ADAPTERS:
        if a.class_name == class_name:
            return a
    raise UnsupportedModelError(
        f"unsupported model class {class_name!r}; supported: {', '.join(SUPPORTED_CLASSES)}")


def get_adapter(model: nn.Module, latent_size: int | None = None,
                conditioner: nn.Module | None = None) -> FamilyAdapter:
    """The adapter for `model`, chosen by its diffusers class (subclasses included)."""
    import diffusers

    for a in ADAPTERS:
        cls = getattr(diffusers, a.class_name, None)
        if cls is not None and isinstance(model, cls):
            base = a(model, latent_size)
            return LabelConditionedAdapter(base, conditioner) if conditioner is not None else base
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__name__!r}; supported: {', '.join(SUPPORTED_CLASSES)}")
