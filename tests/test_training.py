"""The training loop: recipes, schedule, collapse detection, checkpoints, a real run."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from aekit import fast
from aekit.fast import PoolOrNot
from aekit.inference import evaluate
from aekit.models import INITS, SeedAutoencoder, reconstruction_loss
from aekit.data import epoch_permutation, prepare_images
from aekit.weights import load_checkpoint, save_checkpoint
from aekit.config import RECIPES, TrainConfig
from aekit.collapse import CollapseWarning
from aekit.progress import EpochRecord, TrainState
from aekit.start import ADAM_EPS, learning_rate, make_optimizer
from aekit.training import fit, train_step


def tiny_config(**overrides) -> TrainConfig:
    return dataclasses.replace(TrainConfig(model="seed", epochs=2, batch_size=64), **overrides).resolved()


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
    blog = TrainConfig(model="seed", recipe="blog").resolved()
    assert (blog.loss, blog.init, blog.lr, blog.batch_size, blog.schedule) == ("mse", "keras", 1e-3, 128, "constant")
    default = TrainConfig(model="seed").resolved()
    assert (default.loss, default.init, default.schedule) == ("bce", "he", "cosine")
    # The default family offers only mse: it trains on that, with the recipe's other choices.
    assert (TrainConfig().resolved().loss, TrainConfig().resolved().init) == ("mse", "he")
    assert TrainConfig(model="seed", recipe="blog", loss="bce", epochs=3).resolved().loss == "bce"
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
        dataclasses.replace(TrainConfig(model="seed"), **{field: value}).resolved()


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
    assert evaluate(model, x_test).mse == pytest.approx(expected, rel=1e-5)


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


@pytest.mark.filterwarnings("ignore::aekit.collapse.CollapseWarning")  # lr 0.9 collapses, as meant
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
    """Stop after epoch 1 (as a crash would), resume from the checkpoint: on the CPU the
    result equals an uninterrupted run exactly.

    The checkpoint stores Adam's moments contiguous while fit() trains channels_last, and
    fused CPU Adam gives wrong updates when the two layouts differ: fit() itself aligns
    them, so while it trains each moment has its parameter's strides."""
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
    layouts = []

    def record_layouts(model, optimizer, state):  # called by fit while it trains channels_last
        layouts.extend((value.stride(), param.stride()) for param in model.parameters()
                       for value in optimizer.state[param].values() if value.shape == param.shape)

    fit(resumed, x_train, x_test, config, optimizer=optimizer, state=state, on_epoch_end=record_layouts,
        progress=False)
    assert any(param != tuple(sorted(param, reverse=True)) for _, param in layouts)  # channels_last seen
    assert all(value == param for value, param in layouts)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_default_recipe_reaches_the_bar_after_one_epoch(mnist):
    (x_train, _), (x_test, _) = mnist
    config = TrainConfig(model="seed", epochs=1).resolved()
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
            loss = reconstruction_loss(model, xb, xb, config.loss).total
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
        total, _ = train_step(model, x, x, "bce", optimizer, micro_batch)
        grads.append(([p.grad.clone() for p in model.parameters()], total))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_micro_batch_is_validated(mnist_small):
    config = tiny_config(epochs=1)
    with pytest.raises(ValueError, match="micro_batch must be a positive number of images, got 0"):
        fit(seeded_model(config), mnist_small[0][:64], mnist_small[1][:8], config, progress=False, micro_batch=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_number_of_workers_does_not_change_the_result(mnist_small, precision):
    """ChunkPool runs a batch's chunks side by side and the gradients are added in chunk
    order, so 1, 2 or 3 workers, or the default that switches between pool and one thread
    as it goes, give the same weights bit for bit (at one PyTorch thread each, which fit()
    sets while a pool runs and restores after). In bfloat16 too: each worker thread enters
    the (thread-local) autocast for its own chunks."""
    x_train, x_test = mnist_small[0][:1024], mnist_small[1][:64]
    config = tiny_config(epochs=2, batch_size=128, precision=precision)
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


# ------------------------------------------------- a library call leaves the process as it was

class TinyConvAutoencoder(nn.Module):
    """A user's own model, nothing of aekit's: forward in [0, 1] and logits, as fit asks."""

    def __init__(self, fail_at_call: int | None = None):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)           # (n, 4, 14, 14)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)                      # (n, 4, 14, 14)
        self.up = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)    # (n, 1, 28, 28)
        self.calls, self.fail_at_call = 0, fail_at_call

    def logits(self, x):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("the user's model failed")
        return self.up(torch.relu(self.mix(torch.relu(self.down(x)))))

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


