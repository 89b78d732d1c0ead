"""The variational autoencoder (Kingma & Welling 2014), with a beta weight on the KL term
(Higgins et al. 2017): ``model="vae"``.

The encoder is :class:`aekit.models.blocks.ConvEncoder` with ``2 * latent_dim`` outputs, read
as the mean and the log-variance of a diagonal Gaussian posterior q(z|x); the decoder is
:class:`aekit.models.blocks.ConvDecoder`, whose logits are the means of a Bernoulli likelihood
p(x|z) per pixel; the prior is N(0, I), or with ``prior_components=K`` a learned one: an equal
mixture of K diagonal Gaussians whose means and log-variances are parameters of the model
(Tomczak & Welling 2018 compare it with N(0, I) and with their VampPrior), trained with the
rest. Under it the ELBO's KL term has no closed form and is the one-sample estimate
log q(z|x) - log p(z); the importance-weighted bound and the NLL take log p(z) as they are.

The objective is the negative ELBO under that Bernoulli likelihood (binary cross-entropy
summed over pixels, which takes grey-level pixels in [0, 1] as they are), plus ``beta``
times the KL divergence, divided by the number of pixels: per pixel, so that the learning
rates the recipes tuned for per-pixel mean losses fit it as they are. It is offered as the
objective ``"bce"``; there is no ``"mse"`` (a Gaussian likelihood needs a variance). With
``binarize=True`` the model is of 0/1 pixels: every step draws each pixel as 1 with its grey
level as the probability (dynamic binarisation, as binarised-MNIST likelihoods are trained
and reported), and :func:`likelihood_metrics` scores one fixed binarisation of the test images.
With ``importance_samples=k`` (k > 1) the objective is instead the negative importance-weighted
bound of k latents per image (Burda et al. 2016; :func:`iwae_bound`), per pixel: tighter than
the ELBO, for k decodes per image a step; it has no KL term, so it takes no ``beta``.

The reparameterisation noise: each call of :meth:`VAE.loss` draws it from a local
``torch.Generator`` seeded by the model's ``noise_seed`` (drawn from torch's global generator
when the model is built, so ``torch.manual_seed`` before building fixes it; a run's model is
built under :func:`aekit.start.seeded` with the run's seed, so a loaded run has the
``noise_seed`` it trained with) and by the pixels of the batch it is given. It depends on
nothing else, so the same model and images give the same noise in any thread, in any order
of a step's chunks, in training and in evaluation (:func:`aekit.inference.evaluate` is
deterministic: the single-sample ELBO estimate of the same images is the same every time),
and torch's global generator is never touched after construction. ``encode`` (and the
estimator's ``transform``) give the posterior mean; ``forward`` decodes it. New images:
:meth:`VAE.sample_latents` draws latents from the prior for ``decode``.

A run's test metrics add :func:`likelihood_metrics` (:meth:`VAE.test_metrics`): the test ELBO
and an importance-weighted (IWAE) estimate of the negative log-likelihood, computed through
:func:`aekit.inference.map_batches`, the one loop that runs a model over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aekit._typed import is_int, is_real
from aekit.models.base import Autoencoder, Loss, batch_generator, draw_seed
from aekit.models.blocks import ConvDecoder, ConvEncoder, ConvOptions
from aekit.models.registry import register


@dataclass(frozen=True)
class VAEOptions(ConvOptions):
    """The conv options, the weight of the KL term, and whether the pixels are binarised."""

    beta: float = field(default=1.0, metadata={"help": "the weight of the KL term (1.0: the plain VAE)"})
    binarize: bool = field(default=False, metadata={
        "help": "model 0/1 pixels drawn with each grey level as the probability of a 1, a fresh draw at every "
                "step (dynamic binarisation, the protocol of binarised-MNIST likelihoods)"})
    importance_samples: int = field(default=1, metadata={
        "help": "latents drawn per image in the training objective: 1 trains on the ELBO; k > 1 on the "
                "importance-weighted bound of k samples (IWAE, Burda et al. 2016), a tighter bound on the "
                "likelihood, for about k times the decoder's work a step"})

    prior_components: int = field(default=0, metadata={
        "minimum": 0,
        "help": "0: the prior is N(0, I); K > 0: a learned prior, an equal mixture of K diagonal Gaussians "
                "whose means and variances train with the model (a better likelihood, and samples drawn from "
                "where the codes are)"})

    def check(self, image_shape: tuple[int, int, int] | None) -> None:
        """A one-line error for a ``beta`` that is not a non-negative number, a ``binarize``
        that is not a bool, ``importance_samples`` that are not a positive integer (or are
        more than 1 beside a ``beta`` other than 1), or ``prior_components`` that are not a
        non-negative integer, then the conv checks."""
        if not is_real(self.beta) or not 0 <= self.beta < math.inf:
            raise ValueError(f"beta must be a non-negative number (1.0: the plain VAE), got {self.beta!r}")
        if not isinstance(self.binarize, bool):
            raise ValueError(f"binarize must be True or False, got {self.binarize!r}")
        if not is_int(self.importance_samples) or self.importance_samples < 1:
            raise ValueError(f"importance_samples must be a positive integer (1: the ELBO), "
                             f"got {self.importance_samples!r}")
        if self.importance_samples > 1 and self.beta != 1:
            raise ValueError(f"importance_samples={self.importance_samples} trains on the importance-weighted "
                             f"bound, which has no KL term to weight; beta={self.beta!r} weights the ELBO's KL term "
                             "(importance_samples=1) only: leave out one of the two")
        if not is_int(self.prior_components) or self.prior_components < 0:
            raise ValueError(f"prior_components must be a non-negative integer (0: the prior N(0, I)), "
                             f"got {self.prior_components!r}")
        super().check(image_shape)


@register("vae")
class VAE(Autoencoder):
    """A convolutional VAE: (n, C, H, W) in [0, 1] -> q(z|x) = N(mean, exp(log_var)) with
    z of ``latent_dim`` numbers -> Bernoulli pixel means.

    ``encode``: (n, C, H, W) -> (n, latent_dim), the posterior mean. ``decode``:
    (n, latent_dim) -> (n, C, H, W) in [0, 1], the Bernoulli means.
    """

    objectives = ("bce",)
    can_sample = True
    Options = VAEOptions

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = Options.latent_dim,
                 widths: tuple[int, ...] = Options.widths, beta: float = Options.beta,
                 binarize: bool = Options.binarize, importance_samples: int = Options.importance_samples,
                 prior_components: int = Options.prior_components):
        super().__init__()
        self.Options(latent_dim, widths, beta, binarize, importance_samples, prior_components).check(image_shape)
        widths = tuple(widths)
        self.image_shape, self.latent_dim, self.beta = tuple(image_shape), latent_dim, float(beta)
        self.binarize, self.importance_samples = binarize, importance_samples
        # Layers in the order of torch's generator draws that the VAE has always made (it once
        # borrowed a conv model's decoder): an encoder of latent_dim outputs, dropped, then the
        # decoder, then the encoder. The dropped one keeps every seeded VAE's weights and
        # noise_seed as they were; without it the same seed would give another model.
        features = ConvEncoder(self.image_shape, latent_dim, widths).feature_shape
        decoder = ConvDecoder(self.image_shape, latent_dim, widths, features)
        self.encoder = ConvEncoder(self.image_shape, 2 * latent_dim, widths)  # mean, log_var
        self.decoder = decoder
        self.noise_seed = draw_seed()
        # The learned prior's parameters, drawn last: a model without them has the weights and
        # noise_seed that the same seed has always given.
        self.prior_components = prior_components
        if prior_components:
            self.prior_means = nn.Parameter(torch.randn(prior_components, latent_dim))      # (K, d)
            self.prior_log_vars = nn.Parameter(torch.zeros(prior_components, latent_dim))  # (K, d)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> (mean, log_var), each (n, latent_dim)."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, C, H, W): the logits of the posterior mean's decoding."""
        return self.decoder.logits(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))

    def test_metrics(self, images) -> dict:
        """What a run reports beside its test loss: :func:`likelihood_metrics` of ``images``."""
        return likelihood_metrics(self, images)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """(..., latent_dim) -> (...): log p(z) in nats, under N(0, I) or, with
        ``prior_components`` K, the equal mixture of the K learned Gaussians."""
        if not self.prior_components:
            return _log_normal(z.pow(2), 0.0)
        z = z.unsqueeze(-2)                                                   # (..., 1, d)
        log_density = _log_normal((z - self.prior_means).pow(2) * torch.exp(-self.prior_log_vars),
                                  self.prior_log_vars)                        # (..., K)
        return torch.logsumexp(log_density, dim=-1) - math.log(self.prior_components)

    def sample_latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, latent_dim) latents drawn from the prior with ``generator`` (a CPU generator;
        the latents are on the CPU): N(0, I), or a component of the learned mixture for each
        latent, then a draw from it."""
        eps = torch.randn(n, *self.latent_shape, generator=generator)
        if not self.prior_components:
            return eps
        component = torch.randint(self.prior_components, (n,), generator=generator)
        means, log_vars = (p.detach().cpu()[component] for p in (self.prior_means, self.prior_log_vars))
        return means + torch.exp(0.5 * log_vars) * eps

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """Negative ELBO per pixel: (BCE summed over pixels + beta * KL) / pixels, batch mean,
        with one reparameterised sample per image; parts "reconstruction" and "kl", per pixel.
        With ``importance_samples`` > 1, the negative importance-weighted bound instead
        (:meth:`_importance_weighted_loss`).
        With ``binarize``, ``x`` and ``target`` are first binarised with the same draws
        (:func:`binarized`): where ``x`` is ``target`` (no noise) they stay the same 0/1 images."""
        self.check_objective(objective, "vae")
        generator = batch_generator(self.noise_seed, x)
        if self.binarize:
            uniform = torch.rand(target.shape, generator=generator, device=target.device, dtype=target.dtype)
            x, target = binarized(x, uniform), binarized(target, uniform)
        mean, log_var = self.posterior(x)                                     # (n, d) each
        if self.importance_samples > 1:
            return self._importance_weighted_loss(mean, log_var, target, generator)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * eps                             # (n, d)
        logits = self.decoder.logits(z)                                       # (n, C, H, W)
        pixels = math.prod(self.image_shape)
        recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1) / pixels
        kl = _kl(self, mean, log_var, eps) / pixels                           # KL(q || p)
        total = (recon + self.beta * kl).mean()
        return Loss(total, torch.sigmoid(logits), {"reconstruction": recon.mean(), "kl": kl.mean()})

    def _importance_weighted_loss(self, mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor,
                                  generator: torch.Generator) -> Loss:
        """The negative importance-weighted bound of k = ``importance_samples`` latents per
        image (:func:`iwae_bound`, with its draws: k of (n, d) in turn), per pixel, batch mean.
        Its parts, per pixel: "reconstruction", the cross-entropy averaged over the k samples,
        and "kl", the KL of q(z|x) from the prior (:func:`_kl`, at the first sample), the two
        terms of the ELBO; the loss is at most their sum in expectation (the bound is at least
        the ELBO), not on every batch. The reconstruction returned decodes the first sample."""
        k, n = self.importance_samples, len(mean)
        eps = torch.stack([torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                           for _ in range(k)])                                # (k, n, d)
        log_weights, log_px_z, logits = _log_weights(self, mean, log_var, eps, target)  # (k, n) each
        bound = torch.logsumexp(log_weights, dim=0) - math.log(k)             # (n,)
        pixels = math.prod(self.image_shape)
        kl = _kl(self, mean, log_var, eps[0])                                 # (n,)
        return Loss(-bound.mean() / pixels, torch.sigmoid(logits[:n]),
                    {"reconstruction": -log_px_z.mean() / pixels, "kl": (kl / pixels).mean()})


def _kl(model: VAE, mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(n, d) each -> (n,): KL(q(z|x) || p(z)) in nats, q = N(mean, exp(log_var)): exact under
    the prior N(0, I); under a learned prior (``prior_components``), whose KL has no closed
    form, the one-sample estimate log q(z|x) - log p(z) at z = mean + std * eps."""
    if not model.prior_components:
        return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
    return _log_q(eps, log_var) - model.log_prior(mean + torch.exp(0.5 * log_var) * eps)


