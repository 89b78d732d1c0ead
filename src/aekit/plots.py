"""Figures. Matplotlib with the Agg backend: files only, no window, no display needed.

Each figure has a builder that returns a matplotlib ``Figure`` (``*_figure``) and a
``save_*`` function that writes it atomically to a path. The report embeds the same
figures as PNG bytes (:func:`figure_png`), so a figure is drawn by one function only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from aekit._io import atomic_path, refuse_existing, write_bytes_atomic
from aekit.inference import decode, reconstruct

MAX_LEGEND_CLASSES = 20  # more distinct labels than this get a colourbar instead of a legend


def _figure_module():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_numpy(x, name: str, ndim: int) -> np.ndarray:
    """A tensor or array as a float64 NumPy array of ``ndim`` dimensions, or a ValueError."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array.astype(np.float64, copy=False)


def save_figure(fig, path: str | Path, overwrite: bool = False) -> None:
    """Write ``fig`` atomically (format from the suffix, PNG by default) and close it; an
    existing ``path`` is replaced only with ``overwrite``."""
    plt = _figure_module()
    path = Path(path)
    try:
        refuse_existing(path, overwrite=overwrite)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    finally:
        plt.close(fig)


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes (for embedding); closes the figure."""
    plt = _figure_module()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------------ image grids

# Transparent pixels between two images of a row of image_rows_figure.
GAP = 4


def image_rows_figure(rows: Sequence[tuple[str, torch.Tensor]]):
    """One row of images per ``(label, images)`` pair, images (n, C, H, W) in [0, 1].

    Every row must hold the same number of images; column i shows image i of each row. A row
    is one picture, :func:`image_row` (one axes per image took most of a training run's
    last second).
    """
    plt = _figure_module()
    counts = {len(images) for _, images in rows}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every row needs the same, non-zero number of images, got "
                         f"{[(label, len(images)) for label, images in rows]}")
    n = counts.pop()
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(image_row(images))
        ax.set_axis_off()
        ax.set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def image_row(images: torch.Tensor) -> np.ndarray:
    """Images (n, C, H, W) in [0, 1] side by side, :data:`GAP` transparent pixels apart:
    RGBA (H, n W + (n - 1) GAP, 4), gray images as equal red, green and blue."""
    x = torch.as_tensor(images).detach().cpu().clamp(0, 1).to(torch.float32)
    n, _, h, w = x.shape
    rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    row = torch.zeros(h, n * (w + GAP) - GAP, 4)
    for i in range(n):
        row[:, i * (w + GAP):i * (w + GAP) + w, :3] = rgb[i].permute(1, 2, 0)
        row[:, i * (w + GAP):i * (w + GAP) + w, 3] = 1
    return row.numpy()


def reconstruction_figure(model: nn.Module, x: torch.Tensor):
    """The blog's figure: originals ``x`` (n, C, H, W) above their reconstructions."""
    recon = reconstruct(model, x)
    return image_rows_figure([("original", x), ("reconstruction", recon)])


def save_reconstructions(model: nn.Module, x: torch.Tensor, path: str | Path, overwrite: bool = False) -> None:
    save_figure(reconstruction_figure(model, x), path, overwrite)


def denoising_figure(clean: torch.Tensor, noisy: torch.Tensor, denoised: torch.Tensor,
                     noisy_label: str = "noisy input"):
    """Three rows: ``clean``, ``noisy`` and ``denoised`` images, each (n, C, H, W) in [0, 1]."""
    shapes = {tuple(t.shape) for t in (clean, noisy, denoised)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"clean, noisy and denoised must be image batches (n, C, H, W) of one shape, "
                         f"got {tuple(clean.shape)}, {tuple(noisy.shape)}, {tuple(denoised.shape)}")
    return image_rows_figure([("clean", clean), (noisy_label, noisy), ("denoised", denoised)])


def save_denoising(clean: torch.Tensor, noisy: torch.Tensor, denoised: torch.Tensor, path: str | Path,
                   overwrite: bool = False) -> None:
    save_figure(denoising_figure(clean, noisy, denoised), path, overwrite)


# ------------------------------------------------------------------------------ curves

