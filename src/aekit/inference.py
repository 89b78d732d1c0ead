"""Running a trained model on images: encode, decode, reconstruct, per-image error and
outlier score, evaluate.

The one path every user of a trained model takes: the estimator, ``aekit score``,
``denoise``, ``compare``, the report, the training loop's validation and a family's own
test metrics (:func:`map_batches`, e.g. the VAE's likelihoods). Images come in
batches from a tensor (n, C, H, W) in [0, 1] or an image stream (:mod:`aekit.data`); each
batch runs on the model's device. On the CPU a batch runs through :func:`aekit.fast.on_cpu`'s
twin in chunks of :data:`aekit.fast.CPU_CHUNK` images on one worker thread per core
(``workers``); elsewhere in one pass. Results come back on the CPU. The model is left as it
was (train or eval mode, memory format), and so is PyTorch's thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aekit import distributed, fast
from aekit.data import ArrayImages, as_images
from aekit import models as models_lib

BATCH = 4096  # images per read from a stream, and per transfer to a GPU


def _batches(x) -> Iterator[torch.Tensor]:
    """Images ``x`` (anything :func:`aekit.data.as_images` takes) in order, :data:`BATCH` at a time."""
    return iter(as_images(x).batches(BATCH))


@contextmanager
def _runner(model: nn.Module, workers: int | None, chunk: int = fast.CPU_CHUNK) -> Iterator[Callable]:
    """``run(fn, xb) -> [fn(chunk), ...]``: ``fn`` of the model made fast (its first
    argument) applied to batch ``xb`` on the model's device, in eval mode, without grad;
    on the CPU in chunks of ``chunk`` images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    @torch.inference_mode()  # only around the passes: parameters touched in it would stay inference tensors
    def on_device(fn: Callable, fast_model: nn.Module, xb: torch.Tensor) -> list:
        return [fn(fast_model, xb.to(device, non_blocking=True))]

    try:
        with fast.on_cpu(model) as fast_model:
            if device.type == "cpu":
                n = fast.cpu_cores() if workers is None else workers
                yield lambda fn, xb: fast.run_chunks(lambda c: fn(fast_model, c), xb, chunk, n)
            else:
                yield lambda fn, xb: on_device(fn, fast_model, xb)
    finally:
        model.train(was_training)


def _pieces(model: nn.Module, fn: Callable, batches: Iterator[torch.Tensor], workers: int | None,
            chunk: int = fast.CPU_CHUNK) -> list:
    with _runner(model, workers, chunk) as run:
        return [piece for xb in batches for piece in run(fn, xb)]


