"""The parts of the bundled Flux pipeline teacher (`zoo:scenes-flux`), built here from configs.

A real diffusers `FluxPipeline` for 32x32 digit scenes (`data/scenes.py`): the two tokenizers are made
with the `tokenizers` library over the scenes vocabulary in the layouts `CLIPTokenizer` (byte-level BPE,
one merge chain per word) and `T5TokenizerFast` (Unigram with one `▁word` piece per word) load; small
`CLIPTextModel` (pooled output) and `T5EncoderModel` (sequence output); a small `AutoencoderKL` from
32x32x3 to 8x8 latents; a `FluxTransformer2DModel` of FLUX's depth proportions (double- then
single-stream blocks); FLUX.1-dev's `FlowMatchEulerDiscreteScheduler` configuration.

The text encoders stay randomly initialised (seeded) and frozen. Every scene attribute is named by its
own words (digit colours, backgrounds, sizes, positions and digits share no word), so the caption's
content is carried by which token embeddings appear; a fixed random encoder keeps them distinct and the
transformer's context embedder learns to read them. Freezing keeps the encoders exactly the ones any
later stage re-encodes prompts with, and lets training encode each distinct caption once.

    >>> pipe = build_pipeline(ScenesFluxConfig.tiny(), seed=0)
    >>> save_pipeline(pipe, "folder"); FluxPipeline.from_pretrained("folder")("a large blue three at the centre",
    ...     height=32, width=32, max_sequence_length=SCENES_FLUX.t5_max_length)
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.scenes import CANVAS, VOCABULARY

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# CLIP's own text normalisation and word split, so the tokenizer behaves as CLIP's does on any text.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class ScenesFluxConfig:
    """Sizes of every component; `SCENES_FLUX` is the bundled teacher, `tiny()` the test build."""

    clip_max_length: int = 24  # the longest caption is 14 words plus BOS and EOS
    t5_max_length: int = 32  # the sequence length training uses: pass it as `max_sequence_length`
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    vae_channels: tuple[int, ...] = (32, 64, 128)  # three levels: 32x32 pixels -> 8x8 latents
    vae_layers_per_block: int = 1
    latent_channels: int = 8
    double_blocks: int = 8
    single_blocks: int = 16
    heads: int = 4
    head_dim: int = 32
    rope_axes: tuple[int, int, int] = (8, 12, 12)  # sums to head_dim, as in FLUX (16, 56, 56) for 128
    scheduler: dict = field(default_factory=lambda: {
        # FLUX.1-dev's scheduler: the sigma shift grows with the image's token count (here 16 tokens,
        # so exp(mu) is about 1.58); training samples sigmas through the same shift.
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096})

    @classmethod
    def tiny(cls) -> "ScenesFluxConfig":
        """The same build at test size: it loads and generates in well under a second."""
        return cls(text_width=16, text_layers=1, text_heads=2, vae_channels=(8, 8, 8), latent_channels=4,
                   double_blocks=1, single_blocks=1, heads=2, head_dim=8, rope_axes=(2, 2, 4))

    @property
    def vae_scale_factor(self) -> int:
        # FluxPipeline derives it the same way, from the VAE's block_out_channels.
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return CANVAS // self.vae_scale_factor

    def to_dict(self) -> dict:
        return asdict(self)


SCENES_FLUX = ScenesFluxConfig()


def _whole_word_merges(words) -> list[tuple[str, str]]:
    """BPE merges learnt until every word is one symbol: the most frequent adjacent pair first, ties
    broken alphabetically, so the result is a pure function of the words (tokenizers' BpeTrainer
    breaks ties in hash order). Replaying them on a word of the list rebuilds that word."""
    symbols = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in symbols:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, word in enumerate(symbols):
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            symbols[k] = merged


def build_clip_tokenizer(folder: Path, max_length: int, vocabulary=VOCABULARY):
    """A CLIP byte-level BPE tokenizer whose merges make each vocabulary word one token."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import CLIPTokenizer

    merges = _whole_word_merges(vocabulary)  # the words are ASCII, where byte-level symbols are the letters
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [CLIP_BOS, CLIP_EOS] + alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=CLIP_EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return _save_and_load(CLIPTokenizer, tok, folder, {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS, "do_lower_case": True})


