"""Tries at the photograph cells that aekit's defaults lose to PCA (bench/QUALITY.md).

Trains the default model (pca-conv, the suite's settings: its latent size, the epoch rule,
seed 0) on a data set's training patches and scores the test patches, which come from other
photographs, after every epoch, beside scikit-learn's PCA fitted to the same patches. A
variant changes one thing, so that the curves say which part of the model does not carry
over to unseen photographs:

=========================  ===================================================================
``default``                the model as it ships
``refine-only``            PCA plus the refinement: the encoder's and decoder's corrections
                           kept shut (their gates frozen at 0)
``no-refine``              PCA plus the corrections: the refinement kept shut
``dec-only``               PCA plus the decoder's correction alone
``per-channel``            the refinement applied to each colour channel alone, with the same
                           filters for R, G and B (a one-channel net; on grey images this *is*
                           the default)
``per-channel-refine-only``  both of the above
``held-out``               the default trained on 90% of the training patches and also scored
                           on the other 10% after every epoch: which epoch would the
                           estimator's held-out rule keep, and how does it do on the test?
``per-channel-held-out``   both of the above
``both-refines``           the default refinement plus the per-channel one behind its own
                           gate, which starts at 0
=========================  ===================================================================

    python bench/photo_tries.py photos64 8 refine-only [--epochs 24]

Every variant but the held-out ones trains on all the training patches and is judged by its
last epoch, as the estimator did before its held-out rule; the held-out ones split and choose
the epoch as the estimator now does (``ConvAutoencoder``, ``aekit.config.default_held_out``).
PCA is fitted to all the training patches, as in the suite. Prints one JSON line per run and
appends it to bench/photo-tries.jsonl (git-ignored). The runs and what they showed are in
bench/PHOTOS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from aekit.data import load_dataset, prepare_images  # noqa: E402
from aekit.pca import PCAReconstructor  # noqa: E402
from aekit.inference import evaluate  # noqa: E402
from aekit.models.pca_conv import refine_net  # noqa: E402
from aekit.config import TrainConfig, default_epochs, default_held_out, resolve_device
from aekit.start import new_model
from aekit.training import fit
from quality import LIMITS  # noqa: E402  (bench/quality.py: the suite's training-set limits)

VARIANTS = ("default", "refine-only", "no-refine", "dec-only", "per-channel", "per-channel-refine-only", "held-out",
            "per-channel-held-out", "both-refines")
FROZEN = {  # variant -> the gates kept at 0 (the untrained model is PCA, so a shut part is absent)
    "refine-only": ("encoder.gate", "decoder.gate"),
    "per-channel-refine-only": ("encoder.gate", "decoder.gate"),
    "no-refine": ("decoder.refine_gate",),
    "dec-only": ("encoder.gate", "decoder.refine_gate"),
}
TRIES = HERE / "photo-tries.jsonl"


class PerChannelRefine(nn.Module):
    """(n, C, H, W) -> (n, C, H, W): pca-conv's refinement net with one input and one output
    channel, applied to each channel as its own image."""

    def __init__(self):
        super().__init__()
        self.net = refine_net(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.net(x.reshape(n * c, 1, h, w)).reshape(n, c, h, w)


class BothRefines(nn.Module):
    """pca-conv's refinement plus a :class:`PerChannelRefine` behind a gate that starts at 0."""

    def __init__(self, mixing: nn.Module):
        super().__init__()
        self.mixing, self.shared = mixing, PerChannelRefine()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixing(x) + self.gate * self.shared(x)


def pca_mse(train: np.ndarray, test: np.ndarray, latent_dim: int) -> float:
    """The test MSE of PCA fitted to ``train``, as the suite scores it (uint8 images)."""
    return float(PCAReconstructor(latent_dim=latent_dim, random_state=0).fit(train).reconstruction_error(test).mean())


def run(data: str, latent_dim: int, variant: str, epochs: int | None) -> dict:
    (x_train, _), (x_test, _) = load_dataset(data)
    x_train = x_train[:LIMITS.get(data)]
    pca_test = pca_mse(x_train, x_test, latent_dim)  # PCA on all the training patches, as in the suite
    x_held = None
    if variant.endswith("held-out"):  # the estimator's split (10% when its rule holds none out)
        count = default_held_out(len(x_train), 32) or len(x_train) // 10
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0)).numpy()
        x_held, x_train = x_train[order[:count]], x_train[order[count:]]
    epochs = epochs or default_epochs(len(x_train), 32)[0]  # the rule counts the images trained on
    train, test = prepare_images(x_train), prepare_images(x_test)
    config = TrainConfig(data=data, model="pca-conv", model_params={"latent_dim": latent_dim}, epochs=epochs, seed=0,
                         image_shape=tuple(train.shape[1:])).resolved()
    torch.manual_seed(0)
    model = new_model(config, resolve_device("cpu"))
    if variant.startswith("per-channel"):
        model.decoder.refine = PerChannelRefine()
    elif variant == "both-refines":
        model.decoder.refine = BothRefines(model.decoder.refine)
    for name, parameter in model.named_parameters():
        if name in FROZEN.get(variant, ()):
            parameter.requires_grad_(False)
    test_curve: list[float] = []
    started = time.perf_counter()
    state = fit(model, train, test if x_held is None else prepare_images(x_held), config, progress=False,
                on_epoch_end=lambda m, _optimizer, _state: test_curve.append(evaluate(m, test).mse))
    row = {"data": data, "latent_dim": latent_dim, "variant": variant, "epochs": epochs, "train": len(train),
           "seconds": round(time.perf_counter() - started), "pca_test": pca_test, "test": test_curve}
    if x_held is not None:  # the estimator keeps the epoch with the lowest held-out loss
        row["pca_held"], row["held"] = pca_mse(x_train, x_held, latent_dim), [r.val_loss for r in state.history]
        row["kept_epoch"] = int(np.argmin(row["held"])) + 1
        row["kept_test"] = test_curve[row["kept_epoch"] - 1]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=("photos32", "photos64", "gray32", "mnist", "fashion-mnist", "digits8"))
    parser.add_argument("latent_dim", type=int)
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--epochs", type=int, help="default: the epoch rule's, as in the suite")
    args = parser.parse_args(argv)
    row = run(args.data, args.latent_dim, args.variant, args.epochs)
    line = json.dumps(row)
    with open(TRIES, "a") as f:
        f.write(line + "\n")
    final = row["test"][-1]
    print(f"{args.data} at {args.latent_dim}, {args.variant}: test MSE {final:.5f} after {row['epochs']} epochs "
          f"({final / row['pca_test']:.3f} of PCA's {row['pca_test']:.5f}); best {min(row['test']):.5f} "
          f"at epoch {int(np.argmin(row['test'])) + 1}; {row['seconds']} s", flush=True)
    if "kept_epoch" in row:
        print(f"  lowest held-out loss at epoch {row['kept_epoch']} ({min(row['held']):.5f}; PCA's "
              f"{row['pca_held']:.5f}): test {row['kept_test']:.5f} ({row['kept_test'] / row['pca_test']:.3f} "
              f"of PCA's)", flush=True)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
