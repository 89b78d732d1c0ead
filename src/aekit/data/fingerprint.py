"""A checksum of the images a source gives, to tell whether data changed between two reads.

A run records its data's fingerprint in its checkpoint, and a resume compares it with the
data it reads then (:mod:`aekit.weights`): the same path may hold other images by then.
"""

from __future__ import annotations

import hashlib

from aekit.data.images import ArrayImages, ImageSource

SAMPLE = 256  # images of a stream that its fingerprint hashes
_BATCH = 1024


def fingerprint(images: ImageSource, sample: int = SAMPLE) -> str:
    """``"N images (C, H, W), all hashed, sha256 HEX"``: the sha256 of the shape (n, C, H, W)
    and the float32 pixels as the source gives them.

    Images in memory are hashed whole, so any change to them as aekit reads them (float32)
    changes it. A stream is read
    from disk batch by batch and hashing all of it would cost a pass over the data, so
    ``"N images (C, H, W), K sampled, ..."`` hashes the first batch of a fixed shuffle (K
    images, :meth:`~aekit.data.images.ImageSource.sample`): it sees any change of count,
    image shape or a sampled image, not a change confined to the other images.
    """
    n, *shape = images.shape
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    if isinstance(images, ArrayImages):
        batches, hashed = images.batches(_BATCH), "all hashed"
    else:
        batches, hashed = [images.sample(sample, seed=0)], f"{min(sample, n)} sampled"
    for batch in batches:  # (b, C, H, W) float32
        digest.update(batch.detach().cpu().contiguous().numpy())
    return f"{n} images {tuple(shape)}, {hashed}, sha256 {digest.hexdigest()}"
