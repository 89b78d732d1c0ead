"""``model="pca-conv"``: PCA plus convolutional corrections, an autoencoder that starts
where PCA ends.

The code of an image is its principal-component scores plus what a convolutional encoder
adds; the reconstruction is PCA's plus what a convolutional decoder adds, refined by a few
local convolutions::

    z      = P (x - mean) + a * s * e(x)                      (n, latent_dim)
    coarse = mean + P^T z + b * g(z / s)                      (n, C, H, W)
    x_hat  = clip(coarse + c * r(coarse), 0, 1)

``mean``, ``P`` (the top ``latent_dim`` principal directions, orthonormal rows) and ``s``
(each score's standard deviation) are fitted to the training images when a run starts
(:meth:`PCAConvAutoencoder.training_data`) and then kept fixed. ``e`` and ``g`` are
:class:`~aekit.models.blocks.ConvEncoder` and :class:`~aekit.models.blocks.ConvDecoder`, ``r`` is
:data:`REFINE_DEPTH` 3x3 convolutions; the gates ``a``, ``b``, ``c`` are learned scalars that
start at 0 (as in ReZero, Bachlechner et al. 2020), so the corrections grow in from nothing
at any learning rate, and the untrained model *is* PCA. Training, on the squared error,
adds what PCA cannot express: on MNIST most of the gain is the refinement ``r``. On
photographs it carries over to unseen pictures only when the training images are varied
enough (bench/QUALITY.md says where it does and does not beat PCA).

Trained on the squared error of the unclipped output (clipping would stop the gradient of
every pixel outside [0, 1]); ``forward`` clips, which only lowers the error of images in
[0, 1].

Its outlier score (what ``score_samples``, the threshold and ``aekit score`` read) is not the
reconstruction error alone, which the corrections make small for unusual images too: it
adds the error of the code decoded by the linear part alone and how far the code lies from
the training codes (:meth:`PCAConvAutoencoder.outlier_score`), fitted once training ends.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from aekit.models.base import RECONSTRUCTION_ERROR, Autoencoder, Loss, image_errors
from aekit.models.blocks import ConvDecoder, ConvEncoder, ConvOptions, conv3x3
from aekit.models.registry import register

REFINE_WIDTH, REFINE_DEPTH = 32, 3  # the local refinement: 3 3x3 convolutions, 7x7 pixels seen
PCA_IMAGES = 10000  # training images the principal directions are fitted to (a random sample)
OUTLIER_SCORE = "reconstruction and linear-decoding errors + code distance"  # outlier_score's name


def refine_net(channels: int) -> nn.Sequential:
    """(n, channels, H, W) -> the same: the local refinement, :data:`REFINE_DEPTH` 3x3
    convolutions of :data:`REFINE_WIDTH` channels with ReLUs between them."""
    return nn.Sequential(conv3x3(channels, REFINE_WIDTH), nn.ReLU(),
                         *[layer for _ in range(REFINE_DEPTH - 2)
                           for layer in (conv3x3(REFINE_WIDTH, REFINE_WIDTH), nn.ReLU())],
                         conv3x3(REFINE_WIDTH, channels))


class PCAConvEncoder(nn.Module):
    """(n, C, H, W) -> (n, latent_dim): principal-component scores plus a conv correction."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, widths: tuple[int, ...]):
        super().__init__()
        pixels = math.prod(image_shape)
        self.register_buffer("mean", torch.zeros(pixels))                  # (C*H*W,)
        self.register_buffer("components", torch.zeros(latent_dim, pixels))  # (latent_dim, C*H*W)
        self.register_buffer("scale", torch.ones(latent_dim))   # each score's standard deviation
        self.correction = ConvEncoder(image_shape, latent_dim, widths)
        self.gate = nn.Parameter(torch.zeros(()))  # the correction's weight, learned from 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (x.flatten(1) - self.mean) @ self.components.T            # (n, latent_dim)
        return scores + self.gate * self.scale * self.correction(x)


