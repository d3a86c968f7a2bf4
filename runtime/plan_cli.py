"""`s2edge plan`: the candidate plans for a device, their predicted memory, and the one s2edge would choose."""

from __future__ import annotations

import click

from runtime.config import bundled_config
from runtime.devices import (GIB, DESKTOP_RESERVE_BYTES, DeviceInfo, detect_device, device_from_spec, find_gpu,
                             parse_capability, parse_size, simulated_device)
from runtime.errors import InputError, S2EdgeError
from runtime.loader import resolve_device
from runtime.planner import (LINEAR_FORMATS, MARGIN_FRACTION, MIN_MARGIN_BYTES, PRECISIONS, Candidate, PlanRequest,
                             evaluate, fallbacks, gib, margin_bytes, pick, usable_bytes)

ROWS = {
    "slow_linears": "slow AR linears",
    "fast_linears": "fast AR linears + head",
    "text_embeddings": "text embedding table",
    "audio_embeddings": "codebook + fast embeddings",
    "slow_head": "slow head (legal rows)",
    "norms": "norms",
    "kv_cache": "KV cache",
    "buffers": "RoPE tables, ids",
    "codec": "codec (decode side)",
    "workspace": "workspace: largest of",
    "decode_graphs": "decode graphs, cuBLAS",
    "cuda_context": "CUDA context",
    "runtime": "Python + torch",
}
TRANSIENT_ROWS = {
    "prefill": "  prefill activations",
    "codec_decode": "  codec decode chunk",
    "load": "  quantize at load",
}
LABEL_WIDTH = 28


def _device(gpu: str | None, vram_gb: float | None, capability: str | None, host_ram_gb: float | None,
            device: str | None) -> DeviceInfo:
    if host_ram_gb is not None and host_ram_gb <= 0:
        raise InputError("--host-ram-gb must be positive")
    host = None if host_ram_gb is None else int(host_ram_gb * GIB)
    if sum(x is not None for x in (gpu, vram_gb, device)) > 1:
        raise InputError("give one of --gpu, --vram-gb (with --compute-capability) or --device")
    if (vram_gb is None) != (capability is None):
        raise InputError("--vram-gb and --compute-capability go together")
    if gpu is not None:
        return device_from_spec(find_gpu(gpu), host)
    if vram_gb is not None:
        if vram_gb <= 0:
            raise InputError("--vram-gb must be positive")
        return simulated_device(int(vram_gb * GIB), parse_capability(capability), host_bytes=host)
    return detect_device(resolve_device(device or "auto"), host)


def _describe(device: DeviceInfo) -> list[str]:
    if not device.is_cuda:
        return [f"device    CPU: {gib(device.total_bytes)} GiB RAM, {gib(device.free_bytes)} GiB available"]
    major, minor = device.compute_capability
    free = f"{gib(device.free_bytes)} GiB free"
    if device.simulated:
        free += f" (assumed: {gib(DESKTOP_RESERVE_BYTES)} GiB held by the driver and desktop)"
    return [f"device    {device.name}{' (simulated)' if device.simulated else ''}: {gib(device.total_bytes)} GiB, "
            f"compute capability {major}.{minor}, {free}",
            f"host RAM  {gib(device.host_available_bytes)} GiB available"]


def _table(candidates: tuple[Candidate, ...], chosen: str | None) -> list[str]:
    plans = [c.plan for c in candidates]
    width = max(8, *(len(p.name) + 3 for p in plans))

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<{LABEL_WIDTH}}" + "".join(f"{c:>{width}}" for c in cells)

    lines = [line("GiB", [("* " if p.name == chosen else "") + p.name for p in plans])]
    for key, label in ROWS.items():
        if key in plans[0].components:
            lines.append(line(label, [gib(p.components[key]) for p in plans]))
        if key == "workspace":
            lines += [line(text, [gib(p.transients[k]) for p in plans]) for k, text in TRANSIENT_ROWS.items()]
    lines.append(line("total", [gib(p.total) for p in plans]))
    if plans[0].device_kind == "cuda":
        lines.append(line("host RAM", [gib(p.host_bytes) for p in plans]))
    lines.append(line("fits", ["yes" if c.fits else "no" for c in candidates]))
    return lines


