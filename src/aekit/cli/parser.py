"""The ``aekit`` command line: :func:`build_parser` and the types of its flags.

A bad command line raises :class:`UsageError` (one line, naming the command whose
``--help`` says more) instead of argparse's usage block and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import typing
from pathlib import Path

class UsageError(Exception):
    """A command line argparse refused: the message, and the command whose --help says more."""


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout of help texts, but a name with a hyphen (pca-conv, fashion-mnist)
    is never split across two lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`UsageError` for main() to print in
    one line, instead of printing the usage block and exiting. Subparsers inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _int_at_least(text: str, least: int) -> int:
    """``text`` as an int of at least ``least`` (0 or 1), or argparse's error saying so."""
    kind = "positive" if least == 1 else "non-negative"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _seed(text: str) -> int:
    """A run's seed (TrainConfig.seed): an int from 0 to :data:`aekit.config.MAX_SEED`."""
    from aekit.config import MAX_SEED

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


OTHER_DATA_IMAGES = "the images of --data (a folder or an image file)"  # what --resize resizes beside --data


def _add_resize(parser: argparse.ArgumentParser, for_run: bool = False, what: str = "images in a folder") -> None:
    """--resize H W; a command that reads images for a run's model resizes as the run did."""
    default = " (default: as the run's own images were, if it trained with --resize)" if for_run else ""
    parser.add_argument("--resize", nargs=2, type=_positive_int, action=_Tuple, metavar=("H", "W"),
                        help=f"resize {what} to H x W pixels" + default)


def _add_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive_int, help="use only the first N train and test images")


def _loss_choices() -> tuple[str, ...]:
    """The objectives the registered models offer; each model checks --loss against its own."""
    from aekit.models import MODELS

    return tuple(dict.fromkeys(o for model in MODELS.values() for o in model.objectives))


def _model_help() -> str:
    """Every registered model and what it is, in the words that open its docstring:
    ``seed: the blog's full network, ...; conv: a convolutional autoencoder ...``."""
    from aekit.models import MODELS

    return "; ".join(f"{name}: {_first_clause(model.__doc__ or '')}" for name, model in MODELS.items())


def _first_clause(doc: str) -> str:
    """A docstring's opening words, up to its first ``:``, ``;`` or full stop, starting lower case
    unless an acronym opens it (``PCA plus ...``)."""
    text = " ".join(doc.split("\n\n")[0].split())
    clause = re.split(r"[:;] |\. |\.$", text, maxsplit=1)[0]
    first = clause.split(" ", 1)[0]
    return clause[:1].lower() + clause[1:] if first[1:] == first[1:].lower() else clause


def _for_models(option: str) -> str:
    """``for --model conv, map or vae``: the models whose ``options`` take ``option``."""
    from aekit.models import MODELS

    names = [name for name, model in MODELS.items() if option in model.options]
    return f"for --model {' or '.join(filter(None, (', '.join(names[:-1]), names[-1])))}"


def model_options() -> dict[str, list[tuple[str, dataclasses.Field, object]]]:
    """Every option a registered family declares in its ``Options``, by name, with the
    (model, field, type) of each family that takes it: the flags of ``aekit train``."""
    from aekit.models import MODELS

    found: dict[str, list] = {}
    for name, model in MODELS.items():
        hints = typing.get_type_hints(model.Options)
        for f in dataclasses.fields(model.Options):
            found.setdefault(f.name, []).append((name, f, hints[f.name]))
    return found


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """A flag for each option the families declare (``--latent-dim``, ``--widths``, ...): its
    type, help and default read from the ``Options`` dataclasses, its value for model_params."""
    for option, takers in model_options().items():
        _, f, hint = takers[0]
        defaults = list(dict.fromkeys(_default_text(taker_f) for _, taker_f, _ in takers))
        default = defaults[0] if len(defaults) == 1 else "; ".join(
            f"{_default_text(taker_f)} for {name}" for name, taker_f, _ in takers)
        help_text = f"{f.metadata.get('help', option)}, {_for_models(option)} (default: {default})"
        flag = "--" + option.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            # An int option is positive unless its field declares metadata "minimum": 0.
            at_least_0 = hint is int and f.metadata.get("minimum") == 0
            kind = _non_negative_int if at_least_0 else _OPTION_TYPES.get(hint, hint)
            parser.add_argument(flag, type=kind, help=help_text,
                                metavar=option.upper() if hint in _OPTION_TYPES or hint in (int, float, str) else None)


def _default_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


_OPTION_TYPES = {int: _positive_int, tuple[int, ...]: _int_list}


def _builtin_names() -> str:
    """The built-in data sets: ``mnist, fashion-mnist, ...``."""
    from aekit.data import BUILTINS

    return ", ".join(BUILTINS)


