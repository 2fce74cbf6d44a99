"""Images to `.ditc` bytes and back with a trained codec.

y is coded as the residual round(y - mu) under N(0, sigma), z under its factorised prior; the
decoder recomputes mu and sigma from z_hat with the same network, so both sides code with the
same (snapped) parameters. The file names the codec's weights hash; another codec refuses it.

The header is validated (`CodecHeader`) and checked against the codec and the file's own payload
before any tensor is allocated: its shapes all follow from the image's, which is bounded per side
and by the payload's length, so a crafted header cannot make the decoder allocate more than a
bounded image's worth.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from pydantic import Field, model_validator

from ..config import StrictConfig
from ..fileio import validate
from . import entropy
from .bitstream import Bitstream, BitstreamError
from .model import HYPER, TILE, Y_BOUND, Z_BOUND, DiTCodec, pad_to

MAX_SIDE = 4096  # pixels per image side a .ditc file may describe
# At most this many pixels per payload byte (0.00024 bits per pixel): ~100x below the lowest rate
# a trained codec reaches on the held-out photos, and it caps what a tiny crafted file can claim.
PIXELS_PER_PAYLOAD_BYTE = 1 << 15

_Dim = Annotated[int, Field(ge=1, le=MAX_SIDE)]
_Shape = Annotated[list[_Dim], Field(min_length=3, max_length=3)]


class CodecHeader(StrictConfig):
    """The JSON header of a `.ditc` file (its schema version is the container's version byte)."""

    image: _Shape = Field(description="(1, H, W): the grayscale image")
    padded: _Shape = Field(description="(1, H, W) padded up to a multiple of 64")
    y: _Shape = Field(description="(C, H/16, W/16) of the padded image: the latent")
    z: _Shape = Field(description="(C_z, H/64, W/64): the hyper-latent")
    model: str = Field(max_length=4096)
    weights: str = Field(pattern=r"^[0-9a-f]{16}$", description="the writing codec's weights hash")
    lam: float = Field(alias="lambda", ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        _, h, w = self.image
        step = TILE * HYPER
        padded = [1, -(-h // step) * step, -(-w // step) * step]
        expected = {"image": [1, h, w], "padded": padded, "y": [self.y[0], padded[1] // TILE, padded[2] // TILE],
                    "z": [self.z[0], padded[1] // step, padded[2] // step]}
        for name, shape in expected.items():
            if getattr(self, name) != shape:
                raise ValueError(f"{name} is {getattr(self, name)}; an image of {h}x{w} has {shape}")
        return self


def read_header(stream: Bitstream, codec: DiTCodec, where: str) -> CodecHeader:
    """The validated header of `stream`, checked against `codec` and the payload's length."""
    header = validate(CodecHeader, stream.header, f"{where}: header", BitstreamError)
    if header.weights != weights_hash(codec):
        raise BitstreamError(f"{where}: written by codec {header.model!r} (weights {header.weights}), "
                             f"not by this one ({weights_hash(codec)})")
    if len(stream.streams) != 2:
        raise BitstreamError(f"{where}: expected 2 streams, found {len(stream.streams)}")
    if (header.y[0], header.z[0]) != (codec.channels, codec.hyper_channels):
        raise BitstreamError(f"{where}: header: latent channels {header.y[0]}/{header.z[0]}, the codec has "
                             f"{codec.channels}/{codec.hyper_channels}")
    payload = sum(len(s) for s in stream.streams)
    pixels = header.padded[1] * header.padded[2]
    if pixels > PIXELS_PER_PAYLOAD_BYTE * payload:
        raise BitstreamError(f"{where}: header: image {header.image[1]}x{header.image[2]} from {payload} payload "
                             f"bytes; at most {PIXELS_PER_PAYLOAD_BYTE} pixels per byte")
    return header


def weights_hash(codec: DiTCodec) -> str:
    h = hashlib.sha256()
    for name, t in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compress(codec: DiTCodec, image: torch.Tensor, model_id: str, lam: float) -> tuple[bytes, dict]:
    """`image`: (1, H, W) in [-1, 1]. Returns the file's bytes and the quantised symbols."""
    codec.eval()
    x = pad_to(image.unsqueeze(0))
    q = codec.quantise(x)
    z_mean, z_scale = codec.z_params(q["z"].float())
    z_stream = entropy.encode(q["z"], z_mean, z_scale, Z_BOUND)
    y_stream = entropy.encode(q["y"], torch.zeros_like(q["mu"]), q["sigma"], Y_BOUND)
    header = {"image": list(image.shape), "padded": list(x.shape[1:]), "y": list(q["y"].shape[1:]),
              "z": list(q["z"].shape[1:]), "model": model_id, "weights": weights_hash(codec), "lambda": lam}
    return Bitstream(header, (z_stream, y_stream)).to_bytes(), q


@torch.no_grad()
def decompress(codec: DiTCodec, data: bytes, where: str = "input", steps: int = 1) -> tuple[torch.Tensor, dict]:
    """The image (1, H, W) in [-1, 1] and what was read: the symbols and the dequantised latent y_hat."""
    codec.eval()
    stream = Bitstream.from_bytes(data, where)
    header = read_header(stream, codec, where)  # before any allocation
    z_shape = (1, *header.z)
    z_mean, z_scale = codec.z_params(torch.zeros(z_shape))
    try:
        z = entropy.decode(stream.streams[0], z_mean, z_scale, Z_BOUND)
        mu, sigma = codec.hyper_params(z.float())
        y = entropy.decode(stream.streams[1], torch.zeros_like(mu), sigma, Y_BOUND)
    except (ValueError, RuntimeError) as e:
        raise BitstreamError(f"{where}: entropy decoding failed ({e})") from None
    y_hat = y.float() + mu
    x_hat, _ = codec.decode_latent(y_hat, steps=steps)
    h, w = header.image[1:]
    return x_hat[0, :, :h, :w].clamp(-1, 1), {"z": z, "y": y, "y_hat": y_hat}
