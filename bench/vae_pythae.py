"""aekit's VAE beside Pythae's, trained the same way on the same MNIST images.

    PYTHONPATH=src python bench/vae_pythae.py [--latent-dim 16] [--epochs 5] [--limit N] [--out bench/VAE.md]

Both train the same networks: Pythae's ``VAE`` gets aekit's own encoder and decoder modules
(wrapped as Pythae's BaseEncoder / BaseDecoder), starting from the same initial weights, with
the same latent size, epochs, batch size, Adam learning rate (constant: Pythae's default has
no schedule) and training images. aekit trains with ``aekit.training.fit`` (its objective:
negative ELBO per pixel, Bernoulli likelihood), Pythae with its ``TrainingPipeline`` (the
same negative ELBO, summed per image; Adam is indifferent to that scale). Both are scored by
the same code: ``aekit.models.vae.likelihood_metrics`` on the test split (nats per image,
Bernoulli likelihood on grey-level pixels), and a logistic-regression MNIST classifier trained
here on the training images, applied to 1,000 samples from the prior: the share of samples it
classifies with confidence > 0.9, and the entropy (bits) of the histogram of their classes
(log2(10) = 3.32 is every digit equally often).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from aekit.data import as_images, load_dataset
from aekit.config import TrainConfig
from aekit.start import new_model
from aekit.training import fit
from aekit.models.vae import likelihood_metrics


def classifier(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(max_iter=200).fit(x.reshape(len(x), -1), y)


def sample_quality(model, clf: LogisticRegression, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(share of n prior samples classified with confidence > 0.9, entropy in bits of their classes)."""
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = model.eval().decode(z).flatten(1).numpy()
    proba = clf.predict_proba(images)
    counts = np.bincount(proba.argmax(1), minlength=10) / n
    entropy = float(-(counts[counts > 0] * np.log2(counts[counts > 0])).sum())
    return float((proba.max(1) > 0.9).mean()), entropy


def train_pythae(start, x_train, epochs: int, batch_size: int, lr: float, seed: int):
    """Train a copy of ``start``'s encoder and decoder with Pythae on ``x_train`` (float
    images (n, C, H, W) in [0, 1], or a torch Dataset of Pythae's ``DatasetOutput(data=...)``);
    returns (the trained aekit VAE holding them, seconds)."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    model = copy.deepcopy(start)

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = model.encoder

        def forward(self, x):
            mean, log_var = model.posterior(x)
            return ModelOutput(embedding=mean, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = model.decoder

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z))

    config = VAEConfig(input_dim=tuple(model.image_shape), latent_dim=model.latent_dim, reconstruction_loss="bce")
    pythae_vae = VAE(config, encoder=Encoder(), decoder=Decoder())
    with tempfile.TemporaryDirectory() as out:
        trainer = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=lr,
                                    per_device_train_batch_size=batch_size, optimizer_cls="Adam",
                                    scheduler_cls=None, seed=seed, no_cuda=True)
        started = time.perf_counter()
        TrainingPipeline(training_config=trainer, model=pythae_vae)(train_data=x_train)
        seconds = time.perf_counter() - started
    return model, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="first N training images (default: all 60,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/VAE.md")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, _) = load_dataset("mnist")
    x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    train = as_images(x_train)          # (n, 1, 28, 28) float32 in [0, 1]
    test = as_images(x_test)
    config = TrainConfig(data="mnist", model="vae", model_params={"latent_dim": args.latent_dim}, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, schedule="constant", init="torch",
                         seed=args.seed, image_shape=tuple(train.shape[1:])).resolved()
    start = new_model(config)
    pythae_model, pythae_seconds = train_pythae(start, train.first(len(train)).numpy(), args.epochs,
                                                args.batch_size, args.lr, args.seed)
    aekit_model = copy.deepcopy(start)
    state = fit(aekit_model, train, test.head(2048), config)
    aekit_seconds = sum(r.seconds for r in state.history)

    clf = classifier(train.first(10_000).numpy(), y_train[:10_000])
    rows = []
    for name, model, seconds in (("aekit", aekit_model, aekit_seconds), ("Pythae", pythae_model, pythae_seconds)):
        metrics = likelihood_metrics(model.eval(), test, seed=args.seed)
        confident, entropy = sample_quality(model, clf, seed=args.seed)
        rows.append((name, metrics["test_elbo_nats"], metrics["test_iwae_nll_nats"], seconds / args.epochs,
                     confident, entropy))

    command = "PYTHONPATH=src python bench/vae_pythae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from importlib.metadata import version

    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
        f"Pythae {version('pythae')}; CPU. Training images: {len(train):,}, "
        f"test images: {len(test):,}; latent {args.latent_dim}, {args.epochs} epochs, batch {args.batch_size}, "
        f"Adam lr {args.lr} constant. Pythae's seconds are its "
        f"TrainingPipeline call (data checks, training, saving its final model).  ",
        "ELBO and IWAE NLL: nats per image, Bernoulli likelihood on grey-level MNIST pixels (not binarised); "
        "IWAE k=100 on the first 500 test images. Samples: 1,000 from N(0, I), scored by logistic regression "
        "trained on 10,000 MNIST training images.",
        "",
        "| library | test ELBO (nats, higher is better) | IWAE NLL (nats, lower is better) | s/epoch "
        "| samples with confidence > 0.9 | class entropy (bits, max 3.32) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {elbo_:.1f} | {nll:.1f} | {spe:.1f} | {conf:.1%} | {ent:.2f} |"
              for name, elbo_, nll, spe, conf, ent in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text("# aekit's VAE beside Pythae's\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
