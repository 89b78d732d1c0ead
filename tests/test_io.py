"""Atomic, durable writes: the data reaches the disk before the rename, the rename after.

A power cut is not something a test can pull, so these tests check the order of the
system calls that make a write survive one: fsync of the new file (every file of a new
folder) before it is renamed over the real name, fsync of the folder after the rename.
"""

import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from aekit import _io


@pytest.fixture
def calls(monkeypatch):
    """Every fsync (by the path its descriptor names) and rename, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        log.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_a_file_reaches_the_disk_before_its_rename_and_the_folder_after(tmp_path, calls):
    target = tmp_path / "config.json"
    _io.write_text_atomic(target, "{}\n")
    assert target.read_text() == "{}\n"
    renames = [c for c in calls if c[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == target
    tmp = renames[0][1]
    rename_at = calls.index(renames[0])
    assert ("fsync", tmp) in calls[:rename_at], calls          # the data, under the temporary name
    assert ("fsync", tmp_path) in calls[rename_at + 1:], calls  # the new name in its folder


def test_every_file_of_a_new_folder_reaches_the_disk_before_the_swap(tmp_path, calls):
    target = tmp_path / "maps"
    with _io.atomic_folder(target) as staging:
        (staging / "a.png").write_bytes(b"a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.png").write_bytes(b"b")
    swap = next(c for c in calls if c[0] == "replace" and c[2] == target)
    staging, swap_at = swap[1], calls.index(swap)
    before = {c[1] for c in calls[:swap_at] if c[0] == "fsync"}
    assert {staging / "a.png", staging / "sub" / "b.png", staging / "sub", staging} <= before, calls
    assert ("fsync", tmp_path) in calls[swap_at + 1:], calls
    assert (target / "sub" / "b.png").read_bytes() == b"b"


def test_a_new_folder_entry_is_flushed(tmp_path, calls):
    _io.make_folder(tmp_path / "run")
    assert ("fsync", tmp_path) in calls
    calls.clear()
    _io.make_folder(tmp_path / "run")  # already there: nothing to flush
    assert calls == []


def test_a_failed_write_leaves_nothing_and_flushes_nothing_under_the_real_name(tmp_path, calls):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), _io.atomic_path(target):
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old"
    assert not [c for c in calls if c[0] == "replace"]
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_new_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with _io.atomic_folder(tmp_path / "maps") as staging:
            (staging / "a.png").write_bytes(b"a")
    finally:
        os.umask(umask)
    assert (tmp_path / "maps").stat().st_mode & 0o777 == 0o755  # mkdtemp's own 0700 was private


# ------------------------------------------------------------------ refusing to overwrite

@pytest.mark.parametrize("names, kwargs, message", [
    (["a.csv"], {}, "{tmp}/a.csv already exists; pass overwrite=True to replace it, or choose another path"),
    (["run/config.json", "run/metrics.json"], {"what": "a run", "other": "resume=True to continue it"},
     "{tmp}/run already holds a run (config.json, metrics.json); pass resume=True to continue it, "
     "overwrite=True to replace it, or choose another folder"),
    (["out/encoder.onnx", "out/model.onnx"], {},
     "{tmp}/out already holds encoder.onnx, model.onnx; pass overwrite=True to replace them, "
     "or choose another folder"),
    (["a.csv", "maps/x"], {}, "{tmp}/a.csv, {tmp}/maps/x already exist; pass overwrite=True to replace them"),
])
def test_refuse_existing_names_what_is_there_and_the_parameter(names, kwargs, message, tmp_path):
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    with pytest.raises(_io.AlreadyExists) as caught:
        _io.refuse_existing(*paths, tmp_path / "not-there", None, overwrite=False, **kwargs)
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    _io.refuse_existing(*paths, overwrite=True, **kwargs)  # asked for: nothing to refuse
    _io.refuse_existing(tmp_path / "not-there", None, overwrite=False)  # nothing there


def _tree(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) with its bytes; folders as None."""
    if path.is_file():
        return {path: path.read_bytes()}
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _scores(area, request):
    from aekit.anomaly import write_scores

    rows = [{"name": "a.png", "reconstruction_error": 0.5, "score": -0.5, "is_outlier": True}]
    target = area / "scores.csv"
    target.write_text("mine")
    return target, lambda overwrite: write_scores(rows, target, overwrite=overwrite)


