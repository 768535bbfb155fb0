"""What every chart shares: titles, colours, byte units, the CPU caveat, saving a figure, file-name slugs (no torch)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt

DPI = 110
MAX_WIDTH_IN = 18.0  # 18 in at 110 dpi: under 2000 px, one screen
# Memory parts, by name as records carry them; a part a record adds later gets a colour from the cycle.
PART_COLORS = {
    "weights": "#4c72b0",
    "gradients": "#55a868",
    "optimizer_state": "#8172b2",
    "dp_state": "#c44e52",
    "activations_and_other": "#ccb974",
}
PART_LABELS = {
    "activations_and_other": "activations and other (derived: peak - parts)",
    "dp_state": "DP state (per-sample gradients)",
}
CPU_CAVEAT = (
    "CPU: DiT-tiny steps are dominated by Python overhead and other load on the machine; "
    "ratios between modes are not meaningful and say nothing about a GPU"
)


def finish(fig, out: Path, title: str | None = None, setting: dict | None = None, layout: bool = True) -> Path:
    """Title (if given), the CPU caveat (on a CPU setting's chart), tight layout (unless the chart made its own),
    save at the visualizer's resolution, release the figure."""
    if title is not None:
        fig.suptitle(title, fontsize=10)
    cpu = setting is not None and is_cpu(setting)
    if cpu:
        fig.text(0.5, 0.005, CPU_CAVEAT, ha="center", va="bottom", fontsize=7, color="dimgrey")
    if layout:
        fig.tight_layout(rect=(0, 0.04, 1, 1) if cpu else None)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def slug(values) -> str:
    """A file-name-safe join of a setting's values."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "__".join(str(v) for v in values)).strip("_")


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, name) to show byte counts up to ``max_bytes``: GiB from 2 GiB on, MiB below."""
    return (2**30, "GiB") if max_bytes >= 2 * 2**30 else (2**20, "MiB")


def setting_text(group: dict) -> str:
    """ "DiT-XL/2 256px, fp32, flash attention[, K=k][, torch.compile (mode)]" from a setting."""
    k = group.get("noise_multiplicity", 1)
    compiled = group.get("compile", "off")
    return (
        f"{group['model']} {group['image_size']}px, {group['precision']}, {group['attention']} attention"
        f"{f', K={k}' if k != 1 else ''}{f', torch.compile ({compiled})' if compiled != 'off' else ''}"
    )


def title(setting: dict) -> str:
    return f"{setting_text(setting)} on {setting['device']}"


def experiment_order(df) -> list[str]:
    """vanilla first, then the upstream baselines, then the engine's modes (alphabetically)."""
    names = list(dict.fromkeys(df["experiment"]))
    return sorted(names, key=lambda n: (n != "vanilla", not n.startswith("opacus_"), n))


def colors(experiments: list[str]) -> dict:
    cmap = plt.get_cmap("tab10")
    return {e: cmap(i % 10) for i, e in enumerate(experiments)}


def part_color(part: str, index: int):
    return PART_COLORS.get(part) or plt.get_cmap("Set2")(index % 8)


def is_cpu(setting: dict) -> bool:
    return str(setting.get("device", "")).startswith("CPU")
