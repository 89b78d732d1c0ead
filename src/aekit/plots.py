"""Figures. Matplotlib with the Agg backend: files only, no window, no display needed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aekit._io import atomic_path


def _figure_module():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_image(x: torch.Tensor):
    """(C, H, W) in [0, 1] -> an array imshow takes: (H, W) gray or (H, W, 3) colour."""
    x = x.detach().cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


@torch.inference_mode()
def save_reconstructions(model: nn.Module, x: torch.Tensor, path: str | Path) -> None:
    """The blog's figure: originals ``x`` (n, C, H, W) above their reconstructions."""
    plt = _figure_module()
    model.eval()
    device = next(model.parameters()).device
    recon = model(x.to(device)).cpu()
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for i in range(n):
        for row, images in enumerate((x, recon)):
            ax = axes[row][i]
            ax.imshow(_as_image(images[i]), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
    axes[0][0].set_title("original", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
