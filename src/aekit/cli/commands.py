"""The ``aekit`` commands: each ``cmd_*`` takes the parsed arguments, makes its library
calls, prints the result and returns the exit code; :data:`COMMANDS` names them."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

from aekit._io import refuse_existing
from aekit.cli.messages import EXIT_FAILED, EXIT_INTERRUPTED, _as_flag, _is_main_rank, _options

# ------------------------------------------------------------------------- commands

def cmd_summary(args) -> int:
    from aekit.models import build_model, summary

    if len(args.image_shape) != 3:
        raise ValueError(f"--image-shape needs H,W,C, got {','.join(map(str, args.image_shape))}")
    height, width, channels = args.image_shape
    print(summary(build_model(args.model, (channels, height, width), **_model_params(args))))
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
    from aekit.data import data_source, is_builtin
    from aekit.config import TrainConfig, resolve_device
    from aekit.experiment import train_and_evaluate
    from aekit.runs import run_data

    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the run folder to continue")
    # Each TrainConfig field is set by the flag of the same name, when given; each option of
    # the model by its own flag, into model_params.
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    options = _model_params(args)
    if options:
        given["model_params"] = options
    config = _resumed_config(args.out, given) if args.resume else TrainConfig(**given)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    # Under torchrun, join the other ranks now (train_and_evaluate would, a step later):
    # from here on distributed.current() knows which rank this is, and rank 0 speaks.
    distributed.setup(resolve_device(config.device))
    out = args.out or Path("runs") / f"{config.model}-{Path(config.data).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config.resolved()  # a config no run can take: refused in one line before anything is said
    data = run_data(config)
    if _is_main_rank() and (is_builtin(data) or Path(data).exists()):
        # Which data --data names (a built-in, or a path): said first, on stdout. Data that is
        # not there is for train_and_evaluate's error alone.
        print(f"data: {data_source(data)}", flush=True)
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
          f"{m['epochs']} epoch{'' if m['epochs'] == 1 else 's'} in {m['seconds']:.1f} s "
          f"({m['images_per_second']:,.0f} images/s)")
    print(f"run folder: {result.workdir}")
    return 0


def _model_params(args) -> dict:
    """The model options given on the command line (``--latent-dim 8`` -> ``{"latent_dim": 8}``)."""
    from aekit.cli.parser import model_options

    return {name: getattr(args, name) for name in model_options() if getattr(args, name, None) is not None}


def _resumed_config(out: Path, given: dict):
    """The run's config with the flags given on --resume applied (experiment.resumed_config);
    a flag that would change what the run trains is refused, named as a flag."""
    from aekit.config import TrainConfig
    from aekit.experiment import ResumeMismatch, resumed_config
    from aekit.runs import CONFIG

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
    from aekit.runs import CHECKPOINT, CONFIG
    from aekit.weights import saved_progress

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


def cmd_evaluate(args) -> int:
    from aekit.experiment import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data, resize=args.resize), indent=2))
    return 0


def cmd_reconstruct(args) -> int:
    from aekit.plots import save_reconstructions
    from aekit.runs import check_image_shape, load_split
    from aekit.weights import load_model

    refuse_existing(args.out, overwrite=args.overwrite)
    model, config = load_model(args.run)
    _, x_test, _ = load_split(config, args.data, other_data=True, resize=args.resize)
    check_image_shape(x_test, config)
    save_reconstructions(model, x_test.first(args.n), args.out, overwrite=args.overwrite)
    print(args.out)
    return 0


def cmd_sample(args) -> int:
    import math

    import torch

    from aekit.data import parse_images
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
    # sample() answers in the layout fitted on (NHWC, NCHW, flat...): read back as (n, C, H, W),
    # flat rows as images of the fitted (C, H, W).
    samples = estimator.sample(n, random_state=args.seed)
    images = torch.from_numpy(parse_images(samples, lambda flat: estimator.image_shape_)[0])  # (n, C, H, W)
    columns = math.ceil(math.sqrt(n))
    rows = -(-n // columns)
    images = torch.cat([images, torch.ones(rows * columns - n, *images.shape[1:])])  # blank (white) tail
    figure = image_rows_figure([("", row) for row in images.split(columns)])
    save_figure(figure, args.out, overwrite=args.overwrite)
    print(args.out)
    return 0


def _sample_grid(args) -> int:
    """`aekit sample RUN --grid SIDE`: the decoded latent grid that the run's report shows."""
    from aekit.estimator import ConvAutoencoder
    from aekit.inference import encode
    from aekit.plots import latent_grid, save_image
    from aekit.report import N_LATENTS
    from aekit.runs import load_split

    if args.grid < 2:
        raise ValueError(f"--grid must be at least 2 (latent points per side), got {args.grid}")
    estimator = ConvAutoencoder.load(args.run)  # the one loader of `aekit sample`, as without --grid
    model, config = estimator.model_, estimator.config_
    _, x_test, _ = load_split(config, None)
    grid = latent_grid(model, encode(model, x_test.first(N_LATENTS)), n=args.grid)
    save_image(grid.image, args.out, overwrite=args.overwrite)
    print(f"{args.out}: z[0] from {grid.z0[0]:.3g} to {grid.z0[1]:.3g} (left to right), "
          f"z[1] from {grid.z1[0]:.3g} to {grid.z1[1]:.3g} (bottom to top)")
    return 0


