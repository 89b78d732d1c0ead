"""Escaping the curse of dimensionality, measured: the autoencoders against PCA.

For each latent size, fit each method on the training split and report the test
reconstruction error (per pixel, and summed over the pixels of an image as Hinton &
Salakhutdinov (2006) report it) and, where labels exist, the accuracy of a k-nearest-
neighbour classifier on the latents, beside kNN on the raw pixels. The methods: PCA,
``"autoencoder"`` (aekit's default model), and any model of :data:`aekit.models.MODELS` with
a latent size of its own (``"conv"``, ``"vae"``, ``"map"``, ...), each with its defaults.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aekit._io import refuse_existing, write_text_atomic
from aekit._typed import is_int
from aekit.data import limited, load_dataset
from aekit.estimator import ConvAutoencoder
from aekit.pca import PCAReconstructor

FIELDS = ("method", "latent_dim", "test_mse", "test_sse_per_image", "knn_accuracy", "fit_seconds")
OUTPUTS = {"csv": "compare.csv", "md": "compare.md", "png": "compare.png"}  # what write_comparison writes


@dataclass
class CompareConfig:
    data: str = "mnist"
    latent_dims: tuple[int, ...] = (2, 8, 16, 32, 64)
    epochs: int | None = None      # None: the estimator's rule (aekit.config.default_epochs)
    limit: int | None = None       # first N train and test images
    seed: int = 0
    knn_neighbors: int = 5
    knn_train: int = 10000         # training latents the kNN classifier keeps
    device: str = "auto"
    resize: tuple[int, int] | None = None
    methods: tuple[str, ...] = ("autoencoder", "pca")  # "autoencoder": aekit's default model

    def validate(self) -> None:
        choices = methods()
        unknown = [m for m in self.methods if m not in choices]
        if unknown or not self.methods or len(set(self.methods)) < len(self.methods):
            what = f"unknown method {unknown[0]!r}" if unknown else f"methods {', '.join(self.methods) or 'none'}"
            raise ValueError(f"{what}; expected distinct names from {', '.join(choices)}, "
                             "e.g. methods=('autoencoder', 'pca')")
        if not self.latent_dims or any(not is_int(d) or d < 1 for d in self.latent_dims):
            raise ValueError(f"latent_dims must be positive integers, got {self.latent_dims!r}; "
                             "e.g. latent_dims=(2, 8, 32)")
        if self.epochs is not None and (not is_int(self.epochs) or self.epochs < 1):
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")


def methods() -> tuple[str, ...]:
    """What :class:`CompareConfig` ``methods`` may name: PCA, aekit's default autoencoder, and
    every model that takes a latent size."""
    from aekit.models import MODELS

    return ("autoencoder", "pca", *(name for name, cls in MODELS.items() if "latent_dim" in cls.options))


def estimator(config: CompareConfig, method: str, latent_dim: int):
    """The estimator of ``method`` at one latent size; all answer the same verbs."""
    if method == "pca":
        return PCAReconstructor(latent_dim=latent_dim, random_state=config.seed)
    model = {} if method == "autoencoder" else {"model": method}
    return ConvAutoencoder(latent_dim=latent_dim, epochs=config.epochs, random_state=config.seed,
                           device=config.device, **model)


def _knn_accuracy(z_train, y_train, z_test, y_test, config: CompareConfig) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    n = min(config.knn_train, len(z_train))
    knn = KNeighborsClassifier(n_neighbors=config.knn_neighbors).fit(z_train[:n], y_train[:n])
    return float(knn.score(z_test, y_test))


def compare(config: CompareConfig, log=print) -> list[dict]:
    """Fit every method at every latent size; one row per (method, latent size)."""
    config.validate()
    (x_train, y_train), (x_test, y_test) = limited(load_dataset(config.data, config.resize), config.limit)
    pixels = int(np.prod(x_train.shape[1:]))
    labelled = y_train is not None and y_test is not None
    rows = []
    if labelled:
        flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
        rows.append({"method": "raw pixels", "latent_dim": pixels, "test_mse": 0.0, "test_sse_per_image": 0.0,
                     "knn_accuracy": _knn_accuracy(flat(x_train), y_train, flat(x_test), y_test, config),
                     "fit_seconds": 0.0})
    for latent_dim in config.latent_dims:
        for method in config.methods:
            est = estimator(config, method, latent_dim)
            started = time.perf_counter()
            est.fit(x_train)
            seconds = time.perf_counter() - started
            mse = float(est.reconstruction_error(x_test).mean())
            row = {"method": method, "latent_dim": latent_dim, "test_mse": mse,
                   "test_sse_per_image": mse * pixels, "fit_seconds": seconds,
                   "knn_accuracy": _knn_accuracy(est.transform(x_train), y_train, est.transform(x_test),
                                                 y_test, config) if labelled else None}
            rows.append(row)
            log(f"{method:>11} d={latent_dim:<4} test MSE {mse:.5f} (summed {mse * pixels:.2f})"
                + (f"  kNN {row['knn_accuracy']:.4f}" if labelled else "") + f"  {seconds:.0f} s")
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| method | latent dim | test MSE / pixel | squared error / image | kNN accuracy | fit s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        knn = "" if r["knn_accuracy"] is None else f"{r['knn_accuracy']:.4f}"
        lines.append(f"| {r['method']} | {r['latent_dim']} | {r['test_mse']:.5f} | {r['test_sse_per_image']:.2f} | "
                     f"{knn} | {r['fit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_comparison(rows: list[dict], out_dir: str | Path, title: str = "",
                     overwrite: bool = False) -> dict[str, Path]:
    """compare.csv, compare.md and compare.png in ``out_dir``; earlier ones are replaced
    only with ``overwrite``."""
    from matplotlib.ticker import NullLocator

    from aekit.plots import _figure_module, save_figure

    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in OUTPUTS.items()}
    refuse_existing(*paths.values(), overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(paths["csv"], buffer.getvalue())
    write_text_atomic(paths["md"], to_markdown(rows))

    plt = _figure_module()
    fig, (ax_mse, ax_knn) = plt.subplots(1, 2, figsize=(11.5, 4))
    for method, marker in zip(dict.fromkeys(r["method"] for r in rows if r["method"] != "raw pixels"),
                              "os^vD<>ph*"):
        sel = [r for r in rows if r["method"] == method]
        dims = [r["latent_dim"] for r in sel]
        ax_mse.plot(dims, [r["test_mse"] for r in sel], marker=marker, label=method)
        if sel and sel[0]["knn_accuracy"] is not None:
            ax_knn.plot(dims, [r["knn_accuracy"] for r in sel], marker=marker, label=method)
    raw = [r for r in rows if r["method"] == "raw pixels"]
    if raw:
        ax_knn.axhline(raw[0]["knn_accuracy"], color="gray", linestyle="--",
                       label=f"raw pixels ({raw[0]['latent_dim']} dims)")
    ax_mse.set(yscale="log", ylabel="test MSE per pixel", title="reconstruction error")
    ax_knn.set(ylabel="kNN accuracy", title="kNN on the latents")
    if not ax_knn.has_data():  # unlabeled data: nothing to classify
        ax_knn.text(0.5, 0.5, "no labels in the data:\nno kNN accuracy", ha="center", va="center",
                    transform=ax_knn.transAxes, color="gray")
    dims = sorted({r["latent_dim"] for r in rows if r["method"] != "raw pixels"})
    for ax in (ax_mse, ax_knn):
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("latent dimensions")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    handles, labels = [], []
    for ax in (ax_mse, ax_knn):  # one legend beside both panels, each method once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    save_figure(fig, paths["png"], overwrite=True)  # refused or allowed with the others above
    return paths
