"""The seed's convolutional autoencoder, layer for layer.

The blog's Keras network (``Conv2D(16) -> MaxPool -> Conv2D(8) -> MaxPool -> Conv2D(8)``,
a mirrored decoder with ``UpSampling2D`` and a sigmoid output, 4,385 parameters) written as
two PyTorch modules so that the 7x7x8 bottleneck (the blog's ``conv2d_3``) can be read and
decoded on its own. Names follow CompressAI: ``g_a`` is the analysis transform (encoder),
``g_s`` the synthesis transform (decoder).

Shapes are NCHW inside PyTorch; :func:`summary` prints them NHWC, as Keras does.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Keras' ``Conv2D(out, (3, 3), padding='same')``: stride 1, spatial size kept."""
    if out_channels == 1:
        return ConvToOne(in_channels)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class _ConvToOneFunction(torch.autograd.Function):
    """(n, C, H, W) -> (n, 1, H, W): a 3x3 'same' convolution with one output channel, as
    one matrix product (n*H*W, C) x (C, 9), the nine taps of every pixel, then nine
    shifted adds of those tap planes. Backward: the same in reverse, two products."""

    @staticmethod
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
        return y.unsqueeze(1)

    @staticmethod
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
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad_taps, pixels).t().reshape(1, c, 3, 3)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or _tracing():  # exported graphs (ONNX) keep a plain Conv
            return super().forward(x)
        return _ConvToOneFunction.apply(x, self.weight, self.bias)


def _tracing() -> bool:
    """Whether torch.export or TorchScript is tracing the model."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.jit.is_tracing() or torch.jit.is_scripting()


class SeedEncoder(nn.Module):
    """(n, 1, 28, 28) -> (n, 8, 7, 7): the blog's encoder, up to ``conv2d_3``."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            conv3x3(in_channels, 16), nn.ReLU(),  # (n, 16, 28, 28)
            nn.MaxPool2d(2),                      # (n, 16, 14, 14)
            conv3x3(16, 8), nn.ReLU(),            # (n, 8, 14, 14)
            nn.MaxPool2d(2),                      # (n, 8, 7, 7)
            conv3x3(8, 8), nn.ReLU(),             # (n, 8, 7, 7)  the bottleneck
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SeedDecoder(nn.Module):
    """(n, 8, 7, 7) -> (n, 1, 28, 28) in [0, 1]: the blog's decoder.

    The last convolution produces logits; :meth:`forward` applies the sigmoid. Training
    with binary cross-entropy uses :meth:`logits` directly, which is numerically safer
    than taking the log of a saturated sigmoid.
    """

    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            conv3x3(8, 8), nn.ReLU(),                  # (n, 8, 7, 7)
            nn.Upsample(scale_factor=2, mode="nearest"),  # (n, 8, 14, 14)
            conv3x3(8, 8), nn.ReLU(),                  # (n, 8, 14, 14)
            nn.Upsample(scale_factor=2, mode="nearest"),  # (n, 8, 28, 28)
            conv3x3(8, 16), nn.ReLU(),                 # (n, 16, 28, 28)
            conv3x3(16, out_channels),                 # (n, 1, 28, 28) logits
        )

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(z))


