"""Running fast on the CPU: every speed trick of aekit, in one place, applied explicitly.

The models in :mod:`aekit.models` are plain PyTorch; export (ONNX) and GPUs run them as
written. On the CPU, training (:func:`aekit.training.fit`) and inference
(:mod:`aekit.inference`) ask this module for a faster way to run the same model:

- :func:`on_cpu`: for the length of a block, a *twin* of the model that shares its
  parameters, with every one-channel 3x3 output convolution running as :class:`ConvToOne`,
  and the parameters in channels_last memory (oneDNN's convolutions run 1.4-1.5x faster
  so); the optimiser's state follows the parameters' layout (:func:`match_state_layout`).
  After the block the model is as it was.
- :func:`run_chunks`: inference in chunks of :data:`CPU_CHUNK` images, side by side on
  worker threads of one PyTorch thread each.
- :class:`ChunkPool` and :class:`PoolOrNot`: a training step's chunks of
  :data:`CPU_MICRO_BATCH` images on worker threads, and the choice, while training runs,
  between those threads and one.
- :func:`flush_denormals`: for a training step, the threads that compute it take floats
  too small to be normal as zero, which some CPUs compute many times slower.
- :func:`keep_freed_memory`: glibc allocator tuning, opt-in (the ``aekit`` command opts in).

None of these changes a result: a twin computes what the model computes, up to float
rounding in ConvToOne, and the chunked step adds gradients in the order one pass does.

One trick does change results, and so is a training option the user picks (``precision``,
never a default): :func:`mixed_precision`, the forward pass in bfloat16 where it is fast.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

# Images per pass at inference on the CPU: a pass over 64 MNIST images keeps the
# (n, 16, 28, 28) activations in the core's cache. Measured on the encoder at batch 1024:
# 3.5x the images per second of one pass over all 1024 (bench/RESULTS.md).
CPU_CHUNK = 64

# Images per forward/backward pass when training on the CPU. A pass over 32 MNIST images
# keeps the largest activations (n, 16, 28, 28) in the core's cache; from 64 on they spill
# and each image costs 1.6-1.7x as much (bench/RESULTS.md). Larger batches are cut into such
# chunks.
CPU_MICRO_BATCH = 32


# ------------------------------------------------------------ the one-channel kernel

class _ConvToOneFunction(torch.autograd.Function):
    """(n, C, H, W) -> (n, 1, H, W): a 3x3 'same' convolution with one output channel, as
    one matrix product (n*H*W, C) x (C, 9), the nine taps of every pixel, then nine
    shifted adds of those tap planes. Backward: the same in reverse, two products. Under
    autocast (:func:`mixed_precision`) the backward runs in the forward's autocast state,
    so that its products take the dtypes the forward's did."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, c)                    # (n*H*W, C); a view if channels_last
        taps = torch.mm(weight.reshape(c, 9).t(), pixels.t()).view(9, n, h, w)
        taps = nn.functional.pad(taps, (1, 1, 1, 1))                     # (9, n, H+2, W+2)
        y = taps[0, :, 0:h, 0:w] + bias                                  # output (p, q) takes tap (i, j)
        for k in range(1, 9):                                            # of input pixel (p+i-1, q+j-1)
            i, j = divmod(k, 3)
            y += taps[k, :, i:i + h, j:j + w]
        ctx.save_for_backward(pixels, weight)
        ctx.shape = (n, c, h, w)
        return y.unsqueeze(1).to(taps.dtype)  # summed in float32 (the bias's); bfloat16 out under autocast

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y: torch.Tensor):
        pixels, weight = ctx.saved_tensors
        n, c, h, w = ctx.shape
        padded = nn.functional.pad(grad_y[:, 0], (1, 1, 1, 1))           # (n, H+2, W+2)
        grad_taps = torch.empty(9, n, h, w, dtype=grad_y.dtype, device=grad_y.device)
        for k in range(9):
            i, j = divmod(k, 3)
            grad_taps[k] = padded[:, 2 - i:2 - i + h, 2 - j:2 - j + w]
        grad_taps = grad_taps.view(9, -1)                                # (9, n*H*W)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:                                      # channels_last (n, C, H, W)
            grad_x = torch.mm(grad_taps.t(), weight.reshape(c, 9).t()).view(n, h, w, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:  # in the weight's own strides, which DDP's buckets expect
            grad_w = torch.empty_like(weight).copy_(torch.mm(grad_taps, pixels).t().reshape(1, c, 3, 3))
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class ConvToOne(nn.Conv2d):
    """``Conv2D(1, (3, 3), padding='same')``, the output layer, faster on the CPU.

    oneDNN runs a convolution with a single output channel far below its speed elsewhere:
    measured on 32 images of (16, 28, 28) at one thread, 542 us forward and 1,227 us with
    backward, where :class:`_ConvToOneFunction` takes 220 and 658 us. The same parameters,
    state_dict and result (to float rounding) as ``nn.Conv2d``; other devices use that.
    """

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 1, kernel_size=3, padding=1)

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> ConvToOne:
        """A ConvToOne holding ``conv``'s own weight and bias objects: a shallow copy of it
        with this class's forward. No new parameters, so no draw from the random generator."""
        twin = copy.copy(conv)
        twin.__class__ = cls
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _ConvToOneFunction.apply(x, self.weight, self.bias)


