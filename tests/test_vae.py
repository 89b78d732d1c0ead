"""model="vae": training through the CLI and the estimator, the posterior mean as the code,
sampling, interpolation, the IWAE bound, and samples that a classifier recognises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from aekit import ConvAutoencoder
from aekit.cli import main
from aekit.models.vae import VAE, iwae_bound


@pytest.fixture(scope="module")
def digits(mnist):
    (x_train, y_train), (x_test, _) = mnist
    return x_train[:3000], y_train[:3000], x_test[:200]


@pytest.fixture(scope="module")
def fitted(digits):
    x_train, _, _ = digits
    return ConvAutoencoder(model="vae", latent_dim=8, epochs=2, random_state=0).fit(x_train[:2000])


def test_cli_trains_a_vae_and_reports_its_likelihoods(vae_run, tmp_path):
    out = vae_run  # aekit train --model vae --latent-dim 4 --beta 0.5 --epochs 1 --limit 256
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "vae" and config["model_params"]["beta"] == 0.5
    # Total = reconstruction + beta * KL, per pixel; the ELBO in nats is -784 x that at beta = 1.
    assert metrics["test_loss"] == pytest.approx(metrics["test_reconstruction"] + 0.5 * metrics["test_kl"], rel=1e-4)
    assert metrics["test_iwae_nll_nats"] > 0 and metrics["test_elbo_nats"] < 0
    assert "kl" in (out / "history.csv").read_text().splitlines()[0].split(",")
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), "--n", "6", "--out", str(grid), "--seed", "1"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(out), "--n", "6", "--out", str(grid)]) == 2  # no --overwrite
    assert main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]) == 2


def test_cli_sample_refuses_a_run_without_a_prior(capsys, tmp_path):
    assert main(["sample", "tests/data/run-0.1.0", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model vae" in err


def test_transform_is_the_posterior_mean(fitted, digits):
    x = digits[2][:16]
    z = fitted.transform(x)
    assert np.array_equal(z, fitted.transform(x))  # deterministic
    with torch.no_grad():
        mean, _ = fitted.model_.posterior(torch.from_numpy(x[:, None] / np.float32(255)))
    np.testing.assert_allclose(z, mean.numpy(), atol=1e-5)


def test_sample_is_reproducible_and_leaves_the_rngs_alone(fitted):
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = fitted.sample(5, random_state=3)
    assert a.shape == (5, 28, 28) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, fitted.sample(5, random_state=3))
    assert not np.array_equal(a, fitted.sample(5, random_state=4))
    fitted.sample(5)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state[1], np.random.get_state()[1])


def test_sample_needs_a_vae(digits):
    conv = ConvAutoencoder(model="conv", latent_dim=4, epochs=1).fit(digits[0][:128])
    with pytest.raises(ValueError, match="model='vae'"):
        conv.sample(3)


def test_interpolate_runs_from_a_to_b(fitted, digits):
    a, b = digits[2][0], digits[2][1]
    path = fitted.interpolate(a, b, steps=5)
    assert path.shape == (5, 28, 28)
    ends = fitted.inverse_transform(fitted.transform(np.stack([a, b])))
    np.testing.assert_allclose(path[[0, -1]], ends, atol=1e-6)


def test_iwae_bound_is_tighter_than_the_elbo(fitted, digits):
    x = torch.from_numpy(digits[2][:64, None] / np.float32(255))
    elbo = iwae_bound(fitted.model_, x, 1, torch.Generator().manual_seed(0)).mean()
    iwae = iwae_bound(fitted.model_, x, 50, torch.Generator().manual_seed(0)).mean()
    assert iwae > elbo  # -IWAE NLL <= -ELBO


def test_loss_noise_is_reproducible_and_evaluation_deterministic(fitted, digits):
    x = torch.from_numpy(digits[2][:32, None] / np.float32(255))
    model = fitted.model_
    first, again = model.loss(x, x, "bce").total, model.loss(x, x, "bce").total
    assert torch.equal(first, again)
    torch.manual_seed(0)
    other = VAE((1, 28, 28), 8)
    torch.manual_seed(0)
    assert VAE((1, 28, 28), 8).noise_seed == other.noise_seed


def test_trained_samples_beat_untrained_ones_on_a_classifier(fitted, digits):
    x_train, y_train, _ = digits
    clf = LogisticRegression(max_iter=1000).fit(x_train.reshape(len(x_train), -1) / 255.0, y_train)
    untrained = ConvAutoencoder(model="vae", latent_dim=8, epochs=1, lr=1e-9, random_state=0).fit(x_train[:64])

    def score(est) -> float:
        # The classifier score of Salimans et al. (2016) with this classifier: exp of the mean
        # KL between each sample's class probabilities and their average; 1 when every sample
        # looks alike (an untrained decoder's grey blur), up to 10 for ten distinct digits.
        proba = clf.predict_proba(est.sample(300, random_state=0).reshape(300, -1)) + 1e-12
        return float(np.exp((proba * (np.log(proba) - np.log(proba.mean(0)))).sum(1).mean()))

    assert score(fitted) > score(untrained) + 0.25  # measured 1.95 vs 1.55
