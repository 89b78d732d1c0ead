"""One image source: images in memory (ArrayImages) and streamed from disk answer the same
calls; one format detection and one npz rule for every reader; open_images as a run opens
its data."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aekit import data as data_lib
from aekit.data import (ArrayImages, DataError, FolderStream, Format, ImageSource, NpyStream, as_images, detect,
                        load_dataset, open_images, prepare_images, read_images)
from conftest import one_error_line


@pytest.fixture
def images(rng):
    """Float images (50, 2, 3, 4) in [0, 1] as a tensor."""
    return torch.from_numpy(rng.random((50, 2, 3, 4), dtype=np.float32))


# ------------------------------------------------------------------------- ArrayImages

@pytest.mark.parametrize("batch_size", [1, 7, 50, 64])
@pytest.mark.parametrize("seed, epoch", [(0, 0), (0, 3), (12345, 1)])
def test_shuffled_batches_are_training_shuffle_bit_for_bit(images, batch_size, seed, epoch):
    """The shuffle fit has always used (training.shuffled_batches before the image source):
    the images in numpy's permutation of rng([seed, epoch]), cut in consecutive slices. A
    resumed run replays its epochs only if this never changes."""
    ours = list(ArrayImages(images).batches(batch_size, seed=seed, epoch=epoch))
    shuffled = images[torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(50))]
    theirs = [shuffled[start:start + batch_size] for start in range(0, 50, batch_size)]
    assert len(ours) == len(theirs) == -(-50 // batch_size)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_without_a_seed_batches_are_slices_in_order(images):
    batches = list(ArrayImages(images).batches(16))
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    for i, batch in enumerate(batches):
        assert torch.equal(batch, images[16 * i:16 * (i + 1)])


def test_shape_len_head_first_and_tensor(images):
    source = ArrayImages(images)
    assert isinstance(source, ImageSource)
    assert source.shape == (50, 2, 3, 4) and len(source) == 50 and source.tensor is images
    head = source.head(5)
    assert isinstance(head, ArrayImages) and head.shape == (5, 2, 3, 4)
    assert torch.equal(head.tensor, images[:5])
    assert torch.equal(source.first(7), images[:7]) and len(source.first(80)) == 50


def test_to_gives_a_copy_on_that_device_and_streams_stay(images, tmp_path):
    moved = ArrayImages(images).to("meta")
    assert isinstance(moved, ArrayImages) and moved.tensor.device.type == "meta" and images.device.type == "cpu"
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 3), np.uint8))
    stream = NpyStream(tmp_path / "x.npy")
    assert stream.to("meta") is stream


def test_streams_answer_the_same_calls(tmp_path, rng):
    x = rng.integers(0, 256, (30, 5, 6), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(x):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    for stream in (NpyStream(tmp_path / "x.npy", chunk=7), FolderStream(sorted(folder.iterdir()))):
        assert isinstance(stream, ImageSource)
        assert torch.equal(stream.first(12), prepare_images(x[:12]))
        assert stream.head(4).shape == (4, 1, 5, 6)


# ----------------------------------------------------------------------------- as_images

def test_as_images_converts_numpy_and_keeps_tensors_and_sources(images, rng):
    x = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    converted = as_images(x, "x_train")
    assert isinstance(converted, ArrayImages) and torch.equal(converted.tensor, prepare_images(x))
    assert converted.shape == (6, 3, 5, 5)
    assert as_images(images).tensor is images  # not copied
    source = ArrayImages(images)
    assert as_images(source) is source


@pytest.mark.parametrize("x, error, message", [
    (np.zeros((4, 1, 28, 28), np.uint8), DataError, r"^x_train is a numpy array of shape \(4, 1, 28, 28\)"),
    (np.zeros((4, 28, 28), np.int64), DataError, r"^x_train: images must be uint8 or float"),
    (np.full((4, 28, 28), 2.0), DataError, r"^x_train: float images must lie in \[0, 1\]"),
    (torch.zeros(4, 28, 28), DataError, r"^x_train must be a float tensor \(n, C, H, W\)"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), DataError, r"^x_train must be a float tensor"),
    (torch.zeros(0, 1, 28, 28), DataError, r"^x_train holds no images"),
    (np.zeros((0, 28, 28), np.uint8), DataError, r"^x_train holds no images"),
    ([[0.5]], TypeError, r"^x_train must be images: .* got list"),
])
def test_as_images_refuses_in_one_line_naming_the_argument(x, error, message):
    with pytest.raises(error, match=message) as caught:
        as_images(x, "x_train")
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------- format detection

def test_detect_names_every_format(tmp_path, rng):
    images = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    (tmp_path / "flat").mkdir()
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "test").mkdir()
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "x.npz", x=images)
    Image.fromarray(images[0]).save(tmp_path / "one.PNG")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    assert detect("mnist") is Format.BUILTIN
    expected = {"flat": Format.IMAGE_FOLDER, "split": Format.SPLIT_FOLDER, "idx": Format.IDX_FOLDER,
                "x.npy": Format.NPY, "x.npz": Format.NPZ, "one.PNG": Format.IMAGE_FILE,
                "t10k-images-idx3-ubyte": Format.IDX_FILE}
    assert {name: detect(tmp_path / name) for name in expected} == expected


def test_detect_refuses_missing_paths_and_reads_builtin_names_as_paths_when_asked(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no data at .*nope': not a file or folder, and not a built-in name"):
        detect(tmp_path / "nope")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^no data at 'mnist': not a file or folder$"):
        detect("mnist", builtins=False)


def test_loaders_and_read_images_agree_on_an_npz_of_one_array(tmp_path, rng):
    """One array under a name of the user's own: every reader takes it."""
    x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", digits=x)
    (xtr, _), (xte, _) = load_dataset(tmp_path / "d.npz")
    read, names = read_images(tmp_path / "d.npz")
    np.testing.assert_array_equal(read, x)
    assert names == [str(i) for i in range(20)]
    train, test = data_lib.holdout_indices(20)
    np.testing.assert_array_equal(xtr, x[train])
    np.testing.assert_array_equal(xte, x[test])