def _is_one_channel_3x3(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.out_channels == 1 and module.kernel_size == (3, 3)
            and module.stride == (1, 1) and module.padding == (1, 1) and module.dilation == (1, 1)
            and module.groups == 1 and module.bias is not None and module.padding_mode == "zeros")


def _fast_twin(model: nn.Module) -> nn.Module:
    """``model`` with its one-channel 3x3 convolutions as :meth:`ConvToOne.sharing`, leaving
    ``model`` itself unchanged: the modules on the way from the model to such a convolution
    are shallow copies with their own list of children; everything else, parameters and
    buffers included, is the model's own (training the twin trains the model). The model
    itself where it has no such convolution."""
    changed = {}
    for name, child in model._modules.items():
        if child is None:
            continue
        twin_child = ConvToOne.sharing(child) if _is_one_channel_3x3(child) else _fast_twin(child)
        if twin_child is not child:
            changed[name] = twin_child
    if not changed:
        return model
    twin = copy.copy(model)
    twin._modules = {**model._modules, **changed}
    return twin


def match_state_layout(optimizer: torch.optim.Optimizer | None) -> None:
    """Give each per-parameter optimiser tensor (Adam's moments) its parameter's strides.

    Needed after changing the model's memory format or loading a checkpoint: PyTorch's
    fused CPU Adam walks parameter and state memory in lockstep, so a channels_last
    parameter with a contiguous ``exp_avg`` gets a wrong update (measured: off by 0.03 after
    three steps at lr 1e-2), where the unfused Adam is only slower.
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


@contextmanager
def on_cpu(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[nn.Module]:
    """``model`` made fast for the block, when it lives on the CPU; itself elsewhere.

    Yields a twin that shares the model's parameters (so an optimiser of the model trains
    it), with one-channel 3x3 convolutions as :class:`ConvToOne` (the model itself if it
    has none). The parameters, and the ``optimizer``'s state with them, are channels_last
    while the block runs; after it (also when it fails) those that were contiguous before
    are contiguous again, so blocks nest (training's validation runs inside training's block).
    """
    if next(model.parameters()).device.type != "cpu":
        yield model
        return
    twin = _fast_twin(model)
    # Convolution kernels, converted as Module.to(memory_format=...) converts them: the
    # exact strides matter (oneDNN picks its kernels by them, and with them the rounding).
    kernels = [p for p in model.parameters() if p.dim() == 4]
    was_plain = [p.stride() == torch.empty(p.shape).stride() for p in kernels]
    for p in kernels:
        p.data = p.data.to(memory_format=torch.channels_last)
    match_state_layout(optimizer)
    try:
        yield twin
    finally:
        for p, plain in zip(kernels, was_plain):
            if plain:
                p.data = p.data.to(memory_format=torch.contiguous_format)
        match_state_layout(optimizer)


# ------------------------------------------------------------------------ precision

# The precisions a training step's forward pass can run in (TrainConfig.precision).
PRECISIONS = ("float32", "bfloat16")


def mixed_precision(device: torch.device, precision: str) -> AbstractContextManager:
    """The context a training step's forward pass runs in, for ``precision`` (one of
    :data:`PRECISIONS`) on ``device``: nothing for ``"float32"``; for ``"bfloat16"``,
    ``torch.autocast``, which runs convolutions and matrix products in bfloat16 and keeps
    what needs the range of float32 (losses, reductions) in float32. The weights, their
    gradients and the optimiser stay float32; only the forward pass's arithmetic (and with it
    the backward's) changes.

    Whether it is faster depends on the CPU, not only on its instruction sets: on a 2-core
    Zen 4 (AVX-512 BF16) the default model's step alone ran 1.6x at batch 32 on one thread
    and 2.2-2.5x at batch 128 on two, a whole fit 1.24-1.48x (bench/RESULTS.md run 6); on a
    2-core Intel Xeon with AVX-512 BF16 too (no AMX in its VM) a whole fit ran 0.72-1.01x
    (run 7). GPUs with bfloat16 units are fast by design (not measured yet). Thread-local,
    as autocast is: each thread of a :class:`ChunkPool` enters it for its own chunk.
    """
    if precision == "float32":
        return nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision='bfloat16' trains on the CPU or a CUDA GPU, not on {device.type!r}; "
                         "pass precision='float32' there")
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------ denormals

def flushing_denormals() -> bool:
    """Whether the calling thread computes denormal floats as zero. The setting is the
    thread's own (x86's MXCSR, set by ``torch.set_flush_denormal``), and PyTorch has no
    getter: 1e-39 is below float32's smallest normal number (1.18e-38), so a flushing thread
    reads it as 0."""
    return torch.tensor([1e-39], dtype=torch.float32, device="cpu").mul_(1.0).item() == 0.0


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On the CPU, for the length of the block, the calling thread computes floats too
    small to be normal (below 1.18e-38 in float32) as zero; then it gets its own setting
    back. Elsewhere, and where the CPU cannot flush, nothing.

    Why: in the blog recipe's plateau (a saturated sigmoid, see the README) every step makes
    such numbers, and some x86 cores compute them many times slower than normal ones.
    Measured on a 2-core Intel Xeon (fit on 6,400 MNIST images, one thread, taking turns):
    the blog recipe 1,954-2,007 images/s without and 3,947-3,971 with at batch 128, 1,202-1,210
    against 3,869-3,965 at batch 32; the default recipe, which makes none, 3,810-4,134 either
    way. An AMD EPYC (Zen 4) computes them at full speed (bench/RESULTS.md run 5).

    It does not change a run: a value it flushes is under 1.2e-38, and what Adam could make
    of it (the learning rate, under 1, times 10 for the first step's bias correction, times
    the value, over Adam's epsilon, 1e-7 in aekit) is under 2e-30, far below a float32
    weight's last place; the weights after an epoch are the same bit for bit with
    and without (tests/test_fast.py).

    The setting is per thread, so a step enters this in each thread that computes part of it
    (:func:`aekit.training.train_step`, :class:`ChunkPool`'s workers); PyTorch's own
    intra-op threads (a step on several PyTorch threads) keep theirs."""
    if device.type != "cpu" or flushing_denormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------------------------ threads

