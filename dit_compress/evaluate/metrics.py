"""Quality metrics: teacher-relative (denoiser error, sample PSNR/SSIM) and absolute (digits)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy import linalg

from ..data.calibration import CalibrationSet
from ..models.load import LoadedModel


@torch.no_grad()
def denoiser_error_by_band(teacher: LoadedModel, student: LoadedModel, calib: CalibrationSet, n: int, bands: int,
                           seed: int = 777) -> list[dict]:
    """Relative L2 error ||s - t|| / ||t|| of the prediction, per band of the timestep range.

    Each model runs through its own adapter, so a student may be an exported graph."""
    T = calib.schedule.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(bands):
        lo, hi = k * T / bands, (k + 1) * T / bands
        idx = torch.randint(0, len(calib), (n,), generator=g)
        x0 = calib.x0[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = lo + torch.rand(n, generator=g) * (hi - lo)
        if not calib.schedule.is_flow:
            t = t.floor()
        x_t = calib.schedule.add_noise(x0, noise, t)
        cond = {key: v[idx] for key, v in calib.cond.items()}
        errs = []
        for i in range(0, n, 128):
            sl = slice(i, i + 128)
            c = {key: v[sl] for key, v in cond.items()}
            pt = teacher.adapter.denoise(teacher.model, x_t[sl], t[sl], c)
            ps = student.adapter.denoise(student.model, x_t[sl], t[sl], c)
            errs.append(((ps - pt).flatten(1).norm(dim=1) / pt.flatten(1).norm(dim=1).clamp_min(1e-8)))
        out.append({"t_min": round(lo, 1), "t_max": round(hi, 1),
                    "relative_error": round(torch.cat(errs).mean().item(), 5)})
    return out


def psnr_ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over images, computed by scikit-image on [-1, 1] images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = reference.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    tst = test.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    psnrs, ssims = [], []
    for r, s in zip(ref, tst):
        psnrs.append(min(peak_signal_noise_ratio(r, s, data_range=data_range), 100.0))
        win = min(7, r.shape[0] - (1 - r.shape[0] % 2))
        ssims.append(structural_similarity(r, s, data_range=data_range, channel_axis=-1, win_size=win))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # SciPy 1.16 dropped sqrtm's `disp` (and its printed warning); older releases need disp=False.
    try:
        return linalg.sqrtm(m, disp=False)[0]
    except TypeError:
        return linalg.sqrtm(m)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = _sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Predicted labels and penultimate features of [-1, 1] digit images."""
    feats = classifier.features(images.clamp(-1, 1))
    return classifier.head(feats).argmax(1), feats.numpy().astype(np.float64)
