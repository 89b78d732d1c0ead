"""The photograph data sets (aekit.data.photos): cut from bundled images, tested on other ones."""

import numpy as np
import pytest

from aekit.data import load_dataset, photos


def test_patches_are_crops_drawn_by_area():
    rng = np.random.default_rng(0)
    small = np.arange(20 * 20, dtype=np.uint8).reshape(20, 20)
    large = (np.arange(60 * 60) % 251).astype(np.uint8).reshape(60, 60)
    patches = photos.cut_patches([small, large], 4000, 8, rng)
    assert patches.shape == (4000, 8, 8)
    from_small = np.array([p.max() <= 255 and np.isin(p, small).all() and
                           any((small[i:i + 8, j:j + 8] == p).all() for i in range(13) for j in range(13))
                           for p in patches[:200]])
    # 400 against 3,600 pixels: a tenth of the patches come from the small image.
    assert 0.04 < from_small.mean() < 0.18
    for p in patches[:50]:  # every patch is a crop of one of the two images
        assert any((img[i:i + 8, j:j + 8] == p).all() for img in (small, large)
                   for i in range(img.shape[0] - 7) for j in range(img.shape[1] - 7))


def test_symmetries_turn_each_patch_by_one_of_eight():
    patches = np.random.default_rng(1).integers(0, 256, (64, 5, 5, 3), dtype=np.uint8)
    turned = photos.symmetries(patches, np.random.default_rng(2))
    seen = set()
    for p, t in zip(patches, turned):
        options = [np.rot90(p, k % 4) if k < 4 else np.rot90(p, k % 4)[:, ::-1] for k in range(8)]
        matches = [k for k, o in enumerate(options) if (o == t).all()]
        assert matches
        seen.add(matches[0])
    assert len(seen) == 8


def test_test_photographs_are_not_training_photographs():
    assert not set(photos.COLOUR_TRAIN) & set(photos.COLOUR_TEST)
    assert not set(photos.GRAY_TRAIN) & set(photos.GRAY_TEST)


def test_digits8_is_scikit_learns_digits(data_home):
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_test, y_test) = load_dataset("digits8")
    digits = load_digits()
    x = np.concatenate([x_train, x_test]).astype(np.float64) * 16 / 255
    np.testing.assert_allclose(x, digits.images, atol=16 / 255 / 2 + 1e-9)
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), digits.target)
    assert len(x_train) == photos.DIGITS_TRAIN


@pytest.mark.parametrize("name", ["gray32"])
def test_a_photograph_set_is_built_cached_and_unlabelled(data_home, name):
    (x_train, y_train), (x_test, y_test) = load_dataset(name)
    shapes = photos.SETS[name][1]
    assert x_train.shape == shapes["x_train"] and x_test.shape == shapes["x_test"]
    assert x_train.dtype == np.uint8 and y_train is None and y_test is None
    (again, _), _ = load_dataset(name)  # from the cache, the same
    np.testing.assert_array_equal(again, x_train)
