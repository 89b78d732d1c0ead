"""A test-only model family whose objective has an extra term, registered the way a new
family is: its own module and @register on its class. Nothing else in aekit knows it
(tests/test_objectives.py trains it through fit, runs, DDP and the CLI).

Importing this module registers it; torchrun ranks import it through a sitecustomize.
"""

import torch
import torch.nn.functional as F

from aekit.models import Loss, SeedAutoencoder, register

PENALTY = 0.05


@register("penalised")
class PenalisedAutoencoder(SeedAutoencoder):
    """The seed network, trained on reconstruction plus ``PENALTY`` times the latent's mean
    square (a pull of the bottleneck towards 0)."""

    objectives = ("bce", "mse")

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        z = self.encoder(x)                                   # (n, 8, H/4, W/4)
        logits = self.decoder.logits(z)                       # (n, C, H, W)
        if objective == "bce":
            reconstruction = F.binary_cross_entropy_with_logits(logits, target)
        else:
            reconstruction = F.mse_loss(torch.sigmoid(logits), target)
        penalty = PENALTY * z.pow(2).mean()
        return Loss(reconstruction + penalty, torch.sigmoid(logits),
                    {"reconstruction": reconstruction, "latent_penalty": penalty})

