"""Training: the plain PyTorch loop.

:func:`fit` trains a model on images for the epochs a :class:`~aekit.config.TrainConfig`
says (its recipe fills what is left unset), one epoch at a time (:func:`_train_epoch`), one
optimiser step at a time (:func:`train_step`), and hands on its progress
(:mod:`aekit.progress`) at each epoch's end and at Ctrl-C
(:class:`HeldInterrupts`). The model and optimiser a run starts from are
:mod:`aekit.start`'s; :mod:`aekit.experiment` wraps fit with the rules that choose from the
data, the run folder and the estimator, so that ``aekit train`` and
``ConvAutoencoder().fit`` train the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from aekit import distributed, fast, models
from aekit.collapse import CollapseWarning, collapse_hint
from aekit.config import TrainConfig, default_epochs
from aekit.data import ImageSource, as_images
from aekit.inference import evaluate
from aekit.noise import Noise, add_noise, noise_generator, parse_noise
from aekit.progress import EpochRecord, TrainState
from aekit.start import learning_rate, make_optimizer

log = logging.getLogger("aekit")


# ------------------------------------------------------------------------- the data

def _check_trainable(model: nn.Module, loss: str) -> torch.device:
    """The device of a model ``fit`` can train (see its docstring), or a one-line error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}")
    if not fast.trainable(model):
        raise ValueError("fit: the model has no parameters to train (none, or none with requires_grad)")
    devices = sorted({str(t.device) for t in (*model.parameters(), *model.buffers())})
    if len(devices) > 1:
        raise ValueError(f"fit: the model's parameters are on {len(devices)} devices ({', '.join(devices)}); "
                         "fit trains on one: move the model there with model.to(device)")
    offered = models.objectives(model)
    if loss not in offered:
        if loss == "bce" and not callable(getattr(model, "loss", None)):
            raise TypeError("fit: loss='bce' needs model.logits(x), the outputs before the sigmoid (n, C, H, W), "
                            "with forward(x) = sigmoid(logits(x)); add that method, or pass loss='mse'")
        raise ValueError(f"fit: unknown loss {loss!r} for this model; expected one of {', '.join(offered)} "
                         "(its objectives)")
    return next(model.parameters()).device


# ------------------------------------------------------------------------- the loop

