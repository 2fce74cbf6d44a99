"""report.json, report.md and pictures (teacher row above student row, same noise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..fileio import save_figure, write_atomic


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_grid(path: Path, teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor | None,
              columns: int = 10, rows: int = 2, prompts: list[str] | None = None) -> None:
    """Pairs of rows: teacher samples above the student's from the same noise and condition, each
    pair titled by row and labelled beneath with its class, or its prompt (wrapped, shortened; fewer,
    larger columns make room)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = 3 if prompts is not None else 2  # rows per pair: teacher, student (, the prompt)
    if prompts is not None:
        columns = min(columns, 5)
        fig, axes = plt.subplots(3 * rows, columns, figsize=(columns * 1.5, rows * 3.6), squeeze=False,
                                 gridspec_kw={"height_ratios": [1, 1, 0.42] * rows})
    else:
        fig, axes = plt.subplots(2 * rows, columns, figsize=(columns * 0.9, 2 * rows * 1.1), squeeze=False)
    n = min(columns * rows, teacher.shape[0])
    order = torch.argsort(labels[:n], stable=True) if labels is not None else torch.arange(n)
    for r in range(rows):
        for c in range(columns):
            i = r * columns + c
            for k, (who, imgs) in enumerate((("teacher", teacher), ("student", student))):
                ax = axes[per * r + k, c]
                ax.axis("off")
                if i < n:
                    img = imgs[order[i]].clamp(-1, 1).add(1).div(2)
                    ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                    if prompts is not None:  # a thin frame: scenes on white would merge with the page
                        ax.axis("on")
                        ax.set_xticks([])
                        ax.set_yticks([])
                        for spine in ax.spines.values():
                            spine.set(color="0.75", linewidth=0.6)
                    if k == 1 and labels is not None and prompts is None:  # the pair's class, under the student
                        ax.text(0.5, -0.06, f"class {int(labels[order[i]])}", transform=ax.transAxes,
                                ha="center", va="top", fontsize=6)
                if c == 0:
                    ax.set_title(who, fontsize=7, loc="left")
            if prompts is not None:  # the pair's prompt, in its own row under the student image
                ax = axes[per * r + 2, c]
                ax.axis("off")
                if i < n:
                    ax.text(0.5, 1.0, _caption(prompts[int(order[i])]), transform=ax.transAxes, ha="center",
                            va="top", fontsize=6, linespacing=1.1)
    condition = "prompt" if prompts is not None else "label" if labels is not None else "condition"
    fig.suptitle(f"same noise and {condition}: teacher (upper) vs student (lower row of each pair)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _caption(text: str, width: int = 26, lines: int = 3) -> str:
    """`text` wrapped to `width` characters, cut to `lines` lines with an ellipsis."""
    import textwrap

    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def save_curves(path: Path, report: dict) -> None:
    """Denoiser error per timestep band, and the recovery loss curve of each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    bands = report["quality"]["denoiser_error"]
    a.bar([f"{x['t_min']:.0f}-{x['t_max']:.0f}" for x in bands], [x["relative_error"] for x in bands])
    a.set_title("student vs teacher: relative error by timestep")
    a.set_xlabel("timestep band")
    for st in report.get("stages", []):
        hist = (st.get("recovery") or {}).get("history") or []
        if hist:
            b.plot([h["step"] for h in hist], [h["output_mse"] for h in hist], label=st["name"])
    b.set_yscale("log")
    b.set_title("recovery distillation: output MSE")
    b.set_xlabel("step")
    if b.lines:
        b.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_BULKY = ("block_influence", "interval_costs", "width", "analysis", "expert_load", "moe")


def write_markdown(path: Path, report: dict) -> None:
    q, c = report["quality"], report["cost"]
    lines = [f"# {report['recipe']['name']} — compression report", "",
             f"Teacher `{report['teacher']}`; recipe hash `{report['recipe_hash']}`; "
             f"dit_compress {report['version']}.", ""]
    if report.get("gate"):
        g = report["gate"]
        lines += [f"**Quality gate: {'PASSED' if g['passed'] else 'FAILED'}**", "",
                  "| metric | bound | value | ok |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['kind']} {r['bound']} | {_fmt(r['value']) if r['value'] is not None else 'missing'} | {'yes' if r['ok'] else 'NO'} |"
                  for r in g["rules"]]
        lines.append("")
    lines += ["## Quality (student against teacher, identical noise and conditions)", "",
              "| metric | teacher | student |", "|---|---|---|"]
    for key in ("guided_accuracy", "unguided_accuracy", "fd"):
        if f"{key}_teacher" in q:
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(q[key + '_teacher'])}"
                         f"{' ± ' + _fmt(q[key + '_teacher_std']) if key == 'fd' else ''} | "
                         f"{_fmt(q[key + '_student'])}{' ± ' + _fmt(q[key + '_student_std']) if key == 'fd' else ''} |")
    if "adherence" in q:
        lines += adherence_lines(q["adherence"])
    lines += ["", f"- Fréchet-distance ratio (student/teacher): **{_fmt(q.get('fd_ratio', 'n/a'))}**"
              if "fd_ratio" in q else "", f"- sample PSNR vs teacher: **{_fmt(q['psnr_db'])} dB**, "
              f"SSIM {_fmt(q['ssim'])}", f"- mean denoiser relative error: {_fmt(q['denoiser_relative_error'])}",
              "", "![samples](samples.png)", "", "![curves](curves.png)", "",
              "## Cost", "", "| | teacher | student | ratio |", "|---|---|---|---|",
              f"| parameters | {c['teacher']['parameters']:,} | {c['student']['parameters']:,} | {c['param_ratio']} |",
              f"| MACs / sample | {c['teacher']['macs_per_sample']:,} | {c['student']['macs_per_sample']:,} | "
              f"{c['macs_ratio']} |",
              f"| PyTorch latency (ms, batch {c['teacher']['torch_latency']['batch']}) | "
              f"{c['teacher']['torch_latency']['median_ms']} | {c['student']['torch_latency']['median_ms']} | "
              f"{c['torch_latency_ratio']} |"]
    if "onnx_latency_ratio" in c:
        lines.append(f"| ONNX Runtime latency (ms) | {c['teacher']['onnx_latency']['median_ms']} | "
                     f"{c['student']['onnx_latency']['median_ms']} | {c['onnx_latency_ratio']} |")
    mem_t, mem_s = c["teacher"].get("memory", {}), c["student"].get("memory", {})
    for key, label in (("weights_mb", "weights (MB)"),
                       ("forward_peak_increase_mb", f"forward peak memory (MB, batch {mem_t.get('batch')})")):
        if key in mem_t and key in mem_s:
            lines.append(f"| {label} | {mem_t[key]} | {mem_s[key]} | "
                         f"{round(mem_s[key] / max(mem_t[key], 1e-9), 3)} |")
    if report.get("variants"):
        lines += ["", "## Variants of the same run", "",
                  "Other results of the last stage (e.g. PPCL's other ratios), judged like the student.", "",
                  "| model | parameters ratio | MACs ratio | FD ratio | guided acc. / adherence | PSNR (dB) | ONNX latency ratio "
                  "| parity |", "|---|---|---|---|---|---|---|---|"]
        rows = [("student", report)] + sorted(report["variants"].items())
        for name, r in rows:
            vq, vc, vx = r["quality"], r["cost"], r.get("export") or {}
            lines.append(f"| {name} | {vc['param_ratio']} | {vc['macs_ratio']} | {_fmt(vq.get('fd_ratio', 'n/a'))} | "
                         f"{_fmt(_accuracy(vq))} | {_fmt(vq['psnr_db'])} | "
                         f"{vc.get('onnx_latency_ratio', 'n/a')} | "
                         f"{_fmt(vx['parity']['max_abs_error']) if vx else 'n/a'} |")
    if report.get("export"):
        p = report["export"]["parity"]
        lines += ["", "## Export", "", f"`{report['export']['path']}`: ONNX Runtime vs PyTorch max abs error "
                  f"{p['max_abs_error']:.3g} at batch {p['batch']} (limit {report['export']['atol']:g})."]
    if report.get("deployment"):
        lines += deployment_lines(report["deployment"])
    from ..core.stage import get_stage

    for st in report.get("stages", []):
        lines += get_stage(st["name"]).report_lines(st["summary"], st.get("pictures") or {})
    lines += run_lines(report)
    lines += ["", "## Stages", ""]
    for st in report.get("stages", []):
        rec = st.get("recovery") or {}
        lines.append(f"- `{st['name']}` {json.dumps(st['config'])}; "
                     f"summary: {json.dumps({k: v for k, v in st['summary'].items() if k not in _BULKY})}"
                     + (f"; recovery {rec.get('steps')} steps in {rec.get('seconds')} s, final output MSE "
                        f"{rec.get('final_output_mse')}" if rec else ""))
    write_atomic(path, "\n".join(line for line in lines) + "\n")


def _accuracy(q: dict):
    """The student's headline accuracy: guided class accuracy, or a pipeline teacher's adherence (all)."""
    if "guided_accuracy_student" in q:
        return q["guided_accuracy_student"]
    return (q.get("adherence") or {}).get("all", {}).get("student", "n/a")


def _spread(mean, stderr) -> str:
    return _fmt(mean) + (f" ± {_fmt(stderr)}" if stderr is not None else "")


def adherence_lines(a: dict) -> list[str]:
    """Prompt adherence of teacher and student, attribute by attribute, with standard errors over seeds."""
    lines = ["", f"Prompt adherence (digit scenes): {a['prompts']} evaluation prompts, one image each per seed, "
             f"seeds {a['seeds']}; mean ± standard error over seeds, the drop paired by seed.", "",
             "| attribute | teacher | student | drop |", "|---|---|---|---|"]
    for key, row in a.items():
        if isinstance(row, dict):
            name = "all (novel colour-position pairs)" if key == "all_novel_pairs" else key
            lines.append(f"| {name} | {_spread(row['teacher'], row['teacher_stderr'])} | "
                         f"{_spread(row['student'], row['student_stderr'])} | {_spread(row['drop'], row['drop_stderr'])} |")
    return lines


def run_lines(report: dict) -> list[str]:
    """Time and peak resident memory of each phase; throughput and memory of each distillation."""
    lines = []
    if report.get("phases"):
        lines += ["", "## Run: time and memory", "",
                  f"Wall time {report.get('wall_seconds')} s. Peak RSS: the process's resident peak during the phase "
                  "(reset before each on Linux; it includes what earlier phases still hold, e.g. the teacher).", "",
                  "| phase | time (s) | peak RSS (GB) |", "|---|---|---|"]
        lines += [f"| {name} | {row['seconds']} | {row['peak_rss_gb']} |" for name, row in report["phases"].items()]
    runs = [(st["name"], st["recovery"]) for st in report.get("stages", []) if st.get("recovery")]
    if runs:
        lines += ["", "| distillation | processes | steps | samples/s | tokens/s | training memory (MB) |",
                  "|---|---|---|---|---|---|"]
        for name, r in runs:
            memory = (r.get("training_memory") or {}).get("total_mb", "-")
            lines.append(f"| {name} | {r.get('processes', 1)} | {r.get('steps')} | {r.get('samples_per_second', '-')} | "
                         f"{r.get('tokens_per_second', '-')} | {memory} |")
    return lines


def deployment_lines(d: dict) -> list[str]:
    """Precision variants judged on quality and latency; graph optimisation; TensorRT."""
    fp32 = d["fp32"]
    lines = ["", "## Deployment artifacts", "",
             "Each precision variant of the student graph sampled through ONNX Runtime with the same noise, "
             "labels, steps and guidance, and timed beside the fp32 graph in the same loop.", "",
             "| graph | size (MB) | rel. error vs fp32 | PSNR vs teacher (dB) | FD ratio | guided acc. / adherence | "
             "latency ms (fp32 timed alongside) | latency vs fp32 |", "|---|---|---|---|---|---|---|---|",
             f"| fp32 | {fp32['bytes'] / 1e6:.2f} | 0 | | | | {fp32['onnx_latency']['median_ms']} | 1.0 |"]
    skipped = []
    for kind, r in d.items():
        if kind in ("fp32", "graph_optimisation", "tensorrt"):
            continue
        if "skipped" in r:
            skipped.append(f"- {kind} skipped: {r['skipped']}")
            continue
        q, x = r["quality"], r["export"]
        lines.append(f"| {kind} | {x['bytes'] / 1e6:.2f} | {_fmt(x['parity']['max_rel_error'])} | "
                     f"{_fmt(q['psnr_db'])} | "
                     f"{_fmt(q.get('fd_ratio', 'n/a'))} | {_fmt(_accuracy(q))} | "
                     f"{r['onnx_latency']['median_ms']} ({r['fp32_paired_latency']['median_ms']}) | "
                     f"{r['latency_ratio_vs_fp32']} |")
    lines += [""] + skipped
    kept = {k: r["export"].get("kept_fp32_ops") for k, r in d.items() if isinstance(r, dict) and "export" in r
            and r["export"].get("kept_fp32_ops")}
    for kind, ops in kept.items():
        lines.append(f"- {kind}: kept in fp32: {', '.join(f'{op} x{n}' for op, n in ops.items())}")
    if d.get("graph_optimisation"):
        g = d["graph_optimisation"]
        lines += ["", f"### ONNX Runtime graph optimisation (batch {g['batch']})", "",
                  "| graph | nodes | ops introduced by fusion | latency (ms) | vs unoptimised |",
                  "|---|---|---|---|---|"]
        for r in g["rows"]:
            new = ", ".join(f"{k} x{v}" for k, v in r["new_ops"].items()) or "-"
            lines.append(f"| {r['graph']} | {r['nodes']} | {new} | {r['latency']['median_ms']} | "
                         f"{r['latency_ratio']} |")
    if d.get("tensorrt"):
        t = d["tensorrt"]
        lines += ["", "### TensorRT", "", f"- skipped: {t['skipped']}" if "skipped" in t else
                  f"- {t['precision']} engine `{t['engine']}` (TensorRT {t['tensorrt']}, built in "
                  f"{t['build_seconds']} s): {t['latency']['median_ms']} ms, max relative error vs ONNX Runtime "
                  f"{_fmt(t['max_rel_error_vs_onnx'])}"]
    return lines



def save_image_rows(path: Path, rows: list[tuple[str, torch.Tensor]], title: str, columns: int = 10) -> None:
    """One labelled row of grayscale images per entry (e.g. real task images, then each method's samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.05), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < imgs.shape[0]:
                img = imgs[c].clamp(-1, 1).add(1).div(2)
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_title(label, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
