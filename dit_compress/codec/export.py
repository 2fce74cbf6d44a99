"""The codec's decoder (quantised latent -> image) as an ONNX graph, with the parity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportParityError
from ..export.onnx import ort_session
from .files import compress
from .model import DiTCodec


class DecoderGraph(nn.Module):
    def __init__(self, codec: DiTCodec):
        super().__init__()
        self.codec = codec

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_latent(y_hat)[0]


def export_decoder(codec: DiTCodec, path: Path, image: torch.Tensor, atol: float = 1e-4) -> dict:
    """Export at `image`'s latent size, spatial axes dynamic; checked on that latent in ONNX Runtime."""
    _, q = compress(codec, image, "export", 0.0)
    y_hat = q["y"].float() + q["mu"]
    graph = DecoderGraph(codec).eval()
    rows, cols = torch.export.Dim("rows", min=4, max=1024), torch.export.Dim("cols", min=4, max=1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(graph, (y_hat,), dynamo=True, input_names=["y_hat"], output_names=["image"],
                                    dynamic_shapes=({2: rows, 3: cols},), optimize=False, verbose=False, report=False)
        program.save(str(path))
        ref = graph(y_hat).numpy()
    got = ort_session(path).run(None, {"y_hat": y_hat.numpy()})[0]
    err = float(np.abs(got - ref).max())
    if not err <= atol:
        path.unlink()
        raise ExportParityError(f"codec decoder: ONNX max abs error {err:.3g} > {atol:g}")
    return {"path": str(path), "max_abs_error": err, "latent_shape": list(y_hat.shape), "atol": atol}
