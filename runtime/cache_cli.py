"""`s2edge cache ...`: list what the cache folder holds and clear it; the --cache-dir option every command shares."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.cache_folder import KINDS, cache_entries, remove, size_text
from runtime.loader import DEFAULT_CACHE_DIR


def cache_dir_option(help_text: str):
    """--cache-dir (or S2EDGE_CACHE), with what the command keeps there."""
    return click.option("--cache-dir", type=click.Path(path_type=Path), default=DEFAULT_CACHE_DIR, show_default=True,
                        envvar="S2EDGE_CACHE", help=f"{help_text} (or set S2EDGE_CACHE).")


_folder = cache_dir_option("The cache folder")


@click.group()
def cache() -> None:
    """The cache folder: pre-quantized weights (gigabytes per precision plan), the GPU kernels' timed choices and
    encoded --reference recordings, each made once and reused by later runs.

    \b
    Examples:
      s2edge cache list
      s2edge cache clear --only weights
    """


@cache.command(name="list")
@_folder
def list_entries(cache_dir: Path) -> None:
    """What the cache folder holds: kind, file, size, what it is, when it was written."""
    entries = cache_entries(cache_dir)
    if not entries:
        click.echo(f"nothing cached in {cache_dir}")
        return
    click.echo(str(cache_dir))
    for entry in entries:
        name = entry.paths[0].name if len(entry.paths) == 1 else f"{entry.paths[0].parent.name}/"
        click.echo(f"  {entry.kind:15s} {name:36s} {size_text(entry.size):>10s}  {entry.modified:%Y-%m-%d %H:%M}  "
                   f"{entry.detail}")
    click.echo(f"total {size_text(sum(entry.size for entry in entries))}")


@cache.command()
@click.option("--only", type=click.Choice(KINDS), multiple=True,
              help="Remove only entries of this kind (repeatable); all kinds by default.")
@_folder
def clear(only: tuple[str, ...], cache_dir: Path) -> None:
    """Remove what s2edge keeps in the cache folder (other files there are left alone). Run it while no s2edge
    command runs: the next run quantizes, times kernels and encodes recordings again."""
    entries = [entry for entry in cache_entries(cache_dir) if not only or entry.kind in only]
    freed = remove(entries)
    click.echo(f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({size_text(freed)}) from "
               f"{cache_dir}")
