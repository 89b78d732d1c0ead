"""model="restore": the turns and shifts against NumPy's rot90 and slicing, the training loss
on transformed images, the outlier score as its formula, the turn head's loss and score
against a direct computation, and the family through the CLI and the estimator."""

import numpy as np
import pytest
import torch

from aekit import ConvAutoencoder
from aekit.models import logits_loss
from aekit.models.restore import (OUTLIER_SCORE, OUTLIER_SCORE_WITH_TURNS, TURNS, TURNS_NOT_SQUARE,
                                  RestoreAutoencoder, transform, transform_each, transformations, turns)
from conftest import one_error_line


def numpy_transformed(image: np.ndarray, quarters: int, down: int, right: int) -> np.ndarray:
    """A (C, H, W) image moved down and right (zeros moved in), then turned counter-clockwise
    by its quarters, as NumPy slices and turns it."""
    _, height, width = image.shape
    moved = np.zeros_like(image)
    moved[:, max(down, 0):height + min(down, 0), max(right, 0):width + min(right, 0)] = \
        image[:, max(-down, 0):height - max(down, 0), max(-right, 0):width - max(right, 0)]
    return np.rot90(moved, quarters, axes=(1, 2))


def test_the_transformations_are_each_turn_of_the_image_moved_or_not(rng):
    """Each turn (four for a square image, the half turn for others), of the image as it is
    and moved by round(shift * side) pixels down, up, right, left; the turns alone, in
    their order, without a shift. Each image of a batch takes its own, as NumPy computes it."""
    assert turns((1, 28, 28)) == TURNS == (0, 1, 2, 3) and turns((3, 28, 32)) == TURNS_NOT_SQUARE == (0, 2)
    assert transformations((1, 28, 28), 0.0) == tuple((k, 0, 0) for k in TURNS)
    assert transformations((3, 28, 32), 0.0) == ((0, 0, 0), (2, 0, 0))
    moves = ((0, 0), (6, 0), (-6, 0), (0, 6), (0, -6))  # 0.2 * 28 = 5.6 pixels
    assert transformations((1, 28, 28), 0.2) == tuple((k, dy, dx) for k in TURNS for dy, dx in moves)
    moves = ((0, 0), (7, 0), (-7, 0), (0, 8), (0, -8))  # 0.25 of 28 and of 32
    assert transformations((3, 28, 32), 0.25) == tuple((k, dy, dx) for k in (0, 2) for dy, dx in moves)

    for shape, shift in (((2, 5, 5), 0.4), ((2, 5, 7), 0.3)):
        table = transformations(shape, shift)
        x = torch.from_numpy(rng.random((3 * len(table), *shape), dtype=np.float32))
        picks = torch.arange(len(x)).flip(0) % len(table)
        expected = np.stack([numpy_transformed(image, *table[i]) for image, i in zip(x.numpy(), picks.tolist())])
        assert np.array_equal(transform_each(x, picks, table).numpy(), expected)
        for t in table:
            assert np.array_equal(transform(x, *t).numpy(), np.stack([numpy_transformed(i, *t) for i in x.numpy()]))


def encoded_inputs(model: RestoreAutoencoder, x: torch.Tensor, objective: str = "bce"):
    """The training loss of ``x`` (as its own target), and the images the encoder was given."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        loss = model.loss(x, x, objective)
    finally:
        handle.remove()
    return loss, seen


def drawn(model: RestoreAutoencoder, x: torch.Tensor, given: torch.Tensor) -> list[int]:
    """The index in ``model.transformations`` of the one transformation of each image of ``x``
    that gives the encoder's input."""
    picks = []
    for image, fed in zip(x.numpy(), given.numpy()):
        matches = [i for i, t in enumerate(model.transformations) if np.array_equal(numpy_transformed(image, *t), fed)]
        assert len(matches) == 1
        picks.append(matches[0])
    return picks


@pytest.mark.parametrize("shape, shift", [((1, 12, 12), 0.0), ((3, 8, 12), 0.0), ((1, 12, 12), 0.25), ((3, 8, 12), 0.3)])
def test_the_loss_restores_each_image_from_a_transformation_drawn_by_its_batch(rng, shape, shift):
    """Every image goes in given one of its shape's transformations (each taken in a batch of
    128), the loss is the reconstruction loss of the untouched target from those, and the
    same batch draws the same transformations (in any thread, and again when a run resumes)."""
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=0, shift=shift)
    x = torch.from_numpy(rng.random((128, *shape), dtype=np.float32))
    loss, (given,) = encoded_inputs(model, x)
    picks = drawn(model, x, given)
    assert set(picks) == set(range(len(transformations(shape, shift))))
    fed = np.stack([numpy_transformed(image, *model.transformations[i]) for image, i in zip(x.numpy(), picks)])
    expected = logits_loss(model.decoder.logits(model.encoder(torch.from_numpy(fed))), x, "bce")
    assert torch.equal(loss.total, expected.total)
    again, (given_again,) = encoded_inputs(model, x)
    assert torch.equal(given_again, given) and torch.equal(again.total, loss.total)
    with pytest.raises(ValueError, match=r"^unknown objective 'huber' for model='restore'; expected one of"):
        model.loss(x, x, "huber")


