"""The linear baseline: PCA (scikit-learn) with the autoencoder's verbs
(:mod:`aekit.reconstructor`), so that a comparison loops over both with no special cases."""

from __future__ import annotations

import numpy as np

from aekit._typed import is_int
from aekit.reconstructor import _ImageReconstructor


class PCAReconstructor(_ImageReconstructor):
    """PCA (scikit-learn) with the autoencoder's verbs: the linear baseline.

    ``latent_dim`` is the number of principal components, named as in
    :class:`~aekit.estimator.ConvAutoencoder` so that one grid search covers both.
    ``transform`` gives the component scores; ``inverse_transform`` maps them back to
    images (clipped to [0, 1]).
    """

    def __init__(self, latent_dim=32, contamination=0.01, image_shape=None, random_state=None):
        self.latent_dim = latent_dim
        self.contamination = contamination
        self.image_shape = image_shape
        self.random_state = random_state

    def _fit(self, x: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        n, features = len(x), int(np.prod(x.shape[1:]))
        if not is_int(self.latent_dim) or not 1 <= self.latent_dim <= min(n, features):
            raise ValueError(f"latent_dim must be an integer in [1, min(n_samples, n_features)] = "
                             f"[1, {min(n, features)}], got {self.latent_dim!r}")
        self.pca_ = PCA(n_components=self.latent_dim, random_state=self.random_state).fit(x.reshape(n, -1))

    def _latent_size(self) -> int:
        return self.pca_.n_components_

    def _encode(self, x: np.ndarray) -> np.ndarray:
        self._check_is_fitted()
        # In float64: a float32 product rounds differently with the rows around it, so an
        # image's latent would depend on the batch it came in (scikit-learn's order check).
        return self.pca_.transform(x.reshape(len(x), -1).astype(np.float64))

    def _decode(self, z: np.ndarray) -> np.ndarray:
        return self.pca_.inverse_transform(z).reshape(len(z), *self.image_shape_).astype(np.float32)


__all__ = ["PCAReconstructor"]
