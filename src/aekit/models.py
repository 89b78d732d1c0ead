"""The seed's convolutional autoencoder, layer for layer.

The blog's Keras network (``Conv2D(16) -> MaxPool -> Conv2D(8) -> MaxPool -> Conv2D(8)``,
a mirrored decoder with ``UpSampling2D`` and a sigmoid output, 4,385 parameters) written as
two PyTorch modules, ``encoder`` and ``decoder``, so that the 7x7x8 bottleneck (the blog's
``conv2d_3``) can be read and decoded on its own; and a convolutional autoencoder with a
dense latent of any size for images of any (C, H, W).

A model owns its objective: :meth:`Autoencoder.loss` gives the loss of reconstructing a
batch, and the named parts of it worth logging, for each objective the model offers
(``objectives``); the training loop, DDP, checkpoints, the estimator and the CLI ask the
model and know nothing else about it. A new model family is a module of its own and an
entry in :data:`MODELS`.

The models are plain PyTorch; :mod:`aekit.fast` runs them faster on the CPU, explicitly.
Shapes are NCHW inside PyTorch; :func:`summary` prints them NHWC, as Keras does.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aekit._typed import is_int


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Keras' ``Conv2D(out, (3, 3), padding='same')``: stride 1, spatial size kept."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


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


class Loss(NamedTuple):
    """A model's loss on a batch of n images, as :meth:`Autoencoder.loss` gives it."""

    total: torch.Tensor                # () the batch's mean loss: what training minimises
    reconstruction: torch.Tensor       # (n, C, H, W) in [0, 1]
    parts: dict[str, torch.Tensor]     # name -> () batch mean of a term worth logging; {} for one term


# How a model that does not define ``loss`` is trained (any nn.Module; see training.fit):
# "mse" on forward(x), and "bce" on logits(x) where the model has them.
RECONSTRUCTION_OBJECTIVES = ("mse", "bce")


def reconstruction_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
    """Mean per-pixel loss of reconstructing ``target`` from ``x``, both (n, C, H, W) in [0, 1]:
    binary cross-entropy on ``model.logits(x)`` for ``"bce"``, squared error of ``model(x)``
    for ``"mse"``. ``x`` is ``target`` itself, or a corrupted copy when training a denoiser."""
    if objective == "bce":
        return logits_loss(model.logits(x), target, objective)
    if objective == "mse":
        reconstruction = model(x)
        return Loss(F.mse_loss(reconstruction, target), reconstruction, {})
    raise ValueError(f"unknown objective {objective!r}; expected one of {RECONSTRUCTION_OBJECTIVES}")