def numpy_all_transformed(x: torch.Tensor, t: tuple[int, int, int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([numpy_transformed(image, *t) for image in x.numpy()]))


@pytest.mark.parametrize("shape, shift", [((1, 12, 12), 0.0), ((2, 8, 12), 0.0), ((2, 8, 12), 0.3)])
def test_the_outlier_score_is_the_mean_error_of_restoring_each_transformation(rng, shape, shift):
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=0, shift=shift).eval()
    x = torch.from_numpy(rng.random((6, *shape), dtype=np.float32))
    with torch.no_grad():
        restored = [model(numpy_all_transformed(x, t)).double().clamp(0, 1).numpy()
                    for t in transformations(shape, shift)]
        score = model.outlier_score(x)
    expected = np.mean([((r - x.double().numpy()) ** 2).reshape(len(x), -1).mean(1) for r in restored], axis=0)
    assert score.dtype == torch.float64 and score.shape == (len(x),)
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-12)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


@pytest.mark.parametrize("shape, shift", [((1, 12, 12), 0.0), ((3, 8, 12), 0.0), ((3, 8, 12), 0.3)])
def test_a_turn_head_adds_the_cross_entropy_of_naming_each_transformation(rng, shape, shift):
    """With turn_head=w the loss is the restoring loss plus w times the cross-entropy of the
    head's logits (from the code of each transformed image) against the transformation it
    was given; the autoencoder's layers and transformations are drawn as without a head,
    which has no extra weights."""
    x = torch.from_numpy(rng.random((64, *shape), dtype=np.float32))
    torch.manual_seed(0)
    plain = RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=0, shift=shift)
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=0.5, shift=shift)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"head.weight", "head.bias", "error_quantiles", "fitted_images"}
    assert model.head.out_features == len(transformations(shape, shift)) and model.turn_seed == plain.turn_seed
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    loss, (given,) = encoded_inputs(model, x)
    picks = drawn(model, x, given)
    with torch.no_grad():
        z = model.encoder(given)
        restoring = logits_loss(model.decoder.logits(z), x, "bce").total
        naming = -log_softmax(model.head(z).double().numpy())[np.arange(len(x)), picks].mean()
    assert set(loss.parts) == {"reconstruction", "turns"}
    parts = {name: float(part.detach()) for name, part in loss.parts.items()}
    assert parts["reconstruction"] == float(restoring)
    assert parts["turns"] == pytest.approx(naming, rel=1e-6)
    assert float(loss.total.detach()) == pytest.approx(float(restoring) + 0.5 * naming, rel=1e-6)
    assert torch.equal(encoded_inputs(plain, x)[1][0], given)  # the same turns as without the head
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"^turn_head must be a non-negative number \(0: no turn head\), got "):
            RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=bad)
    for bad in (-0.1, 0.5, float("nan"), "0.2", True):
        with pytest.raises(ValueError, match=r"^shift must be a fraction of the image's side in \[0, 0.5\) \(0: no shifts\), got "):
            RestoreAutoencoder(shape, latent_dim=4, widths=(4,), shift=bad)
    # 0.06 of 8 rows is 0.48 of a pixel: it would move nothing.
    with pytest.raises(ValueError, match=r"^shift=0.06 moves images of 8x12 pixels by less than a pixel; pass at least 0.125, or 0 "):
        RestoreAutoencoder((3, 8, 12), latent_dim=4, widths=(4,), shift=0.06)


