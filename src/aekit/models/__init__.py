"""aekit's models: plain PyTorch autoencoders, one family per file, and the registry of them.

A model owns its objective and declares what the rest of aekit may ask of it: the hooks
of :class:`~aekit.models.base.Autoencoder` (``loss`` and ``objectives``, ``training_data``,
``test_metrics``, ``fit_outlier_score`` / ``outlier_score``, ``can_sample`` /
``sample_latents``), each with a default. The training loop, DDP, checkpoints, the
estimator and the CLI ask those and know nothing else about a family. A new family is
one file in aekit/models/ with ``@register("name")`` on its class and a frozen
``Options`` dataclass of its constructor's options; importing that file registers it (this
package imports aekit's own):

- :mod:`~aekit.models.base`: the ``Autoencoder`` base, its hooks, ``Loss`` and the losses.
- :mod:`~aekit.models.registry`: :data:`MODELS`, ``register``, ``build_model``, size bounds.
- :mod:`~aekit.models.blocks`: ``conv3x3``, ``ConvEncoder`` / ``ConvDecoder``, ``ConvOptions``.
- :mod:`~aekit.models.init`: initialisations by name (:data:`INITS`).
- :mod:`~aekit.models.summary`: the Keras-style layer table (NHWC shapes, as in the blog).
- The families: :mod:`~aekit.models.seed` (``"seed"``, the blog's network),
  :mod:`~aekit.models.conv` (``"conv"``), :mod:`~aekit.models.map` (``"map"``),
  :mod:`~aekit.models.pca_conv` (``"pca-conv"``), :mod:`~aekit.models.vae` (``"vae"``),
  :mod:`~aekit.models.restore` (``"restore"``).

The models are plain PyTorch; :mod:`aekit.fast` runs them faster on the CPU, explicitly.
Shapes are NCHW inside PyTorch.
"""

from aekit.models.base import (RECONSTRUCTION_ERROR, RECONSTRUCTION_OBJECTIVES, Autoencoder, Loss, NoOptions,
                               batch_generator, count_parameters, fit_outlier_score, image_errors, logits_loss, loss,
                               objectives, outlier_score, outlier_score_name, reconstruction_loss, training_data)
from aekit.models.blocks import ConvDecoder, ConvEncoder, ConvOptions, conv3x3
from aekit.models.init import INITS, init_he_, init_keras_
from aekit.models.registry import (MAX_IMAGE_VALUES, MAX_PARAMETERS, MODELS, build_model, check_options,
                                   check_size, register, resolve_options)
from aekit.models.summary import summary

# The families, in the order of MODELS (the CLI's choices, compare's default methods).
from aekit.models.seed import SeedAutoencoder, SeedDecoder, SeedEncoder  # noqa: I001
from aekit.models.conv import ConvAutoencoderNet
from aekit.models.map import MapAutoencoder
from aekit.models.pca_conv import PCAConvAutoencoder
from aekit.models.vae import VAE
from aekit.models.restore import RestoreAutoencoder

__all__ = [
    "Autoencoder", "SeedAutoencoder", "SeedEncoder", "SeedDecoder", "ConvAutoencoderNet", "ConvEncoder",
    "ConvDecoder", "ConvOptions", "NoOptions", "MapAutoencoder", "PCAConvAutoencoder", "VAE", "RestoreAutoencoder",
    "MODELS", "INITS", "register", "build_model", "count_parameters", "init_keras_", "init_he_", "summary",
    "Loss", "loss", "objectives", "reconstruction_loss", "logits_loss", "check_options", "conv3x3",
    "RECONSTRUCTION_OBJECTIVES", "training_data", "batch_generator", "check_size", "MAX_IMAGE_VALUES",
    "MAX_PARAMETERS", "resolve_options", "image_errors", "fit_outlier_score", "outlier_score", "outlier_score_name",
    "RECONSTRUCTION_ERROR",
]
