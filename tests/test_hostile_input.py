"""Hostile input: every reader fuzzed with hypothesis, and a fixed corpus of nasty files.

The contract, for any bytes at all: a reader returns valid data or raises DataError /
RunError (ValueError subclasses), never another exception, never hangs, never writes.
Through the CLI that is one stderr line and exit code 2.

The fuzz budget is small under `make test` and large under `make test-slow`
(HYPOTHESIS_PROFILE=slow, see conftest.py).
"""

import csv
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from aekit import data as data_lib
from aekit.cli import main
from aekit.data import DataError
from aekit.models import SeedAutoencoder
from aekit.estimator import ESTIMATOR, ConvAutoencoder
from aekit.progress import EpochRecord
from aekit.runs import (CHECKPOINT, CONFIG, HISTORY, METRICS, WEIGHTS, RunError, read_config, read_history,
                        read_metrics, write_history)
from aekit.start import make_optimizer
from aekit.weights import load_checkpoint, load_model

pytestmark = pytest.mark.fuzz

HANG_SECONDS = 120  # per test: far beyond any honest refusal here


@pytest.fixture(autouse=True)
def no_hang():
    """Fail a test that runs for minutes (a loop that never ends) instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {HANG_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(HANG_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """An empty AEKIT_DATA: a reader that wrote to the cache would show up there."""
    home = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AEKIT_DATA", str(home))
    yield home
    assert list(home.iterdir()) == [], "a reader wrote into the data cache"


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- valid files

def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(compressed: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


GRAY = np.arange(64, dtype=np.uint8).reshape(8, 8)
IMAGES = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
VALID_IDX = idx_bytes(IMAGES)
VALID_NPY = npy_bytes(IMAGES)
VALID_NPZ = npz_bytes(x_train=IMAGES, x_test=IMAGES[:2], y_train=np.arange(3))
VALID_NPZ_COMPRESSED = npz_bytes(True, x=IMAGES)
VALID_PNGS = [png_bytes(Image.fromarray(GRAY)), png_bytes(Image.fromarray(GRAY).convert("P")),
              png_bytes(Image.fromarray(GRAY.astype(np.uint16) * 257)),
              png_bytes(Image.fromarray(GRAY).convert("RGBA"))]
VALID_JPEG = png_bytes(Image.fromarray(GRAY).convert("RGB"), "JPEG")
MNIST_LIKE = ((np.full((2, 784), 3 / 256, np.float32), np.zeros(2, np.int64)),) * 3
VALID_PICKLES = [pickle.dumps(MNIST_LIKE, protocol=p) for p in (2, 4, 5)]


# ------------------------------------------------------------------------- mutations

def _edit(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, position, payload in edits:
        at = position % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= payload[0] if payload else 0xFF
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "number":  # a length or size field set to something large or odd
            out[at:at + 4] = struct.pack("<I", int.from_bytes(payload[:4].ljust(4, b"\xff"), "little"))
    return bytes(out)


def mutated(*valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid files with a few bytes flipped, cut, inserted or set to large numbers."""
    edit = st.tuples(st.sampled_from(["flip", "cut", "insert", "number"]),
                     st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8))
    return st.builds(_edit, st.sampled_from(valid), st.lists(edit, min_size=1, max_size=4))


def nasty(*valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(*valid))


def refuses_cleanly(read, *errors):
    """Call ``read``: fine if it returns or raises one of ``errors`` in one line; anything else fails."""
    try:
        return read()
    except (errors or (DataError,)) as exc:
        assert "\n" not in str(exc), f"a refusal of more than one line: {exc}"
        return None


# ------------------------------------------------------------------------- data loaders

