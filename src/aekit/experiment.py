"""One experiment: how aekit trains a model on images, for ``aekit train`` and
``ConvAutoencoder().fit`` alike.

Both go through the same steps, with the same defaults (:class:`aekit.config.TrainConfig`)::

    plan(config, n)             epochs by the rule when unset, and how many images to hold out
    hold_out(images, held, s)   the images trained on, and those that choose the epoch
    train(model, config, ...)   aekit.training.fit, keeping the weights of the epoch with the
                                lowest loss on the held-out images when some are held out
    outlier threshold           on the training images' outlier scores (aekit.inference)

:func:`train_and_evaluate` does that into a run folder (:mod:`aekit.runs`, :mod:`aekit.weights`:
checkpoints after every epoch, resume, test metrics, figures), on data named by path or
built-in name; the estimator (:meth:`aekit.ConvAutoencoder.fit`) does it on arrays in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aekit import data as data_lib
from aekit import distributed
from aekit import models as models_lib
from aekit._io import folder_lock, make_folder, refuse_existing, remove_temporaries, sha256_file, write_text_atomic
from aekit.config import HELD_OUT_SHARE, TrainConfig, default_epochs, default_held_out, resolve_device
from aekit.data import ImageSource
from aekit.inference import evaluate, outlier_scores, outlier_threshold
from aekit.progress import TrainState
from aekit.runs import (CHECKPOINT, CONFIG, DERIVED_FILES, HISTORY, METRICS, RECONSTRUCTIONS, RUN_FILES,
                        RUNTIME_FIELDS, TRAINED_FILES, WEIGHTS, RunError, RunExists, check_image_shape, data_path,
                        load_split, read_config, run_data, save_config, write_history)
from aekit.start import make_optimizer, new_model
from aekit.training import fit
from aekit.weights import checkpoint_best, load_checkpoint, load_model, save_checkpoint, save_weights

DEFAULT_CONTAMINATION = 0.01  # fraction of training images an outlier threshold flags


# ------------------------------------------------------------------ the steps

def plan(config: TrainConfig, n_images: int) -> tuple[TrainConfig, int]:
    """(``config`` resolved, with ``epochs`` chosen by :func:`aekit.config.default_epochs` when
    unset; how many of the ``n_images`` training images to hold out to choose the epoch).

    Images are held out only when the rule chose the epochs and gave more than its minimum
    (:func:`aekit.config.default_held_out`); the rule then counts the images trained on.
    ``chosen`` records both rules in words."""
    config = config.resolved()
    if config.epochs is not None:
        return config, held_out_count(config, n_images)
    held = default_held_out(n_images, config.batch_size)
    epochs, rule = default_epochs(n_images - held, config.batch_size)
    chosen = {"epochs": rule}
    if held:
        chosen["held_out"] = (f"{held:,} of the {n_images:,} images ({HELD_OUT_SHARE:.0%}) held out, as the epoch "
                              "rule gave more than its minimum; the weights kept are the epoch's with the lowest "
                              "loss on them")
    return dataclasses.replace(config, epochs=epochs, chosen=chosen), held


def held_out_count(config: TrainConfig, n_images: int) -> int:
    """How many of ``n_images`` a planned ``config`` holds out (0 unless its plan chose to)."""
    return default_held_out(n_images, config.batch_size) if "held_out" in config.chosen else 0


def hold_out(images: ImageSource, held: int, seed: int) -> tuple[ImageSource, ImageSource]:
    """(the images trained on, the ``held`` images held out), drawn at random by ``seed``:
    the same on every rank and on every resume."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.take(order[held:]), images.take(order[:held])