def train_step(model: nn.Module, x_in: torch.Tensor, target: torch.Tensor, loss: str,
               optimizer: torch.optim.Optimizer, micro_batch: int, pool: fast.ChunkPool | None = None,
               weight: float = 1.0, precision: str = "float32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on the model's objective ``loss``: reconstruct ``target``
    (n, C, H, W) from ``x_in`` (``target`` itself, or a corrupted copy when training a
    denoiser). Returns the loss and its named parts, each summed over the images, detached.

    ``model`` is the model (or its DDP wrapper, :meth:`aekit.distributed.Ranks.wrap`); its
    loss comes from :func:`aekit.models.loss`. The batch is processed in chunks of
    ``micro_batch`` images, their gradients summed in a fixed order. The batch's mean loss
    is the sum over chunks k of (n_k / n) times chunk k's mean loss, so the gradient is the
    one of a single pass over the whole batch, up to float rounding: the same step, computed
    in a cache-friendly order. With a ``pool`` the chunks run side by side and the sum is the
    same, bit for bit. ``weight`` scales the gradient (DDP: this rank's share of the global
    batch, see aekit.distributed). ``precision`` is the forward pass's
    (:func:`aekit.fast.mixed_precision`), entered by whichever thread computes a chunk.
    Every thread that computes part of the step flushes denormal floats to zero while it
    does (:func:`aekit.fast.flush_denormals`: faster on some CPUs, the same weights).
    """
    n = len(target)
    chunks = list(zip(x_in.split(micro_batch), target.split(micro_batch)))

    def chunk_loss(m: nn.Module, chunk_in: torch.Tensor, chunk_target: torch.Tensor) -> models.Loss:
        with fast.mixed_precision(chunk_target.device, precision):
            return models.loss(m, chunk_in, chunk_target, loss)

    with fast.flush_denormals(target.device):  # the calling thread's part of the step
        optimizer.zero_grad(set_to_none=True)
        if pool is None or len(chunks) == 1:
            summed = []  # each chunk's loss and parts, summed over its images
            for chunk_in, chunk_target in chunks:
                out = chunk_loss(model, chunk_in, chunk_target)
                scale = weight * len(chunk_target) / n
                (out.total if scale == 1 else out.total * scale).backward()
                size = len(chunk_target)
                summed.append((out.total.detach() * size, {k: v.detach() * size for k, v in out.parts.items()}))
        else:
            results = pool.gradients(chunks, chunk_loss, n, weight)
            grads = list(results[0][2])
            for _, _, chunk_grads in results[1:]:
                for grad, more in zip(grads, chunk_grads):
                    grad += more                      # the order backward() accumulates in
            for param, grad in zip(fast.trainable(model), grads):
                param.grad = grad
            summed = [(chunk_total, chunk_parts) for chunk_total, chunk_parts, _ in results]
        optimizer.step()
    total = torch.zeros((), device=target.device)
    parts: dict[str, torch.Tensor] = {}
    for chunk_total, chunk_parts in summed:
        total += chunk_total
        _add_parts(parts, chunk_parts)
    return total, parts


def _add_parts(into: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
    """Add named loss parts into a running sum of them, name by name."""
    for name, value in parts.items():
        into[name] = into.get(name, 0) + value


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


def _train_epoch(model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 x_train: ImageSource, x_val: ImageSource, config: TrainConfig, state: TrainState,
                 ranks: distributed.Ranks, device: torch.device, micro_batch: int, pool: fast.ChunkPool | None,
                 chooser: fast.PoolOrNot | None, noise: Noise | None, interrupts: HeldInterrupts,
                 progress: bool, saves_interrupt: Callable[[], bool]) -> tuple[EpochRecord, bool]:
    """Train epoch ``state.epoch + 1`` from its step ``state.step`` (0, or where an
    interrupted run stopped) to its end, then validate ``model`` on ``x_val``.

    ``x_train`` and ``x_val`` are image sources of (n, C, H, W) floats in [0, 1] (a stream's
    batches are moved to ``device`` as read); the batches' order, noise and learning rate
    follow from (``config.seed``, epoch, step). ``train_model`` is the model the steps run
    (fast, and DDP-wrapped under torchrun: see :func:`fit`); ``state.step`` counts the steps
    taken. Where ``saves_interrupt()`` says a Ctrl-C is handed on, the epoch's sums so far
    go into ``state`` first (``loss_sum``, ``seconds``, ``parts_sum``), so that a checkpoint
    of it goes on exactly.

    Returns (the epoch's record, whether its reconstructions collapsed), with ``interrupts``
    held: the caller puts the record into ``state`` and releases them.
    """
    from tqdm.auto import tqdm

    epoch, done = state.epoch, state.step  # `done` batches trained before an interrupt
    n, steps_per_epoch = len(x_train), state.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    batches = (xb.to(device, non_blocking=True)  # a stream's batches come from disk
               for xb in x_train.batches(config.batch_size, config.seed, epoch))
    bar = tqdm(total=n, initial=min(n, done * config.batch_size), unit="img", disable=not progress,
               leave=True, desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True)
    # This rank's summed loss and the time so far: 0, or where an interrupted run stopped.
    loss_sum = torch.tensor(state.loss_sum if ranks.is_main else 0.0, device=device)
    parts_sum = {k: torch.tensor(v if ranks.is_main else 0.0, device=device) for k, v in state.parts_sum.items()}
    generator = noise_generator(config.seed, epoch, device) if noise is not None else None
    started = time.perf_counter() - state.seconds
    try:
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
            step_loss, step_parts = train_step(train_model, inputs, rows, config.loss, optimizer, micro_batch,
                                               pool if use_pool else None, weight=weight,
                                               precision=config.precision)
            if not weight:  # a stand-in row so this rank joins the all-reduce; not data
                step_loss, step_parts = step_loss * 0, {k: v * 0 for k, v in step_parts.items()}
            loss_sum += step_loss
            _add_parts(parts_sum, step_parts)  # every rank names every part, for ranks.sum
            state.step = step + 1
            interrupts.release()
            if chooser is not None:
                chooser.record(use_pool, time.perf_counter() - step_started)
            if progress and (step % 50 == 0 or step == steps_per_epoch - 1):
                bar.update(min(n, (step + 1) * config.batch_size) - bar.n)
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum.item() / bar.n:.4f}", img_s=f"{bar.n / elapsed:,.0f}")
        epoch_loss = ranks.sum(loss_sum)  # summed over every rank's rows: the whole epoch
        parts = {name: ranks.sum(value).item() / n for name, value in sorted(parts_sum.items())}
        seconds = time.perf_counter() - started
        result = evaluate(model, x_val, config.loss, workers=1 if ranks.size > 1 else None)
        parts.update({f"val_{name}": value for name, value in result.parts.items()})
        record = EpochRecord(epoch=epoch + 1, loss=epoch_loss.item() / n, val_loss=result.loss,
                             val_mse=result.mse, seconds=seconds, images_per_second=n / seconds,
                             parts=parts)
        if progress:
            bar.set_postfix(loss=f"{record.loss:.4f}", val_loss=f"{record.val_loss:.4f}",
                            img_s=f"{record.images_per_second:,.0f}")
        bar.close()
        interrupts.hold()  # the epoch's results go into the state together
    except KeyboardInterrupt:
        if saves_interrupt() and state.step:  # part-way through the epoch
            state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
            state.parts_sum = {name: float(value) for name, value in parts_sum.items()}
        raise
    return record, result.collapsed


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
    take its recipe's values (``fit(model, x_train, x_val, TrainConfig(epochs=5))``), and
    ``epochs`` left None the number :func:`aekit.config.default_epochs` gives ``x_train``.

    ``x_train`` and ``x_val`` are each a numpy array in the loaders' layout, (n, H, W) or
    (n, H, W, C), uint8 or float in [0, 1] (converted by :func:`aekit.data.prepare_images`); a float
    tensor (n, C, H, W) in [0, 1]; or an image stream (:mod:`aekit.data`). Images in
    memory are moved to the model's device once, a stream is read batch by batch.

    What ``model`` must provide (checked first, with a one-line error naming ``fit``):

    - it is an ``nn.Module`` with parameters to train, all on one device (fit trains there
      and leaves them there);
    - ``forward(x)``: (n, C, H, W) -> reconstructions (n, C, H, W) in [0, 1];
    - ``logits(x)``: the same before the sigmoid, ``forward(x) == sigmoid(logits(x))``, for
      ``loss="bce"`` (the default recipe's).

    On the CPU fit trains it channels_last and gives it back contiguous, also when
    training fails.

    A model with ``training_data`` (:meth:`aekit.models.Autoencoder.training_data`) is given
    ``x_train`` for as long as it trains, e.g. to initialise itself from the data.

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
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig, got {type(config).__name__}")
    config = config.resolved(model)  # the loss is one this model offers, whatever config.model names
    device = _check_trainable(model, config.loss)
    x_train, x_val = as_images(x_train, "fit: x_train"), as_images(x_val, "fit: x_val")
    if config.epochs is None:  # the rule a run applies: aekit.config.default_epochs
        config.epochs, _ = default_epochs(len(x_train), config.batch_size)
    optimizer = optimizer or make_optimizer(model, config)
    state = state or TrainState()
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    if micro_batch is None:
        micro_batch = fast.default_micro_batch(device, config.batch_size, config.precision)
    elif isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch <= 0:
        raise ValueError(f"micro_batch must be a positive number of images, got {micro_batch!r}; "
                         "leave it None for the device's default")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0):
        raise ValueError(f"workers must be a positive number of threads, got {workers!r}; "
                         "leave it None for one per core")
    # Data in memory lives on the device as one tensor when it is not already there.
    x_train, x_val = x_train.to(device), x_val.to(device)
    ranks = distributed.current()  # 1 of 1 unless launched by torchrun: see aekit.distributed
    progress = progress and ranks.is_main
    if ranks.size > 1:
        # DDP all-reduces in every backward(): one pass per rank and step, no chunk threads.
        micro_batch, workers = config.batch_size, 1

    choose = workers is None  # by default, let PoolOrNot pick pool or one thread as load changes
    if workers is None:
        workers = fast.default_workers(device, config.batch_size, micro_batch, model)
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

    def saves_interrupt() -> bool:
        """Whether a Ctrl-C now hands the state to ``on_interrupt``: between two steps, and
        with training past where this call started."""
        return on_interrupt is not None and not interrupts.busy and (state.epoch, state.step) != began

    collapse_warned = False
    # On the CPU: the model made fast (aekit.fast), channels_last, for the whole of training.
    speed = contextlib.ExitStack()
    pool = None
    try:
        # The model's own use of the data (e.g. an initialisation from it), on the model as
        # it is: before it is made fast and before DDP copies rank 0's weights to every rank.
        speed.enter_context(models.training_data(model, x_train, new=began == (0, 0)))
        fast_model = speed.enter_context(fast.on_cpu(model, optimizer))
        train_model = ranks.wrap(fast_model)
        if workers > 1:
            pool = fast.ChunkPool(fast_model, workers)
            speed.enter_context(fast.torch_threads(1))  # one PyTorch thread per worker: see ChunkPool
            speed.callback(pool.close)
        chooser = fast.PoolOrNot() if pool is not None and choose else None
        if ranks.size == 1:  # under DDP, a rank that held Ctrl-C could wait on one that did not
            interrupts.install()
        while state.epoch < config.epochs and not state.stopped_early:
            fast_model.train()
            record, collapsed = _train_epoch(model, train_model, optimizer, x_train, x_val, config, state,
                                             ranks, device, micro_batch, pool, chooser, noise, interrupts,
                                             progress, saves_interrupt)
            state.finish_epoch(record)  # interrupts held by _train_epoch: the results go in together
            if collapsed and not collapse_warned:  # once: training on will not leave it
                warnings.warn(CollapseWarning(state.epoch, collapse_hint(model, config.loss, config.lr)), stacklevel=2)
                collapse_warned = True
            if record.val_loss < state.best_val_loss:
                state.best_val_loss, state.epochs_since_best, state.best_epoch = record.val_loss, 0, record.epoch
            else:
                state.epochs_since_best += 1
                if config.patience is not None and state.epochs_since_best >= config.patience:
                    state.stopped_early = True
                    log.warning("epoch %d: val_loss has not improved for %d epochs; stopping early",
                                record.epoch, config.patience)
            interrupts.release()
            if on_epoch_end is not None:
                on_epoch_end(model, optimizer, state)
    except KeyboardInterrupt:
        if saves_interrupt():
            on_interrupt(model, optimizer, state)
        raise
    finally:
        interrupts.restore()
        speed.close()
    return state


__all__ = ["TrainState", "EpochRecord", "fit", "train_step", "HeldInterrupts"]
