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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aekit.models import cpu_cores, keep_freed_memory, map_chunks

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

        positive("epochs", self.epochs)
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; was this run made by a newer aekit?")
        data = dict(data)
        for key in ("resize", "image_shape"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


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


def loss_fn(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean per-pixel loss of reconstructing ``x`` (n, C, H, W) in [0, 1]."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(model.logits(x), x)
    return F.mse_loss(model(x), x)


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

    ``x`` is a tensor or an image stream (:mod:`aekit.streaming`).
    """
    model.eval()
    device = next(model.parameters()).device
    sq_err = total_loss = 0.0
    recon_sum = torch.zeros(x.shape[1:], dtype=torch.float64)
    recon_sq = torch.zeros_like(recon_sum)
    data_sum = torch.zeros_like(recon_sum)
    data_sq = torch.zeros_like(recon_sum)
    for xb in _in_order(x, batch_size):
        xb = xb.to(device, non_blocking=True)
        logits = map_chunks(model.logits, xb) if device.type == "cpu" else model.logits(xb)
        recon = torch.sigmoid(logits)
        sq_err += F.mse_loss(recon, xb, reduction="sum").item()
        if loss == "bce":
            total_loss += F.binary_cross_entropy_with_logits(logits, xb, reduction="sum").item()
        recon64, data64 = recon.double().cpu(), xb.double().cpu()
        recon_sum += recon64.sum(0)
        recon_sq += (recon64 ** 2).sum(0)
        data_sum += data64.sum(0)
        data_sq += (data64 ** 2).sum(0)
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


COLLAPSE_HINT = (
    "the reconstructions are nearly constant: every image decodes to the same picture "
    "(the blank-output plateau of sigmoid + MSE). Training on will not leave it; "
    "use --recipe default (binary cross-entropy, He init) or --loss bce"
)


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


def train_step(model: nn.Module, xb: torch.Tensor, loss: str, optimizer: torch.optim.Optimizer,
               micro_batch: int, pool: ChunkPool | None = None) -> torch.Tensor:
    """One optimiser step on the batch ``xb`` (n, C, H, W); returns the summed loss, detached.

    The batch is processed in chunks of ``micro_batch`` images, their gradients summed in
    a fixed order. The batch's mean loss is the sum over chunks k of (n_k / n) times chunk
    k's mean loss, so the gradient is the one of a single pass over the whole batch, up to
    float rounding: the same step, computed in a cache-friendly order. With a ``pool`` the
    chunks run side by side and the sum is the same, bit for bit.
    """
    n = len(xb)
    chunks = xb.split(micro_batch)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=xb.device)
    if pool is None or len(chunks) == 1:
        for chunk in chunks:
            chunk_loss = loss_fn(model, chunk, loss)
            (chunk_loss if len(chunk) == n else chunk_loss * (len(chunk) / n)).backward()
            total += chunk_loss.detach() * len(chunk)
    else:
        results = pool.gradients(chunks, loss, n)
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

    def gradients(self, chunks: tuple[torch.Tensor, ...], loss: str, n: int):
        """[(chunk's summed loss, chunk's gradients)] in chunk order; ``n`` images in the batch."""
        def one(chunk: torch.Tensor):
            replica = self._replica()
            chunk_loss = loss_fn(replica, chunk, loss)
            grads = torch.autograd.grad(chunk_loss * (len(chunk) / n), trainable(replica))
            return chunk_loss.detach() * len(chunk), grads

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


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a pure function of (seed, epoch), so resuming
    a run at an epoch boundary replays exactly the same batches."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


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
    progress: bool = True,
    micro_batch: int | None = None,
    workers: int | None = None,
) -> TrainState:
    """Train ``model`` to reconstruct ``x_train`` (n, C, H, W) float32 in [0, 1].

    ``x_train`` and ``x_val`` are tensors or image streams (:mod:`aekit.streaming`); a
    tensor is moved to the model's device once, a stream is read batch by batch.

    Validates on ``x_val`` after each epoch (the seed's ``validation_data=(x_test, x_test)``),
    stops early when ``config.patience`` epochs pass without a better val_loss, and calls
    ``on_epoch_end`` (e.g. to write a checkpoint). Pass ``optimizer`` and ``state`` from a
    checkpoint to continue a run. ``micro_batch`` (default: :func:`default_micro_batch`)
    sets how many images go through the network at once, ``workers`` (default:
    :func:`default_workers`, and then :class:`PoolOrNot` picks between them and one thread
    as the machine's load changes) how many threads run chunks side by side
    (:class:`ChunkPool`); they change the speed, not the step.
    """
    from tqdm.auto import tqdm

    config.validate()
    device = next(model.parameters()).device
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
    if device.type == "cpu":
        keep_freed_memory()
    model.to(memory_format=memory_format)
    match_state_layout(optimizer)
    # Data in memory lives on the device as one tensor when it is not already there.
    if isinstance(x_train, torch.Tensor):
        x_train = x_train.to(device)
    if isinstance(x_val, torch.Tensor):
        x_val = x_val.to(device)

    choose = workers is None  # by default, let PoolOrNot pick pool or one thread as load changes
    if workers is None:
        workers = default_workers(device, config.batch_size, micro_batch, model)
    pool = ChunkPool(model, workers) if workers > 1 else None
    chooser = PoolOrNot() if pool is not None and choose else None
    threads = torch.get_num_threads()
    if pool is not None:
        torch.set_num_threads(1)  # one PyTorch thread per worker: see ChunkPool
    try:
        while state.epoch < config.epochs and not state.stopped_early:
            epoch = state.epoch
            model.train()
            batches = shuffled_batches(x_train, config.batch_size, config.seed, epoch, device)
            bar = tqdm(total=n, unit="img", disable=not progress, leave=True,
                       desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True)
            loss_sum = torch.zeros((), device=device)
            started = time.perf_counter()
            for step, xb in enumerate(batches):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, epoch * steps_per_epoch + step, total_steps)
                use_pool = chooser.pool_now() if chooser is not None else pool is not None
                step_started = time.perf_counter()
                loss_sum += train_step(model, xb, config.loss, optimizer, micro_batch, pool if use_pool else None)
                if chooser is not None:
                    chooser.record(use_pool, time.perf_counter() - step_started)
                if progress and (step % 50 == 0 or step == steps_per_epoch - 1):
                    bar.update(min(n, (step + 1) * config.batch_size) - bar.n)
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(loss=f"{loss_sum.item() / bar.n:.4f}", img_s=f"{bar.n / elapsed:,.0f}")
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
    finally:
        if pool is not None:
            pool.close()
            torch.set_num_threads(threads)
    model.to(memory_format=torch.contiguous_format)
    match_state_layout(optimizer)
    return state


__all__ = ["Recipe", "RECIPES", "TrainConfig", "TrainState", "EpochRecord", "Evaluation",
           "fit", "train_step", "ChunkPool", "PoolOrNot", "default_workers", "evaluate", "learning_rate", "loss_fn", "default_micro_batch",
           "resolve_device", "make_optimizer", "match_state_layout", "shuffled_batches",
           "epoch_permutation", "COLLAPSE_HINT"]
