"""What a library call or a CLI command leaves of the process it ran in (global RNGs, the
logger, the umask), how a closed stdout ends a command, and sizes too large to build."""

import logging
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aekit import _io
from aekit.cli import main
from aekit.estimator import ConvAutoencoder
from aekit.models import MAX_IMAGE_VALUES, MAX_PARAMETERS, build_model
from aekit.experiment import evaluate_run, train_and_evaluate
from aekit.runs import read_metrics
from aekit.weights import load_model
from aekit.config import MAX_SEED, TrainConfig
from aekit.start import model_for, new_model
from conftest import one_error_line

SRC = Path(__file__).resolve().parents[1] / "src"


def rng_states() -> tuple:
    """The global generators a library call must leave alone: torch's CPU one, numpy's, python's."""
    return torch.random.get_rng_state(), repr(np.random.get_state()), random.getstate()


def assert_same_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), "torch's global generator moved"
    assert before[1] == after[1], "numpy's global generator moved"
    assert before[2] == after[2], "python's random moved"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, mnist):
    """A VAE run folder: one epoch on 200 MNIST images."""
    out = tmp_path_factory.mktemp("vae-run") / "vae"
    train_and_evaluate(TrainConfig(model="vae", epochs=1, limit=200, seed=3, device="cpu"), out, progress=False)
    return out


# ------------------------------------------------------------- item 9: global RNGs

def test_building_a_run_model_leaves_the_global_rngs_alone():
    config = TrainConfig(model="vae", seed=5, image_shape=(1, 28, 28), device="cpu").resolved()
    torch.manual_seed(123)
    before = rng_states()
    new_model(config)
    model_for(config)
    assert_same_states(before, rng_states())


@pytest.mark.parametrize("model", ["vae", "map"])
def test_a_rebuilt_model_draws_the_seeds_it_trained_with(model):
    """model_for (the load path) and new_model (the training path) give a VAE the same
    noise_seed, and a map the same graph_seed: a function of config.seed, whatever the
    global generator's state."""
    config = TrainConfig(model=model, seed=5, image_shape=(1, 28, 28), device="cpu").resolved()
    name = "noise_seed" if model == "vae" else "graph_seed"
    torch.manual_seed(1)
    trained = getattr(new_model(config), name)
    torch.manual_seed(2)
    assert getattr(model_for(config), name) == trained
    other = TrainConfig(model=model, seed=6, image_shape=(1, 28, 28), device="cpu").resolved()
    assert getattr(model_for(other), name) != trained


def test_estimator_fit_and_load_and_load_model_leave_the_global_rngs_alone(vae_run, tmp_path):
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    torch.manual_seed(123)
    before = rng_states()
    estimator = ConvAutoencoder(model="vae", epochs=1, random_state=0, device="cpu").fit(x)
    assert_same_states(before, rng_states())
    estimator.save(tmp_path / "saved")
    ConvAutoencoder.load(tmp_path / "saved", device="cpu")
    ConvAutoencoder.load(vae_run, device="cpu")
    load_model(vae_run, device="cpu")
    assert_same_states(before, rng_states())


def test_a_vae_run_evaluates_to_its_recorded_test_loss(vae_run):
    """evaluate is deterministic (aekit.models.vae), whatever the global generator: twice the same
    test_loss, and the one metrics.json recorded at the end of training. That one was
    computed by the training process on the same weights and images, possibly in another
    memory layout and batching: float32 sums of 784 per-pixel terms reassociated differ by
    at most about 784 * 2**-24 = 4.7e-5 relative, hence rel=1e-4. A wrong noise_seed gives
    other noise and differs by ~1e-3 (0.4175 against 0.4192 on this run's old code)."""
    torch.manual_seed(1)
    first = evaluate_run(vae_run, device="cpu")["test_loss"]
    torch.manual_seed(2)
    second = evaluate_run(vae_run, device="cpu")["test_loss"]
    assert first == second
    assert first == pytest.approx(read_metrics(vae_run)["test_loss"], rel=1e-4)


# ------------------------------------------------------ item 11: a closed stdout

