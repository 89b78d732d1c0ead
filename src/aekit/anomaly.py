"""Anomaly scoring with a fitted reconstructor: per-image scores and per-pixel error maps.

An image's outlier score is its model's (:meth:`aekit.models.Autoencoder.outlier_score`,
higher is more unusual): the reconstruction error unless the family scores otherwise. A
threshold is recorded with the name of the score it was taken on, and used only with it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from aekit._io import atomic_folder, refuse_existing, write_text_atomic


def recorded_threshold(model, threshold: float | None, score_name: str | None) -> float | None:
    """``threshold`` as recorded with a run (metrics.json, estimator.json) if it was taken on
    the outlier score ``model`` gives now, else None (derive it again). ``score_name`` is the
    recorded name of that score; None in runs from aekit 0.4 and before, which took every
    threshold on the reconstruction error."""
    from aekit.models import RECONSTRUCTION_ERROR, outlier_score_name

    same = (score_name or RECONSTRUCTION_ERROR) == outlier_score_name(model)
    return threshold if same else None


def run_threshold(run_dir: str | Path, contamination: float | None = None,
                  false_positive_rate: float | None = None, model=None) -> float:
    """The outlier-score threshold that flags a fraction ``contamination`` of a run's
    training images, or has a ``false_positive_rate`` on its test images.

    The images are the run's own split (its data, ``limit`` and ``resize``), read in
    batches, so a streamed run's data is never loaded whole. ``model`` is the run's
    trained model when the caller has it already.
    """
    from aekit.runs import load_split, read_config
    from aekit.weights import load_model
    from aekit.inference import outlier_scores, outlier_threshold

    if (contamination is None) == (false_positive_rate is None):
        raise ValueError("pass exactly one of contamination or false_positive_rate")
    config = read_config(run_dir)
    if model is None:
        model, _ = load_model(run_dir)
    x_train, x_test, _ = load_split(config)
    images, rate = (x_train, contamination) if contamination is not None else (x_test, false_positive_rate)
    return outlier_threshold(outlier_scores(model, images), rate)


def score_images(estimator, x: np.ndarray, names: list[str]) -> list[dict]:
    """One row per image: its reconstruction error, score (``score_samples``: the negative
    outlier score, higher = more normal) and verdict (outlier score above the threshold)."""
    errors, scores = estimator.reconstruction_error(x), estimator.score_samples(x)
    return [{"name": name, "reconstruction_error": float(err), "score": float(score),
             "is_outlier": bool(-score > estimator.threshold_)} for name, err, score in zip(names, errors, scores)]


def write_scores(rows: list[dict], path: str | Path, overwrite: bool = False) -> None:
    """The rows of :func:`score_images` as UTF-8 CSV; an existing ``path`` is replaced only
    with ``overwrite``. Names are written as :func:`csv_text` makes them safe."""
    refuse_existing(path, overwrite=overwrite)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["name", "reconstruction_error", "score", "is_outlier"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "name": csv_text(row["name"]),
                         "reconstruction_error": f"{row['reconstruction_error']:.6g}",
                         "score": f"{row['score']:.6g}", "is_outlier": int(row["is_outlier"])})
    write_text_atomic(path, buffer.getvalue())


# A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(name: str) -> str:
    """``name`` as a CSV cell that is valid UTF-8 and no formula.

    A file name that is not UTF-8 reaches aekit with its odd bytes as surrogate escapes
    (``os.fsdecode``); they are written as ``\\xNN`` (``caf\\xe9.png``), as Python's
    ``backslashreplace`` writes bytes. A name starting with ``= + - @``, a tab or a carriage
    return gets a leading ``'``, so a spreadsheet shows it instead of running it.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the file name's own bytes
    except UnicodeEncodeError:  # a surrogate that stands for no byte: not from a file name
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def error_heatmap(original: np.ndarray, reconstruction: np.ndarray, scale: float) -> np.ndarray:
    """One picture per image: original | reconstruction | squared error (inferno colours).

    ``original`` and ``reconstruction`` are (H, W) or (H, W, C) floats in [0, 1]; ``scale``
    is the squared error shown at full brightness, shared by all images so that maps
    compare. Small images are enlarged (nearest neighbour) to at least 112 pixels high.
    Returns uint8 (zH, z(3W + 4), 3) for a zoom z.
    """
    from matplotlib import colormaps

    def rgb(a):
        return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a

    err = (rgb(original) - rgb(reconstruction)) ** 2
    heat = colormaps["inferno"](np.clip(err.mean(axis=2) / scale, 0, 1))[..., :3]
    gap = np.ones((original.shape[0], 2, 3))
    row = np.concatenate([rgb(original), gap, rgb(reconstruction), gap, heat], axis=1)
    zoom = max(1, 112 // original.shape[0])
    row = row.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return np.round(row * 255).astype(np.uint8)


def write_heatmaps(estimator, x: np.ndarray, names: list[str], folder: str | Path,
                   overwrite: bool = False) -> Path:
    """A heatmap PNG per image into ``folder``, named as :func:`aekit.data.imagefiles.output_names`
    says (built under a temporary name, then renamed); an existing ``folder`` is replaced
    only with ``overwrite``."""
    refuse_existing(folder, overwrite=overwrite)
    from PIL import Image

    from aekit.data.imagefiles import output_names

    x_nchw = estimator._to_nchw(x)                        # (n, C, H, W) in [0, 1]
    originals = x_nchw.transpose(0, 2, 3, 1)              # (n, H, W, C)
    recon = estimator._reconstruct(x_nchw).transpose(0, 2, 3, 1)
    if originals.shape[-1] == 1:
        originals, recon = originals[..., 0], recon[..., 0]
    scale = max(float(np.quantile((originals - recon) ** 2, 0.999)), 1e-6)
    with atomic_folder(folder) as staging:
        for name, a, b in zip(output_names(names), originals, recon):
            Image.fromarray(error_heatmap(a, b, scale)).save(staging / name)
    return Path(folder)