def _log_q(eps: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """(..., d), (n, d) -> (...): log q(z|x) of z = mean + std * eps, in nats."""
    return _log_normal(eps.pow(2), log_var)


def _log_normal(squared: torch.Tensor, log_var: torch.Tensor | float) -> torch.Tensor:
    """(..., d) -> (...): the log-density in nats of a diagonal Gaussian at a point whose
    squared distance from the mean, divided by the variance, is ``squared`` per dimension."""
    return -0.5 * (squared + log_var + math.log(2 * math.pi)).sum(-1)


def _log_weights(model: VAE, mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The importance weights of s latents per image, z = mean + std * eps with ``eps``
    (s, n, d), against the targets ``x`` (n, C, H, W): log p(x|z) + log p(z) - log q(z|x)
    (s, n), its log p(x|z) (s, n), and the decoder's logits (s * n, C, H, W)."""
    s, n = eps.shape[:2]
    z = mean + torch.exp(0.5 * log_var) * eps                                 # (s, n, d)
    logits = model.decoder.logits(z.flatten(0, 1))                            # (s * n, C, H, W)
    targets = x.expand(s, *x.shape).flatten(0, 1)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).sum(1).view(s, n)
    return log_px_z + model.log_prior(z) - _log_q(eps, log_var), log_px_z, logits


def binarized(images: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) grey levels in [0, 1] -> 0/1 pixels of the same dtype: 1 where ``uniform``
    (the same shape, uniform draws in [0, 1)) is below the grey level, so that each pixel is 1
    with its grey level as the probability (a stochastic binarisation)."""
    return (uniform < images).to(images.dtype)


def elbo(model: VAE, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n, C, H, W) -> (n,): a single-sample estimate of the ELBO (beta = 1) in nats per
    image, log p(x|z) + log p(z) - log q(z|x), for z drawn from q(z|x) with ``generator``."""
    return iwae_bound(model, x, k=1, generator=generator)


@torch.no_grad()
def iwae_bound(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n, C, H, W) -> (n,): the importance-weighted lower bound on log p(x) (Burda et al.
    2016) in nats per image, with ``k`` samples from q(z|x) drawn with ``generator``:
    log (1/k) sum_i p(x, z_i) / q(z_i | x). k=1 is the ELBO; it rises towards log p(x) as k
    grows, so -iwae_bound(k=100) estimates the negative log-likelihood.

    The likelihood is Bernoulli per pixel with the pixels of ``x`` (in [0, 1]) as targets,
    as in training. For grey-level images (aekit's MNIST) that is binary cross-entropy on
    grey levels, not a normalised density of the images: compare it only with numbers
    computed the same way. For 0/1 images (a ``binarize`` model's, binarised by
    :func:`likelihood_metrics`) it is the likelihood that binarised-MNIST results report.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int (samples per image), got {k!r}")
    mean, log_var = model.posterior(x)                                        # (n, d)
    log_weights = []
    for _ in range(k):  # one latent per image at a time: k decodes of n images, not one of k * n
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        log_weights.append(_log_weights(model, mean, log_var, eps[None], x)[0][0])  # (n,)
    return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(k)


IWAE_K = 100       # importance samples per image for the run's NLL estimate
IWAE_IMAGES = 500  # on the first this many test images (IWAE_K decodes each)


def likelihood_metrics(model: VAE, images, seed: int = 0, k: int = IWAE_K, n_iwae: int = IWAE_IMAGES,
                       batch_size: int = 256) -> dict:
    """A VAE's test ELBO and importance-weighted NLL estimate, in nats per image, under the
    Bernoulli likelihood (see :func:`iwae_bound`): on the pixels as given, or, for a model
    trained with ``binarize``, on one stochastic binarisation of them (:func:`binarized`, the
    binarised-MNIST protocol's fixed test set).

    ``images``: an :class:`aekit.data.ImageSource`. ``test_elbo_nats``: mean single-sample
    ELBO over every image; ``test_iwae_nll_nats``: mean of -iwae_bound(k) over the first
    ``n_iwae`` images, beside ``test_elbo_nats_iwae_images``, the ELBO on those same images.
    Deterministic: local generators seeded by ``seed`` (latents) and ``seed + 1`` (binarising),
    drawn from batch after batch of ``batch_size`` images in order (through
    :func:`aekit.inference.map_batches`, on one worker in passes of a whole batch, so that the
    draws do not depend on threads or chunks).
    """
    from aekit import inference  # it runs models, so it imports aekit.models: here, not in a cycle

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    binariser = torch.Generator(device=device).manual_seed(seed + 1)  # not seed's stream: independent draws
    binarize = getattr(model, "binarize", False)
    counted = 0  # images the IWAE bound has been taken on

    def bounds(m: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, C, H, W) -> the ELBO of each image (b,), and for the first t images still
        wanted, the IWAE bound (t,) and their ELBO (t,)."""
        nonlocal counted
        if binarize:
            x = binarized(x, torch.rand(x.shape, generator=binariser, device=x.device, dtype=x.dtype))
        elbos = elbo(m, x, generator)
        take = min(max(n_iwae - counted, 0), len(x))
        iwae = iwae_bound(m, x[:take], k, generator) if take else elbos[:0]
        counted += take
        return elbos, iwae, elbos[:take]

    pieces = inference.map_batches(model, bounds, images, batch_size=batch_size, chunk=batch_size, workers=1)
    elbos, iwae, iwae_elbo = (torch.cat(column) for column in zip(*pieces))
    pixels = (f"0/1 pixels, one stochastic binarisation of the images (generator seed {seed + 1})" if binarize
              else "grey-level pixels in [0, 1] (not binarised)")
    return {"test_elbo_nats": float(elbos.mean()),
            "test_iwae_nll_nats": float(-iwae.mean()),
            "test_elbo_nats_iwae_images": float(iwae_elbo.mean()),
            "iwae_k": k, "iwae_images": len(iwae),
            "likelihood": f"Bernoulli per pixel on {pixels}"}


__all__ = ["VAE", "VAEOptions", "binarized", "elbo", "iwae_bound", "likelihood_metrics"]