def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's (process-wide) thread count set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_chunks(fn: Callable[[torch.Tensor], object], x: torch.Tensor, chunk: int = CPU_CHUNK,
               workers: int = 1) -> list:
    """``[fn(c) for c in x.split(chunk)]`` under inference mode, in order.

    For per-image functions (a forward pass in eval mode) this is ``fn(x)``, faster: small
    passes stay in cache. With one worker the chunks run one after another with the
    caller's PyTorch threads. With several, ``workers`` threads run them side by side,
    each with one PyTorch thread (threads that meet once per chunk do not stall on a busy
    machine the way PyTorch's own threads do, see :class:`ChunkPool`); PyTorch's thread
    count is process-wide, so it is 1 while they run and restored after, and such calls
    must not run from several threads at once.
    """
    def in_worker(c: torch.Tensor):
        with torch.inference_mode():  # a thread-local mode: each worker sets its own
            return fn(c)

    chunks = x.split(chunk)
    if workers <= 1 or len(chunks) == 1:
        return [in_worker(c) for c in chunks]
    with torch_threads(1), ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="aekit-infer") as pool:
        return list(pool.map(in_worker, chunks))


# ------------------------------------------------------------------------ training

def default_micro_batch(device: torch.device, batch_size: int, precision: str = "float32") -> int:
    """Chunk size for a training step: :data:`CPU_MICRO_BATCH` on the CPU, twice that in
    bfloat16 (:func:`mixed_precision`), the whole batch elsewhere (a GPU wants large passes).

    Measured in bfloat16 at batch 128 on the 2-core Zen 4 machine (train_step alone, 3
    rounds; bench/RESULTS.md, run 6): chunks of 64 train the seed network at 1.2-1.5x the
    images per second of chunks of 32 (two ChunkPool workers) and the default model at
    1.2-1.3x (two PyTorch threads); bfloat16's activations take half the bytes, which
    presumably is why. float32 keeps 32: a change of chunk changes its weights' rounding."""
    if device.type != "cpu":
        return batch_size
    return min(batch_size, CPU_MICRO_BATCH * (2 if precision == "bfloat16" else 1))


