"""What every chart of the visualizer shares: titling and saving a figure, file-name slugs (never imports torch)."""

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
