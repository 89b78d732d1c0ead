"""The ``aekit`` command: a thin layer over the library.

Every command is a library call; this module only parses arguments, prints results and
turns what goes wrong into one line on stderr:

- a user error (a bad flag, ``ValueError``, a missing file): ``aekit: error: ...``, exit 2;
- a Python warning raised during a command: ``aekit: warning: ...``, and the command goes on;
- the library's messages name its parameters (``overwrite=True``, ``resize=(H, W)``); the
  CLI prints them as the flags that set them (``--overwrite``, ``--resize H W``), see
  :func:`as_flags`;
- a reader of the output that went away (``aekit data info X | head -1``): nothing more
  is printed, exit 141, as for a Unix tool killed by SIGPIPE;
- anything else is a bug in aekit: one line saying so, exit 1 (``AEKIT_TRACEBACK=1``
  prints the traceback as well).

Called from Python, :func:`main` leaves the ``aekit`` logger and the warning filters as it
found them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from aekit._io import WriteError, refuse_existing

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_OUTPUT = 128 + 13  # 141: what a shell reports for a command killed by SIGPIPE (13)
TRACEBACK_ENV = "AEKIT_TRACEBACK"  # set to 1 to see the traceback of an internal error
BUG_REPORTS = "the aekit issue tracker"


class UsageError(Exception):
    """A command line argparse refused: the message, and the command whose --help says more."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`UsageError` for main() to print in
    one line, instead of printing the usage block and exiting. Subparsers inherit it."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    """A run's seed (TrainConfig.seed): an int from 0 to :data:`aekit.training.MAX_SEED`."""
    from aekit.training import MAX_SEED

    return _int_up_to(text, MAX_SEED)


def _random_state(text: str) -> int:
    """A seed passed on as scikit-learn's ``random_state`` (compare's PCA, an estimator's
    sample): numpy's seeds, an int from 0 to 2**32 - 1."""
    return _int_up_to(text, 2 ** 32 - 1)


def _int_up_to(text: str, most: int) -> int:
    """``text`` as an int from 0 to ``most`` (2**k - 1), or argparse's error saying so."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= most:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**{most.bit_length()} - 1, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 0.5), got {text!r}")
    return value


class _Tuple(argparse.Action):
    """Store an option's values as a tuple, as the library takes them: ``resize=(H, W)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _add_resize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", nargs=2, type=_positive_int, action=_Tuple, metavar=("H", "W"),
                        help="resize images in a folder to H x W pixels")


def _add_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive_int, help="use only the first N train and test images")


def _loss_choices() -> tuple[str, ...]:
    """The objectives the registered models offer; each model checks --loss against its own."""
    from aekit.models import MODELS

    return tuple(dict.fromkeys(o for model in MODELS.values() for o in model.objectives))