def _heatmaps(area, request):
    from aekit.anomaly import write_heatmaps
    from aekit.estimator import ConvAutoencoder

    estimator = ConvAutoencoder.load(request.getfixturevalue("small_run"))
    x = request.getfixturevalue("mnist")[1][0][:2]  # two test digits (2, 28, 28) uint8
    target = area / "maps"
    target.mkdir()
    (target / "mine.png").write_text("mine")
    return target, lambda overwrite: write_heatmaps(estimator, x, ["a", "b"], target, overwrite=overwrite)


def _comparison(area, request):
    from aekit.compare import write_comparison

    rows = [{"method": method, "latent_dim": 2, "test_mse": mse, "test_sse_per_image": mse * 784,
             "knn_accuracy": None, "fit_seconds": 1.0} for method, mse in (("autoencoder", 0.02), ("pca", 0.04))]
    (area / "compare.md").write_text("mine")
    return area, lambda overwrite: write_comparison(rows, area, overwrite=overwrite)


def _run_copy(area, request) -> Path:
    import shutil

    return Path(shutil.copytree(request.getfixturevalue("small_run"), area / "run"))


def _report(area, request):
    from aekit.report import write_report

    run = _run_copy(area, request)
    (run / "report.html").write_text("mine")
    return run / "report.html", lambda overwrite: write_report(run, noise=None, overwrite=overwrite)


def _onnx(area, request):
    from conftest import need

    from aekit.export import export_onnx

    need(all(find_spec(name) for name in ("onnx", "onnxscript")), "onnx, onnxscript not installed")
    run = _run_copy(area, request)
    (area / "onnx").mkdir()
    (area / "onnx" / "encoder.onnx").write_text("mine")
    return area / "onnx", lambda overwrite: export_onnx(run, area / "onnx", overwrite=overwrite)


def _estimator(area, request):
    from aekit.estimator import ConvAutoencoder

    estimator = ConvAutoencoder.load(request.getfixturevalue("small_run"))
    (area / "est").mkdir()
    (area / "est" / "estimator.json").write_text("mine")  # an earlier save's; the user's own files are kept
    return area / "est", lambda overwrite: estimator.save(area / "est", overwrite=overwrite)


def _run(area, request):
    from aekit.experiment import train_and_evaluate
    from aekit.config import TrainConfig

    request.getfixturevalue("mnist")
    (area / "run").mkdir()
    (area / "run" / "metrics.json").write_text("mine")
    config = TrainConfig(limit=100, epochs=1, device="cpu")
    return area / "run", lambda overwrite: train_and_evaluate(config, area / "run", overwrite=overwrite,
                                                              progress=False)


def _images(area, request):
    import numpy as np

    from aekit.data import write_images

    (area / "clean").mkdir()
    (area / "clean" / "0.png").write_text("mine")
    x = np.zeros((2, 4, 4), np.uint8)
    return area / "clean", lambda overwrite: write_images(x, ["0", "1"], area / "clean", overwrite=overwrite)


def _figure(area, request):
    import torch

    from aekit.models import SeedAutoencoder
    from aekit.plots import save_reconstructions

    (area / "recon.png").write_text("mine")
    x = torch.rand(2, 1, 28, 28)
    return area / "recon.png", lambda overwrite: save_reconstructions(SeedAutoencoder(), x, area / "recon.png",
                                                                      overwrite=overwrite)


