"""The jobs on top of the estimator, through the CLI: denoise, score, compare."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from aekit.anomaly import error_heatmap
from aekit.cli import main
from aekit.compare import CompareConfig, compare, to_markdown


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("runs") / "dn"
    assert main(["train", "--model", "seed", "--noise", "gaussian:0.3", "--limit", "1500", "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist[1][0][:12]


def test_denoise_arrays_and_folders(denoiser, seed_1500_run, digits, tmp_path, rng):
    clean = digits / np.float32(255)
    noisy = np.clip(clean + rng.normal(0, 0.3, clean.shape), 0, 1).astype(np.float32)
    np.save(tmp_path / "noisy.npy", noisy)
    assert main(["denoise", str(denoiser), str(tmp_path / "noisy.npy"), "--out", str(tmp_path / "clean.npy")]) == 0
    cleaned = np.load(tmp_path / "clean.npy")
    assert cleaned.shape == noisy.shape and cleaned.dtype == np.float32
    denoised_mse = ((cleaned - clean) ** 2).mean()
    assert denoised_mse < ((noisy - clean) ** 2).mean()
    # The control: the same run without --noise learned to copy, noise included.
    plain = seed_1500_run  # aekit train --model seed --limit 1500 --epochs 2, trained once in conftest
    assert main(["denoise", str(plain), str(tmp_path / "noisy.npy"), "--out", str(tmp_path / "copied.npy")]) == 0
    copied_mse = ((np.load(tmp_path / "copied.npy") - clean) ** 2).mean()
    print(f"denoised {denoised_mse:.4f}, copied {copied_mse:.4f}")
    assert denoised_mse < 0.75 * copied_mse

    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(digits[:3]):
        Image.fromarray(img).save(tmp_path / "imgs" / f"d{i}.png")
    assert main(["denoise", str(denoiser), str(tmp_path / "imgs"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d0.png", "d1.png", "d2.png"]
    with Image.open(tmp_path / "out" / "d0.png") as img:
        assert img.size == (28, 28)


def test_denoise_refuses_to_overwrite_and_wrong_sizes(denoiser, tmp_path, capsys):
    np.save(tmp_path / "in.npy", np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "out.npy").write_bytes(b"mine")
    assert main(["denoise", str(denoiser), str(tmp_path / "in.npy"), "--out", str(tmp_path / "out.npy")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out.npy").read_bytes() == b"mine"
    np.save(tmp_path / "small.npy", np.zeros((2, 14, 14), np.uint8))
    assert main(["denoise", str(denoiser), str(tmp_path / "small.npy"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"aekit: error: {tmp_path / 'small.npy'}: images of 14x14x1 (H x W x C), but the model of "
                   f"{denoiser} takes 28x28x1; give it images of 28x28 pixels with 1 channel"]
    assert not (tmp_path / "o").exists()


def test_score_flags_what_does_not_belong(denoiser, digits, tmp_path, capsys):
    odd = 255 - digits  # inverted digits: bright backgrounds the model never saw
    np.save(tmp_path / "mixed.npy", np.concatenate([digits, odd]))
    out = tmp_path / "scores.csv"
    assert main(["score", str(denoiser), str(tmp_path / "mixed.npy"), "--out", str(out),
                 "--heatmaps", str(tmp_path / "heat")]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 24 and set(rows[0]) == {"name", "reconstruction_error", "score", "is_outlier"}
    flags = [int(r["is_outlier"]) for r in rows]
    assert flags[12:] == [1] * 12 and sum(flags[:12]) <= 2
    errors = np.array([float(r["reconstruction_error"]) for r in rows])
    np.testing.assert_allclose([float(r["score"]) for r in rows], -errors, rtol=1e-5)
    assert len(list((tmp_path / "heat").iterdir())) == 24
    assert "24 images scored" in capsys.readouterr().out


def test_score_thresholds_from_contamination_or_fpr(denoiser, digits, mnist, tmp_path):
    np.save(tmp_path / "d.npy", digits)
    metrics = json.loads((denoiser / "metrics.json").read_text())
    assert metrics["contamination"] == 0.01 and metrics["threshold"] > 0
    assert main(["score", str(denoiser), str(tmp_path / "d.npy"), "--out", str(tmp_path / "a.csv"),
                 "--contamination", "0.4"]) == 0
    strict = sum(int(r["is_outlier"]) for r in csv.DictReader(open(tmp_path / "a.csv")))
    assert main(["score", str(denoiser), str(tmp_path / "d.npy"), "--out", str(tmp_path / "b.csv")]) == 0
    default = sum(int(r["is_outlier"]) for r in csv.DictReader(open(tmp_path / "b.csv")))
    assert strict > default  # flagging 40% of training images is a lower threshold than 1%
    # --fpr: the threshold that flags that fraction of the run's own test images
    test_images = mnist[1][0][:1500]  # the run's test split (--limit 1500)
    np.save(tmp_path / "t.npy", test_images)
    for fpr in (0.05, 0.3):
        out = tmp_path / f"fpr{fpr}.csv"
        assert main(["score", str(denoiser), str(tmp_path / "t.npy"), "--out", str(out), "--fpr", str(fpr)]) == 0
        flagged = sum(int(r["is_outlier"]) for r in csv.DictReader(open(out)))
        assert flagged == pytest.approx(fpr * 1500, abs=2)


def test_score_rejects_two_thresholds(denoiser, tmp_path, capsys):
    assert main(["score", str(denoiser), "x.npy", "--out", "s.csv", "--fpr", "0.1", "--contamination", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not allowed with argument" in err[0] and "aekit score --help" in err[0]


def test_heatmap_is_zero_where_reconstruction_is_perfect():
    a = np.zeros((28, 28))
    b = a.copy()
    b[5, 5] = 1.0
    picture = error_heatmap(a, b, scale=1.0)
    assert picture.shape == (112, 4 * (3 * 28 + 4), 3)
    heat = picture[:, 4 * (2 * 28 + 4):]
    assert heat[20:24, 20:24].max() > 200 and heat[60:, 60:].max() < 20  # only the wrong pixel glows


@pytest.mark.heavy
def test_compare_both_methods_every_size(mnist, tmp_path, capsys):
    """The README's claim at one size, on a budget a test can afford: 2,000 images for 3
    epochs at 8 numbers, where the autoencoder reconstructs clearly better than PCA
    (measured: 0.0309 against 0.0376, a ratio of 0.82 where the test asks for 0.9) and its
    codes classify far above chance (0.81; chance is 0.1). Other budgets: 3,000 images for 3
    epochs 0.0280 against 0.0373 (twice the time); 1,500 for 3 epochs 0.0323 against 0.0381
    (0.85). Every size, on more data, is test_autoencoder_beats_pca_at_every_size."""
    rows = compare(CompareConfig(latent_dims=(8,), epochs=3, limit=2000), log=lambda *a: None)
    assert [(r["method"], r["latent_dim"]) for r in rows] == [("raw pixels", 784), ("autoencoder", 8), ("pca", 8)]
    raw, autoencoder, pca = rows
    assert autoencoder["test_mse"] < 0.9 * pca["test_mse"]
    assert autoencoder["knn_accuracy"] > 0.7 and raw["knn_accuracy"] > 0.8
    for r in rows[1:]:
        assert r["test_sse_per_image"] == pytest.approx(784 * r["test_mse"])
    assert "| pca | 8 |" in to_markdown(rows)

    assert main(["compare", "--limit", "300", "--latent-dims", "2", "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"compare.csv", "compare.md", "compare.png"}
    capsys.readouterr()
    assert main(["compare", "--limit", "300", "--latent-dims", "2", "--out", str(tmp_path)]) == 2
    assert "already holds compare.csv, compare.md, compare.png; pass --overwrite" in capsys.readouterr().err
    assert main(["compare", "--latent-dims", "2,x", "--out", str(tmp_path)]) == 2
    assert "expected comma-separated positive integers, got '2,x'" in capsys.readouterr().err


def test_the_run_and_score_share_one_per_image_error(denoiser, mnist):
    """metrics.json's threshold and `score`'s errors are one function of the same images:
    the threshold recomputed from the estimator's errors is the recorded one, bit for bit."""
    from aekit import ConvAutoencoder
    from aekit.inference import outlier_threshold

    metrics = json.loads((denoiser / "metrics.json").read_text())
    estimator = ConvAutoencoder.load(denoiser)
    errors = estimator.reconstruction_error(mnist[0][0][:1500])  # the run's --limit 1500
    assert outlier_threshold(errors, metrics["contamination"]) == metrics["threshold"]
    assert estimator.threshold_ == metrics["threshold"]


