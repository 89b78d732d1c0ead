"""The training loop: recipes, schedule, collapse detection, checkpoints, a real run."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from aekit.models import INITS, SeedAutoencoder
from aekit.runs import load_checkpoint, prepare_images, save_checkpoint
from aekit.training import (ADAM_EPS, RECIPES, CollapseWarning, TrainConfig, epoch_permutation, evaluate, fit,
                            learning_rate, loss_fn, make_optimizer, match_state_layout, train_step,
                            PoolOrNot)


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


def test_real_training_run_loss_falls(mnist_small, recwarn):
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
    assert not [w for w in recwarn if issubclass(w.category, CollapseWarning)]


def test_blog_recipe_collapse_is_reported(mnist_small):
    x_train, x_test = mnist_small
    config = tiny_config(recipe="blog", epochs=1)
    model = seeded_model(config)
    with pytest.warns(CollapseWarning, match=r'reconstructions are nearly constant.*recipe="default"'):
        fit(model, x_train, x_test, config, progress=False)


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


def plain_fit(model: nn.Module, x_train: torch.Tensor, config: TrainConfig) -> list[float]:
    """The textbook loop the fast path must match: NCHW, unfused Adam, one pass per batch,
    the same shuffle and schedule. Returns the mean training loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=ADAM_EPS, foreach=False)
    n, batch = len(x_train), config.batch_size
    steps = math.ceil(n / batch)
    losses = []
    for epoch in range(config.epochs):
        shuffled = x_train[epoch_permutation(config.seed, epoch, n)]
        total = 0.0
        for step in range(steps):
            xb = shuffled[step * batch:(step + 1) * batch]
            optimizer.param_groups[0]["lr"] = learning_rate(config, epoch * steps + step, config.epochs * steps)
            loss = loss_fn(model, xb, xb, config.loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        losses.append(total / n)
    return losses


@pytest.mark.parametrize("batch_size", [32, 128])
def test_fast_path_trains_like_the_plain_loop(mnist_small, batch_size):
    """Same seed, same data: fit() (channels_last, fused Adam, batches cut into chunks)
    against the textbook loop. One step agrees to float rounding; the loss curves and the
    final quality agree within a small tolerance (rounding differences grow in training)."""
    x_train, x_test = mnist_small[0][:1024], mnist_small[1][:200]
    config = tiny_config(epochs=2, batch_size=batch_size)

    one_step = dataclasses.replace(config, epochs=1)
    fast, plain = seeded_model(config), seeded_model(config)
    fit(fast, x_train[:batch_size], x_test[:10], one_step, progress=False)
    plain_fit(plain, x_train[:batch_size], one_step)
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    fast, plain = seeded_model(config), seeded_model(config)
    state = fit(fast, x_train, x_test, config, progress=False)
    plain_losses = plain_fit(plain, x_train, config)
    fast_losses = [r.loss for r in state.history]
    assert fast_losses == pytest.approx(plain_losses, rel=0.02)
    assert state.history[-1].val_mse == pytest.approx(evaluate(plain, x_test).mse, rel=0.05)


def test_chunked_step_equals_one_pass_up_to_rounding(mnist_small):
    """train_step with chunks of 7 (uneven: 64 = 9 * 7 + 1) gives the gradient of one pass."""
    x = mnist_small[0][:64]
    config = tiny_config()
    grads = []
    for micro_batch in (64, 7):
        model = seeded_model(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the grads
        total = train_step(model, x, x, "bce", optimizer, micro_batch)
        grads.append(([p.grad.clone() for p in model.parameters()], total))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_micro_batch_is_validated(mnist_small):
    config = tiny_config(epochs=1)
    with pytest.raises(ValueError, match="micro_batch must be a positive number of images, got 0"):
        fit(seeded_model(config), mnist_small[0][:64], mnist_small[1][:8], config, progress=False, micro_batch=0)


def test_resume_with_fused_adam_and_channels_last_state(tmp_path, mnist_small):
    """A checkpoint stores Adam's moments contiguous; fit() trains channels_last. Fused CPU
    Adam gives wrong updates when the two layouts differ, so fit() aligns them: the moments
    end up with their parameter's strides."""
    config = tiny_config(epochs=1)
    model = seeded_model(config)
    optimizer = make_optimizer(model, config)
    fit(model, mnist_small[0][:128], mnist_small[1][:8], config, optimizer=optimizer, progress=False)
    model.to(memory_format=torch.channels_last)
    match_state_layout(optimizer)
    for param in model.parameters():
        for value in optimizer.state[param].values():
            if value.shape == param.shape:
                assert value.stride() == param.stride()


def test_the_number_of_workers_does_not_change_the_result(mnist_small):
    """ChunkPool runs a batch's chunks side by side and the gradients are added in chunk
    order, so 1, 2 or 3 workers, or the default that switches between pool and one thread
    as it goes, give the same weights bit for bit (at one PyTorch thread each, which fit()
    sets while a pool runs and restores after)."""
    x_train, x_test = mnist_small[0][:1024], mnist_small[1][:64]
    config = tiny_config(epochs=2, batch_size=128)
    weights = []
    for workers in (1, 2, 3, None):
        torch.set_num_threads(1 if workers == 1 else 2)
        model = seeded_model(config)
        fit(model, x_train, x_test, config, progress=False, workers=workers)
        assert torch.get_num_threads() == (1 if workers == 1 else 2)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert all(torch.equal(weights[0], w) for w in weights[1:])


def test_pool_or_not_probes_both_ways_and_keeps_the_faster():
    chooser = PoolOrNot(probe=2, period=10)
    ways = []
    for step in range(20):
        way = chooser.pool_now()
        ways.append(way)
        chooser.record(way, 2.0 if way else 1.0 if step < 10 else 3.0)  # the pool: slower, then faster
    assert ways[:4] == [False, False, True, True]
    assert ways[4:10] == [False] * 6      # one thread was faster
    assert ways[10:14] == [False, False, True, True]
    assert ways[14:] == [True] * 6        # now the pool is


def test_workers_is_validated(mnist_small):
    config = tiny_config(epochs=1)
    with pytest.raises(ValueError, match="workers must be a positive number of threads, got -1"):
        fit(seeded_model(config), mnist_small[0][:64], mnist_small[1][:8], config, progress=False, workers=-1)
