"""Evaluate a student against its teacher with identical noise, labels (or prompts) and timesteps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data.calibration import CalibrationSet, resolved_sampling
from ..models.load import ZOO_DIR, LoadedModel
from ..sampling import NoiseSchedule, sample_batched
from . import cost, metrics
from .prompted import PromptedEvaluation

log = logging.getLogger("dit_compress")


def _balanced(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


class Evaluator:
    """Generates matched samples from teacher and student and computes every metric once."""

    def __init__(self, teacher: LoadedModel, calibration: CalibrationSet, spec):
        self.teacher, self.calib, self.spec = teacher, calibration, spec
        self.schedule = NoiseSchedule(teacher.scheduler_config)
        self.steps, self.guidance = resolved_sampling(teacher, spec.sampling_steps, spec.guidance_scale)
        self.classifier = None
        # A text-to-image pipeline teacher is evaluated on prompts, through its own encoders and VAE
        # (prompts for any other teacher are refused there).
        self.prompted = (PromptedEvaluation(teacher, calibration, spec, self.schedule, self.steps, self.guidance)
                         if teacher.pipeline is not None or spec.prompts else None)
        name = teacher.card.get("classifier")
        if name and self.prompted is None:
            from ..models.classifier import DigitClassifier

            self.classifier = DigitClassifier.load(ZOO_DIR / name)
        self._teacher_cache: dict = {}

    def inputs(self, seed: int, n: int):
        adapter = self.teacher.adapter
        g = torch.Generator().manual_seed(10_000 + seed)
        cond = adapter.random_conditions(n, g)
        if adapter.num_classes:
            cond["class_labels"] = _balanced(n, adapter.num_classes, g)
        noise = torch.randn(n, *adapter.latent_shape(), generator=g)
        return cond, noise

    def _samples(self, model: LoadedModel, seed: int, n: int, guidance: float, who: str) -> torch.Tensor:
        cond, noise = self.inputs(seed, n)
        return sample_batched(model.model, model.adapter, self.schedule, cond, noise, self.steps, guidance,
                              desc=f"sampling {who} (seed {seed}, guidance {guidance:g})")

    def _teacher_samples(self, seed: int, n: int, guidance: float) -> torch.Tensor:
        key = (seed, n, guidance)
        if key not in self._teacher_cache:
            self._teacher_cache[key] = self._samples(self.teacher, seed, n, guidance, "teacher")
        return self._teacher_cache[key]

    def quality(self, student: LoadedModel, name: str = "student") -> tuple[dict, dict]:
        """Teacher-relative metrics, and absolute ones when the card names a classifier (or, for a
        pipeline teacher, an adherence evaluator); `name` (student, a variant's label) labels the
        progress bars."""
        s = self.spec
        log.info("evaluating quality: denoiser error, %d-step samples (guidance %.1f)", self.steps, self.guidance)
        q: dict = {"sampling_steps": self.steps, "guidance_scale": self.guidance}
        q["denoiser_error"] = metrics.denoiser_error_by_band(self.teacher, student, self.calib, s.denoiser_samples,
                                                             s.timestep_bands)
        q["denoiser_relative_error"] = round(float(np.mean([b["relative_error"] for b in q["denoiser_error"]])), 5)
        if self.prompted is not None:
            extra, pictures = self.prompted.quality(student, name)
            return {**q, **extra}, pictures
        seed0 = s.seeds[0]
        n = s.num_samples if self.classifier else s.compare_samples
        t_img = self._teacher_samples(seed0, n, self.guidance)
        s_img = self._samples(student, seed0, n, self.guidance, name)
        k = min(s.compare_samples, n)
        q["psnr_db"], q["ssim"] = (round(v, 4) for v in metrics.psnr_ssim(t_img[:k], s_img[:k]))
        q["outputs_finite"] = bool(torch.isfinite(s_img).all())
        pictures = {"teacher": t_img, "student": s_img,
                    "labels": self.inputs(seed0, n)[0].get("class_labels")}
        if self.classifier is not None:
            q.update(self._absolute(student, {seed0: (t_img, s_img)}, name))
        return q, pictures

    def _absolute(self, student: LoadedModel, first: dict, name: str) -> dict:
        from ..data.digits import load_digits_split

        s = self.spec
        real = load_digits_split("heldout")
        _, real_feats = metrics.classify(self.classifier, real.images)
        fd = {"teacher": [], "student": []}
        acc = {"teacher": [], "student": []}
        for seed in s.seeds:
            cond, _ = self.inputs(seed, s.num_samples)
            t_img, s_img = first.get(seed) or (self._teacher_samples(seed, s.num_samples, self.guidance),
                                                self._samples(student, seed, s.num_samples, self.guidance, name))
            for who, img in (("teacher", t_img), ("student", s_img)):
                pred, feats = metrics.classify(self.classifier, img)
                acc[who].append((pred == cond["class_labels"]).float().mean().item())
                fd[who].append(metrics.frechet_distance(feats, real_feats))
        cond, _ = self.inputs(s.seeds[0], s.num_samples)
        unguided = {}
        for who, m in (("teacher", self.teacher), ("student", student)):
            img = (self._teacher_samples(s.seeds[0], s.num_samples, 1.0) if who == "teacher"
                   else self._samples(m, s.seeds[0], s.num_samples, 1.0, name))
            unguided[who] = (metrics.classify(self.classifier, img)[0] == cond["class_labels"]).float().mean().item()
        fd_t, fd_s = np.array(fd["teacher"]), np.array(fd["student"])
        g_t, g_s = float(np.mean(acc["teacher"])), float(np.mean(acc["student"]))
        return {
            "reference_set": f"{len(real.labels)} held-out real digits",
            "samples_per_seed": s.num_samples, "seeds": s.seeds,
            "fd_teacher": round(float(fd_t.mean()), 4), "fd_teacher_std": round(float(fd_t.std()), 4),
            "fd_student": round(float(fd_s.mean()), 4), "fd_student_std": round(float(fd_s.std()), 4),
            "fd_ratio": round(float(fd_s.mean() / fd_t.mean()), 4),
            "guided_accuracy_teacher": round(g_t, 4), "guided_accuracy_student": round(g_s, 4),
            "guided_accuracy_drop": round(g_t - g_s, 4),
            "unguided_accuracy_teacher": round(unguided["teacher"], 4),
            "unguided_accuracy_student": round(unguided["student"], 4),
            "unguided_accuracy_drop": round(unguided["teacher"] - unguided["student"], 4),
        }

    def cost(self, student: LoadedModel, student_onnx: Path | None, teacher_onnx: Path | None,
             student_ckpt: str | None) -> dict:
        s = self.spec
        log.info("measuring cost: parameters, MACs, latency, memory")
        # On noised teacher samples, as in deployment: routed students (experts, blocks) spread
        # real inputs over their routes differently from random noise at random timesteps.
        b = self.calib.batch(self.calib.stream("evaluate/cost"), s.latency_batch)
        inputs = (b.x_t, b.t, b.cond)
        out: dict = {}
        for who, m, ckpt in (("teacher", self.teacher, self.teacher_source()), ("student", student, student_ckpt)):
            out[who] = {"parameters": cost.count_parameters(m.model),
                        "macs_per_sample": cost.macs_per_sample(m.model, m.adapter, inputs)}
            if ckpt is not None:
                out[who]["memory"] = cost.peak_memory(ckpt, s.memory_batch)
        # Latency: teacher and student timed in alternation, so the ratio survives load drift.
        tt, ts = cost.paired_torch_latency(self.teacher, student, s.latency_batch, s.latency_repeats, inputs)
        out["teacher"]["torch_latency"], out["student"]["torch_latency"] = tt, ts
        if teacher_onnx is not None and student_onnx is not None:
            ot, os_ = cost.paired_onnx_latency(teacher_onnx, student_onnx, self.teacher.adapter, s.latency_batch,
                                               s.latency_repeats, inputs)
            out["teacher"]["onnx_latency"], out["student"]["onnx_latency"] = ot, os_
        t, st = out["teacher"], out["student"]
        out["param_ratio"] = round(st["parameters"] / t["parameters"], 4)
        out["macs_ratio"] = round(st["macs_per_sample"] / t["macs_per_sample"], 4)
        out["torch_latency_ratio"] = round(st["torch_latency"]["median_ms"] / t["torch_latency"]["median_ms"], 4)
        if "onnx_latency" in t and "onnx_latency" in st:
            out["onnx_latency_ratio"] = round(st["onnx_latency"]["median_ms"] / t["onnx_latency"]["median_ms"], 4)
        return out

    def teacher_source(self) -> str | None:
        src = self.teacher.source
        if src.startswith("zoo:"):
            return str(ZOO_DIR / src[4:] / "transformer")
        return src if Path(src).exists() else None