@pytest.mark.slow
def test_autoencoder_beats_pca_at_every_size(mnist):
    """The README's claim, on a third of MNIST for 5 epochs (about 4 minutes a size on one
    quiet core): at 2, 8 and 32 numbers the autoencoder reconstructs the test digits better
    than PCA, and at 2 and 8 its codes classify them better. Measured at 2 and 8: MSE
    0.0477 vs 0.0555 and 0.0212 vs 0.0365; kNN 0.501 vs 0.421 and 0.914 vs 0.878."""
    rows = compare(CompareConfig(latent_dims=(2, 8, 32), epochs=5, limit=20000), log=print)
    ae = {r["latent_dim"]: r for r in rows if r["method"] == "autoencoder"}
    pca = {r["latent_dim"]: r for r in rows if r["method"] == "pca"}
    for d in (2, 8, 32):
        assert ae[d]["test_mse"] < pca[d]["test_mse"], d
    for d in (2, 8):
        assert ae[d]["knn_accuracy"] > pca[d]["knn_accuracy"], d


def test_score_asks_for_a_threshold_where_the_run_has_none(denoiser, digits, tmp_path, capsys):
    import shutil

    run = shutil.copytree(denoiser, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["threshold"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    np.save(tmp_path / "d.npy", digits)
    assert main(["score", str(run), str(tmp_path / "d.npy"), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no outlier threshold" in err[0] and "--contamination" in err[0]
    assert not (tmp_path / "s.csv").exists()
    assert main(["score", str(run), str(tmp_path / "d.npy"), "--out", str(tmp_path / "s.csv"),
                 "--contamination", "0.1"]) == 0
