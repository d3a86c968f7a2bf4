"""A results page of two columns (what, measured), as the single-table benchmarks write it."""

from __future__ import annotations

from pathlib import Path


def write_measured(out: Path, name: str, gpu: str, date: str, title: str, notes: list[str],
                   rows: list[tuple[str, str]]) -> str:
    """Print the page (`# title`, the notes, the table) and save it as out/<name>-<gpu slug>-<date>.md."""
    lines = [f"# {title}", "", *notes, "", "| what | measured |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    slug = gpu.replace(" ", "-").replace("/", "-")
    (out / f"{name}-{slug}-{date}.md").write_text(text)
    return text
