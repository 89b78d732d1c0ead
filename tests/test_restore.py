"""model="restore": the turns against NumPy's rot90, the training loss on turned images, the
outlier score as its formula, and the family through the CLI and the estimator."""

import numpy as np
import pytest
import torch

from aekit import ConvAutoencoder
from aekit.models import logits_loss
from aekit.models.restore import OUTLIER_SCORE, TURNS, TURNS_NOT_SQUARE, RestoreAutoencoder, turn, turns


def numpy_turned(x: torch.Tensor, quarters) -> np.ndarray:
    """Each (C, H, W) image turned counter-clockwise by its quarters, as NumPy turns it."""
    return np.stack([np.rot90(image, int(k), axes=(1, 2)) for image, k in zip(x.numpy(), quarters)])


def test_turn_gives_each_image_its_own_turn(rng):
    x = torch.from_numpy(rng.random((8, 2, 5, 5), dtype=np.float32))
    quarters = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert np.array_equal(turn(x, quarters).numpy(), numpy_turned(x, quarters.tolist()))
    assert turns((1, 28, 28)) == TURNS == (0, 1, 2, 3) and turns((3, 28, 32)) == TURNS_NOT_SQUARE == (0, 2)


def encoded_inputs(model: RestoreAutoencoder, x: torch.Tensor, objective: str = "bce"):
    """The training loss of ``x`` (as its own target), and the images the encoder was given."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        loss = model.loss(x, x, objective)
    finally:
        handle.remove()
    return loss, seen


@pytest.mark.parametrize("shape", [(1, 12, 12), (3, 8, 12)])
def test_the_loss_restores_each_image_from_a_turn_drawn_by_its_batch(rng, shape):
    """Every image goes in turned by one of its shape's turns (each turn taken in a batch of
    64), the loss is the reconstruction loss of the untouched target from those, and the same
    batch draws the same turns (in any thread, and again when a run resumes)."""
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,))
    x = torch.from_numpy(rng.random((64, *shape), dtype=np.float32))
    loss, (given,) = encoded_inputs(model, x)
    quarters = []
    for image, fed in zip(x.numpy(), given.numpy()):
        matches = [k for k in turns(shape) if np.array_equal(np.rot90(image, k, axes=(1, 2)), fed)]
        assert len(matches) == 1
        quarters.append(matches[0])
    assert set(quarters) == set(turns(shape))
    expected = logits_loss(model.decoder.logits(model.encoder(torch.from_numpy(numpy_turned(x, quarters)))), x, "bce")
    assert torch.equal(loss.total, expected.total)
    again, (given_again,) = encoded_inputs(model, x)
    assert torch.equal(given_again, given) and torch.equal(again.total, loss.total)
    with pytest.raises(ValueError, match=r"^unknown objective 'huber' for model='restore'; expected one of"):
        model.loss(x, x, "huber")


@pytest.mark.parametrize("shape", [(1, 12, 12), (2, 8, 12)])
def test_the_outlier_score_is_the_mean_error_of_restoring_each_turn(rng, shape):
    torch.manual_seed(0)
    model = RestoreAutoencoder(shape, latent_dim=4, widths=(4,)).eval()
    x = torch.from_numpy(rng.random((6, *shape), dtype=np.float32))
    with torch.no_grad():
        restored = [model(torch.from_numpy(numpy_turned(x, [k] * len(x)))).double().clamp(0, 1).numpy()
                    for k in turns(shape)]
        score = model.outlier_score(x)
    expected = np.mean([((r - x.double().numpy()) ** 2).reshape(len(x), -1).mean(1) for r in restored], axis=0)
    assert score.dtype == torch.float64 and score.shape == (len(x),)
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-12)


def test_restore_trains_from_the_cli_and_the_estimator_and_scores_with_its_own_score(tmp_path, mnist):
    import json

    from aekit.cli import main

    (x_train, _), (x_test, _) = mnist
    run = tmp_path / "run"
    assert main(["train", "--model", "restore", "--latent-dim", "4", "--limit", "200", "--epochs", "1",
                 "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["outlier_score"] == OUTLIER_SCORE
    estimator = ConvAutoencoder(model="restore", latent_dim=4, epochs=1, random_state=0).fit(x_train[:200])
    assert isinstance(estimator.model_, RestoreAutoencoder)
    x = x_test[:20]
    scores = -estimator.score_samples(x)
    with torch.no_grad():
        expected = estimator.model_.outlier_score(torch.from_numpy(x).float().div(255).unsqueeze(1)).numpy()
    # The estimator runs the model on aekit.fast's CPU path (other kernels, other float32
    # rounding): the tolerance of test_estimator's test_answers_do_not_depend_on_the_batch.
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    loaded = ConvAutoencoder.load(estimator.save(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.score_samples(x), estimator.score_samples(x))
