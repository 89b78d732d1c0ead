"""From a name or a path to images, each reader dispatching on :func:`~aekit.data.formats.detect`:

- :func:`load_dataset`: the train and test split as numpy arrays, as
  ``keras.datasets.mnist.load_data()`` returns them in the seed;
- :func:`open_images`: the train and test split as image sources, in memory or streamed
  from disk (what a run trains on);
- :func:`read_images`: every image at a path, in order, with a name each (what ``score``
  and ``denoise`` read);
- :func:`describe`: shapes, dtypes and ranges, for ``aekit data info``.

Local data without its own test split is split 90/10 by a fixed permutation
(:func:`~aekit.data.arrays.holdout_split`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from aekit.data.arrays import (Dataset, DataError, check_images, check_labels, holdout_split, npz_names, read_idx,
                               read_npy_file, read_npz)
from aekit.data.datasets import load_builtin
from aekit.data.formats import IDX_NAMES, Format, check_resize, detect, find_idx, npz_image_keys
from aekit.data.imagefiles import grey_to_rgb, image_files, labelled_files, read_image, read_image_set
from aekit.data.images import ArrayImages, ImageSource, prepare_images
from aekit.data.streams import STREAM_ABOVE_BYTES, float_bytes, open_stream

log = logging.getLogger("aekit")


def load_dataset(name_or_path: str | os.PathLike, resize: tuple[int, int] | None = None) -> Dataset:
    """Load a built-in data set by name or local data by path.

    Returns ``(x_train, y_train), (x_test, y_test)``: images uint8 (or float32 in [0, 1]
    for float arrays) shaped (n, H, W) or (n, H, W, C); labels int64 (n,) or None.
    ``resize = (H, W)`` applies to image folders and is refused for other data.
    """
    name = str(name_or_path)
    form = detect(name_or_path)
    check_resize(form, resize, name_or_path)
    if form is Format.BUILTIN:
        if Path(name).exists():
            log.warning("'%s' means the built-in %s data set; the local %s is not used (write ./%s to use it)",
                        name, name, "folder" if Path(name).is_dir() else "file", name)
        return load_builtin(name)
    path = Path(name_or_path)
    try:
        if form is Format.IDX_FOLDER:
            return _load_idx_folder(path)
        if form is Format.SPLIT_FOLDER:
            return _load_split_folder(path, resize)
        if form is Format.IMAGE_FOLDER:
            return holdout_split(*_load_labelled_folder(path, resize))
        if form is Format.NPY:
            return holdout_split(check_images(read_npy_file(path), str(path)), None)
        if form is Format.NPZ:
            return _load_npz(path)
        if form is Format.IMAGE_FILE:
            raise DataError(f"{path}: a single image; put the images in a folder and pass the folder")
        return holdout_split(check_images(read_idx(path), str(path)), None)  # Format.IDX_FILE
    except RecursionError:
        raise DataError(f"{path}: folder structure too deep (a symlink loop?)") from None
    except PermissionError as exc:
        raise DataError(f"{path}: permission denied ({exc.filename})") from None


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` images of each split of ``dataset``, with their labels (all with None)."""
    if limit is None:
        return dataset
    return tuple((x[:limit], None if y is None else y[:limit]) for x, y in dataset)


def _load_idx_folder(folder: Path) -> Dataset:
    found = {key: find_idx(folder, key) for key in IDX_NAMES}
    if found["x_train"] is None or found["x_test"] is None:
        raise DataError(
            f"{folder}: expected MNIST-style IDX files train-images-idx3-ubyte[.gz] and "
            "t10k-images-idx3-ubyte[.gz] (labels optional)"
        )
    arrays = {key: (read_idx(p) if p is not None else None) for key, p in found.items()}
    xtr = check_images(arrays["x_train"], str(found["x_train"]))
    xte = check_images(arrays["x_test"], str(found["x_test"]))
    ytr = check_labels(arrays["y_train"], len(xtr), str(found["y_train"]))
    yte = check_labels(arrays["y_test"], len(xte), str(found["y_test"]))
    return (xtr, ytr), (xte, yte)


# The labels of each image array of an .npz (npz_image_keys), where it has them.
_NPZ_LABELS = {"x_train": "y_train", "x_test": "y_test", "x": "y"}


def _load_npz(path: Path) -> Dataset:
    keys = npz_image_keys(npz_names(path), path)
    arrays = read_npz(path, keys + tuple(_NPZ_LABELS[k] for k in keys if k in _NPZ_LABELS))
    if keys == ("x_train", "x_test"):
        xtr = check_images(arrays["x_train"], f"{path}[x_train]")
        xte = check_images(arrays["x_test"], f"{path}[x_test]")
        ytr = check_labels(arrays.get("y_train"), len(xtr), f"{path}[y_train]")
        yte = check_labels(arrays.get("y_test"), len(xte), f"{path}[y_test]")
        return (xtr, ytr), (xte, yte)
    (key,) = keys
    x = check_images(arrays[key], f"{path}[{key}]")
    return holdout_split(x, check_labels(arrays.get("y") if key == "x" else None, len(x), f"{path}[y]"))


