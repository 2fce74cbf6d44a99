"""Family adapters: the one place that knows each DiT family's layout and call signature.

Every other module talks to a model through its adapter's *denoiser contract*:

    adapter.denoise(model, x, t, cond) -> prediction shaped like x

where `x` is an image-shaped latent (B, C, H, W), `t` the scheduler timestep of each sample
(B,) on the 0..1000 scale that diffusers schedulers use, and `cond` a dict of batch-first
condition tensors (class labels, or prompt embeddings for text families). Adapters also
name the transformer block lists (for depth surgery) and make example inputs for export.

The *layout* (`adapter.layout(model)`) describes a model's parts by kind, so that no stage
names a family or a module path: its blocks (DiT blocks, MMDiT joint blocks, Flux
single-stream blocks), each block's attentions by stream (image self-attention, joint
text-image attention, cross-attention), its FFNs (Flux single blocks' MLP as a described view
of `proj_mlp` and part of `proj_out`), its modulation (AdaLN), and the timestep / condition
embeddings. Every view names its module path, so a layout read on the teacher addresses the
same parts of a student copy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, UnsupportedModelError


# Block kinds.
DIT_BLOCK = "dit"        # image tokens only: self-attention (+ cross-attention to text), FFN (DiT, PixArt, Sana)
JOINT_BLOCK = "joint"    # MMDiT: separate image and text weights, one joint attention (SD3, Flux double-stream)
SINGLE_BLOCK = "single"  # Flux single-stream: one set of weights over the [text, image] sequence

# Attention kinds.
SELF_ATTENTION = "self"    # image queries over image keys
JOINT_ATTENTION = "joint"  # image and text queries over image and text keys
CROSS_ATTENTION = "cross"  # image queries over text keys

# Streams an FFN transforms.
IMAGE, TEXT, BOTH = "image", "text", "both"


@dataclass(frozen=True)
class BlockGroup:
    """A ModuleList of transformer blocks, the config key that counts them, and their kind."""

    attr: str
    config_key: str
    kind: str = DIT_BLOCK


@dataclass(frozen=True)
class AttentionView:
    """One attention module of a block."""

    path: str
    module: nn.Module
    kind: str                             # SELF_ATTENTION, JOINT_ATTENTION or CROSS_ATTENTION
    image_projections: tuple[str, ...]    # paths of the image stream's Q/K/V/out projections present
    text_projections: tuple[str, ...]     # paths of the text stream's own Q/K/V/out projections
    qk_norm: bool                         # queries and keys are normalised before the product
    linear: bool = False                  # the family's own attention is already linear (Sana)

    @property
    def output_projection(self) -> str | None:
        """The image stream's output projection (None where the block projects the attention
        output itself: Flux single-stream blocks)."""
        out = f"{self.path}.to_out.0"
        return out if out in self.image_projections else None


@dataclass(frozen=True)
class FFNView:
    """One feed-forward network of a block, described by its projections.

    `form` is "feedforward" (diffusers FeedForward: `up` = net.0.proj, activation, `down` =
    net.2), "glumbconv" (Sana's convolutional GLU: 1x1 conv up, depthwise conv, 1x1 conv down)
    or "fused" (Flux single blocks: `up` = proj_mlp, then act_mlp, and `down` = the columns
    `down_columns` of proj_out, whose other columns project the attention output), or "replaced"
    (an FFN an earlier stage replaced, e.g. by a mixture of experts). A fused or replaced view
    describes; it does not convert."""

    path: str              # the FFN module, or the block for a fused FFN
    name: str              # its attribute name in the block ("ff", "ff_context"; "mlp" for a fused FFN)
    stream: str            # IMAGE, TEXT or BOTH
    form: str
    up: str
    down: str
    hidden: int            # hidden width
    down_columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class BlockView:
    """One transformer block and its parts."""

    group: BlockGroup
    index: int
    module: nn.Module
    attentions: tuple[AttentionView, ...]
    ffns: tuple[FFNView, ...]
    modulation: tuple[str, ...]  # paths of its AdaLN norms (or modulation tables)

    @property
    def path(self) -> str:
        return f"{self.group.attr}.{self.index}"

    @property
    def kind(self) -> str:
        return self.group.kind

    @property
    def dual_attention(self) -> bool:
        """An MMDiT block with a second, image-only self-attention (SD3.5)."""
        kinds = [a.kind for a in self.attentions]
        return JOINT_ATTENTION in kinds and SELF_ATTENTION in kinds

    def image_attention(self) -> AttentionView:
        """The attention that mixes the block's image tokens: joint attention where the block
        has one, else its self-attention."""
        for kind in (JOINT_ATTENTION, SELF_ATTENTION):
            for a in self.attentions:
                if a.kind == kind:
                    return a
        raise UnsupportedModelError(f"{self.path}: no image attention")


@dataclass(frozen=True)
class ModelLayout:
    """A model's parts by kind, in forward order."""

    blocks: tuple[BlockView, ...]
    embedding: tuple[str, ...]       # timestep (+ class label / pooled text / guidance) embeddings
    text_embedding: tuple[str, ...]  # projections of the prompt tokens into the model
    head_modulation: tuple[str, ...]  # modulation of the output head

    def blocks_of(self, *kinds: str) -> list[BlockView]:
        return [b for b in self.blocks if not kinds or b.kind in kinds]

    def attentions(self, *kinds: str) -> list[AttentionView]:
        return [a for b in self.blocks for a in b.attentions if not kinds or a.kind in kinds]

    def attention(self, path: str) -> AttentionView:
        for a in self.attentions():
            if a.path == path:
                return a
        raise KeyError(f"no attention at {path!r}")

    def ffns(self, *streams: str) -> list[FFNView]:
        return [f for b in self.blocks for f in b.ffns if not streams or f.stream in streams]

    @property
    def modulation(self) -> tuple[str, ...]:
        return tuple(m for b in self.blocks for m in b.modulation) + self.head_modulation

    @property
    def dual_attention(self) -> bool:
        return any(b.dual_attention for b in self.blocks)


_IMAGE_QKVO = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_QKVO = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _present(module: nn.Module, prefix: str, names: tuple[str, ...]) -> tuple[str, ...]:
    own = dict(module.named_modules())
    return tuple(f"{prefix}.{n}" for n in names if own.get(n) is not None)


def _attention(block: nn.Module, prefix: str, attr: str, kind: str, linear: bool = False) -> AttentionView | None:
    attn = getattr(block, attr, None)
    if attn is None:
        return None
    path = f"{prefix}.{attr}"
    return AttentionView(path, attn, kind, _present(attn, path, _IMAGE_QKVO), _present(attn, path, _TEXT_QKVO),
                         getattr(attn, "norm_q", None) is not None, linear)


def _feedforward(block: nn.Module, prefix: str, attr: str, stream: str) -> FFNView | None:
    ff = getattr(block, attr, None)
    if ff is None:
        return None
    path = f"{prefix}.{attr}"
    if hasattr(ff, "conv_inverted"):  # Sana's GLUMBConv: the up-projection makes value and gate halves
        return FFNView(path, attr, stream, "glumbconv", f"{path}.conv_inverted", f"{path}.conv_point",
                       ff.conv_point.in_channels)
    if not hasattr(ff, "net"):  # replaced by an earlier stage (a mixture of experts): listed, not projected
        return FFNView(path, attr, stream, "replaced", path, path, 0)
    return FFNView(path, attr, stream, "feedforward", f"{path}.net.0.proj", f"{path}.net.2", ff.net[2].in_features)


def _shift_mu(image_tokens: int, c) -> float:
    """FLUX's and SD3's resolution-dependent shift: linear in the token count between two anchors."""
    x0, x1 = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    y0, y1 = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    return y0 + (image_tokens - x0) * (y1 - y0) / (x1 - x0)


def _tokenizer_length(folder: Path) -> int:
    """The `model_max_length` a tokenizer folder pads prompts to."""
    import json

    path = folder / "tokenizer_config.json"
    try:
        length = json.loads(path.read_text()).get("model_max_length")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable tokenizer config ({e})") from None
    if not isinstance(length, int) or not 0 < length < 100_000:
        raise CheckpointError(f"{path}: model_max_length is {length!r}, not a prompt length")
    return length


def _t5_with_mask(pipe, prompts, max_sequence_length, **kwargs) -> dict[str, torch.Tensor]:
    """PixArt / Sana: T5 (or Gemma) states and the padding mask the pipeline passes with them."""
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe.device,
                                            max_sequence_length=max_sequence_length, **kwargs)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


