"""``model="conv"``: a convolutional autoencoder with a dense latent of any size, for images
of any (C, H, W): a :class:`~aekit.models.blocks.ConvEncoder` and its mirror."""

from __future__ import annotations

from aekit.models.base import Autoencoder
from aekit.models.blocks import ConvDecoder, ConvEncoder, ConvOptions
from aekit.models.registry import register


@register("conv")
class ConvAutoencoderNet(Autoencoder):
    """A convolutional autoencoder with a dense latent of any size, for any (C, H, W).

    ``widths`` are the encoder's channel counts, one per 2x downsampling; the decoder
    mirrors them. ``encode``: (n, C, H, W) -> (n, latent_dim).
    """

    Options = ConvOptions

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = Options.latent_dim,
                 widths: tuple[int, ...] = Options.widths):
        super().__init__()
        self.Options(latent_dim, widths).check(image_shape)
        widths = tuple(widths)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(self.image_shape, latent_dim, widths)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, widths, self.encoder.feature_shape)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)
