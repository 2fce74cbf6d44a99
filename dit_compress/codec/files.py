"""Images to `.ditc` bytes and back with a trained codec.

y is coded as the residual round(y - mu) under N(0, sigma), z under its factorised prior; the
decoder recomputes mu and sigma from z_hat with the same network, so both sides code with the
same (snapped) parameters. The file names the codec's weights hash; another codec refuses it.
"""

from __future__ import annotations

import hashlib

import torch

from . import entropy
from .bitstream import Bitstream, BitstreamError
from .model import Y_BOUND, Z_BOUND, DiTCodec, pad_to


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
    header = stream.header
    if header.get("weights") != weights_hash(codec):
        raise BitstreamError(f"{where}: written by codec {header.get('model')!r} (weights {header.get('weights')}), "
                             f"not by this one ({weights_hash(codec)})")
    if len(stream.streams) != 2:
        raise BitstreamError(f"{where}: expected 2 streams, found {len(stream.streams)}")
    z_shape, y_shape = (1, *header["z"]), (1, *header["y"])
    z_mean, z_scale = codec.z_params(torch.zeros(z_shape))
    try:
        z = entropy.decode(stream.streams[0], z_mean, z_scale, Z_BOUND)
        mu, sigma = codec.hyper_params(z.float())
        y = entropy.decode(stream.streams[1], torch.zeros_like(mu), sigma, Y_BOUND)
    except (ValueError, RuntimeError) as e:
        raise BitstreamError(f"{where}: entropy decoding failed ({e})") from None
    y_hat = y.float() + mu
    x_hat, _ = codec.decode_latent(y_hat, steps=steps)
    h, w = header["image"][1:]
    return x_hat[0, :, :h, :w].clamp(-1, 1), {"z": z, "y": y, "y_hat": y_hat}