class FamilyAdapter(ABC):
    """Base adapter; subclasses set the class-level fields and the forward call."""

    family: str = ""
    class_name: str = ""
    block_groups: tuple[BlockGroup, ...] = (BlockGroup("transformer_blocks", "num_layers"),)
    text_tokens: int = 8  # prompt length of random text conditions (a pipeline's own, once followed)
    text_mask: bool = False  # random text conditions carry a padding mask (a followed pipeline's)
    rotary: bool = False  # attention applies rotary position embeddings (passed to each block)
    timestep_scale: float = 1.0  # the model's forward takes scheduler timesteps divided by this
    # Layout details that differ by family (block parts are named by block kind).
    text_embedding: tuple[str, ...] = ()   # modules that project prompt tokens into the model
    head_modulation: tuple[str, ...] = ()  # modulation of the output head
    linear_self_attention = False          # the family's own self-attention is already linear

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

    # -- text pipelines --------------------------------------------------------------
    pipeline_classes: tuple[str, ...] = ()  # diffusers pipelines that drive this transformer
    pipeline_latent_size: int | None = None  # the pipeline's default latent side, where the config has none

    def encode_prompts(self, pipe, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """The conditions the pipeline `pipe` gives the transformer for `prompts`, through its own
        `encode_prompt` (its tokenizers and text encoders)."""
        raise UnsupportedModelError(f"{self.class_name} is not driven by text prompts")

    pipeline_masks: bool = False  # the family's pipelines pass a padding mask with the prompt states

    @classmethod
    def pipeline_text_tokens(cls, folder: Path, max_sequence_length: int) -> int:
        """Length of the prompt states the family's pipeline in `folder` gives the transformer."""
        return max_sequence_length

    def follow_pipeline(self, text_tokens: int) -> "FamilyAdapter":
        """Random and example conditions laid out like the pipeline's encoded prompts (their length,
        and the padding mask where the pipeline passes one), so that exported graphs, deployment cards
        and timings take what the pipeline gives the transformer."""
        self.text_tokens, self.text_mask = int(text_tokens), self.pipeline_masks
        return self

    def set_timesteps(self, scheduler, steps: int) -> None:
        """The sampling timesteps the family's pipeline sets: with a resolution-dependent shift
        (`mu`, from the image's token count) when the scheduler shifts dynamically."""
        kwargs = {}
        c = scheduler.config
        if c.get("use_dynamic_shifting"):
            kwargs["mu"] = _shift_mu(math.prod(self.token_grid()), c)
        scheduler.set_timesteps(steps, **kwargs)

    # -- forward ---------------------------------------------------------------------
    @abstractmethod
    def denoise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model's prediction for latent `x` at timesteps `t`, shaped like `x`."""

    def _first_channels(self, out: torch.Tensor) -> torch.Tensor:
        # Learned-variance models (DiT/PixArt) return 2*C channels; the prediction is the first C.
        return out[:, : self.in_channels]

    # -- structure -------------------------------------------------------------------
    def blocks(self, model: nn.Module, *kinds: str) -> list[tuple[BlockGroup, int, nn.Module]]:
        """Every transformer block in forward order (only those of `kinds`, when given)."""
        return [(g, i, b) for g in self.block_groups if not kinds or g.kind in kinds
                for i, b in enumerate(getattr(model, g.attr))]

    def layout(self, model: nn.Module) -> ModelLayout:
        """`model`'s blocks, attentions, FFNs, modulation and embeddings, by kind."""
        blocks = []
        for g, i, block in self.blocks(model):
            prefix = f"{g.attr}.{i}"
            blocks.append(BlockView(g, i, block, tuple(a for a in self._attentions(g.kind, block, prefix) if a),
                                    tuple(f for f in self._ffns(g.kind, block, prefix) if f),
                                    self._modulation(g.kind, block, prefix)))
        return ModelLayout(tuple(blocks), self._embedding(model), self.text_embedding, self.head_modulation)

    def _attentions(self, kind: str, block: nn.Module, prefix: str) -> list[AttentionView | None]:
        if kind == DIT_BLOCK:
            return [_attention(block, prefix, "attn1", SELF_ATTENTION, self.linear_self_attention),
                    _attention(block, prefix, "attn2", CROSS_ATTENTION)]
        if kind == JOINT_BLOCK:  # attn2: SD3.5's image-only second attention
            return [_attention(block, prefix, "attn", JOINT_ATTENTION),
                    _attention(block, prefix, "attn2", SELF_ATTENTION)]
        return [_attention(block, prefix, "attn", JOINT_ATTENTION)]

    def _ffns(self, kind: str, block: nn.Module, prefix: str) -> list[FFNView | None]:
        if kind == SINGLE_BLOCK:  # proj_out reads [attention output, MLP hidden]
            if not isinstance(block.proj_mlp, nn.Linear):  # the MLP made an FFN of its own (a mixture of experts)
                path = f"{prefix}.proj_mlp"
                return [FFNView(path, "mlp", BOTH, "replaced", path, path, 0)]
            dim, hidden = block.proj_mlp.in_features, block.proj_mlp.out_features
            return [FFNView(prefix, "mlp", BOTH, "fused", f"{prefix}.proj_mlp", f"{prefix}.proj_out", hidden,
                            (dim, dim + hidden))]
        ffns = [_feedforward(block, prefix, "ff", IMAGE)]
        if kind == JOINT_BLOCK:
            ffns.append(_feedforward(block, prefix, "ff_context", TEXT))
        return ffns

    def _modulation(self, kind: str, block: nn.Module, prefix: str) -> tuple[str, ...]:
        names = {DIT_BLOCK: ("norm1",), JOINT_BLOCK: ("norm1", "norm1_context"), SINGLE_BLOCK: ("norm",)}[kind]
        return tuple(f"{prefix}.{n}" for n in names)

    @abstractmethod
    def _embedding(self, model: nn.Module) -> tuple[str, ...]:
        """Paths of the timestep / condition embedding modules."""

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

    head_modulation = ("proj_out_1",)

    def _embedding(self, model):
        # Every block embeds timestep and label itself (in its AdaLN-Zero norm); the head uses block 0's.
        return tuple(f"transformer_blocks.{i}.norm1.emb" for i in range(len(model.transformer_blocks)))


class _TableModulated:
    """PixArt / Sana: one AdaLN-single projection of the timestep, offset by a learned table per block;
    their pipelines pass the prompt's padding mask with its states."""

    pipeline_masks = True

    def _modulation(self, kind, block, prefix):
        return (f"{prefix}.scale_shift_table",)

    def random_conditions(self, n, generator):
        d = int(self.config["caption_channels"])
        cond = {"encoder_hidden_states": torch.randn(n, self.text_tokens, d, generator=generator)}
        if self.text_mask:
            cond["encoder_attention_mask"] = torch.ones(n, self.text_tokens, dtype=torch.long)
        return cond

    def null_conditions(self, cond):
        null = super().null_conditions(cond)
        if "encoder_attention_mask" in cond:  # zero states, attended as the prompt's are (a copy, as for guidance)
            null["encoder_attention_mask"] = cond["encoder_attention_mask"].clone()
        return null


class PixArtAdapter(_TableModulated, FamilyAdapter):
    family, class_name = "pixart", "PixArtTransformer2DModel"
    text_embedding = ("caption_projection",)
    head_modulation = ("adaln_single.linear", "scale_shift_table")

    def _embedding(self, model):
        return ("adaln_single.emb",)

    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        return _t5_with_mask(pipe, prompts, max_sequence_length, clean_caption=False)

    def denoise(self, model, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        # The config may leave it None: diffusers then turns it on for sample_size 128 (PixArt-XL-2-1024).
        if getattr(model, "use_additional_conditions", self.config.get("use_additional_conditions")):
            b = x.shape[0]
            size = float(self.latent_size * 8)
            like = {"device": x.device, "dtype": x.dtype}
            added = {"resolution": torch.full((b, 2), size, **like), "aspect_ratio": torch.ones(b, 1, **like)}
        out = model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                    encoder_attention_mask=cond.get("encoder_attention_mask"), added_cond_kwargs=added,
                    return_dict=False)[0]
        return self._first_channels(out)


class _MMDiT:
    text_embedding = ("context_embedder",)
    head_modulation = ("norm_out",)

    def _embedding(self, model):
        return ("time_text_embed",)


class SD3Adapter(_MMDiT, FamilyAdapter):
    family, class_name = "sd3", "SD3Transformer2DModel"
    block_groups = (BlockGroup("transformer_blocks", "num_layers", JOINT_BLOCK),)

    def random_conditions(self, n, generator):
        return {
            "encoder_hidden_states": torch.randn(
                n, self.text_tokens, int(self.config["joint_attention_dim"]), generator=generator),
            "pooled_projections": torch.randn(
                n, int(self.config["pooled_projection_dim"]), generator=generator),
        }

    pipeline_classes = ("StableDiffusion3Pipeline",)

    @classmethod
    def pipeline_text_tokens(cls, folder, max_sequence_length):
        # Both CLIPs' states, padded to the CLIP tokenizer's length, then T5's.
        return _tokenizer_length(Path(folder) / "tokenizer") + max_sequence_length

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

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


class FluxAdapter(_MMDiT, FamilyAdapter):
    """Flux takes 2x2-packed latent tokens plus positional ids; the adapter packs and unpacks."""

    family, class_name = "flux", "FluxTransformer2DModel"
    block_groups = (
        BlockGroup("transformer_blocks", "num_layers", JOINT_BLOCK),
        BlockGroup("single_transformer_blocks", "num_single_layers", SINGLE_BLOCK),
    )
    guidance_scale = 3.5  # distilled-guidance models take it as an input
    pipeline_latent_size = 128  # FluxPipeline's default: 1024 px through the 8x VAE (the config has no sample_size)
    rotary = True
    timestep_scale = 1000.0  # Flux takes t in 0..1

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
        if "guidance" in cond:  # a copy: the calibration cache stores both, and safetensors refuses shared memory
            null["guidance"] = cond["guidance"].clone()
        return null

    pipeline_classes = ("FluxPipeline",)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.device,
                                               max_sequence_length=max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.config.get("guidance_embeds"):  # FLUX.1-dev: distilled guidance is an input
            cond["guidance"] = torch.full((len(prompts),), self.guidance_scale)
        return cond

    def set_timesteps(self, scheduler, steps):
        # FluxPipeline's own sigmas (1 .. 1/steps), shifted by mu for the image's token count.
        import numpy as np

        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = _shift_mu(math.prod(self.token_grid()), scheduler.config)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, sigmas=sigmas, **kwargs)

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
                    timestep=t / self.timestep_scale, img_ids=img_ids, txt_ids=txt_ids,
                    guidance=cond.get("guidance"), return_dict=False)[0]
        return out.view(b, hh, ww, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class SanaAdapter(_TableModulated, FamilyAdapter):
    family, class_name = "sana", "SanaTransformer2DModel"
    linear_self_attention = True  # ReLU linear attention, with softmax cross-attention
    text_embedding = ("caption_projection", "caption_norm")
    head_modulation = ("time_embed.linear", "scale_shift_table")

    def _embedding(self, model):
        return ("time_embed.emb",)

    pipeline_classes = ("SanaPipeline",)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        import inspect

        # The instruction SanaPipeline prepends to every prompt by default (for its Gemma encoder).
        instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
        return _t5_with_mask(pipe, prompts, max_sequence_length, clean_caption=False,
                             complex_human_instruction=instruction)

    def denoise(self, model, x, t, cond):
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                     encoder_attention_mask=cond.get("encoder_attention_mask"), return_dict=False)[0]