def test_read_images_refuses_a_train_test_split_npz(tmp_path, rng):
    x = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "keras.npz", x_train=x, x_test=x)
    with pytest.raises(DataError, match=r"holds a train/test split \(x_train, x_test\); read_images reads one"):
        read_images(tmp_path / "keras.npz")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    for read in (load_dataset, read_images):
        with pytest.raises(DataError, match=r"x_train/x_test \(Keras layout\), an array named 'x' or a single array"):
            read(tmp_path / "two.npz")


# ----------------------------------------------------------------------------- open_images

@pytest.fixture
def npy(tmp_path, rng):
    x = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


def test_open_images_in_memory_is_load_dataset_converted(npy):
    (x_train, _), (x_test, y_test) = load_dataset(npy)
    train, test, labels = open_images(npy)
    assert isinstance(train, ArrayImages) and isinstance(test, ArrayImages) and labels is y_test
    assert torch.equal(train.tensor, prepare_images(x_train)) and torch.equal(test.tensor, prepare_images(x_test))
    train, test, _ = open_images(npy, limit=5)
    assert torch.equal(train.tensor, prepare_images(x_train[:5])) and len(test) == 4


def test_open_images_streams_when_asked_or_when_too_big(npy, monkeypatch, caplog):
    train, test, labels = open_images(npy, stream=True, limit=5)
    assert isinstance(train, NpyStream) and len(train) == 5 and len(test) == 4 and labels is None
    monkeypatch.setattr(data_lib.loaders, "STREAM_ABOVE_BYTES", 40 * 36 * 4 - 1)
    with caplog.at_level(logging.INFO, logger="aekit"):
        train, _, _ = open_images(npy)
    assert isinstance(train, NpyStream)
    assert "would take over 0 MB in memory as float32: streaming it from disk" in caplog.text
    monkeypatch.setattr(data_lib.loaders, "STREAM_ABOVE_BYTES", 40 * 36 * 4)
    assert isinstance(open_images(npy)[0], ArrayImages)


@pytest.mark.parametrize("kwargs, message", [
    ({"stream": True}, r"^mnist is a built-in data set, which loads in memory; pass stream=False$"),
    ({"limit": 0}, r"^limit must be a positive number of images or None, got 0$"),
])
def test_open_images_refusals_name_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        open_images("mnist", **kwargs)


def test_streaming_what_cannot_stream_says_to_pass_stream_false(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"only \.npy files and folders .* not a \.npz file of arrays; "
                                        r"pass stream=False to load it in memory"):
        open_images(tmp_path / "x.npz", stream=True)


# ------------------------------------------------------ score and denoise: names and channels