def logits_loss(logits: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
    """:func:`reconstruction_loss` from a decoder's logits (n, C, H, W) already computed:
    the reconstruction is their sigmoid."""
    reconstruction = torch.sigmoid(logits)
    if objective == "bce":
        return Loss(F.binary_cross_entropy_with_logits(logits, target), reconstruction, {})
    if objective == "mse":
        return Loss(F.mse_loss(reconstruction, target), reconstruction, {})
    raise ValueError(f"unknown objective {objective!r}; expected one of {RECONSTRUCTION_OBJECTIVES}")


def objectives(model: nn.Module) -> tuple[str, ...]:
    """The objectives ``model`` can be trained with: its own ``objectives``, else those of
    :func:`reconstruction_loss` that it supports."""
    offered = getattr(model, "objectives", None)
    if offered is not None:
        return tuple(offered)
    return RECONSTRUCTION_OBJECTIVES if callable(getattr(model, "logits", None)) else ("mse",)


def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
    """``model.loss(x, target, objective)``, or :func:`reconstruction_loss` for a module
    without one: the one place training and evaluation get a loss from."""
    own = getattr(model, "loss", None)
    if callable(own):
        return own(x, target, objective)
    return reconstruction_loss(model, x, target, objective)


def training_data(model: nn.Module, images, new: bool) -> contextlib.AbstractContextManager:
    """``model.training_data(images, new)``, or nothing for a module without one: what
    :func:`aekit.training.fit` enters around training (see :meth:`Autoencoder.training_data`)."""
    own = getattr(model, "training_data", None)
    return own(images, new) if callable(own) else contextlib.nullcontext()


def batch_generator(seed: int, x: torch.Tensor, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` (default: ``x``'s) seeded by ``seed`` and the contents of
    ``x``: for a model's own randomness in :meth:`Autoencoder.loss` (a VAE's noise, a map's
    edges), the same for the same images in any thread and any order of a step's chunks,
    and never touching torch's global generator."""
    flat = x.detach().flatten().double()
    # Two sums of the pixels (plain and position-weighted): the same images give the same
    # seed; other images almost surely another.
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=x.device) % 9973
    key = hash((seed, tuple(x.shape), float(flat.sum()), float((flat * weights).sum()))) % (2 ** 63)
    return torch.Generator(device=x.device if device is None else device).manual_seed(key)


class Autoencoder(nn.Module):
    """``decoder(encoder(x))``: an encoder and a decoder whose last layer gives logits and
    whose forward applies the sigmoid; trained on reconstruction alone.

    A subclass sets ``encoder``, ``decoder``, ``image_shape`` (C, H, W) and ``latent_shape``,
    and may override :meth:`loss` and ``objectives`` for an objective with more terms.
    ``options``: the constructor arguments :func:`build_model` may pass beside image_shape.
    """

    encoder: nn.Module
    decoder: nn.Module
    objectives: tuple[str, ...] = RECONSTRUCTION_OBJECTIVES
    options: tuple[str, ...] = ()

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """The loss of reconstructing ``target`` from ``x`` (both (n, C, H, W) in [0, 1])
        under ``objective``, one of ``objectives``."""
        return reconstruction_loss(self, x, target, objective)

    def training_data(self, images, new: bool) -> contextlib.AbstractContextManager:
        """What the model takes from its training images, for as long as it trains.

        :func:`aekit.training.fit` enters this context with the training images (an
        :class:`aekit.data.ImageSource`, on the model's device or streamed) before the first
        step, on the model itself (not yet channels_last, not yet wrapped for DDP, whose
        wrapper then gives every rank rank 0's weights), and leaves it when training ends or
        fails. ``new`` is True when the run starts from untrained weights: a model may then
        initialise them from the data (e.g. from the images' principal components). It is
        False when training continues from a checkpoint, whose weights must be kept; a model
        rebuilds only what checkpoints do not hold (e.g. a neighbour graph). The default
        takes nothing.
        """
        return contextlib.nullcontext()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> (n, *latent_shape)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(n, *latent_shape) -> (n, C, H, W) in [0, 1]."""
        return self.decoder(z)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, C, H, W) pre-sigmoid outputs, for losses on logits."""
        return self.decoder.logits(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


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
                f"poolings), got {height}x{width}; resize the images, e.g. resize=(28, 28)"
            )
        self.image_shape = (channels, height, width)
        self.encoder = SeedEncoder(channels)
        self.decoder = SeedDecoder(channels)

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


def check_conv_options(image_shape: tuple[int, int, int], latent_dim: int, widths) -> tuple[int, ...]:
    """``widths`` as a tuple, or a one-line error for a ``latent_dim``, ``widths`` or image
    size that a :class:`ConvEncoder` / :class:`ConvDecoder` pair cannot take: the checks of
    every model built on them."""
    if not is_int(latent_dim) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    widths = tuple(widths)
    if not widths or any(not is_int(w) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, one per downsampling, got {widths!r}")
    _, height, width = image_shape
    if min(height, width) < 2 ** len(widths) // 2:
        raise ValueError(f"images of {height}x{width} are too small for {len(widths)} downsamplings; "
                         "pass fewer widths")
    return widths


class ConvAutoencoderNet(Autoencoder):
    """A convolutional autoencoder with a dense latent of any size, for any (C, H, W).

    ``widths`` are the encoder's channel counts, one per 2x downsampling; the decoder
    mirrors them. ``encode``: (n, C, H, W) -> (n, latent_dim).
    """

    options = ("latent_dim", "widths")

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = 32,
                 widths: tuple[int, ...] = (16, 32)):
        super().__init__()
        widths = check_conv_options(image_shape, latent_dim, widths)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(self.image_shape, latent_dim, widths)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, widths, self.encoder.feature_shape)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)


# Models by name, for configs, the estimator and the CLI; the library passes model objects around.
# The families in modules of their own add themselves: see the imports at the end of this module.
MODELS: dict[str, type[Autoencoder]] = {"seed": SeedAutoencoder, "conv": ConvAutoencoderNet}
DEFAULTS = {"latent_dim": 32, "widths": (16, 32)}  # for the models whose options they are


def check_options(name: str, **options) -> dict:
    """The options (set, i.e. not None) that model ``name`` takes, or a one-line error
    naming the model and the option it does not take."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    given = {key: value for key, value in options.items() if value is not None}
    refused = [key for key in given if key not in MODELS[name].options]
    if refused:
        takes = f"takes {', '.join(MODELS[name].options)}" if MODELS[name].options else "takes no options"
        others = [other for other, cls in MODELS.items() if set(refused) <= set(cls.options)]
        hint = f"; use model={others[0]!r} to choose {' or '.join(refused)}" if others else ""
        raise ValueError(f"model={name!r} {takes}, not {', '.join(refused)}{hint}")
    return given


# The largest images and models aekit builds, checked before anything is allocated: beyond
# them a size is a typo (latent_dim=1000000000), and would otherwise end in an allocator error.
MAX_IMAGE_VALUES = 2 ** 26  # C * H * W: 8192 x 8192 grey or 4096 x 4096 RGBA, 256 MiB an image in float32
MAX_PARAMETERS = 2 ** 30    # 4 GiB of float32 weights; 16 GiB to train (gradients, Adam's two moments)


def build_model(name: str, image_shape: tuple[int, int, int], **options) -> Autoencoder:
    """Model ``name`` of :data:`MODELS` for images of ``image_shape = (C, H, W)``, with its
    ``options`` (e.g. ``latent_dim``, ``widths`` for ``conv``); options left None take
    :data:`DEFAULTS`. Images or a model larger than :data:`MAX_IMAGE_VALUES` /
    :data:`MAX_PARAMETERS` are refused before anything is allocated."""
    given = check_options(name, **options)
    cls = MODELS[name]
    kwargs = {key: given.get(key, DEFAULTS[key]) for key in cls.options}
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    check_size(name, image_shape, kwargs)
    return cls(image_shape, **kwargs)


def check_size(name: str, image_shape: tuple[int, int, int], kwargs: dict) -> None:
    """A one-line error for images of ``image_shape`` (C, H, W) over :data:`MAX_IMAGE_VALUES`,
    or a model ``name`` built with ``kwargs`` of over :data:`MAX_PARAMETERS` parameters,
    counted on PyTorch's meta device: shapes only, no memory, no draw from torch's generator."""
    channels, height, width = image_shape
    values = channels * height * width
    if values > MAX_IMAGE_VALUES:
        raise ValueError(f"images of {height}x{width} pixels with {channels} channel(s) are {values:,} values "
                         f"each, more than aekit builds a model for ({MAX_IMAGE_VALUES:,}, e.g. 8192x8192 grey); "
                         "use smaller images (resize them)")
    # Every layer has a bias per output: a single size over the bound is already too many
    # (and would overflow the meta device's size arithmetic).
    sizes = [v for value in kwargs.values() for v in (value if isinstance(value, tuple) else (value,))
             if isinstance(v, int)]
    count = max(sizes, default=0)
    if count <= MAX_PARAMETERS:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            count = count_parameters(MODELS[name](image_shape, **kwargs))
    if count > MAX_PARAMETERS:
        sized = ", ".join(f"{key}={value!r}" for key, value in kwargs.items() if key != "beta")
        raise ValueError(f"model={name!r} ({sized}) for {height}x{width}x{channels} images would have at least "
                         f"{count:,} parameters, more than aekit builds ({MAX_PARAMETERS:,}: 4 GiB of weights, 16 GiB "
                         "to train); choose fewer latent dimensions or channels, or smaller images")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_keras_(model: nn.Module) -> None:
    """Keras' defaults for ``Conv2D`` and ``Dense``: glorot_uniform kernels, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def init_he_(model: nn.Module) -> None:
    """He (Kaiming) uniform kernels for the layers that feed a ReLU, Glorot for the others,
    zero biases.

    A layer feeds a ReLU when the next module after it (in ``model.modules()`` order, as in
    an ``nn.Sequential``) is one. The output convolution feeds a sigmoid and a dense
    bottleneck is linear, so both get Glorot.
    """
    modules = list(model.modules())
    for i, layer in enumerate(modules):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if i + 1 == len(modules) or not isinstance(modules[i + 1], nn.ReLU):
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
    # The output shapes from a pass on PyTorch's meta device: shapes only, so the table of a
    # large image costs no memory for its activations.
    meta = {name: tensor.to("meta") for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta, (torch.zeros(1, channels, height, width, device="meta"),))
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
    "Loss", "loss", "objectives", "reconstruction_loss", "logits_loss", "check_options", "check_conv_options",
    "DEFAULTS", "training_data",
    "batch_generator", "check_size", "MAX_IMAGE_VALUES", "MAX_PARAMETERS",
]



# The families in modules of their own, which build on the classes above and add themselves to
# MODELS (imported last, so that importing either module first works).
DEFAULTS["beta"] = 1.0  # model "vae": the weight of the KL term
from aekit import neighbours, pcaconv, vae  # noqa: E402,F401
