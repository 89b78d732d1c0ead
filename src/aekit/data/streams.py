"""Image data read from disk while training runs, for data sets larger than memory.

A stream is an :class:`~aekit.data.images.ImageSource` like images in memory
(:class:`~aekit.data.images.ArrayImages`): ``len()``, ``shape`` (n, C, H, W), ``head(n)``,
``first(n)``, and ``batches(batch_size, seed, epoch)``, which yields float32
(b, C, H, W) in [0, 1]; only a few thousand images are in memory at a time, so a
1,000,000-image 28x28 set trains in well under 1 GB of resident memory (bench/speed.py
measures it).

- :class:`NpyStream`: a ``.npy`` file of uint8 or float images, (n, H, W) or (n, H, W, C),
  read in whole chunks with ``os.pread``. Not through a memory map: pages touched through
  a map count towards the process' resident memory until the kernel reclaims them, while
  pread leaves them in the page cache, shared and reclaimable.
- :class:`FolderStream`: PNG/JPEG files, decoded batch by batch.

**Shuffling without random reads.** An epoch's order is a pure function of (seed, epoch),
as for data in memory, so a resumed run replays the same batches. A .npy file is cut into
chunks of ``chunk`` consecutive images (4,096: 3 MB of MNIST). The chunks are visited in a
random order, ``mix`` at a time (4: 16,384 images), and the images of those chunks are
shuffled together. Every read is one large sequential read; the price is that a batch
draws from ``mix`` chunks, not from the whole set. Folder images are separate files
anyway, so a folder stream shuffles all of them. The next group of images is read in a
background thread while the current one trains.

**When data streams.** With ``open_images(path, stream=True)`` (``aekit train --stream``),
or by itself when a .npy file or an image folder would take more than
:data:`STREAM_ABOVE_BYTES` as float32 in memory (:func:`float_bytes`). The train and
test split is the one in-memory loading makes (:func:`aekit.data.holdout_indices`, or the
folder's train/ and test/), so streaming changes the memory used, not the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from aekit.data.arrays import DataError, holdout_indices, read_npy_header
from aekit.data.formats import Format, check_resize, detect
from aekit.data.imagefiles import IMAGE_SUFFIXES, grey_to_rgb, labelled_files, read_image, set_channels
from aekit.data.images import ImageStream, prepare_images

STREAM_ABOVE_BYTES = 1 << 30  # 1 GiB of float32 images: 342,000 MNIST-sized images
CHUNK = 4096
MIX = 4


def _to_tensor(images: np.ndarray, source: object) -> torch.Tensor:
    """uint8/float (b, H, W[, C]) -> float32 tensor (b, C, H, W) in [0, 1]."""
    try:
        return prepare_images(images)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None


def _prefetched(loads: list[Callable[[], np.ndarray]]) -> Iterator[np.ndarray]:
    """Run ``loads`` in order, each one started while the previous result is in use."""
    if not loads:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aekit-read") as pool:
        pending = pool.submit(loads[0])
        for next_load in loads[1:] + [None]:
            result = pending.result()
            pending = pool.submit(next_load) if next_load is not None else None
            yield result


def _rebatch(groups: Iterator[np.ndarray], batch_size: int, source: object) -> Iterator[torch.Tensor]:
    """Cut a sequence of image groups into batches of ``batch_size``; only the last is short."""
    carry = None
    for images in groups:
        if carry is not None and len(carry):
            images = np.concatenate([carry, images])
        full = len(images) - len(images) % batch_size
        for start in range(0, full, batch_size):
            yield _to_tensor(images[start:start + batch_size], source)
        carry = images[full:]
    if carry is not None and len(carry):
        yield _to_tensor(carry, source)


class NpyStream(ImageStream):
    """Images of a ``.npy`` file (rows ``rows`` of it, default all), read chunk by chunk.

    Shape (n, C, H, W) as the images come out; the file holds (N, H, W) or (N, H, W, C).
    """

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | None = None,
                 chunk: int = CHUNK, mix: int = MIX):
        self.path = Path(path)
        self._offset, file_shape, self._dtype = _npy_header(self.path)
        self._n_file = file_shape[0]
        self._image_shape = file_shape[1:]                       # (H, W) or (H, W, C)
        self._row_bytes = int(np.prod(self._image_shape)) * self._dtype.itemsize
        self.rows = np.arange(self._n_file) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0 or self.rows[-1] >= self._n_file):
            raise ValueError(f"rows must be increasing indices into the file's {self._n_file} images")
        if chunk <= 0 or mix <= 0:
            raise ValueError(f"chunk and mix must be positive, got chunk={chunk}, mix={mix}")
        self.chunk, self.mix = chunk, mix

    @property
    def shape(self) -> tuple[int, int, int, int]:
        height, width = self._image_shape[:2]
        channels = self._image_shape[2] if len(self._image_shape) == 3 else 1
        return (len(self.rows), channels, height, width)

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, n: int) -> NpyStream:
        return NpyStream(self.path, self.rows[:n], self.chunk, self.mix)

    def take(self, indices: torch.Tensor) -> NpyStream:
        return NpyStream(self.path, self.rows[np.sort(np.asarray(indices))], self.chunk, self.mix)

    def _read_chunk(self, fd: int, chunk_id: int) -> np.ndarray:
        """The stream's images in file chunk ``chunk_id``, in file order."""
        lo = chunk_id * self.chunk
        hi = min(lo + self.chunk, self._n_file)
        size = (hi - lo) * self._row_bytes
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:  # pread may return less than asked
            got = os.preadv(fd, [view[done:]], self._offset + lo * self._row_bytes + done)
            if got == 0:
                raise DataError(f"{self.path}: file ended early (truncated while in use?)")
            done += got
        block = np.frombuffer(buffer, dtype=self._dtype).reshape((hi - lo, *self._image_shape))
        first, last = np.searchsorted(self.rows, [lo, hi])
        return block[self.rows[first:last] - lo]

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[torch.Tensor]:
        """Float32 batches (b, C, H, W); shuffled by chunks (see the module doc) when ``seed``
        is given, in file order otherwise; only the last batch is short."""
        chunk_ids = np.unique(self.rows // self.chunk)
        if seed is not None:
            chunk_ids = np.random.default_rng([seed, epoch]).permutation(chunk_ids)
        groups = [chunk_ids[i:i + self.mix] for i in range(0, len(chunk_ids), self.mix)]
        fd = os.open(self.path, os.O_RDONLY)

        def load(index: int) -> np.ndarray:
            images = np.concatenate([self._read_chunk(fd, c) for c in groups[index]])
            if seed is not None:
                images = images[np.random.default_rng([seed, epoch, index]).permutation(len(images))]
            return images

        try:
            yield from _rebatch(_prefetched([lambda i=i: load(i) for i in range(len(groups))]),
                                batch_size, self.path)
        finally:
            os.close(fd)


def _npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a .npy file, checked for streaming."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = read_npy_header(f, str(path))
            offset = f.tell()
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{path}: images must be uint8 or float in [0, 1] to stream, got dtype {dtype}")
    ok_shape = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))
    if not ok_shape or shape[0] == 0:
        raise DataError(f"{path}: expected images shaped (n, H, W) or (n, H, W, C) with C 1 or 3, got {shape}")
    if fortran and len(shape) > 1:
        raise DataError(f"{path}: Fortran-ordered array; save it C-ordered (np.save(path, np.ascontiguousarray(x)))")
    expected = offset + math.prod(shape) * dtype.itemsize
    if (size := path.stat().st_size) < expected:
        raise DataError(f"{path}: truncated: header says {shape} {dtype} ({expected:,} bytes), file has {size:,}")
    return offset, shape, dtype