def test_fit_that_fails_mid_training_gives_the_model_back_contiguous(mnist_small):
    """fit trains channels_last on the CPU; whatever happens, the caller's model (and the
    optimiser's moments) come back in the layout they had."""
    config = tiny_config(epochs=1, batch_size=32)
    torch.manual_seed(0)
    model = TinyConvAutoencoder(fail_at_call=3)
    optimizer = make_optimizer(model, config)
    with pytest.raises(RuntimeError, match="the user's model failed"):
        fit(model, mnist_small[0][:256], mnist_small[1][:8], config, optimizer=optimizer, progress=False,
            workers=1)
    assert model.calls == 3 and all(p.is_contiguous() for p in model.parameters())
    for param in model.parameters():
        for value in optimizer.state[param].values():
            if value.shape == param.shape:
                assert value.stride() == param.stride()


def test_evaluate_on_the_cpu_runs_its_workers_at_one_thread_and_leaves_the_callers_threads(mnist_small):
    """With one worker, chunks run on the caller's PyTorch threads; with several (the
    default: one per core) each runs one thread, and the caller's count comes back after."""
    seen = []

    class Recording(TinyConvAutoencoder):
        def logits(self, x):
            seen.append(torch.get_num_threads())
            return super().logits(x)

    torch.set_num_threads(2)
    evaluate(Recording(), mnist_small[1][:200], "bce", workers=1)
    assert seen and set(seen) == {2}
    seen.clear()
    evaluate(Recording(), mnist_small[1][:200], "mse", workers=2)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_fit_and_evaluate_leave_the_allocator_alone(mnist_small, monkeypatch):
    """glibc's mallopt is a process-wide choice: the CLI makes it, a library call never does."""
    import ctypes

    from aekit import fast

    loaded = []
    monkeypatch.setattr(fast, "_KEPT", False)  # as in a fresh process
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: loaded.append(name))
    config = tiny_config(epochs=1)
    model = seeded_model(config)
    fit(model, mnist_small[0][:128], mnist_small[1][:64], config, progress=False)
    evaluate(model, mnist_small[1][:64])
    assert loaded == []


# ------------------------------------------------------------- fit for the user's own model

@pytest.mark.filterwarnings("ignore::aekit.collapse.CollapseWarning")  # 8 steps from PyTorch's init
def test_the_readme_library_example_runs_as_written(mnist):
    """README: fit(model, x_train, x_val, TrainConfig(epochs=5)) with load_dataset's uint8
    (n, 28, 28) arrays: the recipe fills in the rest; numpy images are converted as the
    run's data are, so the result is the one of prepare_images' tensors, bit for bit."""
    (x_train, _), (x_test, _) = mnist
    x_train, x_test = x_train[:256], x_test[:64]
    weights = []
    for train, val in ((x_train, x_test), (prepare_images(x_train), prepare_images(x_test))):
        torch.manual_seed(0)
        model = SeedAutoencoder()
        state = fit(model, train, val, TrainConfig(epochs=1), progress=False)
        assert state.epoch == 1 and math.isfinite(state.history[0].val_mse)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.filterwarnings("ignore::aekit.collapse.CollapseWarning")  # 2 steps on 64 images: not about quality
def test_fit_trains_the_model_it_is_given_on_that_models_objective(mnist):
    """TrainConfig() names the default family, pca-conv, whose only objective is mse; fit
    trains the model it is given, here the seed network, on the recipe's loss (bce), which
    that model offers: the config's family does not choose another model's loss."""
    seen = []

    class Recording(SeedAutoencoder):
        def loss(self, x, target, objective):
            seen.append(objective)
            return super().loss(x, target, objective)

    config = TrainConfig(epochs=1)
    assert config.resolved().loss == "mse" and config.resolved(Recording()).loss == "bce"
    x = mnist[0][0][:64]
    fit(Recording(), x, x[:32], config, progress=False)
    assert seen and set(seen) == {"bce"}
    with pytest.raises(ValueError, match=r"unknown loss 'l1'; expected one of mse, bce \(the objectives "
                                         r"ForwardOnly offers\)"):
        fit(ForwardOnly(), x, x[:32], TrainConfig(epochs=1, loss="l1"), progress=False)


