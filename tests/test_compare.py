"""The comparison's files: compare.csv, compare.md and compare.png."""

import warnings

from aekit.compare import write_comparison

UNLABELED = [{"method": method, "latent_dim": d, "test_mse": mse, "test_sse_per_image": mse * 784,
              "knn_accuracy": None, "fit_seconds": 1.0}
             for method, mses in (("autoencoder", (0.02, 0.01)), ("pca", (0.04, 0.03)))
             for d, mse in zip((2, 8), mses)]


def test_unlabeled_rows_plot_without_warnings(tmp_path):
    """Unlabeled data leaves the kNN panel empty; matplotlib must not warn about its legend."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_comparison(UNLABELED, tmp_path, title="unlabeled")
    assert [str(w.message) for w in caught] == []
    assert paths["png"].stat().st_size > 0
    assert "| autoencoder | 8 | 0.01000 |" in paths["md"].read_text()
