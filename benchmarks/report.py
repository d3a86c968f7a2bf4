"""A results page of two columns (what, measured), as the single-table benchmarks write it."""

from __future__ import annotations

from pathlib import Path

from runtime.files import atomic_path


def write_measured(out: Path, name: str, gpu: str, date: str, title: str, notes: list[str],
                   rows: list[tuple[str, str]]) -> None:
    """Print the page (`# title`, the notes, the table) and save it as out/<name>-<gpu slug>-<date>.md."""
    lines = [f"# {title}", "", *notes, "", "| what | measured |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    text = "\n".join(lines) + "\n"
    print(text)
    slug = gpu.replace(" ", "-").replace("/", "-")
    with atomic_path(out / f"{name}-{slug}-{date}.md") as tmp:
        tmp.write_text(text)
