"""The run folder's tensor files: model.safetensors (the trained weights) and
checkpoint.safetensors (weights, Adam's moments, the loop's progress, and the best epoch's
weights when images are held out to choose it).

Each is written atomically with metadata that lets a load check it: a format name, the
aekit version, a checksum of every tensor, and the run's config (compared with config.json
on load, but for :data:`aekit.runs.RUNTIME_FIELDS`); a checkpoint also records the
fingerprints of the data it was trained on. Any damage raises :class:`aekit.runs.RunError`
naming the file. The folder's other files are :mod:`aekit.runs`'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import aekit
from aekit._io import atomic_path, sha256_array, sha256_file
from aekit.config import TrainConfig, resolve_device
from aekit.progress import TrainState
from aekit.runs import (CHECKPOINT, CONFIG, METRICS, RUNTIME_FIELDS, WEIGHTS, RunError, _first_line, check_version,
                        read_config, run_data)
from aekit.start import model_for

FORMATS = {"weights": "aekit-weights-1", "checkpoint": "aekit-checkpoint-1"}


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


_REMEDY = {"weights": "; finish the run (resume=True) or train it again (overwrite=True)",
           "checkpoint": "; start the run again with overwrite=True"}

def _check_same_config(recorded_json: str | None, config: TrainConfig, path: Path, kind: str) -> None:
    try:
        recorded = json.loads(recorded_json or "")
    except (ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise RunError(f"{path}: no readable config recorded in the {kind}; the file is damaged{_REMEDY[kind]}")
    try:  # as a TrainConfig reads it: an older aekit's fields as today's, those it did not record at their default
        recorded = _as_recorded(TrainConfig.from_dict({**_as_recorded(TrainConfig()), **recorded}))
    except (TypeError, ValueError):
        raise RunError(f"{path}: the config recorded in the {kind} is not a valid config; the file is "
                       f"damaged{_REMEDY[kind]}") from None
    current = _as_recorded(config)
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
    """``model.load_state_dict(state)``, strict: every tensor and only those, each of its shape
    (a family may fill in what an older aekit did not save, in its ``_load_from_state_dict``)."""
    try:
        model.load_state_dict(state)
    except RuntimeError:  # missing or unexpected keys, or another shape
        raise RunError(f"{path}: the weights do not match the model in {CONFIG}; the run folder is inconsistent") \
            from None


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


__all__ = ["FORMATS", "tensors_sha256", "save_weights", "load_model", "save_checkpoint", "load_checkpoint",
           "checkpoint_best", "saved_progress"]
