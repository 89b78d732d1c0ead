"""The ``aekit`` command: a thin layer over the library.

Every command is a library call; this module only parses arguments, prints results and
turns user errors (``ValueError``, missing files) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_resize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", nargs=2, type=_positive_int, metavar=("H", "W"),
                        help="resize images in a folder to H x W pixels")


def build_parser() -> argparse.ArgumentParser:
    from aekit.training import LOSSES, RECIPES, SCHEDULES

    parser = argparse.ArgumentParser(prog="aekit", description="Convolutional autoencoders for images.")
    parser.add_argument("--version", action="version", version=f"aekit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="print the network's layers, Keras style")
    p.add_argument("--model", default="seed", help="model name (default: seed)")

    p = sub.add_parser("data", help="fetch built-in data sets, describe data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("fetch", help="download a built-in data set and print its cached path")
    q.add_argument("name", help="mnist or fashion-mnist")
    q = data_sub.add_parser("info", help="shapes, dtype, value range and labels of a data set")
    q.add_argument("name_or_path")
    _add_resize(q)

    p = sub.add_parser("train", help="train an autoencoder into a run folder")
    p.add_argument("--data", default="mnist", help="built-in name or path (default: mnist)")
    p.add_argument("--model", default="seed", help="model name (default: seed)")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="training recipe (default: default; 'blog' is the post as written)")
    p.add_argument("--epochs", type=_positive_int, help="number of epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--loss", choices=LOSSES, help="training loss (default: the recipe's)")
    p.add_argument("--init", choices=("keras", "he", "torch"), help="initialisation (default: the recipe's)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N train and test images")
    p.add_argument("--patience", type=_positive_int, help="stop after N epochs without a better val_loss")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads PyTorch uses (default: its own, one per core); on a machine busy "
                        "with other work 1 can be several times faster (bench/RESULTS.md)")
    p.add_argument("--stream", action="store_true",
                   help="read a .npy file or image folder from disk batch by batch instead of loading it "
                        "(automatic above 1 GiB of float32 images)")
    _add_resize(p)
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
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
    return parser


def _version() -> str:
    from aekit import __version__

    return __version__


# ------------------------------------------------------------------------- commands

def cmd_summary(args) -> int:
    from aekit.models import build_model, summary

    print(summary(build_model(args.model, (1, 28, 28))))
    return 0


def cmd_data(args) -> int:
    from aekit import data

    if args.data_command == "fetch":
        print(data.fetch(args.name))
    else:
        print(json.dumps(data.describe(args.name_or_path, tuple(args.resize) if args.resize else None), indent=2))
    return 0


def cmd_train(args) -> int:
    from aekit.runs import train_and_evaluate
    from aekit.training import TrainConfig

    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the run folder to continue")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"{args.model}-{Path(args.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TrainConfig(
        data=args.data, model=args.model, recipe=args.recipe, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, loss=args.loss, init=args.init,
        schedule=args.schedule, seed=args.seed, limit=args.limit, patience=args.patience,
        device=args.device, resize=tuple(args.resize) if args.resize else None, stream=args.stream,
    )
    result = train_and_evaluate(config, out, resume=args.resume, overwrite=args.overwrite,
                                progress=not args.quiet)
    m = result.metrics
    print(f"test_mse {m['test_mse']:.5f}  test_psnr {m['test_psnr']:.2f} dB  "
          f"{m['epochs']} epochs in {m['seconds']:.1f} s ({m['images_per_second']:,.0f} images/s)")
    print(f"run folder: {result.workdir}")
    return 0


def cmd_evaluate(args) -> int:
    from aekit.runs import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data), indent=2))
    return 0


def cmd_reconstruct(args) -> int:
    from aekit.plots import save_reconstructions
    from aekit.runs import RunError, first_images, load_model, load_split

    if args.out.exists() and not args.overwrite:
        raise RunError(f"{args.out} already exists; pass --overwrite to replace it or choose another --out")
    model, config = load_model(args.run)
    _, x_test, _ = load_split(config, args.data)
    if tuple(x_test.shape[1:]) != tuple(config.image_shape):
        raise RunError(f"the data's images are {tuple(x_test.shape[1:])} (C, H, W) but the run "
                       f"was trained on {tuple(config.image_shape)}; pass data of the same size")
    save_reconstructions(model, first_images(x_test, args.n), args.out)
    print(args.out)
    return 0


COMMANDS = {"summary": cmd_summary, "data": cmd_data, "train": cmd_train,
            "evaluate": cmd_evaluate, "reconstruct": cmd_reconstruct}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with code 2 on bad usage
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("aekit: %(message)s"))
    logger = logging.getLogger("aekit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("aekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"aekit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