@given(raw=nasty(VALID_IDX, gzip.compress(VALID_IDX)))
@example(raw=bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**6, 10**3, 10**3))  # 10^12 claimed
@example(raw=gzip.compress(VALID_IDX)[:30])  # truncated gzip
@example(raw=bytes([0, 0, 8, 255]) + b"\xff" * 1020)  # 255 dimensions of 2^32-1
def test_fuzz_idx(tmp_path, raw):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(raw)
    before = listing(tmp_path)
    array = refuses_cleanly(lambda: data_lib.read_idx(path))
    assert array is None or isinstance(array, np.ndarray)
    refuses_cleanly(lambda: data_lib.load_dataset(path))
    refuses_cleanly(lambda: data_lib.read_images(path))
    assert listing(tmp_path) == before


@given(raw=nasty(VALID_NPY))
@example(raw=VALID_NPY[:10] + b"{'descr': '|u1', 'fortran_order': False, 'shape': (10**12,), }")
@example(raw=VALID_NPY.replace(b"'|u1'", b"'|O8'"))
@example(raw=b"\x93NUMPY\x01\x00\x06\x00\x00\x00\x00" + b"'" * 3)  # a header numpy's tokenizer fails on
def test_fuzz_npy(tmp_path, raw):
    path = tmp_path / "x.npy"
    path.write_bytes(raw)
    result = refuses_cleanly(lambda: data_lib.load_dataset(path))
    assert result is None or result[0][0].dtype in (np.uint8, np.float32)
    refuses_cleanly(lambda: data_lib.read_images(path))
    streams = refuses_cleanly(lambda: data_lib.open_stream(path))  # its own header reader
    if streams is not None:
        refuses_cleanly(lambda: [list(stream.batches(2)) for stream in streams])
    data_lib.float_bytes(path)  # an int, or None for data that cannot stream; never an error
    assert listing(tmp_path) == ["x.npy"]


@given(raw=nasty(VALID_NPZ, VALID_NPZ_COMPRESSED))
def test_fuzz_npz(tmp_path, raw):
    path = tmp_path / "x.npz"
    path.write_bytes(raw)
    refuses_cleanly(lambda: data_lib.load_dataset(path))
    refuses_cleanly(lambda: data_lib.read_images(path))
    assert listing(tmp_path) == ["x.npz"]


# The first data chunk's length cut to 2: Pillow then reads garbage as the next chunk's
# type and raises SyntaxError, not OSError.
PNG_BAD_CHUNK_LENGTH = VALID_PNGS[0][:33] + struct.pack(">I", 2) + VALID_PNGS[0][37:]


@given(raw=nasty(*VALID_PNGS, VALID_JPEG), suffix=st.sampled_from([".png", ".jpg"]))
@example(raw=PNG_BAD_CHUNK_LENGTH, suffix=".png")
def test_fuzz_image_folder(tmp_path, raw, suffix):
    folder = tmp_path / "images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "a.png").write_bytes(VALID_PNGS[0])
    (folder / f"b{suffix}").write_bytes(raw)
    before = listing(tmp_path)
    result = refuses_cleanly(lambda: data_lib.load_dataset(folder))
    assert result is None or result[0][0].dtype == np.uint8
    assert listing(tmp_path) == before


@given(raw=nasty(*VALID_PICKLES))
@example(raw=b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40))  # BINBYTES8 claiming a terabyte
@example(raw=b"cos\nsystem\n(S'touch /tmp/aekit-fuzz-pwned'\ntR.")  # protocol 0 code execution
@example(raw=pickle.dumps(((MNIST_LIKE[0][0], np.full(2, np.nan)),) * 3))  # NaN labels
@example(raw=pickle.dumps(((MNIST_LIKE[0][0], np.zeros(5)),) * 3))  # 5 labels for 2 images
@example(raw=pickle.dumps(((np.zeros((0, 784)), np.zeros(0)),) * 3))  # no images at all
@example(raw=pickle.dumps(((MNIST_LIKE[0][0], "labels"),) * 3))  # not arrays
def test_fuzz_pickle_reader(raw):
    refuses_cleanly(lambda: data_lib.load_arrays_pickle(io.BytesIO(raw), "fuzz.pkl"))
    result = refuses_cleanly(lambda: data_lib.mnist_from_pickle(io.BytesIO(raw), "fuzz.pkl"))
    assert result is None or result["x_train"].dtype == np.uint8
    assert not os.path.exists("/tmp/aekit-fuzz-pwned")


