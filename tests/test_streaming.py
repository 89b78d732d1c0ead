"""Streams from disk: every image once per epoch, a replayable order, the in-memory split,
training and evaluation that match data in memory."""

import numpy as np
import pytest
import torch
from PIL import Image

from aekit.cli import main
from aekit.data import DataError, FolderStream, NpyStream, float_bytes, load_dataset, open_stream, prepare_images
from aekit.inference import evaluate
from aekit.models import SeedAutoencoder
from aekit.config import TrainConfig
from aekit.training import fit


@pytest.fixture
def npy(tmp_path, rng):
    x = rng.integers(0, 256, (3000, 28, 28), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, x)
    return path, x


def rows_of(batches) -> list[bytes]:
    return sorted(image.numpy().tobytes() for batch in batches for image in batch)


def test_an_epoch_yields_every_image_once_in_full_batches(npy):
    path, x = npy
    stream = NpyStream(path, chunk=250, mix=3)
    batches = list(stream.batches(128, seed=5, epoch=0))
    assert [len(b) for b in batches] == [128] * 23 + [3000 - 23 * 128]
    assert all(b.shape[1:] == (1, 28, 28) and b.dtype == torch.float32 for b in batches)
    assert rows_of(batches) == rows_of([prepare_images(x)])
    first = torch.cat(batches)
    assert torch.equal(first, torch.cat(list(stream.batches(128, seed=5, epoch=0))))  # replayable
    assert not torch.equal(first, torch.cat(list(stream.batches(128, seed=5, epoch=1))))
    assert not torch.equal(first[:256], prepare_images(x[:256]))  # shuffled...
    # ...within groups of `mix` chunks: the first group's images come from 3 chunks of 250
    sources = {int(np.flatnonzero((x == (img.numpy()[0] * 255).round()).all(axis=(1, 2)))[0]) // 250
               for img in first[:3 * 250]}
    assert len(sources) == 3


def test_without_a_seed_images_come_in_file_order(npy):
    path, x = npy
    assert torch.equal(torch.cat(list(NpyStream(path, chunk=500).batches(64))), prepare_images(x))


def test_the_split_is_the_in_memory_split(npy):
    path, _ = npy
    train, test = open_stream(path)
    (x_train, _), (x_test, _) = load_dataset(path)
    assert torch.equal(torch.cat(list(train.batches(1000))), prepare_images(x_train))
    assert torch.equal(torch.cat(list(test.batches(1000))), prepare_images(x_test))
    assert train.shape == (2700, 1, 28, 28) and len(test) == 300
    assert torch.equal(torch.cat(list(train.head(10).batches(4))), prepare_images(x_train[:10]))


def test_evaluate_on_a_stream_equals_evaluate_in_memory(npy):
    path, x = npy
    torch.manual_seed(0)
    model = SeedAutoencoder()
    streamed, in_memory = evaluate(model, NpyStream(path), "bce"), evaluate(model, prepare_images(x), "bce")
    assert streamed.mse == pytest.approx(in_memory.mse, rel=1e-6)
    assert streamed.loss == pytest.approx(in_memory.loss, rel=1e-6)
    assert streamed.collapsed == in_memory.collapsed


def test_fit_trains_from_a_stream_like_from_memory(tmp_path, mnist):
    (x_train, _), (x_test, _) = mnist
    path = tmp_path / "mnist.npy"
    np.save(path, x_train[:1500])
    config = TrainConfig(model="seed", epochs=2, batch_size=32).resolved()
    results = []
    for data in (NpyStream(path), prepare_images(x_train[:1500])):
        torch.manual_seed(0)
        model = SeedAutoencoder()
        state = fit(model, data, prepare_images(x_test[:300]), config, progress=False)
        results.append(state.history[-1].val_mse)
    assert results[0] < 0.05
    assert results[0] == pytest.approx(results[1], rel=0.2)  # a different shuffle, the same quality


@pytest.mark.parametrize("array, message", [
    (np.full((4, 8, 8), 2.0, dtype=np.float32), r"float images must lie in \[0, 1\]"),
    (np.zeros((4, 8, 8), dtype=np.int32), "must be uint8 or float"),
    (np.zeros((4, 3, 8, 8), dtype=np.uint8), r"expected images shaped \(n, H, W\) or \(n, H, W, C\)"),
    (np.asfortranarray(np.zeros((4, 8, 8), dtype=np.uint8)), "Fortran-ordered"),
])
def test_bad_npy_files_are_refused_with_the_fix(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message):
        list(NpyStream(path).batches(2))


def test_a_truncated_npy_is_refused(npy):
    path, _ = npy
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        NpyStream(path)


