"""Models by name (:data:`MODELS`), for configs, the estimator and the CLI: the library passes
model objects around, and looks names up here, at the edge only.

A family joins with the :func:`register` class decorator in its own module; this module
imports no family (:mod:`aekit.models` imports them, which registers them).
:func:`build_model` builds one by name with its options, defaults from the family's
``Options``, after checking that it fits :data:`MAX_IMAGE_VALUES` and :data:`MAX_PARAMETERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from aekit.models.base import Autoencoder, count_parameters

MODELS: dict[str, type[Autoencoder]] = {}

# The largest images and models aekit builds, checked before anything is allocated: beyond
# them a size is a typo (latent_dim=1000000000), and would otherwise end in an allocator error.
MAX_IMAGE_VALUES = 2 ** 26  # C * H * W: 8192 x 8192 grey or 4096 x 4096 RGBA, 256 MiB an image in float32
MAX_PARAMETERS = 2 ** 30    # 4 GiB of float32 weights; 16 GiB to train (gradients, Adam's two moments)


def register(name: str) -> Callable[[type[Autoencoder]], type[Autoencoder]]:
    """A class decorator: the family is :data:`MODELS` ``[name]``. A name is taken once."""
    def add(cls: type[Autoencoder]) -> type[Autoencoder]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered (by {MODELS[name].__module__}."
                             f"{MODELS[name].__qualname__}); register {cls.__name__} under another name")
        MODELS[name] = cls
        return cls
    return add


def check_options(name: str, **options) -> dict:
    """The options (set, i.e. not None) that model ``name`` takes, or a one-line error
    naming the model and the option it does not take."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    given = {key: value for key, value in options.items() if value is not None}
    # A name that is not an identifier (a config.json key can be any text) is quoted, so the
    # message stays one line.
    refused = [key if key.isidentifier() else repr(key) for key in given if key not in MODELS[name].options]
    if refused:
        takes = f"takes {', '.join(MODELS[name].options)}" if MODELS[name].options else "takes no options"
        others = [other for other, cls in MODELS.items() if set(refused) <= set(cls.options)]
        hint = f"; use model={others[0]!r} to choose {' or '.join(refused)}" if others else ""
        raise ValueError(f"model={name!r} {takes}, not {', '.join(refused)}{hint}")
    return given


def resolve_options(name: str, options: dict) -> dict:
    """Every option model ``name`` declares in its ``Options``: those in ``options`` as given
    (sequences as tuples), the others at the family's default. Unknown names are refused as
    :func:`check_options` refuses them; the values are checked where the model is built."""
    given = check_options(name, **options)
    defaults = MODELS[name].Options()
    return {key: _plain(given.get(key, getattr(defaults, key))) for key in MODELS[name].options}


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def build_model(name: str, image_shape: tuple[int, int, int], **options) -> Autoencoder:
    """Model ``name`` of :data:`MODELS` for images of ``image_shape = (C, H, W)``, with its
    ``options`` (e.g. ``latent_dim``, ``widths`` for ``conv``); options left None take the
    defaults of the family's ``Options``. Images or a model larger than
    :data:`MAX_IMAGE_VALUES` / :data:`MAX_PARAMETERS` are refused before anything is allocated."""
    kwargs = resolve_options(name, options)
    check_size(name, image_shape, kwargs)
    return MODELS[name](image_shape, **kwargs)


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
    # The options that size layers: those whose default is not a float (a weight, e.g. beta)
    # or a bool (a switch, e.g. binarize).
    sized = {f.name: kwargs[f.name] for f in fields(MODELS[name].Options)
             if f.name in kwargs and not isinstance(f.default, (float, bool))}
    # Every layer has a bias per output: a single size over the bound is already too many
    # (and would overflow the meta device's size arithmetic).
    sizes = [v for value in sized.values() for v in (value if isinstance(value, tuple) else (value,))
             if isinstance(v, int)]
    count = max(sizes, default=0)
    if count <= MAX_PARAMETERS:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            count = count_parameters(MODELS[name](image_shape, **kwargs))
    if count > MAX_PARAMETERS:
        described = ", ".join(f"{key}={value!r}" for key, value in sized.items())
        raise ValueError(f"model={name!r} ({described}) for {height}x{width}x{channels} images would have at least "
                         f"{count:,} parameters, more than aekit builds ({MAX_PARAMETERS:,}: 4 GiB of weights, 16 GiB "
                         "to train); choose fewer latent dimensions or channels, or smaller images")