def loss_curves_figure(history: Sequence):
    """Training curves from a run's history: ``EpochRecord``s (or objects with ``epoch``,
    ``loss``, ``val_loss`` and ``val_mse``). Left: loss and val_loss; right: val_mse."""
    plt = _figure_module()
    if not history:
        raise ValueError("the history is empty: the run has no finished epoch to plot")
    epochs = [r.epoch for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [r.loss for r in history], marker="o", label="loss (train)")
    left.plot(epochs, [r.val_loss for r in history], marker="o", label="val_loss (test)")
    left.set_title("training loss", fontsize=10)
    left.legend(fontsize=8)
    right.plot(epochs, [r.val_mse for r in history], marker="o", color="tab:green", label="val_mse")
    right.set_title("test mean squared error per pixel", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)  # whole epochs only, even for a run of one
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def save_loss_curves(history: Sequence, path: str | Path, overwrite: bool = False) -> None:
    save_figure(loss_curves_figure(history), path, overwrite)


# ------------------------------------------------------------------------- latent map

def project_2d(latents) -> tuple[np.ndarray, str, tuple[str, str]]:
    """(n, d) latents -> (n, 2) points, how they were obtained, and the two axis names.

    d == 2 is kept as it is; d > 2 is projected on its first two principal components
    (scikit-learn's PCA); d == 1 is spread vertically by a fixed random jitter.
    """
    z = _as_numpy(latents, "latents (n, d)", 2)
    n, d = z.shape
    if n < 2:
        raise ValueError(f"a latent map needs at least 2 points, got {n}")
    if d == 2:
        return z, "2-D latent", ("z[0]", "z[1]")
    if d == 1:
        jitter = np.random.default_rng(0).uniform(-1, 1, n)
        return (np.column_stack([z[:, 0], jitter]), "1-D latent (vertical spread is random jitter)",
                ("z[0]", "jitter"))
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    pca = PCA(n_components=2, random_state=0)
    # One BLAS thread: OpenBLAS' threads spinning beside PyTorch's OpenMP threads turned
    # the SVD of a (300, 392) matrix from 20 ms into seconds here.
    with threadpool_limits(limits=1, user_api="blas"):
        points = pca.fit_transform(z)
    explained = 100 * pca.explained_variance_ratio_.sum()
    return points, f"PCA of the {d}-D latent to 2-D ({explained:.0f}% of the variance)", ("PC 1", "PC 2")