class PCAConvDecoder(nn.Module):
    """(n, latent_dim) -> (n, C, H, W): PCA's reconstruction plus a conv correction.

    ``raw`` is the unclipped output (what training's squared error is taken on);
    ``forward`` clips it to [0, 1].
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, widths: tuple[int, ...],
                 feature_shape: tuple[int, int, int]):
        super().__init__()
        pixels = math.prod(image_shape)
        self.image_shape = image_shape
        # The encoder's mean and directions again, so that the decoder stands alone (export, decode).
        self.register_buffer("mean", torch.zeros(pixels))                  # (C*H*W,)
        self.register_buffer("components", torch.zeros(latent_dim, pixels))  # (latent_dim, C*H*W)
        self.register_buffer("scale", torch.ones(latent_dim))
        self.correction = ConvDecoder(image_shape, latent_dim, widths, feature_shape)
        self.gate = nn.Parameter(torch.zeros(()))
        self.refine = refine_net(image_shape[0])
        self.refine_gate = nn.Parameter(torch.zeros(()))

    def linear(self, z: torch.Tensor) -> torch.Tensor:
        """(n, latent_dim) -> (n, C, H, W), unclipped: ``mean + P^T z``, the code decoded
        by PCA's part alone."""
        return (self.mean + z @ self.components).view(-1, *self.image_shape)

    def raw(self, z: torch.Tensor) -> torch.Tensor:
        linear = self.linear(z)
        coarse = linear + self.gate * self.correction.logits(z / self.scale)   # scores in, at unit scale
        return coarse + self.refine_gate * self.refine(coarse)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.raw(z).clamp(0.0, 1.0)


