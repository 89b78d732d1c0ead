"""The run folder: one training run's config, weights, history, metrics and figures.

::

    DIR/config.json              TrainConfig as JSON, plus the aekit version
    DIR/model.safetensors        the trained weights
    DIR/checkpoint.safetensors   weights + optimiser + progress after the last epoch, or at the
                                 step Ctrl-C stopped (--resume)
    DIR/history.csv              epoch, loss, val_loss, val_mse, seconds, images_per_second
    DIR/metrics.json             test_mse, test_psnr, epochs, seconds, images_per_second, ...
    DIR/reconstructions.png      test originals above their reconstructions

Nothing here is pickled: weights and optimiser state are safetensors, the rest JSON/CSV.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import reprlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import aekit
from aekit import data as data_lib
from aekit import distributed
from aekit._io import (AlreadyExists, atomic_path, folder_lock, make_folder, refuse_existing, remove_temporaries,
                       sha256_array, sha256_file, write_text_atomic)
from aekit.data import ImageSource, open_images
from aekit.inference import evaluate, outlier_threshold, reconstruction_errors
from aekit.models import MAX_IMAGE_VALUES
from aekit.training import (EpochRecord, TrainConfig, TrainState, fit, make_optimizer, model_for, new_model,
                            resolve_device)

CONFIG, WEIGHTS, CHECKPOINT = "config.json", "model.safetensors", "checkpoint.safetensors"
HISTORY, METRICS, RECONSTRUCTIONS = "history.csv", "metrics.json", "reconstructions.png"
DEFAULT_CONTAMINATION = 0.01  # fraction of training images an outlier threshold flags
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

def load_split(config: TrainConfig, data: str | None = None) -> tuple[ImageSource, ImageSource, np.ndarray | None]:
    """The run's data (its own, or ``data`` of the same kind): (x_train, x_test, y_test) as
    image sources, in memory or streamed as the run was (:func:`aekit.data.open_images`).
    The run's ``resize`` applies to other data only where resize does (image files)."""
    resize = config.resize if data is None or data_lib.detect(data).resizes else None
    return open_images(data or run_data(config), resize, config.stream, config.limit)


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


# ---------------------------------------------------------------------- save / load

FORMATS = {"weights": "aekit-weights-1", "checkpoint": "aekit-checkpoint-1"}
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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum of named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(sha256_array(tensor.reshape(-1).view(torch.uint8).numpy()).encode())
    return digest.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, kind: str, config: TrainConfig | None,
                  **metadata: str) -> None:
    """Write an aekit safetensors file atomically, with the metadata that lets it be checked."""
    metadata = {"format": FORMATS[kind], "aekit_version": aekit.__version__,
                "tensors_sha256": tensors_sha256(tensors), **metadata}
    if config is not None:
        metadata["config"] = json.dumps(dataclasses.asdict(config))
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # safetensors reports a full disk this way, not as OSError
            raise _as_os_error(exc) from None


def _as_os_error(exc: SafetensorError) -> OSError:
    found = re.search(r"os error (\d+)", str(exc))
    return OSError(int(found.group(1)), str(exc)) if found else OSError(str(exc))


def _load_tensors(path: Path, kind: str, config: TrainConfig | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an aekit safetensors file: version, format, checksum, and ``config``.

    Any damage (truncation, a flipped bit, another program's file, a config.json edited
    since) raises :class:`RunError` naming the file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{path}: cannot read the {kind} ({_first_line(exc)}); the file is damaged or "
                       f"truncated{_REMEDY[kind]}") from None
    check_version(metadata.get("aekit_version"), path)
    if metadata.get("format") != FORMATS[kind]:
        raise RunError(f"{path}: not an aekit {kind} file (format {reprlib.repr(metadata.get('format'))}, "
                       f"expected {FORMATS[kind]!r}){_REMEDY[kind]}")
    if metadata.get("tensors_sha256") != tensors_sha256(tensors):
        raise RunError(f"{path}: checksum mismatch: the {kind} file is damaged{_REMEDY[kind]}")
    tensors = {_current_name(name): tensor for name, tensor in tensors.items()}
    if config is not None:
        _check_same_config(metadata.get("config"), config, path, kind)
    return tensors, metadata


