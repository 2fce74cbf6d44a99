"""Train the bundled Flux pipeline teacher `zoo:scenes-flux` on one CUDA GPU within a wall-clock budget.

    python benchmarks/gpu_train_scenes_flux.py --out DIR [--budget-s 270] [--seed 0]
    python benchmarks/gpu_train_scenes_flux.py --out DIR --smoke   # the tiny build on CPU, seconds

A short probe first times the VAE's and the transformer's training steps (the difference between a 10-
and a 40-step run, so start-up costs cancel), then fixes step counts that fit `--budget-s` (a fifth to
the VAE, the rest but a margin to the transformer, each capped at GPU_RUN's). The training itself is
`train_scenes_flux` with those explicit counts, so the run is reproducible from the steps recorded in
metrics.json. DIR receives metrics.json and the pipeline folder as one tar split into parts under
15 MB (`cat scenes-flux.tar.* | tar x` restores `scenes-flux/`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_compress.data.scenes import scene_split  # noqa: E402
from dit_compress.evaluate.adherence import evaluate_adherence  # noqa: E402
from dit_compress.train.scenes_pipeline import SCENES_FLUX, ScenesFluxConfig, build_pipeline  # noqa: E402
from dit_compress.train import scenes_teacher as st  # noqa: E402

PART_BYTES = 15 * 2 ** 20


def _seconds_per_step(run, device: str, short: int = 10, long: int = 40) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for steps in (short, long):
        sync()
        start = time.perf_counter()
        run(steps)
        sync()
        times.append(time.perf_counter() - start)
    return max((times[1] - times[0]) / (long - short), 1e-4)


def probe(cfg: ScenesFluxConfig, seed: int, vae_batch: int, batch: int, device: str) -> tuple[float, float]:
    """Seconds per VAE step and per transformer step at these batch sizes, on throwaway models."""
    pipe = build_pipeline(cfg, seed)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    data = scene_split("train", n=512, seed=seed)
    images = st._to_unit(data.images)
    vae_s = _seconds_per_step(lambda n: st.train_vae(pipe.vae, images, n, vae_batch, seed, device), device)
    latents = torch.randn(len(images), cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    captions = sorted(set(data.captions))
    text = st.encode_captions(pipe, captions + [""], cfg.t5_max_length, device)
    ids = torch.tensor([captions.index(c) for c in data.captions])
    flux_s = _seconds_per_step(lambda n: st.train_transformer(pipe, latents, ids, text, n, batch, seed, device),
                               device)
    return vae_s, flux_s


def split_tar(folder: Path, out: Path) -> list[str]:
    tar_path = out / "scenes-flux.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname="scenes-flux")
    data, names = tar_path.read_bytes(), []
    tar_path.unlink()
    for i in range(0, len(data), PART_BYTES):
        name = f"scenes-flux.tar.{i // PART_BYTES:02d}"
        (out / name).write_bytes(data[i : i + PART_BYTES])
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=270.0, help="VAE + transformer training seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scenes-flux"), help="where the folder is built")
    parser.add_argument("--smoke", action="store_true", help="check the script: tiny build, CPU, small batches")
    args = parser.parse_args()
    device, cfg, run = "cuda", SCENES_FLUX, dict(st.GPU_RUN)
    if args.smoke:
        device, cfg = "cpu", ScenesFluxConfig.tiny()
        run.update(vae_batch=8, batch=8, n_train=256)
    assert device == "cpu" or torch.cuda.is_available(), "this script trains on CUDA"
    start = time.time()
    vae_s, flux_s = probe(cfg, args.seed, run["vae_batch"], run["batch"], device)
    run["vae_steps"] = min(run["vae_steps"], int(0.2 * args.budget_s / vae_s))
    run["steps"] = min(run["steps"], int(0.72 * args.budget_s / flux_s))
    print(json.dumps({"probe_s_per_step": {"vae": round(vae_s, 4), "transformer": round(flux_s, 4)},
                      "probe_wall_s": round(time.time() - start, 1), "run": run}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        metrics = st.train_scenes_flux(args.work, device=device, seed=args.seed, cfg=cfg, measure=evaluate_adherence, **run)
        metrics["probe_s_per_step"] = {"vae": round(vae_s, 5), "transformer": round(flux_s, 5)}
        metrics["script_wall_s"] = round(time.time() - start, 1)
        (args.work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
    finally:  # whatever was written (the pipeline is saved before the adherence check) comes back
        if args.work.is_dir():
            print("parts:", split_tar(args.work, args.out))


if __name__ == "__main__":
    main()
