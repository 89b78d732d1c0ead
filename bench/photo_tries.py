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
                           on the other 10% after every epoch: would a validation guard (keep
                           the best epoch, PCA's start included) have helped?
=========================  ===================================================================

    python bench/photo_tries.py photos64 8 refine-only [--epochs 24]

Prints one JSON line per run and appends it to bench/photo-tries.jsonl (git-ignored). The
runs and what they showed are in bench/PHOTOS.md.
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

from sklearn.decomposition import PCA  # noqa: E402

from aekit.data import load_dataset  # noqa: E402
from aekit.models import conv3x3  # noqa: E402
from aekit.pcaconv import REFINE_DEPTH, REFINE_WIDTH  # noqa: E402
from aekit.training import TrainConfig, default_epochs, fit, new_model, resolve_device  # noqa: E402
from quality import LIMITS  # noqa: E402  (bench/quality.py: the suite's training-set limits)

VARIANTS = ("default", "refine-only", "no-refine", "dec-only", "per-channel", "per-channel-refine-only", "held-out")
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
        layers = [conv3x3(1, REFINE_WIDTH), nn.ReLU()]
        for _ in range(REFINE_DEPTH - 2):
            layers += [conv3x3(REFINE_WIDTH, REFINE_WIDTH), nn.ReLU()]
        self.net = nn.Sequential(*layers, conv3x3(REFINE_WIDTH, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.net(x.reshape(n * c, 1, h, w)).reshape(n, c, h, w)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W[, C]) -> float32 (n, C, H, W) in [0, 1]."""
    x = x.astype(np.float32) / 255.0
    return torch.from_numpy(x if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor) -> float:
    was = model.training
    model.eval()
    total = sum(float(((model(c) - c) ** 2).sum()) for c in x.split(500))
    model.train(was)
    return total / x.numel()


def pca_mse(pca: PCA, x: torch.Tensor) -> float:
    flat = x.flatten(1).numpy()
    return float(((pca.inverse_transform(pca.transform(flat)) - flat) ** 2).mean())


def run(data: str, latent_dim: int, variant: str, epochs: int | None) -> dict:
    (x_train, _), (x_test, _) = load_dataset(data)
    x_train = x_train[:LIMITS.get(data)]
    epochs = epochs or default_epochs(len(x_train), 32)[0]  # the rule counts the whole training set
    held = None
    if variant == "held-out":
        order = np.random.default_rng(0).permutation(len(x_train))
        held, x_train = as_tensor(x_train[order[:len(order) // 10]]), x_train[order[len(order) // 10:]]
    train, test = as_tensor(x_train), as_tensor(x_test)
    pca = PCA(latent_dim, random_state=0).fit(train.flatten(1).numpy())
    config = TrainConfig(data=data, model="pca-conv", latent_dim=latent_dim, epochs=epochs, seed=0,
                         image_shape=tuple(train.shape[1:])).resolved()
    torch.manual_seed(0)
    model = new_model(config, resolve_device("cpu"))
    if variant.startswith("per-channel"):
        model.decoder.refine = PerChannelRefine()
    for name, parameter in model.named_parameters():
        if name in FROZEN.get(variant, ()):
            parameter.requires_grad_(False)
    test_curve: list[float] = []
    started = time.perf_counter()
    state = fit(model, train, held if held is not None else test, config, progress=False,
                on_epoch_end=lambda m, _optimizer, _state: test_curve.append(mse(m, test)))
    row = {"data": data, "latent_dim": latent_dim, "variant": variant, "epochs": epochs, "train": len(train),
           "seconds": round(time.perf_counter() - started), "pca_test": pca_mse(pca, test), "test": test_curve}
    if held is not None:
        row["pca_held"], row["held"] = pca_mse(pca, held), [r.val_mse for r in state.history]
        best = int(np.argmin(row["held"]))
        row["guard_epoch"] = best + 1 if row["held"][best] < row["pca_held"] else 0  # 0: PCA's start
        row["guard_test"] = test_curve[best] if row["guard_epoch"] else row["pca_test"]
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
    if "guard_test" in row:
        print(f"  a validation guard would keep epoch {row['guard_epoch']} (0: PCA): test "
              f"{row['guard_test']:.5f} ({row['guard_test'] / row['pca_test']:.3f} of PCA's)", flush=True)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
