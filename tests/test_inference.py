"""One inference path: every verb that runs a trained model on images (the estimator,
score, denoise, compare, the report, evaluate) sends all of them through aekit.inference,
whose CPU passes are aekit.fast.run_chunks. Counted here, image by image."""

import shutil

import numpy as np
import pytest

from aekit import ConvAutoencoder, fast
from aekit.anomaly import run_threshold
from aekit.cli import main
from aekit.compare import CompareConfig, compare
from aekit.report import write_report
from aekit.experiment import evaluate_run


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """The number of images in each chunk that went through the fast path."""
    seen: list[int] = []
    real = fast.run_chunks

    def counted(fn, x, *args, **kwargs):
        seen.append(len(x))
        return real(fn, x, *args, **kwargs)

    monkeypatch.setattr(fast, "run_chunks", counted)
    return seen


def test_the_estimators_verbs_take_the_fast_path(small_run, mnist, passes):
    estimator = ConvAutoencoder.load(small_run, device="cpu")
    x = mnist[1][0][:50]
    for verb, images in ((estimator.transform, 50), (estimator.reconstruct, 50), (estimator.denoise, 50),
                         (estimator.reconstruction_error, 50), (estimator.predict, 50)):
        passes.clear()
        verb(x)
        assert sum(passes) == images, verb.__name__
    passes.clear()
    estimator.inverse_transform(np.zeros((7, 392), np.float32))
    assert sum(passes) == 7


def test_the_commands_and_the_report_take_the_fast_path(small_run, mnist, passes, tmp_path):
    run = shutil.copytree(small_run, tmp_path / "run")
    images = tmp_path / "images.npy"
    np.save(images, mnist[1][0][:40])
    checks = {
        "score": lambda: main(["score", str(run), str(images), "--out", str(tmp_path / "scores.csv")]),
        "denoise": lambda: main(["denoise", str(run), str(images), "--out", str(tmp_path / "clean.npy")]),
        "evaluate": lambda: evaluate_run(run, device="cpu") and 0,
        "threshold": lambda: run_threshold(run, contamination=0.01) and 0,
        "report": lambda: write_report(run, overwrite=True) and 0,
    }
    for name, check in checks.items():
        passes.clear()
        assert check() == 0, name
        assert sum(passes) >= 40, name


def test_compare_takes_the_fast_path(passes):
    passes.clear()
    compare(CompareConfig(data="mnist", latent_dims=(2,), epochs=1, limit=200), log=lambda line: None)
    assert sum(passes) >= 2 * 200  # the autoencoder's errors and latents of the test images, at least


def test_the_vaes_likelihood_metrics_take_the_fast_path(passes):
    """A family's own test metrics (the VAE's ELBO and IWAE bound) run through
    inference.map_batches: every image once, in passes of the metric's batches."""
    import torch

    from aekit.data import as_images
    from aekit.models import build_model
    from aekit.models.vae import likelihood_metrics

    torch.manual_seed(0)
    model = build_model("vae", (1, 8, 8), latent_dim=2, widths=(4,))
    passes.clear()
    metrics = likelihood_metrics(model, as_images(torch.rand(70, 1, 8, 8)), k=3, n_iwae=40, batch_size=32)
    assert passes == [32, 32, 6]
    assert metrics["iwae_images"] == 40 and metrics["iwae_k"] == 3
