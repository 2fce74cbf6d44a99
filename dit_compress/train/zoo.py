"""Train the bundled zoo: a digit classifier and class-conditional flow-matching teachers.

    ditc zoo-train                        # classifier + every teacher into dit_compress/models/zoo/
    ditc zoo-train --only digits-sd3      # one teacher, keeping the classifier
    ditc zoo-train --only scenes-flux     # the Flux pipeline teacher (train/scenes_teacher.py)
    ditc zoo-train --steps 300 --out DIR  # a quick smoke run elsewhere

Seeded; each digit teacher takes about half an hour on two CPU cores. The pipeline teacher trains on
CUDA when there is a GPU (minutes) and otherwise runs a shorter CPU schedule (see scenes_teacher).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.digits import NUM_CLASSES, load_digits_split
from ..models.classifier import DigitClassifier
from ..models.load import DEFAULT_SCHEDULER
from ..sampling import NoiseSchedule, sample_batched
from .scene_classifier import train_scene_classifier
from .schedule import cosine_decay, warmup

# The bundled teachers: one per family that later stages must cover.
TEACHERS = {
    "digits-dit": {
        "class": "DiTTransformer2DModel",
        "config": dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=8,
                       sample_size=16, patch_size=4, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero"),
        "conditioner": None,
        "description": "Class-conditional DiTTransformer2DModel (8 blocks, width 128, patch 4)",
    },
    "digits-sd3": {
        "class": "SD3Transformer2DModel",
        "config": dict(sample_size=16, patch_size=4, in_channels=1, out_channels=1, num_layers=8,
                       attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64,
                       caption_projection_dim=96, pooled_projection_dim=64, pos_embed_max_size=4),
        # The digit label reaches the MMDiT through its text inputs, via a learned embedding.
        "conditioner": dict(num_classes=NUM_CLASSES, tokens=4, token_dim=64, pooled_dim=64),
        "description": "SD3Transformer2DModel (MMDiT, 8 joint blocks, width 96, patch 4) conditioned on "
                       "a learned label embedding through encoder_hidden_states and pooled projections",
    },
}
# Text-to-image pipeline teachers, each trained by its own module.
PIPELINE_TEACHERS = {"scenes-flux": "FluxPipeline for digit scenes, train/scenes_teacher.py"}
DEFAULT_STEPS = 6000
SAMPLING = {"steps": 16, "guidance_scale": 2.0}
LABEL_DROPOUT = 0.1


def train_classifier(out: Path, seed: int = 0, epochs: int = 40) -> dict:
    """Train the evaluator's classifier with shift and noise augmentation (generated digits are
    noisier than real ones, so features must not collapse on small perturbations)."""
    torch.manual_seed(seed)
    train, held = load_digits_split("train"), load_digits_split("heldout")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="classifier", leave=False):
        perm = torch.randperm(len(train.labels), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            x = train.images[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(held.images).argmax(1) == held.labels).float().mean().item()
    meta = {"heldout_accuracy": round(acc, 4), "epochs": epochs, "seed": seed,
            "heldout_size": len(held.labels), "feature": "64-d penultimate ReLU features"}
    model.save(out, meta)
    return meta


def _logit_normal(n: int, g: torch.Generator) -> torch.Tensor:
    # SD3's logit-normal timestep density: more training signal at mid noise levels.
    return torch.sigmoid(torch.randn(n, generator=g))


def train_teacher(out: Path, name: str = "digits-dit", steps: int = 6000, batch: int = 128, lr: float = 5e-4,
                  seed: int = 0) -> dict:
    """Rectified-flow training of a class-conditional teacher with label dropout for CFG; EMA weights."""
    import diffusers

    from ..models.conditioner import LabelConditioner
    from ..models.families import get_adapter

    spec = TEACHERS[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_digits_split("train")
    model = getattr(diffusers, spec["class"])(**spec["config"])
    conditioner = LabelConditioner(**spec["conditioner"]) if spec["conditioner"] else None
    adapter = get_adapter(model, None, conditioner)
    modules = torch.nn.ModuleList([model] + ([conditioner] if conditioner else []))
    # Eval mode throughout: diffusers' per-block LabelEmbedding would otherwise drop labels
    # independently in each block; we drop them ourselves, consistently for the whole model.
    modules.eval()
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    # The warmup overlaps the cosine, which starts at step 0: the bundled teachers were trained so.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup(s, 200) * cosine_decay(s / steps))
    schedule = NoiseSchedule(DEFAULT_SCHEDULER)
    start, losses = time.time(), []
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        idx = torch.randint(0, len(data.labels), (batch,), generator=g)
        x0, y = data.images[idx], data.labels[idx].clone()
        y[torch.rand(batch, generator=g) < LABEL_DROPOUT] = adapter.num_classes  # the null label
        noise = torch.randn(x0.shape, generator=g)
        t = _logit_normal(batch, g) * schedule.num_train_timesteps
        pred = adapter.denoise(model, schedule.add_noise(x0, noise, t), t, {"class_labels": y})
        loss = F.mse_loss(pred, schedule.target(x0, noise))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    out.mkdir(parents=True, exist_ok=True)
    ema[0].save_pretrained(out / "transformer")
    if conditioner is not None:
        ema[1].save(out / "conditioner")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEFAULT_SCHEDULER, indent=2) + "\n")
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "label_dropout": LABEL_DROPOUT,
            "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 5),
            "train_minutes": round((time.time() - start) / 60, 1)}


def guided_accuracy(folder: Path, classifier: DigitClassifier, n_per_class: int = 50, seed: int = 1234) -> float:
    from ..models.load import load_transformer

    teacher = load_transformer(str(folder))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), *teacher.adapter.latent_shape(), generator=g)
    x = sample_batched(teacher.model, teacher.adapter, NoiseSchedule(teacher.scheduler_config),
                       {"class_labels": labels}, noise, SAMPLING["steps"], SAMPLING["guidance_scale"])
    with torch.no_grad():
        return (classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()


def train_zoo(out: Path, steps: int | None = None, seed: int = 0, only: str | None = None,
              measure=None) -> dict:
    """Train the classifier (unless `only` names one teacher) and the teachers into `out`.

    `measure(generate) -> dict` scores a pipeline teacher's prompt adherence (the CLI passes the
    evaluator, which sits above training).

    `steps` defaults to DEFAULT_STEPS for the digit teachers and to the device's schedule for the
    pipeline teachers."""
    out = Path(out)
    result = {}
    if only is None:
        result["classifier"] = train_classifier(out / "digits-classifier", seed=seed)
        result["scenes-classifier"] = train_scene_classifier(out / "scenes-classifier", seed=seed)
    classifier = DigitClassifier.load(out / "digits-classifier")
    for name, spec in TEACHERS.items():
        if only not in (None, name):
            continue
        meta = train_teacher(out / name, name, steps=steps or DEFAULT_STEPS, seed=seed)
        card = {
            "name": name,
            "description": spec["description"] + ", trained with rectified flow on scikit-learn digits "
                           "upsampled to 16x16, pixel space.",
            "num_classes": NUM_CLASSES,
            "classifier": "digits-classifier",
            "dataset": "sklearn-digits-16x16",
            "sampling": SAMPLING,
            "training": meta,
            "retrain": f"ditc zoo-train --only {name}",
        }
        if spec["conditioner"]:
            card["conditioner"] = "conditioner"
        (out / name / "ditc_zoo.json").write_text(json.dumps(card, indent=2) + "\n")
        meta["guided_accuracy_500"] = round(guided_accuracy(out / name, classifier), 4)
        (out / name / "ditc_zoo.json").write_text(json.dumps(card, indent=2) + "\n")
        result[name] = meta
    if only in (None, "scenes-flux"):
        from .scenes_teacher import train_scenes_flux

        device = "cuda" if torch.cuda.is_available() else "cpu"
        result["scenes-flux"] = train_scenes_flux(out / "scenes-flux", device=device, steps=steps, seed=seed,
                                                   measure=measure)
    return result
