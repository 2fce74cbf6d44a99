"""Evaluation of a text-to-image pipeline teacher: prompts in through its text encoders, images out
through its VAE, and — when its card names an adherence evaluator — what each prompt asks for checked
in the teacher's and the student's images.

Teacher and student see the same encoded prompts, the same noise per seed and the same guidance
against the encoded negative prompt, so teacher-relative PSNR/SSIM compare like with like and the
adherence drop is paired seed by seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..data.calibration import CalibrationSet
from ..data.scenes import Scene, parse_caption
from ..errors import CheckpointError, RecipeError
from ..models.load import ZOO_DIR, LoadedModel
from ..models.pipeline import read_prompts
from ..models.scene_classifier import SceneClassifier
from ..sampling import NoiseSchedule, sample_batched
from .adherence import ATTRIBUTES, evaluate_adherence
from .metrics import psnr_ssim

log = logging.getLogger("dit_compress")

ADHERENCE_KINDS = ("digit-scenes",)
REAL_DRAWS = 10  # real renders of each prompt that the adherence FD compares with


def evaluation_prompts(teacher: LoadedModel, spec, calibration: CalibrationSet | None) -> list[str] | None:
    """The prompts a pipeline teacher is evaluated on: `evaluation.prompts`, else the bundled
    teacher's evaluation set, else the calibration prompts (each once, in order); None for a teacher
    without a pipeline."""
    pipe = teacher.pipeline
    if spec.prompts and pipe is None:
        raise RecipeError(f"evaluation.prompts is set, but {teacher.source} is not a pipeline folder with text "
                          "encoders to encode them")
    if pipe is None:
        return None
    prompts = read_prompts(spec.prompts) if spec.prompts else pipe.card_prompts("eval_prompts")
    if not prompts and calibration is not None and calibration.prompts:
        prompts = list(dict.fromkeys(calibration.prompts))
    if not prompts:
        raise RecipeError(f"{teacher.source} is a {pipe.class_name}: set evaluation.prompts to a prompt file "
                          "(one per line) to evaluate it on")
    return prompts


def scene_prompts(prompts: list[str], where: str) -> tuple[tuple[Scene, str], ...]:
    """(scene, caption) of each prompt, for the digit-scenes adherence evaluator."""
    out = []
    for i, text in enumerate(prompts):
        try:
            out.append((parse_caption(text), text))
        except ValueError:
            raise RecipeError(f"{where}: evaluation prompt {i + 1} ({text[:60]!r}) is not a digit-scene caption; "
                              "the teacher's card asks for digit-scenes adherence, which reads every attribute "
                              "from the prompt") from None
    return tuple(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounded as the pipeline's own output is."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _stderr(values: list[float]) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    return round(float(v.std(ddof=1) / np.sqrt(len(v))), 4) if len(v) > 1 else None


class PromptedEvaluation:
    """Matched teacher/student images of a pipeline teacher's evaluation prompts, and adherence."""

    def __init__(self, teacher: LoadedModel, calibration: CalibrationSet, spec, schedule: NoiseSchedule,
                 steps: int, guidance: float):
        self.teacher, self.spec, self.schedule = teacher, spec, schedule
        self.steps, self.guidance = steps, guidance
        self.pipe = teacher.pipeline
        self.prompts = evaluation_prompts(teacher, spec, calibration)
        self.scenes = self.classifier = None
        kind = teacher.card.get("adherence")
        if kind is not None:
            if kind not in ADHERENCE_KINDS:
                raise CheckpointError(f"{teacher.source}: the card's adherence evaluator {kind!r} is unknown "
                                      f"(known: {', '.join(ADHERENCE_KINDS)})")
            where = f"evaluation.prompts ({spec.prompts})" if spec.prompts else f"{teacher.source}'s evaluation prompts"
            self.scenes = scene_prompts(self.prompts, where)
            self.classifier = SceneClassifier.load(ZOO_DIR / teacher.card.get("classifier", "scenes-classifier"))
        self._encoded: dict = {}
        self._teacher_images: dict = {}  # first-seed images, shared by every student
        self._teacher_adherence: dict | None = None

    def prompts_for(self, n: int) -> list[str]:
        """`n` prompts: the evaluation prompts in order, repeated as needed."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def _conditions(self, prompts: tuple[str, ...]) -> tuple[dict, dict]:
        if prompts not in self._encoded:
            adapter, neg = self.teacher.adapter, self.pipe.negative_prompt
            self._encoded[prompts] = (self.pipe.encode(list(prompts), adapter),
                                      self.pipe.encode([neg] * len(prompts), adapter))
        return self._encoded[prompts]

    def _noise(self, seed: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.randn(n, *self.teacher.adapter.latent_shape(), generator=g)

    def images(self, model: LoadedModel, prompts: list[str], seed: int, who: str, cache: dict | None = None
               ) -> tuple[torch.Tensor, bool]:
        """Decoded images in [-1, 1] of `prompts` from seed `seed`'s noise, and whether every latent
        was finite (decoding clamps, which would hide an infinite one); kept in `cache` if given."""
        key = (seed, tuple(prompts))
        if cache is not None and key in cache:
            return cache[key]
        cond, null = self._conditions(key[1])
        latents = sample_batched(model.model, model.adapter, self.schedule, cond, self._noise(seed, len(prompts)),
                                 self.steps, self.guidance, null=null,
                                 desc=f"sampling {who} (seed {seed}, guidance {self.guidance:g})")
        out = (self.pipe.decode(latents), bool(torch.isfinite(latents).all()))
        if cache is not None:
            cache[key] = out
        return out

    def quality(self, student: LoadedModel, name: str) -> tuple[dict, dict]:
        s = self.spec
        seed0 = s.seeds[0]
        # With adherence, PSNR reuses its first seed's images: one image per evaluation prompt.
        n = len(self.prompts) if self.scenes else s.compare_samples
        prompts = self.prompts_for(n)
        own: dict = {}  # the student's first-seed images, for PSNR, adherence and the pictures
        t_img, _ = self.images(self.teacher, prompts, seed0, "teacher", self._teacher_images)
        s_img, finite = self.images(student, prompts, seed0, name, own)
        k = min(s.compare_samples, n)
        q: dict = {"evaluation_prompts": len(self.prompts)}
        q["psnr_db"], q["ssim"] = (round(v, 4) for v in psnr_ssim(t_img[:k], s_img[:k]))
        q["outputs_finite"] = finite
        pictures = {"teacher": t_img, "student": s_img, "labels": None, "prompts": prompts}
        if self.scenes:
            q.update(self._adherence(student, name, own))
        return q, pictures

    def _run(self, model: LoadedModel, who: str, cache: dict) -> dict:
        seed0 = self.spec.seeds[0]

        def generate(prompts: list[str], seed: int) -> np.ndarray:
            return to_uint8(self.images(model, prompts, seed, who, cache if seed == seed0 else None)[0])

        return evaluate_adherence(generate, tuple(self.spec.seeds), self.scenes, self.classifier,
                                  real_draws=REAL_DRAWS)

    def _adherence(self, student: LoadedModel, name: str, own: dict) -> dict:
        log.info("prompt adherence (digit scenes): %d prompts x %d seeds", len(self.scenes), len(self.spec.seeds))
        if self._teacher_adherence is None:
            self._teacher_adherence = self._run(self.teacher, "teacher", self._teacher_images)
        return compare_adherence(self._teacher_adherence, self._run(student, name, own))


def compare_adherence(t: dict, s: dict) -> dict:
    """The quality entries of teacher and student adherence reports (`evaluate_adherence`): per
    attribute, `all` and `all_novel_pairs`, each one's mean and standard error over seeds for both, and
    the drop (teacher - student) with its standard error paired by seed; FD under the digit path's keys."""
    table = {"prompts": t["prompts"], "novel_pair_prompts": t["novel_pair_prompts"], "seeds": t["seeds"],
             "fd_real": t["fd_real"]}
    for key in (*ATTRIBUTES, "all", "all_novel_pairs"):
        if key not in t:  # all_novel_pairs: no prompt pairs a colour with its held-out position
            continue
        drops = [a[key] - b[key] for a, b in zip(t["per_seed"], s["per_seed"])]
        table[key] = {"teacher": t[key]["mean"], "teacher_stderr": t[key]["stderr"],
                      "student": s[key]["mean"], "student_stderr": s[key]["stderr"],
                      "drop": round(float(np.mean(drops)), 4), "drop_stderr": _stderr(drops)}
    fd_t = np.array([row["fd"] for row in t["per_seed"]])
    fd_s = np.array([row["fd"] for row in s["per_seed"]])
    return {
        "reference_set": f"{REAL_DRAWS} renders of each of the {t['prompts']} evaluation prompts",
        "samples_per_seed": t["prompts"], "seeds": t["seeds"],
        "adherence": table, "adherence_drop": table["all"]["drop"],
        "fd_teacher": round(float(fd_t.mean()), 4), "fd_teacher_std": round(float(fd_t.std()), 4),
        "fd_student": round(float(fd_s.mean()), 4), "fd_student_std": round(float(fd_s.std()), 4),
        "fd_ratio": round(float(fd_s.mean() / fd_t.mean()), 4),
    }
