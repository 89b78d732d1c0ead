"""The training loop: recipes, schedule, collapse detection, checkpoints, a real run."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from aekit.models import INITS, SeedAutoencoder
from aekit.runs import load_checkpoint, prepare_images, save_checkpoint
from aekit.training import (ADAM_EPS, RECIPES, TrainConfig, evaluate, fit, learning_rate,
                            make_optimizer)


def tiny_config(**overrides) -> TrainConfig:
    return dataclasses.replace(TrainConfig(epochs=2, batch_size=64), **overrides).resolved()


def seeded_model(config: TrainConfig) -> SeedAutoencoder:
    torch.manual_seed(config.seed)
    model = SeedAutoencoder()
    INITS[config.init](model)
    return model


@pytest.fixture(scope="module")
def mnist_small(mnist):
    (x_train, _), (x_test, _) = mnist
    return prepare_images(x_train[:2000]), prepare_images(x_test[:500])


def test_recipes_resolve_and_flags_override():
    blog = TrainConfig(recipe="blog").resolved()
    assert (blog.loss, blog.init, blog.lr, blog.batch_size, blog.schedule) == ("mse", "keras", 1e-3, 128, "constant")
    default = TrainConfig().resolved()
    assert (default.loss, default.init, default.schedule) == ("bce", "he", "cosine")
    assert TrainConfig(recipe="blog", loss="bce", epochs=3).resolved().loss == "bce"
    assert set(RECIPES) == {"blog", "default"}
    assert ADAM_EPS == 1e-7  # Keras' Adam epsilon


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive int, got 0"),
    ("batch_size", -3, "batch_size must be a positive int"),
    ("lr", 5.0, r"lr must be a number in \(0, 1\)"),
    ("loss", "l1", "unknown loss 'l1'; expected one of mse, bce"),
    ("recipe", "fast", "unknown recipe 'fast'"),
    ("device", "tpu", "unknown device 'tpu'"),
])
def test_config_errors_name_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(), **{field: value}).resolved()


def test_cosine_schedule_runs_from_peak_to_zero():
    config = tiny_config(lr=0.004, schedule="cosine")
    assert learning_rate(config, 0, 100) == pytest.approx(0.004)
    assert learning_rate(config, 50, 100) == pytest.approx(0.002)
    assert learning_rate(config, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(tiny_config(schedule="constant", lr=0.001), 99, 100) == 0.001


class Constant(nn.Module):
    """A 'model' that outputs the same image for every input."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 1, 28, 28))

    def logits(self, x):
        return self.bias.expand(len(x), -1, -1, -1) - 5.0

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


def test_collapse_is_detected_only_when_reconstructions_are_constant(mnist_small):
    _, x_test = mnist_small
    result = evaluate(Constant(), x_test)
    assert result.collapsed
    # the blank output's MSE is the mean of x squared (sigmoid(-5) is nearly 0)
    assert result.mse == pytest.approx(float(((x_test - torch.sigmoid(torch.tensor(-5.0))) ** 2).mean()), rel=1e-5)

    class Identity(Constant):
        def logits(self, x):
            return torch.logit(x.clamp(1e-4, 1 - 1e-4))

    good = evaluate(Identity(), x_test)
    assert not good.collapsed and good.mse < 1e-6


def test_evaluate_matches_a_direct_computation(mnist_small):
    _, x_test = mnist_small
    model = seeded_model(tiny_config()).eval()
    with torch.no_grad():
        expected = float(((model(x_test) - x_test) ** 2).mean())
    assert evaluate(model, x_test, batch_size=128).mse == pytest.approx(expected, rel=1e-5)


def test_real_training_run_loss_falls(mnist_small, caplog):
    x_train, x_test = mnist_small
    config = tiny_config(epochs=3, batch_size=32)
    model = seeded_model(config)
    before = evaluate(model, x_test).mse
    state = fit(model, x_train, x_test, config, progress=False)
    losses = [r.loss for r in state.history]
    assert len(state.history) == 3 and state.epoch == 3
    assert losses[0] > losses[1] > losses[2]
    assert state.history[-1].val_mse < 0.5 * before
    assert state.history[-1].val_mse < 0.03
    assert all(r.images_per_second > 0 for r in state.history)
    assert "nearly constant" not in caplog.text


def test_blog_recipe_collapse_is_reported(mnist_small, caplog):
    x_train, x_test = mnist_small
    config = tiny_config(recipe="blog", epochs=1)
    model = seeded_model(config)
    fit(model, x_train, x_test, config, progress=False)
    assert "reconstructions are nearly constant" in caplog.text
    assert "--recipe default" in caplog.text


def test_early_stopping(mnist_small):
    x_train, x_test = mnist_small
    config = tiny_config(epochs=10, patience=1, lr=0.9, schedule="constant")  # lr far too high
    state = fit(seeded_model(config), x_train[:256], x_test[:64], config, progress=False)
    assert state.stopped_early and state.epoch < 10


def test_checkpoint_round_trip_of_every_tensor(tmp_path, mnist_small):
    x_train, x_test = mnist_small
    config = tiny_config(epochs=1)
    model = seeded_model(config)
    optimizer = make_optimizer(model, config)
    state = fit(model, x_train[:256], x_test[:64], config, optimizer=optimizer, progress=False)
    save_checkpoint(model, optimizer, state, tmp_path / "ckpt.safetensors")

    model2 = SeedAutoencoder()
    optimizer2 = make_optimizer(model2, config)
    state2 = load_checkpoint(model2, optimizer2, tmp_path / "ckpt.safetensors")
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for index in s1["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(s1["state"][index][key]), torch.as_tensor(s2["state"][index][key]))
    assert s1["param_groups"][0]["eps"] == s2["param_groups"][0]["eps"] == ADAM_EPS
    assert state2.epoch == state.epoch and state2.history == state.history
    assert math.isclose(state2.best_val_loss, state.best_val_loss)


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, mnist_small):
    """Stop after epoch 1 (as a crash would), resume from the checkpoint: on the CPU
    the result equals an uninterrupted run exactly."""
    x_train, x_test = mnist_small[0][:512], mnist_small[1][:128]
    config = tiny_config(epochs=2)

    straight = seeded_model(config)
    fit(straight, x_train, x_test, config, progress=False)

    class Crash(Exception):
        pass

    def crash_after_checkpoint(model, optimizer, state):
        save_checkpoint(model, optimizer, state, tmp_path / "ckpt.safetensors")
        raise Crash

    interrupted = seeded_model(config)
    with pytest.raises(Crash):
        fit(interrupted, x_train, x_test, config, on_epoch_end=crash_after_checkpoint, progress=False)

    resumed = SeedAutoencoder()
    optimizer = make_optimizer(resumed, config)
    state = load_checkpoint(resumed, optimizer, tmp_path / "ckpt.safetensors")
    assert state.epoch == 1
    fit(resumed, x_train, x_test, config, optimizer=optimizer, state=state, progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_default_recipe_reaches_the_bar_after_one_epoch(mnist):
    (x_train, _), (x_test, _) = mnist
    config = TrainConfig(epochs=1).resolved()
    model = seeded_model(config)
    state = fit(model, prepare_images(x_train), prepare_images(x_test), config, progress=False)
    assert state.history[0].val_mse <= 0.010