def image_folder(root, sizes):
    root.mkdir()
    for i, size in enumerate(sizes):
        Image.fromarray(np.full(size, i * 10, dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_folder_stream_reads_every_file_once(tmp_path):
    folder = image_folder(tmp_path / "imgs", [(12, 16)] * 20)
    train, test = open_stream(folder)
    assert train.shape == (18, 1, 12, 16) and len(test) == 2
    (x_train, _), _ = load_dataset(folder)
    assert rows_of(train.batches(5, seed=0)) == rows_of([prepare_images(x_train)])


def test_folder_stream_refuses_mixed_sizes_naming_the_file(tmp_path):
    folder = image_folder(tmp_path / "imgs", [(12, 16)] * 3 + [(10, 10)])
    with pytest.raises(DataError, match=r"003.png: image is 10x10 .* pass resize=\(H, W\)"):
        list(FolderStream(sorted(folder.iterdir())).batches(4))


def test_a_stream_whose_first_file_is_grey_takes_colour_files_too(tmp_path):
    """Grey first, colour later: the set is colour, as in memory; it used to fail at the
    colour file's batch, saying to pass resize=(H, W)."""
    folder = image_folder(tmp_path / "imgs", [(12, 16)] * 3)
    Image.new("RGB", (16, 12), (250, 0, 0)).save(folder / "001.png")
    stream = FolderStream(sorted(folder.iterdir()))
    assert stream.shape == (3, 3, 12, 16)
    (x_train, _), (x_test, _) = load_dataset(folder)
    in_memory = np.concatenate([x_train, x_test])
    assert rows_of(stream.batches(2)) == rows_of([prepare_images(in_memory)])
    assert stream.head(1).shape == (1, 3, 12, 16)  # the set's channels, not the first file's


def test_float_bytes_decides_what_streams(npy, tmp_path):
    path, x = npy
    assert float_bytes(path) == x.size * 4
    assert float_bytes(tmp_path / "missing.npy") is None


def test_cli_trains_from_a_stream(npy, tmp_path, capsys):
    path, _ = npy
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--stream", "--epochs", "1", "--threads", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    assert "test_mse" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "reconstructions.png").is_file()
    assert '"stream": true' in (out / "config.json").read_text()


def test_cli_refuses_to_stream_what_cannot_stream(capsys, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8), dtype=np.uint8))
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--stream", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only .npy files and folders" in err[0] and "drop --stream" in err[0]


# ------------------------------------------------------------- every verb on a streamed run

@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, mnist):
    """A run trained with --stream on MNIST digits in a .npy, and that .npy."""
    folder = tmp_path_factory.mktemp("streamed")
    np.save(folder / "digits.npy", mnist[0][0][:600])
    out = folder / "run"
    assert main(["train", "--data", str(folder / "digits.npy"), "--stream", "--epochs", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert '"stream": true' in (out / "config.json").read_text()
    return out, folder / "digits.npy"


@pytest.mark.parametrize("verb", [
    ["evaluate", "{run}"],
    ["reconstruct", "{run}", "--out", "{tmp}/r.png"],
    ["report", "{run}", "--overwrite"],
    ["score", "{run}", "{data}", "--out", "{tmp}/s.csv"],
    ["score", "{run}", "{data}", "--out", "{tmp}/s.csv", "--contamination", "0.05"],
    ["score", "{run}", "{data}", "--out", "{tmp}/s.csv", "--fpr", "0.05"],
    ["score", "{run}", "{data}", "--out", "{tmp}/s.csv", "--heatmaps", "{tmp}/maps"],
    ["denoise", "{run}", "{data}", "--out", "{tmp}/clean.npy"],
    ["export", "{run}", "--format", "onnx", "--out", "{tmp}/onnx"],
    ["compare", "--data", "{data}", "--latent-dims", "2", "--epochs", "1", "--out", "{tmp}/cmp"],
], ids=lambda verb: " ".join(a for a in verb if not a.startswith("{")))
def test_every_verb_works_on_a_streamed_run(streamed_run, verb, tmp_path, capsys):
    run, data = streamed_run
    argv = [a.format(run=run, data=data, tmp=tmp_path) for a in verb]
    assert main(argv) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err


def test_score_thresholds_of_a_streamed_run_are_those_of_its_data_in_memory(streamed_run, tmp_path):
    """--contamination and --fpr read the streamed split batch by batch and land on the
    threshold the same images give in memory."""
    import csv

    from aekit.anomaly import run_threshold
    from aekit.estimator import ConvAutoencoder
    from aekit.runs import load_split, read_config

    run, data = streamed_run
    config = read_config(run)
    x_train, x_test, _ = load_split(config)
    assert isinstance(x_train, NpyStream)
    in_memory = load_dataset(data)
    estimator = ConvAutoencoder.load(run)
    for rate, images in ((0.05, in_memory[0][0]), (0.2, in_memory[1][0])):
        expected = estimator.set_threshold(images, contamination=rate).threshold_
        given = run_threshold(run, **({"contamination": rate} if images is in_memory[0][0]
                                      else {"false_positive_rate": rate}))
        assert given == pytest.approx(expected, rel=1e-6)
    assert main(["score", str(run), str(data), "--out", str(tmp_path / "s.csv"), "--contamination", "0.3"]) == 0
    flagged = sum(int(r["is_outlier"]) for r in csv.DictReader(open(tmp_path / "s.csv")))
    assert flagged == pytest.approx(0.3 * 600, abs=12)  # the training 90% flagged at 30%, the rest alike
