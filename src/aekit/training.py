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

import copy
import dataclasses
import json
import logging
import math
import reprlib
import signal
import threading
import time
import types
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aekit import distributed
from aekit.data import DataError, epoch_permutation, prepare_images
from aekit.models import cpu_cores, map_chunks
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
    stream: bool = False  # read the data from disk batch by batch (aekit.streaming)
    image_shape: tuple[int, int, int] | None = field(default=None)  # (C, H, W), set from the data
    data_source: str | None = None  # set by the run: where `data` was found (aekit.data.data_source)

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
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be true or false, got {self.stream!r}")
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


# ------------------------------------------------------------------------- the data

def _training_images(x, name: str):
    """``fit``'s ``x_train`` or ``x_val`` as a tensor (n, C, H, W) or an image stream."""
    if isinstance(x, np.ndarray):
        if x.ndim == 4 and x.shape[-1] not in (1, 3):
            raise ValueError(f"fit: {name} is a numpy array of shape {x.shape}; numpy images must be "
                             "(n, H, W) or (n, H, W, C) with C 1 or 3, as aekit.data.load_dataset gives them: "
                             "pass channels-first images as a float tensor (n, C, H, W)")
        try:
            x = prepare_images(x)
        except DataError as exc:
            raise ValueError(f"fit: {name}: {exc}") from None
    elif isinstance(x, torch.Tensor):
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"fit: {name} must be a float tensor (n, C, H, W) in [0, 1], got shape "
                             f"{tuple(x.shape)} {x.dtype}; aekit.training.prepare_images converts numpy images")
    elif not (hasattr(x, "batches") and hasattr(x, "shape")):
        raise TypeError(f"fit: {name} must be images: a numpy array (n, H, W) or (n, H, W, C), a float tensor "
                        f"(n, C, H, W) or an image stream (aekit.streaming), got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"fit: {name} holds no images")
    return x


def _check_trainable(model: nn.Module, loss: str) -> torch.device:
    """The device of a model ``fit`` can train (see its docstring), or a one-line error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}")
    if not trainable(model):
        raise ValueError("fit: the model has no parameters to train (none, or none with requires_grad)")
    devices = sorted({str(t.device) for t in (*model.parameters(), *model.buffers())})
    if len(devices) > 1:
        raise ValueError(f"fit: the model's parameters are on {len(devices)} devices ({', '.join(devices)}); "
                         "fit trains on one: move the model there with model.to(device)")
    if loss == "bce" and not callable(getattr(model, "logits", None)):
        raise TypeError("fit: loss='bce' needs model.logits(x), the outputs before the sigmoid (n, C, H, W), "
                        "with forward(x) = sigmoid(logits(x)); add that method, or pass loss='mse'")
    return next(model.parameters()).device


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


def _in_order(x, batch_size: int):
    """Batches of ``x`` (a tensor (n, C, H, W) or an image stream) in order."""
    if isinstance(x, torch.Tensor):
        return (x[start:start + batch_size] for start in range(0, len(x), batch_size))
    return x.batches(batch_size)


@torch.inference_mode()
def evaluate(model: nn.Module, x, loss: str = "mse", batch_size: int = 1000) -> Evaluation:
    """Reconstruction error of ``x`` (n, C, H, W) float in [0, 1], in batches.

    ``x`` is a tensor or an image stream (:mod:`aekit.streaming`). The reconstructions are
    ``model(x)``, or ``sigmoid(model.logits(x))`` for ``loss="bce"``, which also needs the
    logits. Under DDP each rank evaluates its part of a tensor and the sums are
    all-reduced, so every rank must call it (it is a collective) and every rank gets the
    same result; a stream is read whole by every rank.
    """
    model.eval()
    device = next(model.parameters()).device
    ranks = distributed.current()
    split = ranks.size > 1 and isinstance(x, torch.Tensor)
    sq_err = total_loss = 0.0
    recon_sum = torch.zeros(x.shape[1:], dtype=torch.float64)
    recon_sq = torch.zeros_like(recon_sum)
    data_sum = torch.zeros_like(recon_sum)
    data_sq = torch.zeros_like(recon_sum)
    if split:
        first, stop = ranks.span(len(x))  # this rank's rows of x
        batches = (x[start:min(start + batch_size, stop)] for start in range(first, stop, batch_size))
    else:
        batches = _in_order(x, batch_size)
    for xb in batches:
        xb = xb.to(device, non_blocking=True)
        if loss == "bce":
            logits = map_chunks(model.logits, xb) if device.type == "cpu" else model.logits(xb)
            recon = torch.sigmoid(logits)
            total_loss += F.binary_cross_entropy_with_logits(logits, xb, reduction="sum").item()
        else:
            recon = map_chunks(model, xb) if device.type == "cpu" else model(xb)
        sq_err += F.mse_loss(recon, xb, reduction="sum").item()
        recon64, data64 = recon.double().cpu(), xb.double().cpu()
        recon_sum += recon64.sum(0)
        recon_sq += (recon64 ** 2).sum(0)
        data_sum += data64.sum(0)
        data_sq += (data64 ** 2).sum(0)
    if split:
        sums = ranks.sum(torch.cat([torch.tensor([sq_err, total_loss], dtype=torch.float64),
                                    recon_sum.flatten(), recon_sq.flatten(), data_sum.flatten(),
                                    data_sq.flatten()]))
        sq_err, total_loss = sums[:2].tolist()
        recon_sum, recon_sq, data_sum, data_sq = sums[2:].view(4, *recon_sum.shape).unbind(0)
    n = len(x)
    n_values = n * math.prod(x.shape[1:])
    mse = sq_err / n_values
    # Collapse: every image decodes to (nearly) the same picture. Compare the spread of the
    # reconstructions across images with the spread of the inputs themselves.
    mean = recon_sum / n
    recon_spread = (recon_sq / n - mean ** 2).clamp_min(0).mean().sqrt().item()
    data_var = (data_sq - data_sum ** 2 / n).clamp_min(0) / max(n - 1, 1)  # unbiased, as std(0)
    data_spread = data_var.mean().sqrt().item() if n > 1 else 0.0
    collapsed = n > 1 and recon_spread < 0.05 * data_spread
    return Evaluation(mse=mse, loss=(total_loss / n_values) if loss == "bce" else mse, collapsed=collapsed)


def image_errors(reconstructions, images) -> np.ndarray:
    """The per-image error, as aekit means it everywhere (the outlier threshold in
    metrics.json, ``score``, the estimators' ``reconstruction_error``, the report): the
    mean over pixels of (reconstruction - image)², in float64, reconstructions clipped to
    [0, 1]. Both (n, C, H, W) (or any (n, ...)), tensors or arrays -> float64 (n,)."""
    recon = torch.as_tensor(reconstructions).detach().to("cpu", torch.float64).clamp(0.0, 1.0)
    target = torch.as_tensor(images).detach().to("cpu", torch.float64)
    return ((recon - target) ** 2).flatten(1).mean(1).numpy()


@torch.inference_mode()
def reconstruction_errors(model: nn.Module, x, batch_size: int = 1000) -> np.ndarray:
    """:func:`image_errors` of ``model``'s reconstructions of ``x`` (n, C, H, W) in [0, 1], a
    tensor or an image stream -> float64 (n,)."""
    model.eval()
    device = next(model.parameters()).device
    errors = [image_errors(model(xb.to(device)), xb) for xb in _in_order(x, batch_size)]
    return np.concatenate(errors) if errors else np.zeros(0)


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
    """What a checkpoint holds beside the weights and the optimiser.

    Between epochs ``step``, ``loss_sum`` and ``seconds`` are 0. A state that :func:`fit`
    hands to ``on_interrupt`` is part-way through epoch ``epoch + 1``: its first ``step``
    batches are trained, with the summed loss ``loss_sum`` and the time ``seconds`` so far
    (on rank 0 of a DDP run, that rank's rows); the shuffle, the noise and the learning rate
    of the batches left follow from (seed, epoch, step), so training goes on exactly.
    Checkpoints from before these fields load as a state between epochs.
    """

    epoch: int = 0                                   # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    stopped_early: bool = False
    step: int = 0                                    # batches done of epoch `epoch + 1`
    steps_per_epoch: int = 0                         # of the run that saved it (0: unknown)
    loss_sum: float = 0.0                            # those batches' summed loss
    seconds: float = 0.0                             # and their time

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        state = from_plain(cls, data, "state")
        if state.epoch < 0 or state.epochs_since_best < 0 or len(state.history) != state.epoch:
            raise ValueError(f"inconsistent progress: epoch {state.epoch}, {len(state.history)} history rows")
        if not 0 <= state.step <= state.steps_per_epoch:
            raise ValueError(f"inconsistent progress: step {state.step} of {state.steps_per_epoch}")
        return state

    def finish_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        self.epoch, self.step, self.loss_sum, self.seconds = record.epoch, 0, 0.0, 0.0


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
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ValueError(f"{where} must be a number a float can hold, got {reprlib.repr(value)}") from None
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    name = ("a list" if Ellipsis in args else f"a list of {len(args)} values") if origin is tuple \
        else getattr(hint, "__name__", str(hint))
    raise ValueError(f"{where} must be {name}, got {reprlib.repr(value)}")


COLLAPSE = ("the reconstructions are nearly constant: every image decodes to the same picture "
            "(the blank-output plateau of sigmoid + MSE). Training on will not leave it")
COLLAPSE_HINT = f'{COLLAPSE}; use recipe="default" (binary cross-entropy, He init) or loss="bce"'


class CollapseWarning(UserWarning):
    """:func:`fit` saw nearly constant reconstructions after epoch ``epoch`` (once per fit)."""

    def __init__(self, epoch: int):
        super().__init__(f"epoch {epoch}: {COLLAPSE_HINT}")
        self.epoch = epoch


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with Keras' epsilon; the fused kernel where PyTorch has one for the device.

    Fused Adam is the same update in one kernel per step instead of a dozen small ops per
    parameter (measured: 3-6% of a CPU training step, bench/RESULTS.md).
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=ADAM_EPS, fused=fused)


# Images per forward/backward pass on the CPU. A pass over 32 MNIST images keeps the
# largest activations (n, 16, 28, 28) in the core's cache; from 64 on they spill and each
# image costs 1.6-1.7x as much (bench/RESULTS.md). Larger batches are cut into such chunks.
CPU_MICRO_BATCH = 32


def default_micro_batch(device: torch.device, batch_size: int) -> int:
    """Chunk size for :func:`train_step`: :data:`CPU_MICRO_BATCH` on the CPU, the whole
    batch elsewhere (a GPU wants large passes)."""
    return min(batch_size, CPU_MICRO_BATCH) if device.type == "cpu" else batch_size


def default_workers(device: torch.device, batch_size: int, micro_batch: int, model: nn.Module) -> int:
    """Threads for :class:`ChunkPool`: one per core, at most one per chunk; 1 off the CPU
    and for models with buffers."""
    if device.type != "cpu" or any(True for _ in model.buffers()):
        return 1
    return max(1, min(cpu_cores(), math.ceil(batch_size / micro_batch)))


def train_step(model: nn.Module, x_in: torch.Tensor, target: torch.Tensor, loss: str,
               optimizer: torch.optim.Optimizer, micro_batch: int, pool: ChunkPool | None = None,
               weight: float = 1.0) -> torch.Tensor:
    """One optimiser step: reconstruct ``target`` (n, C, H, W) from ``x_in`` (``target``
    itself, or a corrupted copy when training a denoiser); returns the summed loss, detached.

    The batch is processed in chunks of ``micro_batch`` images, their gradients summed in
    a fixed order. The batch's mean loss is the sum over chunks k of (n_k / n) times chunk
    k's mean loss, so the gradient is the one of a single pass over the whole batch, up to
    float rounding: the same step, computed in a cache-friendly order. With a ``pool`` the
    chunks run side by side and the sum is the same, bit for bit. ``weight`` scales the
    gradient (DDP: this rank's share of the global batch, see aekit.distributed).
    """
    n = len(target)
    chunks = list(zip(x_in.split(micro_batch), target.split(micro_batch)))
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=target.device)
    if pool is None or len(chunks) == 1:
        for chunk_in, chunk_target in chunks:
            chunk_loss = loss_fn(model, chunk_in, chunk_target, loss)
            scale = weight * len(chunk_target) / n
            (chunk_loss if scale == 1 else chunk_loss * scale).backward()
            total += chunk_loss.detach() * len(chunk_target)
    else:
        results = pool.gradients(chunks, loss, n, weight)
        grads = list(results[0][1])
        for _, chunk_grads in results[1:]:
            for grad, more in zip(grads, chunk_grads):
                grad += more                      # the order backward() accumulates in
        for param, grad in zip(trainable(model), grads):
            param.grad = grad
        for chunk_total, _ in results:
            total += chunk_total
    optimizer.step()
    return total


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class ChunkPool:
    """Threads that compute the gradients of a batch's chunks side by side, on the CPU.

    Each thread runs its own copy of the model whose parameters share the model's memory
    (an optimiser step is seen by all) and returns each chunk's gradients, which
    :func:`train_step` adds in chunk order, as backward() adds them when the chunks run one
    after another. Run with one PyTorch thread (``fit`` sets it), so the result is the same
    bit for bit for any number of workers.

    Why not PyTorch's own threads: they meet at a barrier in every operation, about a
    thousand a step. On a machine busy with other work one of them is often descheduled
    and the other waits: measured 10x slower with 2 threads than with 1 on 2 busy cores.
    These threads meet once a step.
    """

    def __init__(self, model: nn.Module, workers: int):
        if any(True for _ in model.buffers()):
            raise ValueError("ChunkPool shares parameters only; a model with buffers (e.g. batch norm) "
                             "needs workers=1")
        self.model, self.workers = model, workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="aekit-step")
        self._local = threading.local()

    def _replica(self) -> nn.Module:
        replica = getattr(self._local, "replica", None)
        if replica is None:
            replica = copy.deepcopy(self.model)
            for mine, theirs in zip(replica.parameters(), self.model.parameters()):
                mine.data = theirs.data       # the same memory: no copy, no syncing
            self._local.replica = replica
        return replica.train(self.model.training)

    def gradients(self, chunks: list[tuple[torch.Tensor, torch.Tensor]], loss: str, n: int,
                  weight: float = 1.0):
        """[(chunk's summed loss, chunk's gradients)] in chunk order, for (input, target)
        chunks; ``n`` images in the batch."""
        def one(chunk: tuple[torch.Tensor, torch.Tensor]):
            replica = self._replica()
            chunk_in, chunk_target = chunk
            chunk_loss = loss_fn(replica, chunk_in, chunk_target, loss)
            grads = torch.autograd.grad(chunk_loss * (weight * len(chunk_target) / n), trainable(replica))
            return chunk_loss.detach() * len(chunk_target), grads

        return list(self._pool.map(one, chunks))

    def close(self) -> None:
        self._pool.shutdown()


class PoolOrNot:
    """Decides, while training runs, whether steps go faster on a :class:`ChunkPool` or on
    one thread, and follows the machine's load.

    The choice does not change the result (the pool adds gradients in the order one thread
    does), so it may follow timings: every ``period`` steps, ``probe`` steps run each way
    and the faster way (by median step time) runs until the next probe. On 2 cores shared
    with other work one thread often wins; on an idle machine the pool does.
    """

    def __init__(self, probe: int = 8, period: int = 400):
        self.probe, self.period = probe, period
        self.step, self.use_pool = 0, True
        self.seconds: dict[bool, list[float]] = {False: [], True: []}

    def pool_now(self) -> bool:
        phase = self.step % self.period
        return phase >= self.probe if phase < 2 * self.probe else self.use_pool

    def record(self, used_pool: bool, seconds: float) -> None:
        phase = self.step % self.period
        if phase < 2 * self.probe:
            self.seconds[used_pool].append(seconds)
        if phase == 2 * self.probe - 1:
            median = {way: sorted(times)[len(times) // 2] for way, times in self.seconds.items()}
            self.use_pool = median[True] < median[False]
            self.seconds = {False: [], True: []}
        self.step += 1


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter optimiser tensor (Adam's moments) its parameter's strides.

    Needed after changing the model's memory format or loading a checkpoint: PyTorch's
    fused CPU Adam walks parameter and state memory in lockstep, so a channels_last
    parameter with a contiguous ``exp_avg`` gets a wrong update (measured: off by 0.03 after
    three steps at lr 1e-2), where the unfused Adam is only slower.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


class HeldInterrupts:
    """Ctrl-C held back while the loop changes the model, the optimiser and the state
    together (:meth:`hold` ... :meth:`release`), so that it lands between two steps.

    Between :meth:`install` and :meth:`restore`, SIGINT inside such a stretch is remembered
    and raised as KeyboardInterrupt by :meth:`release`; anywhere else, and a second Ctrl-C
    at any time, it raises at once, as usual. It only takes over from Python's own handler,
    in the main thread (elsewhere signals cannot be handled); where it does not, an
    interrupt lands where it lands and ``busy`` says whether that was mid-step.
    """

    def __init__(self):
        self.busy = self.pending = self._installed = False

    def install(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def restore(self) -> None:
        """Python's own handler back."""
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def _on_sigint(self, signum, frame) -> None:
        if self.busy and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    def hold(self) -> None:
        self.busy = True

    def release(self) -> None:
        """End a held stretch: the model, optimiser and state agree again."""
        self.busy = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def shuffled_batches(x, batch_size: int, seed: int, epoch: int, device: torch.device):
    """Epoch ``epoch``'s batches of ``x``: a tensor on ``device`` is shuffled by
    :func:`epoch_permutation`, a stream by its own chunked shuffle (:mod:`aekit.streaming`)."""
    if isinstance(x, torch.Tensor):
        shuffled = x[epoch_permutation(seed, epoch, len(x)).to(device)]  # (n, C, H, W)
        return (shuffled[start:start + batch_size] for start in range(0, len(x), batch_size))
    return (xb.to(device, non_blocking=True) for xb in x.batches(batch_size, seed, epoch))


def fit(
    model: nn.Module,
    x_train,
    x_val,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[nn.Module, torch.optim.Optimizer, TrainState], None] | None = None,
    on_interrupt: Callable[[nn.Module, torch.optim.Optimizer, TrainState], None] | None = None,
    progress: bool = True,
    micro_batch: int | None = None,
    workers: int | None = None,
) -> TrainState:
    """Train ``model`` to reconstruct the images ``x_train``; ``config``'s fields left None
    take its recipe's values (``fit(model, x_train, x_val, TrainConfig(epochs=5))``).

    ``x_train`` and ``x_val`` are each a numpy array in the loaders' layout, (n, H, W) or
    (n, H, W, C), uint8 or float in [0, 1] (converted by :func:`prepare_images`); a float
    tensor (n, C, H, W) in [0, 1]; or an image stream (:mod:`aekit.streaming`). Images in
    memory are moved to the model's device once, a stream is read batch by batch.

    What ``model`` must provide (checked first, with a one-line error naming ``fit``):

    - it is an ``nn.Module`` with parameters to train, all on one device (fit trains there
      and leaves them there);
    - ``forward(x)``: (n, C, H, W) -> reconstructions (n, C, H, W) in [0, 1];
    - ``logits(x)``: the same before the sigmoid, ``forward(x) == sigmoid(logits(x))``, for
      ``loss="bce"`` (the default recipe's).

    On the CPU fit trains it channels_last and gives it back contiguous, also when
    training fails.

    Validates on ``x_val`` after each epoch (the seed's ``validation_data=(x_test, x_test)``),
    stops early when ``config.patience`` epochs pass without a better val_loss, and calls
    ``on_epoch_end`` (e.g. to write a checkpoint). Pass ``optimizer`` and ``state`` from a
    checkpoint to continue a run.

    Ctrl-C (KeyboardInterrupt) lands between two steps: a step that has begun is finished
    first (in the main thread of a single process; under DDP an interrupt mid-step saves
    nothing). Then ``on_interrupt`` gets the model, the optimiser and the state at that
    step (``state.step`` batches of epoch ``state.epoch + 1`` done), if training got past
    where this call started, and the KeyboardInterrupt goes on. Continuing from them
    (e.g. a checkpoint) trains the rest of the epoch exactly as if it had not stopped.

    ``micro_batch`` (default: :func:`default_micro_batch`)
    sets how many images go through the network at once, ``workers`` (default:
    :func:`default_workers`, and then :class:`PoolOrNot` picks between them and one thread
    as the machine's load changes) how many threads run chunks side by side
    (:class:`ChunkPool`); they change the speed, not the step.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig, got {type(config).__name__}")
    config = config.resolved()
    device = _check_trainable(model, config.loss)
    x_train, x_val = _training_images(x_train, "x_train"), _training_images(x_val, "x_val")
    optimizer = optimizer or make_optimizer(model, config)
    state = state or TrainState()
    n = len(x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if micro_batch is None:
        micro_batch = default_micro_batch(device, config.batch_size)
    elif isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch <= 0:
        raise ValueError(f"micro_batch must be a positive number of images, got {micro_batch!r}; "
                         "leave it None for the device's default")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0):
        raise ValueError(f"workers must be a positive number of threads, got {workers!r}; "
                         "leave it None for one per core")
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model.to(memory_format=memory_format)  # back to contiguous in the finally below
    match_state_layout(optimizer)
    # Data in memory lives on the device as one tensor when it is not already there.
    if isinstance(x_train, torch.Tensor):
        x_train = x_train.to(device)
    if isinstance(x_val, torch.Tensor):
        x_val = x_val.to(device)
    ranks = distributed.current()  # 1 of 1 unless launched by torchrun: see aekit.distributed
    train_model = ranks.wrap(model)
    progress = progress and ranks.is_main
    if ranks.size > 1:
        # DDP all-reduces in every backward(): one pass per rank and step, no chunk threads.
        micro_batch, workers = config.batch_size, 1

    choose = workers is None  # by default, let PoolOrNot pick pool or one thread as load changes
    if workers is None:
        workers = default_workers(device, config.batch_size, micro_batch, model)
    pool = ChunkPool(model, workers) if workers > 1 else None
    chooser = PoolOrNot() if pool is not None and choose else None
    threads = torch.get_num_threads()
    if pool is not None:
        torch.set_num_threads(1)  # one PyTorch thread per worker: see ChunkPool
    noise = parse_noise(config.noise)
    if state.step and state.steps_per_epoch != steps_per_epoch:
        raise ValueError(f"fit: state is part-way through an epoch of {state.steps_per_epoch} steps, but "
                         f"x_train and batch_size make {steps_per_epoch}; continue with the same data and batch_size")
    if state.step and state.epoch >= config.epochs:
        raise ValueError(f"fit: state is part-way through epoch {state.epoch + 1}, but config.epochs is "
                         f"{config.epochs}; pass epochs={state.epoch + 1} or more to finish it")
    state.steps_per_epoch = steps_per_epoch
    began = (state.epoch, state.step)
    interrupts = HeldInterrupts()
    collapse_warned = False
    try:
        if ranks.size == 1:  # under DDP, a rank that held Ctrl-C could wait on one that did not
            interrupts.install()
        while state.epoch < config.epochs and not state.stopped_early:
            epoch, done = state.epoch, state.step  # `done` batches trained before an interrupt
            model.train()
            batches = shuffled_batches(x_train, config.batch_size, config.seed, epoch, device)
            bar = tqdm(total=n, initial=min(n, done * config.batch_size), unit="img", disable=not progress,
                       leave=True, desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True)
            # This rank's summed loss and the time so far: 0, or where an interrupted run stopped.
            loss_sum = torch.tensor(state.loss_sum if ranks.is_main else 0.0, device=device)
            generator = noise_generator(config.seed, epoch, device) if noise is not None else None
            started = time.perf_counter() - state.seconds
            for step, xb in enumerate(batches):
                if step < done:  # trained before: draw its noise again, so that the rest match
                    if generator is not None:
                        add_noise(xb, noise, generator)
                    continue
                interrupts.hold()  # until the step is taken and counted
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, epoch * steps_per_epoch + step, total_steps)
                x_in = xb if noise is None else add_noise(xb, noise, generator)  # the same on every rank
                rows, weight = ranks.share(xb)  # this rank's rows of the global batch xb
                inputs, _ = ranks.share(x_in)
                use_pool = chooser.pool_now() if chooser is not None else pool is not None
                step_started = time.perf_counter()
                step_loss = train_step(train_model, inputs, rows, config.loss, optimizer, micro_batch,
                                       pool if use_pool else None, weight=weight)
                if weight:  # weight 0: a stand-in row so this rank joins the all-reduce; not data
                    loss_sum += step_loss
                state.step = step + 1
                interrupts.release()
                if chooser is not None:
                    chooser.record(use_pool, time.perf_counter() - step_started)
                if progress and (step % 50 == 0 or step == steps_per_epoch - 1):
                    bar.update(min(n, (step + 1) * config.batch_size) - bar.n)
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(loss=f"{loss_sum.item() / bar.n:.4f}", img_s=f"{bar.n / elapsed:,.0f}")
            epoch_loss = ranks.sum(loss_sum)  # summed over every rank's rows: the whole epoch
            seconds = time.perf_counter() - started
            result = evaluate(model, x_val, config.loss)
            record = EpochRecord(epoch=epoch + 1, loss=epoch_loss.item() / n, val_loss=result.loss,
                                 val_mse=result.mse, seconds=seconds, images_per_second=n / seconds)
            if progress:
                bar.set_postfix(loss=f"{record.loss:.4f}", val_loss=f"{record.val_loss:.4f}",
                                img_s=f"{record.images_per_second:,.0f}")
            bar.close()
            interrupts.hold()  # the epoch's results go into the state together
            state.finish_epoch(record)
            if result.collapsed and not collapse_warned:  # once: training on will not leave it
                warnings.warn(CollapseWarning(state.epoch), stacklevel=2)
                collapse_warned = True
            if record.val_loss < state.best_val_loss:
                state.best_val_loss, state.epochs_since_best = record.val_loss, 0
            else:
                state.epochs_since_best += 1
                if config.patience is not None and state.epochs_since_best >= config.patience:
                    state.stopped_early = True
                    log.warning("epoch %d: val_loss has not improved for %d epochs; stopping early",
                                epoch + 1, config.patience)
            interrupts.release()
            if on_epoch_end is not None:
                on_epoch_end(model, optimizer, state)
    except KeyboardInterrupt:
        if on_interrupt is not None and not interrupts.busy and (state.epoch, state.step) != began:
            if state.step:  # part-way through an epoch
                state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
            on_interrupt(model, optimizer, state)
        raise
    finally:
        interrupts.restore()
        if pool is not None:
            pool.close()
            torch.set_num_threads(threads)
        model.to(memory_format=torch.contiguous_format)
        match_state_layout(optimizer)
    return state


__all__ = ["Recipe", "RECIPES", "TrainConfig", "TrainState", "EpochRecord", "Evaluation", "fit",
           "train_step", "HeldInterrupts", "ChunkPool", "PoolOrNot", "default_workers", "evaluate",
           "reconstruction_errors", "image_errors",
           "outlier_threshold", "learning_rate", "loss_fn", "default_micro_batch", "resolve_device",
           "make_optimizer", "match_state_layout", "shuffled_batches", "prepare_images",
           "epoch_permutation", "COLLAPSE", "COLLAPSE_HINT", "CollapseWarning"]
