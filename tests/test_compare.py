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


def test_any_model_with_a_latent_size_is_a_method(mnist, tmp_path, capsys, monkeypatch):
    """`--methods` names models beside PCA and aekit's default; each is fitted with its own
    model (the config the estimator records) and gets its row, in the order given."""
    from aekit import compare as compare_module
    from aekit.cli import main
    from aekit.compare import CompareConfig, compare

    fitted = []
    estimator = compare_module.estimator
    monkeypatch.setattr(compare_module, "estimator",
                        lambda config, method, d: fitted.append(estimator(config, method, d)) or fitted[-1])
    rows = compare(CompareConfig(latent_dims=(2,), epochs=1, limit=300, methods=("map", "pca", "vae")),
                   log=lambda *a: None)
    assert [r["method"] for r in rows] == ["raw pixels", "map", "pca", "vae"]
    assert [getattr(getattr(e, "config_", None), "model", "pca") for e in fitted] == ["map", "pca", "vae"]
    assert all(0 < r["test_mse"] < 0.2 and 0 < r["knn_accuracy"] <= 1 for r in rows[1:])

    for methods, message in (("conv,seed", "unknown method 'seed'; expected distinct names from autoencoder, pca, conv"),
                             ("pca,pca", "methods pca, pca; expected distinct names")):
        capsys.readouterr()
        assert main(["compare", "--methods", methods, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was fitted or written
