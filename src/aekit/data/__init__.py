"""Image data: built-in data sets (downloaded once, verified), the user's own files, and
one kind of image source for images in memory and images streamed from disk.

:func:`load_dataset` returns what ``keras.datasets.mnist.load_data()`` returns in the seed::

    (x_train, y_train), (x_test, y_test) = load_dataset("mnist")
    # x_*: uint8 (n, H, W) for grayscale or (n, H, W, C) for colour; y_*: int64 (n,) or None

and :func:`open_images` gives the same split as image sources (:class:`ImageSource`:
``shape`` (n, C, H, W), ``len()``, ``head``, ``first``, ``batches``), held in memory
(:class:`ArrayImages`) or streamed from disk (:class:`NpyStream`, :class:`FolderStream`).
Local data is read from IDX files (``.gz`` or not), ``.npy``/``.npz`` arrays and folders
of PNG/JPEG images; :func:`detect` decides which a path is, for every reader.

Modules, in the order they build on each other:

- :mod:`~aekit.data.arrays`: checked numpy images, pixel values as floats, the fixed
  train/test split; IDX, .npy/.npz and arrays-only pickle readers.
- :mod:`~aekit.data.layouts`: the one conversion between image layouts (``nhw``,
  ``nhwc``, ``nchw``, ``flat``) and float32 (n, C, H, W) in [0, 1] (:func:`parse_images`,
  :func:`from_nchw`, :func:`to_nchw`).
- :mod:`~aekit.data.imagefiles`: PNG/JPEG files read and written.
- :mod:`~aekit.data.datasets`: the built-in data sets and their cache.
- :mod:`~aekit.data.formats`: what a path holds (:func:`detect`, :func:`npz_image_keys`).
- :mod:`~aekit.data.images`: :class:`ImageSource`, :class:`ArrayImages`, :func:`as_images`.
- :mod:`~aekit.data.streams`: images streamed from disk.
- :mod:`~aekit.data.fingerprint`: a checksum of what a source gives (:func:`fingerprint`).
- :mod:`~aekit.data.loaders`: :func:`load_dataset`, :func:`open_images`,
  :func:`read_images`, :func:`describe`.
"""

from aekit.data.arrays import (TEST_FRACTION, Dataset, DataError, Split, check_finite, holdout_indices,
                               holdout_split, load_arrays_pickle, memory_bytes, read_idx, read_npy, read_npz,
                               to_float)
from aekit.data.datasets import (BUILTINS, Builtin, data_home, data_source, fetch, is_builtin, load_builtin,
                                 mnist_from_pickle)
from aekit.data.fingerprint import fingerprint
from aekit.data.formats import Format, detect, npz_image_keys
from aekit.data.imagefiles import IMAGE_SUFFIXES, labelled_files, read_image, write_images
from aekit.data.images import ArrayImages, ImageSource, ImageStream, as_images, epoch_permutation, prepare_images
from aekit.data.layouts import LAYOUTS, from_nchw, parse_images, to_nchw
from aekit.data.loaders import describe, limited, load_dataset, open_images, read_images
from aekit.data.streams import STREAM_ABOVE_BYTES, FolderStream, NpyStream, float_bytes, open_stream

__all__ = ["load_dataset", "limited", "open_images", "read_images", "write_images", "describe", "fetch",
           "ImageSource", "ArrayImages", "ImageStream", "NpyStream", "FolderStream", "as_images",
           "prepare_images", "epoch_permutation", "open_stream", "float_bytes", "STREAM_ABOVE_BYTES",
           "Format", "detect", "npz_image_keys", "to_float", "to_nchw", "parse_images", "from_nchw", "LAYOUTS",
           "check_finite", "read_idx", "read_npy", "read_npz", "read_image", "load_arrays_pickle", "mnist_from_pickle",
           "holdout_split", "holdout_indices", "labelled_files", "data_home", "is_builtin", "data_source",
           "load_builtin", "memory_bytes", "DataError", "BUILTINS", "Builtin", "IMAGE_SUFFIXES",
           "TEST_FRACTION", "Split", "Dataset", "fingerprint"]
