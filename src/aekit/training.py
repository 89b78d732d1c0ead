"""Training: recipes, the loop, evaluation and checkpoints.

A *recipe* names a complete set of training choices (loss, initialisation, learning rate,
schedule, batch size, epochs). Two ship:

- ``blog``: the post as written. Keras' defaults (glorot_uniform kernels, zero biases,
  Adam lr 1e-3 / eps 1e-7), mean squared error, batch 128. On MNIST this stays on the
  blank-output plateau (test MSE 0.113, an all-black reconstruction), as the post's code does
  in Keras on every backend.
- ``default``: the same 4,385-parameter network trained with binary cross-entropy on the
  logits, He initialisation, batch 32 and a higher learning rate decayed to zero by a cosine
  schedule. See the README for the measurements behind each choice.

:func:`fit` is the plain PyTorch loop; :func:`train_and_evaluate` wraps it with data
loading and the run folder (see :mod:`aekit.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import reprlib
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aekit import distributed
from aekit.noise import add_noise, noise_generator, parse_noise

log = logging.getLogger("aekit")


@dataclass(frozen=True)
class Recipe:
    """A named set of training choices; every field can be overridden in TrainConfig."""

    loss: str
    init: str
    lr: float
    schedule: str
    batch_size: int
    epochs: int


RECIPES = {
    "blog": Recipe(loss="mse", init="keras", lr=1e-3, schedule="constant", batch_size=128, epochs=20),
    "default": Recipe(loss="bce", init="he", lr=3e-3, schedule="cosine", batch_size=32, epochs=20),
}
LOSSES = ("mse", "bce")
SCHEDULES = ("constant", "cosine")
ADAM_EPS = 1e-7  # Keras' default; PyTorch's is 1e-8


@dataclass
class TrainConfig:
    """Everything that defines a training run, saved as the run's config.json.

    Fields left ``None`` take the recipe's value when the config is resolved.
    """

    data: str = "mnist"
    model: str = "seed"
    latent_dim: int | None = None          # model "conv" only; the seed's latent is 8 x H/4 x W/4
    widths: tuple[int, ...] | None = None  # model "conv" only: encoder channels per level
    noise: str | None = None               # denoising: train on corrupted inputs, e.g. "gaussian:0.5"
    recipe: str = "default"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    loss: str | None = None
    init: str | None = None
    schedule: str | None = None
    seed: int = 0
    limit: int | None = None
    patience: int | None = None
    device: str = "auto"
    resize: tuple[int, int] | None = None
    image_shape: tuple[int, int, int] | None = field(default=None)  # (C, H, W), set from the data

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's values filled in and every field validated."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {sorted(RECIPES)}")
        recipe = dataclasses.asdict(RECIPES[self.recipe])
        filled = {k: (recipe[k] if getattr(self, k) is None and k in recipe else getattr(self, k))
                  for k in (f.name for f in dataclasses.fields(self))}
        config = TrainConfig(**filled)
        config.validate()
        return config

    def validate(self) -> None:
        from aekit.models import INITS, MODELS

        def positive(name: str, value, kind=int) -> None:
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")

        if self.model == "seed" and (self.latent_dim is not None or self.widths is not None):
            raise ValueError("the seed network's latent is fixed at 8 x H/4 x W/4; "
                             "use --model conv to choose --latent-dim or --widths")
        positive("epochs", self.epochs)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name, shape, size in (("resize", self.resize, 2), ("image_shape", self.image_shape, 3)):
            if shape is not None and (len(shape) != size or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
                raise ValueError(f"{name} must be {size} positive ints, got {shape!r}")
        positive("latent_dim", self.latent_dim)
        parse_noise(self.noise)
        positive("batch_size", self.batch_size)
        positive("limit", self.limit)
        positive("patience", self.patience)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1), got {self.lr!r}")
        for name, value, allowed in (("loss", self.loss, LOSSES), ("schedule", self.schedule, SCHEDULES),
                                     ("init", self.init, tuple(INITS)), ("model", self.model, tuple(MODELS))):
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if self.device != "auto":
            resolve_device(self.device)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From JSON-decoded ``data``, each field checked against its type (lists -> tuples)."""
        return from_plain(cls, data, "config")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use --device cpu")
    return device


# ------------------------------------------------------------------------- the loop

def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The recipe's learning rate at optimiser step ``step`` of ``total_steps``."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


