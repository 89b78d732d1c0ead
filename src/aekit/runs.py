"""The run folder: one training run's config, weights, history, metrics and figures.

::

    DIR/config.json              TrainConfig as JSON, plus the aekit version
    DIR/model.safetensors        the trained weights
    DIR/checkpoint.safetensors   weights + optimiser + progress after the last epoch, or at the
                                 step Ctrl-C stopped (--resume); and the best epoch's weights
                                 when images are held out to choose it
    DIR/history.csv              epoch, loss, val_loss, val_mse, seconds, images_per_second
    DIR/metrics.json             test_mse, test_psnr, epochs, seconds, images_per_second, ...
    DIR/reconstructions.png      test originals above their reconstructions

This module names those files and reads and writes the JSON and CSV ones (config.json,
history.csv, metrics.json) and the run's data; :mod:`aekit.weights` the safetensors ones,
:mod:`aekit.experiment` trains into them. Nothing is pickled: weights and optimiser state
are safetensors, the rest JSON/CSV. Every file is written to a temporary name and renamed
into place.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
import reprlib
from pathlib import Path

import numpy as np
import torch

import aekit
from aekit import data as data_lib
from aekit._io import AlreadyExists, write_text_atomic
from aekit.config import TrainConfig
from aekit.data import ImageSource, open_images
from aekit.models import MAX_IMAGE_VALUES
from aekit.progress import EpochRecord

CONFIG, WEIGHTS, CHECKPOINT = "config.json", "model.safetensors", "checkpoint.safetensors"
HISTORY, METRICS, RECONSTRUCTIONS = "history.csv", "metrics.json", "reconstructions.png"
RUN_FILES = (CONFIG, WEIGHTS, CHECKPOINT, HISTORY, METRICS, RECONSTRUCTIONS)
TRAINED_FILES = (WEIGHTS, HISTORY, METRICS)  # what only epochs trained write, after the checkpoint
# What other aekit calls write into a run folder about its weights (ConvAutoencoder.save,
# aekit report, aekit export): a run trained anew over the folder (--overwrite) removes
# them with its own files, so that none describes weights that are gone.
DERIVED_FILES = ("estimator.json", "report.html", "encoder.onnx", "decoder.onnx", "model.onnx")


log = logging.getLogger("aekit")


class RunError(ValueError):
    """A run folder that cannot be used as asked, with what to do about it."""


class RunExists(RunError, AlreadyExists):
    """A run folder's files that a writer would replace without ``overwrite=True``."""


# --------------------------------------------------------------------------- data

def load_split(config: TrainConfig, data: str | None = None, *, other_data: bool = False,
               resize: tuple[int, int] | None = None) -> tuple[ImageSource, ImageSource, np.ndarray | None]:
    """The run's data (its own, or ``data`` of the same kind): (x_train, x_test, y_test) as
    image sources, in memory or streamed as the run was (:func:`aekit.data.open_images`).
    The run's ``resize`` applies to other data only where resize does (image files); a
    ``resize`` given applies to ``data`` instead (the run's own is read as the run read it).

    Where a run that has read its data (``config.data_source`` recorded) no longer finds it at
    its path, the error says so, and, for a caller that takes ``data`` (``other_data``), that
    it can name where it is now."""
    own = run_data(config)
    if data is None and config.data_source and not data_lib.is_builtin(own) and not Path(own).exists():
        where = ", or pass data=PATH to read it where it is now" if other_data else ""
        raise data_lib.DataError(f"{own}: the run's data is no longer there (its config.json records where the "
                                 f"run read it); move it back{where}")
    if resize is not None and data is None:
        raise ValueError(f"resize={tuple(resize)} applies to other data (data=PATH); the run's own images are read "
                         "as the run read them")
    if data is None:
        return open_images(own, config.resize, config.stream, config.limit)
    resize = other_images_resize(config, data_lib.detect(data).resizes, resize)
    return open_images(data, resize, config.stream, config.limit)


def other_images_resize(config: TrainConfig, resizes: bool, resize: tuple[int, int] | None = None
                        ) -> tuple[int, int] | None:
    """The (H, W) to resize images other than the run's own to, for its model: ``resize``
    when given, else the run's own ``resize`` where the images' format resizes (image files;
    ``resizes``, :attr:`aekit.data.Format.resizes`), else None."""
    if resize is not None or not resizes or config.resize is None:
        return resize
    return tuple(config.resize)


def data_path(data: str) -> str:
    """``data`` as a run records it: a built-in's name as it is, a path made absolute and
    resolved, so that the run finds it again from any folder."""
    return data if data_lib.is_builtin(data) else str(Path(data).resolve())


def is_own_data(config: TrainConfig, data: str) -> bool:
    """Whether ``data``, named from the current folder, is the run's own data."""
    return data_path(data) == data_path(run_data(config))


def run_data(config: TrainConfig) -> str:
    """Where the run's own data is: ``config.data``, or, for a run of aekit 0.3 or older that
    recorded a relative path as given, the absolute path it recorded in ``data_source``."""
    recorded = config.data_source or ""
    if data_lib.is_builtin(config.data) or Path(config.data).is_absolute() or not Path(recorded).is_absolute():
        return config.data
    return recorded


# ---------------------------------------------------------------------- config.json

