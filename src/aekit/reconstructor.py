"""The base of aekit's scikit-learn estimators: input layouts and the shared verbs.

Every reconstructor (:class:`aekit.estimator.ConvAutoencoder`, :class:`aekit.pca.PCAReconstructor`)
answers the same verbs::

    fit(X) -> self
    transform(X) -> Z (n, latent_dim) float32
    inverse_transform(Z) -> images in [0, 1], in the layout fitted on
    reconstruct(X) -> images in [0, 1], in the layout of X
    reconstruction_error(X) -> (n,), score_samples(X) (higher = more normal),
    decision_function(X) (< 0 = outlier), predict(X) -> +1 inlier / -1 outlier

``score_samples`` is the negative of the model's outlier score: its reconstruction error,
unless the model family scores otherwise (:meth:`aekit.models.Autoencoder.outlier_score`).

``X`` may be ``(n, H, W)``, ``(n, H, W, C)`` (the seed's Keras layout), ``(n, C, H, W)``
with C in {1, 3}, or flat ``(n, H*W*C)`` with ``image_shape=(H, W)`` or ``(H, W, C)``
(flat rows are read in H, W, C order, as ``x.reshape(n, -1)`` makes them from Keras layout);
uint8 (divided by 255) or float in [0, 1]. A subclass says how it fits, encodes and decodes.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, TransformerMixin
from sklearn.exceptions import NotFittedError

from aekit import inference
from aekit.data import layouts
from aekit._typed import is_real, plain


class _ImageReconstructor(TransformerMixin, OutlierMixin, BaseEstimator):
    """Input handling, layouts and the outlier verbs shared by every reconstructor.

    Subclasses implement ``_fit(x)``, ``_encode(x) -> (n, d)`` and ``_decode(z) -> x``
    on float32 arrays ``x`` shaped (n, C, H, W), and ``_scores(x) -> (n,)`` where the
    outlier score is not the reconstruction error.
    """

    # ---- input and output layouts

    def _to_nchw(self, X) -> np.ndarray:
        """Images for a fitted estimator -> float32 (n, C, H, W) in [0, 1]."""
        return self._parse_fitted(X)[0]

    def _parse_fitted(self, X) -> tuple[np.ndarray, str]:
        """Images for a fitted estimator -> (float32 (n, C, H, W) in [0, 1], the layout of ``X``)."""
        self._check_is_fitted()
        x, layout = self._parse(X)
        if tuple(x.shape[1:]) != self.image_shape_:
            c, h, w = self.image_shape_
            features = int(np.prod(x.shape[1:]))
            count = (f"X has {features} features, but {type(self).__name__} is expecting "
                     f"{self.n_features_in_} features as input: " if features != self.n_features_in_ else "")
            raise ValueError(f"{count}X holds images of {x.shape[2]}x{x.shape[3]}x{x.shape[1]} (H x W x C) "
                             f"but the estimator was fitted on {h}x{w}x{c}")
        return x, layout

    def _parse(self, X) -> tuple[np.ndarray, str]:
        """Any accepted input -> (float32 (n, C, H, W) in [0, 1], its layout name)."""
        return layouts.parse_images(X, self._flat_image_shape)

    def _flat_image_shape(self, X: np.ndarray) -> tuple[int, int, int]:
        """The (C, H, W) that the flat rows of ``X`` (n, features) are read as."""
        return layouts.flat_shape(X, self.image_shape)

    def _from_nchw(self, x: np.ndarray, layout: str | None = None) -> np.ndarray:
        """(n, C, H, W) -> ``layout``, by default the one the estimator was fitted on
        (answers that have no ``X`` to take the layout of: inverse_transform, sample)."""
        return layouts.from_nchw(x, self.layout_ if layout is None else layout)

    def _check_is_fitted(self) -> None:
        if not hasattr(self, "image_shape_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    # ---- the shared verbs

    def fit(self, X, y=None):
        """Learn to reconstruct the images ``X``; ``y`` is ignored (unsupervised)."""
        self._validate_contamination()
        x, layout = self._parse(X)
        self._fit(x)
        # Set only once fitting succeeded, so a failed fit never looks fitted.
        self.layout_, self.image_shape_ = layout, tuple(int(s) for s in x.shape[1:])
        self.n_features_in_ = int(np.prod(self.image_shape_))
        self.threshold_ = self._threshold(self._scores(x))
        self.offset_ = -self.threshold_
        return self

    def transform(self, X) -> np.ndarray:
        """Images -> latents, float32 (n, latent_dim)."""
        return self._encode(self._to_nchw(X)).astype(np.float32, copy=False)

    def inverse_transform(self, Z) -> np.ndarray:
        """Latents (n, latent_dim) -> images in [0, 1], in the layout fitted on."""
        self._check_is_fitted()
        Z = np.asarray(Z, dtype=np.float32)
        if Z.ndim != 2 or Z.shape[1] != self._latent_size():
            raise ValueError(f"Z must be (n, {self._latent_size()}), got shape {Z.shape}")
        if not np.isfinite(Z).all():
            raise ValueError("Z contains NaN or infinite values")
        return self._from_nchw(np.clip(self._decode(Z), 0.0, 1.0).astype(np.float32, copy=False))

    def reconstruct(self, X) -> np.ndarray:
        """Images -> their reconstructions in the layout of ``X`` (not necessarily the one
        fitted on), float32 in [0, 1]."""
        x, layout = self._parse_fitted(X)
        return self._from_nchw(self._reconstruct(x), layout)

    def reconstruction_error(self, X) -> np.ndarray:
        """Mean squared error per image, float64 (n,)."""
        return self._errors(self._to_nchw(X))

    def score_samples(self, X) -> np.ndarray:
        """Higher is more normal: the negative of the model's outlier score, float64 (n,)
        (the reconstruction error, unless the model family scores otherwise)."""
        return -self._scores(self._to_nchw(X))

    def decision_function(self, X) -> np.ndarray:
        """Negative for outliers: ``score_samples(X) - offset_``."""
        self._check_is_fitted()
        if self.threshold_ is None:
            raise ValueError(f"this {type(self).__name__} has no outlier threshold (it was loaded from a run "
                             "folder without one on its model's outlier score); call "
                             "set_threshold(X, contamination=0.01) with normal images first")
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers (outlier score above ``threshold_``)."""
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def score(self, X, y=None) -> float:
        """The negative mean reconstruction error, for model selection (a grid search over
        the code size): not the mean of ``score_samples``, whose outlier score may be scaled
        to the model's own training images (pca-conv's)."""
        return float(-self.reconstruction_error(X).mean())

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).predict(X)

    def set_threshold(self, X=None, contamination: float | None = None, false_positive_rate: float | None = None,
                      *, threshold: float | None = None):
        """Re-derive ``threshold_``: from images ``X`` (e.g. held-out normal data) at a target
        false-positive rate, or from ``X`` at a ``contamination`` fraction; or set the
        outlier score ``threshold`` itself (e.g. from :func:`aekit.anomaly.run_threshold`)."""
        rate = false_positive_rate if false_positive_rate is not None else contamination
        if threshold is not None:
            if X is not None or rate is not None:
                raise ValueError("pass either threshold, or X with contamination or false_positive_rate")
            if not _is_threshold(threshold):
                raise ValueError(f"threshold must be a finite outlier score >= 0, got {threshold!r}")
            self.threshold_ = float(threshold)
        elif rate is None or (false_positive_rate is not None and contamination is not None):
            raise ValueError("pass exactly one of contamination or false_positive_rate")
        else:
            self.threshold_ = inference.outlier_threshold(-self.score_samples(X), rate)
        self.offset_ = -self.threshold_
        return self

    def _reconstruct(self, x: np.ndarray) -> np.ndarray:
        return np.clip(self._decode(self._encode(x)), 0.0, 1.0)

    def _errors(self, x: np.ndarray) -> np.ndarray:
        return inference.image_errors(self._reconstruct(x), x)

    def _scores(self, x: np.ndarray) -> np.ndarray:
        """The outlier score of each image of ``x`` (n, C, H, W), higher is more unusual."""
        return self._errors(x)

    def _threshold(self, scores: np.ndarray) -> float:
        return inference.outlier_threshold(scores, self.contamination)

    def _validate_contamination(self) -> None:
        if not is_real(self.contamination) or not 0 <= self.contamination < 0.5:
            raise ValueError(f"contamination must be a fraction in [0, 0.5), got {self.contamination!r}")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = ["float32"]  # transform gives float32 for any input
        return tags


def _is_threshold(value) -> bool:
    """Whether ``value`` can be an outlier threshold: a finite number >= 0."""
    value = plain(value)  # a numpy float32 compared with float_info.max would overflow
    return is_real(value) and 0 <= value <= sys.float_info.max