# ------------------------------------------------------------------------- run folders

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("fuzzrun") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--model", "seed", "--limit", "200", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    return {name: (out / name).read_bytes() for name in (CONFIG, WEIGHTS, CHECKPOINT, METRICS)}


def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@st.composite
def edited_json(draw, original: bytes, inside: tuple[str, ...] = ()):
    """A JSON object file with one field replaced, added or removed (at the top or in one of
    the objects ``inside`` it), or its bytes mutated."""
    whole = json.loads(original)
    choice = draw(st.sampled_from(["replace", "add", "remove", "bytes"]))
    if choice == "bytes":
        return draw(mutated(original))
    target = whole[draw(st.sampled_from(inside))] if inside and draw(st.booleans()) else whole
    key = draw(st.sampled_from(sorted(target)) if choice != "add" else st.text(max_size=12))
    if choice == "remove":
        target.pop(key, None)
    else:
        target[key] = draw(json_values())
    return json.dumps(whole).encode()


@given(data=st.data(), target=st.sampled_from([CONFIG, WEIGHTS, METRICS, CHECKPOINT]))
def test_fuzz_run_folder(tmp_path, tiny_run, data, target):
    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, raw in tiny_run.items():
        (folder / name).write_bytes(raw)
    if target == CONFIG:
        raw = data.draw(edited_json(tiny_run[CONFIG]), label="config.json")
    else:
        raw = data.draw(nasty(tiny_run[target]), label=target)
    (folder / target).write_bytes(raw)
    before = listing(folder)

    loaded = refuses_cleanly(lambda: load_model(folder), RunError, DataError)
    if loaded is not None:  # accepted: then it must be the model that was trained
        model, _ = loaded
        assert sum(p.numel() for p in model.parameters()) == 4385
    config = refuses_cleanly(lambda: read_config(folder), RunError)
    if config is not None and config.image_shape == (1, 28, 28):
        model = SeedAutoencoder()
        refuses_cleanly(lambda: load_checkpoint(model, make_optimizer(model, config), folder / CHECKPOINT,
                                                config), RunError)
    assert listing(folder) == before


def run_folder(tmp_path, files: dict[str, bytes]):
    """A fresh folder ``run`` in ``tmp_path`` holding ``files`` (name -> bytes)."""
    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def usable(estimator) -> None:
    """An estimator that loaded must work: reconstruct, score and predict 28x28 images."""
    x = np.tile(GRAY, (4, 4))[None, :28, :28].repeat(3, axis=0)
    assert estimator.reconstruction_error(x).shape == (3,)
    if estimator.threshold_ is None:  # a run without a threshold refuses to predict, in one line
        refuses_cleanly(lambda: estimator.predict(x), ValueError)
    else:
        assert set(estimator.predict(x)) <= {-1, 1}


@given(raw=nasty(json.dumps({"threshold": 0.01, "contamination": 0.01}).encode()))
@example(raw=b"\xff\xfe")  # not UTF-8
@example(raw=b"[]")  # not an object
@example(raw=b'{"threshold": "0.1"}')
@example(raw=b'{"threshold": 1e999}')  # JSON's way to say infinity
@example(raw=b'{"threshold": 0.01, "contamination": [0.1]}')
def test_fuzz_metrics(tmp_path, tiny_run, raw):
    """metrics.json as `aekit report` and the estimator read it (its threshold and contamination)."""
    folder = run_folder(tmp_path, {**tiny_run, METRICS: raw})
    before = listing(folder)
    metrics = refuses_cleanly(lambda: read_metrics(folder), RunError)
    assert metrics is None or isinstance(metrics, dict)
    estimator = refuses_cleanly(lambda: ConvAutoencoder.load(folder), RunError)
    if estimator is not None:
        usable(estimator)
    assert listing(folder) == before


