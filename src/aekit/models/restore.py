"""``model="restore"``: a conv autoencoder trained to undo rotations, for one-class detection.

Each training image goes in turned by a random multiple of 90 degrees and must come out the
way up it was (:data:`TURNS`: a quarter turn each way and a half turn for square images, a
half turn alone otherwise). To restore an image the model has to learn which way up the
training images stand, which is knowledge of what they are; an image of another kind is
restored worse. This is the Inverse-Transform AutoEncoder (Huang et al., 2019) with
rotations, as ARNet (Ye et al.) restores "erased" orientation.

Its outlier score is the mean, over every turn (the unturned image included), of the error
of restoring the turned image to the image (:func:`~aekit.models.base.image_errors`)::

    score(x) = mean_t  mean_pixels (restore(turn_t(x)) - x)^2

Measured on the one-class protocol (one class of MNIST or Fashion-MNIST fitted, the
10,000 test images ranked): 96.9 and 92.6 mean AUROC, against 95.8 and 91.6 for the default
model with its own score (seed 0; bench/ANCHORS.md). ``encode``, ``decode`` and
``forward`` are the conv autoencoder's on the image as given (a reconstruction), so the
verbs of a run (reconstruct, transform, denoise) work as for ``model="conv"``.

The training loss turns each image of a batch by a turn drawn from a generator seeded by the
batch's contents (:func:`~aekit.models.base.batch_generator`), so the same images draw the
same turns in any thread and any order of a step's chunks; evaluation (the held-out and
test loss) turns them the same way, so ``val_loss`` reads the objective the model trains on.
"""

from __future__ import annotations

import torch

from aekit.models.base import Loss, batch_generator, draw_seed, image_errors, logits_loss
from aekit.models.conv import ConvAutoencoderNet
from aekit.models.registry import register

# Quarter turns (counter-clockwise, as torch.rot90) a square image may take; 0 is the image.
TURNS = (0, 1, 2, 3)
# Those of an image that is not square: a quarter turn would change its shape.
TURNS_NOT_SQUARE = (0, 2)
OUTLIER_SCORE = "mean error of restoring each rotation"  # outlier_score's name


def turns(image_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """The quarter turns images of ``image_shape`` (C, H, W) may take."""
    return TURNS if image_shape[1] == image_shape[2] else TURNS_NOT_SQUARE


def turn(x: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) images each turned by its own number of ``quarters`` (n,) -> (n, C, H, W)."""
    out = torch.empty_like(x)
    for k in quarters.unique().tolist():
        rows = quarters == k
        out[rows] = torch.rot90(x[rows], k, dims=(2, 3))
    return out


@register("restore")
class RestoreAutoencoder(ConvAutoencoderNet):
    """A conv autoencoder trained to turn images back the right way up, whose outlier score
    (the mean error of restoring each 90-degree turn) flags images unlike the training ones,
    for one-class detection. See the module docstring."""

    outlier_score_name = OUTLIER_SCORE

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = ConvAutoencoderNet.Options.latent_dim,
                 widths: tuple[int, ...] = ConvAutoencoderNet.Options.widths):
        super().__init__(image_shape, latent_dim, widths)
        self.turn_seed = draw_seed()  # the seed of the turns

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """Reconstructing ``target`` from ``x`` with each image turned by a random turn of
        :func:`turns`, under ``objective``."""
        self.check_objective(objective, "restore")
        allowed = torch.tensor(turns(self.image_shape))
        pick = torch.randint(len(allowed), (len(x),), generator=batch_generator(self.turn_seed, x, device="cpu"))
        turned = turn(x, allowed[pick].to(x.device))
        return logits_loss(self.logits(turned), target, objective)

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> float64 (n,): the mean over :func:`turns` of the error
        of restoring ``x`` turned so (see the module docstring)."""
        errors = [image_errors(self(torch.rot90(x, k, dims=(2, 3))), x) for k in turns(self.image_shape)]
        return torch.stack(errors).mean(0)
