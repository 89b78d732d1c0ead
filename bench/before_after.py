"""Two versions of aekit side by side: each one's own bench workers, taking turns.

    git worktree add ../before <commit>
    .venv/bin/python bench/before_after.py ../before .      # before, after: repository roots

Rows: training and encoding (each tree's ``bench/speed.py --worker``), and in one process per
tree the user's ``ConvAutoencoder(model="seed").transform``, the tree's fastest encoder and
``evaluate`` on the 10,000 MNIST test images. Medians of ``--rounds`` turns; the trees
alternate who goes first. For comparing within one run on one machine, never for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREADS = (1, 2)


def user_paths(threads: int) -> dict:
    """In this process: images/s of transform, the fastest encoder and evaluate (10k test images)."""
    import torch

    torch.set_num_threads(threads)
    try:  # aekit >= 0.2
        from aekit.data import prepare_images
        from aekit.fast import keep_freed_memory
        from aekit.inference import encode as fastest, evaluate
    except ImportError:  # aekit 0.1
        from aekit.models import encode_images as fastest, keep_freed_memory
        from aekit.training import evaluate, prepare_images
    from aekit import ConvAutoencoder
    from aekit.data import load_dataset

    keep_freed_memory()  # as the aekit command and the bench's workers do
    (x, _), (x_test, _) = load_dataset("mnist")
    estimator = ConvAutoencoder(model="seed", epochs=1, random_state=0).fit(x[:1024])
    model, images = estimator.model_, prepare_images(x_test)
    ways = {"transform": lambda: estimator.transform(x_test), "fastest": lambda: fastest(model, images),
            "evaluate": lambda: evaluate(model, images, "bce")}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(6):
        for name, run in ways.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: len(x_test) / statistics.median(times[1:]) for name, times in seconds.items()}


def run(root: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--user-paths", type=int, help=argparse.SUPPRESS)  # worker: threads
    args = parser.parse_args()
    if args.user_paths:
        print(json.dumps(user_paths(args.user_paths)))
        return
    rows = []  # (label, worker spec or None for the user paths, key)
    for t in THREADS:
        rows += [(f"fit, blog recipe, batch 128, {t} thr",
                  dict(kind="train", impl="aekit", recipe="blog", batch=128, threads=t, workers=t, images=12800),
                  "images_per_second"),
                 (f"fit, default recipe, batch 32, {t} thr",
                  dict(kind="train", impl="aekit", recipe="default", batch=32, threads=t, images=12800),
                  "images_per_second"),
                 (f"encode, batch 1024, {t} workers", dict(kind="encode", threads=t), "images_per_second")]
    rows += [(f"ConvAutoencoder.transform, {THREADS[-1]} thr", None, "transform"),
             (f"fastest encoder, {THREADS[-1]} thr", None, "fastest"),
             (f"evaluate (10k, bce), {THREADS[-1]} thr", None, "evaluate")]
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for tree in (("before", "after") if r % 2 == 0 else ("after", "before")):
            root = trees[tree]
            user = run(root, [__file__, str(root), str(root), "--user-paths", str(THREADS[-1])])
            for label, spec, key in rows:
                out = user if spec is None else run(root, [str(root / "bench" / "speed.py"), "--worker",
                                                           json.dumps(spec)])
                if key in out:
                    rates.setdefault((label, tree), []).append(out[key])
                else:
                    print(f"{tree}, {label}: {out.get('error')}", file=sys.stderr)
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    print(f"before: {trees['before']}\nafter: {trees['after']}\n")
    print("| row | before images/s | after images/s | after/before |\n| --- | ---: | ---: | ---: |")
    for label, _, _ in rows:
        before, after = (statistics.median(rates.get((label, t), [float("nan")])) for t in ("before", "after"))
        print(f"| {label} | {before:,.0f} | {after:,.0f} | {after / before:.2f}x |")
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
