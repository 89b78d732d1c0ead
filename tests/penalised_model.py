"""A test-only model family whose objective has an extra term and which takes an option of
its own, registered the way a new family is: this one file, with @register on its class and
an ``Options`` dataclass. Nothing else in aekit knows it (tests/test_objectives.py trains it
through fit, runs, DDP, the estimator's ``model_params`` and the CLI's ``--penalty``).

Importing this module registers it; torchrun ranks import it through a sitecustomize.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from aekit.models import Loss, SeedAutoencoder, register


@dataclass(frozen=True)
class PenaltyOptions:
    """The weight of the extra term."""

    penalty: float = field(default=0.05, metadata={"help": "weight of the latent's mean square in the loss"})

    def check(self, image_shape: tuple[int, int, int] | None) -> None:
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float)) or not self.penalty >= 0:
            raise ValueError(f"penalty must be a non-negative number, got {self.penalty!r}")


@register("penalised")
class PenalisedAutoencoder(SeedAutoencoder):
    """The seed network, trained on reconstruction plus ``penalty`` times the latent's mean
    square (a pull of the bottleneck towards 0)."""

    Options = PenaltyOptions
    objectives = ("bce", "mse")

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), penalty: float = PenaltyOptions.penalty):
        super().__init__(image_shape)
        PenaltyOptions(penalty).check(image_shape)
        self.penalty = penalty

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        z = self.encoder(x)                                   # (n, 8, H/4, W/4)
        logits = self.decoder.logits(z)                       # (n, C, H, W)
        if objective == "bce":
            reconstruction = F.binary_cross_entropy_with_logits(logits, target)
        else:
            reconstruction = F.mse_loss(torch.sigmoid(logits), target)
        penalty = self.penalty * z.pow(2).mean()
        return Loss(reconstruction + penalty, torch.sigmoid(logits),
                    {"reconstruction": reconstruction, "latent_penalty": penalty})
