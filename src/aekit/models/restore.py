"""``model="restore"``: a conv autoencoder trained to undo rotations and shifts, for one-class detection.

Each training image goes in turned by a random multiple of 90 degrees and must come out the
way up it was (:data:`TURNS`: a quarter turn each way and a half turn for square images, a
half turn alone otherwise). To restore an image the model has to learn which way up the
training images stand, which is knowledge of what they are; an image of another kind is
restored worse. This is the Inverse-Transform AutoEncoder (Huang et al., 2019) with
rotations, as ARNet (Ye et al.) restores "erased" orientation. With ``shift`` (default 0.2)
each turn is also taken of the image moved by that fraction of its side down, up, right or
left (the pixels moved in are 0), so that the model must also learn where the training
images stand in the frame: :func:`transformations`, 20 for a square image.

A linear head on the code also learns to name the transformation each training image was
given (cross-entropy, weighted ``turn_head``, default 1.0, beside the restoring loss), as
GEOM (Golan & El-Yaniv, 2018) classifies transformations; an image of another kind has its
transformations named worse. The outlier score combines how rare the image's two errors are
among the training images' (:meth:`RestoreAutoencoder.outlier_score`): the mean, over every
transformation (the image as it is included), of the error of restoring the transformed
image to the image (:func:`~aekit.models.base.image_errors`), and the mean over the
transformations of the cross-entropy of naming each. With ``turn_head=0`` there is no head,
and the score is the restoring error::

    score(x) = mean_t  mean_pixels (restore(transform_t(x)) - x)^2

Measured on the one-class protocol (one class of MNIST or Fashion-MNIST fitted, the 10,000
test images ranked; the mean of seeds 0 and 1, bench/ANCHORS.md): 98.17 and 94.54 mean AUROC
at the defaults, 98.45 on MNIST with ``widths=(32, 64)`` and 36 epochs; 97.77 and 93.84 with
the turns alone (``shift=0``); 96.93 and 92.68 with ``turn_head=0`` as well; 95.76 and 91.55
(Fashion-MNIST: seed 0) for the default model with its own score.
``encode``, ``decode`` and ``forward`` are the conv autoencoder's on the image as given (a
reconstruction), so the verbs of a run (reconstruct, transform, denoise) work as for
``model="conv"``.

The training loss gives each image of a batch a transformation drawn from a generator seeded
by the batch's contents (:func:`~aekit.models.base.batch_generator`), so the same images
draw the same transformations in any thread and any order of a step's chunks; evaluation
(the held-out and test loss) draws them the same way, so ``val_loss`` reads the objective
the model trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aekit._typed import is_real
from aekit.models.base import Loss, batch_generator, draw_seed, image_errors, logits_loss
from aekit.models.blocks import ConvOptions
from aekit.models.conv import ConvAutoencoderNet
from aekit.models.registry import register

# Quarter turns (counter-clockwise, as torch.rot90) a square image may take; 0 is the image.
TURNS = (0, 1, 2, 3)
# Those of an image that is not square: a quarter turn would change its shape.
TURNS_NOT_SQUARE = (0, 2)
OUTLIER_SCORE = "mean error of restoring each rotation"  # outlier_score's name
# outlier_score's name with a turn head: how rare each of its two errors is among the training images'.
OUTLIER_SCORE_WITH_TURNS = "rarity among the training images of the errors of restoring and of naming each rotation"
# The end of either name with shifts.
SHIFTS = " and shift"
# With a turn head, each error's distribution over the training images is kept as this many
# quantiles (at levels 0, 1/(Q-1), ..., 1): the tail fractions of outlier_score are read from them.
QUANTILES = 1001


def turns(image_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """The quarter turns images of ``image_shape`` (C, H, W) may take."""
    return TURNS if image_shape[1] == image_shape[2] else TURNS_NOT_SQUARE


def shift_pixels(image_shape: tuple[int, int, int], shift: float) -> tuple[int, int]:
    """The pixels (down, right) a ``shift`` (a fraction of the side) moves images of
    ``image_shape`` (C, H, W) by: round(shift * H), round(shift * W)."""
    return round(shift * image_shape[1]), round(shift * image_shape[2])


def transformations(image_shape: tuple[int, int, int], shift: float) -> tuple[tuple[int, int, int], ...]:
    """The (quarter turns, pixels down, pixels right) images of ``image_shape`` (C, H, W) may
    be given: each of :func:`turns`, of the image as it is and (``shift`` > 0) of the image
    moved by :func:`shift_pixels` down, up, right or left. Turn by turn, so that with
    ``shift`` 0 the i-th transformation is the i-th turn (a run from before shifts)."""
    down, right = shift_pixels(image_shape, shift)
    moves = ((0, 0),) + (((down, 0), (-down, 0), (0, right), (0, -right)) if shift else ())
    return tuple((k, dy, dx) for k in turns(image_shape) for dy, dx in moves)


def transform(x: torch.Tensor, quarters: int, down: int, right: int) -> torch.Tensor:
    """(n, C, H, W) images moved ``down`` and ``right`` by whole pixels (the pixels moved in
    from outside are 0), then turned counter-clockwise by ``quarters`` -> (n, C, H', W')."""
    if down or right:
        _, _, height, width = x.shape
        pad = max(abs(down), abs(right))
        x = F.pad(x, (pad,) * 4)[:, :, pad - down:pad - down + height, pad - right:pad - right + width]
    return torch.rot90(x, quarters, dims=(2, 3))


def transform_each(x: torch.Tensor, picks: torch.Tensor, table: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """(n, C, H, W) images each given its own transformation ``table[picks[i]]`` -> (n, C, H, W)
    (the turns of ``table`` keep the shape: :func:`turns`)."""
    out = torch.empty_like(x)
    for i in picks.unique().tolist():
        rows = picks == i
        out[rows] = transform(x[rows], *table[i])
    return out


@dataclass(frozen=True)
class RestoreOptions(ConvOptions):
    """The conv options, the weight of the naming term and the shifts."""

    turn_head: float = field(default=1.0, metadata={
        "absent": 0.0,  # a restore run from before the option had no turn head
        "help": "w > 0: also name each training image's transformation (its turn and shift) from its code (a "
                "linear head, cross-entropy weighted w), and add how rare an image's errors of restoring and of "
                "naming its transformations are to its outlier score; 0: restore transformed images alone (see "
                "bench/ANCHORS.md)"})
    shift: float = field(default=0.2, metadata={
        "absent": 0.0,  # a restore run from before the option turned images without moving them
        "help": "s > 0: also move each training image by s of its side down, up, right or left (or not) before "
                "turning it, to be restored and (with a turn head) named; 0: turns alone (see bench/ANCHORS.md)"})

    def check(self, image_shape: tuple[int, int, int] | None) -> None:
        """A one-line error for a ``turn_head`` that is not a non-negative number or a ``shift``
        outside [0, 0.5) or of less than a pixel, then the conv checks."""
        if not is_real(self.turn_head) or not 0 <= self.turn_head < math.inf:
            raise ValueError(f"turn_head must be a non-negative number (0: no turn head), got {self.turn_head!r}")
        if not is_real(self.shift) or not 0 <= self.shift < 0.5:
            raise ValueError(f"shift must be a fraction of the image's side in [0, 0.5) (0: no shifts), got {self.shift!r}")
        if image_shape is not None and self.shift and min(shift_pixels(image_shape, self.shift)) < 1:
            raise ValueError(f"shift={self.shift!r} moves images of {image_shape[1]}x{image_shape[2]} pixels by less "
                             f"than a pixel; pass at least {1 / min(image_shape[1:]):.3g}, or 0 for no shifts")
        super().check(image_shape)


@register("restore")
class RestoreAutoencoder(ConvAutoencoderNet):
    """A conv autoencoder trained to restore turned (and shifted) images and (``turn_head`` >
    0) to name the transformation, whose outlier score (how rare its errors of restoring and
    of naming each transformation are) flags images unlike the training ones, for one-class
    detection. See the module docstring."""

    Options = RestoreOptions

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = Options.latent_dim,
                 widths: tuple[int, ...] = Options.widths, turn_head: float = Options.turn_head,
                 shift: float = Options.shift):
        self.Options(latent_dim, widths, turn_head, shift).check(image_shape)
        super().__init__(image_shape, latent_dim, widths)
        self.turn_seed = draw_seed()  # the seed of the turns
        self.turn_head, self.shift = float(turn_head), float(shift)
        self.transformations = transformations(self.image_shape, self.shift)  # (quarters, down, right) each
        if self.turn_head:  # drawn after the autoencoder's layers: without it, the model of before
            # (n, latent_dim) -> (n, transformations) logits
            self.head = nn.Linear(latent_dim, len(self.transformations))
            # Each error's quantiles over the training images, and their number (fit_outlier_score); 0: not fitted.
            self.register_buffer("error_quantiles", torch.zeros(2, QUANTILES, dtype=torch.float64))
            self.register_buffer("fitted_images", torch.zeros((), dtype=torch.float64))

    @property
    def outlier_score_name(self) -> str:
        name = OUTLIER_SCORE_WITH_TURNS if self.turn_head else OUTLIER_SCORE
        return name + SHIFTS if self.shift else name

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """Reconstructing ``target`` from ``x`` with each image given a random one of its
        :func:`transformations`, under ``objective``; with ``turn_head``, plus that weight
        times the cross-entropy of naming each image's transformation from its code (parts
        "reconstruction", "turns")."""
        self.check_objective(objective, "restore")
        generator = batch_generator(self.turn_seed, x, device="cpu")
        # Drawn on the CPU (the generator's device), so any device draws the same transformations.
        pick = torch.randint(len(self.transformations), (len(x),), generator=generator).to(x.device)  # (n,)
        z = self.encoder(transform_each(x, pick, self.transformations))                  # (n, latent_dim)
        restored = logits_loss(self.decoder.logits(z), target, objective)
        if not self.turn_head:
            return restored
        naming = F.cross_entropy(self.head(z), pick)
        return Loss(restored.total + self.turn_head * naming, restored.reconstruction,
                    {"reconstruction": restored.total, "turns": naming})

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> float64 (n, 2) with a turn head, (n, 1) without: the mean
        over :func:`transformations` of the error of restoring ``x`` transformed so, then
        (with a head) the mean over them of the cross-entropy of naming that transformation."""
        restoring, naming = [], []
        for i, moved in enumerate(self.transformations):
            z = self.encoder(transform(x, *moved))
            restoring.append(image_errors(self.decoder(z), x))
            if self.turn_head:
                named = torch.full((len(x),), i, device=x.device)
                naming.append(F.cross_entropy(self.head(z).double(), named, reduction="none"))
        columns = [torch.stack(restoring).mean(0)] + ([torch.stack(naming).mean(0)] if naming else [])
        return torch.stack(columns, 1)

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [0, 1] -> float64 (n,): the error of restoring (see :meth:`errors`).

        With a turn head, how rare the image's two errors are among the training images'
        (:meth:`fit_outlier_score`), combined as in Fisher's method::

            score(x) = sum over the two errors of  -log((N * tail(error) + 1) / (N + 1))

        ``tail`` is the fraction of the N training images with a larger error (read from
        their quantiles), so each term is 0 for an error below every training image's and
        log(N + 1) for one above them all. Rarity, not the errors' sizes: the naming error of
        a digit that looks the same upside down (0, 1, 8) is often large on its own training
        images, and then counts for little. Measured on one-class MNIST (the default widths,
        18 epochs, seed 0), the mean AUROC over the ten digits was 96.91 for the restoring
        error alone, 97.54 for the two errors each over its training standard deviation, and
        97.95 for this score (bench/ANCHORS.md).
        """
        errors = self.errors(x)
        if not self.turn_head or not self.fitted_images > 0:
            return errors[:, 0]
        n = self.fitted_images.double()
        tails = torch.stack([tail_fraction(self.error_quantiles[j], errors[:, j]) for j in range(2)], 1)
        return -torch.log((n * tails + 1) / (n + 1)).sum(1)

    @torch.no_grad()
    def fit_outlier_score(self, images) -> None:
        """With a turn head: the quantiles of each of :meth:`errors` over the training images,
        and their number, for :meth:`outlier_score`."""
        if not self.turn_head:
            return
        from aekit import inference  # it runs models, so it imports aekit.models: here, not in a cycle

        errors = torch.cat([e.cpu() for e in inference.map_batches(self, lambda m, c: m.errors(c), images)])
        levels = torch.linspace(0, 1, QUANTILES, dtype=torch.float64)
        self.error_quantiles.copy_(torch.quantile(errors.T, levels, dim=1).T)  # (2, QUANTILES)
        self.fitted_images.fill_(len(errors))


def tail_fraction(quantiles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fraction of a distribution above each of ``x`` (n,), read from its ``quantiles``
    (Q,) at levels 0, 1/(Q-1), ..., 1 by linear interpolation (as ``np.interp``): 1 below
    the first quantile, 0 from the last one on."""
    last = len(quantiles) - 1
    upper = torch.searchsorted(quantiles, x.contiguous(), right=True).clamp(1, last)   # (n,)
    low, high = quantiles[upper - 1], quantiles[upper]
    within = ((x - low) / (high - low).clamp_min(torch.finfo(torch.float64).tiny)).clamp(0, 1)
    return 1 - ((upper - 1) + within) / last  # below the first: upper 1, within 0; from the last on: within 1
