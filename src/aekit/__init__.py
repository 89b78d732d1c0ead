"""aekit: convolutional autoencoders for images, from the blog's seed network onwards."""

__version__ = "0.5.0"


def __getattr__(name: str):
    # The estimators pull in torch and scikit-learn; import them only when asked for.
    if name == "ConvAutoencoder":
        from aekit.estimator import ConvAutoencoder

        return ConvAutoencoder
    if name == "PCAReconstructor":
        from aekit.pca import PCAReconstructor

        return PCAReconstructor
    raise AttributeError(f"module 'aekit' has no attribute {name!r}")
