"""Where a result came from: every benchmark script stamps its JSON and Markdown outputs with it.

`stamp(result)` adds `result["provenance"]`: the command line, the UTC date, the commit
(`git rev-parse HEAD`) and whether the working tree had uncommitted changes, and the machine.
`with_header(markdown, result)` puts the same facts on one line under the Markdown's title.
A result that already carries provenance keeps it, so re-rendering a saved result (e.g.
`gpu_checks.py --render`) credits the run that measured it, not the one that redrew it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> str:
    """CPU architecture, core count and memory, and the GPU where PyTorch sees one."""
    text = f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}"
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        text += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM"
    torch = sys.modules.get("torch")  # only where the script already imported it
    if torch is not None and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def command(argv: list[str] | None = None) -> str:
    """The command line as typed, run from the repository root (or `cd DIR && ...` from elsewhere,
    so that relative paths among the arguments keep their meaning)."""
    argv = sys.argv if argv is None else argv
    line = "python " + shlex.join(argv)
    cwd = Path.cwd().resolve()
    return line if cwd == ROOT else f"cd {shlex.quote(os.path.relpath(cwd, ROOT))} && {line}"


def provenance(argv: list[str] | None = None) -> dict:
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"command": command(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": head, "dirty": bool(status) if status is not None else None, "machine": machine()}


def stamp(result: dict) -> dict:
    """`result` with its provenance (kept if it already has one); returned for use in place."""
    result.setdefault("provenance", provenance())
    return result


def header(p: dict) -> str:
    commit = p.get("commit") or "not recorded"
    if p.get("dirty"):
        commit += " (with uncommitted changes)"
    command = p.get("command") or "not recorded"
    shown = command if command.startswith("not recorded") else f"`{command}`"
    return (f"> Command: {shown} · date: {p.get('date') or 'not recorded'} · "
            f"commit: {commit} · machine: {p.get('machine') or 'not recorded'}")


def with_header(markdown: str, result: dict) -> str:
    """`markdown` with the provenance line under its first title (or on top when it has none)."""
    line = header(stamp(result)["provenance"])
    lines = markdown.split("\n")
    at = 1 if lines and lines[0].startswith("# ") else 0
    return "\n".join([*lines[:at], "", line, *lines[at:]]) if at else "\n".join([line, "", *lines])