@pytest.mark.parametrize("argv", [["data", "info", "IMAGES"], ["summary"]])
def test_a_closed_stdout_ends_a_command_quietly(argv, tmp_path):
    """`aekit data info X | true`: no message, the exit status of a command killed by
    SIGPIPE (128 + 13), as the shell reports for cat or grep."""
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((4, 8, 8), dtype=np.uint8))
    argv = [str(images) if a == "IMAGES" else a for a in argv]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before aekit writes a byte
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    try:
        done = subprocess.run([sys.executable, "-m", "aekit", *argv], stdout=write, stderr=subprocess.PIPE,
                              env=env, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141


# ------------------------------------------------------ item 13: impossible sizes

@pytest.mark.parametrize("argv, named", [
    (["summary", "--image-shape", "100000,100000,1"], "100000x100000"),
    (["summary", "--model", "pca-conv", "--latent-dim", "1000000000"], "parameters"),
    (["summary", "--model", "conv", "--widths", "100000,100000"], "parameters"),
])
def test_impossible_model_sizes_are_one_line(argv, named, capsys):
    assert main(argv) == 2
    assert named in one_error_line(capsys)


def test_build_model_refuses_sizes_before_allocating():
    with pytest.raises(ValueError, match="parameters"):
        build_model("pca-conv", (1, 28, 28), latent_dim=10 ** 9)
    with pytest.raises(ValueError, match="values"):
        build_model("seed", (1, 100_000, 100_000))
    with pytest.raises(ValueError, match="parameters"):
        ConvAutoencoder(model="pca-conv", latent_dim=10 ** 9, epochs=1, device="cpu").fit(
            np.zeros((4, 28, 28, 1), dtype=np.float32))
    assert MAX_IMAGE_VALUES >= 4096 * 4096 * 3 and MAX_PARAMETERS >= 10 ** 8  # room for real models
    build_model("conv", (3, 1024, 1024))  # a large but sensible model is still built


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 99999999999999999999])
def test_a_seed_out_of_range_is_refused_by_the_config(seed):
    with pytest.raises(ValueError, match=r"seed=.*2\*\*63"):
        TrainConfig(seed=seed, image_shape=(1, 28, 28)).resolved()


def test_the_largest_seed_builds_a_model():
    new_model(TrainConfig(seed=MAX_SEED, image_shape=(1, 28, 28), device="cpu").resolved())


@pytest.mark.parametrize("command, seed", [
    (["train", "--limit", "100", "--epochs", "1", "--out", "OUT"], "99999999999999999999"),
    (["train", "--limit", "100", "--epochs", "1", "--out", "OUT"], str(MAX_SEED + 1)),
    (["compare", "--out", "OUT"], "99999999999999999999"),
    # compare's PCA and an estimator's sample take scikit-learn's random_state: numpy's 32-bit seeds
    (["compare", "--methods", "pca", "--latent-dims", "2", "--limit", "600", "--out", "OUT"], str(2 ** 32)),
    (["sample", "RUN", "--out", "OUT"], str(2 ** 32)),
])
def test_a_seed_flag_out_of_range_is_one_line_naming_it(command, seed, vae_run, tmp_path, capsys):
    argv = [str(vae_run) if a == "RUN" else str(tmp_path / a) if a == "OUT" else a for a in command]
    assert main([*argv, "--seed", seed]) == 2
    assert "--seed" in one_error_line(capsys)


# ---------------------------------------------------- item 18: logger and umask

def test_main_leaves_the_aekit_logger_as_it_found_it(capsys):
    logger = logging.getLogger("aekit")
    handler = logging.NullHandler()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = True
    try:
        assert main(["summary"]) == 0
        assert (logger.handlers, logger.level, logger.propagate) == ([handler], logging.WARNING, True)
    finally:
        logger.handlers[:] = []
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.parametrize("status", ["/proc/self/status", "/nonexistent/status"])
def test_atomic_writes_never_change_the_umask(status, umask_027, tmp_path, monkeypatch):
    """The usual permissions (0o666 / 0o777 less the umask) without ever setting the umask,
    which is process-wide: another thread creating a file meanwhile would get umask 0. The
    second case is the fallback where /proc is not there (macOS, BSD)."""
    if status.startswith("/proc"):
        from conftest import need

        need(Path(status).is_file(), "no /proc/self/status on this system")
    monkeypatch.setattr(_io, "PROC_STATUS", status)
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    _io.write_bytes_atomic(tmp_path / "file", b"x")
    with _io.atomic_folder(tmp_path / "folder") as staging:
        (staging / "inner").write_bytes(b"y")
    assert calls == []
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no probe left behind