class LabelConditionedAdapter(FamilyAdapter):
    """A text-conditioned family driven by class labels through a learned conditioner.

    The conditioner is frozen and shared by teacher and student; it is traced into the exported
    graph, whose condition input is then `class_labels`."""

    def __init__(self, base: FamilyAdapter, conditioner: nn.Module):
        self.base, self.conditioner = base, conditioner
        self.family, self.class_name, self.block_groups = base.family, base.class_name, base.block_groups
        self.rotary, self.timestep_scale = base.rotary, base.timestep_scale

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

    def blocks(self, model, *kinds):
        return self.base.blocks(model, *kinds)

    def set_timesteps(self, scheduler, steps):
        self.base.set_timesteps(scheduler, steps)

    def layout(self, model):
        return self.base.layout(model)

    def _embedding(self, model):
        return self.base._embedding(model)

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


def adapter_for_pipeline(class_name: str) -> type[FamilyAdapter]:
    for a in ADAPTERS:
        if class_name in a.pipeline_classes:
            return a
    known = ", ".join(c for a in ADAPTERS for c in a.pipeline_classes)
    raise UnsupportedModelError(f"unsupported pipeline class {class_name!r}; supported: {known}")


def adapter_for_family(family: str) -> type[FamilyAdapter]:
    for a in ADAPTERS:
        if a.family == family:
            return a
    raise UnsupportedModelError(f"unknown family {family!r}; known: {', '.join(a.family for a in ADAPTERS)}")


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
