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
from conftest import one_error_line


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
    assert one_error_line(capsys) == ("aekit: error: aekit sample needs a model with a prior to sample from "
                                      "(--model vae); this one is --model seed")


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


def test_binarize_trains_on_fresh_0_1_draws_of_the_grey_levels():
    """With binarize, the loss encodes and reconstructs one 0/1 draw of the batch (the same
    draw as input and target), each pixel 1 with its grey level as the probability, and
    another batch (here the same images in another order) gets another draw."""
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) ** 3  # a mean grey level of 1/4
    x[:, :, 0], x[:, :, 1] = 0.0, 1.0  # a black row and a white row
    model = VAE((1, 8, 8), latent_dim=2, widths=(4,), binarize=True)
    seen, logits = [], []
    posterior, decode = model.posterior, model.decoder.logits
    model.posterior = lambda images: seen.append(images) or posterior(images)
    model.decoder.logits = lambda z: logits.append(decode(z)) or logits[-1]
    with torch.no_grad():
        loss = model.loss(x, x, "bce")
        model.loss(x.flip(0), x.flip(0), "bce")
    first, second = seen[0], seen[1].flip(0)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not first[:, :, 0].any() and first[:, :, 1].all()
    # The share of ones is the mean grey level, within 6 binomial standard deviations.
    assert abs(float(first.mean() - x.mean())) < 6 * 0.5 / x.numel() ** 0.5
    assert not torch.equal(first, second)
    # The reconstruction term is the cross-entropy against the draw that was encoded.
    target = torch.nn.functional.binary_cross_entropy_with_logits(logits[0], first, reduction="none")
    assert loss.parts["reconstruction"] == pytest.approx(float(target.flatten(1).sum(1).mean() / 64), rel=1e-6)
    plain = VAE((1, 8, 8), latent_dim=2, widths=(4,))
    plain.posterior = lambda images: seen.append(images) or posterior(images)
    with torch.no_grad():
        plain.loss(x, x, "bce")
    assert seen[-1] is x  # without binarize the grey levels go in as they are


def test_a_binarize_models_likelihood_is_scored_on_one_fixed_binarisation(digits):
    """likelihood_metrics of a binarize model are those of the same weights, without
    binarize, on the test images binarised once by a generator seeded with seed + 1."""
    from aekit.data import as_images
    from aekit.models.vae import binarized, likelihood_metrics

    torch.manual_seed(0)
    model = VAE((1, 28, 28), latent_dim=3, widths=(4,), binarize=True).eval()
    grey = torch.from_numpy(digits[2][:40, None] / np.float32(255))
    plain = VAE((1, 28, 28), latent_dim=3, widths=(4,)).eval()
    plain.load_state_dict(model.state_dict())
    draws = torch.rand(grey.shape, generator=torch.Generator().manual_seed(7 + 1))
    reference = likelihood_metrics(plain, as_images(binarized(grey, draws)), seed=7, k=5, n_iwae=30)
    got = likelihood_metrics(model, as_images(grey), seed=7, k=5, n_iwae=30)
    assert got["likelihood"].startswith("Bernoulli per pixel on 0/1 pixels")
    for key in ("test_elbo_nats", "test_iwae_nll_nats", "test_elbo_nats_iwae_images"):
        assert got[key] == pytest.approx(reference[key], rel=1e-6), key
    assert likelihood_metrics(model, as_images(grey), seed=7, k=5, n_iwae=30) == got


def test_binarize_is_an_option_the_estimator_saves_and_checks(tmp_path):
    x = np.random.default_rng(0).random((96, 8, 8), dtype=np.float32)
    estimator = ConvAutoencoder(model="vae", latent_dim=2, widths=(4,), model_params={"binarize": True}, epochs=1,
                                random_state=0).fit(x)
    estimator.save(tmp_path / "run")
    loaded = ConvAutoencoder.load(tmp_path / "run")
    assert loaded.model_.binarize is True and loaded.get_params()["model_params"]["binarize"] is True
    with pytest.raises(ValueError, match=r"^binarize must be True or False, got 'yes'$"):
        ConvAutoencoder(model="vae", model_params={"binarize": "yes"}, epochs=1).fit(x)


