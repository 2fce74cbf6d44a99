"""DiT-IC (Shi et al., 2026) on the bundled pixel-space DiT: an image codec whose decoder is the
teacher DiT, run once.

    x ─g_a─▶ y (16x down, C channels; convolutions with GDN) ─h_a─▶ z (4x further down)
    z: rounded, coded under a factorised prior (a learned Gaussian per channel)
    y: rounded, coded under N(mu, sigma) from h_s(z_hat)             (hyperprior)
    y_hat ─g_s─▶ coarse image + per-pixel log-variance        (transposed convolutions with IGDN)
           ─▶ one DiT step per 16x16 tile: x_hat = coarse - sigma_map * v_DiT(coarse, t*, cond(y_hat))

The paper's three alignment mechanisms:
- variance-guided reconstruction: g_s predicts a per-element variance; it sets sigma_map, the
  amount of denoising each pixel gets, and the DiT's timestep t* (the tile's mean sigma);
- self-distillation alignment: a cosine hinge between the decoded image's latent g_a(x_hat)
  and the encoder's y (`alignment_loss`), trained into the decoder (train.py's phase 2);
- latent-conditioned guidance: the DiT's class-label embeddings are replaced by projections of
  the tile's decoded latent (pooled over its 3x3 neighbourhood), so the latent is the condition.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import entropy
from .gdn import GDN

TILE = 16  # the teacher DiT's image size; one latent cell per tile
HYPER = 4  # z is 4x coarser than y
Y_BOUND, Z_BOUND = 255, 63


def _down(cin: int, cout: int, gdn: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 5, stride=2, padding=2), GDN(cout) if gdn else nn.GELU())


def _up(cin: int, cout: int, gdn: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1),
                         GDN(cout, inverse=True) if gdn else nn.GELU())


class LatentCondition(nn.Module):
    """Stands in for a DiT block's class-label table: the 'label' it receives is the tile's pooled
    latent, projected to the embedding width. Starts as the table's unconditional row."""

    def __init__(self, latent_channels: int, table: nn.Embedding):
        super().__init__()
        self.proj = nn.Linear(latent_channels, table.embedding_dim)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.proj.bias.copy_(table.weight[-1])

    def forward(self, pooled: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        return self.proj(pooled)


class DiTCodec(nn.Module):
    def __init__(self, dit: nn.Module, channels: int = 64, hyper_channels: int = 32, width: int = 64):
        super().__init__()
        if dit.config.sample_size != TILE or dit.config.in_channels != 1:
            raise ValueError(f"the codec decodes {TILE}x{TILE} grayscale tiles; this DiT takes "
                             f"{dit.config.in_channels}x{dit.config.sample_size}x{dit.config.sample_size}")
        self.channels, self.hyper_channels = channels, hyper_channels
        # Image transforms with GDN (as in Ballé et al.); the hyper transforms keep GELU.
        self.g_a = nn.Sequential(_down(1, width, True), _down(width, width, True), _down(width, width, True),
                                 nn.Conv2d(width, channels, 5, stride=2, padding=2))
        self.h_a = nn.Sequential(_down(channels, width), nn.Conv2d(width, hyper_channels, 5, stride=2, padding=2))
        self.h_s = nn.Sequential(_up(hyper_channels, width), _up(width, width), nn.Conv2d(width, 2 * channels, 3, padding=1))
        self.g_s = nn.Sequential(_up(channels, width, True), _up(width, width, True), _up(width, width, True),
                                 nn.ConvTranspose2d(width, 2, 5, stride=2, padding=2, output_padding=1))
        with torch.no_grad():  # predicted variance starts near 0 (sigmoid(-4) = 0.018): the DiT step
            self.g_s[-1].bias[1] = -4.0  # starts small, and the first phase need not train it
        self.z_mean = nn.Parameter(torch.zeros(hyper_channels))
        self.z_log_scale = nn.Parameter(torch.zeros(hyper_channels))
        self.dit = copy.deepcopy(dit)
        for block in self.dit.transformer_blocks:
            emb = block.norm1.emb
            emb.class_embedder = LatentCondition(channels, emb.class_embedder.embedding_table)

    # -- the pieces ----------------------------------------------------------------------------
    def hyper_params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.h_s(z_hat).chunk(2, dim=1)
        return mu, torch.exp(log_sigma).clamp(entropy.SCALE_MIN, entropy.SCALE_MAX)

    def z_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        mean = self.z_mean.view(shape).expand_as(z)
        scale = torch.exp(self.z_log_scale).clamp(entropy.SCALE_MIN, entropy.SCALE_MAX).view(shape).expand_as(z)
        return mean, scale

    def decode_latent(self, y_hat: torch.Tensor, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, sigma_map) from the quantised latent: coarse synthesis, then DiT steps.
        steps=0 stops at the coarse synthesis (the first training phase)."""
        coarse, log_var = self.g_s(y_hat).chunk(2, dim=1)
        sigma_map = torch.sigmoid(log_var)  # variance-guided: how far from clean each pixel is
        if steps == 0:
            return coarse, sigma_map
        b, _, h, w = coarse.shape
        pooled = F.avg_pool2d(y_hat, 3, stride=1, padding=1, count_include_pad=False)
        cond = pooled.permute(0, 2, 3, 1).reshape(-1, self.channels)  # one condition per tile
        x = _tiles(coarse)
        sig = _tiles(sigma_map)
        if steps == 1:
            t = sig.mean(dim=(1, 2, 3)) * 1000
            v = self.dit(x, timestep=t, class_labels=cond, return_dict=False)[0][:, :1]
            x = x - sig * v
        else:  # the same model, integrated in `steps` Euler steps from the tile's mean sigma
            s0 = sig.mean(dim=(1, 2, 3))
            for k in range(steps):
                s_now, s_next = s0 * (1 - k / steps), s0 * (1 - (k + 1) / steps)
                v = self.dit(x, timestep=s_now * 1000, class_labels=cond, return_dict=False)[0][:, :1]
                x = x - (s_now - s_next).view(-1, 1, 1, 1) * v
        return _untile(x, b, h, w), sigma_map

    def forward(self, x: torch.Tensor, decode_steps: int = 1) -> dict:
        """Training pass: noisy rate proxies, straight-through rounding for the decoder."""
        y = self.g_a(x)
        z = self.h_a(y)
        z_noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5)
        z_hat = z + (torch.round(z) - z).detach()
        mu, sigma = self.hyper_params(z_hat)
        y_noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        y_hat = y + (torch.round(y - mu) + mu - y).detach()  # straight-through rounding around the mean
        x_hat, sigma_map = self.decode_latent(y_hat, decode_steps)
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bits_y = entropy.gaussian_bits(y_noisy, mu, sigma)
        bits_z = entropy.gaussian_bits(z_noisy, *self.z_params(z))
        return {"x_hat": x_hat, "y": y, "y_hat": y_hat, "bpp": (bits_y + bits_z) / pixels,
                "bpp_y": bits_y / pixels, "bpp_z": bits_z / pixels, "sigma_map": sigma_map}

    def alignment_loss(self, x_hat: torch.Tensor, y: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
        """Self-distillation alignment: the decoded image must encode back to the encoder's latent.
        Training applies it with the encoder frozen (train.py's phase 2): it shapes the decoder,
        never the encoder to forgive it."""
        cos = F.cosine_similarity(self.g_a(x_hat), y.detach(), dim=1)
        return F.relu(margin - cos).mean()

    # -- real coding ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantise(self, x: torch.Tensor) -> dict:
        """Everything the encoder decides: integer symbols and the parameters they are coded with."""
        y = self.g_a(x)
        z_sym = torch.round(self.h_a(y)).clamp(-Z_BOUND, Z_BOUND)
        mu, sigma = self.hyper_params(z_sym)
        y_sym = torch.round(y - mu).clamp(-Y_BOUND, Y_BOUND)
        return {"z": z_sym.long(), "y": y_sym.long(), "mu": mu, "sigma": sigma}


def _tiles(img: torch.Tensor) -> torch.Tensor:
    b, c, h, w = img.shape
    return img.view(b, c, h // TILE, TILE, w // TILE, TILE).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, TILE, TILE)


def _untile(tiles: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    c = tiles.shape[1]
    return tiles.view(b, h // TILE, w // TILE, c, TILE, TILE).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pad_to(x: torch.Tensor, multiple: int = TILE * HYPER) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
