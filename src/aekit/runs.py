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

This module reads and writes those files; :mod:`aekit.experiment` trains into them.
Nothing here is pickled: weights and optimiser state are safetensors, the rest JSON/CSV.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import reprlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import aekit
from aekit import data as data_lib
from aekit._io import AlreadyExists, atomic_path, sha256_array, sha256_file, write_text_atomic
from aekit.config import TrainConfig, resolve_device
from aekit.data import ImageSource, open_images
from aekit.models import MAX_IMAGE_VALUES
from aekit.training import EpochRecord, TrainState, model_for

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
    # A run records every choice its recipe made; an option of the model that a run of aekit
    # 0.3 left out (null) was built at the family's default, as it is now.
    if dataclasses.replace(resolved, model_params=config.model_params) != config:
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


def _as_recorded(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as a file holds them


def _comparable(config: TrainConfig) -> dict:
    """``config`` as recorded, its model's options complete: a run of aekit 0.3 that left an
    option out was built with the family's default, as the run is now."""
    try:
        config = dataclasses.replace(config, model_params=config.options())
    except ValueError:  # an unknown model or option: compared as written, and refused by name
        pass
    return _as_recorded(config)


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
    try:  # as a TrainConfig reads it: an older aekit's fields as today's, those it did not record at their default
        recorded = _comparable(TrainConfig.from_dict({**_as_recorded(TrainConfig()), **recorded}))
    except (TypeError, ValueError):
        raise RunError(f"{path}: the config recorded in the {kind} is not a valid config; the file is "
                       f"damaged{_REMEDY[kind]}") from None
    current = _comparable(config)
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
                    config: TrainConfig | None = None, data: dict[str, str] | None = None,
                    best: dict[str, torch.Tensor] | None = None) -> None:
    """Weights, Adam's moments and the loop's progress in one safetensors file, with the
    fingerprints of the data trained on (``data``: split -> :func:`aekit.data.fingerprint`)
    and, for a run that keeps its best epoch, that epoch's weights (``best``, as
    :func:`checkpoint_best` reads them)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in (best or {}).items()})
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


def checkpoint_best(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of the best epoch so far that the checkpoint ``path`` holds (see
    :func:`aekit.experiment.train`), or None: checked as :func:`load_checkpoint` checks."""
    tensors, _ = _load_tensors(path, "checkpoint", None)
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return best or None


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