@register("pca-conv")
class PCAConvAutoencoder(Autoencoder):
    """PCA plus convolutional corrections, for any (C, H, W); see the module docstring.

    ``widths``: the correction's encoder channels per 2x downsampling, as in
    :class:`~aekit.models.conv.ConvAutoencoderNet`. ``encode``: (n, C, H, W) -> (n, latent_dim).
    """

    objectives = ("mse",)
    Options = ConvOptions

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = Options.latent_dim,
                 widths: tuple[int, ...] = Options.widths):
        super().__init__()
        self.Options(latent_dim, widths).check(image_shape)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.encoder = PCAConvEncoder(self.image_shape, latent_dim, tuple(widths))
        self.decoder = PCAConvDecoder(self.image_shape, latent_dim, tuple(widths),
                                      self.encoder.correction.feature_shape)
        self.register_buffer("code_mean", torch.zeros(latent_dim))                    # (latent_dim,)
        self.register_buffer("code_precision", torch.zeros(latent_dim, latent_dim))  # (latent_dim, latent_dim)
        self.register_buffer("error_scale", torch.zeros(2))  # training mean errors (full, linear); 0: not fitted

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    # What outlier_score keeps from the training images (fit_outlier_score); all zeros until
    # then, and in the weights of aekit 0.4 and before, which had none.
    OUTLIER_STATE = ("code_mean", "code_precision", "error_scale")

    @property
    def outlier_score_name(self) -> str:
        return OUTLIER_SCORE if self.error_scale[0] > 0 else RECONSTRUCTION_ERROR

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> float64 (n,): ``e / e_train + l / l_train + d(z) / latent_dim``.

        ``e`` is the reconstruction error; ``l`` the error of the image's code ``z``
        decoded by the linear part alone (``mean + P^T z``, clipped); ``e_train`` and
        ``l_train`` their means over the training images; ``d(z)`` the squared Mahalanobis
        distance of the code from the training codes (their mean and covariance), a
        latent-density term. Each term is 1 on average over the training images.

        Why not the reconstruction error alone: the decoder's corrections, the local
        refinement above all, sharpen whatever the code sketches, and so reconstruct images
        unlike the training ones too (a 1 drawn by a model of 8s); the linear decoding
        cannot, and an unusual code is unusual however well it decodes. Trained on one
        class and ranking the 10,000 test images (mean AUROC over the 10 classes, seed 0),
        the reconstruction error gives 94.4 on MNIST and 90.9 on Fashion-MNIST, this score
        95.7 and 91.6 (bench/ANCHORS.md has the others tried). A model without the
        statistics (trained by aekit 0.4 or before) scores by its reconstruction error.
        """
        if not self.error_scale[0] > 0:
            return super().outlier_score(x)
        z, errors = self._score_terms(x)
        centred = z - self.code_mean.double()
        distance = ((centred @ self.code_precision.double()) * centred).sum(1)  # (n,) squared Mahalanobis
        return (errors / self.error_scale.double()).sum(1) + distance.clamp_min(0) / self.latent_dim

    @torch.no_grad()
    def fit_outlier_score(self, images) -> None:
        """The mean and precision (pseudo-inverse covariance) of the training images'
        codes, and their mean errors (reconstruction, linear decoding), in float64, for
        :meth:`outlier_score`."""
        from aekit import inference  # it runs models, so it imports aekit.models: here, not in a cycle

        pieces = inference.map_batches(self, lambda m, c: m._score_terms(c), images)
        codes = torch.cat([z.cpu() for z, _ in pieces])          # (n, latent_dim) float64
        errors = torch.cat([e.cpu() for _, e in pieces])         # (n, 2) float64
        mean = codes.mean(0)
        centred = codes - mean
        covariance = centred.T @ centred / max(len(codes) - 1, 1)
        self.code_mean.copy_(mean)
        self.code_precision.copy_(torch.linalg.pinv(covariance, hermitian=True, rtol=1e-10))
        self.error_scale.copy_(errors.mean(0).clamp_min(1e-12))

    def _score_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> the code (n, latent_dim) and the errors (n, 2) of the
        reconstruction and of the linear decoding, both float64: what the outlier score is
        made of, and what :meth:`fit_outlier_score` takes the statistics of."""
        z = self.encoder(x)
        errors = torch.stack([image_errors(self.decoder(z), x), image_errors(self.decoder.linear(z), x)], 1)
        return z.double(), errors

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights from aekit 0.4 and before have no outlier statistics: they load as not
        # fitted, and the model scores by its reconstruction error, as it did then (as
        # BatchNorm fills in num_batches_tracked for its older weights).
        for name in self.OUTLIER_STATE:
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        self.check_objective(objective)
        raw = self.decoder.raw(self.encoder(x))
        return Loss(F.mse_loss(raw, target), raw.detach().clamp(0.0, 1.0), {})

    @contextlib.contextmanager
    def training_data(self, images, new: bool):
        """At the start of a run: the mean and principal directions of (a random sample of
        up to :data:`PCA_IMAGES` of) the training images, and the corrections' gates closed,
        so that the model starts as PCA. A continued run keeps its checkpoint's."""
        if new:
            self.fit_pca(images.sample(PCA_IMAGES, seed=0).to(self.encoder.mean.device))
        yield

    @torch.no_grad()
    def fit_pca(self, x: torch.Tensor) -> None:
        """Set the mean, principal directions and score scales from images ``x``
        (n, C, H, W), in float64, and close the corrections' gates. Directions past the
        data's rank stay zero."""
        flat = x.flatten(1).double()                                     # (n, C*H*W)
        mean = flat.mean(0)
        centred = flat - mean
        gram = centred.shape[0] <= centred.shape[1]  # fewer images than pixels: eigh of the smaller matrix
        values, vectors = torch.linalg.eigh(centred @ centred.T if gram else centred.T @ centred)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        # Directions with variance (above float64 rounding of the largest), at most latent_dim.
        rank = min(self.latent_dim, int((values > values[0].clamp_min(1e-300) * 1e-10).sum()))
        values, vectors = values[:rank], vectors[:, :rank]
        directions = (centred.T @ vectors) / values.sqrt() if gram else vectors  # (D, rank) orthonormal
        scale = (values / len(flat)).sqrt()                                      # (rank,) each score's std
        for pca in (self.encoder, self.decoder):
            pca.mean.copy_(mean)
            pca.components.zero_()
            pca.components[:rank] = directions.T
            pca.scale.fill_(1.0)
            pca.scale[:rank] = scale.clamp_min(1e-6)
            pca.gate.zero_()
        self.decoder.refine_gate.zero_()