def _load_labelled_folder(folder: Path, resize) -> tuple[np.ndarray, np.ndarray | None]:
    files, labels = labelled_files(folder)
    return read_image_set(files, resize, folder), labels


def _load_split_folder(folder: Path, resize) -> Dataset:
    xtr, ytr = _load_labelled_folder(folder / "train", resize)
    xte, yte = _load_labelled_folder(folder / "test", resize)
    if xtr.ndim != xte.ndim:  # one data set: colour if any of its files is, as one folder is
        xtr, xte = (grey_to_rgb(x) if x.ndim == 3 else x for x in (xtr, xte))
    if xtr.shape[1:3] != xte.shape[1:3]:
        raise DataError(
            f"{folder}: train images are {xtr.shape[1]}x{xtr.shape[2]} but test images are "
            f"{xte.shape[1]}x{xte.shape[2]}; pass resize=(H, W) to bring them to one size"
        )
    return (xtr, ytr), (xte, yte)


def open_images(name_or_path: str | os.PathLike, resize: tuple[int, int] | None = None, stream: bool = False,
                limit: int | None = None) -> tuple[ImageSource, ImageSource, np.ndarray | None]:
    """The train and test images of a data set as image sources, and the test labels.

    Images are held in memory (:class:`~aekit.data.images.ArrayImages`, with the test
    labels or None), or streamed from disk (:mod:`aekit.data.streams`, no labels) with
    ``stream=True``, or by themselves when a .npy file or an image folder would take more
    than :data:`~aekit.data.streams.STREAM_ABOVE_BYTES` in memory. ``limit`` keeps the
    first ``limit`` images of each split.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive number of images or None, got {limit!r}")
    form = detect(name_or_path)
    if form is Format.BUILTIN and stream:
        raise DataError(f"{name_or_path} is a built-in data set, which loads in memory; pass stream=False")
    if not stream and form is not Format.BUILTIN and (float_bytes(name_or_path, resize) or 0) > STREAM_ABOVE_BYTES:
        log.info("%s would take over %d MB in memory as float32: streaming it from disk",
                 name_or_path, STREAM_ABOVE_BYTES >> 20)
        stream = True
    if stream:
        train, test = open_stream(name_or_path, resize)
        return (train, test, None) if limit is None else (train.head(limit), test.head(limit), None)
    (x_train, _), (x_test, y_test) = limited(load_dataset(name_or_path, resize), limit)  # before converting
    return ArrayImages(prepare_images(x_train)), ArrayImages(prepare_images(x_test)), y_test


def read_images(path: str | os.PathLike, resize: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]]:
    """Every image at ``path`` in order, no split, with a name each (for denoise and score).

    ``path`` is a folder of PNG/JPEG images, one image file, a ``.npy`` array, a ``.npz``
    (its images as :func:`~aekit.data.formats.npz_image_keys` finds them, without a
    train/test split), or an IDX file. Returns images uint8 (or float32) shaped
    (n, H, W) or (n, H, W, C) and their names (file names, or ``"0", "1", ...``).
    """
    path = Path(path)
    form = detect(path, builtins=False)
    check_resize(form, resize, path)
    if form.is_folder:
        files = image_files(path)
        if not files:
            raise DataError(f"{path}: no PNG or JPEG images found directly in this folder")
        return read_image_set(files, resize, path), [p.name for p in files]
    if form is Format.IMAGE_FILE:
        return read_image(path, resize)[None], [path.name]
    source = str(path)
    if form is Format.NPY:
        x = read_npy_file(path)
    elif form is Format.NPZ:
        keys = npz_image_keys(npz_names(path), path)
        if len(keys) > 1:
            raise DataError(f"{path}: holds a train/test split ({', '.join(keys)}); read_images reads one set "
                            "of images: save the images to read alone, or as 'x'")
        x, source = read_npz(path, keys)[keys[0]], f"{path}[{keys[0]}]"
    else:
        x = read_idx(path)
    x = check_images(x, source)
    return x, [str(i) for i in range(len(x))]


def describe(name_or_path: str | os.PathLike, resize: tuple[int, int] | None = None) -> dict:
    """Shapes, dtypes, value ranges and label facts, for ``aekit data info``."""
    (xtr, ytr), (xte, yte) = load_dataset(name_or_path, resize)
    info: dict = {"source": str(name_or_path)}
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        info[split] = {
            "shape": list(x.shape), "dtype": str(x.dtype),
            "min": float(x.min()), "max": float(x.max()),
            "labels": None if y is None else {"n_classes": int(len(np.unique(y))),
                                               "min": int(y.min()), "max": int(y.max())},
        }
    return info