@pytest.fixture(scope="module")
def saved_estimator(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("fuzzestimator") / "est"
    torch.set_num_threads(1)
    x = mnist[0][0][:200]
    ConvAutoencoder(latent_dim=4, widths=(4,), epochs=1, batch_size=50, random_state=0).fit(x).save(out)
    return {name: (out / name).read_bytes() for name in (CONFIG, WEIGHTS, ESTIMATOR)}


@given(data=st.data())
def test_fuzz_estimator_json(tmp_path, saved_estimator, data):
    original = saved_estimator[ESTIMATOR]
    raw = data.draw(st.one_of(edited_json(original, inside=("params",)), nasty(original)), label=ESTIMATOR)
    folder = run_folder(tmp_path, {**saved_estimator, ESTIMATOR: raw})
    before = listing(folder)
    estimator = refuses_cleanly(lambda: ConvAutoencoder.load(folder), RunError)
    if estimator is not None:  # accepted: then it is the model that was saved, and it works
        assert estimator.transform(np.zeros((1, 28, 28), np.uint8)).shape == (1, 4)
        usable(estimator)
    assert listing(folder) == before


def _history(*rows) -> bytes:
    return b"epoch,loss,val_loss,val_mse,seconds,images_per_second\n" + b"".join(r + b"\n" for r in rows)


VALID_HISTORY = _history(b"1,0.2,0.19,0.05,3.5,17000", b"2,0.1,0.11,0.03,3.4,17600")
CSV_CELLS = st.one_of(st.text(max_size=8), st.floats().map(str), st.integers().map(str))


@st.composite
def csv_tables(draw):
    """A header of history.csv's columns (some dropped, some added, shuffled) and rows of any cells."""
    columns = list(VALID_HISTORY.split(b"\n")[0].decode().split(","))
    header = draw(st.permutations(columns + draw(st.lists(st.text(max_size=6), max_size=2))))
    header = header[:draw(st.integers(0, len(header)))]
    rows = draw(st.lists(st.lists(CSV_CELLS, max_size=len(header) + 2), max_size=4))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    return buffer.getvalue().encode()


@given(raw=st.one_of(nasty(VALID_HISTORY), csv_tables()))
@example(raw=VALID_HISTORY + b"3,0.1\n")  # a short row: its missing cells read as None
@example(raw=VALID_HISTORY + b"3,0.1,0.1,0.1,1,1,extra\n")  # a long row
@example(raw=_history(b"1," + b"9" * 200_000 + b",1,1,1,1"))  # a cell beyond csv's field limit
@example(raw=_history(b"1,0.1,0.1,0.1,1,1e999"))  # a float that overflows: inf, still a float
@example(raw=b"\xff\xfe" + VALID_HISTORY)  # not UTF-8
def test_fuzz_history(tmp_path, raw):
    (tmp_path / HISTORY).write_bytes(raw)
    history = refuses_cleanly(lambda: read_history(tmp_path), RunError)
    assert history is None or all(isinstance(r, EpochRecord) for r in history)
    assert listing(tmp_path) == [HISTORY]


def test_history_round_trips(tmp_path):
    records = [EpochRecord(1, 0.2, 0.19, 0.05, 3.5, 17000.0), EpochRecord(2, 0.1, 0.11, 0.03, 3.4, 17600.0)]
    write_history(records, tmp_path / HISTORY)
    assert (tmp_path / HISTORY).read_bytes() == VALID_HISTORY  # the fuzz tests start from a real file
    assert read_history(tmp_path) == records


# --------------------------------------------------------------- the corpus, through the CLI

def _symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a"


def _folder_of_loops(tmp_path):
    folder = tmp_path / "loops"
    folder.mkdir()
    (folder / "self").symlink_to(folder)  # a folder inside itself
    (folder / "x.png").symlink_to(folder / "y.png")
    (folder / "y.png").symlink_to(folder / "x.png")
    return folder


def _fifo(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    return path


def _file(name: str, raw: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(raw)
        return tmp_path / name
    return make


def _image_folder(name: str, raw: bytes):
    def make(tmp_path):
        folder = tmp_path / "images"
        folder.mkdir()
        (folder / "ok.png").write_bytes(VALID_PNGS[0])
        (folder / name).write_bytes(raw)
        return folder
    return make


def _zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return buffer.getvalue()


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([None, {}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/aekit-corpus-pwned",))


def _npy_claiming(shape: tuple[int, ...], body: bytes) -> bytes:
    """A .npy header for uint8 ``shape`` followed by ``body``, whatever its length."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


HUGE_NPY_HEADER = _npy_claiming((10**6, 10**6), b"\0")
def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header, CRC fixed, claims ``width`` x ``height`` pixels."""
    raw = bytearray(png_bytes(Image.new("L", (1, 1))))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # the CRC of "IHDR" + its data
    return bytes(raw)

CORPUS = {
    # name: (make the file, what the one error line must say)
    "zero-byte idx": (_file("t10k-images-idx3-ubyte", b""), "not an IDX file"),
    "zero-byte npy": (_file("x.npy", b""), "not a readable .npy array"),
    "zero-byte npz": (_file("x.npz", b""), "not a readable .npz file"),
    "zero-byte png": (_image_folder("empty.png", b""), "empty.png: cannot read as an image"),
    "truncated gzip": (_file("x.gz", gzip.compress(VALID_IDX)[:25]), "damaged or truncated"),
    "idx claiming 10^12 items": (_file("x.idx", bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**6, 10**3, 10**3)),
                                 "claims 1,000,000,000,000 bytes"),
    "idx claiming more than it holds": (_file("x.idx", bytes([0, 0, 8, 3]) + struct.pack(">3I", 9, 9, 9) + b"\0" * 9),
                                        "truncated"),
    "wrong magic (zip)": (_file("x.idx", b"PK\x03\x04 not idx"), "bad magic number 504b0304"),
    "wrong magic (dtype 07)": (_file("x.idx", b"\x00\x00\x07\x01abcd"), "not an IDX file"),
    "object array in npy": (_file("o.npy", _object_npy()),
                            "holds Python objects"),
    "object array in npz": (_file("o.npz", npz_bytes(x=np.array([None, 1], dtype=object))), "holds Python objects"),
    "npy header claiming 10^12 items": (_file("big.npy", HUGE_NPY_HEADER), "the file holds 1 bytes"),
    "npz member claiming 10^12 items": (_file("big.npz", _zip(**{"x.npy": HUGE_NPY_HEADER})), "the file holds 1 bytes"),
    "npz with a non-array member": (_file("odd.npz", _zip(**{"x.npy": VALID_NPY, "run.sh": b"rm -rf /"})),
                                    "which is not a .npy array"),
    "npy with a garbled header": (_file("g.npy", VALID_NPY[:10] + b"{'descr': '|u1', 'shape': ((("), "not a readable .npy"),
    "pickle that runs code, as .pkl": (_file("evil.pkl", pickle.dumps(_Evil())), "not an IDX file"),
    "pickle that runs code, as .npy": (_file("evil.npy", pickle.dumps(_Evil())), "not a readable .npy array"),
    "png with a broken chunk": (_image_folder("broken.png", VALID_PNGS[0][:40] + b"\xde\xad" + VALID_PNGS[0][42:]),
                                "broken.png: cannot read as an image"),
    "png with a wrong chunk length": (_image_folder("chunk.png", PNG_BAD_CHUNK_LENGTH),
                                      "chunk.png: cannot read as an image (SyntaxError: broken PNG file"),
    "truncated 16-bit png": (_image_folder("sixteen.png", VALID_PNGS[2][:-30]), "sixteen.png: cannot read"),
    "palette png with a truncated palette": (_image_folder("palette.png", VALID_PNGS[1][:70]), "palette.png: cannot read"),
    "png claiming 100000 x 100000 pixels": (
        _image_folder("bomb.png", png_claiming(100_000, 100_000)),
        "bomb.png: refused before decoding as a possible decompression bomb"),
    "png claiming 12000 x 12000 pixels": (  # between Pillow's warning and its own refusal
        _image_folder("bomb.png", png_claiming(12_000, 12_000)),
        "bomb.png: refused before decoding as a possible decompression bomb"),
    "jpeg that is text": (_image_folder("fake.jpg", b"hello"), "fake.jpg: cannot read as an image"),
    "symlink loop": (_symlink_loop, "a broken symlink or a symlink loop"),
    "folder of symlink loops": (_folder_of_loops, "no PNG or JPEG images found"),
    "named pipe": (_fifo, "not a regular file or folder"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_gives_one_line_and_exit_2(name, tmp_path, capsys):
    make, message = CORPUS[name]
    path = make(tmp_path)
    before = listing(tmp_path)
    assert main(["data", "info", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aekit: error: "), captured.err
    assert message in lines[0]
    assert captured.out == ""
    assert listing(tmp_path) == before  # nothing written
    assert not os.path.exists("/tmp/aekit-corpus-pwned")


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_is_refused_by_read_images_too(name, tmp_path):
    """The reader behind `aekit denoise` and `aekit score` refuses the same files."""
    make, _ = CORPUS[name]
    path = make(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(DataError):
        data_lib.read_images(path)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_odd_but_valid_png_modes_are_data(mode, tmp_path, capsys):
    """16-bit, palette, 1-bit and alpha images are images: loaded, not refused."""
    folder = tmp_path / "odd"
    folder.mkdir()
    image = Image.fromarray(GRAY.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(GRAY).convert(mode)
    for i in range(3):
        image.save(folder / f"{i}.png")
    assert main(["data", "info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"]["dtype"] == "uint8" and info["train"]["shape"][1:3] == [8, 8]


def test_pickles_that_run_code_are_refused_by_the_reader():
    for protocol in (0, 2, 5):
        with pytest.raises(DataError, match="refused to load (posix|os).system"):
            data_lib.load_arrays_pickle(io.BytesIO(pickle.dumps(_Evil(), protocol=protocol)), "evil.pkl")
    assert not os.path.exists("/tmp/aekit-corpus-pwned")


RUN_CORPUS = {
    "zero-byte weights": (WEIGHTS, b"", "cannot read the weights"),
    "weights header claiming 2^63 bytes": (WEIGHTS, struct.pack("<Q", 1 << 63) + b"{}", "cannot read the weights"),
    "weights as JSON": (WEIGHTS, b'{"not": "safetensors"}', "cannot read the weights"),
    "config from a newer aekit": (CONFIG, {"aekit_version": "7.0.0"}, "was made by aekit 7.0.0"),
    "config without lr (found by fuzzing)": (CONFIG, {"lr": None}, "lr missing (null)"),
    "config with an option named by a line break (found by fuzzing)": (CONFIG, {"model_params": {"\n": False}},
                                                                       "takes no options, not '\\n'"),
    "config as a list": (CONFIG, b"[]", "expected a JSON object"),
    "config nested 10^5 deep": (CONFIG, b"[" * 100_000 + b"]" * 100_000, "unreadable run config"),
}


@pytest.mark.parametrize("name", sorted(RUN_CORPUS))
def test_run_corpus_gives_one_line_and_exit_2(name, tmp_path, tiny_run, capsys):
    target, raw, message = RUN_CORPUS[name]
    for file, content in tiny_run.items():
        (tmp_path / file).write_bytes(content)
    if isinstance(raw, dict):  # an edit of the run's own config.json
        raw = json.dumps({**json.loads(tiny_run[CONFIG]), **raw}).encode()
    (tmp_path / target).write_bytes(raw)
    (tmp_path / METRICS).unlink()
    before = listing(tmp_path)
    for argv in (["evaluate", str(tmp_path)], ["reconstruct", str(tmp_path), "--out", str(tmp_path / "r.png")]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert listing(tmp_path) == before