def build_parser() -> argparse.ArgumentParser:
    from aekit.models import INITS, MODELS
    from aekit.noise import KINDS
    from aekit.config import RECIPES, SCHEDULES
    from aekit.fast import PRECISIONS

    parser = Parser(prog="aekit", description="Convolutional autoencoders for images.")
    parser.add_argument("--version", action="version", version=f"aekit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="print the network's layers, Keras style")
    p.add_argument("--model", default="seed", choices=tuple(MODELS), help=f"{_model_help()} (default: seed)")
    _add_model_options(p)
    p.add_argument("--image-shape", type=_int_list, default=(28, 28, 1), metavar="H,W,C",
                   help="input size (default: 28,28,1)")

    p = sub.add_parser("data", help="fetch built-in data sets, describe data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("fetch", help="download a built-in data set and print its cached path")
    q.add_argument("name", metavar="NAME", help=f"one of {_builtin_names()}")
    q = data_sub.add_parser("info", help="shapes, dtype, value range and labels of a data set")
    q.add_argument("name_or_path", metavar="DATA", help=f"a built-in ({_builtin_names()}) or a path: an image "
                                                        "folder, an image file, a .npy/.npz or IDX file")
    _add_resize(q)

    p = sub.add_parser("train", help="train an autoencoder into a run folder")
    # No argparse defaults: TrainConfig's apply where the config is built, so that a flag
    # given on --resume can be told from one left out (and checked against the run).
    p.add_argument("--data", help=f"built-in name ({_builtin_names()}) or path (default: mnist)")
    p.add_argument("--model", choices=tuple(MODELS), help=f"{_model_help()} (default: pca-conv)")
    _add_model_options(p)
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
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the forward pass's arithmetic while training (default: float32); bfloat16 "
                        "trains a slightly different model, faster on some CPUs and slower on others "
                        "(measured 1.2-1.5x a whole fit on an AMD Zen 4, 0.7-1.0x on an Intel Xeon, both "
                        "with AVX-512 BF16): time an epoch both ways")
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
    _add_run(p)
    p.add_argument("--data", help=f"evaluate on other data: a built-in ({_builtin_names()}) or a path "
                                  "(default: the run's)")
    _add_resize(p, for_run=True, what=OTHER_DATA_IMAGES)

    p = sub.add_parser("reconstruct", help="write originals above reconstructions to a PNG")
    _add_run(p)
    p.add_argument("--data", help=f"data to reconstruct: a built-in ({_builtin_names()}) or a path "
                                  "(default: the run's test split)")
    _add_resize(p, for_run=True, what=OTHER_DATA_IMAGES)
    p.add_argument("--n", type=_positive_int, default=10, help="number of images (default: 10)")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("sample", help="write a PNG grid of new images from a VAE run (--model vae), or the "
                                      "decoded latent grid of a run whose latent has 2 numbers (--grid)")
    _add_run(p)
    p.add_argument("--n", type=_positive_int, help="number of images (default: 64)")
    p.add_argument("--grid", type=_positive_int, metavar="SIDE",
                   help="instead: decode a SIDE x SIDE grid of latent points spanning the codes of the run's "
                        "test images (1st to 99th percentile), for any run with --latent-dim 2, e.g. 15")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    p.add_argument("--seed", type=_random_state, help="fixes the draw (default: a fresh one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("denoise", help="clean images with a run's autoencoder")
    _add_run(p)
    p.add_argument("input", type=Path, metavar="INPUT", help="image folder, image file, .npy/.npz or IDX file")
    p.add_argument("--out", type=Path, required=True,
                   help="a folder of PNGs, one image file, or a .npy/.npz file")
    _add_resize(p, for_run=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("score", help="flag outliers: each image's reconstruction error, outlier score and flag, as CSV")
    _add_run(p)
    p.add_argument("input", type=Path, metavar="INPUT", help="image folder, image file, .npy/.npz or IDX file")
    p.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    p.add_argument("--heatmaps", type=Path, help="also write a per-pixel error map per image into this folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--contamination", type=_fraction,
                       help="threshold flagging this fraction of the run's training images")
    group.add_argument("--fpr", dest="false_positive_rate", metavar="F", type=_fraction,
                       help="threshold with this false-positive rate on the run's test images")
    _add_resize(p, for_run=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out/--heatmaps if they exist")

    p = sub.add_parser("compare", help="autoencoders against PCA at several latent sizes")
    p.add_argument("--data", default="mnist",
                   help=f"built-in name ({_builtin_names()}) or path (default: mnist)")
    p.add_argument("--latent-dims", type=_int_list, default=(2, 8, 16, 32, 64),
                   help="comma-separated latent sizes (default: 2,8,16,32,64)")
    p.add_argument("--methods", type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
                   default=("autoencoder", "pca"),
                   help="comma-separated: autoencoder (aekit's default model), pca, or a model with a latent "
                        "size, e.g. conv,vae,map (default: autoencoder,pca)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="autoencoder epochs (default: the estimator's rule, from the number of images)")
    _add_limit(p)
    p.add_argument("--seed", type=_random_state, default=0, help="fixes every method's draws (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    _add_resize(p)
    p.add_argument("--out", type=Path, required=True, help="folder for compare.csv, compare.md, compare.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")

    p = sub.add_parser("report", help="write RUN/report.html: figures, metrics and config in one file")
    _add_run(p)
    p.add_argument("--data", help=f"data for the figures: a built-in ({_builtin_names()}) or a path "
                                  "(default: the run's test split)")
    _add_resize(p, for_run=True, what=OTHER_DATA_IMAGES)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report.html")

    p = sub.add_parser("export", help="export a run's encoder, decoder and model for other runtimes")
    _add_run(p)
    p.add_argument("--format", required=True, help="export format: onnx")
    p.add_argument("--out", type=Path, help="folder for the files (default: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder: the --out of aekit train")


def _version() -> str:
    from aekit import __version__

    return __version__
