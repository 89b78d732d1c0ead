"""model="map": the neighbour graph, the neighbourhood term, training from memory and from a
stream, and codes whose neighbours are right more often than the plain autoencoder's."""

import copy

import numpy as np
import pytest
import torch

from aekit import ConvAutoencoder, models
from aekit.data import NpyStream, prepare_images
from aekit.models.map import MapAutoencoder, NeighbourGraph
from aekit.config import TrainConfig
from aekit.training import fit
from conftest import one_error_line


def knn_accuracy(estimator, x_train, y_train, x_test, y_test) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=5).fit(estimator.transform(x_train), y_train)
    return float(knn.score(estimator.transform(x_test), y_test))


def test_the_graph_holds_each_images_nearest_neighbours(rng):
    """Exact neighbours, itself excluded; on images of more than 50 pixels, among the top 50
    principal-component scores, which keep most neighbours of MNIST digits."""
    images = torch.from_numpy(rng.random((300, 1, 6, 6), dtype=np.float32))  # 36 pixels: searched as they are
    graph = NeighbourGraph.build(images, k=5)
    distances = torch.cdist(images.flatten(1), images.flatten(1)).fill_diagonal_(float("inf"))
    assert torch.equal(graph.neighbours.sort(1).values, distances.topk(5, largest=False).indices.sort(1).values)


def test_a_sample_holds_every_graph_edge_between_its_images_and_no_other(rng):
    images = torch.from_numpy(rng.random((200, 1, 4, 4), dtype=np.float32))
    graph = NeighbourGraph.build(images, k=6)
    index, edges = graph.sample(10, 3, torch.Generator().manual_seed(0))
    drawn = set(index.tolist())
    assert len(drawn) == len(index) and len(index) > 10  # distinct: the seeds and some neighbours
    found = {(int(index[a]), int(index[b])) for a, b in edges}
    expected = {(i, j) for i in drawn for j in graph.neighbours[i].tolist() if j in drawn}
    assert found == expected and len(found) >= 30  # at least the 10 x 3 seed edges


def test_the_neighbourhood_term_counts_only_while_training(rng):
    """In training (graph built, train mode) the loss adds the weighted term to the
    reconstruction; in evaluation and outside a run it is the reconstruction loss alone."""
    torch.manual_seed(0)
    model = MapAutoencoder((1, 8, 8), latent_dim=2, widths=(4,))
    x = torch.from_numpy(rng.random((16, 1, 8, 8), dtype=np.float32))
    with torch.no_grad():
        plain = models.logits_loss(model.decoder.logits(model.encoder(x)), x, "bce").total
    loss = lambda: model.loss(x, x, "bce").total.detach()  # noqa: E731
    assert torch.equal(loss(), plain)
    model.graph = NeighbourGraph.build(x, k=4)
    trained = model.loss(x, x, "bce")
    term = float(trained.parts["neighbours"].detach())
    assert float(trained.parts["reconstruction"].detach()) == float(plain) and term > 0
    assert float(trained.total.detach()) == pytest.approx(float(plain) + term)
    assert torch.equal(loss(), trained.total.detach())  # the same images draw the same edges
    model.eval()
    assert torch.equal(loss(), plain)
    assert copy.deepcopy(model).graph is model.graph  # fast.ChunkPool's copies share it, not copy it


@pytest.mark.filterwarnings("ignore::aekit.collapse.CollapseWarning")  # 1 epoch of 19 steps: not about quality
def test_fit_builds_the_graph_from_a_stream_and_lets_it_go(tmp_path, mnist, monkeypatch):
    """A stream is read for the graph's sample, then trained on batch by batch; the graph
    (the sample of images) is held only while training."""
    (x_train, _), (x_test, _) = mnist
    path = tmp_path / "train.npy"
    np.save(path, x_train[:600])
    torch.manual_seed(0)
    model = MapAutoencoder(latent_dim=2, widths=(4, 8))
    seen = []
    build = NeighbourGraph.build
    monkeypatch.setattr(NeighbourGraph, "build", classmethod(lambda cls, images: seen.append(len(images)) or build(images)))
    state = fit(model, NpyStream(path), prepare_images(x_test[:100]), TrainConfig(model="map", epochs=1).resolved(),
                progress=False)
    assert seen == [600] and model.graph is None
    assert state.history[-1].parts["neighbours"] > 0 and np.isfinite(state.history[-1].val_loss)


@pytest.mark.heavy
def test_map_codes_keep_neighbours_better_than_the_plain_autoencoders(mnist):
    """The reason the model exists, on a budget a test affords: 2 numbers per digit from
    2,000 training images for 5 epochs, 5-NN accuracy on 1,000 test digits. Measured: map
    0.555, conv 0.281; map without its neighbourhood term (WEIGHT = 0) 0.325. (At 8 epochs:
    0.575-0.584, 0.281-0.284 and 0.451; 1,200 images for 8 epochs leave a margin of 0.19.)"""
    (x_train, y_train), (x_test, y_test) = mnist
    x_train, y_train, x_test, y_test = x_train[:2000], y_train[:2000], x_test[:1000], y_test[:1000]
    accuracy = {}
    for model in ("map", "conv"):
        estimator = ConvAutoencoder(model=model, latent_dim=2, epochs=5, random_state=0).fit(x_train)
        accuracy[model] = knn_accuracy(estimator, x_train, y_train, x_test, y_test)
    assert accuracy["map"] > accuracy["conv"] + 0.2, accuracy


def test_cli_trains_a_map_and_draws_its_decoded_grid(map_run, tmp_path, capsys):
    """`aekit train --model map` and `aekit sample RUN --grid SIDE`: the grid the report shows,
    decoded from the codes of the run's test images; a run without a 2-number code, and --n or
    --seed beside --grid, are refused."""
    from PIL import Image

    from aekit.cli import main
    from aekit.inference import encode
    from aekit.plots import latent_grid
    from aekit.runs import load_split
    from aekit.weights import load_model

    run, grid = map_run, tmp_path / "grid.png"  # aekit train --model map --latent-dim 2 --limit 300 --epochs 1
    assert main(["sample", str(run), "--grid", "4", "--out", str(grid)]) == 0
    model, config = load_model(run)
    expected = latent_grid(model, encode(model, load_split(config, None)[1].first(2000)), n=4).image
    assert np.array_equal(np.asarray(Image.open(grid)), expected) and expected.shape == (112, 112)
    capsys.readouterr()
    assert main(["sample", "tests/data/run-0.1.0", "--grid", "4", "--out", str(tmp_path / "g.png")]) == 2
    assert "a latent grid needs a model whose latent has 2 numbers" in one_error_line(capsys)
    assert main(["sample", str(run), "--grid", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "--grid must be at least 2" in one_error_line(capsys)
    for extra in (["--n", "9"], ["--seed", "0"]):  # --grid draws nothing at random
        assert main(["sample", str(run), "--grid", "4", *extra, "--out", str(tmp_path / "g.png")]) == 2
        assert "--n and --seed do not apply" in one_error_line(capsys)
    assert not (tmp_path / "g.png").exists()