def build_parser() -> argparse.ArgumentParser:
    from aekit.data import BUILTINS
    from aekit.models import INITS, MODELS
    from aekit.noise import KINDS
    from aekit.training import RECIPES, SCHEDULES

    parser = Parser(prog="aekit", description="Convolutional autoencoders for images.")
    parser.add_argument("--version", action="version", version=f"aekit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="print the network's layers, Keras style")
    p.add_argument("--model", default="seed", choices=tuple(MODELS), help="model name (default: seed)")
    p.add_argument("--latent-dim", type=_positive_int, help="latent size for --model conv")
    p.add_argument("--widths", type=_int_list, help="encoder channels per level for --model conv")
    p.add_argument("--image-shape", type=_int_list, default=(28, 28, 1), metavar="H,W,C",
                   help="input size (default: 28,28,1)")

    p = sub.add_parser("data", help="fetch built-in data sets, describe data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("fetch", help="download a built-in data set and print its cached path")
    q.add_argument("name", help="mnist or fashion-mnist")
    q = data_sub.add_parser("info", help="shapes, dtype, value range and labels of a data set")
    q.add_argument("name_or_path")
    _add_resize(q)

    p = sub.add_parser("train", help="train an autoencoder into a run folder")
    # No argparse defaults: TrainConfig's apply where the config is built, so that a flag
    # given on --resume can be told from one left out (and checked against the run).
    p.add_argument("--data", help="built-in name or path (default: mnist)")
    p.add_argument("--model", choices=tuple(MODELS),
                   help="seed: the blog's network; conv: a dense latent of --latent-dim (default: pca-conv)")
    p.add_argument("--latent-dim", type=_positive_int, help="latent size for --model conv (default: 32)")
    p.add_argument("--widths", type=_int_list, help="encoder channels per level for --model conv (default: 16,32)")
    p.add_argument("--beta", type=float, help="weight of the KL term for --model vae (default: 1.0)")
    p.add_argument("--noise", metavar="KIND:AMOUNT",
                   help=f"train a denoiser on KIND noise, one of {', '.join(KINDS)} (e.g. gaussian:0.5)")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="training recipe (default: default; 'blog' is the post as written)")
    p.add_argument("--epochs", type=_positive_int,
                   help="number of epochs (default: enough for 3,000 steps, 10 to 100, chosen by the number of "
                        "training images; with more than 10, the best epoch on 10%% held out is kept)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--loss", choices=_loss_choices(), help="training loss (default: the recipe's)")
    p.add_argument("--init", choices=tuple(INITS), help="initialisation (default: the recipe's)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: the recipe's)")
    p.add_argument("--seed", type=_seed, help="random seed (default: 0)")
    _add_limit(p)
    p.add_argument("--patience", type=_positive_int, help="stop after N epochs without a better val_loss")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto; on --resume, the run's)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads PyTorch uses (default: its own, one per core); on a machine busy "
                        "with other work 1 can be several times faster (bench/RESULTS.md)")
    p.add_argument("--stream", action="store_true", default=None,
                   help="read a .npy file or image folder from disk batch by batch instead of loading it "
                        "(automatic above 1 GiB of float32 images)")
    _add_resize(p)
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under runs/)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint, as it was configured; "
                            "only --epochs may extend it")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="print a run's test metrics as JSON")
    p.add_argument("run", type=Path)
    p.add_argument("--data", help="evaluate on other data (default: the run's)")

    p = sub.add_parser("reconstruct", help="write originals above reconstructions to a PNG")
    p.add_argument("run", type=Path)
    p.add_argument("--data", help="data to reconstruct (default: the run's test split)")
    p.add_argument("--n", type=_positive_int, default=10, help="number of images (default: 10)")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("sample", help="write a PNG grid of new images from a VAE run (--model vae), or the "
                                      "decoded latent grid of a run whose latent has 2 numbers (--grid)")
    p.add_argument("run", type=Path)
    p.add_argument("--n", type=_positive_int, help="number of images (default: 64)")
    p.add_argument("--grid", type=_positive_int, metavar="SIDE",
                   help="instead: decode a SIDE x SIDE grid of latent points spanning the codes of the run's "
                        "test images (1st to 99th percentile), for any run with --latent-dim 2, e.g. 15")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    p.add_argument("--seed", type=_random_state, help="fixes the draw (default: a fresh one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("denoise", help="clean images with a run's autoencoder")
    p.add_argument("run", type=Path)
    p.add_argument("input", type=Path, help="image folder, image file, .npy/.npz or IDX file")
    p.add_argument("--out", type=Path, required=True,
                   help="a folder of PNGs, one image file, or a .npy/.npz file")
    _add_resize(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("score", help="anomaly scores: reconstruction error per image")
    p.add_argument("run", type=Path)
    p.add_argument("input", type=Path, help="image folder, image file, .npy/.npz or IDX file")
    p.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    p.add_argument("--heatmaps", type=Path, help="also write a per-pixel error map per image into this folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--contamination", type=_fraction,
                       help="threshold flagging this fraction of the run's training images")
    group.add_argument("--fpr", dest="false_positive_rate", metavar="F", type=_fraction,
                       help="threshold with this false-positive rate on the run's test images")
    _add_resize(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out/--heatmaps if they exist")

    p = sub.add_parser("compare", help="autoencoders against PCA at several latent sizes")
    p.add_argument("--data", default="mnist",
                   help=f"built-in name ({', '.join(BUILTINS)}) or path (default: mnist)")
    p.add_argument("--latent-dims", type=_int_list, default=(2, 8, 16, 32, 64),
                   help="comma-separated latent sizes (default: 2,8,16,32,64)")
    p.add_argument("--methods", type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
                   default=("autoencoder", "pca"),
                   help="comma-separated: autoencoder (aekit's default model), pca, or a model with a latent "
                        "size, e.g. conv,vae,map (default: autoencoder,pca)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="autoencoder epochs (default: the estimator's rule, from the number of images)")
    _add_limit(p)
    p.add_argument("--seed", type=_random_state, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    _add_resize(p)
    p.add_argument("--out", type=Path, required=True, help="folder for compare.csv, compare.md, compare.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")

    p = sub.add_parser("report", help="write DIR/report.html: figures, metrics and config in one file")
    p.add_argument("run", type=Path)
    p.add_argument("--data", help="data for the figures (default: the run's test split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report.html")

    p = sub.add_parser("export", help="export a run's encoder, decoder and model for other runtimes")
    p.add_argument("run", type=Path)
    p.add_argument("--format", required=True, help="export format: onnx")
    p.add_argument("--out", type=Path, help="folder for the files (default: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def _version() -> str:
    from aekit import __version__

    return __version__


# ------------------------------------------------------------------------- commands

def cmd_summary(args) -> int:
    from aekit.models import build_model, summary

    if len(args.image_shape) != 3:
        raise ValueError(f"--image-shape needs H,W,C, got {','.join(map(str, args.image_shape))}")
    height, width, channels = args.image_shape
    print(summary(build_model(args.model, (channels, height, width), latent_dim=args.latent_dim, widths=args.widths)))
    return 0


def cmd_data(args) -> int:
    from aekit import data

    if args.data_command == "fetch":
        print(data.fetch(args.name))
    else:
        print(json.dumps(data.describe(args.name_or_path, args.resize), indent=2))
    return 0


def cmd_train(args) -> int:
    from aekit import distributed
    from aekit.data import data_source
    from aekit.experiment import train_and_evaluate
    from aekit.runs import run_data
    from aekit.training import TrainConfig, resolve_device

    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the run folder to continue")
    # Each TrainConfig field is set by the flag of the same name, when given.
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    config = _resumed_config(args.out, given) if args.resume else TrainConfig(**given)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    # Under torchrun, join the other ranks now (train_and_evaluate would, a step later):
    # from here on distributed.current() knows which rank this is, and rank 0 speaks.
    distributed.setup(resolve_device(config.device))
    out = args.out or Path("runs") / f"{config.model}-{Path(config.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if _is_main_rank():  # which data --data names (a built-in, or a path): said first, on stdout
        print(f"data: {data_source(run_data(config))}", flush=True)
    try:
        result = train_and_evaluate(config, out, resume=args.resume, overwrite=args.overwrite,
                                    progress=not args.quiet)
    except KeyboardInterrupt:
        if _is_main_rank():
            print(_interrupted(out), file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        if not distributed.lost_peer(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"aekit: error (rank {distributed.current().rank}): lost contact with the other ranks "
              f"({first}); the rank that failed first says why", file=sys.stderr)
        return EXIT_FAILED
    if not _is_main_rank():
        return 0  # under torchrun, rank 0 reports for the run
    m = result.metrics
    print(f"test_mse {m['test_mse']:.5f}  test_psnr {m['test_psnr']:.2f} dB  "
          f"{m['epochs']} epochs in {m['seconds']:.1f} s ({m['images_per_second']:,.0f} images/s)")
    print(f"run folder: {result.workdir}")
    return 0


def _resumed_config(out: Path, given: dict):
    """The run's config with the flags given on --resume applied (experiment.resumed_config);
    a flag that would change what the run trains is refused, named as a flag."""
    from aekit.experiment import ResumeMismatch, resumed_config
    from aekit.runs import CONFIG
    from aekit.training import TrainConfig

    if not (out / CONFIG).is_file():
        return TrainConfig(**given)  # train_and_evaluate says that there is nothing to resume
    try:
        return resumed_config(out, given)
    except ResumeMismatch as exc:
        action = _options("train")[exc.field]
        flag = functools.partial(_as_flag, action)
        raise ValueError(
            f"{flag(exc.given)} differs from the run in {out}, which has {flag(exc.recorded)}: --resume "
            f"continues a run as it was configured (only --epochs may extend it); drop "
            f"{max(action.option_strings, key=len)}, or start a new run in another --out"
        ) from None


def _interrupted(out: Path) -> str:
    """What Ctrl-C left in the run folder, and how to go on."""
    from aekit.runs import CHECKPOINT, CONFIG, saved_progress

    resume = f"resume with: aekit train --out {out} --resume"
    progress = saved_progress(out)
    if progress is not None:
        epoch, step, steps = progress
        saved = (f"epoch {epoch + 1}, step {step} of {steps}" if step
                 else f"{epoch} complete epoch{'s' * (epoch != 1)}")
        return f"aekit: interrupted; {saved} saved in {out / CHECKPOINT}; {resume}"
    if (out / CONFIG).is_file():
        return f"aekit: interrupted before the first epoch ended; {resume} (it starts from the beginning)"
    return "aekit: interrupted before training started; nothing was saved"


def _is_main_rank() -> bool:
    """False on the ranks other than 0 of a torchrun launch: rank 0 prints for the run.

    The rank is known once the process group is set up (cmd_train does that first); before,
    every process answers as rank 0 of 1, and an error then is printed by every rank.
    """
    from aekit import distributed

    return distributed.current().is_main


def cmd_evaluate(args) -> int:
    from aekit.experiment import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data), indent=2))
    return 0


def cmd_reconstruct(args) -> int:
    from aekit.plots import save_reconstructions
    from aekit.runs import check_image_shape, load_model, load_split

    refuse_existing(args.out, overwrite=args.overwrite)
    model, config = load_model(args.run)
    _, x_test, _ = load_split(config, args.data)
    check_image_shape(x_test, config)
    save_reconstructions(model, x_test.first(args.n), args.out, overwrite=args.overwrite)
    print(args.out)
    return 0


def cmd_sample(args) -> int:
    import math

    import torch

    from aekit.estimator import ConvAutoencoder
    from aekit.plots import image_rows_figure, save_figure

    if args.grid is not None:
        if args.n is not None or args.seed is not None:
            raise ValueError("--grid decodes a fixed grid of latent points and draws nothing at random, so --n and "
                             "--seed do not apply; drop them, or drop --grid to draw --n images from a VAE run")
        refuse_existing(args.out, overwrite=args.overwrite)
        return _sample_grid(args)
    refuse_existing(args.out, overwrite=args.overwrite)
    n = 64 if args.n is None else args.n
    estimator = ConvAutoencoder.load(args.run)
    # sample() answers in the layout fitted on (NHWC, NCHW, flat...): the estimator reads it back.
    images = torch.from_numpy(estimator._to_nchw(estimator.sample(n, random_state=args.seed)))  # (n, C, H, W)
    columns = math.ceil(math.sqrt(n))
    rows = -(-n // columns)
    images = torch.cat([images, torch.ones(rows * columns - n, *images.shape[1:])])  # blank (white) tail
    figure = image_rows_figure([("", row) for row in images.split(columns)])
    save_figure(figure, args.out, overwrite=args.overwrite)
    print(args.out)
    return 0


def _sample_grid(args) -> int:
    """`aekit sample RUN --grid SIDE`: the decoded latent grid that the run's report shows."""
    from aekit.inference import encode
    from aekit.plots import latent_grid, save_image
    from aekit.report import N_LATENTS
    from aekit.runs import load_model, load_split

    if args.grid < 2:
        raise ValueError(f"--grid must be at least 2 (latent points per side), got {args.grid}")
    model, config = load_model(args.run)
    _, x_test, _ = load_split(config, None)
    grid = latent_grid(model, encode(model, x_test.first(N_LATENTS)), n=args.grid)
    save_image(grid.image, args.out, overwrite=args.overwrite)
    print(f"{args.out}: z[0] from {grid.z0[0]:.3g} to {grid.z0[1]:.3g} (left to right), "
          f"z[1] from {grid.z1[0]:.3g} to {grid.z1[1]:.3g} (bottom to top)")
    return 0


def cmd_denoise(args) -> int:
    from aekit.data import read_images, write_images
    from aekit.estimator import ConvAutoencoder

    refuse_existing(args.out, overwrite=args.overwrite)
    estimator = ConvAutoencoder.load(args.run)
    x, names = read_images(args.input, args.resize)
    cleaned = estimator.denoise(x)
    if x.dtype == np.uint8 and args.out.suffix.lower() in (".npy", ".npz"):
        cleaned = np.round(cleaned * 255).astype(np.uint8)  # give back what came in
    print(write_images(cleaned, names, args.out, overwrite=args.overwrite))
    return 0


def cmd_score(args) -> int:
    from aekit.anomaly import run_threshold, score_images, write_heatmaps, write_scores
    from aekit.data import read_images
    from aekit.estimator import ConvAutoencoder

    # Refused before the scoring, and before either file is written.
    refuse_existing(args.out, args.heatmaps, overwrite=args.overwrite)
    estimator = ConvAutoencoder.load(args.run)
    if args.contamination is not None or args.false_positive_rate is not None:
        estimator.set_threshold(threshold=run_threshold(args.run, args.contamination, args.false_positive_rate,
                                                        estimator.model_))
    elif estimator.threshold_ is None:
        raise ValueError(f"{args.run} records no outlier threshold (its metrics.json has none); "
                         "pass --contamination C or --fpr F to derive one from the run's own images")
    x, names = read_images(args.input, args.resize)
    rows = score_images(estimator, x, names)
    write_scores(rows, args.out, overwrite=args.overwrite)
    if args.heatmaps is not None:
        write_heatmaps(estimator, x, names, args.heatmaps, overwrite=args.overwrite)
    flagged = sum(r["is_outlier"] for r in rows)
    print(f"{len(rows)} images scored, {flagged} outliers (threshold {estimator.threshold_:.6g} on "
          f"per-image MSE): {args.out}")
    return 0


def cmd_compare(args) -> int:
    from aekit.compare import OUTPUTS, CompareConfig, compare, write_comparison

    refuse_existing(*(args.out / name for name in OUTPUTS.values()), overwrite=args.overwrite)  # before the fits
    config = CompareConfig(data=args.data, latent_dims=args.latent_dims, epochs=args.epochs, limit=args.limit,
                           seed=args.seed, device=args.device, resize=args.resize, methods=args.methods)
    rows = compare(config)
    paths = write_comparison(rows, args.out, title=f"{args.data}: {' vs '.join(config.methods)}",
                             overwrite=args.overwrite)
    print(paths["md"].read_text(), end="")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_report(args) -> int:
    from aekit.report import write_report

    print(write_report(args.run, data=args.data, overwrite=args.overwrite))
    return 0


def cmd_export(args) -> int:
    from aekit.export import FORMATS

    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; expected one of {', '.join(FORMATS)}")
    for path in FORMATS[args.format](args.run, args.out, overwrite=args.overwrite).values():
        print(path)
    return 0


def _tune_process(command: str) -> None:
    """The CLI's process-wide choice, which no library call makes: for the commands that run
    a network, glibc keeps freed memory for the next pass (aekit.fast.keep_freed_memory)."""
    if command not in ("summary", "data"):  # "data" does not even import torch
        from aekit.fast import keep_freed_memory

        keep_freed_memory()


COMMANDS = {"summary": cmd_summary, "data": cmd_data, "train": cmd_train,
            "evaluate": cmd_evaluate, "reconstruct": cmd_reconstruct, "denoise": cmd_denoise,
            "sample": cmd_sample,
            "score": cmd_score, "compare": cmd_compare, "report": cmd_report, "export": cmd_export}


# ------------------------------------------------------- library parameters as flags

# A library parameter and its value as aekit's messages write them: ``overwrite=True``,
# ``device="cpu"``, ``resize=(H, W)``, ``epochs=N``, optionally after "pass ".
_PARAMETER = re.compile(r"""(?P<passed>\bpass )?(?<![\w.-])(?P<name>[a-z][a-z0-9_]*)="""
                        r"""(?P<value>"[^"]*"|'[^']*'|\([^()]*\)|[\w.:+-]*\w)""")


def as_flags(text: str, command: str | None = None) -> str:
    """A library message as the command line says it: each ``name=value`` whose ``name`` is
    an option's destination in :func:`build_parser` becomes that option (``command``'s own
    first, then ``train``'s), and other text is left alone:

    - ``overwrite=True`` -> ``--overwrite``, ``device="cpu"`` -> ``--device cpu``,
      ``epochs=3`` -> ``--epochs 3``;
    - ``resize=(28, 28)`` -> ``--resize 28 28`` (an option of several values), ``latent_dims=(2,
      8)`` -> ``--latent-dims 2,8`` (one comma-separated value);
    - ``pass stream=False`` -> ``drop --stream``; elsewhere ``stream=False`` or ``patience=None``
      -> ``no --stream``, ``no --patience``.
    """
    options = _options(command)

    def flag(found: re.Match) -> str:
        action = options.get(found["name"])
        if action is None:
            return found[0]
        value = _literal(found["value"])
        if found["passed"] and (value is False or value is None):
            return f"drop {_as_flag(action)}"
        return (found["passed"] or "") + _as_flag(action, value)

    return _PARAMETER.sub(flag, text)


def _literal(text: str) -> object:
    """A value as a message writes it: True/False/None, a quoted string, a tuple of items
    (placeholders such as H kept), or the text itself (numbers keep their spelling)."""
    if text[0] in "\"'":
        return text[1:-1]
    if text[0] == "(":
        return tuple(item.strip().strip("\"'") for item in text[1:-1].split(",") if item.strip())
    return {"True": True, "False": False, "None": None}.get(text, text)


def _as_flag(action: argparse.Action, value: object = True) -> str:
    """How the command line spells ``dest=value``: ``--batch-size 32``, ``--resize 14 14``,
    ``--widths 8,16``, ``--stream``, ``no --patience``."""
    flag = max(action.option_strings, key=len)
    if value is None or value is False:
        return f"no {flag}"
    if value is True and action.nargs == 0:
        return flag
    if isinstance(value, (tuple, list)):
        return f"{flag} {(',' if action.nargs is None else ' ').join(map(str, value))}"
    return f"{flag} {value}"


@functools.cache
def _options(command: str | None = None) -> dict[str, argparse.Action]:
    """Option destinations (the library's parameter names) -> the option that sets them:
    ``command``'s own, then ``train``'s (a message about a run may say how to train it:
    ``resume=True`` while evaluating an unfinished run)."""
    commands = _subcommands(build_parser())
    options: dict[str, argparse.Action] = {}
    for parser in filter(None, (commands.get(command), commands["train"])):
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                options.setdefault(action.dest, action)
    return options


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name, nested ones (``data info``) included."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update(_subcommands(sub))
    return found


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        return _error(str(exc))
    command = getattr(args, "data_command", None) or args.command
    _tune_process(args.command)
    try:
        # Both restore the caller's settings afterwards (main may be called from Python).
        with _logging_to_stderr(), warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, command=command)
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a reader gone away shows here, not in Python's flush at exit
            return code
    except BrokenPipeError:
        return _closed_output()
    except KeyboardInterrupt:
        print("aekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, WriteError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as exc:
        return _error(as_flags(str(exc), command))
    except Exception as exc:  # a bug: say so in one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exc()
        what = _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        print(f"aekit: internal error: {what}. This is a bug in "
              f"aekit, not in what you did: please report it to {BUG_REPORTS} with the command you ran "
              f"and the traceback ({TRACEBACK_ENV}=1 aekit ... prints it)", file=sys.stderr)
        return EXIT_FAILED


@contextlib.contextmanager
def _logging_to_stderr():
    """The ``aekit`` logger's INFO messages as ``aekit: ...`` lines on stderr, for the length
    of a command; its handlers, level and propagation as they were afterwards."""
    logger = logging.getLogger("aekit")
    saved = logger.handlers[:], logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("aekit: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)


def _closed_output() -> int:
    """The reader of the output went away (``aekit data info X | head -1``): stop quietly,
    as Unix tools do, with the status of a command killed by SIGPIPE. Where stdout is the
    closed one, what is still buffered for it goes to /dev/null, so that Python's flush at
    exit does not fail again (Python's docs, "Note on SIGPIPE"); a stdout that still takes
    output (the closed one was stderr) is left as it is."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no file descriptor: nothing to redirect
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    except (OSError, ValueError):  # a stdout closed or failing otherwise: nothing left to save it from
        pass
    return EXIT_CLOSED_OUTPUT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; :class:`UsageError` for one argparse refuses."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; name the command instead
        command = " ".join(filter(None, ("aekit", args.command, getattr(args, "data_command", None))))
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}; see `{command} --help`")
    return args


def _error(message: str) -> int:
    """A user error: one line on stderr (naming the rank under torchrun), exit code 2."""
    from aekit import distributed

    ranks = distributed.current()
    where = "" if ranks.is_main else f" (rank {ranks.rank})"
    print(f"aekit: error{where}: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _show_warning(message, category, filename, lineno, file=None, line=None, command=None) -> None:
    """A Python warning raised during a command, as one ``aekit: warning:`` line (rank 0
    only, parameters named as flags), never the raw ``file:line: UserWarning:`` text."""
    if _is_main_rank():
        print(f"aekit: warning: {_one_line(as_flags(str(message), command))}", file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
