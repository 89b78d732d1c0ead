import os
import shutil
import signal

import numpy as np
import pytest
import torch

from aekit import data as data_lib
from fuzzing import IN_CI  # importing it loads hypothesis's profile

# A non-interactive shell starts background jobs (`make test &`) with SIGINT ignored, and
# the training subprocesses would inherit that: the Ctrl-C tests need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """The tests marked heavy first, the rest in file order: pytest-xdist hands tests out in
    this order, so under `make test` (two workers) no long test starts while the other worker
    has nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable


def need(condition: bool, reason: str) -> None:
    """Skip with a visible reason when a dependency is absent; under CI=true, fail instead."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing in CI: {reason}")
        pytest.skip(reason)


def one_error_line(capsys) -> str:
    """The CLI's stderr after a user error: exactly one line, ``aekit: error: ...``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("aekit: error: ")
    return err[0]


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST, fetched once into the user's cache (as `make demo` does)."""
    try:
        return data_lib.load_dataset("mnist")
    except data_lib.DataError as exc:
        need(False, f"MNIST is not available: {exc}")


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """An empty, private AEKIT_DATA for tests that exercise the cache."""
    home = tmp_path / "cache"
    monkeypatch.setenv("AEKIT_DATA", str(home))
    return home


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # A fixed thread count for every test, so results do not depend on what another test
    # left behind: the machine's two cores, or one each when pytest-xdist runs two workers.
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    yield


@pytest.fixture(autouse=True)
def _seeded_generators():
    # The same draws for every test, whichever tests ran before it in this process (pytest-
    # xdist hands tests to workers in an order that changes from run to run).
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Trained run folders, one per kind of run (family x data x epochs), each trained once per
# session and shared by every test file that asks for that kind. They are read-only by
# convention: a test that changes a run folder (writes a report or an export into it,
# damages a file) works on a copy (copy_run).

def train_run(tmp_path_factory, name: str, *flags: str):
    """``aekit train FLAGS --out <fresh folder>/NAME --quiet``, the folder it wrote."""
    from aekit.cli import main

    out = tmp_path_factory.mktemp(name) / name
    if main(["train", *flags, "--out", str(out), "--quiet"]) != 0:
        pytest.fail(f"training the shared run {name} ({' '.join(flags)}) failed")
    return out


def copy_run(run, dest):
    """A copy of a run folder without its report, for tests that change it."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report.html"))
    return dest


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, mnist):
    """The seed network, one epoch on 300 MNIST images (report, export, io, inference, estimator)."""
    return train_run(tmp_path_factory, "seed", "--model", "seed", "--limit", "300", "--epochs", "1")


@pytest.fixture(scope="session")
def seed_1500_run(tmp_path_factory, mnist):
    """The seed network, two epochs on 1,500 MNIST images (the CLI's run folder, and the
    plain control that the denoising run is measured against)."""
    return train_run(tmp_path_factory, "seed1500", "--model", "seed", "--limit", "1500", "--epochs", "2")


@pytest.fixture(scope="session")
def conv_run(tmp_path_factory, mnist):
    """model="conv" with a 2-number code, one epoch on 300 MNIST images (report's latent grid, export)."""
    return train_run(tmp_path_factory, "conv", "--model", "conv", "--latent-dim", "2", "--limit", "300",
                     "--epochs", "1")


@pytest.fixture(scope="session")
def pca_conv_run(tmp_path_factory, mnist):
    """model="pca-conv" with a 4-number code, one epoch on 300 MNIST images (export)."""
    return train_run(tmp_path_factory, "pca-conv", "--model", "pca-conv", "--latent-dim", "4", "--limit", "300",
                     "--epochs", "1")


@pytest.fixture(scope="session")
def map_run(tmp_path_factory, mnist):
    """model="map" with a 2-number code, one epoch on 300 MNIST images (sample --grid, export)."""
    return train_run(tmp_path_factory, "map", "--model", "map", "--latent-dim", "2", "--limit", "300",
                     "--epochs", "1")


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, mnist):
    """model="vae" with a 4-number code and beta 0.5, one epoch on 256 MNIST images (its metrics, sample, export)."""
    return train_run(tmp_path_factory, "vae", "--model", "vae", "--latent-dim", "4", "--beta", "0.5", "--epochs", "1",
                     "--limit", "256")


@pytest.fixture
def scratch_registry():
    """aekit.models.MODELS, as it was again after the test: families registered in it are forgotten."""
    from aekit.models import MODELS

    before = dict(MODELS)
    yield MODELS
    MODELS.clear()
    MODELS.update(before)