def loss_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean per-pixel loss of reconstructing ``target`` from ``x``, both (n, C, H, W) in [0, 1].

    ``x`` is ``target`` itself, or a corrupted copy of it when training a denoiser.
    """
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(model.logits(x), target)
    return F.mse_loss(model(x), target)


@dataclass
class Evaluation:
    mse: float         # mean squared error per pixel, images in [0, 1]
    loss: float        # the training loss on the same images
    collapsed: bool    # reconstructions (near-)constant across images


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, loss: str = "mse", batch_size: int = 1000) -> Evaluation:
    """Reconstruction error of ``x`` (n, C, H, W) float in [0, 1], in batches.

    Under DDP each rank evaluates its part of ``x`` and the sums are all-reduced, so every
    rank must call it (it is a collective) and every rank gets the same result.
    """
    model.eval()
    device = next(model.parameters()).device
    ranks = distributed.current()
    sq_err = total_loss = 0.0
    recon_sum = torch.zeros(x.shape[1:], dtype=torch.float64)
    recon_sq = torch.zeros_like(recon_sum)
    first, stop = ranks.span(len(x))  # this rank's rows of x: all of them in one process
    for start in range(first, stop, batch_size):
        xb = x[start:min(start + batch_size, stop)].to(device, non_blocking=True)
        logits = model.logits(xb)
        recon = torch.sigmoid(logits)
        sq_err += F.mse_loss(recon, xb, reduction="sum").item()
        if loss == "bce":
            total_loss += F.binary_cross_entropy_with_logits(logits, xb, reduction="sum").item()
        recon64 = recon.double().cpu()
        recon_sum += recon64.sum(0)
        recon_sq += (recon64 ** 2).sum(0)
    if ranks.size > 1:
        sums = ranks.sum(torch.cat([torch.tensor([sq_err, total_loss], dtype=torch.float64),
                                    recon_sum.flatten(), recon_sq.flatten()]))
        sq_err, total_loss = sums[:2].tolist()
        recon_sum, recon_sq = sums[2:].view(2, *recon_sum.shape).unbind(0)
    n_values = x.numel()
    mse = sq_err / n_values
    # Collapse: every image decodes to (nearly) the same picture. Compare the spread of the
    # reconstructions across images with the spread of the inputs themselves.
    mean = recon_sum / len(x)
    recon_spread = (recon_sq / len(x) - mean ** 2).clamp_min(0).mean().sqrt().item()
    data_spread = x.double().std(0).pow(2).mean().sqrt().item() if len(x) > 1 else 0.0
    collapsed = len(x) > 1 and recon_spread < 0.05 * data_spread
    return Evaluation(mse=mse, loss=(total_loss / n_values) if loss == "bce" else mse, collapsed=collapsed)


@torch.inference_mode()
def reconstruction_errors(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Mean squared error of each image: ``x`` (n, C, H, W) in [0, 1] -> float64 (n,)."""
    model.eval()
    device = next(model.parameters()).device
    errors = [((model(xb.to(device)) - xb.to(device)) ** 2).flatten(1).mean(1).double().cpu()
              for xb in x.split(batch_size)]
    return torch.cat(errors).numpy() if errors else np.zeros(0)


def outlier_threshold(errors: np.ndarray, contamination: float) -> float:
    """The error above which a fraction ``contamination`` of ``errors`` lies."""
    if not 0 <= contamination < 0.5:
        raise ValueError(f"contamination must be in [0, 0.5), got {contamination!r}")
    return float(np.quantile(errors, 1.0 - contamination)) if contamination > 0 else float(np.max(errors))


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float
    val_mse: float
    seconds: float
    images_per_second: float


@dataclass
class TrainState:
    """What a checkpoint holds beside the weights and the optimiser."""

    epoch: int = 0                                   # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        state = from_plain(cls, data, "state")
        if state.epoch < 0 or state.epochs_since_best < 0 or len(state.history) != state.epoch:
            raise ValueError(f"inconsistent progress: epoch {state.epoch}, {len(state.history)} history rows")
        return state


