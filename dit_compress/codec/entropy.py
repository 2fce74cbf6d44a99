"""Entropy coding of quantised latents with constriction's range coder: real bits, not estimates.

Every symbol is coded under a quantised Gaussian. Its parameters are themselves snapped to a
fixed grid (means to 1/64, scales to a 64-entry log table) before coding, on the encoder and the
decoder alike: tiny floating-point differences between runs or machines then cannot change a
single parameter, which is what keeps range decoding exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 64.0, 64
MEAN_STEP = 1.0 / 64


def scale_table() -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))


def snap_parameters(means: torch.Tensor, scales: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Means on a 1/64 grid and scales to the nearest table entry at or above them, as float64."""
    table = scale_table()
    idx = torch.searchsorted(table, scales.detach().float().clamp(SCALE_MIN, SCALE_MAX).contiguous())
    idx = idx.clamp(max=SCALE_LEVELS - 1)
    m = torch.round(means.detach().float() / MEAN_STEP) * MEAN_STEP
    return m.double().numpy().ravel(), table[idx].double().numpy().ravel()


def encode(symbols: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, bound: int) -> bytes:
    """Range-code integer `symbols` (clamped by the caller to [-bound, bound]) under N(means, scales)."""
    import constriction

    sym = symbols.detach().to(torch.int64).numpy().ravel().astype(np.int32)
    if sym.size and (sym.min() < -bound or sym.max() > bound):
        raise ValueError(f"symbols outside [-{bound}, {bound}]; clamp before coding")
    m, s = snap_parameters(means, scales)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(sym, constriction.stream.model.QuantizedGaussian(-bound, bound), m, s)
    return encoder.get_compressed().tobytes()


def decode(data: bytes, means: torch.Tensor, scales: torch.Tensor, bound: int) -> torch.Tensor:
    """The symbols `encode` wrote, shaped like `means`."""
    import constriction

    m, s = snap_parameters(means, scales)
    if len(data) % 4:
        raise ValueError("a range-coded stream is a whole number of 32-bit words")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype=np.uint32))
    sym = decoder.decode(constriction.stream.model.QuantizedGaussian(-bound, bound), m, s)
    return torch.from_numpy(sym.astype(np.int64)).view(means.shape)


def gaussian_bits(values: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Differentiable bits of `values` (rounded, or noised for training) under a unit-bin Gaussian."""
    scales = scales.clamp(min=SCALE_MIN)
    normal = torch.distributions.Normal(means, scales)
    p = normal.cdf(values + 0.5) - normal.cdf(values - 0.5)
    return -torch.log2(p.clamp(min=1e-9)).sum()
