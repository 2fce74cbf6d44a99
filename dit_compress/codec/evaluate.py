"""Rate-distortion evaluation of trained codecs against JPEG and WebP on held-out photos.

bpp comes from the size of the real file (the whole `.ditc` container, header included), PSNR
and MS-SSIM from the decoded image, all on the same grayscale photos that no codec trained on.
BD-rate (Bjontegaard) against JPEG: the average bitrate difference at equal PSNR over the PSNR
range both curves cover, from cubic fits of log-rate against PSNR.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..evaluate.metrics import psnr_ssim
from .files import compress, decompress
from ..fileio import save_figure
from .model import DiTCodec
from .train import photo

HELDOUT = ("astronaut", "coffee", "chelsea")
JPEG_QUALITIES = (2, 5, 10, 20, 35, 50, 75)
WEBP_QUALITIES = (0, 5, 15, 30, 50, 75)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).float()


def psnr(decoded: torch.Tensor, image: torch.Tensor) -> float:
    return psnr_ssim(image[None], decoded[None])[0]


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from pytorch_msssim import ms_ssim as _ms_ssim

    return float(_ms_ssim(to_unit(a)[None], to_unit(b)[None], data_range=1.0))


def codec_point(codec: DiTCodec, images: dict[str, torch.Tensor], lam: float, steps: int = 1) -> dict:
    rows = []
    for name, img in images.items():
        t0 = time.perf_counter()
        data, _ = compress(codec, img, "eval", lam)
        t1 = time.perf_counter()
        x_hat, read = decompress(codec, data, name, steps=steps)
        t2 = time.perf_counter()
        with torch.no_grad():  # what the DiT adds: the same latent, decoded by the synthesis transform alone
            coarse, _ = codec.decode_latent(read["y_hat"], 0)
        h, w = img.shape[1:]
        rows.append({"image": name, "bpp": 8 * len(data) / (h * w),
                     "psnr": psnr(x_hat, img), "psnr_without_dit": psnr(coarse[0, :, :h, :w].clamp(-1, 1), img),
                     "ms_ssim": ms_ssim(x_hat, img), "encode_s": t1 - t0, "decode_s": t2 - t1})
    return _mean(rows, {"codec": "DiT-IC", "lambda": lam, "decode_steps": steps})


def pillow_point(images: dict[str, torch.Tensor], fmt: str, quality: int) -> dict:
    from PIL import Image

    rows = []
    for name, img in images.items():
        arr = (to_unit(img)[0].numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format=fmt, quality=quality)
        data = buf.getvalue()
        back = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 127.5 - 1
        dec = torch.from_numpy(back).unsqueeze(0)
        rows.append({"image": name, "bpp": 8 * len(data) / arr.size, "psnr": psnr(dec, img),
                     "ms_ssim": ms_ssim(dec, img)})
    return _mean(rows, {"codec": fmt, "quality": quality})


def _mean(rows: list[dict], info: dict) -> dict:
    keys = [k for k in rows[0] if k != "image"]
    return {**info, **{k: float(np.mean([r[k] for r in rows])) for k in keys}, "per_image": rows}


def bd_rate(anchor: list[dict], test: list[dict]) -> float | None:
    """Average % bitrate change of `test` against `anchor` at equal PSNR (negative = fewer bits)."""
    if len(anchor) < 4 or len(test) < 3:
        return None
    def fit(points):
        p = sorted(points, key=lambda r: r["psnr"])
        return np.polyfit([r["psnr"] for r in p], np.log([r["bpp"] for r in p]), min(3, len(p) - 1)), \
            p[0]["psnr"], p[-1]["psnr"]
    (pa, lo_a, hi_a), (pt, lo_t, hi_t) = fit(anchor), fit(test)
    lo, hi = max(lo_a, lo_t), min(hi_a, hi_t)
    if hi <= lo:
        return None
    ia, it = np.polyint(pa), np.polyint(pt)
    avg = ((np.polyval(it, hi) - np.polyval(it, lo)) - (np.polyval(ia, hi) - np.polyval(ia, lo))) / (hi - lo)
    return float((math.exp(avg) - 1) * 100)


def against_anchor(anchor: list[dict], point: dict) -> dict:
    """The anchor codec at this point's rate (its PSNR there) and at its PSNR (the bits it needs),
    interpolated in log-rate between the anchor's settings; None outside the anchor's range
    (JPEG cannot go below ~0.14 bpp on these photos, whatever its quality setting)."""
    p = sorted(anchor, key=lambda r: r["bpp"])
    rates, quality = np.log([r["bpp"] for r in p]), np.array([r["psnr"] for r in p])
    at_rate = float(np.interp(math.log(point["bpp"]), rates, quality)) \
        if rates[0] <= math.log(point["bpp"]) <= rates[-1] else None
    at_psnr = float(math.exp(np.interp(point["psnr"], quality, rates))) \
        if quality[0] <= point["psnr"] <= quality[-1] and np.all(np.diff(quality) > 0) else None
    return {"psnr_at_same_bpp": at_rate, "bpp_at_same_psnr": at_psnr}


def heldout_images() -> dict[str, torch.Tensor]:
    return {name: photo(name) for name in HELDOUT}


def plot_rd(path: Path, curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in curves.items():
        p = sorted(points, key=lambda r: r["bpp"])
        for ax, metric in zip(axes, ("psnr", "ms_ssim")):
            ax.plot([r["bpp"] for r in p], [r[metric] for r in p], "o-", label=label)
    for ax, name in zip(axes, ("PSNR (dB)", "MS-SSIM")):
        ax.set_xlabel("bits per pixel (real file size)")
        ax.set_ylabel(name)
        ax.axvline(0.3, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out grayscale photos: {', '.join(HELDOUT)}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def decode_timing(codec: DiTCodec, image: torch.Tensor, steps: int = 25, repeats: int = 3) -> dict:
    """One-step decode against a `steps`-step decode of the same latent with the same DiT."""
    data, q = compress(codec, image, "timing", 0.0)
    y_hat = (q["y"].float() + q["mu"])
    out = {}
    for n in (1, steps):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                x_hat, _ = codec.decode_latent(y_hat, steps=n)
            best = min(best, time.perf_counter() - t0)
        h, w = image.shape[1:]
        out[f"{n}_step"] = {"seconds": best, "psnr": psnr(x_hat[0, :, :h, :w], image)}
    out["speedup"] = out[f"{steps}_step"]["seconds"] / out["1_step"]["seconds"]
    return out


def evaluate_codecs(folders: list[Path], out: Path) -> dict:
    """RD points of every codec folder and of JPEG/WebP on the held-out photos; writes rd.png and report files."""
    import json

    from .export import export_decoder
    from .store import load_codec

    out.mkdir(parents=True, exist_ok=True)
    images = heldout_images()
    ours = []
    for folder in folders:
        codec, config = load_codec(folder)
        ours.append({**codec_point(codec, images, config["lambda"]), "folder": str(folder)})
    jpeg = [pillow_point(images, "JPEG", q) for q in JPEG_QUALITIES]
    webp = [pillow_point(images, "WEBP", q) for q in WEBP_QUALITIES]
    for point in ours:
        point["jpeg"] = against_anchor(jpeg, point)
    codec, _ = load_codec(folders[0])
    timing = decode_timing(codec, images[HELDOUT[0]])
    export = export_decoder(codec, out / "decoder.onnx", images[HELDOUT[0]])
    report = {"heldout": list(HELDOUT), "dit_ic": ours, "jpeg": jpeg, "webp": webp,
              "bd_rate_vs_jpeg_percent": bd_rate(jpeg, ours), "bd_rate_webp_vs_jpeg_percent": bd_rate(jpeg, webp),
              "decode_timing": timing, "decoder_export": export}
    plot_rd(out / "rd.png", {"DiT-IC": ours, "JPEG": jpeg, "WebP": webp})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = ["# DiT-IC rate-distortion on held-out photos", "",
             f"Grayscale, whole images, never seen in training: {', '.join(r['heldout'])}. bpp from real file "
             "sizes (the `.ditc` container with its header; JPEG/WebP files from Pillow).", "",
             "| codec | setting | bpp | PSNR dB | MS-SSIM | encode s | decode s |", "|---|---|---|---|---|---|---|"]
    for p in r["dit_ic"]:
        lines.append(f"| DiT-IC | lambda {p['lambda']:g} | {p['bpp']:.3f} | {p['psnr']:.2f} | {p['ms_ssim']:.4f} | "
                     f"{p['encode_s']:.2f} | {p['decode_s']:.2f} |")
    for name in ("jpeg", "webp"):
        for p in r[name]:
            lines.append(f"| {p['codec']} | quality {p['quality']} | {p['bpp']:.3f} | {p['psnr']:.2f} | "
                         f"{p['ms_ssim']:.4f} | - | - |")
    lines += ["", "Against JPEG point by point (interpolated in log-rate between its quality settings; "
              "'-' = outside JPEG's range):", "",
              "| lambda | bpp | PSNR dB | PSNR without the DiT step | JPEG PSNR at this bpp | JPEG bpp at this PSNR |",
              "|---|---|---|---|---|---|"]
    for p in r["dit_ic"]:
        j = p["jpeg"]
        at_rate = "-" if j["psnr_at_same_bpp"] is None else f"{j['psnr_at_same_bpp']:.2f}"
        at_psnr = "-" if j["bpp_at_same_psnr"] is None else \
            f"{j['bpp_at_same_psnr']:.3f} (DiT-IC {p['bpp'] / j['bpp_at_same_psnr'] - 1:+.0%})"
        lines.append(f"| {p['lambda']:g} | {p['bpp']:.3f} | {p['psnr']:.2f} | {p['psnr_without_dit']:.2f} | "
                     f"{at_rate} | {at_psnr} |")
    bd = r["bd_rate_vs_jpeg_percent"]
    t = r["decode_timing"]
    steps = [k for k in t if k.endswith("_step") and k != "1_step"][0]
    lines += ["", f"BD-rate against JPEG (PSNR): {'n/a (curves do not overlap)' if bd is None else f'{bd:+.1f} %'}; "
              f"WebP against JPEG: {r['bd_rate_webp_vs_jpeg_percent']:+.1f} %." if r["bd_rate_webp_vs_jpeg_percent"]
              is not None else "", "",
              f"Decode of {r['heldout'][0]}: one step {t['1_step']['seconds']:.3f} s ({t['1_step']['psnr']:.2f} dB), "
              f"{steps.split('_')[0]} steps {t[steps]['seconds']:.3f} s ({t[steps]['psnr']:.2f} dB): "
              f"{t['speedup']:.1f}x faster.", "",
              f"Decoder ONNX export: parity max abs error {r['decoder_export']['max_abs_error']:.3g}.", "",
              "![rate-distortion](rd.png)", ""]
    return "\n".join(lines)