def from_plain(cls, data: object, where: str):
    """``cls(**data)`` for JSON-decoded ``data``, every field checked against its type hint.

    Lists become tuples where the field is a tuple, nested dataclasses are built the same
    way; a missing, unknown or mistyped field raises ValueError naming it.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown fields {reprlib.repr(unknown)}; was it made by a newer aekit?")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _conform(value, hints[name], f"{where}.{name}") for name, value in data.items()})


def _conform(value: object, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # only Optional[X] is used
        return _conform(value, hint, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):
        return tuple(_conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_conform(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list and isinstance(value, list):
        return [_conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    name = ("a list" if Ellipsis in args else f"a list of {len(args)} values") if origin is tuple \
        else getattr(hint, "__name__", str(hint))
    raise ValueError(f"{where} must be {name}, got {reprlib.repr(value)}")


COLLAPSE_HINT = (
    "the reconstructions are nearly constant: every image decodes to the same picture "
    "(the blank-output plateau of sigmoid + MSE). Training on will not leave it; "
    "use --recipe default (binary cross-entropy, He init) or --loss bce"
)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=ADAM_EPS)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a pure function of (seed, epoch), so resuming
    a run at an epoch boundary replays exactly the same batches."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[nn.Module, torch.optim.Optimizer, TrainState], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train ``model`` to reconstruct ``x_train`` (n, C, H, W) float32 in [0, 1].

    Validates on ``x_val`` after each epoch (the seed's ``validation_data=(x_test, x_test)``),
    stops early when ``config.patience`` epochs pass without a better val_loss, and calls
    ``on_epoch_end`` (e.g. to write a checkpoint). Pass ``optimizer`` and ``state`` from a
    checkpoint to continue a run.
    """
    from tqdm.auto import tqdm

    config.validate()
    device = next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, config)
    state = state or TrainState()
    n = len(x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model.to(memory_format=memory_format)
    # The whole data set lives on the device as one tensor when it is not already there.
    x_train = x_train.to(device)
    x_val = x_val.to(device)
    ranks = distributed.current()  # 1 of 1 unless launched by torchrun: see aekit.distributed
    train_model = ranks.wrap(model)
    progress = progress and ranks.is_main

    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch
        model.train()
        shuffled = x_train[epoch_permutation(config.seed, epoch, n).to(device)]  # (n, C, H, W)
        bar = tqdm(total=n, unit="img", disable=not progress, leave=True,
                   desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True)
        loss_sum = torch.zeros((), device=device)
        noise = parse_noise(config.noise)
        generator = noise_generator(config.seed, epoch, device) if noise is not None else None
        started = time.perf_counter()
        for step in range(steps_per_epoch):
            xb = shuffled[step * config.batch_size:(step + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch * steps_per_epoch + step, total_steps)
            x_in = xb if noise is None else add_noise(xb, noise, generator)  # the same on every rank
            rows, weight = ranks.share(xb)  # this rank's rows of the global batch xb
            inputs, _ = ranks.share(x_in)
            loss = loss_fn(train_model, inputs, rows, config.loss) * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(xb)
            if progress and (step % 50 == 0 or step == steps_per_epoch - 1):
                bar.update(min(n, (step + 1) * config.batch_size) - bar.n)
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum.item() / bar.n:.4f}", img_s=f"{bar.n / elapsed:,.0f}")
        loss_sum = ranks.mean(loss_sum)
        seconds = time.perf_counter() - started
        result = evaluate(model, x_val, config.loss)
        record = EpochRecord(epoch=epoch + 1, loss=loss_sum.item() / n, val_loss=result.loss,
                             val_mse=result.mse, seconds=seconds, images_per_second=n / seconds)
        if progress:
            bar.set_postfix(loss=f"{record.loss:.4f}", val_loss=f"{record.val_loss:.4f}",
                            img_s=f"{record.images_per_second:,.0f}")
        bar.close()
        state.history.append(record)
        state.epoch = epoch + 1
        if result.collapsed:
            log.warning("epoch %d: %s", epoch + 1, COLLAPSE_HINT)
        if record.val_loss < state.best_val_loss:
            state.best_val_loss, state.epochs_since_best = record.val_loss, 0
        else:
            state.epochs_since_best += 1
            if config.patience is not None and state.epochs_since_best >= config.patience:
                state.stopped_early = True
                log.warning("epoch %d: val_loss has not improved for %d epochs; stopping early",
                            epoch + 1, config.patience)
        if on_epoch_end is not None:
            on_epoch_end(model, optimizer, state)
    model.to(memory_format=torch.contiguous_format)
    return state


__all__ = ["Recipe", "RECIPES", "TrainConfig", "TrainState", "EpochRecord", "Evaluation",
           "fit", "evaluate", "reconstruction_errors", "outlier_threshold", "learning_rate", "loss_fn", "resolve_device", "make_optimizer",
           "epoch_permutation", "COLLAPSE_HINT"]
