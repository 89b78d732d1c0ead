"""Corruptions for denoising: pure functions of the images and an explicit generator.

A noise spec is a string ``"kind:amount"``:

- ``gaussian:STD``   add N(0, STD^2) to every pixel
- ``salt_pepper:P``  set a fraction P of the pixels to 0 or 1 (half each)
- ``mask:P``         set a fraction P of the pixels to 0 (dropout-style masking)

Every result is clipped to [0, 1]. The same generator state gives the same corruption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("gaussian", "salt_pepper", "mask")


@dataclass(frozen=True)
class Noise:
    kind: str
    amount: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.amount:g}"


def parse_noise(spec: str | None) -> Noise | None:
    """``"gaussian:0.5"`` -> Noise("gaussian", 0.5); None or "" or "none" -> None."""
    if spec is None or spec in ("", "none"):
        return None
    kind, sep, amount = str(spec).partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = float("nan")
    if not sep or kind not in KINDS or not value == value:
        raise ValueError(
            f"noise must look like KIND:AMOUNT with KIND one of {', '.join(KINDS)}, got {spec!r}; "
            "e.g. gaussian:0.5, salt_pepper:0.1 or mask:0.3"
        )
    if kind == "gaussian" and value < 0:
        raise ValueError(f"gaussian noise needs a standard deviation >= 0, got {value:g}")
    if kind != "gaussian" and not 0 <= value <= 1:
        raise ValueError(f"{kind} noise needs a fraction in [0, 1], got {value:g}")
    return Noise(kind, value)


def add_noise(x: torch.Tensor, noise: Noise | str | None, generator: torch.Generator) -> torch.Tensor:
    """Corrupt images ``x`` (any shape, values in [0, 1]); returns a new tensor in [0, 1]."""
    if isinstance(noise, str) or noise is None:
        noise = parse_noise(noise)
    if noise is None:
        return x
    device = x.device
    if noise.kind == "gaussian":
        out = x + noise.amount * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    elif noise.kind == "salt_pepper":
        u = torch.rand(x.shape, generator=generator, device=device)
        out = torch.where(u < noise.amount / 2, torch.zeros_like(x), x)
        out = torch.where((u >= noise.amount / 2) & (u < noise.amount), torch.ones_like(x), out)
    else:  # mask
        keep = torch.rand(x.shape, generator=generator, device=device) >= noise.amount
        out = x * keep
    return out.clamp_(0.0, 1.0)


def noise_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The corruption stream of one epoch: a pure function of (seed, epoch), like the shuffle."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2 ** 63))
    return generator