class FolderStream(ImageStream):
    """PNG/JPEG files decoded batch by batch; shape (n, C, H, W), (H, W) from the first file.

    All images must have the first one's size (or pass ``resize``). ``channels`` is the
    set's (default: 3 if any of ``files`` is colour, from their headers, as
    :func:`~aekit.data.imagefiles.set_channels` says); grey images in a colour set are
    repeated to RGB, as in-memory loading does.
    """

    def __init__(self, files: list[Path], resize: tuple[int, int] | None = None, where: Path | None = None,
                 channels: int | None = None):
        if not files:
            raise DataError(f"{where}: no PNG or JPEG images to stream")
        self.files, self.resize, self.where = list(files), resize, where
        self.channels = set_channels(self.files) if channels is None else channels
        height, width = read_image(self.files[0], resize).shape[:2]
        self._image_shape = (height, width) if self.channels == 1 else (height, width, 3)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        height, width = self._image_shape[:2]
        return (len(self.files), self.channels, height, width)

    def __len__(self) -> int:
        return len(self.files)

    def head(self, n: int) -> FolderStream:
        return FolderStream(self.files[:n], self.resize, self.where, self.channels)

    def take(self, indices: torch.Tensor) -> FolderStream:
        return FolderStream([self.files[i] for i in np.sort(np.asarray(indices))], self.resize, self.where,
                            self.channels)

    def _read(self, paths: list[Path]) -> np.ndarray:
        images = []
        for path in paths:
            image = read_image(path, self.resize)
            if image.ndim == 2 and self.channels == 3:
                image = grey_to_rgb(image)
            if image.shape[:2] != self._image_shape[:2]:
                raise DataError(
                    f"{path}: image is {'x'.join(map(str, image.shape[:2]))} but {self.files[0].name} is "
                    f"{'x'.join(map(str, self._image_shape[:2]))}; pass resize=(H, W) to bring them to one size"
                )
            if image.shape != self._image_shape:  # the headers said grey when the stream opened
                raise DataError(f"{path}: a colour image in a set whose files were all grey when the stream "
                                "opened (replaced while in use?); open the data again")
            images.append(image)
        return np.stack(images)

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[torch.Tensor]:
        """Float32 batches (b, C, H, W); all files shuffled when ``seed`` is given."""
        order = np.arange(len(self.files))
        if seed is not None:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        groups = [[self.files[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        for images in _prefetched([lambda g=g: self._read(g) for g in groups]):
            yield _to_tensor(images, self.where)


def open_stream(path: str | os.PathLike, resize: tuple[int, int] | None = None) -> tuple[ImageStream, ImageStream]:
    """The train and test streams of a .npy file or an image folder, split as
    :func:`aekit.data.load_dataset` splits them."""
    path = Path(path)
    form = detect(path, builtins=False)
    check_resize(form, resize, path)
    if form is Format.NPY:
        n = _npy_header(path)[1][0]
        train, test = holdout_indices(n)
        return NpyStream(path, train), NpyStream(path, test)
    # The channels are the whole data set's, train and test alike, as in memory.
    if form is Format.SPLIT_FOLDER:
        train_files, test_files = labelled_files(path / "train")[0], labelled_files(path / "test")[0]
        channels = set_channels(train_files + test_files)
        return (FolderStream(train_files, resize, path / "train", channels),
                FolderStream(test_files, resize, path / "test", channels))
    if form is Format.IMAGE_FOLDER:
        files = labelled_files(path)[0]
        train, test = holdout_indices(len(files))
        channels = set_channels(files)
        return (FolderStream([files[i] for i in train], resize, path, channels),
                FolderStream([files[i] for i in test], resize, path, channels))
    raise DataError(
        f"{path}: only .npy files and folders of {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} "
        f"images can be streamed, not {form.value}; pass stream=False to load it in memory, or save the "
        "images with numpy.save(path, x) and stream that"
    )


def float_bytes(path: str | os.PathLike, resize: tuple[int, int] | None = None) -> int | None:
    """Memory a .npy file or an image folder would take as float32 images in memory, or
    None for data that cannot stream. A folder is estimated from its first image."""
    path = Path(path)
    try:
        form = detect(path, builtins=False)
        if form is Format.NPY:
            return math.prod(_npy_header(path)[1]) * 4
        if form in (Format.SPLIT_FOLDER, Format.IMAGE_FOLDER):
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            return len(files) * read_image(files[0], resize).size * 4 if files else None
    except (DataError, OSError):
        return None
    return None


__all__ = ["NpyStream", "FolderStream", "open_stream", "float_bytes", "STREAM_ABOVE_BYTES"]