# Every library call that writes where the user names, and a target already there.
WRITERS = {"anomaly.write_scores": _scores, "anomaly.write_heatmaps": _heatmaps,
           "compare.write_comparison": _comparison, "report.write_report": _report,
           "export.export_onnx": _onnx, "ConvAutoencoder.save": _estimator,
           "experiment.train_and_evaluate": _run, "data.write_images": _images,
           "plots.save_reconstructions (and every plots.save_*)": _figure}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_keeps_what_is_there_unless_overwrite(writer, tmp_path, request):
    area = tmp_path / "area"
    area.mkdir()
    target, write = WRITERS[writer](area, request)
    before = _tree(area)
    refused = r"already (exists|holds .*); pass (resume=True to continue it, )?overwrite=True"
    with pytest.raises(_io.AlreadyExists, match=refused) as caught:
        write(overwrite=False)
    assert "\n" not in str(caught.value) and "--" not in str(caught.value)
    assert _tree(area) == before  # byte for byte, and nothing added beside it
    write(overwrite=True)
    assert "mine".encode() not in _tree(target).values()


# ----------------------------------------------- what overwrite=True may replace (Trust II, 14)

def test_overwrite_replaces_a_folder_only_when_aekit_wrote_all_of_it(tmp_path):
    import numpy as np

    from aekit.data import write_images

    x = np.zeros((2, 4, 4), np.uint8)
    out = tmp_path / "keep"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.npy").write_text("mine")
    (out / "notes.txt").write_text("mine")
    (out / "0.png").write_text("an earlier write_images")
    before = _tree(tmp_path)
    with pytest.raises(ValueError) as caught:
        write_images(x, ["0", "1"], out, overwrite=True)
    assert str(caught.value).startswith(f"{out} holds files aekit did not write (notes.txt, sub/), which "
                                        "overwrite=True would delete with the folder; move them elsewhere")
    assert _tree(tmp_path) == before  # nothing deleted, nothing staged left beside it
    (out / "notes.txt").unlink()
    (out / "sub" / "data.npy").unlink()
    (out / "sub").rmdir()
    write_images(x, ["0", "1"], out, overwrite=True)  # only aekit's own files: replaced
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]


@pytest.mark.parametrize("where, what", [(".", "the current folder"),
                                         ("..", "a folder that holds the current folder")])
def test_overwrite_never_replaces_the_current_folder_or_one_above_it(tmp_path, monkeypatch, where, what):
    import numpy as np

    from aekit.data import write_images

    work = tmp_path / "work"
    work.mkdir()
    (work / "a.png").write_text("the user's")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=f"^{where} is {what}, which aekit would replace whole; name a new"):
        write_images(np.zeros((2, 4, 4), np.uint8), ["0", "1"], where, overwrite=True)
    assert _tree(tmp_path) == before and Path.cwd() == work


def test_a_folder_another_process_writes_into_is_not_replaced(tmp_path):
    """An estimator saved over a run folder while `aekit train` writes into it is refused;
    a lock file a killed process left blocks nothing."""
    import numpy as np

    from aekit.data import write_images

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("a training's")
    x = np.zeros((2, 4, 4), np.uint8)
    with _io.folder_lock(out, "another training (pid 1)"):
        with pytest.raises(ValueError, match=r"run: another training \(pid 1\) is writing into this folder; wait"):
            write_images(x, ["0", "1"], out, overwrite=True)
        assert (out / "config.json").read_text() == "a training's"
    (out / _io.LOCK_NAME).write_text("another training (pid 1), killed")
    write_images(x, ["0", "1"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]


def test_aekit_errors_survive_a_copy_and_a_pickle():
    """scikit-learn's ``n_jobs`` and multiprocessing send a worker's error to the parent by
    pickling it: an error whose constructor takes other arguments than its message came
    back as a TypeError instead."""
    import copy
    import errno
    import pickle

    from aekit.experiment import ResumeMismatch

    errors = [_io.WriteError(Path("/runs/a/config.json"), OSError(errno.ENOSPC, "No space left on device")),
              ResumeMismatch(Path("runs/a"), "lr", 0.1, 0.001)]
    for error in errors:
        for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
            assert type(again) is type(error) and str(again) == str(error)
    assert pickle.loads(pickle.dumps(errors[0])).errno == errno.ENOSPC
    assert pickle.loads(pickle.dumps(errors[1])).field == "lr"
