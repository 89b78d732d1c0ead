"""The layers families are built from: :func:`conv3x3`, the :class:`ConvEncoder` /
:class:`ConvDecoder` pair of a dense latent, and :class:`ConvOptions`, the options (and their
checks) of every family built on that pair."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aekit._typed import is_int


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Keras' ``Conv2D(out, (3, 3), padding='same')``: stride 1, spatial size kept."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


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


@dataclass(frozen=True)
class ConvOptions:
    """The options of a family built on a :class:`ConvEncoder` / :class:`ConvDecoder` pair."""

    latent_dim: int = field(default=32, metadata={"help": "numbers in the code: the dense latent's size"})
    widths: tuple[int, ...] = field(default=(16, 32), metadata={
        "help": "the encoder's channels, one per 2x downsampling; the decoder mirrors them"})

    def check(self, image_shape: tuple[int, int, int] | None) -> None:
        """A one-line error for a ``latent_dim``, ``widths`` or image size (C, H, W) that the
        encoder and decoder cannot take (the size only where ``image_shape`` is known)."""
        if not is_int(self.latent_dim) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        widths = tuple(self.widths)
        if not widths or any(not is_int(w) or w < 1 for w in widths):
            raise ValueError(f"widths must be positive integers, one per downsampling, got {widths!r}")
        if image_shape is None:
            return
        _, height, width = image_shape
        if min(height, width) < 2 ** len(widths) // 2:
            raise ValueError(f"images of {height}x{width} are too small for {len(widths)} downsamplings; "
                             "pass fewer widths")