def test_fit_trains_a_users_own_module(mnist):
    (x_train, _), (x_test, _) = mnist
    torch.manual_seed(0)
    model = TinyConvAutoencoder()
    before = evaluate(model, prepare_images(x_test[:200])).mse
    state = fit(model, x_train[:2000], x_test[:200], TrainConfig(epochs=2), progress=False)
    assert state.history[-1].val_mse < 0.5 * before


class ForwardOnly(nn.Module):
    """Reconstructions in [0, 1] but no logits: enough for loss="mse", not for "bce"."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (x * self.scale).clamp(0, 1)


def test_fit_says_what_a_model_must_provide(mnist_small):
    x_train, x_val = mnist_small[0][:64], mnist_small[1][:8]
    with pytest.raises(TypeError, match=r"^fit: loss='bce' needs model.logits\(x\)"):
        fit(ForwardOnly(), x_train, x_val, TrainConfig(epochs=1), progress=False)
    assert fit(ForwardOnly(), x_train, x_val, TrainConfig(epochs=1, loss="mse"), progress=False).epoch == 1
    with pytest.raises(TypeError, match=r"^fit: model must be a torch.nn.Module, got function"):
        fit(lambda x: x, x_train, x_val, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"^fit: the model has no parameters to train"):
        fit(nn.Identity(), x_train, x_val, TrainConfig(epochs=1, loss="mse"), progress=False)
    split = ForwardOnly()
    split.other = nn.Parameter(torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match=r"^fit: the model's parameters are on 2 devices \(cpu, meta\)"):
        fit(split, x_train, x_val, TrainConfig(epochs=1, loss="mse"), progress=False)
    with pytest.raises(TypeError, match=r"^fit: config must be a TrainConfig"):
        fit(ForwardOnly(), x_train, x_val, {"epochs": 1}, progress=False)


@pytest.mark.parametrize("x, message", [
    (np.zeros((4, 1, 28, 28), np.uint8), r"^fit: x_train is a numpy array of shape \(4, 1, 28, 28\)"),
    (np.zeros((4, 28, 28), np.int64), r"^fit: x_train: images must be uint8 or float"),
    (torch.zeros(4, 28, 28), r"^fit: x_train must be a float tensor \(n, C, H, W\)"),
    (torch.zeros(0, 1, 28, 28), r"^fit: x_train holds no images"),
    ([[0.5]], r"^fit: x_train must be images"),
])
def test_fit_refuses_images_it_cannot_train_on(mnist_small, x, message):
    error = TypeError if isinstance(x, list) else ValueError
    with pytest.raises(error, match=message):
        fit(seeded_model(tiny_config()), x, mnist_small[1][:8], TrainConfig(epochs=1), progress=False)


# ------------------------------------------------------------------ Ctrl-C between two steps

def interrupt_after_step(monkeypatch, k: int, hard: bool = False) -> None:
    """Ctrl-C (SIGINT to this process) as training step k returns; ``hard``: a
    KeyboardInterrupt raised inside the step instead, as a second Ctrl-C would."""
    import os
    import signal

    from aekit import training

    calls = [0]

    def counted(*args, **kwargs):
        loss = train_step(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            if hard:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(training, "train_step", counted)


def test_ctrl_c_hands_on_interrupt_the_exact_step_and_fit_goes_on_from_it(tmp_path, mnist_small, monkeypatch):
    import signal

    x_train, x_val = mnist_small[0][:320], mnist_small[1][:64]
    config = tiny_config(epochs=2, batch_size=32, noise="salt_pepper:0.2")  # 10 steps per epoch
    straight = seeded_model(config)
    expected = fit(straight, x_train, x_val, config, progress=False)

    saved = []

    def save(model, optimizer, state):
        save_checkpoint(model, optimizer, state, tmp_path / "ckpt.safetensors")
        saved.append((state.epoch, state.step))

    interrupt_after_step(monkeypatch, 10 + 4)
    with pytest.raises(KeyboardInterrupt):
        fit(seeded_model(config), x_train, x_val, config, on_interrupt=save, progress=False)
    monkeypatch.undo()
    assert saved == [(1, 4)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back

    resumed = SeedAutoencoder()
    optimizer = make_optimizer(resumed, config)
    state = load_checkpoint(resumed, optimizer, tmp_path / "ckpt.safetensors")
    assert (state.epoch, state.step, state.steps_per_epoch) == (1, 4, 10) and state.loss_sum > 0
    state = fit(resumed, x_train, x_val, config, optimizer=optimizer, state=state, progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [r.loss for r in state.history] == [r.loss for r in expected.history]
    assert (state.step, state.loss_sum, state.seconds) == (0, 0.0, 0.0)


def test_an_interrupt_that_cuts_a_step_saves_nothing(mnist_small, monkeypatch):
    """A KeyboardInterrupt from inside a step (a second Ctrl-C, or one outside the main
    thread) leaves the model part-way through an update: on_interrupt is not called."""
    config = tiny_config(epochs=1, batch_size=32)
    saved = []
    interrupt_after_step(monkeypatch, 3, hard=True)
    with pytest.raises(KeyboardInterrupt):
        fit(seeded_model(config), mnist_small[0][:320], mnist_small[1][:8], config,
            on_interrupt=lambda *args: saved.append(args), progress=False)
    assert saved == []


def test_a_state_part_way_through_an_epoch_must_fit_the_run(mnist_small):
    config = tiny_config(epochs=1, batch_size=32)
    x_train, x_val = mnist_small[0][:320], mnist_small[1][:8]
    with pytest.raises(ValueError, match=r"^fit: state is part-way through an epoch of 12 steps, but x_train "
                                         r"and batch_size make 10"):
        fit(seeded_model(config), x_train, x_val, config, state=TrainState(step=3, steps_per_epoch=12))
    with pytest.raises(ValueError, match=r"^fit: state is part-way through epoch 2, but config.epochs is 1"):
        fit(seeded_model(config), x_train, x_val, config,
            state=TrainState(epoch=1, history=[EpochRecord(1, 0.1, 0.1, 0.1, 1.0, 1.0)], step=3, steps_per_epoch=10))


def test_a_checkpoint_state_from_before_steps_loads_between_epochs():
    old = {"epoch": 1, "history": [dataclasses.asdict(EpochRecord(1, 0.1, 0.1, 0.1, 1.0, 1.0))],
           "best_val_loss": 0.1, "epochs_since_best": 0, "stopped_early": False}
    state = TrainState.from_dict(old)
    assert (state.epoch, state.step, state.loss_sum) == (1, 0, 0.0)
    with pytest.raises(ValueError, match="inconsistent progress: step 11 of 10"):
        TrainState.from_dict({**old, "step": 11, "steps_per_epoch": 10})


def test_bfloat16_runs_the_forward_pass_in_bfloat16_and_trains_float32_weights(mnist_small):
    """precision="bfloat16": every convolution of the step (the fast twin's ConvToOne
    included) computes in bfloat16; the loss, the weights and their gradients stay float32,
    and the loss is float32's to bfloat16's precision."""
    x = mnist_small[0][:64]
    config = tiny_config()
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = seeded_model(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the grads
        with fast.on_cpu(model, optimizer) as twin:
            seen = []
            hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, o.dtype)))
                     for m in twin.modules() if isinstance(m, nn.Conv2d)]
            losses[precision], _ = train_step(twin, x, x, "bce", optimizer, 32, precision=precision)
            for hook in hooks:
                hook.remove()
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        assert {name for name, _ in seen} == {"Conv2d", "ConvToOne"}
        assert all(d == dtype for _, d in seen), seen
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bfloat16"].dtype == torch.float32
    # bfloat16 keeps 8 significant bits: each product's inputs are rounded by up to 2^-9
    # (0.2%) of their size, with random signs, and the loss sums 64 x 784 pixels: it moved by
    # 4.4e-4 (relative) on a Zen 4. Those roundings are the same on every x86 CPU (round to
    # nearest even of the same float32 values; products exact, sums in float32), so another
    # CPU moves it by that and its float32 summation order (~1e-6); 1% is over 20x that.
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], rtol=1e-2, atol=0)


def test_precision_is_checked_by_name_and_device():
    with pytest.raises(ValueError, match="unknown precision 'float16'; expected one of float32, bfloat16"):
        tiny_config(precision="float16")
    with pytest.raises(ValueError, match="precision='bfloat16' trains on the CPU or a CUDA GPU, not on 'mps'"):
        fast.mixed_precision(torch.device("mps"), "bfloat16")
