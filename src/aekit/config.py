"""What defines a training run: the recipes, the rules that choose from the data, and
:class:`TrainConfig`, which a run saves as its config.json.

A *recipe* names a set of training choices (loss, initialisation, learning rate, schedule,
batch size). Two ship:

- ``blog``: the post as written. Keras' defaults (glorot_uniform kernels, zero biases,
  Adam lr 1e-3 / eps 1e-7), mean squared error, batch 128. On MNIST this stays on the
  blank-output plateau (test MSE 0.113, an all-black reconstruction), as the post's code does
  in Keras on every backend.
- ``default``: binary cross-entropy on the logits, He initialisation, batch 32 and a higher
  learning rate decayed to zero by a cosine schedule. See the README for the measurements
  behind each choice.

The number of epochs is not a recipe's: left unset, the number of training images decides
it (:func:`default_epochs`), and few images get a held-out share to choose the epoch
(:func:`default_held_out`); :mod:`aekit.experiment` applies both, for ``aekit train`` and
``ConvAutoencoder().fit`` alike.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from aekit import models
from aekit.fast import PRECISIONS
from aekit._typed import conform, from_plain, is_int, is_real, plain
from aekit.models import INITS
from aekit.noise import parse_noise


@dataclass(frozen=True)
class Recipe:
    """A named set of training choices; every field can be overridden in TrainConfig."""

    loss: str
    init: str
    lr: float
    schedule: str
    batch_size: int


RECIPES = {
    "blog": Recipe(loss="mse", init="keras", lr=1e-3, schedule="constant", batch_size=128),
    "default": Recipe(loss="bce", init="he", lr=3e-3, schedule="cosine", batch_size=32),
}
SCHEDULES = ("constant", "cosine")

# The number of epochs when none is given (aekit train, ConvAutoencoder(epochs=None)): enough
# epochs for EPOCH_RULE_STEPS optimiser steps, within EPOCH_RULE_RANGE. A small data set gets
# more passes over it, a large one at least ten (README, "Defaults"; config.json records it).
EPOCH_RULE_STEPS = 3000
EPOCH_RULE_RANGE = (10, 100)


def default_epochs(n_images: int, batch_size: int) -> tuple[int, str]:
    """(epochs, the rule in words) for training on ``n_images`` in batches of ``batch_size``."""
    steps_per_epoch = math.ceil(n_images / batch_size)
    low, high = EPOCH_RULE_RANGE
    epochs = min(high, max(low, math.ceil(EPOCH_RULE_STEPS / steps_per_epoch)))
    return epochs, (f"{epochs} epochs: {EPOCH_RULE_STEPS:,} optimiser steps at {steps_per_epoch:,} a pass "
                    f"over {n_images:,} images in batches of {batch_size}, kept within {low}..{high}")


# When the epoch rule gives more than its minimum (fewer than about 9,600 images at batch 32),
# many passes over few images can learn those images rather than what they have in common.
# A run then holds out HELD_OUT_SHARE of them, at random, and keeps the weights of the
# epoch with the lowest loss on them (README, "Defaults"; config.json records it).
HELD_OUT_SHARE = 0.1


def default_held_out(n_images: int, batch_size: int) -> int:
    """How many of ``n_images`` a run whose epochs the rule chose holds out to choose its
    epoch (0: none)."""
    epochs, _ = default_epochs(n_images, batch_size)
    return int(n_images * HELD_OUT_SHARE) if epochs > EPOCH_RULE_RANGE[0] else 0


# The options that aekit 0.3 and older recorded as config fields of their own; a config.json
# (or the config inside a weights file) written then reads with them in model_params.
LEGACY_OPTIONS = ("latent_dim", "widths", "beta")

MAX_SEED = 2 ** 63 - 1  # seeds are int64 in torch's generators (and in numpy's SeedSequence, any size)


def check_seed(seed) -> int:
    """``seed``, or a one-line error for one that is not an int in [0, :data:`MAX_SEED`]."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is out of range; expected an int from 0 to 2**63 - 1")
    return seed


