"""One kind of image source for every verb: images in memory and images streamed from disk
answer the same calls, so training, evaluation and the report take either.

An :class:`ImageSource` has ``shape`` (n, C, H, W), ``len()``, ``head(n)`` (the first n
images, as a source), ``first(n)`` (the first n images as one tensor), ``sample(n, seed)``
(n random ones, likewise), ``to(device)`` and
``batches(batch_size, seed=None, epoch=0)``, which yields float32 tensors (b, C, H, W) in
[0, 1]: in order without a seed, shuffled by a pure function of (seed, epoch) with one.

- :class:`ArrayImages`: a float32 tensor (n, C, H, W) in memory, shuffled by
  :func:`epoch_permutation`.
- :class:`ImageStream`: images read from disk batch by batch (:mod:`aekit.data.streams`).

:func:`as_images` turns what a user may pass (numpy images in the loaders' layout, a float
tensor, a source) into a source, with one-line errors; :func:`prepare_images` is the one
conversion of numpy images into a float tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from aekit.data.arrays import DataError, to_float
from aekit.data.layouts import to_nchw


def prepare_images(x: np.ndarray) -> torch.Tensor:
    """uint8/float images (n, H, W) or (n, H, W, C) -> float32 tensor (n, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(to_nchw(to_float(x))))


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a pure function of (seed, epoch), so resuming
    a run at an epoch boundary replays exactly the same batches."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


class ImageSource(ABC):
    """Images (n, C, H, W) that come out as float32 batches in [0, 1]; see the module doc."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int, int]:
        """(n, C, H, W): the number of images and the shape each comes out in."""

    def __len__(self) -> int:
        return self.shape[0]

    @abstractmethod
    def head(self, n: int) -> ImageSource:
        """The first ``n`` images, as a source of the same kind."""

    @abstractmethod
    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[torch.Tensor]:
        """Float32 batches (b, C, H, W), every image once: in order when ``seed`` is None,
        else in epoch ``epoch``'s shuffle of ``seed``; only the last batch is short."""

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images (all of them if there are fewer) as one tensor (n, C, H, W)."""
        return self._one_batch(n, seed=None)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """``n`` images drawn at random without replacement (all of them if there are fewer),
        the same for the same ``seed``, as one tensor (n, C, H, W): the first batch of
        ``seed``'s shuffle."""
        return self._one_batch(n, seed=seed)

    def _one_batch(self, n: int, seed: int | None) -> torch.Tensor:
        batches = iter(self.batches(n, seed=seed))
        try:
            return next(batches)
        finally:  # a stream's reader thread and file are let go now, not when collected
            getattr(batches, "close", lambda: None)()

    @abstractmethod
    def take(self, indices: torch.Tensor) -> ImageSource:
        """The images at ``indices`` (k,), a source of the same kind: in that order in memory,
        in file order for a stream (which reads its files front to back)."""

    def to(self, device: torch.device | str) -> ImageSource:
        """The images on ``device``; a stream stays on disk (its batches are moved by the caller)."""
        return self


class ArrayImages(ImageSource):
    """Images in memory: a float32 tensor (n, C, H, W) in [0, 1], as :func:`prepare_images`
    makes it (``.tensor``)."""

    def __init__(self, tensor: torch.Tensor):
        _check_tensor(tensor, "tensor")
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"ArrayImages(shape={self.shape}, device={self.tensor.device})"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.tensor.shape)

    def head(self, n: int) -> ArrayImages:
        return ArrayImages(self.tensor[:n])

    def first(self, n: int) -> torch.Tensor:
        return self.tensor[:n]

    def take(self, indices: torch.Tensor) -> ArrayImages:
        return ArrayImages(self.tensor[indices.to(self.tensor.device)])

    def to(self, device: torch.device | str) -> ArrayImages:
        return ArrayImages(self.tensor.to(device))

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[torch.Tensor]:
        x = self.tensor
        if seed is not None:
            x = x[epoch_permutation(seed, epoch, len(x)).to(x.device)]  # (n, C, H, W), a shuffled copy
        return (x[start:start + batch_size] for start in range(0, len(x), batch_size))


class ImageStream(ImageSource):
    """Images read from disk batch by batch: :class:`~aekit.data.streams.NpyStream` and
    :class:`~aekit.data.streams.FolderStream`."""


def as_images(x, name: str = "x") -> ImageSource:
    """``x`` as an :class:`ImageSource`: numpy images (n, H, W) or (n, H, W, C), uint8 or float
    in [0, 1] (converted by :func:`prepare_images`); a float tensor (n, C, H, W) in [0, 1]
    (used as it is, not copied); or an image source. Errors name ``x`` as ``name``."""
    if isinstance(x, np.ndarray):
        if x.ndim == 4 and x.shape[-1] not in (1, 3):
            raise DataError(f"{name} is a numpy array of shape {x.shape}; numpy images must be "
                            "(n, H, W) or (n, H, W, C) with C 1 or 3, as aekit.data.load_dataset gives them: "
                            "pass channels-first images as a float tensor (n, C, H, W)")
        try:
            x = ArrayImages(prepare_images(x))
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
    elif isinstance(x, torch.Tensor):
        _check_tensor(x, name)
        x = ArrayImages(x)
    elif not isinstance(x, ImageSource):
        raise TypeError(f"{name} must be images: a numpy array (n, H, W) or (n, H, W, C), a float tensor "
                        f"(n, C, H, W) or an aekit.data.ImageSource, got {type(x).__name__}")
    if len(x) == 0:
        raise DataError(f"{name} holds no images")
    return x


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor (n, C, H, W), got {type(x).__name__}")
    if x.ndim != 4 or not x.is_floating_point():
        raise DataError(f"{name} must be a float tensor (n, C, H, W) in [0, 1], got shape "
                        f"{tuple(x.shape)} {x.dtype}; aekit.data.prepare_images converts numpy images")
