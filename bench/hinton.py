"""Hinton & Salakhutdinov's bar: a 30-number code on MNIST, squared error per test image
(their deep autoencoder 3.00, their PCA 13.87), with aekit's defaults for that latent size.

    python bench/hinton.py            # about 6 minutes on 2 idle cores (bench/HINTON.md)

Trains ``ConvAutoencoder(latent_dim=30, random_state=0)``'s configuration on the 60,000
training images (the same config the estimator makes: its model, recipe and epoch rule),
watching the 10,000 test images after every epoch (monitoring only), and prints the squared
error per test image after each epoch with the minutes so far.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from aekit import ConvAutoencoder  # noqa: E402
from aekit.data import load_dataset, prepare_images  # noqa: E402
from aekit.experiment import plan  # noqa: E402
from aekit.pca import PCAReconstructor  # noqa: E402
from aekit.start import new_model  # noqa: E402
from aekit.training import fit  # noqa: E402

PIXELS = 784


def main() -> int:
    (x_train, _), (x_test, _) = load_dataset("mnist")
    pca = PCAReconstructor(latent_dim=30).fit(x_train)
    print(f"PCA-30: {pca.reconstruction_error(x_test).mean() * PIXELS:.2f} squared error per test image")
    config, _ = plan(ConvAutoencoder(latent_dim=30, random_state=0)._config(image_shape=(1, 28, 28), seed=0),
                     len(x_train))  # 60,000 images: the rule's 10 epochs, none held out
    print(f"aekit's defaults: model {config.model}, loss {config.loss}, {config.chosen['epochs']}")
    model = new_model(config)
    started = time.perf_counter()

    def report(_model, _optimizer, state) -> None:
        r = state.history[-1]
        print(f"epoch {r.epoch:>3}: {r.val_mse * PIXELS:.3f} squared error per test image "
              f"({(time.perf_counter() - started) / 60:.1f} min, {r.images_per_second:,.0f} images/s)", flush=True)

    fit(model, prepare_images(x_train), prepare_images(x_test), config, on_epoch_end=report, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
