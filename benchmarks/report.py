"""A results page of two columns (what, measured), as the single-table benchmarks write it."""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import torch

from runtime.files import atomic_path


def run_notes() -> tuple[str, list[str]]:
    """(today's date for the file name, the page's first notes: when, with which torch and triton, the command)."""
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return now.strftime("%Y-%m-%d"), [f"- date: {now:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
                                      f"triton {triton.__version__}", f"- command: `{command}`"]


def write_measured(out: Path, name: str, gpu: str, date: str, title: str, notes: list[str],
                   rows: list[tuple[str, str]]) -> None:
    """Print the page (`# title`, the notes, the table) and save it as out/<name>-<gpu slug>-<date>.md."""
    write_page(out, name, gpu, date, [f"# {title}", "", *notes, "", "| what | measured |", "|---|---|",
                                      *[f"| {k} | {v} |" for k, v in rows]])


def write_page(out: Path, name: str, gpu: str, date: str, lines: list[str]) -> Path:
    """Print `lines` and save them as the page out/<name>-<gpu slug>-<date>.md; its path."""
    text = "\n".join(lines) + "\n"
    print(text)
    slug = gpu.replace(" ", "-").replace("/", "-")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{name}-{slug}-{date}.md") as tmp:
        tmp.write_text(text)
    return out / f"{name}-{slug}-{date}.md"