@click.command("plan")
@click.option("--gpu", help='Plan for a known card by name, e.g. "RTX 4070" or "3080 10GB" (configs/gpus.json).')
@click.option("--vram-gb", type=float, help="Plan for a card with this much memory (GiB) ...")
@click.option("--compute-capability", "capability", help="... and this compute capability, e.g. 8.6 or 8.9.")
@click.option("--host-ram-gb", type=float, help="Host RAM available (GiB); default: this machine's.")
@click.option("--device", help="Measure this device instead: auto, cpu, cuda or cuda:N (the default is auto).")
@click.option("--vram-budget", help="Use at most this much memory, e.g. 8GB, 7.5G, 6000MB (to share the card).")
@click.option("--max-context", type=int, default=4096, show_default=True,
              help="KV-cache tokens: prompt + generated frames (21.5 frames per second of audio).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Force a weight format (fp32: CPU only); auto picks the best that fits.")
@click.option("--fast-ar-precision", type=click.Choice(LINEAR_FORMATS), help="Force the fast AR's format.")
@click.option("--force", is_flag=True, help="Keep a forced --precision even if it is predicted not to fit.")
@click.option("--config", "config_name", default="s2-pro", show_default=True,
              help="Model config: a name in configs/ or a path to a config.json.")
def plan(gpu: str | None, vram_gb: float | None, capability: str | None, host_ram_gb: float | None,
         device: str | None, vram_budget: str | None, max_context: int, precision: str,
         fast_ar_precision: str | None, force: bool, config_name: str) -> None:
    """Show how S2 Pro would fit a device: the predicted memory of every candidate plan and the one chosen.

    Plans, best quality first: bf16; 8-bit (FP8 on compute capability 8.9+, INT8 below); NF4 with the fast AR
    in bf16; NF4; NF4 with the text embedding table in host RAM. A plan fits when its total plus a margin
    (5 % of the card, at least 0.5 GiB) is at most the usable memory: the free memory, or --vram-budget if
    smaller. Without --gpu or --vram-gb, this machine's GPU is measured (or its CPU if it has none). Sizes are
    binary: 1 GB = 1 GiB = 2^30 bytes, as GPU makers and nvidia-smi count.

    Examples: `s2edge plan --gpu "RTX 3060 12GB"`, `s2edge plan --vram-gb 12 --compute-capability 8.9
    --max-context 8192`, `s2edge plan --vram-budget 6GB`.
    """
    info = _device(gpu, vram_gb, capability, host_ram_gb, device)
    request = PlanRequest(precision=precision, fast_precision=fast_ar_precision, max_context=max_context,
                          vram_budget=None if vram_budget is None else parse_size(vram_budget), force=force)
    candidates = evaluate(bundled_config(config_name), info, request)
    for text in _describe(info):
        click.echo(text)
    try:
        choice = pick(candidates, info, request)
    except S2EdgeError:
        _show(candidates, None, info, request)
        raise
    _show(candidates, choice.plan.name, info, request)
    click.echo(f"chosen    {choice.plan.name}")
    if choice.warning:
        click.echo(f"warning   {choice.warning}", err=True)
    later = fallbacks(choice)
    if later:
        click.echo(f"fallbacks {', '.join(p.name for p in later)} (if loading runs out of memory)")


def _show(candidates: tuple[Candidate, ...], chosen: str | None, info: DeviceInfo, request: PlanRequest) -> None:
    margin = margin_bytes(info, request)
    click.echo(f"usable    {gib(usable_bytes(info, request))} GiB; margin {gib(margin)} GiB "
               f"({MARGIN_FRACTION:.0%} of the memory or budget, at least {gib(MIN_MARGIN_BYTES)} GiB); "
               f"max context {request.max_context} tokens")
    click.echo("")
    for text in _table(candidates, chosen):
        click.echo(text)
    click.echo("")
    for c in candidates:
        if not c.fits:
            click.echo(f"rejected  {c.plan.name}: {c.reason}")
