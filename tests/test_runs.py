"""The run folder under attack: damaged or edited files, full and read-only disks, kill -9, Ctrl-C.

Each refusal is checked through the CLI (one stderr line, exit 2) and leaves the last good
checkpoint as it was.
"""

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import aekit
from aekit import experiment, runs, weights
from aekit._io import LOCK_NAME, TMP_SUFFIX, sha256_file
from aekit.cli import main
from aekit.estimator import ConvAutoencoder
from aekit.models import SeedAutoencoder
from aekit.runs import CHECKPOINT, CONFIG, METRICS, WEIGHTS
from aekit.config import TrainConfig
from aekit.start import make_optimizer
from aekit.weights import load_checkpoint, load_model, saved_progress

from conftest import need, one_error_line


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One thread here (conftest's default is two): these tests start training processes
    # beside in-process runs and compare weights bitwise; on a busy two-core machine two
    # threads per process slow OpenMP down many times over.
    torch.set_num_threads(1)
    yield


def train(out, *flags: str) -> int:
    return main(["train", "--model", "seed", "--limit", "300", "--epochs", "2", "--out", str(out), "--quiet", *flags])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("runs") / "done"
    torch.set_num_threads(1)
    assert train(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, for a test to damage."""
    return shutil.copytree(finished_run, tmp_path / "run")


def weights_of(path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()
            if not k.startswith("optim.")}


def no_temporaries(folder) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX)]


# ---------------------------------------------------------------- checksums and metadata

def test_run_records_the_weights_checksum_and_config(finished_run):
    metrics = json.loads((finished_run / METRICS).read_text())
    assert metrics["weights_sha256"] == sha256_file(finished_run / WEIGHTS)
    with safe_open(str(finished_run / WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "aekit-weights-1" and meta["aekit_version"] == aekit.__version__
    assert meta["tensors_sha256"] == weights.tensors_sha256(tensors)
    recorded = json.loads(meta["config"])
    config = json.loads((finished_run / CONFIG).read_text())
    assert recorded == {k: v for k, v in config.items() if k != "aekit_version"}


def test_tensors_checksum_sees_every_byte_name_and_shape():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    digest = weights.tensors_sha256(a)
    assert digest == weights.tensors_sha256({"w": a["w"].clone()})
    flipped = a["w"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # one bit of one float
    for other in ({"w": flipped}, {"v": a["w"]}, {"w": a["w"].reshape(3, 2)}, {"w": a["w"].double()}):
        assert weights.tensors_sha256(other) != digest


def flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (flip_last_byte, "checksum mismatch: the weights file is damaged"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "cannot read the weights"),
    (lambda p: p.write_bytes(b""), "cannot read the weights"),
    (lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "), "no aekit version recorded"),
])
def test_damaged_weights_give_one_line(run_copy, capsys, damage, message):
    damage(run_copy / WEIGHTS)
    (run_copy / METRICS).unlink()  # so the weights' own checks speak, not metrics.json's checksum
    for argv in (["evaluate", str(run_copy)],
                 ["reconstruct", str(run_copy), "--out", str(run_copy / "r.png")]):
        assert main(argv) == 2
        assert message in one_error_line(capsys)
    assert not (run_copy / "r.png").exists()


def test_damaged_weights_are_caught_by_the_recorded_checksum_too(run_copy, capsys):
    flip_last_byte(run_copy / WEIGHTS)
    assert main(["evaluate", str(run_copy)]) == 2
    assert "is not the file this run wrote" in one_error_line(capsys)


def test_weights_from_another_run_are_noticed(run_copy, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other, "--seed", "1") == 0
    shutil.copy(other / WEIGHTS, run_copy / WEIGHTS)
    assert main(["evaluate", str(run_copy)]) == 2
    assert "model.safetensors is not the file this run wrote" in one_error_line(capsys)
    # without metrics.json the weights' own record of their config still tells
    (run_copy / METRICS).unlink()
    assert main(["evaluate", str(run_copy)]) == 2
    assert "the weights was made with \"seed\": 1, but the run's config.json now says \"seed\": 0" in one_error_line(capsys)


@pytest.mark.parametrize("edit, message", [
    ({"image_shape": [1, 32, 32]}, "made with \"image_shape\": [1, 28, 28], but the run's config.json now says \"image_shape\": [1, 32, 32]"),
    ({"lr": 0.01}, "now says \"lr\": 0.01"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"seed": "zero"}, "config.seed must be int, got 'zero'"),
    ({"lr": 10 ** 400}, "config.lr must be a number a float can hold"),
    ({"image_shape": [1, -28, 28]}, "image_shape must be 3 positive ints"),
    ({"colour": "blue"}, "unknown fields ['colour']; was it made by a newer aekit?"),
    ({"aekit_version": "99.1.0"}, "was made by aekit 99.1.0, this is aekit"),
    ({"aekit_version": None}, "no aekit version recorded"),
])
def test_edited_config_gives_one_line(run_copy, capsys, edit, message):
    config = json.loads((run_copy / CONFIG).read_text())
    (run_copy / CONFIG).write_text(json.dumps({**config, **edit}))
    assert main(["evaluate", str(run_copy)]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b"\xff\xfe", b"[" * 100_000, b"{}"])
def test_unreadable_config_gives_one_line(run_copy, capsys, raw):
    (run_copy / CONFIG).write_bytes(raw)
    assert main(["evaluate", str(run_copy)]) == 2
    assert "config.json" in one_error_line(capsys)


def test_run_made_by_a_newer_aekit(run_copy, capsys, monkeypatch):
    model, config = load_model(run_copy, device="cpu")
    optimizer = make_optimizer(model, config)
    state = load_checkpoint(model, optimizer, run_copy / CHECKPOINT, config)
    monkeypatch.setattr(aekit, "__version__", "0.9.0")  # as a newer aekit would write them:
    weights.save_weights(model, run_copy / WEIGHTS, config)
    weights.save_checkpoint(model, optimizer, state, run_copy / CHECKPOINT, config)
    monkeypatch.undo()
    (run_copy / METRICS).unlink()
    assert main(["evaluate", str(run_copy)]) == 2
    assert f"was made by aekit 0.9.0, this is aekit {aekit.__version__}; upgrade aekit" in one_error_line(capsys)
    before = (run_copy / WEIGHTS).read_bytes()
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--quiet"]) == 2
    assert f"{CHECKPOINT} was made by aekit 0.9.0" in one_error_line(capsys)
    assert (run_copy / WEIGHTS).read_bytes() == before


def test_resume_refuses_a_checkpoint_that_no_longer_matches(run_copy, capsys):
    config = json.loads((run_copy / CONFIG).read_text())
    (run_copy / CONFIG).write_text(json.dumps({**config, "lr": 0.01}))
    before = (run_copy / CHECKPOINT).read_bytes()
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--quiet"]) == 2
    assert "the checkpoint was made with \"lr\": 0.003, but the run's config.json now says \"lr\": 0.01" in one_error_line(capsys)
    flip_last_byte(run_copy / CHECKPOINT)
    (run_copy / CONFIG).write_text(json.dumps(config))
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--quiet"]) == 2
    assert "checksum mismatch: the checkpoint file is damaged" in one_error_line(capsys)
    assert (run_copy / CHECKPOINT).read_bytes() != before and no_temporaries(run_copy)


# ------------------------------------------------------------------ full and read-only disks

ENOSPC_FROM_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, mnist, capsys, monkeypatch):
    """Simulated: the second checkpoint write fills the disk half-way, as safetensors reports it.

    (A real full disk is tested below where tmpfs can be mounted.)
    """
    out = tmp_path / "run"
    real_save = weights.save_file
    saved = {}

    def save_file(tensors, filename, metadata=None):
        if metadata["format"] == "aekit-checkpoint-1" and (out / CHECKPOINT).exists():
            saved["epoch 1"] = (out / CHECKPOINT).read_bytes()
            with open(filename, "wb") as f:
                f.write(b"half a checkpoint")
            raise SafetensorError(ENOSPC_FROM_SAFETENSORS)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", save_file)
    assert train(out) == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / CHECKPOINT} (" in line and "No space left on device" in line
    assert "free some disk space" in line and "any earlier checkpoint.safetensors is intact" in line
    assert (out / CHECKPOINT).read_bytes() == saved["epoch 1"]
    assert no_temporaries(out) and not (out / WEIGHTS).exists()
    monkeypatch.setattr(weights, "save_file", real_save)
    assert saved_progress(out)[0] == 1
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # space freed: go on
    assert saved_progress(out)[0] == 2


@pytest.mark.parametrize("errno_name, fix", [("EROFS", "the file system is read-only"),
                                              ("EACCES", "you may not write there")])
def test_read_only_folder_gives_one_line(tmp_path, mnist, capsys, monkeypatch, errno_name, fix):
    """Simulated with a failing mkstemp: these tests run as root, whom chmod does not stop."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "run"
    assert train(out) == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / CONFIG}" in line and fix in line
    assert not out.exists()  # the folder the training made, removed with its lock file


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A real small file system at ``path``; skips where mounting is not allowed (fails
    under CI=true, where it must run)."""
    path.mkdir()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    need(mounted, "cannot mount a tmpfs here (needs root in a system that allows mounts); "
                  "the simulated full-disk and read-only tests above still ran")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_then_read_only_disk(tmp_path, mnist, capsys):
    with tmpfs(tmp_path / "disk", "100k") as disk:
        out = disk / "run"
        # A checkpoint is ~58 kB: the first fits, writing the second beside it does not.
        assert train(out) == 2
        line = one_error_line(capsys)
        assert "No space left on device" in line and CHECKPOINT in line
        assert saved_progress(out)[0] == 1 and no_temporaries(out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = (out / CHECKPOINT).read_bytes()
        assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
        assert "the file system is read-only" in one_error_line(capsys)
        assert (out / CHECKPOINT).read_bytes() == before


# --------------------------------------------------------------------- kill -9 and Ctrl-C

# `python -c TRIGGER MODULE NAME K SIGNAL train ...`: the aekit command, with MODULE.NAME
# wrapped so that the process sends itself SIGNAL as soon as the K-th call has returned.
# The signal lands on an event of the run (a step, a write), never after a guessed sleep.
TRIGGER = """
import importlib, os, signal, sys
from aekit.cli import main
from aekit.estimator import ConvAutoencoder

module_name, name, at, sig = sys.argv[1:5]
module = importlib.import_module(module_name)
original, calls = getattr(module, name), [0]

def counted(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(at):
        os.kill(os.getpid(), getattr(signal, sig))
    return result

setattr(module, name, counted)
sys.exit(main(sys.argv[5:]))
"""


def train_until(out, at: tuple[str, str, int], sig: str, *flags: str) -> tuple[int, str]:
    """Run ``aekit train --out out flags`` in a process of its own that signals itself with
    ``sig`` after call number k of ``at = (module, function, k)``; its exit code and stderr."""
    # The same thread count as the in-process runs, so that sums agree bitwise.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    module, name, k = at
    process = subprocess.run([sys.executable, "-c", TRIGGER, module, name, str(k), sig,
                              "train", "--out", str(out), "--quiet", *flags],
                             env=env, capture_output=True, text=True, timeout=600)
    return process.returncode, process.stderr


def train_until_in_this_process(out, at: tuple[str, str, int], sig: str, *flags: str, monkeypatch,
                                capsys) -> tuple[int, str]:
    """:func:`train_until` without a process of its own (no second import of PyTorch): the
    signal reaches this process, as a Ctrl-C reaches the foreground one."""
    module, name, k = at
    module, calls = importlib.import_module(module), [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), getattr(signal, sig))
        return result

    torch.set_num_threads(1)  # as train_until's process and straight_run
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(module, name, counted)
        code = main(["train", "--out", str(out), "--quiet", *flags])
    return code, capsys.readouterr().err


SMALL = ("--model", "seed", "--limit", "600", "--epochs", "2")  # 19 steps of 32 images per epoch


def step(k: int) -> tuple[str, str, int]:
    """The moment training step k (counted from 1 over the whole run) has been taken."""
    return ("aekit.training", "train_step", k)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mnist):
    """The run folder of ``aekit train FLAGS`` never interrupted, trained once per FLAGS."""
    made = {}

    def run(*flags: str):
        if flags not in made:
            out = tmp_path_factory.mktemp("straight") / "run"
            torch.set_num_threads(1)
            assert main(["train", "--out", str(out), "--quiet", *flags]) == 0
            made[flags] = out
        return made[flags]

    return run


def assert_same_run(expected, resumed) -> None:
    """The same weights bit for bit, and the same losses in the history."""
    a, b = weights_of(expected / WEIGHTS), weights_of(resumed / WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # exact, not approximate
    losses = [[row.split(",")[:4] for row in (run / "history.csv").read_text().splitlines()]
              for run in (expected, resumed)]
    assert losses[0] == losses[1]  # epoch, loss, val_loss, val_mse
    assert json.loads((expected / METRICS).read_text())["epochs"] == json.loads((resumed / METRICS).read_text())["epochs"]


@pytest.fixture(scope="module")
def npy_images(tmp_path_factory, mnist):
    path = tmp_path_factory.mktemp("npy") / "digits.npy"
    np.save(path, mnist[0][0][:1000])  # 900 train images after the holdout, 600 with --limit
    return path


@pytest.mark.parametrize("case, at, saved, where", [
    ("first epoch", step(5), (0, 5), "epoch 1, step 5 of 19"),
    ("late, denoising", step(19 + 17), (1, 17), "epoch 2, step 17 of 19"),
    ("streamed", step(19 + 11), (1, 11), "epoch 2, step 11 of 19"),
    ("between epochs", ("aekit.experiment", "write_history", 1), (1, 0), "1 complete epoch"),
], ids=["first-epoch", "late-denoising", "streamed", "between-epochs"])
@pytest.mark.heavy
def test_ctrl_c_saves_the_step_reached_and_resume_ends_bit_for_bit(tmp_path, straight_run, npy_images, monkeypatch,
                                                                   capsys, case, at, saved, where):
    """Ctrl-C mid-epoch: the checkpoint holds that very step (weights, Adam, the epoch's
    loss so far; the shuffle, noise and learning rate follow from the step), and resuming
    from it ends exactly where a run never interrupted ends. The first case is a command in
    a process of its own, as a user runs it; the others train in this process."""
    flags = {"late, denoising": ("--noise", "gaussian:0.3"),
             "streamed": ("--data", str(npy_images), "--stream")}.get(case, ()) + SMALL
    out = tmp_path / "run"
    if case == "first epoch":
        code, err = train_until(out, at, "SIGINT", *flags)
    else:
        code, err = train_until_in_this_process(out, at, "SIGINT", *flags, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130, err
    assert err.strip().splitlines() == [
        f"aekit: interrupted; {where} saved in {out / CHECKPOINT}; resume with: aekit train --out {out} --resume"]
    assert no_temporaries(out) and not (out / WEIGHTS).exists()
    model, config = SeedAutoencoder(), runs.read_config(out)
    state = load_checkpoint(model, make_optimizer(model, config), out / CHECKPOINT, config)
    assert (state.epoch, state.step) == saved
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert_same_run(straight_run(*flags), out)


def test_resume_refuses_to_end_before_the_epoch_a_checkpoint_is_in(tmp_path, mnist, capsys, monkeypatch):
    out = tmp_path / "run"  # Ctrl-C as step 12 (epoch 2 of 10 steps) returns
    code, err = train_until_in_this_process(out, step(12), "SIGINT", "--limit", "300", "--epochs", "2",
                                            monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130
    assert f"epoch 2, step 2 of 10 saved in {out / CHECKPOINT}" in err
    before = (out / CHECKPOINT).read_bytes()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1", "--quiet"]) == 2
    assert one_error_line(capsys).endswith(f"{out / CHECKPOINT} stopped part-way through epoch 2; "
                                           "pass --epochs 2 or more to finish it")
    assert (out / CHECKPOINT).read_bytes() == before and not (out / WEIGHTS).exists()


def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(tmp_path, straight_run):
    killed = tmp_path / "killed"
    code, _ = train_until(killed, step(19 + 7), "SIGKILL", *SMALL)
    assert code == -signal.SIGKILL
    assert saved_progress(killed)[0] == 1  # the end of epoch 1: a kill leaves no time to save more
    assert not (killed / WEIGHTS).exists()
    assert main(["train", "--out", str(killed), "--resume", "--quiet"]) == 0
    assert_same_run(straight_run(*SMALL), killed)


def test_resume_clears_what_a_killed_write_left(run_copy, mnist):
    leftovers = [run_copy / f".{CHECKPOINT}.k3j9x{TMP_SUFFIX}", run_copy / f".{WEIGHTS}.a1b2c{TMP_SUFFIX}"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (run_copy / "notes.txt.tmp").write_text("the user's own")  # not aekit's: kept
    assert main(["train", "--out", str(run_copy), "--resume", "--quiet"]) == 0
    assert not any(p.exists() for p in leftovers)
    assert (run_copy / "notes.txt.tmp").exists()


def test_ctrl_c_before_the_first_epoch(tmp_path, mnist, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "fit", interrupt)
    out = tmp_path / "run"
    assert train(out) == 130
    # Nothing trained, nothing to resume: the training leaves no folder behind.
    assert capsys.readouterr().err.strip() == "aekit: interrupted before training started; nothing was saved"
    assert not out.exists()


def test_the_cli_keeps_freed_memory_for_the_process(tmp_path, mnist, monkeypatch):
    """glibc's mallopt is the command's process-wide choice (the library never makes it)."""
    import ctypes

    from aekit import fast

    loaded = []
    monkeypatch.setattr(fast, "_KEPT", False)  # as in a fresh process
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: loaded.append(name))
    assert main(["train", "--limit", "100", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert loaded == ["libc.so.6"]


def test_config_round_trip_through_from_dict(tmp_path):
    config = TrainConfig(image_shape=(1, 28, 28), resize=(28, 28)).resolved()
    runs.save_config(config, tmp_path)
    assert runs.read_config(tmp_path) == config


def test_overwrite_removes_what_other_commands_wrote_about_the_old_weights(run_copy, capsys):
    """report.html, estimator.json and ONNX files describe a run's weights: a run trained
    anew over the folder removes them, and without --overwrite their presence refuses."""
    from aekit.runs import DERIVED_FILES

    for name in DERIVED_FILES:
        (run_copy / name).write_text("of the old weights")
    for name in ("config.json", "model.safetensors", "metrics.json", "history.csv", "checkpoint.safetensors",
                 "reconstructions.png"):
        (run_copy / name).unlink()
    assert train(run_copy) == 2
    assert "already holds a run (estimator.json, report.html" in one_error_line(capsys)
    assert train(run_copy, "--overwrite") == 0
    assert not [name for name in DERIVED_FILES if (run_copy / name).exists()]


# `aekit train --limit 500 --epochs 1 --seed 0` by aekit 0.1.0 (commit 2ed06ec), whose
# models named the encoder and decoder g_a and g_s; its checkpoint and weights files carry
# those names and their checksums.
RUN_0_1 = Path(__file__).parent / "data" / "run-0.1.0"


def test_a_run_folder_from_aekit_0_1_loads_and_resumes(tmp_path, mnist):
    run = Path(shutil.copytree(RUN_0_1, tmp_path / "old"))
    with safe_open(str(run / WEIGHTS), framework="pt") as f:
        assert {name.split(".")[0] for name in f.keys()} == {"g_a", "g_s"}
    written = load_file(run / WEIGHTS)
    model, config = load_model(run)
    state = model.state_dict()
    assert len(state) == len(written)
    for name, tensor in written.items():
        today = name.replace("g_a.", "encoder.", 1).replace("g_s.", "decoder.", 1)
        assert torch.equal(state[today], tensor), name
    assert main(["evaluate", str(run)]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert saved_progress(run)[0] == 2
    with safe_open(str(run / WEIGHTS), framework="pt") as f:
        assert {name.split(".")[0] for name in f.keys()} == {"encoder", "decoder"}
    load_model(run)


# `aekit train --data mnist --limit 300 --epochs 1 --seed 0` with `--model conv --latent-dim 3
# --widths 4` by aekit 0.2.0 (cdb2c19^), and with `--model vae --latent-dim 2 --widths 4 --beta
# 0.5` by aekit 0.3.0 (0cf5d6b): their config.json and the configs inside their weights hold
# the model's options as fields of their own, where aekit 0.4 records model_params.
OLD_RUNS = {"0.2.0": {"latent_dim": 3, "widths": (4,)}, "0.3.0": {"latent_dim": 2, "widths": (4,), "beta": 0.5}}
# Options a family gained after the run was written, at the value that means what the run did
# (the VAE of 0.3 modelled grey levels, binarize off, and trained on the ELBO, one sample,
# under the prior N(0, I)).
ADDED_SINCE = {"0.2.0": {}, "0.3.0": {"binarize": False, "importance_samples": 1, "prior_components": 0}}


@pytest.mark.parametrize("version", sorted(OLD_RUNS))
def test_a_run_folder_from_aekit_0_2_and_0_3_loads_and_resumes(version, tmp_path, mnist):
    run = Path(shutil.copytree(Path(__file__).parent / "data" / f"run-{version}", tmp_path / "old"))
    recorded = json.loads((run / CONFIG).read_text())
    assert recorded["aekit_version"] == version and "model_params" not in recorded
    written = load_file(run / WEIGHTS)
    model, config = load_model(run)
    assert config.model_params == {**OLD_RUNS[version], **ADDED_SINCE[version]}
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in written.items())
    est = ConvAutoencoder.load(run)
    assert (est.latent_dim, est.widths, est.model_params) == (OLD_RUNS[version]["latent_dim"], (4,), None)
    assert est.beta == OLD_RUNS[version].get("beta")
    assert main(["evaluate", str(run)]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert saved_progress(run)[0] == 2
    resumed = json.loads((run / CONFIG).read_text())
    assert "latent_dim" not in resumed
    assert resumed["model_params"] == json.loads(json.dumps({**OLD_RUNS[version], **ADDED_SINCE[version]}))
    load_model(run)


# ------------------------------------------------------------ the run's data (Trust II, 2)

def _digits_npy(path: Path, images: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    return path


def test_a_run_records_its_data_absolute_and_resumes_on_it_from_any_folder(tmp_path, mnist, monkeypatch, capsys):
    """`--data d/odd.npy` means the file where the run was started: a resume from another
    folder, which has a d/odd.npy of its own (all black), trains on the run's images, and
    evaluate finds them from a third folder."""
    ours = _digits_npy(tmp_path / "a" / "d" / "odd.npy", mnist[0][0][:200])
    _digits_npy(tmp_path / "b" / "d" / "odd.npy", np.zeros((200, 28, 28), np.uint8))
    (tmp_path / "c").mkdir()
    out = tmp_path / "runs" / "odd"
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--data", "d/odd.npy", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / CONFIG).read_text())
    assert recorded["data"] == str(ours.resolve()) and recorded["data_source"] == str(ours.resolve())

    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((out / CONFIG).read_text())["data_source"] == str(ours.resolve())
    capsys.readouterr()
    # Naming d/odd.npy here means b's images: not the run's, so refused, naming both.
    assert main(["train", "--data", "d/odd.npy", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "b" / "d" / "odd.npy") in line and str(ours.resolve()) in line and saved_progress(out)[0] == 2
    assert "drop --data, or start a new run" in line  # the flag to leave out, without a value

    monkeypatch.chdir(tmp_path / "c")
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["n_test"] == 20


def test_a_run_whose_data_moved_says_so_and_how_to_go_on(tmp_path, mnist, capsys):
    """The run's data file moved after training: evaluate, report and reconstruct (which take
    --data) say to name where it is now, a resume (which cannot) to move it back; a new run
    on a path with nothing there is the plain 'no data' error, not about a run's data."""
    ours = _digits_npy(tmp_path / "d" / "x.npy", mnist[0][0][:200]).resolve()
    out = tmp_path / "run"
    assert main(["train", "--data", str(ours), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    moved = ours.rename(tmp_path / "x.npy")
    capsys.readouterr()
    told = (f"aekit: error: {ours}: the run's data is no longer there (its config.json records where the run "
            "read it); move it back")
    for command in (["evaluate", str(out)], ["report", str(out)],
                    ["reconstruct", str(out), "--out", str(tmp_path / "r.png")]):
        assert main(command) == 2
        assert one_error_line(capsys) == told + ", or pass --data PATH to read it where it is now"
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert one_error_line(capsys) == told and saved_progress(out)[0] == 1
    assert main(["evaluate", str(out), "--data", str(moved)]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(ours), "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert one_error_line(capsys).startswith(f"aekit: error: no data at '{ours}': not a file or folder")


def test_resume_refuses_data_that_changed_since_the_run_read_it(tmp_path, mnist, capsys):
    digits = _digits_npy(tmp_path / "digits.npy", mnist[0][0][:200])
    out = tmp_path / "run"
    assert main(["train", "--data", str(digits), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    before = (out / CHECKPOINT).read_bytes()
    changed = mnist[0][0][:200].copy()
    changed[7, 14, 14] ^= 0xFF  # one pixel of one image
    np.save(digits, changed)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"{digits} changed since the run read it" in line and "sha256" in line
    assert (out / CHECKPOINT).read_bytes() == before and saved_progress(out)[0] == 1


def test_the_data_fingerprint_sees_count_shape_and_pixels(tmp_path, mnist):
    from aekit.data import ArrayImages, NpyStream, fingerprint, prepare_images

    x = mnist[0][0][:300]
    base = fingerprint(ArrayImages(prepare_images(x)))
    assert base == fingerprint(ArrayImages(prepare_images(x.copy())))  # the same images, the same checksum
    other = x.copy()
    other[299, 27, 27] ^= 1  # the last pixel of the last image
    assert fingerprint(ArrayImages(prepare_images(other))) != base
    assert fingerprint(ArrayImages(prepare_images(x[:299]))) != base
    assert base.startswith("300 images (1, 28, 28), all hashed, sha256 ")
    # A stream is hashed on a fixed sample of its images (and its count and shape): cheap.
    np.save(tmp_path / "x.npy", x)
    streamed = fingerprint(NpyStream(tmp_path / "x.npy"), sample=64)
    assert streamed.startswith("300 images (1, 28, 28), 64 sampled, sha256 ")
    assert streamed == fingerprint(NpyStream(tmp_path / "x.npy"), sample=64)
    np.save(tmp_path / "x.npy", np.zeros_like(x))
    assert fingerprint(NpyStream(tmp_path / "x.npy"), sample=64) != streamed


# ------------------------------------------------------- one training per folder (Trust II, 6)

def test_a_second_training_into_a_busy_folder_is_refused(tmp_path, mnist, monkeypatch, capsys):
    """While a training writes into a folder, another one into it is refused at once,
    naming the first; the first ends as if alone, and lets the folder go."""
    out, answers, real_fit = tmp_path / "run", [], experiment.fit

    def fit_beside_another(*args, **kwargs):
        answers.append(train(out, "--seed", "2", "--overwrite"))  # the other shell, same folder
        answers.append(one_error_line(capsys))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit_beside_another)
    assert train(out, "--seed", "1") == 0
    assert answers[0] == 2 and f"{out}: another training (pid {os.getpid()} on " in answers[1]
    assert answers[1].endswith(" is writing into this folder; wait for it to end, or choose another folder")
    monkeypatch.setattr(experiment, "fit", real_fit)
    assert json.loads((out / CONFIG).read_text())["seed"] == 1
    assert main(["evaluate", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "checkpoint.safetensors", "history.csv", "metrics.json",
         "reconstructions.png"])  # the lock went with the training
    (out / LOCK_NAME).write_text("pid 999999999, killed: the kernel dropped its lock with it")
    assert train(out, "--overwrite") == 0  # a stale lock file blocks nothing


@pytest.mark.heavy
def test_a_training_in_another_process_holds_the_folder_until_it_ends(tmp_path, mnist, capsys):
    """Two shells, one --out: the second is refused while the first trains (here: stopped
    by itself after its first step), and the first ends as if alone."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", TRIGGER, *map(str, step(1)), "SIGSTOP", "train", "--out", str(out),
                              "--quiet", "--limit", "300", "--epochs", "1"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert train(out, "--overwrite") == 2
        assert f"{out}: another training (pid {first.pid} on " in one_error_line(capsys)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0
    assert main(["evaluate", str(out)]) == 0 and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------- resume's checkpoint (Trust II, 7)

def test_resume_without_the_checkpoint_refuses_instead_of_starting_over(run_copy, capsys):
    (run_copy / CHECKPOINT).unlink()
    weights = (run_copy / WEIGHTS).read_bytes()
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"{run_copy} holds model.safetensors, history.csv, metrics.json but no checkpoint.safetensors" in line
    assert "--overwrite" in line
    assert (run_copy / WEIGHTS).read_bytes() == weights and not (run_copy / CHECKPOINT).exists()


def test_resume_of_a_run_stopped_before_its_first_epoch_starts_it(run_copy):
    """Only config.json: nothing trained to lose, so resume starts the run from the beginning."""
    for path in run_copy.iterdir():
        if path.name != CONFIG:
            path.unlink()
    assert main(["train", "--out", str(run_copy), "--resume", "--quiet"]) == 0
    assert saved_progress(run_copy)[0] == 2


# ------------------------------------------------ the config is compared first (Trust II, 12)

@pytest.mark.parametrize("shape, message", [
    ([1, 28, 29], "the weights was made with \"image_shape\": [1, 28, 28], but the run's config.json now says"),
    ([1, 100000, 100000], "image_shape"),
], ids=["edited", "huge"])
def test_an_edited_image_shape_is_refused_before_a_model_is_built(run_copy, capsys, monkeypatch, shape, message):
    config = json.loads((run_copy / CONFIG).read_text())
    (run_copy / CONFIG).write_text(json.dumps({**config, "image_shape": shape}))

    def model_for(*args, **kwargs):
        raise AssertionError("a model was built from the edited config")

    monkeypatch.setattr(weights, "model_for", model_for)
    assert main(["evaluate", str(run_copy)]) == 2
    assert message in one_error_line(capsys)


# --------------------------------------------------- a failed training leaves nothing (Trust II, 19)

def test_a_training_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_was(tmp_path, capsys):
    """A stream is checked batch by batch: an image out of range is refused mid-epoch."""
    images = np.full((100, 8, 8), 0.5, np.float32)
    images[50] = 2.0
    np.save(tmp_path / "bad.npy", images)
    out = tmp_path / "new" / "run"
    assert train(out, "--data", str(tmp_path / "bad.npy"), "--stream") == 2
    assert "float images must lie in [0, 1], got values in [0, 2]" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()  # the folders it made, gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert train(tmp_path / "mine", "--data", str(tmp_path / "bad.npy"), "--stream") == 2
    capsys.readouterr()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    images[50] = 1.0
    np.save(tmp_path / "bad.npy", images)
    assert train(out, "--data", str(tmp_path / "bad.npy"), "--stream") == 0  # the next try needs no --overwrite


def test_own_data_is_recognised_however_it_is_named(tmp_path, monkeypatch):
    """report's note "the figures show other data" and resume's --data check both ask this."""
    (tmp_path / "a" / "d").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    config = TrainConfig(data=str(tmp_path / "a" / "d" / "odd.npy"))
    assert runs.is_own_data(config, "d/odd.npy") and runs.is_own_data(config, "./d/../d/odd.npy")
    old = TrainConfig(data="d/odd.npy", data_source=str(tmp_path / "a" / "d" / "odd.npy"))  # aekit <= 0.3
    assert runs.is_own_data(old, str(tmp_path / "a" / "d" / "odd.npy"))
    monkeypatch.chdir(tmp_path / "b")
    assert not runs.is_own_data(config, "d/odd.npy") and runs.is_own_data(old, "../a/d/odd.npy")
    assert runs.run_data(old) == str(tmp_path / "a" / "d" / "odd.npy")
    # Only an absolute path in data_source says where relative data was, not a built-in's words.
    assert runs.run_data(TrainConfig(data="d/odd.npy", data_source="built-in mnist (/c/mnist.npz)")) == "d/odd.npy"
    assert runs.is_own_data(TrainConfig(), "mnist") and not runs.is_own_data(TrainConfig(), "./mnist")


def test_a_run_that_recorded_relative_data_resumes_on_the_data_it_was_trained_on(tmp_path, mnist, monkeypatch,
                                                                                  capsys):
    """aekit 0.3 and older recorded --data as given; the absolute data_source beside it
    says where that was, from any folder."""
    ours = _digits_npy(tmp_path / "a" / "d" / "odd.npy", mnist[0][0][:200])
    _digits_npy(tmp_path / "b" / "d" / "odd.npy", np.zeros((200, 28, 28), np.uint8))
    out = tmp_path / "runs" / "odd"
    monkeypatch.chdir(tmp_path / "a")
    with monkeypatch.context() as old:
        old.setattr(experiment, "data_path", lambda data: data)  # record it as aekit 0.3 did
        assert main(["train", "--data", "d/odd.npy", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / CONFIG).read_text())["data"] == "d/odd.npy"
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"data: {ours}\n")
    assert json.loads((out / CONFIG).read_text())["data_source"] == str(ours) and saved_progress(out)[0] == 2
    assert main(["evaluate", str(out)]) == 0
