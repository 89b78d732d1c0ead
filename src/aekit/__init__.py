"""aekit: convolutional autoencoders for images, from the blog's seed network onwards."""

__version__ = "0.1.0"
