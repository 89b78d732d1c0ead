"""Initialisations by name (:data:`INITS`), for recipes and the CLI: they re-draw the weights
of any model's convolutions and dense layers in place."""

from __future__ import annotations

from torch import nn


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
