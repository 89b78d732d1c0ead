"""The collapse warning: reconstructions that are nearly constant across images.

:func:`aekit.training.fit` warns once per call (:class:`CollapseWarning`) when an epoch's
validation (:func:`aekit.inference.evaluate`) finds every image decoding to the same
picture; :func:`collapse_hint` says what to do about it for the model and the loss.
"""

from __future__ import annotations

from torch import nn

from aekit import models
from aekit.config import RECIPES

_CONSTANT = "the reconstructions are nearly constant: every image decodes to the same picture"
_STUCK = "Training on will not leave it"
COLLAPSE = f"{_CONSTANT} (the blank-output plateau of sigmoid + MSE). {_STUCK}"
COLLAPSE_HINT = f'{COLLAPSE}; use recipe="default" (binary cross-entropy, He init) or loss="bce"'


def collapse_hint(model: nn.Module, loss: str, lr: float) -> str:
    """What the collapse warning says for ``model`` trained on ``loss`` at ``lr``: binary
    cross-entropy only where the model offers it (:func:`aekit.models.objectives`) and
    trains on MSE, whose sigmoid plateau it leaves; a lower lr where ``lr`` is above every
    recipe's, since a step that large can throw the weights where every image decodes alike."""
    plateau = loss == "mse" and "bce" in models.objectives(model)
    top = max(recipe.lr for recipe in RECIPES.values())
    fixes = ['use recipe="default" (binary cross-entropy, He init) or loss="bce"'] if plateau else []
    if lr > top:
        fixes.append(f"lr={lr:g} is above every recipe's (at most {top:g}): lower lr")
    fixes = fixes or ["lower lr, or check the data: images with nothing in common decode best as one average"]
    return f"{COLLAPSE if plateau else f'{_CONSTANT}. {_STUCK}'}; {'; '.join(fixes)}"


class CollapseWarning(UserWarning):
    """:func:`aekit.training.fit` saw nearly constant reconstructions after epoch ``epoch``
    (once per fit); ``hint`` is what to do about it (:func:`collapse_hint`)."""

    def __init__(self, epoch: int, hint: str = COLLAPSE_HINT):
        # args are (epoch, hint): copy, pickle and pytest-xdist rebuild a warning as
        # CollapseWarning(*args), and then it says the same again.
        super().__init__(epoch, hint)
        self.epoch, self.hint = epoch, hint

    def __str__(self) -> str:
        return f"epoch {self.epoch}: {self.hint}"


__all__ = ["COLLAPSE", "COLLAPSE_HINT", "CollapseWarning", "collapse_hint"]
