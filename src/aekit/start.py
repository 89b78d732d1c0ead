"""What a run starts from: the model its config describes, and the optimiser that trains it.

:func:`new_model` builds the model of a :class:`~aekit.config.TrainConfig` from its seed
(:func:`seeded`), so that the same config gives the same weights in any process;
:func:`model_for` builds the same model to load trained weights into.
:func:`make_optimizer` and :func:`learning_rate` are the recipe's Adam and its schedule,
which :func:`aekit.training.fit` steps.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from aekit import models
from aekit.config import TrainConfig
from aekit.models import INITS

ADAM_EPS = 1e-7  # Keras' default; PyTorch's is 1e-8


@contextlib.contextmanager
def seeded(seed: int):
    """Inside: torch's global CPU generator seeded by ``seed``, for the draws PyTorch's layers
    make when built (and a model's own seeds, e.g. a VAE's noise_seed). After: the caller's
    generator state back, as if nothing had been drawn.

    Models are built on the CPU and moved afterwards, so only the CPU generator draws; it
    alone is seeded (``torch.manual_seed`` would also reseed every GPU's generator, which
    the fork does not restore). Not thread-safe, as torch's global generator itself.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def model_for(config: TrainConfig) -> nn.Module:
    """The untrained model ``config`` describes: ``config.model`` for ``config.image_shape``
    with its options; its weights as PyTorch initialises them under :func:`seeded`
    (``config.seed``), so that the seeds a model draws when built (a VAE's noise_seed, a
    map's graph_seed) are those it trained with. torch's global generator is left as found."""
    with seeded(config.seed):
        return _build(config)


def new_model(config: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model a run with ``config`` starts from: :func:`model_for`, then initialised by
    ``config.init`` from the same seeded draws, on ``device``. torch's global generator is
    left as found."""
    with seeded(config.seed):
        model = _build(config)
        INITS[config.init](model)
    return model.to(device)


def _build(config: TrainConfig) -> nn.Module:
    """:func:`model_for` without the seeding: the draws come from the global generator."""
    if config.image_shape is None:
        raise ValueError("config.image_shape is None; set it to the images' (C, H, W)")
    return models.build_model(config.model, config.image_shape, **config.model_params)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with Keras' epsilon; the fused kernel where PyTorch has one for the device.

    Fused Adam is the same update in one kernel per step instead of a dozen small ops per
    parameter (measured: 3-6% of a CPU training step, bench/RESULTS.md).
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=ADAM_EPS, fused=fused)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The recipe's learning rate at optimiser step ``step`` of ``total_steps``."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


__all__ = ["ADAM_EPS", "seeded", "model_for", "new_model", "make_optimizer", "learning_rate"]
