"""Every loader on small files written here, and every refusal."""

import gzip
import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from aekit import data as data_lib
from aekit.data import DataError, load_dataset, read_idx, to_float, to_nchw

from conftest import need


def write_idx(path, array, gz=False, dims=None, magic=None):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = magic if magic is not None else bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *(dims or array.shape))
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)
    return path


# ------------------------------------------------------------------------ conversions

def test_to_float_divides_uint8_by_255():
    x = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = to_float(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[[0, 0.2, 1]]], dtype=np.float32))


def test_to_float_refuses_out_of_range_and_nan():
    with pytest.raises(DataError, match=r"must lie in \[0, 1\].*divide by 255"):
        to_float(np.full((1, 2, 2), 3.0))
    with pytest.raises(DataError, match="NaN"):
        to_float(np.array([[[np.nan]]], dtype=np.float32))
    with pytest.raises(DataError, match="dtype int32"):
        to_float(np.zeros((1, 2, 2), dtype=np.int32))


def test_to_nchw():
    assert to_nchw(np.zeros((4, 5, 6))).shape == (4, 1, 5, 6)
    assert to_nchw(np.zeros((4, 5, 6, 3))).shape == (4, 3, 5, 6)


def test_layouts_read_and_write_every_layout_the_same_images():
    """parse_images reads each layout as the same float32 (n, C, H, W) and names it;
    from_nchw writes that layout back."""
    from aekit.data import LAYOUTS, from_nchw, parse_images

    nchw = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    expected = nchw.astype(np.float32) / np.float32(255.0)
    for layout in LAYOUTS:
        given = from_nchw(nchw if layout != "nhw" else nchw[:, :1], layout)
        x, found = parse_images(given, lambda flat: (3, 5, 6))
        assert found == layout and x.dtype == np.float32
        np.testing.assert_array_equal(x, expected if layout != "nhw" else expected[:, :1])
        np.testing.assert_array_equal(from_nchw(x, layout), given / np.float32(255.0))


# ------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, rng, gz):
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    path = write_idx(tmp_path / ("x.idx.gz" if gz else "x.idx"), images, gz=gz)
    np.testing.assert_array_equal(read_idx(path), images)


def test_idx_float_and_int_types(tmp_path, rng):
    floats = rng.random((3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f.idx", floats)), floats)
    ints = rng.integers(-5, 5, size=(6,)).astype(np.int32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "i.idx", ints)), ints)


def test_idx_folder_like_mnist(tmp_path, rng):
    xtr = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    xte = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    ytr, yte = rng.integers(0, 10, 20).astype(np.uint8), rng.integers(0, 10, 6).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", xte)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte)
    (a, ya), (b, yb) = load_dataset(tmp_path)
    np.testing.assert_array_equal(a, xtr)
    np.testing.assert_array_equal(b, xte)
    np.testing.assert_array_equal(ya, ytr)
    np.testing.assert_array_equal(yb, yte)
    assert ya.dtype == np.int64


def test_idx_truncated(tmp_path, rng):
    path = write_idx(tmp_path / "x.idx", rng.integers(0, 256, (10, 4, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"x\.idx: IDX file is truncated.*fetch it again"):
        read_idx(path)


def test_idx_header_claiming_huge_data_is_refused_without_allocating(tmp_path, monkeypatch):
    # 10^12 items claimed, 16 bytes present: refused from the header alone, since no
    # machine here holds a terabyte...
    path = write_idx(tmp_path / "lie.idx", np.zeros((4, 2, 2), np.uint8), dims=(1_000_000, 1000, 1000))
    with pytest.raises(DataError, match=r"claims 1,000,000,000,000 bytes of data, more than this machine's memory"):
        read_idx(path)
    # ...and where one does, the reader stops at the bytes present instead of allocating.
    monkeypatch.setattr(data_lib.arrays, "memory_bytes", lambda: 10**15)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_idx_longer_than_header(tmp_path):
    path = write_idx(tmp_path / "long.idx", np.zeros((4, 2, 2), np.uint8), dims=(2, 2, 2))
    with pytest.raises(DataError, match="longer than its header says"):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"\x00", b"PK\x03\x04hello", b"\x00\x00\x07\x01abcd"])
