"""Why the default recipe is what it is: one change at a time from the blog's recipe.

Trains the seed network on full MNIST for each variant and prints test MSE (per pixel,
images in [0, 1]) after epoch 1 and after the last epoch, as a Markdown table.

    .venv/bin/python bench/recipes.py                 # every variant, 20 epochs, seed 0
    .venv/bin/python bench/recipes.py --seeds 0 1 2 3 4 --only default
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from aekit.experiment import train_and_evaluate
from aekit.config import TrainConfig

# name -> overrides of TrainConfig, each a step from the blog's recipe towards the default.
VARIANTS = {
    "blog": dict(recipe="blog"),
    "blog + bce": dict(recipe="blog", loss="bce"),
    "blog + bce + batch 32": dict(recipe="blog", loss="bce", batch_size=32),
    "blog + bce + batch 32 + lr 3e-3": dict(recipe="blog", loss="bce", batch_size=32, lr=3e-3),
    "default without cosine (constant lr)": dict(schedule="constant"),
    "default with Keras init": dict(init="keras"),
    "default with MSE loss": dict(loss="mse"),
    "default": dict(),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--limit", type=int, help="first N images only (a quick look)")
    args = parser.parse_args(argv)

    print(f"| variant | seed | loss | init | batch | lr | schedule | test MSE epoch 1 | test MSE epoch {args.epochs} | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            config = dataclasses.replace(TrainConfig(model="seed", epochs=args.epochs, seed=seed, limit=args.limit),
                                         **overrides)
            resolved = config.resolved()
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                result = train_and_evaluate(config, tmp, progress=False)
                seconds = (time.perf_counter() - started) / args.epochs
            history = result.state.history
            print(f"| {name} | {seed} | {resolved.loss} | {resolved.init} | {resolved.batch_size} | "
                  f"{resolved.lr:g} | {resolved.schedule} | {history[0].val_mse:.5f} | "
                  f"{history[-1].val_mse:.5f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
