"""``model="seed"``: the seed's convolutional autoencoder, layer for layer.

The blog's Keras network (``Conv2D(16) -> MaxPool -> Conv2D(8) -> MaxPool -> Conv2D(8)``,
a mirrored decoder with ``UpSampling2D`` and a sigmoid output, 4,385 parameters) written as
two PyTorch modules, ``encoder`` and ``decoder``, so that the 7x7x8 bottleneck (the blog's
``conv2d_3``) can be read and decoded on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from aekit.models.base import Autoencoder
from aekit.models.blocks import conv3x3
from aekit.models.registry import register


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


@register("seed")
class SeedAutoencoder(Autoencoder):
    """The blog's full network, 4,385 parameters for 28x28x1 input; latent (n, 8, H/4, W/4).

    ``image_shape`` is ``(C, H, W)``. The two 2x2 poolings need H and W divisible by 4
    for the output to match the input size. No options.
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
