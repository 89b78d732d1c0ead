"""The run folder: one training run's config, weights, history, metrics and figures.

::

    DIR/config.json              TrainConfig as JSON, plus the aekit version
    DIR/model.safetensors        the trained weights
    DIR/checkpoint.safetensors   weights + optimiser + progress after the last epoch (--resume)
    DIR/history.csv              epoch, loss, val_loss, val_mse, seconds, images_per_second
    DIR/metrics.json             test_mse, test_psnr, epochs, seconds, images_per_second, ...
    DIR/reconstructions.png      test originals above their reconstructions

Nothing here is pickled: weights and optimiser state are safetensors, the rest JSON/CSV.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import aekit
from aekit import data as data_lib
from aekit._io import atomic_path, write_text_atomic
from aekit.models import INITS, build_model
from aekit.streaming import STREAM_ABOVE_BYTES, ImageStream, float_bytes, open_stream
from aekit.training import (EpochRecord, TrainConfig, TrainState, evaluate, fit, make_optimizer,
                            resolve_device)

CONFIG, WEIGHTS, CHECKPOINT = "config.json", "model.safetensors", "checkpoint.safetensors"
HISTORY, METRICS, RECONSTRUCTIONS = "history.csv", "metrics.json", "reconstructions.png"
RUN_FILES = (CONFIG, WEIGHTS, CHECKPOINT, HISTORY, METRICS, RECONSTRUCTIONS)


log = logging.getLogger("aekit")


class RunError(ValueError):
    """A run folder that cannot be used as asked, with what to do about it."""


# --------------------------------------------------------------------------- data

def prepare_images(x: np.ndarray) -> torch.Tensor:
    """uint8/float images (n, H, W) or (n, H, W, C) -> float32 tensor (n, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(data_lib.to_nchw(data_lib.to_float(x))))


def load_split(config: TrainConfig, data: str | None = None) -> tuple[torch.Tensor | ImageStream, torch.Tensor | ImageStream, np.ndarray | None]:
    """The run's data: (x_train, x_test, y_test), with ``config.limit`` applied.

    Images are float32 tensors (n, C, H, W) in memory, or image streams of the same shape
    (:mod:`aekit.streaming`) when ``config.stream`` is set or the data would take more than
    :data:`~aekit.streaming.STREAM_ABOVE_BYTES` in memory; streams carry no labels.
    """
    source = data or config.data
    if config.stream or (float_bytes(source, config.resize) or 0) > STREAM_ABOVE_BYTES:
        if not config.stream:
            log.info("%s would take over %d MB in memory as float32: streaming it from disk",
                     source, STREAM_ABOVE_BYTES >> 20)
        x_train, x_test = open_stream(source, config.resize)
        if config.limit is not None:
            x_train, x_test = x_train.head(config.limit), x_test.head(config.limit)
        return x_train, x_test, None
    (x_train, _), (x_test, y_test) = data_lib.load_dataset(source, config.resize)
    if config.limit is not None:
        x_train, x_test = x_train[:config.limit], x_test[:config.limit]
        y_test = None if y_test is None else y_test[:config.limit]
    return prepare_images(x_train), prepare_images(x_test), y_test


def first_images(x: torch.Tensor | ImageStream, n: int) -> torch.Tensor:
    """The first ``n`` images of a tensor or a stream, as a tensor (n, C, H, W)."""
    return x[:n] if isinstance(x, torch.Tensor) else next(iter(x.batches(n)))


# ---------------------------------------------------------------------- save / load

def save_config(config: TrainConfig, workdir: Path) -> None:
    payload = {"aekit_version": aekit.__version__, **dataclasses.asdict(config)}
    write_text_atomic(workdir / CONFIG, json.dumps(payload, indent=2) + "\n")


def read_config(workdir: Path) -> TrainConfig:
    path = Path(workdir) / CONFIG
    if not path.is_file():
        raise RunError(f"{workdir}: not a run folder (no {CONFIG}); pass the --out folder of `aekit train`")
    try:
        payload = json.loads(path.read_text())
        payload.pop("aekit_version", None)
        return TrainConfig.from_dict(payload)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: unreadable run config ({exc}); restore it or train again") from None


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"aekit_version": aekit.__version__})


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"{path}: cannot read the weights ({exc}); the file is damaged, train again") from None
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise RunError(f"{path}: the weights do not match the model in {CONFIG}; the run folder is inconsistent")
    model.load_state_dict(state)