def test_the_importance_sampled_nll_converges_to_the_exact_likelihood():
    """With a 1-number latent, log p(x) = log of the integral of p(x|z) N(z; 0, 1) over z is
    a quadrature over a fine grid: the reference. The IWAE bound at k = 1,000 lands on it
    within five of its own Monte-Carlo standard errors (measured over three seeds), and the
    ELBO (k = 1) lies below it on average."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=1, widths=(4,)).eval()
    x = (torch.rand(6, 1, 8, 8) < 0.3).float()
    with torch.no_grad():
        z = torch.linspace(-10.0, 10.0, 20001, dtype=torch.float64)   # the prior's mass is all inside
        logits = model.decoder.logits(z[:, None].float()).double()     # (g, 1, 8, 8)
        log_px_z = torch.stack([-F.binary_cross_entropy_with_logits(logits, image.double().expand_as(logits),
                                                                    reduction="none").flatten(1).sum(1)
                                for image in x])                          # (6, g)
        log_prior = -0.5 * (z ** 2 + math.log(2 * math.pi))
        exact = torch.logsumexp(log_px_z + log_prior, 1) + math.log(float(z[1] - z[0]))
    estimates = torch.stack([iwae_bound(model, x, 1000, torch.Generator().manual_seed(s)) for s in range(3)]).double()
    standard_error = estimates.std(0) / math.sqrt(len(estimates))  # of the mean over the seeds
    assert (estimates.mean(0) - exact).abs().max() <= 5 * standard_error.max() + 1e-3  # + float32 sums
    elbo = iwae_bound(model, x, 1, torch.Generator().manual_seed(0)).double()
    assert float(elbo.mean()) < float(exact.mean())


@pytest.mark.parametrize("binarize", [False, True])
def test_importance_samples_train_on_the_importance_weighted_bound(binarize):
    """With importance_samples=k the loss is -iwae_bound(k) per pixel, with the draws the
    loss makes (its binarisation first, then k latents of (n, d) in turn); k=1 is the ELBO
    the VAE has always trained on, on the same draws."""
    from aekit.models.base import batch_generator
    from aekit.models.vae import binarized

    torch.manual_seed(0)
    x = torch.rand(10, 1, 8, 8)
    model = VAE((1, 8, 8), latent_dim=3, widths=(4,), binarize=binarize, importance_samples=5)
    with torch.no_grad():  # weights far from a fresh model's, whose logits are all near 0 for any image
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    loss = model.loss(x, x, "bce")
    generator = batch_generator(model.noise_seed, x)
    drawn = binarized(x, torch.rand(x.shape, generator=generator)) if binarize else x
    # The same draws and arithmetic, but the loss decodes the k * n latents in one pass where
    # iwae_bound makes k passes of n: float32 sums of 64 pixels, ~1e-7 relative apart at most.
    bound = iwae_bound(model, drawn, 5, generator)                            # (n,) nats per image
    assert float(loss.total.detach()) == pytest.approx(float(-bound.mean() / 64), rel=1e-5)
    assert loss.reconstruction.shape == x.shape and set(loss.parts) == {"reconstruction", "kl"}
    loss.total.backward()
    assert all(p.grad is not None for p in model.parameters())

    one = VAE((1, 8, 8), latent_dim=3, widths=(4,), binarize=binarize)
    one.load_state_dict(model.state_dict())
    one.noise_seed = model.noise_seed
    elbo = one.loss(x, x, "bce")
    # beta 1: the ELBO, its two terms' means added (the mean of the sums: ~1e-7 relative apart)
    terms = elbo.parts["reconstruction"] + elbo.parts["kl"]
    assert float(elbo.total.detach()) == pytest.approx(float(terms.detach()), rel=1e-6)
    generator = batch_generator(model.noise_seed, x)
    drawn = binarized(x, torch.rand(x.shape, generator=generator)) if binarize else x
    # The ELBO with the analytic KL against iwae_bound(k=1)'s sampled one: equal in expectation only.
    assert float(elbo.total.detach()) != float(-iwae_bound(one, drawn, 1, generator).mean() / 64)


def test_importance_samples_is_an_option_the_estimator_saves_and_checks(tmp_path):
    x = np.random.default_rng(0).random((96, 8, 8), dtype=np.float32)
    estimator = ConvAutoencoder(model="vae", latent_dim=2, widths=(4,), model_params={"importance_samples": 3},
                                epochs=1, random_state=0).fit(x)
    assert estimator.model_.importance_samples == 3
    loaded = ConvAutoencoder.load(estimator.save(tmp_path / "run"))
    assert loaded.model_.importance_samples == 3 and loaded.model_params == {"importance_samples": 3}
    refused = [({"model_params": {"importance_samples": 0}},
                r"^importance_samples must be a positive integer \(1: the ELBO\), got 0$"),
               ({"model_params": {"importance_samples": 2.0}}, "got 2.0$"),
               ({"model_params": {"importance_samples": 2}, "beta": 0.5},
                r"^importance_samples=2 trains on the importance-weighted bound, which has no KL term to weight; "
                r"beta=0.5 weights the ELBO's KL term \(importance_samples=1\) only: leave out one of the two$")]
    for params, message in refused:
        with pytest.raises(ValueError, match=message):
            ConvAutoencoder(model="vae", epochs=1, **params).fit(x)


# ------------------------------------------------------------ the learned prior (prior_components)

def _learned_prior_vae(**options) -> VAE:
    """A VAE with 4 learned prior components, its weights and the prior's means and log-variances
    moved far from a fresh model's (whose components all sit at log-variance 0)."""
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=3, widths=(4,), prior_components=4, **options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def test_the_learned_prior_is_the_mixture_torch_distributions_computes():
    """log_prior against torch.distributions' equal mixture of diagonal Gaussians, and N(0, I)
    without components; sample_latents draws from it: the component means are moved 20 apart
    with standard deviations of 0.01, so each draw names its component, and the four are drawn
    about equally (4,000 draws: each 1,000 +- 150, over 5 binomial standard deviations)."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    model = _learned_prior_vae()
    z = torch.randn(5, 7, 3)
    mixture = MixtureSameFamily(Categorical(logits=torch.zeros(4)),
                                Independent(Normal(model.prior_means, torch.exp(0.5 * model.prior_log_vars)), 1))
    # float32 sums of 3 terms and a logsumexp of 4, done in another order: ~1e-6 relative apart
    torch.testing.assert_close(model.log_prior(z), mixture.log_prob(z), rtol=1e-5, atol=1e-5)
    plain = VAE((1, 8, 8), latent_dim=3, widths=(4,))
    torch.testing.assert_close(plain.log_prior(z), Independent(Normal(torch.zeros(3), 1.0), 1).log_prob(z))

    with torch.no_grad():
        model.prior_means.copy_(20.0 * torch.arange(4.0)[:, None].expand(4, 3))
        model.prior_log_vars.fill_(2 * np.log(0.01))
    drawn = model.sample_latents(4000, torch.Generator().manual_seed(0))
    component = torch.round(drawn / 20.0)                                      # (4000, 3)
    assert drawn.shape == (4000, 3) and torch.equal(component, component[:, :1].expand(4000, 3))
    assert (drawn - 20.0 * component).abs().max() < 0.06                      # 6 standard deviations
    counts = torch.bincount(component[:, 0].long(), minlength=4)
    assert counts.sum() == 4000 and counts.sub(1000).abs().max() <= 150, counts
    assert torch.equal(drawn, model.sample_latents(4000, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("importance_samples", [1, 3])
def test_a_learned_prior_trains_on_the_bound_it_is_scored_with(importance_samples):
    """Under a learned prior the loss is the negative importance-weighted bound per pixel, also
    at k = 1, where the ELBO's KL term is the one-sample estimate log q(z|x) - log p(z) (there
    is no closed form): against the bound written out with torch.distributions on the loss's
    own draws, and against iwae_bound, which scores the model; the prior's means and
    log-variances get gradients."""
    import math

    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    from aekit.models.base import batch_generator
    from aekit.models.vae import binarized

    k = importance_samples
    model = _learned_prior_vae(binarize=True, importance_samples=k)
    x = torch.rand(10, 1, 8, 8)
    loss = model.loss(x, x, "bce")
    generator = batch_generator(model.noise_seed, x)
    drawn = binarized(x, torch.rand(x.shape, generator=generator))
    with torch.no_grad():
        mean, log_var = model.posterior(drawn)                                # (n, d) each
        eps = torch.stack([torch.randn(mean.shape, generator=generator) for _ in range(k)])  # (k, n, d)
        z = mean + torch.exp(0.5 * log_var) * eps                             # (k, n, d)
        prior = MixtureSameFamily(Categorical(logits=torch.zeros(4)),
                                  Independent(Normal(model.prior_means, torch.exp(0.5 * model.prior_log_vars)), 1))
        posterior = Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)
        log_px_z = torch.stack([-torch.nn.functional.binary_cross_entropy_with_logits(
            model.decoder.logits(z_i), drawn, reduction="none").flatten(1).sum(1) for z_i in z])  # (k, n)
        bound = torch.logsumexp(log_px_z + prior.log_prob(z) - posterior.log_prob(z), 0) - math.log(k)
    # float32: sums of 64 pixels and of 3 latent terms in other orders, ~1e-6 relative apart
    assert float(loss.total.detach()) == pytest.approx(float(-bound.mean() / 64), rel=1e-5)
    generator = batch_generator(model.noise_seed, x)
    drawn = binarized(x, torch.rand(x.shape, generator=generator))
    scored = iwae_bound(model, drawn, k, generator)                           # (n,) nats per image
    assert float(loss.total.detach()) == pytest.approx(float(-scored.mean() / 64), rel=1e-5)
    if k == 1:
        terms = loss.parts["reconstruction"] + loss.parts["kl"]
        assert float(loss.total.detach()) == pytest.approx(float(terms.detach()), rel=1e-6)
    loss.total.backward()
    assert model.prior_means.grad.abs().sum() > 0 and model.prior_log_vars.grad.abs().sum() > 0


def test_prior_components_is_an_option_the_estimator_saves_samples_from_and_checks(tmp_path):
    x = np.random.default_rng(0).random((96, 8, 8), dtype=np.float32)
    estimator = ConvAutoencoder(model="vae", latent_dim=2, widths=(4,), model_params={"prior_components": 5},
                                epochs=1, random_state=0).fit(x)
    assert estimator.model_.prior_means.shape == (5, 2)
    loaded = ConvAutoencoder.load(estimator.save(tmp_path / "run"))
    assert loaded.model_params == {"prior_components": 5}
    assert torch.equal(loaded.model_.prior_means, estimator.model_.prior_means)
    assert np.array_equal(loaded.sample(6, random_state=0), estimator.sample(6, random_state=0))
    for value, shown in ((-1, "-1"), (2.0, "2.0"), (True, "True")):
        with pytest.raises(ValueError, match=rf"^prior_components must be a non-negative integer "
                                             rf"\(0: the prior N\(0, I\)\), got {shown}$"):
            ConvAutoencoder(model="vae", model_params={"prior_components": value}, epochs=1).fit(x)


def test_the_cli_flag_of_prior_components_takes_0_and_refuses_what_is_below(capsys):
    """--prior-components 0 is the default N(0, I), so the flag takes it (int flags are
    positive unless the option declares a minimum of 0); -1 and a word get argparse's line."""
    from aekit.cli.parser import build_parser

    for value in ("0", "3"):
        assert build_parser().parse_args(["train", "--model", "vae", "--prior-components", value]).prior_components \
            == int(value)
    for value, shown in (("-1", "-1"), ("many", "'many'")):
        assert main(["train", "--model", "vae", "--prior-components", value, "--epochs", "1"]) == 2
        assert one_error_line(capsys) == (f"aekit: error: argument --prior-components: expected a non-negative "
                                          f"integer, got {shown}; see `aekit train --help`")