def _map(model: nn.Module, fn: Callable, batches: Iterator[torch.Tensor], workers: int | None) -> torch.Tensor:
    out = [piece.cpu() for piece in _pieces(model, fn, batches, workers)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def map_batches(model: nn.Module, fn: Callable, x, *, batch_size: int = BATCH, chunk: int = fast.CPU_CHUNK,
                workers: int | None = None) -> list:
    """``[fn(m, c), ...]`` over the images ``x`` in order, ``m`` the model made fast: the loop
    every pass of a model over images runs in, for a family's own metrics.

    ``x`` is images as :func:`aekit.data.as_images` takes them, read ``batch_size`` at a
    time; ``c`` is (b, C, H, W) on the model's device, on the CPU a chunk of at most
    ``chunk`` images of a batch, run on ``workers`` threads (default: one per core),
    elsewhere the whole batch. Eval mode, inference mode; results stay where ``fn`` put
    them. A ``fn`` that draws from one generator across calls passes ``workers=1`` (and
    ``chunk=batch_size``), so that its draws come in the order of the images, as batches.
    """
    return _pieces(model, fn, as_images(x).batches(batch_size), workers, chunk)


def encode(model: nn.Module, x, *, workers: int | None = None) -> torch.Tensor:
    """Images (n, C, H, W) in [0, 1] -> latents (n, *model.latent_shape)."""
    return _map(model, lambda m, c: m.encode(c), _batches(x), workers)


def decode(model: nn.Module, z: torch.Tensor, *, workers: int | None = None) -> torch.Tensor:
    """Latents (n, *model.latent_shape) -> images (n, C, H, W) in [0, 1]."""
    return _map(model, lambda m, c: m.decode(c), iter(z.split(BATCH)), workers)


def reconstruct(model: nn.Module, x, *, workers: int | None = None) -> torch.Tensor:
    """Images (n, C, H, W) in [0, 1] -> their reconstructions, the same shape, in [0, 1]."""
    return _map(model, lambda m, c: m(c), _batches(x), workers)


def image_errors(reconstructions, images) -> np.ndarray:
    """:func:`aekit.models.image_errors` (the per-image error, as aekit means it
    everywhere) of tensors or arrays, on the CPU -> float64 (n,)."""
    return models_lib.image_errors(torch.as_tensor(reconstructions).cpu(), torch.as_tensor(images).cpu()).numpy()


def reconstruction_errors(model: nn.Module, x, *, workers: int | None = None) -> np.ndarray:
    """:func:`image_errors` of ``model``'s reconstructions of ``x`` -> float64 (n,)."""
    return _map(model, lambda m, c: models_lib.image_errors(m(c), c), _batches(x), workers).numpy()


def outlier_scores(model: nn.Module, x, *, workers: int | None = None) -> np.ndarray:
    """``model``'s outlier score of each image of ``x`` (:func:`aekit.models.outlier_score`:
    higher is more unusual; by default the reconstruction error) -> float64 (n,)."""
    return _map(model, models_lib.outlier_score, _batches(x), workers).numpy()


def outlier_threshold(scores: np.ndarray, contamination: float) -> float:
    """The outlier score (or error) above which a fraction ``contamination`` of ``scores`` lies."""
    if not 0 <= contamination < 0.5:
        raise ValueError(f"contamination must be in [0, 0.5), got {contamination!r}")
    return float(np.quantile(scores, 1.0 - contamination)) if contamination > 0 else float(np.max(scores))


@dataclass
class Evaluation:
    mse: float         # mean per-image error (image_errors): per pixel, images in [0, 1]
    loss: float        # the model's objective on the same images
    collapsed: bool    # reconstructions (near-)constant across images
    parts: dict[str, float] = field(default_factory=dict)  # the objective's named parts, if any


def evaluate(model: nn.Module, x, objective: str = "mse", *, workers: int | None = None) -> Evaluation:
    """The model's objective and reconstruction error on the images ``x``.

    ``x`` is images as :func:`aekit.data.as_images` takes them: a tensor (n, C, H, W) in
    [0, 1], numpy images, or an image source (in memory or streamed). Under DDP each rank
    evaluates its part of a tensor and the sums are all-reduced, so every rank must call it
    (it is a collective) and every rank gets the same result; a stream is read whole by
    every rank.
    """
    ranks = distributed.current()
    x = as_images(x, "evaluate: x")
    split = ranks.size > 1 and isinstance(x, ArrayImages)  # a stream is read whole by every rank
    rows, weight = x, 1.0
    if split:
        first, stop = ranks.span(len(x))  # this rank's rows of x; with none, one row counted 0 times
        images = x.tensor[first:stop] if stop > first else x.tensor[:1]
        rows, weight, workers = ArrayImages(images), (1.0 if stop > first else 0.0), 1

    def sums(m: nn.Module, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """One chunk's sums in float64: the loss and its parts, the per-image error, and per
        pixel the sums of the reconstructions, of the images, and of their squares."""
        out = models_lib.loss(m, c, c, objective)
        recon, data = out.reconstruction.double().clamp(0.0, 1.0), c.double()
        found = {"loss": out.total.double() * len(c), "error": models_lib.image_errors(recon, data).sum(),
                 **{f"part {k}": v.double() * len(c) for k, v in out.parts.items()},
                 "recon": recon.sum(0), "recon_sq": (recon ** 2).sum(0),
                 "data": data.sum(0), "data_sq": (data ** 2).sum(0)}
        return {k: v.cpu() * weight for k, v in found.items()}

    total: dict[str, torch.Tensor] = {}
    with _runner(model, workers) as run:
        for xb in _batches(rows):
            for piece in run(sums, xb):
                total = piece if not total else {k: total[k] + v for k, v in piece.items()}
    if split:  # one all-reduce of every sum, in a fixed order
        names = sorted(total)
        flat = ranks.sum(torch.cat([total[k].flatten() for k in names])).split([total[k].numel() for k in names])
        total = {k: v.view_as(total[k]) for k, v in zip(names, flat)}
    n = len(x)
    parts = {k[len("part "):]: total[k].item() / n for k in sorted(total) if k.startswith("part ")}
    # Collapse: every image decodes to (nearly) the same picture. Compare the spread of the
    # reconstructions across images with the spread of the inputs themselves.
    mean = total["recon"] / n
    recon_spread = (total["recon_sq"] / n - mean ** 2).clamp_min(0).mean().sqrt().item()
    data_var = (total["data_sq"] - total["data"] ** 2 / n).clamp_min(0) / max(n - 1, 1)  # unbiased, as std(0)
    data_spread = data_var.mean().sqrt().item() if n > 1 else 0.0
    collapsed = n > 1 and recon_spread < 0.05 * data_spread
    return Evaluation(mse=total["error"].item() / n, loss=total["loss"].item() / n, collapsed=collapsed, parts=parts)


__all__ = ["encode", "decode", "reconstruct", "image_errors", "reconstruction_errors", "outlier_scores",
           "outlier_threshold", "evaluate", "Evaluation", "map_batches", "BATCH"]