class Autoencoder(nn.Module):
    """``g_s(g_a(x))``: an analysis transform ``g_a`` (encoder) and a synthesis transform
    ``g_s`` (decoder) whose last layer gives logits and whose forward applies the sigmoid."""

    g_a: nn.Module
    g_s: nn.Module

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> (n, *latent_shape)."""
        return self.g_a(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(n, *latent_shape) -> (n, C, H, W) in [0, 1]."""
        return self.g_s(z)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, C, H, W) pre-sigmoid outputs, for losses on logits."""
        return self.g_s.logits(self.g_a(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_s(self.g_a(x))


class SeedAutoencoder(Autoencoder):
    """The blog's full network, 4,385 parameters for 28x28x1 input; latent (n, 8, H/4, W/4).

    ``image_shape`` is ``(C, H, W)``. The two 2x2 poolings need H and W divisible by 4
    for the output to match the input size.
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(
                f"the seed network needs image height and width divisible by 4 (two 2x2 "
                f"poolings), got {height}x{width}; resize the images, e.g. --resize 28 28"
            )
        self.image_shape = (channels, height, width)
        self.g_a = SeedEncoder(channels)
        self.g_s = SeedDecoder(channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        _, height, width = self.image_shape
        return (8, height // 4, width // 4)


class ConvEncoder(nn.Module):
    """(n, C, H, W) -> (n, latent_dim): a conv stack, then a dense bottleneck.

    Each width adds ``conv3x3 -> ReLU -> MaxPool(2)``, halving H and W. Inputs whose sides
    are not divisible by ``2 ** len(widths)`` are zero-padded on the bottom/right first.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, widths: tuple[int, ...]):
        super().__init__()
        channels, height, width = image_shape
        factor = 2 ** len(widths)
        self.pad = ((-width) % factor, (-height) % factor)  # (right, bottom)
        layers: list[nn.Module] = []
        for out_channels in widths:
            layers += [conv3x3(channels, out_channels), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_shape = (widths[-1], (height + self.pad[1]) // factor, (width + self.pad[0]) // factor)
        self.fc = nn.Linear(math.prod(self.feature_shape), latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, (0, self.pad[0], 0, self.pad[1]))
        return self.fc(self.features(x).flatten(1))  # (n, latent_dim)


class ConvDecoder(nn.Module):
    """(n, latent_dim) -> (n, C, H, W): the encoder mirrored, with nearest upsampling.

    As in the seed's decoder, each level convolves at the lower resolution and then
    upsamples, so the costly full-resolution work is one thin output convolution.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, widths: tuple[int, ...],
                 feature_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = image_shape
        self.feature_shape = feature_shape
        self.fc = nn.Sequential(nn.Linear(latent_dim, math.prod(feature_shape)), nn.ReLU())
        layers: list[nn.Module] = []
        channels = widths[-1]
        for level in reversed(range(len(widths))):
            out_channels = widths[max(level - 1, 0)]
            layers += [conv3x3(channels, out_channels), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest")]
            channels = out_channels
        layers.append(conv3x3(channels, image_shape[0]))  # logits
        self.layers = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        _, height, width = self.image_shape
        h = self.fc(z).view(-1, *self.feature_shape)
        return self.layers(h)[:, :, :height, :width]  # crop the encoder's padding

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


class ConvAutoencoderNet(Autoencoder):
    """A convolutional autoencoder with a dense latent of any size, for any (C, H, W).

    ``widths`` are the encoder's channel counts, one per 2x downsampling; the decoder
    mirrors them. ``encode``: (n, C, H, W) -> (n, latent_dim).
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = 32,
                 widths: tuple[int, ...] = (16, 32)):
        super().__init__()
        if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be positive integers, one per downsampling, got {widths!r}")
        channels, height, width = image_shape
        if min(height, width) < 2 ** len(widths) // 2:
            raise ValueError(f"images of {height}x{width} are too small for {len(widths)} downsamplings; "
                             "pass fewer widths")
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.g_a = ConvEncoder(self.image_shape, latent_dim, widths)
        self.g_s = ConvDecoder(self.image_shape, latent_dim, widths, self.g_a.feature_shape)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)


# The CLI looks models up here by name; the library passes model objects around.
MODELS = {"seed": SeedAutoencoder, "conv": ConvAutoencoderNet}
DEFAULT_LATENT_DIM = 32
DEFAULT_WIDTHS = (16, 32)


def build_model(name: str, image_shape: tuple[int, int, int], latent_dim: int | None = None,
                widths: tuple[int, ...] | None = None) -> nn.Module:
    """Build a registered model for images of ``image_shape = (C, H, W)``.

    The seed network's latent is fixed (8 x H/4 x W/4); ``latent_dim`` and ``widths`` apply
    to ``conv``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    if name == "seed":
        if latent_dim is not None or widths is not None:
            raise ValueError("the seed network's latent is fixed at 8 x H/4 x W/4; "
                             "use --model conv to choose latent_dim or widths")
        return SeedAutoencoder(image_shape)
    return ConvAutoencoderNet(image_shape, DEFAULT_LATENT_DIM if latent_dim is None else latent_dim,
                              DEFAULT_WIDTHS if widths is None else tuple(widths))


# ------------------------------------------------------------------- fast inference

# Images per pass at inference on the CPU: a pass over 64 MNIST images keeps the
# (n, 16, 28, 28) activations in the core's cache. Measured on the encoder at batch 1024:
# 3.5x the images per second of one pass over all 1024 (bench/RESULTS.md).
CPU_CHUNK = 64


HEAP_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold


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


_KEPT = False


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def channels_last_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """The model with channels_last weights while the block runs, on the CPU (where
    oneDNN's convolutions run 1.4-1.5x faster so); restored to contiguous after."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if on_cpu:
            model.to(memory_format=torch.contiguous_format)


@torch.inference_mode()
def map_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CPU_CHUNK,
               workers: int = 1) -> torch.Tensor:
    """``fn`` applied to ``x`` (n, ...) in chunks of ``chunk`` along the first axis;
    results concatenated in order.

    For per-image functions (a forward pass in eval mode) this is ``fn(x)``, faster: small
    passes stay in cache. With one worker the chunks run one after another with the
    caller's PyTorch threads. With several, ``workers`` threads run them side by side,
    each with one PyTorch thread (threads that meet once per chunk do not stall on a busy
    machine the way PyTorch's own threads do, see training.ChunkPool); PyTorch's thread
    count is process-wide, so it is 1 while they run and restored after, and such calls
    must not run from several threads at once.
    """
    def in_worker(c: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # a thread-local mode: each worker sets its own
            return fn(c)

    chunks = x.split(chunk)
    if workers <= 1 or len(chunks) == 1:
        return torch.cat([fn(c) for c in chunks])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="aekit-infer") as pool:
            return torch.cat(list(pool.map(in_worker, chunks)))
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def encode_images(model: SeedAutoencoder, x: torch.Tensor, workers: int | None = None) -> torch.Tensor:
    """(n, C, H, W) in [0, 1] -> latents (n, 8, H/4, W/4), as ``model.encode(x)``, fast.

    On the CPU: channels_last weights, chunks of :data:`CPU_CHUNK` images, one thread per
    core (``workers``, default all). Elsewhere one pass. The model is left as it was.
    """
    x = x.to(next(model.parameters()).device)
    if x.device.type != "cpu":
        return model.encode(x)
    was_training = model.training
    with channels_last_on_cpu(model.eval()):
        try:
            return map_chunks(model.encode, x, CPU_CHUNK, cpu_cores() if workers is None else workers)
        finally:
            model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_keras_(model: nn.Module) -> None:
    """Keras' defaults for ``Conv2D`` and ``Dense``: glorot_uniform kernels, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def init_he_(model: nn.Module) -> None:
    """He (Kaiming) uniform kernels for the ReLU layers, zero biases.

    The output convolution feeds a sigmoid, not a ReLU, and a dense bottleneck is linear,
    so both get Glorot instead.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    encoder_fc = getattr(getattr(model, "g_a", None), "fc", None)
    for i, layer in enumerate(layers):
        if i == len(layers) - 1 or layer is encoder_fc:
            nn.init.xavier_uniform_(layer.weight)
        else:
            nn.init.kaiming_uniform_(layer.weight, a=0.0, nonlinearity="relu")
        nn.init.zeros_(layer.bias)


# Initialisations by name, for recipes and the CLI. "torch" keeps PyTorch's own default
# (kaiming_uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both).
INITS = {"keras": init_keras_, "he": init_he_, "torch": lambda model: None}


def summary(model: nn.Module) -> str:
    """A Keras-style layer table (NHWC output shapes), as printed in the blog."""
    rows: list[tuple[str, str, str, int]] = []
    channels, height, width = model.image_shape
    rows.append(("input_1", "InputLayer", f"(None, {height}, {width}, {channels})", 0))
    keras_names = {nn.Conv2d: ("conv2d", "Conv2D"), nn.MaxPool2d: ("max_pooling2d", "MaxPooling2D"),
                   nn.Upsample: ("up_sampling2d", "UpSampling2D"), nn.Linear: ("dense", "Dense")}
    counters: dict[str, int] = {}
    hooks = []

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        prefix, kind = next(names for cls, names in keras_names.items() if isinstance(module, cls))
        counters[prefix] = counters.get(prefix, 0) + 1
        if output.ndim == 4:
            _, c, h, w = output.shape
            shape = f"(None, {h}, {w}, {c})"
        else:
            shape = f"(None, {output.shape[1]})"
        params = sum(p.numel() for p in module.parameters())
        rows.append((f"{prefix}_{counters[prefix]}", kind, shape, params))

    for module in model.modules():
        if isinstance(module, tuple(keras_names)):
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, height, width))
    finally:
        for hook in hooks:
            hook.remove()

    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = "_" * 69
    out = [line, f"{'Layer (type)':<33}{'Output Shape':<26}{'Param #':<10}", "=" * 69]
    for name, kind, shape, params in rows:
        label = f"{name} ({kind})"
        out.append(f"{label:<33}{shape:<26}{params:<10}")
    out += ["=" * 69, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)


__all__ = [
    "Autoencoder", "SeedAutoencoder", "SeedEncoder", "SeedDecoder", "ConvAutoencoderNet", "ConvEncoder",
    "ConvDecoder", "MODELS", "INITS", "build_model", "count_parameters", "init_keras_", "init_he_", "summary",
    "encode_images", "map_chunks", "channels_last_on_cpu", "cpu_cores", "keep_freed_memory", "CPU_CHUNK",
    "ConvToOne",
]
