"""What every chart of the visualizer shares: titles, byte units, saving a figure, file-name slugs (no torch)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt


def finish(fig, out: Path, title: str | None = None) -> Path:
    """Title (if given), tight layout, save at the visualizer's resolution, release the figure."""
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def slug(values) -> str:
    """A file-name-safe join of a setting's values."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "__".join(str(v) for v in values)).strip("_")


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, name) to show byte counts up to ``max_bytes``: GiB from 2 GiB on, MiB below."""
    return (2**30, "GiB") if max_bytes >= 2 * 2**30 else (2**20, "MiB")


def setting_text(group: dict) -> str:
    """ "DiT-XL/2 256px, fp32, flash attention[, K=k]" from a setting's model, size, precision, attention and K."""
    k = group.get("noise_multiplicity", 1)
    return (
        f"{group['model']} {group['image_size']}px, {group['precision']}, {group['attention']} attention"
        f"{f', K={k}' if k != 1 else ''}"
    )
