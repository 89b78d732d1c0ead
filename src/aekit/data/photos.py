"""Natural-image data sets cut from photographs that ship with scikit-image and scikit-learn,
so that they exist offline: the quality suite's "not MNIST" (bench/quality.py).

Each set is square patches cut at random positions (a fixed seed) from whole photographs;
the test patches come from photographs that no training patch comes from, so a test score
measures how a code carries over to new pictures, not to new crops of the same ones.

=============  ========  =======================================  =======================
name           patch     training photographs                     test photographs
=============  ========  =======================================  =======================
``photos32``   32x32x3   astronaut, coffee, motorcycle, rocket,   chelsea, flower
                         china                                     (10,000 / 2,000 patches)
``photos64``   64x64x3   the same                                 the same (2,000 / 500)
``gray32``     32x32x1   the same in grey, and the grey ones:     chelsea, flower (grey),
                         coins, moon, brick, gravel, grass        camera (10,000 / 2,000)
``digits8``    8x8x1     scikit-learn's handwritten digits: 1,500 training, the last 297 for
                         test (labelled); pixels 0..16 scaled to 0..255
=============  ========  =======================================  =======================

Training patches are cut from each training photograph at three scales (enlarged 2x,
as it is, and halved: natural images look alike across scales, and five photographs are
few), in proportion to each version's area (so most come from the enlargements, which are
smoother), and each is turned by a random one of the square's 8 symmetries. Test patches
are cut plain, at the photographs' own scale. PCA and the autoencoder fit the same training
patches. Grey is ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B``, as Pillow's
``convert("L")``).
"""

from __future__ import annotations

import numpy as np

from aekit.data.arrays import DataError

COLOUR_TRAIN = ("astronaut", "coffee", "motorcycle", "rocket", "china")
COLOUR_TEST = ("chelsea", "flower")
GRAY_TRAIN = (*COLOUR_TRAIN, "coins", "moon", "brick", "gravel", "grass")
GRAY_TEST = (*COLOUR_TEST, "camera")
SEED = 20061  # the patch positions; fixed, so a set is the same on every machine
TRAIN_SCALES = (2.0, 1.0, 0.5)  # each training photograph enlarged, as it is, and halved
DIGITS_TRAIN = 1500


def _photograph(name: str) -> np.ndarray:
    """uint8 (H, W, 3) or (H, W): a photograph bundled with scikit-image or scikit-learn."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return load_sample_image(f"{name}.jpg")
        import skimage.data
    except ImportError as exc:
        raise DataError(f"the photograph data sets are cut from scikit-image's and scikit-learn's bundled "
                        f"photographs, and {exc.name} is missing; pip install scikit-image scikit-learn") from None
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair
    return getattr(skimage.data, name)()


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W) uint8 luma."""
    if image.ndim == 2:
        return image
    luma = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def cut_patches(photographs: list[np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` patches of ``size`` x ``size`` at uniform random positions, drawn from
    each photograph in proportion to its area: uint8 (count, size, size[, 3])."""
    areas = np.array([p.shape[0] * p.shape[1] for p in photographs], dtype=np.float64)
    which = rng.choice(len(photographs), size=count, p=areas / areas.sum())
    patches = []
    for i in which:
        photo = photographs[i]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        patches.append(photo[top:top + size, left:left + size])
    return np.stack(patches)


def scaled(photo: np.ndarray) -> list[np.ndarray]:
    """``photo`` at each of :data:`TRAIN_SCALES` (Pillow: bicubic up, box-filtered down)."""
    from PIL import Image

    image, (height, width) = Image.fromarray(photo), photo.shape[:2]
    return [np.asarray(image.resize((round(width * s), round(height * s)),
                                    Image.Resampling.BICUBIC if s > 1 else Image.Resampling.BOX))
            if s != 1 else photo for s in TRAIN_SCALES]


def symmetries(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each patch (n, S, S[, C]) turned by a random one of the square's 8 symmetries."""
    which = rng.integers(0, 8, size=len(patches))
    out = patches.copy()
    for k in range(8):
        turned = np.rot90(patches[which == k], k % 4, axes=(1, 2))
        out[which == k] = turned[:, :, ::-1] if k >= 4 else turned
    return out


def _patch_set(train: tuple[str, ...], test: tuple[str, ...], size: int, counts: tuple[int, int],
               grey: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    load = (lambda name: _grey(_photograph(name))) if grey else _photograph
    training = [version for name in train for version in scaled(load(name))]
    return {"x_train": symmetries(cut_patches(training, counts[0], size, rng), rng),
            "x_test": cut_patches([load(n) for n in test], counts[1], size, rng)}


def photos32() -> dict[str, np.ndarray]:
    return _patch_set(COLOUR_TRAIN, COLOUR_TEST, 32, (10000, 2000), grey=False)


def photos64() -> dict[str, np.ndarray]:
    return _patch_set(COLOUR_TRAIN, COLOUR_TEST, 64, (2000, 500), grey=False)


def gray32() -> dict[str, np.ndarray]:
    return _patch_set(GRAY_TRAIN, GRAY_TEST, 32, (10000, 2000), grey=True)


def digits8() -> dict[str, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixels 0..16 -> 0..255), the first 1,500 for training."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    y = digits.target.astype(np.uint8)
    return {"x_train": x[:DIGITS_TRAIN], "y_train": y[:DIGITS_TRAIN],
            "x_test": x[DIGITS_TRAIN:], "y_test": y[DIGITS_TRAIN:]}


# name -> (how to make it, the shape of each of its arrays)
SETS = {
    "photos32": (photos32, {"x_train": (10000, 32, 32, 3), "x_test": (2000, 32, 32, 3)}),
    "photos64": (photos64, {"x_train": (2000, 64, 64, 3), "x_test": (500, 64, 64, 3)}),
    "gray32": (gray32, {"x_train": (10000, 32, 32), "x_test": (2000, 32, 32)}),
    "digits8": (digits8, {"x_train": (1500, 8, 8), "y_train": (1500,), "x_test": (297, 8, 8), "y_test": (297,)}),
}
