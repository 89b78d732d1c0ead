"""One experiment: `aekit train` and `ConvAutoencoder().fit` train the same way (aekit.experiment).

The same images and seed, trained both ways with every default, give the same config and
the same weights, bit for bit: one path, one set of defaults, one epoch rule, one hold-out.
"""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aekit import ConvAutoencoder, config as config_lib, runs, weights
from aekit.cli import main
from aekit.config import TrainConfig
from aekit.experiment import hold_out, plan, train_and_evaluate

# Fields that say where a run's images came from, not how it trained: the estimator's are
# "<array>" and None, a run's its file.
WHERE = ("data", "data_source")


@pytest.fixture(scope="module")
def few(mnist):
    """100 MNIST digits at 14x14 (uint8), and 20 for the test split: few enough that the
    epoch rule gives its maximum and holds 10 out."""
    (x_train, _), (x_test, _) = mnist
    return x_train[:100, ::2, ::2], x_test[:20, ::2, ::2]


@pytest.mark.heavy
def test_train_and_fit_give_the_same_config_and_weights(tmp_path, few, capsys):
    x_train, x_test = few
    np.savez(tmp_path / "few.npz", x_train=x_train, x_test=x_test)
    assert main(["train", "--data", str(tmp_path / "few.npz"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    run_config = runs.read_config(tmp_path / "run")
    est = ConvAutoencoder(random_state=0).fit(x_train)

    assert run_config.model == est.config_.model == "pca-conv"   # the one default model
    assert run_config.epochs == est.config_.epochs == 100         # the epoch rule, both ways
    assert "10 of the 100 images" in run_config.chosen["held_out"]
    differ = [f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in WHERE and getattr(run_config, f.name) != getattr(est.config_, f.name)]
    assert differ == []
    weights = load_file(tmp_path / "run" / runs.WEIGHTS)
    state = est.model_.state_dict()
    assert sorted(weights) == sorted(state)
    assert all(torch.equal(weights[name], state[name].cpu()) for name in state)
    # Both kept the epoch with the lowest held-out loss, and say which.
    metrics = runs.read_metrics(tmp_path / "run")
    assert metrics["kept_epoch"] == est.kept_epoch_ < metrics["epochs"] == 100
    assert metrics["n_train"] == 90 and metrics["n_held_out"] == 10


def test_every_default_is_the_same_for_train_fit_and_compare():
    from aekit.compare import CompareConfig, estimator

    config = TrainConfig()
    est = ConvAutoencoder()
    compared = estimator(CompareConfig(), "autoencoder", 32)
    assert config.model == est.model == compared.model == "pca-conv"
    assert config.epochs is None and est.epochs is None and compared.epochs is None
    assert config.recipe == est.recipe == compared.recipe == "default"
    resolved, _ = plan(config, 60000)
    assert resolved.epochs == 10 and "held_out" not in resolved.chosen


def test_the_plan_chooses_epochs_and_the_held_out_share_from_the_images():
    config, held = plan(TrainConfig(model="conv"), 2000)
    assert held == 200 and config.epochs == 53 and "1,800 images" in config.chosen["epochs"]
    config, held = plan(TrainConfig(model="conv", epochs=7), 2000)  # epochs given: no rule, no hold-out
    assert (config.epochs, held, config.chosen) == (7, 0, {})


def test_hold_out_draws_the_same_images_on_every_call():
    from aekit.data import ArrayImages

    images = ArrayImages(torch.arange(10.0).view(10, 1, 1, 1))
    (a, b), (c, d) = hold_out(images, 3, seed=4), hold_out(images, 3, seed=4)
    assert torch.equal(a.tensor, c.tensor) and torch.equal(b.tensor, d.tensor) and len(b) == 3
    assert sorted(torch.cat([a.tensor, b.tensor]).flatten().tolist()) == list(range(10))


@pytest.mark.filterwarnings("ignore::aekit.training.CollapseWarning")  # lr=0.1: a flat first epoch
def test_a_run_stopped_with_images_held_out_resumes_to_the_same_kept_weights(tmp_path, few, monkeypatch):
    """The best epoch's weights travel in the checkpoint: a run stopped after its best epoch
    ends, resumed, on those weights, as the run that was never stopped. (A learning rate
    high enough that the held-out loss is lowest at epoch 3 of 8, by 9%: the later epochs'
    weights are not the kept ones.)"""
    monkeypatch.setattr(config_lib, "EPOCH_RULE_RANGE", (2, 8))  # 8 epochs, 10 images held out
    x_train, x_test = few
    np.savez(tmp_path / "few.npz", x_train=x_train, x_test=x_test)
    config = TrainConfig(data=str(tmp_path / "few.npz"), model="conv", model_params={"latent_dim": 8}, lr=0.1)
    straight = train_and_evaluate(config, tmp_path / "straight", progress=False)
    kept = straight.metrics["kept_epoch"]
    assert straight.metrics["epochs"] == 8 and kept < 7  # the run goes on for epochs after its best

    saved = weights.save_checkpoint

    def stop_after(epoch):
        def save_then_stop(model, optimizer, state, *args):
            saved(model, optimizer, state, *args)
            if state.epoch == epoch and not state.step:
                raise KeyboardInterrupt
        return save_then_stop

    import aekit.experiment as experiment

    monkeypatch.setattr(experiment, "save_checkpoint", stop_after(min(kept + 1, 7)))
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path / "stopped", progress=False)
    best = weights.checkpoint_best(tmp_path / "stopped" / runs.CHECKPOINT)
    assert best is not None
    monkeypatch.setattr(experiment, "save_checkpoint", saved)
    resumed = train_and_evaluate(TrainConfig(), tmp_path / "stopped", resume=True, progress=False)
    assert resumed.metrics["kept_epoch"] == kept
    a, b = load_file(tmp_path / "straight" / runs.WEIGHTS), load_file(tmp_path / "stopped" / runs.WEIGHTS)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_precision_is_one_choice_for_train_and_fit_and_stays_with_the_run(tmp_path, few, capsys):
    """--precision bfloat16 and ConvAutoencoder(precision="bfloat16") train the same run bit
    for bit, unlike float32's; the run folder and a saved estimator keep the choice."""
    x_train, x_test = few
    np.savez(tmp_path / "few.npz", x_train=x_train, x_test=x_test)
    assert main(["train", "--data", str(tmp_path / "few.npz"), "--model", "conv", "--epochs", "2",
                 "--precision", "bfloat16", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    run_weights = load_file(tmp_path / "run" / runs.WEIGHTS)
    fitted = {precision: ConvAutoencoder(model="conv", epochs=2, precision=precision, random_state=0).fit(x_train)
              for precision in ("bfloat16", "float32")}
    assert runs.read_config(tmp_path / "run").precision == fitted["bfloat16"].config_.precision == "bfloat16"
    for precision, est in fitted.items():
        state = est.model_.state_dict()
        same = all(torch.equal(run_weights[name], state[name]) for name in state)
        assert same == (precision == "bfloat16"), precision
    assert ConvAutoencoder.load(tmp_path / "run").precision == "bfloat16"
    fitted["bfloat16"].save(tmp_path / "est")
    assert ConvAutoencoder.load(tmp_path / "est").get_params()["precision"] == "bfloat16"