def load_model(workdir: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run folder, in eval mode, and its config."""
    workdir = Path(workdir)
    config = read_config(workdir)
    if config.image_shape is None:
        raise RunError(f"{workdir / CONFIG}: no image_shape recorded; the run never started training")
    if not (workdir / WEIGHTS).is_file():
        raise RunError(f"{workdir}: no {WEIGHTS} yet; finish the run with `aekit train --out {workdir} --resume`")
    model = build_model(config.model, config.image_shape)
    load_weights(model, workdir / WEIGHTS)
    return model.to(resolve_device(device)).eval(), config


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, path: Path) -> None:
    """Weights, Adam's moments and the loop's progress in one safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, param_state in optim["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {
        "format": "aekit-checkpoint-1",
        "state": json.dumps({**dataclasses.asdict(state), "best_val_loss": _finite_or_none(state.best_val_loss)}),
        "param_groups": json.dumps(optim["param_groups"]),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> TrainState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != "aekit-checkpoint-1":
            raise ValueError(f"unknown checkpoint format {metadata.get('format')!r}")
        raw = json.loads(metadata["state"])
        param_groups = json.loads(metadata["param_groups"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise RunError(f"{path}: cannot read the checkpoint ({exc}); start the run again with --overwrite") from None
    load_weights_from = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(load_weights_from)
    except RuntimeError as exc:
        raise RunError(f"{path}: checkpoint does not match the model ({exc})") from None
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": param_groups})
    raw["history"] = [EpochRecord(**row) for row in raw["history"]]
    raw["best_val_loss"] = math.inf if raw["best_val_loss"] is None else raw["best_val_loss"]
    return TrainState(**raw)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_history(history: list[EpochRecord], path: Path) -> None:
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(EpochRecord)]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in dataclasses.asdict(record).items()})
    write_text_atomic(path, buffer.getvalue())


# ------------------------------------------------------------------ the experiment

def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error ``mse``."""
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass
class RunResult:
    workdir: Path
    metrics: dict
    state: TrainState


def _check_workdir(workdir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse what the flags do not allow; return the run files an overwrite replaces.

    Writes nothing: the folder is only touched once the data and model are ready.
    """
    existing = [name for name in RUN_FILES if (workdir / name).exists()]
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other; pass one")
    if resume and not (workdir / CONFIG).exists():
        raise RunError(f"{workdir}: nothing to resume (no {CONFIG}); drop --resume to start a new run")
    if existing and not resume and not overwrite:
        raise RunError(
            f"{workdir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"{workdir} is a file, not a folder; choose another --out")
    return [] if resume else existing


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train ``config`` into the run folder ``workdir`` and evaluate on the test split.

    With ``resume``, the run's own config.json is used (``config.epochs``, when set, may
    extend it) and training continues from its last checkpoint.
    """
    workdir = Path(workdir)
    replaced = _check_workdir(workdir, resume, overwrite)
    if resume:
        saved = read_config(workdir)
        if config.epochs is not None and config.epochs != saved.epochs:
            saved = dataclasses.replace(saved, epochs=config.epochs)
        config = saved
    config = config.resolved()

    x_train, x_test, _ = load_split(config)
    config = dataclasses.replace(config, image_shape=tuple(x_train.shape[1:]))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.image_shape)
    INITS[config.init](model)
    model.to(device)
    optimizer = make_optimizer(model, config)
    state = None
    if resume and (workdir / CHECKPOINT).exists():
        state = load_checkpoint(model, optimizer, workdir / CHECKPOINT)
        state.stopped_early = False  # a longer --epochs may give early stopping another go
    for name in replaced:
        (workdir / name).unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)

    def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        save_checkpoint(model, optimizer, state, workdir / CHECKPOINT)
        write_history(state.history, workdir / HISTORY)

    state = fit(model, x_train, x_test, config, optimizer=optimizer, state=state,
                on_epoch_end=checkpoint, progress=progress)
    save_weights(model, workdir / WEIGHTS)
    write_history(state.history, workdir / HISTORY)

    result = evaluate(model, x_test, config.loss)
    seconds = sum(r.seconds for r in state.history)
    metrics = {
        "test_mse": result.mse,
        "test_psnr": psnr(result.mse),
        "test_loss": result.loss,
        "loss": config.loss,
        "epochs": state.epoch,
        "stopped_early": state.stopped_early,
        "collapsed": result.collapsed,
        "seconds": seconds,
        "images_per_second": (len(x_train) * len(state.history) / seconds) if seconds else None,
        "n_train": len(x_train),
        "n_test": len(x_test),
    }
    write_text_atomic(workdir / METRICS, json.dumps(metrics, indent=2) + "\n")
    from aekit.plots import save_reconstructions

    save_reconstructions(model, first_images(x_test, 10), workdir / RECONSTRUCTIONS)
    return RunResult(workdir=workdir, metrics=metrics, state=state)


def evaluate_run(workdir: str | Path, data: str | None = None, device: str = "cpu") -> dict:
    """Test-split metrics of a trained run, on its own data or on ``data``."""
    model, config = load_model(workdir, device)
    _, x_test, _ = load_split(config, data)
    if tuple(x_test.shape[1:]) != tuple(config.image_shape):
        raise RunError(
            f"the data's images are {tuple(x_test.shape[1:])} (C, H, W) but the run was trained on "
            f"{tuple(config.image_shape)}; pass data of the same size (or --resize)"
        )
    started = time.perf_counter()
    result = evaluate(model, x_test, config.loss)
    return {"test_mse": result.mse, "test_psnr": psnr(result.mse), "test_loss": result.loss,
            "loss": config.loss, "collapsed": result.collapsed, "n_test": len(x_test),
            "seconds": time.perf_counter() - started, "data": data or config.data}