def test_idx_bad_magic(tmp_path, content):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.idx"):
        read_idx(path)


def test_truncated_gzip(tmp_path, rng):
    path = write_idx(tmp_path / "x.idx.gz", rng.integers(0, 256, (50, 8, 8), dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="x.idx.gz"):
        read_idx(path)


# ------------------------------------------------------------------------ npy / npz

def test_npz_keras_layout(tmp_path, rng):
    arrays = {"x_train": rng.integers(0, 256, (9, 6, 6), dtype=np.uint8),
              "y_train": np.arange(9), "x_test": rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)}
    np.savez(tmp_path / "d.npz", **arrays)
    (xtr, ytr), (xte, yte) = load_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(xtr, arrays["x_train"])
    np.testing.assert_array_equal(ytr, np.arange(9))
    np.testing.assert_array_equal(xte, arrays["x_test"])
    assert yte is None


def test_npy_is_split_90_10_reproducibly(tmp_path, rng):
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    (xtr, ytr), (xte, _) = load_dataset(tmp_path / "x.npy")
    assert xtr.shape == (45, 8, 8, 3) and xte.shape == (5, 8, 8, 3) and ytr is None
    # every image lands in exactly one split
    together = np.concatenate([xtr, xte]).reshape(50, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, x.reshape(50, -1)))
    (xtr2, _), _ = load_dataset(tmp_path / "x.npy")
    np.testing.assert_array_equal(xtr, xtr2)