# Parameter names from before the encoder and decoder had those names (CompressAI's g_a and
# g_s, aekit 0.1): files written then load under today's names.
_RENAMED = {"g_a.": "encoder.", "g_s.": "decoder."}


def _current_name(name: str) -> str:
    """A weight's name in a file (``g_a.layers.0.weight``, ``model.g_s...`` in a checkpoint)
    as today's models name it."""
    prefix = "model." if name.startswith("model.") else ""
    for old, new in _RENAMED.items():
        if name.startswith(prefix + old):
            return prefix + new + name[len(prefix + old):]
    return name


_REMEDY = {"weights": "; finish the run (resume=True) or train it again (overwrite=True)",
           "checkpoint": "; start the run again with overwrite=True"}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_same_config(recorded_json: str | None, config: TrainConfig, path: Path, kind: str) -> None:
    try:
        recorded = json.loads(recorded_json or "")
    except (ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise RunError(f"{path}: no readable config recorded in the {kind}; the file is damaged{_REMEDY[kind]}")
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as recorded
    # A field an older aekit did not record has its default (e.g. "chosen": {}, "beta": None).
    recorded = {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), **recorded}
    for name in sorted(set(recorded) | set(current)):
        if name not in RUNTIME_FIELDS and recorded.get(name) != current.get(name):
            raise RunError(
                f"{path}: the {kind} was made with \"{name}\": {reprlib.repr(recorded.get(name))}, but the "
                f"run's {CONFIG} now says \"{name}\": {reprlib.repr(current.get(name))}; {CONFIG} was edited or "
                f"the data changed: restore {CONFIG}, or start a new run"
            )


def save_weights(model: nn.Module, path: Path, config: TrainConfig | None = None) -> None:
    """The model's weights, with its config inside so that a later load can check it."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_tensors(state, path, "weights", config)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise RunError(f"{path}: the weights do not match the model in {CONFIG}; the run folder is inconsistent")
    model.load_state_dict(state)


def load_model(workdir: str | Path, device: str = "auto") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run folder, in eval mode, and its config.

    Checks the folder first: a config.json from a newer aekit or no longer matching the
    weights, damaged weights, or weights other than those the run recorded in metrics.json
    each raise :class:`RunError`.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    if config.image_shape is None:
        raise RunError(f"{workdir / CONFIG}: no image_shape recorded; the run never started training")
    if not (workdir / WEIGHTS).is_file():
        raise RunError(f"{workdir}: no {WEIGHTS} yet; finish the run first (train it with resume=True)")
    _check_recorded_checksum(workdir)
    # The config the weights recorded is compared before a model is built from config.json.
    state, _ = _load_tensors(workdir / WEIGHTS, "weights", config)
    model = model_for(config)
    _load_state(model, state, workdir / WEIGHTS)
    return model.to(resolve_device(device)).eval(), config


def _check_recorded_checksum(workdir: Path) -> None:
    """model.safetensors must be the file whose sha256 the run recorded in metrics.json."""
    if not (workdir / METRICS).is_file():
        return  # the run stopped before its metrics; the weights' own checksum still holds
    try:
        recorded = json.loads((workdir / METRICS).read_bytes()).get("weights_sha256")
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        raise RunError(f"{workdir / METRICS}: unreadable ({_first_line(exc)}); repeat the run") from None
    if recorded is not None and recorded != sha256_file(workdir / WEIGHTS):
        raise RunError(f"{workdir / WEIGHTS} is not the file this run wrote (its sha256 differs from "
                       f"weights_sha256 in {METRICS}); it was replaced or damaged: restore it or repeat the run")


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, path: Path,
                    config: TrainConfig | None = None, data: dict[str, str] | None = None) -> None:
    """Weights, Adam's moments and the loop's progress in one safetensors file, with the
    fingerprints of the data trained on (``data``: split -> :func:`aekit.data.fingerprint`)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, param_state in optim["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    state_json = json.dumps({**dataclasses.asdict(state), "best_val_loss": _finite_or_none(state.best_val_loss)})
    extra = {} if data is None else {"data": json.dumps(data)}
    _save_tensors(tensors, path, "checkpoint", config, state=state_json,
                  param_groups=json.dumps(optim["param_groups"]), **extra)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                    config: TrainConfig | None = None, data: dict[str, str] | None = None) -> TrainState:
    """Restore ``model`` and ``optimizer`` from a checkpoint; return the loop's progress.
    With ``data`` (split -> :func:`aekit.data.fingerprint` of the data read now), refuse a
    checkpoint trained on other data (:func:`_check_same_data`)."""
    tensors, metadata = _load_tensors(path, "checkpoint", config)
    if data is not None:
        _check_same_data(metadata.get("data", "{}"), path, config, data)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
        raw = json.loads(metadata["state"])
        if isinstance(raw, dict) and raw.get("best_val_loss", 0.0) is None:
            raw["best_val_loss"] = math.inf
        return TrainState.from_dict(raw)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise RunError(f"{path}: the checkpoint does not fit this run ({_first_line(exc)}); "
                       "start the run again with overwrite=True") from None


