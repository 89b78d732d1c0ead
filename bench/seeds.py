"""The README's seed table: the default recipe on full MNIST, five seeds, 20 epochs each.

    .venv/bin/python bench/seeds.py                                      # the README's table
    .venv/bin/python bench/seeds.py --epochs 1 --limit 1000 --seeds 0 1  # a smoke run

Each seed trains as ``aekit train --seed S`` does (:func:`aekit.experiment.train_and_evaluate`)
into a run folder under ``--out`` (default: a temporary folder, removed at the end) and
gives one row: the test MSE after epoch 1 (history.csv's val_mse; validation is the test
split) and after the last epoch (metrics.json's test_mse). A 20-epoch seed takes 4-10
minutes on two CPU cores. The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from aekit.experiment import train_and_evaluate
from aekit.config import TrainConfig

# The README's bars for the default recipe on full MNIST (tests/test_bars.py checks seed 0).
BAR_AFTER_1, BAR_AFTER_20 = 0.010, 0.0030


def seed_row(seed: int, epochs: int, limit: int | None, device: str, workdir: Path) -> tuple[float, float]:
    """(test MSE after epoch 1, after the last epoch) of one seed's run in ``workdir``."""
    config = TrainConfig(model="seed", seed=seed, epochs=epochs, limit=limit, device=device)
    result = train_and_evaluate(config, workdir, progress=False)
    return result.state.history[0].val_mse, result.metrics["test_mse"]


def table(rows: dict[int, tuple[float, float]], epochs: int) -> str:
    lines = [f"| seed | test MSE after epoch 1 | after epoch {epochs} |", "| --- | --- | --- |"]
    lines += [f"| {seed} | {first:.5f} | {last:.5f} |" for seed, (first, last) in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: 0 1 2 3 4")
    parser.add_argument("--epochs", type=int, default=20, help="default: 20")
    parser.add_argument("--limit", type=int, help="only the first N train and test images (default: all)")
    parser.add_argument("--device", default="auto", help="as aekit train --device (default: auto)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for seed in args.seeds:
            started = time.perf_counter()
            rows[seed] = seed_row(seed, args.epochs, args.limit, args.device, root / f"seed{seed}")
            print(f"seed {seed}: {rows[seed][0]:.5f} after epoch 1, {rows[seed][1]:.5f} after epoch "
                  f"{args.epochs} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    data = "full MNIST" if args.limit is None else f"the first {args.limit:,} MNIST images"
    print(f"Seeds of the default recipe, {args.epochs} epoch{'s' * (args.epochs != 1)}, {data} (bench/seeds.py, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}):\n")
    print(table(rows, args.epochs))
    if args.epochs == 20 and args.limit is None:
        cleared = sum(first <= BAR_AFTER_1 and last <= BAR_AFTER_20 for first, last in rows.values())
        print(f"\nThe bar is {BAR_AFTER_1} after one epoch and {BAR_AFTER_20} after twenty: "
              f"{cleared} of {len(rows)} seeds clear both.")


if __name__ == "__main__":
    main()