def test_float_npy_kept_as_float(tmp_path, rng):
    x = rng.random((10, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (xtr, _), _ = load_dataset(tmp_path / "x.npy")
    assert xtr.dtype == np.float32


def test_nan_in_array_is_refused(tmp_path):
    x = np.zeros((10, 4, 4), np.float32)
    x[3, 1, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"x\.npy.*1 NaN"):
        load_dataset(tmp_path / "x.npy")


def test_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="only pickle can load, and aekit never unpickles"):
        load_dataset(tmp_path / "o.npy")
    np.savez(tmp_path / "o.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(DataError, match=r"o\.npz\[x\]: holds Python objects"):
        load_dataset(tmp_path / "o.npz")


def test_channels_first_array_gets_a_fix(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"transpose \(n, C, H, W\)"):
        load_dataset(tmp_path / "x.npy")


# ---------------------------------------------------------------------- image folders

def save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_png_folder_grayscale(tmp_path, rng):
    images = rng.integers(0, 256, (10, 12, 10), dtype=np.uint8)
    for i, img in enumerate(images):
        save_png(tmp_path / "imgs" / f"{i:02d}.png", img)
    (xtr, ytr), (xte, _) = load_dataset(tmp_path / "imgs")
    assert xtr.shape == (9, 12, 10) and xte.shape == (1, 12, 10) and ytr is None
    together = {bytes(a) for a in np.concatenate([xtr, xte]).reshape(10, -1)}
    assert together == {bytes(a) for a in images.reshape(10, -1)}


def test_png_folder_rgb_with_classes_and_jpeg(tmp_path, rng):
    for label in ("cat", "dog"):
        for i in range(5):
            save_png(tmp_path / "pets" / label / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "pets" / "dog" / "x.jpg")
    (xtr, ytr), (xte, yte) = load_dataset(tmp_path / "pets")
    assert xtr.shape[1:] == (8, 8, 3)
    assert len(xtr) + len(xte) == 11
    assert sorted(np.concatenate([ytr, yte]).tolist()) == [0] * 5 + [1] * 6


def test_train_test_subfolders(tmp_path, rng):
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            save_png(tmp_path / "d" / split / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (xtr, _), (xte, _) = load_dataset(tmp_path / "d")
    assert xtr.shape == (4, 8, 8) and xte.shape == (2, 8, 8)


def test_mixed_sizes_need_resize(tmp_path, rng):
    save_png(tmp_path / "m" / "a.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    save_png(tmp_path / "m" / "b.png", rng.integers(0, 256, (9, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"different sizes.*pass resize=\(H, W\) to bring them to one size"):
        load_dataset(tmp_path / "m")
    (xtr, _), (xte, _) = load_dataset(tmp_path / "m", resize=(4, 6))
    assert xtr.shape[1:] == (4, 6)


def test_odd_image_modes(tmp_path, rng):
    folder = tmp_path / "modes"
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    save_png(folder / "gray.png", gray)
    Image.fromarray((gray.astype(np.uint16) * 257)).save(folder / "sixteen.png")  # 16-bit
    Image.fromarray(gray).convert("P").save(folder / "palette.png")
    Image.fromarray(gray > 128).save(folder / "bilevel.png")
    Image.fromarray(gray).convert("LA").save(folder / "alpha.png")
    (xtr, _), (xte, _) = load_dataset(folder)
    images = np.concatenate([xtr, xte])
    assert images.shape == (5, 6, 6, 3) and images.dtype == np.uint8  # a palette file is colour
    for name in ("gray.png", "sixteen.png", "alpha.png"):
        np.testing.assert_array_equal(data_lib.read_image(folder / name, None), gray, err_msg=name)
    np.testing.assert_array_equal(data_lib.read_image(folder / "palette.png", None), np.stack([gray] * 3, axis=2))
    np.testing.assert_array_equal(data_lib.read_image(folder / "bilevel.png", None), (gray > 128) * 255)


def test_sixteen_bit_images_keep_their_range(tmp_path):
    """16-bit pixels are scaled to 8 bits (v * 255 // 65535), never clipped at 255."""
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as img:
        assert img.mode.startswith("I")  # Pillow really reads it as 16-bit
    np.testing.assert_array_equal(data_lib.read_image(tmp_path / "sixteen.png", None), [[0, 1, 127, 255]])


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG (every CRC right) whose header claims width x height pixels; its data
    holds one row, so only a decoder that believes the header would need the rest."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # the CRC of "IHDR" + its data
    return bytes(raw)


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (20_000, 20_000)])  # 144 and 400 MP
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, width, height):
    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    with monkeypatch.context() as unlimited:  # the file is a valid PNG: Pillow opens it
        unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(path) as img:
            assert img.size == (width, height)
            img.verify()  # every chunk's CRC is right

    def decode(self, *args, **kwargs):
        raise AssertionError("aekit decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(DataError, match=r"bomb\.png: refused before decoding as a possible decompression bomb"):
        data_lib.read_image(path, None)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG images found"):
        load_dataset(tmp_path / "empty")


def test_broken_image_file(tmp_path, rng):
    save_png(tmp_path / "f" / "ok.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    (tmp_path / "f" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png: cannot read as an image"):
        load_dataset(tmp_path / "f")


def test_missing_path_names_builtins(tmp_path):
    with pytest.raises(DataError, match=r"no data at .*not a built-in name \(digits8, fashion-mnist, gray32, mnist, photos32, photos64\)"):
        load_dataset(tmp_path / "nope")


# ------------------------------------------------------------- pickles and built-ins

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/aekit-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    payload = pickle.dumps(((np.zeros(2), _Evil()),))
    with pytest.raises(DataError, match="refused to load posix.system|refused to load os.system"):
        data_lib.load_arrays_pickle(io.BytesIO(payload), "evil.pkl")
    assert not os.path.exists("/tmp/aekit-pwned")


def test_object_dtype_inside_pickle_is_refused():
    payload = pickle.dumps(np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="refused an object dtype"):
        data_lib.load_arrays_pickle(io.BytesIO(payload), "obj.pkl")


def test_mnist_pickle_layout_converts_exactly(rng):
    def part(n):
        pixels = rng.integers(0, 256, (n, 784))
        return (pixels / 256).astype(np.float32), rng.integers(0, 10, n), pixels
    (xa, ya, pa), (xb, yb, pb), (xc, yc, pc) = part(5), part(3), part(4)
    payload = pickle.dumps(((xa, ya), (xb, yb), (xc, yc)))
    out = data_lib.mnist_from_pickle(io.BytesIO(payload), "fake.pkl")
    np.testing.assert_array_equal(out["x_train"], np.concatenate([pa, pb]).reshape(-1, 28, 28))
    np.testing.assert_array_equal(out["x_test"], pc.reshape(-1, 28, 28))
    np.testing.assert_array_equal(out["y_train"], np.concatenate([ya, yb]))
    assert out["x_train"].dtype == np.uint8


def test_mnist_pickle_with_other_values_is_refused(rng):
    x = rng.random((2, 784)).astype(np.float32)  # not k/256
    payload = pickle.dumps(((x, np.zeros(2)),) * 3)
    with pytest.raises(DataError, match="not MNIST pixels"):
        data_lib.mnist_from_pickle(io.BytesIO(payload), "fake.pkl")


def test_cached_file_with_wrong_checksum_is_refused(data_home):
    data_home.mkdir()
    np.savez(data_home / "mnist.npz", x_train=np.zeros((60000, 28, 28), np.uint8),
             y_train=np.zeros(60000, np.uint8), x_test=np.zeros((10000, 28, 28), np.uint8),
             y_test=np.zeros(10000, np.uint8))
    with pytest.raises(DataError, match=r"mnist\.npz: checksum mismatch for x_train.*aekit data fetch mnist"):
        load_dataset("mnist")


def test_a_cache_is_read_once_per_load_and_verified_again_when_written_again(data_home, mnist, monkeypatch):
    """Each load reads the file once; its checksums are computed once per version of the file
    (a process that loads MNIST ten times hashes it once), and a file written again, in place
    with the same size, is verified again."""
    (x_train, y_train), (x_test, y_test) = mnist
    data_home.mkdir()
    arrays = dict(x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test, y_test=y_test.astype(np.uint8))
    np.savez(data_home / "mnist.npz", **arrays)
    reads, hashes = [], []
    read_npz, sha256_array = data_lib.datasets.read_npz, data_lib.datasets.sha256_array
    monkeypatch.setattr(data_lib.datasets, "read_npz", lambda *a: reads.append(a) or read_npz(*a))
    monkeypatch.setattr(data_lib.datasets, "sha256_array", lambda a: hashes.append(a.shape) or sha256_array(a))
    for _ in range(2):
        (x, _), _ = load_dataset("mnist")
        np.testing.assert_array_equal(x, x_train)
    assert len(reads) == 2 and len(hashes) == 4  # four arrays, hashed on the first load only
    size = (data_home / "mnist.npz").stat().st_size
    np.savez(data_home / "mnist.npz", **{**arrays, "x_train": np.zeros_like(x_train)})
    assert (data_home / "mnist.npz").stat().st_size == size
    with pytest.raises(DataError, match=r"mnist\.npz: checksum mismatch for x_train"):
        load_dataset("mnist")


def test_a_cache_replaced_while_read_is_verified_again(data_home, mnist, monkeypatch):
    """What was read is verified; the version that replaced it while it was read is not taken
    for verified (it is the next load's to verify)."""
    (x_train, y_train), (x_test, y_test) = mnist
    data_home.mkdir()
    arrays = dict(x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test, y_test=y_test.astype(np.uint8))
    np.savez(data_home / "mnist.npz", **arrays)
    read_npz = data_lib.datasets.read_npz

    def read_then_replace(*args):
        read = read_npz(*args)
        np.savez(data_home / "replaced.npz", **{**arrays, "x_train": np.zeros_like(x_train)})
        os.replace(data_home / "replaced.npz", data_home / "mnist.npz")
        return read

    monkeypatch.setattr(data_lib.datasets, "read_npz", read_then_replace)
    (x, _), _ = load_dataset("mnist")
    np.testing.assert_array_equal(x, x_train)
    monkeypatch.setattr(data_lib.datasets, "read_npz", read_npz)
    with pytest.raises(DataError, match=r"mnist\.npz: checksum mismatch for x_train"):
        load_dataset("mnist")


def test_truncated_cache_is_refused(data_home):
    data_home.mkdir()
    (data_home / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read the cached mnist"):
        load_dataset("mnist")


def test_failed_download_leaves_nothing_behind(data_home, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(data_lib.datasets.urllib.request, "urlopen", fail)
    monkeypatch.setattr(data_lib.datasets, "FASHION_DEBIAN", data_home / "no-debian-copy")
    with pytest.raises(DataError, match=r"could not get Fashion-MNIST.*network unreachable.*apt-get install"):
        load_dataset("fashion-mnist")
    assert list(data_home.iterdir()) == []


def test_download_with_wrong_checksum_is_not_kept(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"not mnist")
    with pytest.raises(DataError, match="checksum mismatch"):
        data_lib.datasets._download(src.as_uri(), tmp_path / "out" / "mnist.npz", sha256="0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def test_mnist_is_the_real_thing(mnist):
    (xtr, ytr), (xte, yte) = mnist
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert ytr[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the standard order
    assert yte[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert 0.11 < float((to_float(xte) ** 2).mean()) < 0.12  # the blank-output MSE of the issue


def test_fashion_mnist_from_debian(data_home):
    need(data_lib.datasets.FASHION_DEBIAN.is_dir(), "Debian's dataset-fashion-mnist is not installed "
         "(make test installs it: apt-get install dataset-fashion-mnist)")
    (xtr, ytr), (xte, _) = load_dataset("fashion-mnist")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert sorted(set(ytr.tolist())) == list(range(10))
    assert (data_home / "fashion-mnist.npz").is_file()




# ------------------------------------------------------------- a built-in's name, and a path

@pytest.fixture
def local_mnist(tmp_path, monkeypatch, rng):
    """A folder named `mnist` of 20 random 8x8 images in the working directory."""
    for i in range(20):
        save_png(tmp_path / "mnist" / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "mnist"


def test_a_builtin_name_means_the_builtin_even_beside_a_local_folder_of_that_name(local_mnist, mnist, caplog):
    with caplog.at_level("WARNING", logger="aekit"):
        (x_train, _), _ = load_dataset("mnist")
    assert x_train.shape == (60000, 28, 28)
    assert "'mnist' means the built-in mnist data set; the local folder is not used (write ./mnist" in caplog.text
    (x_local, _), (x_local_test, _) = load_dataset("./mnist")
    assert x_local.shape[1:] == (8, 8) and len(x_local) + len(x_local_test) == 20
    assert data_lib.data_source("mnist") == f"built-in mnist ({data_lib.BUILTINS['mnist'].cache_path})"
    assert data_lib.data_source("./mnist") == str(local_mnist)


def test_the_run_says_and_records_which_data_it_used(local_mnist, mnist, capsys):
    import json

    from aekit.cli import main

    for data, source, out in (("mnist", f"built-in mnist ({data_lib.BUILTINS['mnist'].cache_path})", "builtin"),
                              ("./mnist", str(local_mnist), "local")):
        out = local_mnist.parent / out
        assert main(["train", "--data", data, "--limit", "100", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
        assert capsys.readouterr().out.startswith(f"data: {source}\n")
        config = json.loads((out / "config.json").read_text())
        # A path is recorded absolute, so that resume and evaluate find it from any folder.
        assert config["data"] == (data if data == "mnist" else source) and config["data_source"] == source
        assert config["image_shape"] == ([1, 28, 28] if data == "mnist" else [1, 8, 8])
    # Bad input is refused in its one stderr line, with no data line before it.
    for flags, error in ((["--data", "./nowhere"], "nowhere': not a file or folder"),
                         (["--model", "vae", "--beta", "-1"], "beta must be a non-negative number")):
        assert main(["train", *flags, "--out", str(local_mnist.parent / "bad"), "--quiet"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and error in captured.err and captured.err.count("\n") == 1, captured


# ------------------------------------------------------- a file's channels are what it says

@pytest.mark.parametrize("mode, channels", [("1", 1), ("L", 1), ("LA", 1), ("I;16", 1),
                                            ("RGB", 3), ("RGBA", 3), ("P", 3)])
def test_a_files_channels_are_its_mode_not_its_pixels(tmp_path, mode, channels):
    """A black frame saved as RGB is a colour image (3 channels), whatever its pixels."""
    black = Image.new("I;16" if mode == "I;16" else mode, (6, 4))
    black.save(tmp_path / "black.png")
    image = data_lib.read_image(tmp_path / "black.png", None)
    assert image.shape == ((4, 6) if channels == 1 else (4, 6, 3)) and not image.any()
    x, names = data_lib.read_images(tmp_path / "black.png")
    assert x.shape == (1, *image.shape) and names == ["black.png"]


def test_a_cmyk_or_grey_looking_rgb_jpeg_is_colour(tmp_path, rng):
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.jpg")
    Image.fromarray(grey).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(grey).save(tmp_path / "grey.jpg")
    assert data_lib.read_image(tmp_path / "rgb.jpg", None).shape == (8, 8, 3)
    assert data_lib.read_image(tmp_path / "cmyk.jpg", None).shape == (8, 8, 3)
    assert data_lib.read_image(tmp_path / "grey.jpg", None).shape == (8, 8)


def test_a_set_with_any_colour_file_is_colour_in_memory_and_streamed(tmp_path, rng):
    """One rule for a mixed set, in memory and streamed alike: colour if any file is colour
    (by its mode), the grey files' pixel repeated in R, G and B. The first file is grey, so
    a reader that decides from the first file cannot pass."""
    grey = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    for i, image in enumerate(grey):
        save_png(tmp_path / "mixed" / f"{i}.png", image)
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "9.png")  # a black RGB frame, last
    (xtr, _), (xte, _) = load_dataset(tmp_path / "mixed")
    assert xtr.shape[1:] == xte.shape[1:] == (8, 8, 3)
    train, test, _ = data_lib.open_images(tmp_path / "mixed", stream=True)
    assert train.shape == (len(xtr), 3, 8, 8) and test.shape == (len(xte), 3, 8, 8)
    streamed = torch.cat(list(train.batches(4)))
    assert torch.equal(streamed, data_lib.prepare_images(xtr))


def test_a_split_folder_with_grey_train_and_colour_test_is_colour(tmp_path, rng):
    """train/ grey and test/ colour: one data set, so the same rule as one folder; it used
    to be refused with 'pass resize=(H, W)', which changes sizes, not channels."""
    for i in range(4):
        save_png(tmp_path / "d" / "train" / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    for i in range(2):
        save_png(tmp_path / "d" / "test" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (xtr, _), (xte, _) = load_dataset(tmp_path / "d")
    assert xtr.shape == (4, 8, 8, 3) and xte.shape == (2, 8, 8, 3)
    assert (xtr[..., 0] == xtr[..., 2]).all()  # grey pixels, repeated
    train, test, _ = data_lib.open_images(tmp_path / "d", stream=True)
    assert train.shape == (4, 3, 8, 8) and test.shape == (2, 3, 8, 8)
    assert torch.equal(torch.cat(list(train.batches(3))), data_lib.prepare_images(xtr))


def test_a_split_folder_of_other_sizes_says_resize(tmp_path, rng):
    save_png(tmp_path / "d" / "train" / "0.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    save_png(tmp_path / "d" / "test" / "0.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    with pytest.raises(DataError, match=r"train images are 8x8 but test images are 6x6; pass resize=\(H, W\)"):
        load_dataset(tmp_path / "d")


# ------------------------------------------------------------------- .npz: members read

def test_an_npz_is_read_only_for_the_members_used(tmp_path, rng, monkeypatch):
    """Unused members are never decompressed (a small file can hold huge unused members)."""
    x = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(10), junk1=np.zeros(100_000, np.uint8),
                        junk2=np.zeros(100_000, np.uint8))
    read = []
    real = data_lib.arrays.read_npy
    monkeypatch.setattr(data_lib.arrays, "read_npy", lambda raw, source: read.append(source) or real(raw, source))
    (xtr, ytr), (xte, yte) = load_dataset(tmp_path / "d.npz")
    assert len(xtr) + len(xte) == 10 and sorted(np.concatenate([ytr, yte])) == list(range(10))
    assert sorted(read) == [f"{tmp_path / 'd.npz'}[x]", f"{tmp_path / 'd.npz'}[y]"]
    read.clear()
    images, names = data_lib.read_images(tmp_path / "d.npz")
    np.testing.assert_array_equal(images, x)
    assert read == [f"{tmp_path / 'd.npz'}[x]"]


def test_an_npz_whose_members_together_claim_more_than_memory_is_refused(tmp_path, rng, monkeypatch):
    """The bound is on the members read together, not on each one: two members of 3,600
    bytes each pass a per-member limit of 5,000 bytes, and 7,200 bytes together do not."""
    np.savez_compressed(tmp_path / "d.npz", x_train=np.zeros((100, 6, 6), np.uint8),
                        x_test=np.zeros((100, 6, 6), np.uint8))
    monkeypatch.setattr(data_lib.arrays, "memory_bytes", lambda: 5_000)
    with pytest.raises(DataError, match=r"d\.npz: the sum of its members x_train, x_test claims 7,\d\d\d bytes of "
                                        r"data, more than this machine's memory"):
        load_dataset(tmp_path / "d.npz")


# ------------------------------------------------------------ resize: where it applies

@pytest.fixture
def array_files(tmp_path, rng):
    """The same 20 uint8 12x12 images as .npy, .npz and an IDX file."""
    x = rng.integers(0, 256, (20, 12, 12), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", x)
    np.savez(tmp_path / "u8.npz", x=x)
    write_idx(tmp_path / "u8-idx3-ubyte", x)
    return tmp_path


RESIZE_REFUSED = (r"resize=\(H, W\) applies to image files and folders of images, not to {what}; "
                  r"remove resize=\(H, W\), or save the images as PNG files to resize them")


@pytest.mark.parametrize("name, what", [("u8.npy", r"a \.npy array"), ("u8.npz", r"a \.npz file of arrays"),
                                        ("u8-idx3-ubyte", "an IDX file")])
def test_resize_is_refused_for_arrays_by_every_reader(array_files, name, what):
    path = array_files / name
    message = f"^{path}: " + RESIZE_REFUSED.format(what=what)
    for read in (load_dataset, data_lib.describe, data_lib.read_images, data_lib.open_images):
        with pytest.raises(DataError, match=message):
            read(path, (20, 20))
    if name.endswith(".npy"):
        with pytest.raises(DataError, match=message):
            data_lib.open_images(path, (20, 20), stream=True)


def test_resize_is_refused_for_a_builtin(mnist):
    with pytest.raises(DataError, match="^mnist: " + RESIZE_REFUSED.format(what="a built-in data set")):
        data_lib.open_images("mnist", (20, 20))


def test_cli_refuses_resize_for_an_npy_in_one_line_and_writes_no_run(array_files, capsys):
    from aekit.cli import main

    from conftest import one_error_line

    npy = str(array_files / "u8.npy")
    assert main(["data", "info", npy, "--resize", "20", "20"]) == 2
    line = one_error_line(capsys)
    assert line.endswith("u8.npy: --resize H W applies to image files and folders of images, not to a .npy array; "
                         "remove --resize H W, or save the images as PNG files to resize them")
    assert main(["train", "--data", npy, "--resize", "20", "20", "--epochs", "1", "--quiet",
                 "--out", str(array_files / "run")]) == 2
    assert "--resize H W applies to image files" in one_error_line(capsys)
    assert not (array_files / "run").exists()


def test_a_resized_run_evaluates_on_an_array_of_its_size(tmp_path, rng, capsys):
    """A run's resize brings other image folders to its size; an array must have it already
    (and is not refused for a resize the user never passed to evaluate)."""
    from aekit.cli import main

    for i in range(20):
        save_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (20, 8, 8), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--resize", "8", "8", "--epochs", "1", "--quiet",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    for data in ("x.npy", "imgs"):
        assert main(["evaluate", str(run), "--data", str(tmp_path / data)]) == 0, capsys.readouterr().err


def test_resize_still_applies_to_image_files_and_folders(tmp_path, rng):
    for i in range(3):
        save_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    assert data_lib.describe(tmp_path / "imgs", (20, 16))["train"]["shape"][1:] == [20, 16]
    assert data_lib.read_images(tmp_path / "imgs" / "0.png", (20, 16))[0].shape == (1, 20, 16)


# ---------------------------------------------------------------- the scores' CSV file

def test_score_csv_writes_any_file_name_and_no_formulas(tmp_path):
    """A name that is not UTF-8 (os.fsdecode's surrogate escapes) is written with its odd
    bytes as \\xNN; a name a spreadsheet would run as a formula gets a leading quote."""
    import csv

    from aekit.anomaly import write_scores

    names = [os.fsdecode(b"caf\xe9.png"), '=HYPERLINK("http://x","y").png', "+1.png", "-1.png", "@SUM(A1).png",
             "\tx.png", "plain.png", "a=b.png", "\ud800.png"]
    rows = [{"name": name, "reconstruction_error": 0.5, "score": -0.5, "is_outlier": False} for name in names]
    write_scores(rows, tmp_path / "s.csv")
    text = (tmp_path / "s.csv").read_bytes().decode("utf-8")  # valid UTF-8
    written = [row["name"] for row in csv.DictReader(io.StringIO(text))]
    assert written == ["caf\\xe9.png", '\'=HYPERLINK("http://x","y").png', "'+1.png", "'-1.png", "'@SUM(A1).png",
                       "'\tx.png", "plain.png", "a=b.png", "\\ud800.png"]  # a surrogate no byte stands for


# --------------------------------------------------------- the collapse warning's advice

def test_the_collapse_warning_of_a_diverging_pca_conv_suggests_what_it_offers(mnist, monkeypatch):
    """pca-conv trains on MSE only: the advice is to lower lr, never loss="bce". Whether lr
    0.99 has collapsed after one epoch depends on the order of floating-point sums (threads,
    the CPU), so the evaluation is made to report a collapse: this tests what fit says."""
    import dataclasses
    import warnings

    from aekit import training
    from aekit.config import TrainConfig
    from aekit.collapse import CollapseWarning
    from aekit.start import new_model
    from aekit.training import fit

    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: dataclasses.replace(real(*a, **k), collapsed=True))
    config = TrainConfig(model="pca-conv", lr=0.99, epochs=1, batch_size=64, image_shape=(1, 28, 28)).resolved()
    (x_train, _), _ = mnist
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(new_model(config), x_train[:256], x_train[256:320], config, progress=False)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert message.startswith("epoch 1: the reconstructions are nearly constant")
    assert "bce" not in message and "sigmoid + MSE" not in message
    assert "lr=0.99 is above every recipe's (at most 0.003): lower lr" in message


def test_the_collapse_advice_fits_the_model_and_lr():
    from aekit.models import build_model
    from aekit.collapse import COLLAPSE_HINT, collapse_hint

    seed, pca = build_model("seed", (1, 8, 8)), build_model("pca-conv", (1, 8, 8), latent_dim=2)
    assert collapse_hint(seed, "mse", 1e-3) == COLLAPSE_HINT
    assert 'loss="bce"' in collapse_hint(seed, "mse", 0.5) and "lower lr" in collapse_hint(seed, "mse", 0.5)
    assert "bce" not in collapse_hint(pca, "mse", 1e-3) and "bce" not in collapse_hint(pca, "mse", 0.5)
    assert "lower lr" in collapse_hint(seed, "bce", 0.5)
    assert "bce" not in collapse_hint(seed, "bce", 3e-3)  # a run on bce already is not told to use it
