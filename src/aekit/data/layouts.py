"""Image layouts: the one conversion between the shapes images are passed in and the
float32 (n, C, H, W) in [0, 1] that the networks take.

The layouts (:data:`LAYOUTS`), by name:

- ``nhw``: (n, H, W), grayscale;
- ``nhwc``: (n, H, W, C), the seed's Keras layout and the loaders';
- ``nchw``: (n, C, H, W) with C in {1, 3}, PyTorch's;
- ``flat``: (n, H*W*C), rows in H, W, C order, as ``x.reshape(n, -1)`` makes them from
  Keras layout; read as images of a (C, H, W) given by the caller.

:func:`parse_images` reads any of them (uint8 divided by 255, or floats in [0, 1]) and
says which it was; :func:`from_nchw` writes (n, C, H, W) back in a named layout;
:func:`to_nchw` is the layout step alone, for the loaders' arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from aekit.data.arrays import DataError, to_float

LAYOUTS = ("nhw", "nhwc", "nchw", "flat")


def to_nchw(x: np.ndarray) -> np.ndarray:
    """(n, H, W) or (n, H, W, C) -> (n, C, H, W), the layout PyTorch convolutions take."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"images must be (n, H, W) or (n, H, W, C), got shape {x.shape}")


def from_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    """(n, C, H, W) -> ``layout``, one of :data:`LAYOUTS`."""
    if layout == "nhw":
        return x[:, 0]
    if layout == "nhwc":
        return x.transpose(0, 2, 3, 1)
    if layout == "flat":
        return x.transpose(0, 2, 3, 1).reshape(len(x), -1)
    return x


def image_shape_chw(image_shape) -> tuple[int, int, int]:
    """(H, W) or (H, W, C), Keras order -> (C, H, W)."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return (shape[2], shape[0], shape[1])
    raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {image_shape!r}")


def flat_shape(X: np.ndarray, image_shape) -> tuple[int, int, int]:
    """The (C, H, W) that the flat rows of ``X`` (n, features) are read as, given the
    ``image_shape`` (H, W) or (H, W, C) that a user passed (or None)."""
    if image_shape is None:
        raise ValueError(f"X is flat {X.shape}; pass image_shape=(H, W) or (H, W, C) so the "
                         "rows can be read as images")
    c, h, w = image_shape_chw(image_shape)
    if X.shape[1] != c * h * w:
        raise ValueError(f"X has {X.shape[1]} features per row but image_shape "
                         f"{tuple(image_shape)} needs {h * w * c}")
    return c, h, w


def parse_images(X, flat: Callable[[np.ndarray], tuple[int, int, int]]) -> tuple[np.ndarray, str]:
    """Any accepted input ``X`` -> (float32 (n, C, H, W) in [0, 1], its layout name).

    ``X``: an array or tensor in one of :data:`LAYOUTS`, uint8, integers in [0, 255], bool
    or floats in [0, 1]; ``flat(X)`` gives the (C, H, W) of flat rows (n, features).
    Errors are ValueError (TypeError for sparse input) naming ``X``.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("sparse input is not supported: images must be a dense array; "
                        "call X.toarray() first")
    X = np.asarray(X)
    if np.iscomplexobj(X):
        raise ValueError("Complex data not supported: images must be uint8 or real floats in [0, 1]")
    if X.dtype == bool:
        X = X.astype(np.float32)
    elif np.issubdtype(X.dtype, np.integer) and X.dtype != np.uint8:
        # Integer pixels (np.array of a list, say) are fine when they fit in 8 bits.
        if X.size and (X.min() < 0 or X.max() > 255):
            raise ValueError(f"X: integer images must hold values in [0, 255], got [{X.min()}, {X.max()}]; "
                             "rescale them or pass floats in [0, 1]")
        X = X.astype(np.uint8)
    if X.dtype != np.uint8 and not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"X must be uint8 images or floats in [0, 1], got dtype {X.dtype}; "
                         "convert it first (e.g. x.astype('float32') / 255)")
    if X.ndim == 2:
        c, h, w = flat(X)
        layout, x = "flat", to_nchw(X.reshape(len(X), h, w, c))
    elif X.ndim == 3:
        layout, x = "nhw", to_nchw(X)
    elif X.ndim == 4:
        if X.shape[-1] in (1, 3):
            layout, x = "nhwc", to_nchw(X)
        elif X.shape[1] in (1, 3):
            layout, x = "nchw", X
        else:
            raise ValueError(f"X of shape {X.shape} has no channel axis of size 1 or 3 first or "
                             "last; expected (n, H, W, C) or (n, C, H, W)")
    else:
        raise ValueError(f"X must be (n, H, W), (n, H, W, C), (n, C, H, W) or flat (n, features) "
                         f"with image_shape; got shape {X.shape}. Reshape your data: one flat image "
                         "x is x.reshape(1, -1)")
    if len(x) == 0:
        raise ValueError("X holds no images (n = 0); pass at least one")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"X has 0 feature(s) (shape={X.shape}) while a minimum of 1 is required: "
                         "images need at least one pixel")
    try:
        x = to_float(np.ascontiguousarray(x))
    except DataError as exc:
        raise ValueError(f"X: {exc}") from None
    return np.ascontiguousarray(x, dtype=np.float32), layout


__all__ = ["LAYOUTS", "to_nchw", "from_nchw", "image_shape_chw", "flat_shape", "parse_images"]