# The config fields a run may change while keeping its weights: --epochs extends a run on
# --resume, the device is only where it ran, and data_source where the data was found (a
# resumed run may find the same built-in data set in another cache; that it is the same
# data, the checkpoint's fingerprint of it says: load_checkpoint). Every other field must
# match the config recorded inside the weights and the checkpoint.
RUNTIME_FIELDS = ("epochs", "device", "data_source")


def check_version(made_by: object, source: str | Path) -> None:
    """Refuse what a newer aekit wrote: it may hold what this version cannot read correctly."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", made_by) if isinstance(made_by, str) else None
    if found is None:
        raise RunError(f"{source}: no aekit version recorded (got {reprlib.repr(made_by)}); "
                       "it was not written by aekit, or it was edited: train again")
    if tuple(map(int, found.groups())) > _installed_version():
        raise RunError(f"{source} was made by aekit {made_by}, this is aekit {aekit.__version__}; "
                       "upgrade aekit (pip install -U aekit) to use it")


def _installed_version() -> tuple[int, int, int]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)\.(\d+)", aekit.__version__).groups())


def save_config(config: TrainConfig, workdir: Path) -> None:
    payload = {"aekit_version": aekit.__version__, **dataclasses.asdict(config)}
    write_text_atomic(workdir / CONFIG, json.dumps(payload, indent=2) + "\n")


def read_config(workdir: Path) -> TrainConfig:
    """The run's TrainConfig, checked: made by this aekit or an older one, every field valid."""
    path = Path(workdir) / CONFIG
    if not path.is_file():
        raise RunError(f"{workdir}: not a run folder (no {CONFIG}); pass the folder a run was trained into")
    payload = read_json_object(path, "run config", "config fields", "restore it or train again")
    check_version(payload.pop("aekit_version", None), path)
    try:
        config = TrainConfig.from_dict(payload)
        resolved = config.resolved()
    except (TypeError, ValueError) as exc:
        raise RunError(f"{path}: invalid run config ({exc}); restore it or train again") from None
    if resolved != config:  # a run records every choice its recipe made
        missing = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(resolved, f.name)]
        raise RunError(f"{path}: {', '.join(missing)} missing (null); restore it or train again")
    # No run was trained on larger images than aekit builds a model for: an edited or damaged config.
    if config.image_shape is not None and math.prod(config.image_shape) > MAX_IMAGE_VALUES:
        raise RunError(f"{path}: image_shape {list(config.image_shape)} is {math.prod(config.image_shape):,} values "
                       f"per image, more than aekit builds models for ({MAX_IMAGE_VALUES:,}); {CONFIG} was edited "
                       "or damaged: restore it or train again")
    return config


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def write_history(history: list[EpochRecord], path: Path) -> None:
    """One row per epoch: EpochRecord's fields, then one column per named loss part."""
    buffer = io.StringIO()
    parts = sorted({name for record in history for name in record.parts})
    fields = [f.name for f in dataclasses.fields(EpochRecord) if f.name != "parts"] + parts
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in history:
        row = {**dataclasses.asdict(record), **record.parts}
        del row["parts"]
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def read_history(workdir: str | Path) -> list[EpochRecord]:
    """The epochs of a run folder's history.csv, as written by :func:`write_history`."""
    path = Path(workdir) / HISTORY
    if not path.is_file():
        raise RunError(f"{workdir}: no {HISTORY}; the run has not finished an epoch, train it first")
    named = {f.name for f in dataclasses.fields(EpochRecord)} - {"parts"}
    try:
        with open(path, newline="") as f:  # every column is a float but the epoch number
            rows = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return [EpochRecord(**{k: v for k, v in row.items() if k in named},
                            parts={k: v for k, v in row.items() if k not in named}) for row in rows]
    except (OSError, KeyError, TypeError, ValueError, AttributeError, csv.Error) as exc:  # a short row gives None
        raise RunError(f"{path}: unreadable history ({_first_line(exc)}); restore it or train again") from None


def read_metrics(workdir: str | Path) -> dict:
    """A run folder's metrics.json, as written at the end of :func:`train_and_evaluate`."""
    path = Path(workdir) / METRICS
    if not path.is_file():
        raise RunError(f"{workdir}: no {METRICS}; the run has not finished, "
                       "complete it first (train it with resume=True)")
    return read_json_object(path, "metrics", "metrics", "restore it or train the run again")


def read_json_object(path: Path, what: str, holding: str, fix: str) -> dict:
    """The JSON object in ``path``; anything else (damage, not UTF-8, nesting too deep, not
    an object) is a one-line :class:`RunError` naming the file, ``what`` it is and the ``fix``."""
    try:
        payload = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise RunError(f"{path}: unreadable {what} ({_first_line(exc)}); {fix}") from None
    if not isinstance(payload, dict):
        raise RunError(f"{path}: expected a JSON object of {holding}, got {type(payload).__name__}; {fix}")
    return payload


def check_image_shape(x: torch.Tensor, config: TrainConfig) -> None:
    """Refuse images (n, C, H, W) whose (C, H, W) differ from those the run was trained on."""
    if tuple(x.shape[1:]) != tuple(config.image_shape):
        raise RunError(
            f"the data's images are {tuple(x.shape[1:])} (C, H, W) but the run was trained on "
            f"{tuple(config.image_shape)}; pass data of the same size (or resize=(H, W))"
        )
