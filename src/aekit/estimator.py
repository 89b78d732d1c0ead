"""The autoencoder as a scikit-learn estimator: :class:`ConvAutoencoder`.

It answers the verbs every reconstructor does (:mod:`aekit.reconstructor`: fit, transform,
inverse_transform, reconstruct, and the outlier verbs), as its PCA baseline does
(:class:`aekit.pca.PCAReconstructor`); it trains as ``aekit train`` does
(:mod:`aekit.experiment`), and saves into and loads from the same run folder, adding its
own state (estimator.json: params, threshold and the outlier score it is on, layout,
history), checked when read.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from pathlib import Path

import numpy as np
import torch
from sklearn.utils import check_random_state

from aekit import inference
from aekit import models as models_lib
from aekit.anomaly import recorded_threshold
from aekit.data import layouts
from aekit.data.layouts import LAYOUTS
from aekit._io import atomic_folder, refuse_existing, write_text_atomic
from aekit._typed import is_int, plain
from aekit.reconstructor import _ImageReconstructor, _is_threshold

# params added after 0.2.0, with the value an older save means
_ADDED_PARAMS = {"beta": None, "model_params": None, "precision": "float32"}
_OPTION_PARAMS = ("latent_dim", "widths", "beta")  # the options that are parameters of their own
ESTIMATOR = "estimator.json"  # what `save` adds to a run folder: params, threshold, layout, history
_STATE_KEYS = ("params", "threshold", "outlier_score", "layout", "image_shape", "history")
_ADDED_STATE = {"outlier_score": None}  # keys added after 0.4.0, with the value an older save means
# Config fields no estimator parameter sets: where the images came from (a run of `aekit train`,
# loaded and saved, keeps its own), early stopping, and the device it runs on.
_NOT_PARAMS = ("device", "data", "data_source", "limit", "resize", "stream", "patience")


class ConvAutoencoder(_ImageReconstructor):
    """A convolutional autoencoder as a scikit-learn estimator.

    Parameters are stored as given (scikit-learn's contract); everything learned ends in
    ``_``: ``model_`` (the PyTorch module), ``config_`` (the run's TrainConfig), ``history_``
    (one dict per epoch), ``kept_epoch_``, ``threshold_`` (on the model's outlier score),
    ``image_shape_`` (C, H, W), ``layout_``. It trains as ``aekit train`` does, through
    :mod:`aekit.experiment`, with the same defaults: the same images and seed give the same
    config and weights either way.

    ``model="pca-conv"`` (the default) is PCA plus convolutional corrections
    (:mod:`aekit.models.pca_conv`): it starts as PCA of the images it is fitted on and trains only
    what PCA cannot express, on the squared error. ``model="conv"`` is a plain
    convolutional autoencoder with a dense latent of ``latent_dim`` numbers;
    ``model="seed"`` is the blog's network, whose latent is its 8 x H/4 x W/4 bottleneck
    (392 numbers on MNIST). ``epochs=None`` lets the number of images decide
    (:func:`aekit.config.default_epochs`; ``config_.chosen`` says how); when that gives
    more than the rule's minimum of 10 epochs (fewer than about 9,600 images), a random 10%
    of the images, drawn from ``random_state``, is held out and the weights of the epoch with
    the lowest loss on them are kept (:func:`aekit.config.default_held_out`), so that many
    passes over few images do not end on weights that learned those images. ``noise`` (e.g.
    ``"gaussian:0.5"``, ``"salt_pepper:0.1"``, ``"mask:0.3"``) trains a denoiser: corrupted
    inputs, clean targets. ``recipe`` supplies every training choice left ``None`` (see
    ``aekit.config.RECIPES``); a model that does not offer the recipe's loss trains on its
    own (``pca-conv``: ``"mse"``). ``latent_dim``, ``widths`` and ``beta`` are the options of
    the built-in families that take them (see ``aekit train --help``); ``model_params`` (a
    dict, as scikit-learn's ``metric_params``) gives any other option a family declares in
    its ``Options``, e.g. ``model_params={"penalty": 0.2}`` for a family that takes one.
    ``precision="bfloat16"`` trains with the forward pass in bfloat16
    (:func:`aekit.fast.mixed_precision`): faster on some CPUs with bfloat16 instructions
    and slower on others (measured 1.4x on an AMD Zen 4, 0.7x on an Intel Xeon; not yet
    measured on a GPU), a slightly different model; inference stays float32.
    """

    def __init__(self, model="pca-conv", latent_dim=32, widths=None, beta=None, model_params=None, epochs=None,
                 batch_size=None, lr=None, loss=None, recipe="default", noise=None, contamination=0.01,
                 image_shape=None, random_state=None, device="auto", precision="float32", verbose=False):
        self.model = model
        self.latent_dim = latent_dim
        self.widths = widths
        self.beta = beta
        self.model_params = model_params
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.loss = loss
        self.recipe = recipe
        self.noise = noise
        self.contamination = contamination
        self.image_shape = image_shape
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.verbose = verbose

    def _config(self, image_shape=None, seed=0):
        """The TrainConfig these params make, before the number of images plans its epochs
        (:func:`aekit.experiment.plan`)."""
        from aekit.config import TrainConfig
        from aekit.models import MODELS

        # Only the options the model takes: latent_dim's default means nothing to the seed network.
        takes = MODELS[self.model].options if self.model in MODELS else ()
        options = {"latent_dim": self.latent_dim, "widths": None if self.widths is None else tuple(self.widths),
                   "beta": self.beta}
        extra = {} if self.model_params is None else self.model_params
        if not isinstance(extra, dict):
            raise ValueError(f"model_params must be a dict of the model's options, e.g. {{'name': value}}, "
                             f"or None; got {extra!r}")
        doubled = sorted(set(extra) & set(_OPTION_PARAMS))
        if doubled:
            raise ValueError(f"model_params holds {', '.join(doubled)}, a parameter of ConvAutoencoder itself; "
                             f"pass {doubled[0]}=... instead")
        options = {**{k: v for k, v in options.items() if k in takes and v is not None}, **extra}
        return TrainConfig(
            data="<array>", model=self.model, model_params=options, noise=self.noise, recipe=self.recipe,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, loss=self.loss, seed=seed,
            device=self.device, precision=self.precision, image_shape=image_shape,
        ).resolved()

    def _fit(self, x: np.ndarray) -> None:
        """The experiment of ``aekit train`` (:mod:`aekit.experiment`) on the images ``x``."""
        from aekit.config import resolve_device
        from aekit.data import ArrayImages
        from aekit.experiment import hold_out, plan, train
        from aekit.start import new_model

        seed = int(check_random_state(self.random_state).randint(2 ** 31 - 1)) \
            if not is_int(self.random_state) else int(self.random_state)
        config, held = plan(self._config(image_shape=tuple(x.shape[1:]), seed=seed), len(x))
        model = new_model(config, resolve_device(config.device))
        images = ArrayImages(torch.from_numpy(x))
        # Few images, many epochs: choose the epoch on images it does not train on; else
        # val_loss is for monitoring only, on a fixed sample of the training images.
        x_train, x_val = hold_out(images, held, seed) if held else (images, images.head(2048))
        state = train(model, config, x_train, x_val, keep_best=held > 0, progress=bool(self.verbose))
        self.model_ = model.eval()
        self.config_ = config
        self.history_ = [dataclasses.asdict(r) for r in state.history]

    @property
    def kept_epoch_(self) -> int:
        """The epoch whose weights the estimator holds: with images held out
        (``config_.chosen["held_out"]``), the one with the lowest loss on them, else the last."""
        self._check_is_fitted()
        losses = [epoch["val_loss"] for epoch in self.history_]
        if "held_out" not in self.config_.chosen or not losses:
            return len(losses)
        return losses.index(min(losses)) + 1  # the first of equal losses, as training keeps it

    def _latent_size(self) -> int:
        return int(np.prod(self.model_.latent_shape))

    # aekit.inference runs the model: on the CPU in cache-sized chunks on every core.
    def _encode(self, x: np.ndarray) -> np.ndarray:
        return inference.encode(self.model_, torch.from_numpy(x)).flatten(1).numpy()

    def _decode(self, z: np.ndarray) -> np.ndarray:
        return inference.decode(self.model_, torch.from_numpy(z).reshape(-1, *self.model_.latent_shape)).numpy()

    def _reconstruct(self, x: np.ndarray) -> np.ndarray:
        return inference.reconstruct(self.model_, torch.from_numpy(x)).numpy()

    def _errors(self, x: np.ndarray) -> np.ndarray:
        return inference.reconstruction_errors(self.model_, torch.from_numpy(x))

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return inference.outlier_scores(self.model_, torch.from_numpy(x))  # as the run's threshold

    def denoise(self, X) -> np.ndarray:
        """Clean images: the reconstruction of (noisy) ``X``, in the layout of ``X``."""
        return self.reconstruct(X)

    def sample(self, n: int, random_state=None) -> np.ndarray:
        """``n`` new images from a fitted ``model="vae"``: latents drawn from the prior
        N(0, I), decoded; in the layout fitted on, float32 in [0, 1]. ``random_state`` (an
        int, a RandomState or None) fixes the draw; torch's global generator is not used."""
        self._check_is_fitted()
        if not self.model_.can_sample:
            raise ValueError(f"sample() needs a model with a prior to sample from (model='vae'); this one is "
                             f"model={self.config_.model!r}")
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int (images to sample), got {n!r}")
        # None: fresh entropy from the OS, so numpy's global generator is not advanced either.
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if random_state is None \
            else int(check_random_state(random_state).randint(2 ** 31 - 1))
        z = self.model_.sample_latents(int(n), torch.Generator().manual_seed(seed))
        return self.inverse_transform(z.numpy())

    def interpolate(self, a, b, steps: int = 10) -> np.ndarray:
        """``steps`` images along the straight latent path from image ``a`` to image ``b``
        (the codes of ``transform``: for a VAE the posterior means), endpoints included,
        in the layout fitted on: (steps, ...) float32 in [0, 1]. ``a`` and ``b`` are single
        images in the layout fitted on."""
        self._check_is_fitted()
        if not is_int(steps) or steps < 2:
            raise ValueError(f"steps must be an int >= 2 (the path's endpoints included), got {steps!r}")
        pair = np.stack([np.asarray(a), np.asarray(b)])
        if pair.dtype == object:
            raise ValueError(f"a and b must be images of the same shape, got {np.shape(a)} and {np.shape(b)}")
        ends = self.transform(pair)                                    # (2, latent)
        t = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)[:, None]
        return self.inverse_transform((1 - t) * ends[0] + t * ends[1])  # (steps, latent) -> images

    # ---- persistence: the same run folder as `aekit train`

    def save(self, path, overwrite: bool = False) -> Path:
        """Write the folder ``path``: config.json, model.safetensors and estimator.json.

        The folder is written whole under a temporary name and then swapped in, so no reader
        ever sees a mix of two models' files. An existing folder that holds anything is
        refused unless ``overwrite=True``, which replaces the whole folder: an ``aekit train``
        run saved over loses its checkpoint, history, metrics and figures, which described
        the old weights.
        """
        from aekit.runs import save_config
        from aekit.weights import save_weights

        self._check_is_fitted()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder; choose another path")
        refuse_existing(path if path.is_dir() and any(path.iterdir()) else None, overwrite=overwrite)
        params = {k: plain(v) for k, v in self.get_params().items()}  # numpy numbers as JSON's
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = self.config_.seed  # a RandomState: the seed it gave this fit
        state = {"params": params, "threshold": self.threshold_,
                 "outlier_score": models_lib.outlier_score_name(self.model_), "layout": self.layout_,
                 "image_shape": list(self.image_shape_), "history": self.history_}
        with atomic_folder(path) as staging:
            save_config(self.config_, staging)
            save_weights(self.model_, staging / "model.safetensors", self.config_)
            write_text_atomic(staging / ESTIMATOR, json.dumps(state, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path, device: str = "auto") -> ConvAutoencoder:
        """Load a folder written by :meth:`save` or by ``aekit train``.

        A run of ``aekit train`` takes its outlier threshold from metrics.json; without one
        (the run did not finish, or an older aekit took it on another outlier score than the
        model's) ``threshold_`` is None and ``predict`` asks for :meth:`set_threshold`. Any
        damage raises :class:`aekit.runs.RunError` naming the file.
        """
        from aekit.runs import HISTORY, METRICS, read_history, read_metrics
        from aekit.weights import load_model

        path = Path(path)
        model, config = load_model(path, device)
        if (path / ESTIMATOR).is_file():
            est, threshold, score_name, layout, history = cls._read_state(path / ESTIMATOR, config, device)
        else:  # a run folder from `aekit train`
            from aekit.models import MODELS

            # The family's other options as model_params, those at their defaults left out (as a
            # user who did not set them would have called it): None when all are.
            options, defaults = config.model_params, dataclasses.asdict(MODELS[config.model].Options())
            extra = {k: v for k, v in options.items() if k not in _OPTION_PARAMS and v != defaults.get(k, object())}
            est = cls(model=config.model, **{k: options[k] for k in _OPTION_PARAMS if k in options},
                      model_params=extra or None,
                      epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, loss=config.loss,
                      recipe=config.recipe, noise=config.noise, random_state=config.seed, device=device,
                      precision=config.precision)
            metrics = read_metrics(path) if (path / METRICS).is_file() else {}
            threshold, score_name = metrics.get("threshold"), metrics.get("outlier_score")
            if threshold is not None:
                threshold = _check_threshold(threshold, path / METRICS)
            if "contamination" in metrics:
                est.contamination = metrics["contamination"]
                _as_run_error(est._validate_contamination, path / METRICS, "restore it or train the run again")
            layout = "nhw" if config.image_shape[0] == 1 else "nhwc"
            history = [dataclasses.asdict(r) for r in read_history(path)] if (path / HISTORY).is_file() else []
        est.model_, est.config_, est.history_ = model, config, history
        est.image_shape_ = tuple(config.image_shape)
        est.n_features_in_ = int(np.prod(est.image_shape_))
        threshold = recorded_threshold(model, threshold, score_name)
        est.layout_, est.threshold_ = layout, threshold
        est.offset_ = None if threshold is None else -threshold
        return est

    @classmethod
    def _read_state(cls, source: Path, config, device: str
                    ) -> tuple[ConvAutoencoder, float | None, str | None, str, list[dict]]:
        """estimator.json, checked against the run's ``config``: (an unfitted estimator with
        its params, threshold, the name of the outlier score it was taken on, layout, history)."""
        from aekit.runs import RunError, read_json_object
        from aekit._typed import from_plain
        from aekit.progress import EpochRecord

        state = read_json_object(source, "estimator state", f"keys {list(_STATE_KEYS)}", "save the estimator again")
        if isinstance(state, dict):
            state = {**_ADDED_STATE, **state}  # saved before those keys existed
        if set(state) != set(_STATE_KEYS):
            raise RunError(f"{source}: expected an object with keys {list(_STATE_KEYS)}, got "
                           f"{reprlib.repr(sorted(state))}; save the estimator again")
        params, known = state["params"], cls().get_params()
        if isinstance(params, dict):
            params = {**_ADDED_PARAMS, **params}  # saved before those params existed
        if not isinstance(params, dict) or set(params) != set(known):
            found = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise RunError(f"{source}: params must hold exactly {sorted(known)}, got {reprlib.repr(found)}; "
                           "save the estimator again")
        params = {k: tuple(v) if k in ("widths", "image_shape") and isinstance(v, list) else v
                  for k, v in params.items()}
        est = cls(**{**params, "device": device})
        expected = _as_run_error(lambda: est._params_config(config), source)
        differ = [f.name for f in dataclasses.fields(config)
                  if f.name not in _NOT_PARAMS and getattr(expected, f.name) != getattr(config, f.name)]
        if differ:
            raise RunError(f"{source}: its params disagree with {source.parent / 'config.json'} on "
                           f"{', '.join(differ)}; the folder mixes two models: save the estimator again")
        if state["image_shape"] != list(config.image_shape):
            raise RunError(f"{source}: image_shape {reprlib.repr(state['image_shape'])} disagrees with "
                           f"{list(config.image_shape)} in config.json; save the estimator again")
        layout = state["layout"]
        if layout not in LAYOUTS or (layout == "nhw" and config.image_shape[0] != 1) \
                or (layout == "flat" and params["image_shape"] is None):
            raise RunError(f"{source}: layout {reprlib.repr(layout)} does not fit images of "
                           f"{tuple(config.image_shape)} (C, H, W); expected one of {', '.join(LAYOUTS)}; "
                           "save the estimator again")
        history = state["history"]
        if not isinstance(history, list):
            raise RunError(f"{source}: history must be a list of epochs, got {type(history).__name__}; "
                           "save the estimator again")
        records = [_as_run_error(lambda row=row, i=i: from_plain(EpochRecord, row, f"history[{i}]"), source)
                   for i, row in enumerate(history)]
        threshold = None if state["threshold"] is None else _check_threshold(state["threshold"], source)
        score_name = state["outlier_score"]
        if score_name is not None and not isinstance(score_name, str):
            raise RunError(f"{source}: outlier_score must be the name of a score, got {reprlib.repr(score_name)}; "
                           "save the estimator again")
        return est, threshold, score_name, layout, [dataclasses.asdict(r) for r in records]

    def _params_config(self, config):
        """The TrainConfig these params make for a run of ``config`` (ValueError/TypeError if none)."""
        self._validate_contamination()
        if self.image_shape is not None and layouts.image_shape_chw(self.image_shape) != tuple(config.image_shape):
            raise ValueError(f"image_shape {self.image_shape!r} is not {tuple(config.image_shape)} (C, H, W)")
        seed = int(self.random_state) if is_int(self.random_state) else config.seed
        expected = self._config(image_shape=config.image_shape, seed=seed)
        if self.epochs is None and "epochs" in config.chosen:  # chosen from the number of images fitted
            expected.epochs, expected.chosen = config.epochs, dict(config.chosen)
        return expected


def _as_run_error(make, source: Path, fix: str = "save the estimator again"):
    """``make()``, with its ValueError or TypeError as a one-line RunError naming ``source``."""
    from aekit.runs import RunError, _first_line

    try:
        return make()
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float
        raise RunError(f"{source}: invalid ({_first_line(exc)}); {fix}") from None




def _check_threshold(value, source: Path) -> float:
    """An outlier threshold read from ``source``: a finite number >= 0, as a float."""
    from aekit.runs import RunError

    if not _is_threshold(value):
        raise RunError(f"{source}: threshold must be a finite number >= 0, got {reprlib.repr(value)}; "
                       "restore the file, or call set_threshold(X, contamination=0.01) after loading")
    return float(value)


__all__ = ["ConvAutoencoder", "LAYOUTS"]