def default_workers(device: torch.device, batch_size: int, micro_batch: int, model: nn.Module) -> int:
    """Threads for :class:`ChunkPool`: one per core, at most one per chunk; 1 off the CPU
    and for models with buffers."""
    if device.type != "cpu" or any(True for _ in model.buffers()):
        return 1
    return max(1, min(cpu_cores(), math.ceil(batch_size / micro_batch)))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class ChunkPool:
    """Threads that compute the gradients of a batch's chunks side by side, on the CPU.

    Each thread runs its own copy of the model whose parameters share the model's memory
    (an optimiser step is seen by all) and returns each chunk's loss and gradients, which
    :func:`aekit.training.train_step` adds in chunk order, as backward() adds them when the
    chunks run one after another. Run with one PyTorch thread (``fit`` sets it), so the
    result is the same bit for bit for any number of workers.

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

    def gradients(self, chunks: list[tuple[torch.Tensor, torch.Tensor]], loss: Callable, n: int,
                  weight: float = 1.0):
        """[(chunk's loss summed over its images, its parts summed likewise, its gradients)]
        in chunk order, for (input, target) chunks of a batch of ``n`` images;
        ``loss(model, input, target)`` gives a chunk's :class:`aekit.models.Loss`."""
        def one(chunk: tuple[torch.Tensor, torch.Tensor]):
            replica = self._replica()
            chunk_in, chunk_target = chunk
            with flush_denormals(chunk_target.device):
                out = loss(replica, chunk_in, chunk_target)
                grads = torch.autograd.grad(out.total * (weight * len(chunk_target) / n), trainable(replica))
            size = len(chunk_target)
            return out.total.detach() * size, {k: v.detach() * size for k, v in out.parts.items()}, grads

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


# ------------------------------------------------------------------------ memory

HEAP_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold
_KEPT = False


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep up to 32 MB of freed memory instead of returning it to
    the system at once, for this whole process (Linux with glibc; elsewhere nothing).

    A forward pass allocates and frees a few MB per layer. By default glibc hands such
    blocks back to the kernel (munmap, or trimming the heap) and the next pass faults
    every page in again, zeroed: measured 7,685 page faults per 1,024 encoded images and
    28,755 images per CPU-second; with both thresholds at 32 MB, 0 faults and 49,906
    (setting only one of the two made it worse: glibc then stops adapting the other).
    The cost: up to 32 MB of freed memory stays with the process.

    Opt-in: it changes the whole process for good, so no library call makes it; the
    ``aekit`` command does, and so can a program that runs many forward passes.
    """
    global _KEPT
    if _KEPT:
        return
    _KEPT = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, HEAP_KEEP_BYTES)
        libc.mallopt(m_trim_threshold, HEAP_KEEP_BYTES)
    except (OSError, AttributeError):
        pass


__all__ = ["on_cpu", "ConvToOne", "match_state_layout", "cpu_cores", "torch_threads", "run_chunks",
           "CPU_CHUNK", "CPU_MICRO_BATCH", "default_micro_batch", "default_workers", "trainable",
           "ChunkPool", "PoolOrNot", "keep_freed_memory"]
