"""Checked numpy images: pixel values as floats, the checks every loader applies, the fixed
train/test split, and readers of IDX files, ``.npy``/``.npz`` arrays and arrays-only
pickles that trust no header (a size a file claims is checked before it is allocated).

Images here are numpy arrays as ``keras.datasets.mnist.load_data()`` gives them: uint8
(or float32 in [0, 1]) shaped (n, H, W) for grayscale or (n, H, W, C) for colour.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from tokenize import TokenError
from typing import TypeVar

import numpy as np

Split = tuple[np.ndarray, np.ndarray | None]
Dataset = tuple[Split, Split]

TEST_FRACTION = 0.1
T = TypeVar("T")


class DataError(ValueError):
    """Data that cannot be used, with a message that says what to do about it."""


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


def check_images(x: np.ndarray, source: str) -> np.ndarray:
    """``x`` checked as images: uint8 as it is, float as float32 in [0, 1], (n, H, W, 1)
    as (n, H, W); anything else is refused with a message that starts with ``source``."""
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


def check_labels(y: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
    """Labels ``y`` (or None) checked as ``n`` integers, returned as int64."""
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


# ------------------------------------------------------------------------- npy / npz

def read_npy_header(f, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the header of a ``.npy`` file ``f`` (binary, at
    its start), leaving ``f`` at the first byte of data. A garbled header, a format version
    other than 1.0 or 2.0, negative sizes and object dtypes (which only pickle can load)
    are refused."""
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
    if any(d < 0 for d in shape):
        raise DataError(f"{source}: header says shape {shape}, with a negative size; the file is damaged")
    return tuple(int(d) for d in shape), fortran, dtype


def read_npy(raw: bytes, source: str) -> np.ndarray:
    """The array in the bytes of a ``.npy`` file, read without pickle and without trusting
    its header (:func:`read_npy_header`): the shape the header claims must match the bytes
    present before anything is allocated.
    """
    f = io.BytesIO(raw)
    shape, fortran, dtype = read_npy_header(f, source)
    count = math.prod(shape)
    present = len(raw) - f.tell()
    if count * dtype.itemsize != present:
        raise DataError(f"{source}: header says shape {shape} of {dtype} ({count * dtype.itemsize:,} bytes), "
                        f"the file holds {present:,} bytes; it is truncated or damaged")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()  # a writable copy


def npz_names(path: Path) -> list[str]:
    """The names of the arrays of an ``.npz`` file (its members without ``.npy``), from the
    zip's directory alone: nothing is decompressed."""
    return list(_npz_call(path, lambda zf: _npy_members(zf, path)))


def read_npz(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file named in ``keys`` (default: all; a name it lacks is
    left out), each read by :func:`read_npy` (no pickle, sizes checked).

    Members not asked for are never decompressed, and the ones read must fit in memory
    together, by the sizes the zip's directory claims (decompression stops there: a member
    that inflates further fails its CRC check), before any is decompressed.
    """
    def read(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
        members = _npy_members(zf, path)
        chosen = list(members) if keys is None else [k for k in dict.fromkeys(keys) if k in members]
        _check_claim(path, sum(members[k].file_size for k in chosen),
                     f"the sum of its members {', '.join(chosen)}")
        return {name: read_npy(zf.read(members[name]), f"{path}[{name}]") for name in chosen}

    return _npz_call(path, read)


def _npy_members(zf: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """An ``.npz``'s members by array name; a member that is no ``.npy`` is refused."""
    members = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise DataError(f"{path}: holds {info.filename!r}, which is not a .npy array; "
                            "save the arrays with numpy.savez")
        members[info.filename.removesuffix(".npy")] = info
    return members


def _npz_call(path: Path, use: Callable[[zipfile.ZipFile], T]) -> T:
    """``use`` of the opened zip of an ``.npz``, its failures as one :class:`DataError` line."""
    try:
        with zipfile.ZipFile(path) as zf:
            return use(zf)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as exc:  # RuntimeError: an encrypted member
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def read_npy_file(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, read by :func:`read_npy`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return read_npy(raw, str(path))


# ----------------------------------------------------------------------------- pickle

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

