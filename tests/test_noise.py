"""Corruptions: statistics, clipping, determinism, and spec parsing."""

import pytest
import torch

from aekit.noise import Noise, add_noise, noise_generator, parse_noise


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_parse():
    assert parse_noise("gaussian:0.5") == Noise("gaussian", 0.5)
    assert parse_noise("salt_pepper:0.1") == Noise("salt_pepper", 0.1)
    assert str(parse_noise("mask:0.3")) == "mask:0.3"
    assert parse_noise(None) is None and parse_noise("none") is None


@pytest.mark.parametrize("spec, message", [
    ("gaussian", "KIND:AMOUNT"), ("blur:1", "KIND:AMOUNT"), ("mask:x", "KIND:AMOUNT"),
    ("mask:1.5", r"fraction in \[0, 1\]"), ("gaussian:-1", "standard deviation >= 0"),
])
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_noise(spec)


def test_gaussian_statistics_and_clipping():
    x = torch.full((200, 1, 28, 28), 0.5)
    out = add_noise(x, "gaussian:0.1", gen())
    assert float((out - x).std()) == pytest.approx(0.1, rel=0.02)
    wide = add_noise(x, "gaussian:2.0", gen())
    assert float(wide.min()) == 0.0 and float(wide.max()) == 1.0
    assert torch.equal(x, torch.full((200, 1, 28, 28), 0.5))  # input untouched


def test_salt_pepper_fraction():
    x = torch.full((100, 1, 28, 28), 0.5)
    out = add_noise(x, "salt_pepper:0.2", gen())
    assert float((out == 0).float().mean()) == pytest.approx(0.1, abs=0.005)
    assert float((out == 1).float().mean()) == pytest.approx(0.1, abs=0.005)
    assert float((out == 0.5).float().mean()) == pytest.approx(0.8, abs=0.005)


def test_mask_fraction():
    x = torch.full((100, 1, 28, 28), 0.7)
    out = add_noise(x, "mask:0.3", gen())
    assert float((out == 0).float().mean()) == pytest.approx(0.3, abs=0.005)
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(0.7)


def test_same_generator_state_same_noise():
    x = torch.rand(10, 1, 8, 8)
    a = add_noise(x, "gaussian:0.3", noise_generator(3, 1))
    b = add_noise(x, "gaussian:0.3", noise_generator(3, 1))
    c = add_noise(x, "gaussian:0.3", noise_generator(3, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
