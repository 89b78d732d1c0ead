"""An autoencoder whose code keeps the images' neighbourhoods: ``model="map"``.

Trained on the reconstruction loss plus a neighbourhood term in the manner of Parametric
UMAP (Sainburg, McInnes & Gentner 2021). When a run starts,
:meth:`MapAutoencoder.training_data` finds the :data:`NEIGHBOURS` nearest neighbours of
every image of (a random sample of) the training images. Each training step then also
encodes a sample of that graph, :data:`HEADS_PER_IMAGE` random images per image of the batch
with :data:`PER_HEAD` of each one's neighbours, and minimises UMAP's cross-entropy in the
code space over every graph edge between two images of the sample, with the batch's own
images (random images) as the negative samples::

    q(d2)  = 1 / (1 + a d2^b)                     UMAP's curve for min_dist 0.1; d2 = |z_i - z_j|^2
    edge   = -log q(d2(z_i, z_j)) - NEGATIVES * mean_b log(1 - q(d2(z_i, z_b)))
    total  = reconstruction + WEIGHT * mean over edges

The attraction pulls the two ends of each edge together; the repulsion pushes every head
away from random images, weighted as UMAP's :data:`NEGATIVES` negative samples per edge.
Drawing neighbours together gives several edges per encoded image (the neighbours of a
head are often each other's), which is what makes the term affordable on a CPU.

The reconstruction term is the conv autoencoder's (``"bce"`` or ``"mse"``). The encoder and
decoder are :class:`~aekit.models.blocks.ConvEncoder` / :class:`~aekit.models.blocks.ConvDecoder`
with a hidden dense layer of :data:`HIDDEN` units next to the code: a 2-number code laid out as
UMAP lays it out is far from linear in the conv features.

Streamed data works: the graph is built on a random sample of at most :data:`GRAPH_IMAGES`
training images (and at most :data:`GRAPH_BYTES` of them as float32), read once from the
source and kept in memory while the model trains; the reconstruction term sees every
image, batch by batch, as for any model. Neighbours are found by exact search
(scikit-learn) among the sample's top :data:`GRAPH_COMPONENTS` principal-component scores.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from aekit.models.base import Autoencoder, Loss, batch_generator, draw_seed, logits_loss
from aekit.models.blocks import ConvDecoder, ConvEncoder, ConvOptions
from aekit.models.registry import register

HIDDEN = 256            # the dense layer between the conv features and the code, both ways
NEIGHBOURS = 15         # k of the graph (UMAP's default n_neighbors)
HEADS_PER_IMAGE = 1     # graph images drawn at random per image of the batch ...
PER_HEAD = 7            # ... each with this many of its neighbours
NEGATIVES = 5           # negative samples per edge (UMAP's negative_sample_rate)
WEIGHT = 1.0            # the neighbourhood term's weight beside the per-pixel reconstruction
GRAPH_IMAGES = 60000    # the graph's images: a random sample of at most this many ...
GRAPH_BYTES = 2 ** 30   # ... taking at most this much memory as float32
GRAPH_COMPONENTS = 50   # neighbours are searched among this many principal-component scores
# UMAP's curve for min_dist=0.1, spread=1.0, as umap.umap_.find_ab_params fits it.
CURVE_A, CURVE_B = 1.5769434603113077, 0.8950608779109733


class NeighbourGraph:
    """Images (n, C, H, W) and the indices (n, k) of each one's k nearest neighbours, itself
    excluded. Read-only, so a copy of the model (fast.ChunkPool's threads) shares it."""

    def __init__(self, images: torch.Tensor, neighbours: torch.Tensor):
        self.images, self.neighbours = images, neighbours

    def __deepcopy__(self, memo) -> NeighbourGraph:
        return self

    @classmethod
    def build(cls, images: torch.Tensor, k: int = NEIGHBOURS, seed: int = 0) -> NeighbourGraph:
        """The graph of ``images`` (n, C, H, W): exact neighbours among their top
        :data:`GRAPH_COMPONENTS` principal-component scores (all pixels if there are fewer)."""
        from sklearn.decomposition import PCA
        from sklearn.neighbors import NearestNeighbors

        flat = images.flatten(1).cpu().numpy()                                       # (n, C*H*W)
        k = min(k, len(flat) - 1)
        if k < 1:
            raise ValueError(f"model='map' needs at least 2 training images to find neighbours, got {len(flat)}")
        if min(flat.shape) > GRAPH_COMPONENTS:
            flat = PCA(GRAPH_COMPONENTS, svd_solver="randomized", random_state=seed).fit_transform(flat)
        neighbours = NearestNeighbors(n_neighbors=k).fit(flat).kneighbors(return_distance=False)  # (n, k)
        return cls(images, torch.from_numpy(neighbours))

    def sample(self, heads: int, per_head: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``heads`` random images and ``per_head`` random neighbours of each: (index (g,)
        of the distinct images drawn, edges (m, 2) as positions in ``index``): every edge
        of the graph from one of them to another."""
        n, k = self.neighbours.shape
        drawn = torch.randint(n, (heads,), generator=generator)
        chosen = torch.rand(heads, k, generator=generator).argsort(1)[:, :per_head]     # (heads, per_head)
        index = torch.cat([drawn, self.neighbours[drawn].gather(1, chosen).flatten()]).unique()  # (g,)
        position = torch.full((n,), -1, dtype=torch.long)
        position[index] = torch.arange(len(index))
        tails = position[self.neighbours[index]]                                         # (g, k); -1: not drawn
        head, column = (tails >= 0).nonzero(as_tuple=True)                               # (m,) each
        return index, torch.stack([head, tails[head, column]], dim=1)


def umap_similarity(squared_distance: torch.Tensor) -> torch.Tensor:
    """UMAP's similarity of two codes from their squared distance: 1 / (1 + a d2^b)."""
    return 1.0 / (1.0 + CURVE_A * squared_distance.clamp_min(1e-12).pow(CURVE_B))


class MapDecoder(nn.Module):
    """(n, latent_dim) -> (n, C, H, W) in [0, 1]: a hidden dense layer, then a ConvDecoder."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, widths: tuple[int, ...],
                 feature_shape: tuple[int, int, int]):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU())   # (n, HIDDEN)
        self.conv = ConvDecoder(image_shape, HIDDEN, widths, feature_shape)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv.logits(self.hidden(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


@register("map")
class MapAutoencoder(Autoencoder):
    """A conv autoencoder whose code keeps the training images' neighbours near each other;
    see the module docstring. ``encode``: (n, C, H, W) -> (n, latent_dim)."""

    Options = ConvOptions

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = Options.latent_dim,
                 widths: tuple[int, ...] = Options.widths):
        super().__init__()
        self.Options(latent_dim, widths).check(image_shape)
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        features = ConvEncoder(self.image_shape, HIDDEN, tuple(widths))      # (n, HIDDEN)
        self.encoder = nn.Sequential(features, nn.ReLU(), nn.Linear(HIDDEN, latent_dim))
        self.decoder = MapDecoder(self.image_shape, latent_dim, tuple(widths), features.feature_shape)
        self.graph: NeighbourGraph | None = None  # set while the model trains (training_data)
        self.graph_seed = draw_seed()  # the seed of the graph samples

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    @contextlib.contextmanager
    def training_data(self, images, new: bool):
        """The neighbour graph of a random sample of the training images, while the model
        trains. A continued run builds the same graph again (checkpoints hold weights only)."""
        sample = images.sample(min(GRAPH_IMAGES, GRAPH_BYTES // (4 * math.prod(self.image_shape))), seed=0)
        self.graph = NeighbourGraph.build(sample.to(next(self.parameters()).device))  # (n, C, H, W) images
        try:
            yield
        finally:
            self.graph = None

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        """The reconstruction loss under ``objective``; while training (in ``training_data``
        and train mode), plus :data:`WEIGHT` times the neighbourhood term (part "neighbours")."""
        self.check_objective(objective, "map")
        z_batch = self.encoder(x)                                                        # (n, d)
        recon = logits_loss(self.decoder.logits(z_batch), target, objective)
        if self.graph is None or not self.training:
            return recon
        generator = batch_generator(self.graph_seed, x, device="cpu")  # the graph's indices live on the CPU
        index, edges = self.graph.sample(HEADS_PER_IMAGE * len(x), PER_HEAD, generator)
        z = self.encoder(self.graph.images[index])                                       # (g, d)
        head, tail = z[edges[:, 0]], z[edges[:, 1]]                                      # (m, d)
        attract = -torch.log(umap_similarity((head - tail).pow(2).sum(1)))               # (m,)
        # 1 - q floored at 1e-4, as umap-learn's Parametric UMAP clips it: at most -log(1e-4) a pair.
        squared = (z[:, None, :] - z_batch[None, :, :]).pow(2).sum(2)                      # (g, n)
        repel = -torch.log1p(1e-4 - umap_similarity(squared)).mean(1)                    # (g,)
        neighbours = (attract + NEGATIVES * repel[edges[:, 0]]).mean()
        return Loss(recon.total + WEIGHT * neighbours, recon.reconstruction,
                           {"reconstruction": recon.total, "neighbours": neighbours})

