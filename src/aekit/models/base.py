"""What every model family is: :class:`Autoencoder`, its hooks with their defaults, and its loss.

A model owns its objective: :meth:`Autoencoder.loss` gives the loss of reconstructing a
batch, and the named parts of it worth logging, for each objective the model offers
(``objectives``). The training loop, DDP, checkpoints, the estimator and the CLI ask the
model through the hooks declared here (``loss``, ``objectives``, ``training_data``,
``test_metrics``, ``fit_outlier_score`` / ``outlier_score``, ``can_sample`` /
``sample_latents``), each with the default a family that does not override it gets, and
know nothing else about it. Any ``nn.Module`` can still be trained and scored:
:func:`loss`, :func:`objectives`, :func:`training_data`, :func:`fit_outlier_score` and
:func:`outlier_score` give a module without the hooks the plain reconstruction loss and
error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


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


def image_errors(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The per-image error, as aekit means it everywhere (the test MSE, the estimators'
    ``reconstruction_error``, the default outlier score): the mean over pixels of
    (reconstruction - image)², in float64, reconstructions clipped to [0, 1].
    Both (n, C, H, W) (or any (n, ...)) -> float64 (n,), on their device."""
    recon = reconstructions.detach().double().clamp(0.0, 1.0)
    return ((recon - images.detach().double()) ** 2).flatten(1).mean(1)


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


# What a module without an ``outlier_score`` is scored by (and what the recorded threshold
# of a run from before outlier scores were a model's own was taken on).
RECONSTRUCTION_ERROR = "reconstruction error"


def fit_outlier_score(model: nn.Module, images) -> None:
    """``model.fit_outlier_score(images)``, or nothing for a module without one: what
    :func:`aekit.experiment.train` calls once the weights are final."""
    own = getattr(model, "fit_outlier_score", None)
    if callable(own):
        own(images)


def outlier_score(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.outlier_score(x)``, or :func:`image_errors` of ``model(x)`` for a module
    without one: the one place a per-image outlier score comes from."""
    own = getattr(model, "outlier_score", None)
    return own(x) if callable(own) else image_errors(model(x), x)


def outlier_score_name(model: nn.Module) -> str:
    """What :func:`outlier_score` measures for ``model``: recorded beside every threshold
    taken on it, so that a threshold is never compared with another model's kind of score."""
    return getattr(model, "outlier_score_name", RECONSTRUCTION_ERROR)


def draw_seed() -> int:
    """A model's seed for :func:`batch_generator` (a VAE's noise, a map's edges, a restore
    model's turns), drawn from torch's global generator when the model is built, so the run's
    seed decides it. A plain int, not a buffer: fast.ChunkPool's copies share parameters only.
    Drawn on the CPU also when the model is built on the meta device (models.check_size
    counts parameters there)."""
    return int(torch.randint(0, 2 ** 62, (), device="cpu"))


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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class NoOptions:
    """The options of a family that takes none beside the image shape."""

    def check(self, image_shape: tuple[int, int, int] | None) -> None:
        """Nothing to check."""


class Autoencoder(nn.Module):
    """``decoder(encoder(x))``: an encoder and a decoder whose last layer gives logits and
    whose forward applies the sigmoid; trained on reconstruction alone.

    A subclass sets ``encoder``, ``decoder``, ``image_shape`` (C, H, W) and ``latent_shape``,
    and overrides the hooks below where its family differs from the defaults. ``Options``:
    a frozen dataclass of the constructor arguments :func:`aekit.models.build_model` may pass
    beside image_shape (each field with its default and ``metadata["help"]``; an int field's
    flag takes positive values, or from 0 with ``metadata["minimum"] = 0``; an option added
    with a default other than what the family did before it declares that older value as
    ``metadata["absent"]``, which a config.json without the option reads as), with a
    ``check(image_shape)`` that raises the one-line error of a value the family cannot take
    (``image_shape`` None: before the data is read, the values alone);
    ``options``, the names of its fields, is set from it for every subclass.
    """

    encoder: nn.Module
    decoder: nn.Module
    Options: type = NoOptions
    options: tuple[str, ...] = ()
    objectives: tuple[str, ...] = RECONSTRUCTION_OBJECTIVES
    can_sample: bool = False  # a prior to draw latents from (sample_latents): new images
    outlier_score_name: str = RECONSTRUCTION_ERROR  # what outlier_score measures

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.options = tuple(f.name for f in fields(cls.Options))

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """The loss of reconstructing ``target`` from ``x`` (both (n, C, H, W) in [0, 1])
        under ``objective``, one of ``objectives``."""
        return reconstruction_loss(self, x, target, objective)

    def check_objective(self, objective: str, family: str | None = None) -> None:
        """A ValueError unless ``objective`` is one of :attr:`objectives`, for a family's own
        :meth:`loss` to raise before it draws or computes anything; ``family``, its ``model=``
        name, is named in the message."""
        if objective not in self.objectives:
            where = f" for model={family!r}" if family else ""
            raise ValueError(f"unknown objective {objective!r}{where}; expected one of {self.objectives}")

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

    def test_metrics(self, images) -> dict:
        """What a run reports in metrics.json beside its test loss, computed on the test
        images (an :class:`aekit.data.ImageSource`) by the main rank only: name -> number
        (or text). The default reports nothing more."""
        return {}

    def fit_outlier_score(self, images) -> None:
        """What :meth:`outlier_score` takes from the training images (an
        :class:`aekit.data.ImageSource`) once the weights are final: :func:`aekit.experiment.train`
        calls it after the last epoch (and after restoring the best held-out epoch's
        weights), on every DDP rank, before the outlier threshold is taken. What it keeps
        belongs in buffers, which the weights file saves. The default takes nothing."""

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> float64 (n,) >= 0: how unlike the training images each
        image is, higher is more unusual. What the estimators' ``score_samples`` (its
        negative), the outlier threshold in metrics.json, ``aekit score`` and the report's
        histogram rank images by. A family that overrides it names its score in
        ``outlier_score_name``. The default: the reconstruction error (:func:`image_errors`)."""
        return image_errors(self(x), x)

    def sample_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, *latent_shape) latents drawn from the model's prior with ``generator`` (a
        CPU generator), for :meth:`decode` to turn into new images. Only for a family with
        ``can_sample``; the default has no prior."""
        raise NotImplementedError(f"{type(self).__name__} has no prior to sample from (can_sample is False)")

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