def _images_for_run(estimator, args) -> tuple[np.ndarray, list[str]]:
    """INPUT of ``aekit denoise`` and ``aekit score`` for the model of RUN: (images (n, H, W)
    or (n, H, W, C), their names). A folder or an image file is resized as the run's own
    images were (its --resize), unless --resize is given; images of another shape than the
    model's are refused in one line that says what the model takes and how to get there."""
    from aekit.data import detect, read_images
    from aekit.runs import other_images_resize

    resizes = detect(args.input, builtins=False).resizes
    x, names = read_images(args.input, other_images_resize(estimator.config_, resizes, args.resize))
    c, h, w = estimator.image_shape_
    got = (x.shape[3] if x.ndim == 4 else 1, x.shape[1], x.shape[2])
    if got != (c, h, w):
        fix = (f"pass --resize {h} {w}" if resizes and got[1:] != (h, w)
               else f"give it images of {h}x{w} pixels with {c} channel{'s' * (c > 1)}")
        raise ValueError(f"{args.input}: images of {got[1]}x{got[2]}x{got[0]} (H x W x C), but the model of "
                         f"{args.run} takes {h}x{w}x{c}; {fix}")
    return x, names


def cmd_denoise(args) -> int:
    from aekit.data import write_images
    from aekit.estimator import ConvAutoencoder

    refuse_existing(args.out, overwrite=args.overwrite)
    estimator = ConvAutoencoder.load(args.run)
    x, names = _images_for_run(estimator, args)
    cleaned = estimator.denoise(x)
    if x.dtype == np.uint8 and args.out.suffix.lower() in (".npy", ".npz"):
        cleaned = np.round(cleaned * 255).astype(np.uint8)  # give back what came in
    print(write_images(cleaned, names, args.out, overwrite=args.overwrite))
    return 0


def cmd_score(args) -> int:
    from aekit.anomaly import run_threshold, score_images, write_heatmaps, write_scores
    from aekit.estimator import ConvAutoencoder
    from aekit.models import outlier_score_name

    # Refused before the scoring, and before either file is written.
    refuse_existing(args.out, args.heatmaps, overwrite=args.overwrite)
    estimator = ConvAutoencoder.load(args.run)
    if args.contamination is not None or args.false_positive_rate is not None:
        estimator.set_threshold(threshold=run_threshold(args.run, args.contamination, args.false_positive_rate,
                                                        estimator.model_))
    elif estimator.threshold_ is None:
        raise ValueError(f"{args.run} records no outlier threshold on its model's outlier score (its "
                         "metrics.json has none, or one an aekit before 0.5 took on another score); "
                         "pass --contamination C or --fpr F to derive one from the run's own images")
    x, names = _images_for_run(estimator, args)
    rows = score_images(estimator, x, names)
    write_scores(rows, args.out, overwrite=args.overwrite)
    if args.heatmaps is not None:
        write_heatmaps(estimator, x, names, args.heatmaps, overwrite=args.overwrite)
    flagged = sum(r["is_outlier"] for r in rows)
    print(f"{len(rows)} images scored, {flagged} outliers (threshold {estimator.threshold_:.6g} on the "
          f"{outlier_score_name(estimator.model_)}): {args.out}")
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

    print(write_report(args.run, data=args.data, overwrite=args.overwrite, resize=args.resize))
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