def test_the_outlier_score_with_a_turn_head_is_how_rare_both_errors_are_in_training(rng):
    """score = sum over the two errors (restoring; naming the transformation: the mean over
    transformations of the cross-entropy) of -log((N tail + 1) / (N + 1)), tail the fraction of the N training
    images with a larger error, read from their quantiles as np.interp reads them; the
    restoring error alone until fit_outlier_score has seen the training images."""
    from aekit.data import as_images
    from aekit.models.restore import QUANTILES

    shape = (1, 12, 12)
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,), turn_head=1.0, shift=0.25).eval()
    train = torch.from_numpy(rng.random((300, *shape), dtype=np.float32))
    x = torch.cat([train[:3], torch.from_numpy(rng.random((5, *shape), dtype=np.float32)), torch.ones(2, *shape)])

    def errors(images: torch.Tensor) -> np.ndarray:  # (n, 2): restoring, naming, by NumPy's transformations
        restoring, naming = [], []
        with torch.no_grad():
            for i, t in enumerate(transformations(shape, 0.25)):
                z = model.encoder(numpy_all_transformed(images, t))
                restored = model.decoder(z).double().clamp(0, 1).numpy()
                restoring.append(((restored - images.double().numpy()) ** 2).reshape(len(images), -1).mean(1))
                naming.append(-log_softmax(model.head(z).double().numpy())[:, i])
        return np.stack([np.mean(restoring, 0), np.mean(naming, 0)], 1)

    with torch.no_grad():
        np.testing.assert_allclose(model.outlier_score(x).numpy(), errors(x)[:, 0], rtol=1e-12)  # not fitted
        model.fit_outlier_score(as_images(train))
        score = model.outlier_score(x).numpy()
    seen, levels = errors(train), np.linspace(0, 1, QUANTILES)
    quantiles = np.quantile(seen, levels, axis=0).T                                       # (2, QUANTILES)
    # fit_outlier_score runs the model on aekit.fast's CPU path (other kernels, other float32
    # rounding): the tolerance of test_estimator's test_answers_do_not_depend_on_the_batch.
    np.testing.assert_allclose(model.error_quantiles.numpy(), quantiles, rtol=1e-5)
    assert float(model.fitted_images) == len(train)
    mine = model.error_quantiles.numpy()  # the tails read from the model's own quantiles
    tails = np.stack([1 - np.interp(errors(x)[:, j], mine[j], levels, left=0.0, right=1.0) for j in range(2)], 1)
    expected = -np.log((len(train) * tails + 1) / (len(train) + 1)).sum(1)
    np.testing.assert_allclose(score, expected, rtol=1e-6, atol=1e-9)
    # White images restore worse than every training image: that term alone is log(N + 1),
    # computed as -log(1 / (N + 1)), which float64 may round one unit below NumPy's log(N + 1).
    assert errors(x)[-2:, 0].min() > seen[:, 0].max() and score[-2:].min() >= np.log(len(train) + 1) - 1e-12
    assert model.outlier_score_name == OUTLIER_SCORE_WITH_TURNS + " and shift"


def test_restore_trains_from_the_cli_and_the_estimator_and_scores_with_its_own_score(tmp_path, mnist, capsys):
    """The CLI trains the family without a turn head or shifts; a config.json that names neither
    turn_head nor shift (a restore run from before the options) reads as that, not as the
    defaults. The estimator trains the default, with a head, whose training quantiles (buffers)
    are saved and loaded with the weights."""
    import json

    from aekit.cli import main
    from aekit.weights import load_model

    (x_train, _), (x_test, _) = mnist
    run = tmp_path / "run"
    assert main(["train", "--model", "restore", "--turn-head", "0", "--shift", "0", "--latent-dim", "4", "--limit", "200",
                 "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["outlier_score"] == OUTLIER_SCORE
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["model_params"].pop("turn_head") == 0
    assert recorded["model_params"].pop("shift") == 0
    (run / "config.json").write_text(json.dumps(recorded))
    model, config = load_model(run)
    assert config.model_params["turn_head"] == 0 and not hasattr(model, "head") and model.turn_head == 0
    assert config.model_params["shift"] == 0 and model.transformations == transformations((1, 28, 28), 0.0)
    capsys.readouterr()
    assert main(["train", "--model", "restore", "--turn-head", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "turn_head must be a non-negative number (0: no turn head), got -1.0" in one_error_line(capsys)
    assert main(["train", "--model", "restore", "--shift", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "shift must be a fraction of the image's side in [0, 0.5) (0: no shifts), got 0.5" in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()

    estimator = ConvAutoencoder(model="restore", latent_dim=4, epochs=1, random_state=0).fit(x_train[:200])
    assert isinstance(estimator.model_, RestoreAutoencoder) and estimator.model_.turn_head == 1.0
    assert estimator.model_.transformations == transformations((1, 28, 28), 0.2)  # the default shifts
    assert float(estimator.model_.fitted_images) == 200  # fitted on the training images
    assert estimator.model_.outlier_score_name == OUTLIER_SCORE_WITH_TURNS + " and shift"
    x = x_test[:20]
    scores = -estimator.score_samples(x)
    with torch.no_grad():
        expected = estimator.model_.outlier_score(torch.from_numpy(x).float().div(255).unsqueeze(1)).numpy()
    # The estimator runs the model on aekit.fast's CPU path (other kernels, other float32
    # rounding): the tolerance of test_estimator's test_answers_do_not_depend_on_the_batch.
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    loaded = ConvAutoencoder.load(estimator.save(tmp_path / "saved"))
    assert torch.equal(loaded.model_.error_quantiles, estimator.model_.error_quantiles)
    np.testing.assert_array_equal(loaded.score_samples(x), estimator.score_samples(x))