def build_t5_tokenizer(folder: Path, max_length: int, vocabulary=VOCABULARY):
    """A T5 Unigram tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, one piece per word, letters as fallback.

    Like T5's own, it is case-sensitive; scene captions are lower case."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -5.0)]
    pieces += [("▁" + word, -1.0) for word in sorted(vocabulary)]
    pieces += [(c, -10.0) for c in string.ascii_lowercase + string.digits]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)])
    return _save_and_load(T5TokenizerFast, tok, folder, {
        "tokenizer_class": "T5Tokenizer", "model_max_length": max_length, "eos_token": T5_EOS,
        "pad_token": T5_PAD, "unk_token": T5_UNK, "extra_ids": 0, "additional_special_tokens": []})


def _save_and_load(cls, tok, folder: Path, config: dict):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return cls.from_pretrained(str(folder))


def build_text_encoders(cfg: ScenesFluxConfig, clip_vocab: int, t5_vocab: int, clip_eos_id: int):
    """Random CLIPTextModel and T5EncoderModel from the global seed, frozen, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.clip_max_length, bos_token_id=0, eos_token_id=clip_eos_id,
        pad_token_id=clip_eos_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=cfg.text_width, d_kv=cfg.text_width // cfg.text_heads,
        d_ff=2 * cfg.text_width, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=cfg.t5_max_length,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False))
    for encoder in (clip, t5):
        encoder.eval().requires_grad_(False)
    return clip, t5


def build_vae(cfg: ScenesFluxConfig, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """FLUX's VAE layout (no quant convs), small: scaling/shift are set from the trained latents."""
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=min(8, min(cfg.vae_channels)), sample_size=CANVAS, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def build_transformer(cfg: ScenesFluxConfig):
    """Without a guidance embedding (FLUX.1-schnell's layout): guidance is true CFG against the empty
    prompt, which caption dropout trains, so its scale is a knob whose effect can be measured."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width, pooled_projection_dim=cfg.text_width, guidance_embeds=False,
        axes_dims_rope=tuple(cfg.rope_axes))


def build_pipeline(cfg: ScenesFluxConfig, seed: int = 0):
    """Every component, randomly initialised from `seed` (the tokenizers depend on nothing random)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = build_clip_tokenizer(Path(tmp) / "clip", cfg.clip_max_length)
        t5_tok = build_t5_tokenizer(Path(tmp) / "t5", cfg.t5_max_length)
    clip, t5 = build_text_encoders(cfg, len(clip_tok), len(t5_tok), clip_tok.eos_token_id)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**cfg.scheduler), vae=build_vae(cfg),
                        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=build_transformer(cfg))


def save_pipeline(pipe, folder: Path, transformer_dtype: torch.dtype = torch.bfloat16) -> None:
    """A pipeline folder with safetensors, the transformer stored in `transformer_dtype` (FLUX ships
    bf16), every weight file under 16 MB. Loading casts back to the float32 of the other parts."""
    transformer = pipe.transformer
    try:
        pipe.transformer = transformer.to(transformer_dtype)
        pipe.save_pretrained(str(folder), safe_serialization=True, max_shard_size="15MB")
    finally:
        pipe.transformer = transformer.float()
    # transformers 5 saves T5TokenizerFast under its v5 name, T5Tokenizer, which transformers 4 reads as
    # the SentencePiece tokenizer; FLUX's own folders name the class that loads tokenizer.json in both.
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_pipeline(folder: Path, device: str = "cpu"):
    """The saved pipeline in float32 on `device`."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32).to(device)