def test_output_names_are_unique_and_keep_the_stem_when_they_can():
    from aekit.data.imagefiles import output_names

    assert output_names(["a.png", "b.jpg", "0"]) == ["a.png", "b.png", "0.png"]
    assert output_names(["x.png", "x.jpg", "y.png"]) == ["x.png.png", "x.jpg.png", "y.png"]
    assert output_names(["a/1.png", "b/1.png"]) == ["a_1.png.png", "b_1.png.png"]
    # however the names fall, no two outputs share a name (nor differ only in case)
    names = ["x.png", "x.jpg", "x.jpg.png", "X.png", "a/x.jpg", "a_x.jpg"]
    out = output_names(names)
    assert len({name.casefold() for name in out}) == len(names)
    assert all(name.endswith(".png") and "/" not in name for name in out)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A run trained for one epoch on 40 random RGB 8x8 images."""
    from aekit.cli import main

    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    assert main(["train", "--data", str(root), "--epochs", "1", "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def test_score_and_denoise_a_black_rgb_frame_with_a_colour_model(colour_run, tmp_path, capsys):
    """An RGB file of grey pixels is a colour image: a colour model takes it."""
    from aekit.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "black.png")
    assert main(["score", str(colour_run), str(tmp_path / "black.png"), "--out", str(tmp_path / "s.csv"),
                 "--contamination", "0.1"]) == 0, capsys.readouterr().err
    assert main(["denoise", str(colour_run), str(tmp_path / "black.png"), "--out", str(tmp_path / "d.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "d.png")).shape == (8, 8, 3)


def test_inputs_that_share_a_stem_get_an_output_each(colour_run, tmp_path, capsys):
    from aekit.cli import main

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "in" / "x.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "in" / "x.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "in" / "y.png")
    assert main(["denoise", str(colour_run), str(tmp_path / "in"), "--out", str(tmp_path / "clean")]) == 0
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["x.jpg.png", "x.png.png", "y.png"]
    assert main(["score", str(colour_run), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                 "--contamination", "0.1", "--heatmaps", str(tmp_path / "maps")]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["x.jpg.png", "x.png.png", "y.png"]


def test_score_writes_a_file_name_that_is_not_utf8(colour_run, tmp_path, capsys):
    from aekit.cli import main

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "in" / os.fsdecode(b"caf\xe9.png"))
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "=cmd.png")
    assert main(["score", str(colour_run), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                 "--contamination", "0.1", "--heatmaps", str(tmp_path / "maps")]) == 0, capsys.readouterr().err
    rows = (tmp_path / "s.csv").read_bytes().decode("utf-8").splitlines()
    assert [row.split(",")[0] for row in rows] == ["name", "'=cmd.png", "caf\\xe9.png"]
    assert sorted(os.fsencode(p.name) for p in (tmp_path / "maps").iterdir()) == [b"=cmd.png", b"caf\xe9.png"]


def test_score_and_denoise_take_images_as_the_run_did_or_say_what_it_takes(colour_run, tmp_path, capsys):
    """INPUT is resized as the run's own images were (its --resize) unless --resize is given;
    images of another shape than the model's are one line naming the shape it takes and the
    flag that gets there, and nothing is written."""
    from aekit.cli import main

    rng = np.random.default_rng(2)
    photos = tmp_path / "photos"  # RGB images of three sizes, trained on at 8 x 8
    photos.mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (9 + i % 3, 8 + i % 2, 3), dtype=np.uint8)).save(photos / f"{i:02d}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", str(photos), "--resize", "8", "8", "--epochs", "1", "--out", str(run),
                 "--quiet"]) == 0
    for resize in ([], ["--resize", "8", "8"]):
        out = tmp_path / f"scores{len(resize)}.csv"
        assert main(["score", str(run), str(photos), "--out", str(out), "--contamination", "0.1", *resize]) == 0
    assert (tmp_path / "scores0.csv").read_text() == (tmp_path / "scores3.csv").read_text()
    assert main(["denoise", str(run), str(photos / "00.png"), "--out", str(tmp_path / "clean.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "clean.png")).shape == (8, 8, 3)
    capsys.readouterr()

    # colour_run trained on 8 x 8 images as they were: a 10 x 10 image is refused, not resized.
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    np.save(tmp_path / "grey.npy", rng.integers(0, 256, (2, 8, 8), dtype=np.uint8))
    for name, fix in (("big.png", "10x10x3 (H x W x C), but the model of {run} takes 8x8x3; pass --resize 8 8"),
                      ("grey.npy", "8x8x1 (H x W x C), but the model of {run} takes 8x8x3; give it images of "
                                   "8x8 pixels with 3 channels")):
        for command in (["score", "--contamination", "0.1"], ["denoise"]):
            out = tmp_path / ("out.csv" if command[0] == "score" else "out.png")
            assert main([command[0], str(colour_run), str(tmp_path / name), "--out", str(out), *command[1:]]) == 2
            assert one_error_line(capsys) == f"aekit: error: {tmp_path / name}: images of {fix.format(run=colour_run)}"
            assert not out.exists()


def test_evaluate_reconstruct_and_report_resize_other_data_when_asked(colour_run, tmp_path, capsys):
    """--data of several image sizes needs --resize, which these commands take (their error
    says to pass it); --resize without --data is refused, since the run's own images are read
    as the run read them."""
    import json
    import shutil

    from aekit.cli import main

    rng = np.random.default_rng(3)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (9 + i % 2, 12, 3), dtype=np.uint8)).save(mixed / f"{i:02d}.png")
    run = shutil.copytree(colour_run, tmp_path / "run")  # report writes into the run folder
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(mixed)]) == 2
    assert one_error_line(capsys).endswith("; pass --resize H W to bring them to one size")
    assert main(["evaluate", str(run), "--data", str(mixed), "--resize", "8", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["n_test"] == 2  # the folder's 10% test split
    assert main(["reconstruct", str(run), "--data", str(mixed), "--resize", "8", "8", "--n", "2",
                 "--out", str(tmp_path / "r.png")]) == 0
    assert main(["report", str(run), "--data", str(mixed), "--resize", "8", "8"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--resize", "8", "8"]) == 2
    assert one_error_line(capsys) == ("aekit: error: --resize 8 8 applies to other data (--data PATH); the run's "
                                      "own images are read as the run read them")
