"""What a path holds, decided in one place: :func:`detect` names the :class:`Format` of a
built-in name, a folder or a file, and refuses what cannot be read (a missing path, a
broken symlink, a pipe); :func:`npz_image_keys` says which arrays of an ``.npz`` are the
images. The loaders (:mod:`aekit.data.loaders`) and the streams
(:mod:`aekit.data.streams`) dispatch on them, so every reader agrees on what a path is.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Collection
from pathlib import Path


from aekit.data.arrays import DataError
from aekit.data.datasets import BUILTINS, is_builtin
from aekit.data.imagefiles import IMAGE_SUFFIXES


class Format(enum.Enum):
    """The kinds of data aekit reads; the value says it in words."""

    BUILTIN = "a built-in data set"
    IDX_FOLDER = "a folder of MNIST-style IDX files"
    SPLIT_FOLDER = "a folder of images with train/ and test/ subfolders"
    IMAGE_FOLDER = "a folder of images (or of class subfolders of images)"
    NPY = "a .npy array"
    NPZ = "a .npz file of arrays"
    IMAGE_FILE = "a single image file"
    IDX_FILE = "an IDX file"  # any other file, gzipped or not

    @property
    def is_folder(self) -> bool:
        return self in (Format.IDX_FOLDER, Format.SPLIT_FOLDER, Format.IMAGE_FOLDER)

    @property
    def resizes(self) -> bool:
        """Whether ``resize=(H, W)`` applies: image files are resampled as they are decoded;
        arrays, IDX files and built-in sets are used as they are."""
        return self in (Format.IMAGE_FILE, Format.IMAGE_FOLDER, Format.SPLIT_FOLDER)


def detect(name_or_path: str | os.PathLike, builtins: bool = True) -> Format:
    """The :class:`Format` of ``name_or_path``.

    With ``builtins`` a built-in's bare name means the built-in data set (see
    :func:`~aekit.data.is_builtin`); without, every argument is a path. A folder holding
    ``train-images-idx3-ubyte[.gz]`` is an IDX folder; a folder with ``train/`` and
    ``test/`` subfolders is a split image folder; any other folder is an image folder.
    A file is told by its suffix (``.npy``, ``.npz``, ``.png``/``.jpg``/``.jpeg``); any
    other file is read as an IDX file, gzipped or not.
    """
    if builtins and is_builtin(name_or_path):
        return Format.BUILTIN
    path = Path(name_or_path)
    _refuse_odd_path(path)
    if not path.exists():
        builtin_names = f", and not a built-in name ({', '.join(sorted(BUILTINS))})" if builtins else ""
        raise DataError(f"no data at {str(name_or_path)!r}: not a file or folder{builtin_names}")
    if path.is_dir():
        if find_idx(path, "x_train") is not None:
            return Format.IDX_FOLDER
        if (path / "train").is_dir() and (path / "test").is_dir():
            return Format.SPLIT_FOLDER
        return Format.IMAGE_FOLDER
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return Format.NPY
    if suffix == ".npz":
        return Format.NPZ
    if suffix in IMAGE_SUFFIXES:
        return Format.IMAGE_FILE
    return Format.IDX_FILE


def check_resize(form: Format, resize: tuple[int, int] | None, name_or_path: str | os.PathLike) -> None:
    """Refuse ``resize`` for data it does not apply to (:attr:`Format.resizes`), rather than
    ignore it while the run records it."""
    if resize is not None and not form.resizes:
        raise DataError(f"{name_or_path}: resize=(H, W) applies to image files and folders of images, not to "
                        f"{form.value}; remove resize=(H, W), or save the images as PNG files to resize them")


def _refuse_odd_path(path: Path) -> None:
    """Symlink loops, pipes and devices: reading them fails late or blocks forever."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: a broken symlink or a symlink loop; point it at the data")
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise DataError(f"{path}: not a regular file or folder (a pipe or a device?); pass the data file itself")


# ----------------------------------------------------------------------- IDX folders

IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def find_idx(folder: Path, key: str) -> Path | None:
    """The IDX file of ``folder`` holding ``key`` (``x_train``, ``y_test``...), or None."""
    for stem in IDX_NAMES[key]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


# ------------------------------------------------------------------------------- npz

def npz_image_keys(arrays: Collection[str], path: Path) -> tuple[str, ...]:
    """Which arrays of an ``.npz`` are its images, from their names (``arrays``: the names,
    or the arrays by name), the one rule for every reader: ``("x_train", "x_test")``
    (Keras' layout, labels ``y_train``/``y_test``), else ``("x",)`` (labels ``y``), else
    the one array the file holds, whatever its name."""
    if "x_train" in arrays:
        if "x_test" not in arrays:
            raise DataError(f"{path}: has x_train but no x_test; add x_test or save a single array 'x'")
        return ("x_train", "x_test")
    if "x" in arrays:
        return ("x",)
    if len(arrays) == 1:
        return (next(iter(arrays)),)
    raise DataError(
        f"{path}: expected arrays x_train/x_test (Keras layout), an array named 'x' or a single "
        f"array, found {sorted(arrays) or 'none'}"
    )