def _check_same_data(raw: str, path: Path, config: TrainConfig, data: dict[str, str]) -> None:
    """Refuse to go on from the checkpoint ``path`` with data other than it was trained on:
    ``data`` (split -> fingerprint, as read now) must be what the checkpoint recorded in
    ``raw`` (its JSON). A checkpoint of aekit 0.3 or older recorded none: it goes on, as it
    did then."""
    try:
        recorded = json.loads(raw)
        changed = [split for split in sorted(set(recorded) & set(data)) if recorded[split] != data[split]]
    except (ValueError, TypeError, RecursionError):  # JSON that is not a {split: fingerprint} object
        raise RunError(f"{path}: no readable data record; the file is damaged{_REMEDY['checkpoint']}") from None
    if changed:
        split = changed[0]
        raise RunError(f"{run_data(config)} changed since the run read it: its {split} split was "
                       f"{recorded[split]}, and is now {data[split]}; put back the images the run was trained "
                       "on to resume it, or train a new run on these (overwrite=True, or another folder)")


def saved_progress(workdir: str | Path) -> tuple[int, int, int] | None:
    """(epochs completed, steps done of the next epoch, steps per epoch) in the run's
    checkpoint, or None without a readable one. Between epochs the steps done are 0."""
    try:
        with safe_open(str(Path(workdir) / CHECKPOINT), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get("state", "{}"))
        progress = tuple(state.get(key, 0) for key in ("epoch", "step", "steps_per_epoch"))
    except (SafetensorError, OSError, ValueError, AttributeError):
        return None
    return progress if all(isinstance(v, int) for v in progress) else None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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


# ------------------------------------------------------------------ the experiment

def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error ``mse``."""
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass
class RunResult:
    workdir: Path
    metrics: dict
    state: TrainState


class ResumeMismatch(RunError):
    """A resume asked to change the run's config field ``field`` from ``recorded`` to ``given``."""

    def __init__(self, workdir: Path, field: str, given: object, recorded: object):
        super().__init__(
            f"{workdir}: resume continues the run as it was configured, but {field}={given!r} differs "
            f"from the run's {field}={recorded!r}; leave {field} unset to keep the run's (only epochs and "
            f"device may change), or start a new run in another folder")
        self.workdir, self.field, self.given, self.recorded = workdir, field, given, recorded


def resumed_config(workdir: str | Path, given: dict[str, object]) -> TrainConfig:
    """The config that continues the run in ``workdir``: its config.json, with the ``given``
    fields applied. ``epochs`` and ``device`` replace the run's; any other given field must
    equal the run's (recipe choices as the run resolved them), or :class:`ResumeMismatch`
    names it: a resumed run is never silently trained with other settings than it asked for.
    """
    workdir = Path(workdir)
    saved = read_config(workdir)
    for name, value in given.items():
        recorded = getattr(saved, name)
        if name == "data" and value != recorded:  # the same data, named from wherever the resume runs
            value, recorded = data_path(value), data_path(run_data(saved))
        if name not in RUNTIME_FIELDS and value != recorded:
            raise ResumeMismatch(workdir, name, value, recorded)
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in RUNTIME_FIELDS})


def _set_fields(config: TrainConfig) -> dict[str, object]:
    """The fields of ``config`` that differ from ``TrainConfig()``'s defaults."""
    defaults = TrainConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(defaults, f.name)}


