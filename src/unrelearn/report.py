"""Image grids with their prompts as labels."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch


def save_grid(
    images: torch.Tensor,
    labels: Sequence[str],
    path: str | Path,
    columns: int = 8,
    title: str = "",
    marked: Sequence[bool] | None = None,
) -> Path:
    """A PNG of ``images`` (N, 3, H, W) in [0, 1], each under its wrapped label; written atomically.

    Tiles whose ``marked`` flag is set (the detector fires on them) get a thick red frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, label) in enumerate(zip(axes.flat, images, labels)):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 22)[:3]), fontsize=6)
        if marked is not None and marked[i]:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