def train(model: nn.Module, config: TrainConfig, x_train, x_val, keep_best: bool,
          on_epoch_end: Callable[[nn.Module, torch.optim.Optimizer, TrainState, dict | None], None] | None = None,
          optimizer: torch.optim.Optimizer | None = None, state: TrainState | None = None,
          best: dict[str, torch.Tensor] | None = None, progress: bool = True) -> TrainState:
    """:func:`aekit.training.fit`; with ``keep_best`` (images held out), ``model`` ends with
    the weights of the epoch with the lowest loss on ``x_val`` (``state.best_epoch``), not
    the last one's; then the model fits its outlier score to ``x_train``
    (:meth:`aekit.models.Autoencoder.fit_outlier_score`). ``best``: those weights so far,
    from a checkpoint. ``on_epoch_end`` (and Ctrl-C, mid-epoch) gets the model, the
    optimiser, the state and the best weights so far (None without ``keep_best``): what a
    checkpoint holds."""
    kept = {"weights": best}

    def epoch_end(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        if keep_best and state.best_epoch == state.epoch:  # this epoch's held-out loss is the lowest so far
            kept["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(model, optimizer, state, kept["weights"])

    def interrupted(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        if on_epoch_end is not None:
            on_epoch_end(model, optimizer, state, kept["weights"])

    state = fit(model, x_train, x_val, config, optimizer=optimizer, state=state, progress=progress,
                on_epoch_end=epoch_end, on_interrupt=interrupted)
    if keep_best and kept["weights"] is not None:
        model.load_state_dict(kept["weights"])
    models_lib.fit_outlier_score(model, x_train)  # on the final weights, before any threshold
    return state


# ------------------------------------------------------------------ into a run folder

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

    def __reduce__(self):  # a copy or pickle is this error again (see aekit._io.WriteError)
        return type(self), (self.workdir, self.field, self.given, self.recorded)


def resumed_config(workdir: str | Path, given: dict[str, object]) -> TrainConfig:
    """The config that continues the run in ``workdir``: its config.json, with the ``given``
    fields applied. ``epochs`` and ``device`` replace the run's; any other given field must
    equal the run's (recipe choices as the run resolved them), or :class:`ResumeMismatch`
    names it: a resumed run is never silently trained with other settings than it asked for.
    """
    workdir = Path(workdir)
    saved = read_config(workdir)
    given = dict(given)
    options = saved.model_params
    for name, value in given.pop("model_params", {}).items():  # compared option by option
        if name not in options or value != options[name]:
            raise ResumeMismatch(workdir, name, value, options.get(name))
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
    read it is refused (:func:`aekit.weights.load_checkpoint`).

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
    config, held = plan(config, len(x_train))  # a resumed run keeps the epochs it recorded
    # Validation as in the blog (validation_data=(x_test, x_test)), unless images are held out.
    x_fit, x_val = hold_out(x_train, held, config.seed) if held else (x_train, x_test)
    model = new_model(config, device)
    optimizer = make_optimizer(model, config)
    state = best = None
    if resume and (workdir / CHECKPOINT).exists():
        state = load_checkpoint(model, optimizer, workdir / CHECKPOINT, config, data)
        best = checkpoint_best(workdir / CHECKPOINT) if held else None
        state.stopped_early = False  # a longer --epochs may give early stopping another go
        if state.step and state.epoch >= config.epochs:
            raise RunError(f"{workdir / CHECKPOINT} stopped part-way through epoch {state.epoch + 1}; "
                           f"pass epochs={state.epoch + 1} or more to finish it")

    def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                   best: dict[str, torch.Tensor] | None) -> None:
        if main:
            claim.begin(config)
            save_checkpoint(model, optimizer, state, workdir / CHECKPOINT, config, data, best)
            claim.kept = True
            write_history(state.history, workdir / HISTORY)

    # A checkpoint after each epoch, and one at the very step where Ctrl-C stopped training.
    state = train(model, config, x_fit, x_val, keep_best=held > 0, on_epoch_end=checkpoint, optimizer=optimizer,
                  state=state, best=best, progress=progress)
    result = evaluate(model, x_test, config.loss)  # under DDP, every rank takes part
    threshold = outlier_threshold(outlier_scores(model, x_train), DEFAULT_CONTAMINATION)
    seconds = sum(r.seconds for r in state.history)
    metrics = {
        "test_mse": result.mse,
        "test_psnr": psnr(result.mse),
        "test_loss": result.loss,
        **{f"test_{name}": value for name, value in result.parts.items()},  # the objective's parts, if any
        "loss": config.loss,
        "epochs": state.epoch,
        "kept_epoch": state.best_epoch if held else state.epoch,  # whose weights the run holds
        "stopped_early": state.stopped_early,
        "collapsed": result.collapsed,
        "seconds": seconds,
        "images_per_second": (len(x_fit) * len(state.history) / seconds) if seconds else None,
        "n_train": len(x_fit),
        "n_held_out": held,
        "n_test": len(x_test),
        "contamination": DEFAULT_CONTAMINATION,
        "threshold": threshold,  # outlier threshold, from the training images' outlier scores
        "outlier_score": models_lib.outlier_score_name(model),  # what the threshold is on
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


def evaluate_run(workdir: str | Path, data: str | None = None, device: str = "auto",
                 resize: tuple[int, int] | None = None) -> dict:
    """Test-split metrics of a trained run, on its own data or on ``data`` (resized to
    ``resize``, by default as the run's own images were: :func:`aekit.runs.load_split`)."""
    model, config = load_model(workdir, device)
    _, x_test, _ = load_split(config, data, other_data=True, resize=resize)
    check_image_shape(x_test, config)
    started = time.perf_counter()
    result = evaluate(model, x_test, config.loss)
    return {"test_mse": result.mse, "test_psnr": psnr(result.mse), "test_loss": result.loss,
            "loss": config.loss, "collapsed": result.collapsed, "n_test": len(x_test),
            "seconds": time.perf_counter() - started, "data": data or config.data}
