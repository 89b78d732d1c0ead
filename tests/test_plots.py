"""Figures: what each one draws is checked against the data it was given (NumPy references)."""

import numpy as np
import pytest
import torch
from PIL import Image

from aekit import plots
from aekit.progress import EpochRecord


def records(n=3):
    return [EpochRecord(epoch=i + 1, loss=0.3 / (i + 1), val_loss=0.25 / (i + 1), val_mse=0.05 / (i + 1),
                        seconds=1.0, images_per_second=100.0) for i in range(n)]


def written(path):
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    with Image.open(path) as img:
        return img.size


def test_loss_curves_plot_the_history(tmp_path):
    history = records()
    fig = plots.loss_curves_figure(history)
    left, right = fig.axes
    assert [list(line.get_ydata()) for line in left.lines] == [[r.loss for r in history],
                                                             [r.val_loss for r in history]]
    assert list(right.lines[0].get_ydata()) == [r.val_mse for r in history]
    assert list(left.lines[0].get_xdata()) == [1, 2, 3]
    path = tmp_path / "new" / "curves.png"  # the folder is created
    plots.save_loss_curves(history, path)
    assert written(path) == (900, 340)


def test_loss_curves_need_an_epoch():
    with pytest.raises(ValueError, match="history is empty"):
        plots.loss_curves_figure([])


def test_latent_map_of_2d_latents_plots_them_as_they_are(tmp_path, rng):
    z = rng.normal(size=(50, 2))
    labels = rng.integers(0, 3, 50)
    fig = plots.latent_map_figure(torch.from_numpy(z), labels)
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = np.concatenate([z[labels == k] for k in range(3)])
    np.testing.assert_allclose(points, expected)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    plots.save_latent_map(z, None, tmp_path / "map.png")
    written(tmp_path / "map.png")


def test_latent_map_projects_wider_latents_with_pca(rng):
    z = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    fig = plots.latent_map_figure(z)
    ax = fig.axes[0]
    assert ax.get_title().startswith("PCA of the 6-D latent") and ax.get_legend() is None
    # Reference: the first two principal components from NumPy's SVD (each up to its sign).
    centred = z - z.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T
    points = ax.collections[0].get_offsets()
    signs = np.sign((points * reference).sum(0))
    np.testing.assert_allclose(points * signs, reference, atol=1e-8)


def test_latent_map_with_many_labels_gets_a_colourbar(rng):
    fig = plots.latent_map_figure(rng.normal(size=(100, 2)), rng.uniform(size=100))
    assert len(fig.axes) == 2 and fig.axes[0].get_legend() is None  # the scatter and its colourbar


@pytest.mark.parametrize("latents, labels, message", [
    (np.zeros((4, 2, 2)), None, r"latents \(n, d\) must have 2 dimension"),
    (np.zeros((1, 3)), None, "at least 2 points"),
    (np.zeros((4, 2)), np.zeros(5), r"labels must have shape \(4,\)"),
])
def test_latent_map_errors(latents, labels, message):
    with pytest.raises(ValueError, match=message):
        plots.latent_map_figure(latents, labels)


def test_error_histogram_counts_and_marks_the_threshold(tmp_path, rng):
    errors = rng.gamma(2.0, 0.01, 500)
    threshold = float(np.quantile(errors, 0.97))
    fig = plots.error_histogram_figure(errors, threshold)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 500
    line = ax.lines[0]
    assert list(line.get_xdata()) == [threshold, threshold]
    flagged = int((errors > threshold).sum())
    assert f"{flagged} of 500 flagged" in ax.get_legend().get_texts()[0].get_text()
    plots.save_error_histogram(torch.from_numpy(errors), threshold, tmp_path / "hist.png")
    written(tmp_path / "hist.png")
    assert plots.error_histogram_figure(errors, None).axes[0].get_legend() is None


def test_error_histogram_errors():
    with pytest.raises(ValueError, match="empty"):
        plots.error_histogram_figure(np.zeros(0), 0.1)
    with pytest.raises(ValueError, match=r"errors \(n,\) must have 1 dimension"):
        plots.error_histogram_figure(np.zeros((3, 3)), 0.1)


def test_denoising_shows_three_rows_of_the_given_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    clean, noisy, denoised = (torch.rand(4, 1, 8, 8, generator=g) for _ in range(3))
    fig = plots.denoising_figure(clean, noisy, denoised)
    assert len(fig.axes) == 3  # one picture per row
    step = 8 + plots.GAP
    for ax, images in zip(fig.axes, (clean, noisy, denoised)):
        row = ax.images[0].get_array()
        assert row.shape == (8, 4 * step - plots.GAP, 4)
        for i in range(4):  # gray: red, green and blue each the image, opaque
            tile = row[:, i * step:i * step + 8]
            for channel in range(3):
                np.testing.assert_array_equal(tile[..., channel], images[i, 0].numpy())
            assert (tile[..., 3] == 1).all()
        assert (row[:, 8:step, 3] == 0).all()  # between two images: transparent
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["clean", "noisy input", "denoised"]
    plots.save_denoising(clean, noisy, denoised, tmp_path / "d.png")
    written(tmp_path / "d.png")
    with pytest.raises(ValueError, match="of one shape"):
        plots.denoising_figure(clean, noisy[:3], denoised)


def test_a_row_of_colour_images_keeps_their_channels():
    images = torch.rand(3, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    row = plots.image_row(images * 1.5 - 0.25)  # clipped to [0, 1], as every figure shows them
    step = 6 + plots.GAP
    shown = (images * 1.5 - 0.25).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
    for i in range(3):
        np.testing.assert_array_equal(row[:, i * step:i * step + 6, :3], shown[i])


def test_figure_png_is_a_png():
    data = plots.figure_png(plots.loss_curves_figure(records(1)))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