@dataclass
class TrainConfig:
    """Everything that defines a training run, saved as the run's config.json.

    Fields left ``None`` take the recipe's value when the config is resolved; ``epochs``
    left ``None`` is chosen from the number of training images (:func:`default_epochs`)
    when the run starts, and recorded with the rule in ``chosen``. The defaults are the
    README's table ("Defaults"), the same for ``aekit train`` and ``ConvAutoencoder()``.
    """

    data: str = "mnist"
    model: str = "pca-conv"
    # The options the model's family declares in its Options (latent_dim, widths, beta, ...);
    # resolved, every one of them, those not given at the family's default.
    model_params: dict[str, Any] = field(default_factory=dict)
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
    # The forward pass's arithmetic while training (aekit.fast.mixed_precision): "bfloat16"
    # trains faster where the CPU or GPU has bfloat16 units, and not the same run as "float32".
    precision: str = "float32"
    device: str = "auto"
    resize: tuple[int, int] | None = None
    stream: bool = False  # read the data from disk batch by batch (aekit.data.streams)
    image_shape: tuple[int, int, int] | None = field(default=None)  # (C, H, W), set from the data
    data_source: str | None = None  # set by the run: where `data` was found (aekit.data.data_source)
    chosen: dict[str, str] = field(default_factory=dict)  # field -> the rule that chose its value from the data

    def resolved(self, model: torch.nn.Module | None = None) -> TrainConfig:
        """A copy with the recipe's values filled in and every field validated. The loss is
        one the model offers: that of ``model`` when one is given to be trained with this
        config (:func:`aekit.training.fit`'s own), else that of the family ``self.model``."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {sorted(RECIPES)}")
        recipe = dataclasses.asdict(RECIPES[self.recipe])
        # plain: numpy numbers (a grid search's np.arange) become the Python ones config.json can hold.
        filled = {k: plain(recipe[k] if getattr(self, k) is None and k in recipe else getattr(self, k))
                  for k in (f.name for f in dataclasses.fields(self))}
        # A model owns its objective: one that does not offer the recipe's loss trains on its first.
        offered = _objectives(self.model, model)[0] if model is not None or self.model in models.MODELS else ()
        if self.loss is None and offered and recipe["loss"] not in offered:
            filled["loss"] = offered[0]
        if not isinstance(self.model_params, dict):
            raise ValueError(f"model_params must be a dict of option names to values, got {self.model_params!r}")
        if self.model in models.MODELS:
            filled["model_params"] = models.resolve_options(self.model, {k: plain(v) for k, v in self.model_params.items()})
        config = TrainConfig(**filled)
        config.validate(model)
        return config

    def validate(self, model: torch.nn.Module | None = None) -> None:
        """Raise a one-line ValueError for a field that no run can take; the loss must be one
        that ``model`` (as in :meth:`resolved`) offers."""
        def positive(name: str, value) -> None:
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        if not isinstance(self.model_params, dict):
            raise ValueError(f"model_params must be a dict of option names to values, got {self.model_params!r}")
        positive("epochs", self.epochs)
        check_seed(self.seed)
        for name, shape, size in (("resize", self.resize, 2), ("image_shape", self.image_shape, 3)):
            if shape is not None and (len(shape) != size or not all(
                    is_int(v) and v > 0 for v in shape)):
                raise ValueError(f"{name} must be {size} positive ints, got {shape!r}")
        options = models.resolve_options(self.model, self.model_params)  # after image_shape: the check reads it
        models.MODELS[self.model].Options(**options).check(self.image_shape)
        parse_noise(self.noise)
        positive("batch_size", self.batch_size)
        positive("limit", self.limit)
        positive("patience", self.patience)
        if self.lr is not None and not (is_real(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1), got {self.lr!r}")
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("init", self.init, tuple(INITS)),
                                     ("precision", self.precision, PRECISIONS)):
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        offered, owner = _objectives(self.model, model)
        if self.loss is not None and self.loss not in offered:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {', '.join(offered)} "
                             f"(the objectives {owner} offers)")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be true or false, got {self.stream!r}")
        if self.device != "auto":
            resolve_device(self.device)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From JSON-decoded ``data``, each field checked against its type (lists -> tuples),
        the model's options against the types its family declares and completed with its
        defaults. A config of aekit 0.3 or older, with the options as fields of their own,
        reads as one with ``model_params``; an option it left out (null) was built at the
        family's default, and reads so. An option the config does not name at all reads as
        its field's ``metadata["absent"]`` where the family declares one (an option added
        with a default other than what runs did before it), else at its default."""
        if not isinstance(data, dict):
            return from_plain(cls, data, "config")  # the one error for what is not an object
        data = dict(data)
        legacy = {key: data.pop(key) for key in LEGACY_OPTIONS if key in data}
        params = data.pop("model_params", {})
        if not isinstance(params, dict) or not all(isinstance(key, str) for key in params):
            raise ValueError(f"config.model_params must be an object of option names, got {reprlib.repr(params)}")
        params = {**{key: value for key, value in legacy.items() if value is not None}, **params}
        config = from_plain(cls, data, "config")
        family = models.MODELS.get(config.model)
        if family is not None:  # an unknown model is refused, by name, when the config is validated
            # An option the family gained after the config was written: the value that means
            # what the run did, where that is not the option's default (metadata "absent").
            params = {**{f.name: f.metadata["absent"] for f in dataclasses.fields(family.Options)
                         if "absent" in f.metadata}, **params}
            hints = typing.get_type_hints(family.Options)
            params = models.resolve_options(config.model, {
                key: conform(value, hints[key], f"config.model_params.{key}") if key in hints else value
                for key, value in params.items()})
        return dataclasses.replace(config, model_params=params)


def _objectives(name: str, model: torch.nn.Module | None) -> tuple[tuple[str, ...], str]:
    """(the objectives offered, who offers them): ``model``'s own when given (a module
    without ``objectives`` is trained on reconstruction alone), else family ``name``'s."""
    if model is None:
        return models.MODELS[name].objectives, f"model={name!r}"
    return getattr(model, "objectives", models.RECONSTRUCTION_OBJECTIVES), type(model).__name__


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
        raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use device=\"cpu\"")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use device=\"cpu\"")
    return device


__all__ = ["Recipe", "RECIPES", "SCHEDULES", "TrainConfig", "resolve_device", "default_epochs",
           "default_held_out", "HELD_OUT_SHARE", "EPOCH_RULE_STEPS", "EPOCH_RULE_RANGE", "check_seed", "MAX_SEED"]