def latent_map_figure(latents, labels=None):
    """Scatter of latents (n, d), coloured by ``labels`` (n,) when given.

    Up to ``MAX_LEGEND_CLASSES`` distinct labels get one colour each and a legend; more
    get a continuous colour scale with a colourbar.
    """
    plt = _figure_module()
    points, how, (xlabel, ylabel) = project_2d(latents)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    style = dict(s=6, alpha=0.7, linewidths=0)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], color="tab:blue", **style)
    else:
        labels = np.asarray(labels)
        if labels.shape != (len(points),):
            raise ValueError(f"labels must have shape ({len(points)},), one per latent, got {labels.shape}")
        classes = np.unique(labels)
        if len(classes) <= MAX_LEGEND_CLASSES:
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
            for i, label in enumerate(classes):
                mask = labels == label
                ax.scatter(points[mask, 0], points[mask, 1], color=cmap(i), label=str(label), **style)
            ax.legend(title="label", fontsize=8, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="viridis", **style)
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_title(how, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def save_latent_map(latents, labels, path: str | Path, overwrite: bool = False) -> None:
    save_figure(latent_map_figure(latents, labels), path, overwrite)


# ---------------------------------------------------------------------- image sheets

def tile(images, cols: int | None = None) -> np.ndarray:
    """Images (n, C, H, W) in [0, 1] -> one uint8 sheet: (rows*H, cols*W) for one channel,
    (rows*H, cols*W, C) for more. Image i sits at row i // cols, column i % cols; ``cols``
    defaults to ceil(sqrt(n)); cells past the last image stay black."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"images must be a non-empty batch (n, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)          # (n, C, H, W)
    sheet = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    sheet[:n] = pixels
    sheet = sheet.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2)           # (rows, H, cols, W, C)
    sheet = sheet.reshape(rows * h, cols * w, c).numpy()
    return sheet[:, :, 0] if c == 1 else sheet


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image (H, W) or (H, W, C) as PNG bytes, pixel for pixel."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def save_image(image: np.ndarray, path: str | Path, overwrite: bool = False) -> None:
    """Write a uint8 image (a :func:`tile` sheet, a :func:`latent_grid`) atomically as PNG."""
    refuse_existing(path, overwrite=overwrite)
    write_bytes_atomic(path, png_bytes(image))


class LatentGrid(NamedTuple):
    """A decoded grid: ``image`` (n*H, n*W[, C]) uint8, and the latent values it spans,
    ``z0`` left to right and ``z1`` bottom to top (row 0 of the image is the top, ``z1[1]``)."""

    image: np.ndarray
    z0: tuple[float, float]
    z1: tuple[float, float]


def latent_grid(model: nn.Module, codes, n: int = 15, percentiles: tuple[float, float] = (1, 99)) -> LatentGrid:
    """Decode an ``n`` x ``n`` grid of latent points spanning ``codes``' range, for a model
    whose latent has 2 numbers. ``codes`` (m, *model.latent_shape) are latents of real images
    (from :func:`aekit.inference.encode`); each axis runs from their ``percentiles[0]``-th to
    ``percentiles[1]``-th percentile, so a few stray codes do not stretch the grid. Column j
    decodes z[0] = the j-th value left to right; row i the i-th value of z[1] top to bottom,
    so the grid reads like a scatter plot of the codes with z[1] upwards."""
    latent_shape = tuple(model.latent_shape)
    if math.prod(latent_shape) != 2:
        raise ValueError(f"a latent grid needs a model whose latent has 2 numbers, this one has "
                         f"{latent_shape}; use a model with latent_dim=2")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n must be an integer of at least 2 (points per side), got {n!r}")
    z = _as_numpy(codes, f"codes (m, {', '.join(map(str, latent_shape))})", 1 + len(latent_shape)).reshape(-1, 2)
    if len(z) < 2:
        raise ValueError(f"codes must hold at least 2 latents to span a grid, got {len(z)}")
    low, high = np.percentile(z, percentiles, axis=0)                      # (2,), (2,)
    z0 = np.linspace(low[0], high[0], n)
    z1 = np.linspace(high[1], low[1], n)                                    # top row first
    points = np.stack(np.meshgrid(z0, z1), axis=-1).reshape(n * n, *latent_shape)  # row-major
    images = decode(model, torch.as_tensor(points, dtype=torch.float32))    # (n*n, C, H, W)
    return LatentGrid(tile(images, cols=n), (float(low[0]), float(high[0])), (float(low[1]), float(high[1])))


# --------------------------------------------------------------------- error histogram

ERROR_LABEL = "reconstruction error (mean squared error per image)"


def error_histogram_figure(errors, threshold: float | None, label: str = ERROR_LABEL):
    """Histogram of per-image errors or outlier scores (n,), with the outlier ``threshold``
    on them as a vertical line; ``label`` says what they are.

    Images with a score above the threshold are the flagged ones; the legend counts them.
    """
    plt = _figure_module()
    errors = _as_numpy(errors, "errors (n,)", 1)
    if len(errors) == 0:
        raise ValueError("errors is empty: there is no image to plot")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.hist(errors, bins=60, color="tab:blue", alpha=0.8)
    if threshold is not None:
        flagged = int((errors > threshold).sum())
        ax.axvline(threshold, color="tab:red", linestyle="--",
                   label=f"threshold {threshold:.4g}: {flagged} of {len(errors)} flagged "
                         f"({100 * flagged / len(errors):.1f}%)")
        ax.legend(fontsize=8, framealpha=1)
    ax.set_xlabel(label)
    ax.set_ylabel("images")
    fig.tight_layout()
    return fig


def save_error_histogram(errors, threshold: float | None, path: str | Path, overwrite: bool = False,
                         label: str = ERROR_LABEL) -> None:
    save_figure(error_histogram_figure(errors, threshold, label), path, overwrite)


__all__ = [
    "save_figure", "figure_png", "image_rows_figure", "image_row", "reconstruction_figure", "save_reconstructions",
    "denoising_figure", "save_denoising", "loss_curves_figure", "save_loss_curves", "project_2d",
    "latent_map_figure", "save_latent_map", "tile", "png_bytes", "save_image", "LatentGrid", "latent_grid",
    "error_histogram_figure", "save_error_histogram",
]
