"""Image files: one PNG/JPEG read safely (decompression bombs refused from the header),
the image files of a folder and its class subfolders, a set of them stacked, and
:func:`write_images`, which writes images back as files.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePath

import numpy as np

from aekit._io import atomic_folder, atomic_path, refuse_existing
from aekit.data.arrays import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# PIL modes of grey images: 1-bit, 8-bit, 16/32-bit integer, with or without alpha.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")


def mode_channels(mode: str) -> int:
    """The channels of an image in PIL ``mode``: 1 for :data:`GREY_MODES`, 3 for any other
    (RGB, RGBA, palette, CMYK...). A file's channels are what the file says, not what its
    pixels happen to hold: a black frame saved as RGB is a colour image."""
    return 1 if mode in GREY_MODES else 3


@contextlib.contextmanager
def _opened(path: Path) -> Iterator:
    """``path`` opened by Pillow (its header read, no pixel decoded), a possible
    decompression bomb refused; any failure inside becomes one :class:`DataError` line."""
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
                yield img
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses at open
        raise DataError(_bomb_message(path, str(exc))) from None
    except Exception as exc:  # Pillow reports broken files as OSError, SyntaxError, struct.error...
        raise DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); "
                        "remove or replace the file") from None


def read_image(path: Path, resize: tuple[int, int] | None) -> np.ndarray:
    """One image file -> uint8 (H, W) for a grey file or (H, W, 3) for a colour one, as its
    mode says (:func:`mode_channels`)."""
    from PIL import Image

    with _opened(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits (PIL's convert("L") would clip instead).
            arr = np.asarray(img, dtype=np.int64)
            top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
            img = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), "L")
        elif img.mode == "P":
            img = img.convert("RGBA")
        if mode_channels(img.mode) == 1:
            img = img.convert("L")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        if resize is not None:
            height, width = resize
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def file_channels(path: Path) -> int:
    """1 or 3: the channels :func:`read_image` gives ``path``, from its header alone."""
    with _opened(path) as img:
        return mode_channels(img.mode)


def set_channels(files: list[Path]) -> int:
    """The channels of a set of image files: 3 if any file is colour, else 1 (headers only)."""
    return 3 if any(file_channels(p) == 3 for p in files) else 1


def grey_to_rgb(x: np.ndarray) -> np.ndarray:
    """Grey images (..., H, W) -> (..., H, W, 3), each pixel repeated in R, G and B: how a
    grey image joins a colour set."""
    return np.repeat(x[..., None], 3, axis=-1)


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


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_set(files: list[Path], resize: tuple[int, int] | None, where: Path) -> np.ndarray:
    """``files`` read and stacked: uint8 (n, H, W), or (n, H, W, 3) if any is in colour
    (the grey ones then repeated to RGB, :func:`grey_to_rgb`)."""
    images = [read_image(p, resize) for p in files]
    if any(img.ndim == 3 for img in images):  # any colour image makes the whole set RGB
        images = [grey_to_rgb(img) if img.ndim == 2 else img for img in images]
    sizes = {img.shape[:2] for img in images}
    if len(sizes) > 1:
        first = images[0].shape[:2]
        odd = next(p for p, img in zip(files, images) if img.shape[:2] != first)
        raise DataError(
            f"{where}: images have different sizes ({files[0].name} is {first[0]}x{first[1]}, "
            f"{odd.name} is {images[files.index(odd)].shape[0]}x{images[files.index(odd)].shape[1]}); "
            "pass resize=(H, W) to bring them to one size"
        )
    return np.stack(images)


def labelled_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """The image files of a folder, or of its class subfolders (labels = sorted class index)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and image_files(p))
    flat = image_files(folder)
    if classes and not flat:
        files, labels = [], []
        for index, sub in enumerate(classes):
            sub_files = image_files(sub)
            files += sub_files
            labels += [index] * len(sub_files)
        return files, np.asarray(labels, dtype=np.int64)
    if not flat:
        raise DataError(
            f"{folder}: no PNG or JPEG images found; expected image files, class subfolders "
            "of images, or train/ and test/ subfolders"
        )
    return flat, None


def output_names(names: list[str]) -> list[str]:
    """A PNG file name for each input name (a file name, ``a/1.png``, or ``"0"``...), no two
    alike even where the file system ignores case: the stem (``x.png`` -> ``x.png``,
    ``0`` -> ``0.png``) where no other input has it, else the whole name with ``/`` as
    ``_`` (``x.jpg`` -> ``x.jpg.png``, ``a/1.png`` -> ``a_1.png.png``); a name still taken
    gets ``-2``, ``-3``... The one rule for every writer of an image per input."""
    stems = [PurePath(name).stem or "image" for name in names]
    clashes = Counter(stem.casefold() for stem in stems)
    wanted = [stem if clashes[stem.casefold()] == 1 else name.replace("/", "_").replace("\\", "_")
              for stem, name in zip(stems, names)]
    reserved, taken, out = {w.casefold() for w in wanted}, set(), []
    for want in wanted:
        name, k = want, 1
        while name.casefold() in taken or (name != want and name.casefold() in reserved):
            k += 1
            name = f"{want}-{k}"
        taken.add(name.casefold())
        out.append(name + ".png")
    return out


def write_images(x: np.ndarray, names: list[str], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write images (n, H, W) or (n, H, W, C), uint8 or float in [0, 1], to ``out``; an
    existing ``out`` is replaced only with ``overwrite``.

    ``out`` ending in ``.npy``/``.npz`` gets one array (key ``x``) in the input's layout;
    an image suffix with one image gets that file; anything else becomes a folder of PNGs
    named after ``names``, one each (:func:`output_names`). The folder is built under a temporary name and renamed, so a
    failure leaves nothing behind.
    """
    out = Path(out)
    refuse_existing(out, overwrite=overwrite)
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
                            "pass a folder name or a .npy/.npz file as out")
        with atomic_path(out) as tmp:
            Image.fromarray(pixels[0]).save(tmp, format="PNG" if suffix == ".png" else "JPEG")
        return out
    with atomic_folder(out) as staging:
        for image, name in zip(pixels, output_names(names)):
            Image.fromarray(image).save(staging / name)
    return out
