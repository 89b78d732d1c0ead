"""A model owns its objective: a test-only family with an extra loss term
(tests/penalised_model.py) trains through the unchanged fit, run folder, checkpoints,
estimator, CLI and DDP, and its named parts are logged."""

import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aekit import ConvAutoencoder
from aekit.cli import main
from aekit.experiment import train_and_evaluate
from aekit.runs import read_history
from aekit.weights import load_model
from aekit.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
import penalised_model  # noqa: E402  (registers "penalised")

PARTS = ["latent_penalty", "reconstruction", "val_latent_penalty", "val_reconstruction"]


def assert_parts_add_up(rows: list[dict[str, float]]) -> None:
    """Each epoch's loss is the sum of its parts (history.csv keeps 6 digits)."""
    for row in rows:
        assert row["latent_penalty"] > 0 and row["val_latent_penalty"] > 0
        assert row["loss"] == pytest.approx(row["reconstruction"] + row["latent_penalty"], rel=1e-4)
        assert row["val_loss"] == pytest.approx(row["val_reconstruction"] + row["val_latent_penalty"], rel=1e-4)


def csv_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_a_model_with_an_extra_term_trains_through_the_run_folder(tmp_path):
    config = TrainConfig(model="penalised", epochs=2, limit=512, batch_size=64)
    result = train_and_evaluate(config, tmp_path / "run", progress=False)
    rows = csv_rows(tmp_path / "run" / "history.csv")
    assert list(rows[0])[-4:] == PARTS
    assert_parts_add_up(rows)
    assert [r.parts for r in read_history(tmp_path / "run")] == [{k: r[k] for k in PARTS} for r in rows]
    model, _ = load_model(tmp_path / "run")
    assert type(model) is penalised_model.PenalisedAutoencoder
    metrics = result.metrics
    assert metrics["test_loss"] == pytest.approx(metrics["test_reconstruction"] + metrics["test_latent_penalty"])
    # The penalty is trained on: the latents are smaller than the plain seed network's.
    plain = train_and_evaluate(TrainConfig(model="seed", epochs=2, limit=512, batch_size=64),
                               tmp_path / "plain", progress=False)
    x = torch.rand(64, 1, 28, 28)
    seed_model, _ = load_model(plain.workdir)
    with torch.no_grad():
        assert model.encode(x).pow(2).mean() < seed_model.encode(x).pow(2).mean()


def test_the_estimator_and_cli_take_a_registered_model_and_its_option(tmp_path, mnist, capsys):
    """The family's own option, declared in its Options only, is the estimator's model_params,
    a flag that `aekit train --help` lists, a field of the run's config, and loads back."""
    x = mnist[0][0][:256]
    estimator = ConvAutoencoder(model="penalised", model_params={"penalty": 0.2}, epochs=1, random_state=0).fit(x)
    assert sorted(estimator.history_[0]["parts"]) == PARTS
    assert estimator.transform(x[:5]).shape == (5, 392)
    assert estimator.model_.penalty == 0.2 and estimator.config_.model_params == {"penalty": 0.2}
    loaded = ConvAutoencoder.load(estimator.save(tmp_path / "est"))
    assert loaded.model_params == {"penalty": 0.2} and loaded.model_.penalty == 0.2

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert "--penalty PENALTY weight of the latent's mean square in the loss, for --model penalised " \
           "(default: 0.05)" in listed
    assert main(["train", "--model", "penalised", "--penalty", "0.2", "--limit", "128", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "cli")]) == 0
    assert_parts_add_up(csv_rows(tmp_path / "cli" / "history.csv"))
    model, config = load_model(tmp_path / "cli")
    assert model.penalty == 0.2 and config.model_params == {"penalty": 0.2}
    assert ConvAutoencoder.load(tmp_path / "cli").model_params == {"penalty": 0.2}
    # A value the family's check refuses is one line, before anything is trained.
    assert main(["train", "--model", "penalised", "--penalty", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "penalty must be a non-negative number, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_model_refuses_an_objective_it_does_not_offer(monkeypatch):
    monkeypatch.setattr(penalised_model.PenalisedAutoencoder, "objectives", ("bce",))
    with pytest.raises(ValueError, match=r"^unknown loss 'mse'; expected one of bce \(the objectives "
                                         r"model='penalised' offers\)"):
        TrainConfig(model="penalised", loss="mse").resolved()


@pytest.mark.heavy
def test_two_ranks_train_the_extra_term(tmp_path):
    """DDP forwards the model's whole objective: two torchrun ranks log the same parts and
    they add up. The ranks register the model through a sitecustomize, as a plugin would."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                           "import penalised_model\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "aekit", "train", "--model", "penalised", "--limit", "300", "--batch-size", "37",
               "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(out), "--penalty", "0.2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = csv_rows(out / "history.csv")
    assert list(rows[0])[-4:] == PARTS
    assert_parts_add_up(rows)
    model, config = load_model(out)  # the family's own option, given as a flag to both ranks
    assert model.penalty == 0.2 and config.model_params == {"penalty": 0.2}


class DataInitialised(penalised_model.PenalisedAutoencoder):
    """Records each training_data context: (new, number of images, entered, left)."""

    def __init__(self, image_shape=(1, 28, 28)):
        super().__init__(image_shape)
        self.contexts = []

    @contextlib.contextmanager
    def training_data(self, images, new):
        record = {"new": new, "images": len(images), "left": False}
        self.contexts.append(record)
        if new:  # a data-dependent initialisation: the output bias at the images' mean
            with torch.no_grad():
                self.decoder.layers[-1].bias.fill_(0.123)
        try:
            yield
        finally:
            record["left"] = True


@pytest.mark.filterwarnings("ignore::aekit.collapse.CollapseWarning")  # random pixels: nothing to learn
def test_fit_gives_a_model_its_training_data_new_or_continued():
    from aekit.training import fit

    x = torch.rand(96, 1, 28, 28)
    model = DataInitialised()
    state = fit(model, x, x[:32], TrainConfig(epochs=1, batch_size=32), progress=False)
    assert model.contexts == [{"new": True, "images": 96, "left": True}]
    # The initialisation happened before the first step: one epoch of Adam moves the bias off 0.123 by little.
    assert abs(float(model.decoder.layers[-1].bias.detach()) - 0.123) < 0.1
    state = fit(model, x, x[:32], TrainConfig(epochs=2, batch_size=32), state=state, progress=False)
    assert model.contexts[1] == {"new": False, "images": 96, "left": True}
    # Left also when training fails.
    bad = DataInitialised()
    bad.decoder.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        fit(bad, x, x[:32], TrainConfig(epochs=1, batch_size=32), progress=False)
    assert bad.contexts == [{"new": True, "images": 96, "left": True}]