def _check_workdir(workdir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse what the flags do not allow; return the run files an overwrite replaces.

    Writes nothing: the run's files are only touched at its first checkpoint (:class:`_Claim`).
    """
    existing = [name for name in RUN_FILES + DERIVED_FILES if (workdir / name).exists()]
    if resume and overwrite:
        raise RunError("resume=True and overwrite=True contradict each other; pass one")
    if resume and not (workdir / CONFIG).exists():
        raise RunError(f"{workdir}: nothing to resume (no {CONFIG}); pass resume=False to start a new run")
    trained = [name for name in TRAINED_FILES if name in existing]
    if resume and trained and CHECKPOINT not in existing:
        raise RunError(f"{workdir} holds {', '.join(trained)} but no {CHECKPOINT}, which resume=True continues "
                       f"from; restore {CHECKPOINT}, or train the run again with overwrite=True")
    refuse_existing(*(workdir / name for name in existing), overwrite=overwrite or resume, what="a run",
                    other="resume=True to continue it", error=RunExists)
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"{workdir} is a file, not a folder; choose another folder")
    return [] if resume else existing


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train ``config`` into the run folder ``workdir`` and evaluate on the test split.

    With ``resume``, training continues from the run's last checkpoint with the run's own
    config.json: the fields of ``config`` left at their defaults (``TrainConfig()``'s) take
    the run's values, ``epochs`` and ``device`` when set replace them (extend the run, run it
    elsewhere), and any other field set to a value other than the run's raises
    :class:`ResumeMismatch` (see :func:`resumed_config`); data that changed since the run
    read it is refused (:func:`load_checkpoint`).

    One training at a time writes into a folder: another one there is refused while this
    one runs (:func:`aekit._io.folder_lock`). Nothing is written before the first
    checkpoint, so a training that fails before it leaves the folder as it found it.
    """
    workdir = Path(workdir)
    _check_workdir(workdir, resume, overwrite)  # every rank refuses alike, before any work
    if resume:
        config = resumed_config(workdir, _set_fields(config))
    else:  # where the data is, whichever folder a later resume or evaluate runs in
        config = dataclasses.replace(config, data=data_path(config.data))
    config = config.resolved()

    # Under torchrun every rank runs this function; only rank 0 writes (see aekit.distributed).
    device = distributed.setup(resolve_device(config.device))
    main = distributed.current().is_main
    with _claimed(workdir, main) as claim:
        if main:  # again, now that no other training can write here
            claim.replaced, claim.new = _check_workdir(workdir, resume, overwrite), not resume
        return _train(config, workdir, resume, device, claim, progress)


@dataclass
class _Claim:
    """A training's hold on its run folder (rank 0): what it made there, and how far it wrote."""

    workdir: Path
    made: list[Path]  # the folders it created, innermost first
    replaced: list[str] = dataclasses.field(default_factory=list)  # the files of the run it replaces
    new: bool = True  # a new run, not a resume
    began: bool = False  # config.json written, the replaced run's files removed
    kept: bool = False  # a checkpoint written: from here on the folder holds a run to resume

    def begin(self, config: TrainConfig) -> None:
        """The run's first writes, left until its first checkpoint, so that a training that
        fails before it (bad data, a refused stream, no memory) leaves nothing behind."""
        if self.began:
            return
        for name in self.replaced:
            (self.workdir / name).unlink(missing_ok=True)
        remove_temporaries(self.workdir, RUN_FILES)  # what a killed run left half-written
        save_config(config, self.workdir)
        self.began = True

    def undo(self) -> None:
        """The folder as it was before a training that ended before its first checkpoint."""
        if self.began and self.new:
            (self.workdir / CONFIG).unlink(missing_ok=True)
        for folder in self.made:
            with contextlib.suppress(OSError):  # not empty: something else is there now
                folder.rmdir()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def _claimed(workdir: Path, main: bool) -> Iterator[_Claim]:
    """The run folder, made if missing and held by rank 0 for the block; a block that ends
    (error or Ctrl-C) before its first checkpoint is undone (:meth:`_Claim.undo`). A Ctrl-C
    mid-epoch saves a checkpoint first, so that run stays, to be resumed."""
    claim = _Claim(workdir, _missing_folders(workdir) if main else [])
    if not main:
        yield claim
        return
    make_folder(workdir)
    holder = (f"another training (pid {os.getpid()} on {socket.gethostname()}, "
              f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')})")
    try:
        with folder_lock(workdir, holder):
            yield claim
    except BaseException:
        if not claim.kept:
            claim.undo()
        raise


def _train(config: TrainConfig, workdir: Path, resume: bool, device: torch.device, claim: _Claim,
           progress: bool) -> RunResult:
    """:func:`train_and_evaluate` once the folder is held: train, evaluate, write the run."""
    main = distributed.current().is_main
    with distributed.main_first():  # rank 0 fills the data cache; all ranks have checked workdir
        x_train, x_test, _ = load_split(config)
    data = {"train": data_lib.fingerprint(x_train), "test": data_lib.fingerprint(x_test)}
    config = dataclasses.replace(config, image_shape=tuple(x_train.shape[1:]),
                                 data_source=data_lib.data_source(run_data(config)))
    model = new_model(config, device)
    optimizer = make_optimizer(model, config)
    state = None
    if resume and (workdir / CHECKPOINT).exists():
        state = load_checkpoint(model, optimizer, workdir / CHECKPOINT, config, data)
        state.stopped_early = False  # a longer --epochs may give early stopping another go
        if state.step and state.epoch >= config.epochs:
            raise RunError(f"{workdir / CHECKPOINT} stopped part-way through epoch {state.epoch + 1}; "
                           f"pass epochs={state.epoch + 1} or more to finish it")

    def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        if main:
            claim.begin(config)
            save_checkpoint(model, optimizer, state, workdir / CHECKPOINT, config, data)
            claim.kept = True
            write_history(state.history, workdir / HISTORY)

    # A checkpoint after each epoch, and one at the very step where Ctrl-C stopped training.
    state = fit(model, x_train, x_test, config, optimizer=optimizer, state=state,
                on_epoch_end=checkpoint, on_interrupt=checkpoint, progress=progress)
    result = evaluate(model, x_test, config.loss)  # under DDP, every rank takes part
    threshold = outlier_threshold(reconstruction_errors(model, x_train), DEFAULT_CONTAMINATION)
    seconds = sum(r.seconds for r in state.history)
    metrics = {
        "test_mse": result.mse,
        "test_psnr": psnr(result.mse),
        "test_loss": result.loss,
        **{f"test_{name}": value for name, value in result.parts.items()},  # the objective's parts, if any
        "loss": config.loss,
        "epochs": state.epoch,
        "stopped_early": state.stopped_early,
        "collapsed": result.collapsed,
        "seconds": seconds,
        "images_per_second": (len(x_train) * len(state.history) / seconds) if seconds else None,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "contamination": DEFAULT_CONTAMINATION,
        "threshold": threshold,  # outlier threshold on per-image MSE, from the training errors
    }
    if main:
        metrics.update(model.test_metrics(x_test))  # the family's own test numbers (the VAE's likelihoods)
        claim.begin(config)  # done at the first checkpoint, unless no epoch was left to train
        save_weights(model, workdir / WEIGHTS, config)
        write_history(state.history, workdir / HISTORY)
        metrics["weights_sha256"] = sha256_file(workdir / WEIGHTS)
        write_text_atomic(workdir / METRICS, json.dumps(metrics, indent=2) + "\n")
        from aekit.plots import save_reconstructions

        save_reconstructions(model, x_test.first(10), workdir / RECONSTRUCTIONS, overwrite=True)  # the run's own
    return RunResult(workdir=workdir, metrics=metrics, state=state)


def evaluate_run(workdir: str | Path, data: str | None = None, device: str = "auto") -> dict:
    """Test-split metrics of a trained run, on its own data or on ``data``."""
    model, config = load_model(workdir, device)
    _, x_test, _ = load_split(config, data)
    check_image_shape(x_test, config)
    started = time.perf_counter()
    result = evaluate(model, x_test, config.loss)
    return {"test_mse": result.mse, "test_psnr": psnr(result.mse), "test_loss": result.loss,
            "loss": config.loss, "collapsed": result.collapsed, "n_test": len(x_test),
            "seconds": time.perf_counter() - started, "data": data or config.data}
