"""The quality suite: aekit's defaults against PCA on every kind of image (`make bench-quality`).

For each data set and latent size, ``ConvAutoencoder(latent_dim=d)`` with nothing else set
(aekit's defaults, including the rules that choose from the data) and scikit-learn's PCA
with ``d`` components, fitted on the same training images and scored on the same test
images: test MSE per pixel, mean SSIM (scikit-image, data range 1, 7x7 windows or the
largest odd window that fits), and fit time. Prints one markdown table and writes it, with
the machine and the command, to bench/QUALITY.md.

    python bench/quality.py                              # everything (over an hour on 2 cores)
    python bench/quality.py --data photos32 --latent 8   # one cell

Each finished cell is also appended to bench/quality-cells.jsonl, so that an interrupted run
can go on with ``--resume`` (cells with the same data, latent size and limit are reused;
each records the aekit version that made it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import aekit  # noqa: E402
from aekit.data import load_dataset  # noqa: E402
from aekit.estimator import ConvAutoencoder  # noqa: E402
from aekit.pca import PCAReconstructor  # noqa: E402
from speed import machine  # noqa: E402  (bench/speed.py: the CPU, cores, torch)

DATA = ("mnist", "fashion-mnist", "digits8", "gray32", "photos32", "photos64")
LATENTS = (2, 8, 16, 32, 64)
# MNIST and Fashion-MNIST train on their first 10,000 training images (all 10,000 test
# images are scored), so that the whole suite runs in about an hour on 2 cores; the others
# are used whole (see aekit.data.photos).
LIMITS = {"mnist": 10000, "fashion-mnist": 10000}
CELLS = HERE / "quality-cells.jsonl"


def ssim(reconstructions: np.ndarray, images: np.ndarray) -> float:
    """Mean SSIM over images, both float (n, H, W[, C]) in [0, 1]."""
    from skimage.metrics import structural_similarity

    side = min(images.shape[1:3])
    window = min(7, side if side % 2 else side - 1)
    channel = -1 if images.ndim == 4 else None
    return float(np.mean([structural_similarity(a, b, data_range=1.0, win_size=window, channel_axis=channel)
                          for a, b in zip(reconstructions, images)]))


def cell(name: str, latent_dim: int, split) -> dict:
    (x_train, _), (x_test, _) = split
    test = x_test.astype(np.float32) / 255.0
    row = {"data": name, "latent_dim": latent_dim, "train": len(x_train), "test": len(x_test),
           "limit": LIMITS.get(name), "aekit": aekit.__version__}
    for method, est in (("pca", PCAReconstructor(latent_dim=latent_dim, random_state=0)),
                        ("aekit", ConvAutoencoder(latent_dim=latent_dim, random_state=0))):
        started = time.perf_counter()
        est.fit(x_train)
        row[f"{method}_seconds"] = time.perf_counter() - started
        reconstructions = est.reconstruct(x_test)
        row[f"{method}_mse"] = float(est.reconstruction_error(x_test).mean())
        row[f"{method}_ssim"] = ssim(reconstructions, test)
        if method == "aekit":
            row["aekit_model"], row["aekit_epochs"] = est.config_.model, est.config_.epochs
    return row


# Test MSE per pixel below which a reconstruction is exact up to float rounding: a code with
# as many numbers as the images have pixels (digits8 at 64) is lossless for both methods,
# and which one's rounding is smaller (1e-15 against 1e-16) says nothing.
EXACT = 1e-10


def verdict(r: dict) -> str:
    if max(r["aekit_mse"], r["pca_mse"]) < EXACT:
        return "tie: both exact"
    return "yes" if r["aekit_mse"] < r["pca_mse"] else "**no**"


def table(rows: list[dict]) -> str:
    lines = ["| data | train images | latent | PCA MSE | aekit MSE | aekit / PCA | PCA SSIM | aekit SSIM "
             "| PCA fit s | aekit fit s (epochs) | aekit wins |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        exact = verdict(r).startswith("tie")
        ratio = "exact" if exact else f"{r['aekit_mse'] / r['pca_mse']:.3f}"
        lines.append(f"| {r['data']} | {r['train']:,} | {r['latent_dim']} | {r['pca_mse']:.5f} | {r['aekit_mse']:.5f} "
                     f"| {ratio} | {r['pca_ssim']:.3f} | {r['aekit_ssim']:.3f} "
                     f"| {r['pca_seconds']:.1f} | {r['aekit_seconds']:.0f} ({r['aekit_epochs']}) "
                     f"| {verdict(r)} |")
    verdicts = [verdict(r) for r in rows]
    ties = verdicts.count("tie: both exact")
    lines.append(f"\naekit's defaults beat PCA's test MSE in {verdicts.count('yes')} of {len(rows)} cells"
                 + (f"; in {ties} both reconstruct exactly (MSE below {EXACT:g}: as many numbers as pixels)"
                    if ties else "") + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=",".join(DATA), help=f"comma-separated, from {', '.join(DATA)}")
    parser.add_argument("--latent", default=",".join(map(str, LATENTS)), help="comma-separated latent sizes")
    parser.add_argument("--out", default=str(HERE / "QUALITY.md"), help="the markdown file to write")
    parser.add_argument("--resume", action="store_true", help=f"reuse the finished cells in {CELLS.name}")
    parser.add_argument("--table-only", action="store_true",
                        help=f"run nothing: write the table of the cells finished in {CELLS.name}, "
                             "naming those not run")
    args = parser.parse_args(argv)
    names, latents = args.data.split(","), [int(d) for d in args.latent.split(",")]
    unknown = sorted(set(names) - set(DATA))
    if unknown:
        parser.error(f"unknown data {unknown}; expected some of {', '.join(DATA)}")
    done = {}
    if (args.resume or args.table_only) and CELLS.exists():
        for line in CELLS.read_text().splitlines():
            r = json.loads(line)
            done[(r["data"], r["latent_dim"], r["limit"])] = r
    elif CELLS.exists():
        CELLS.unlink()
    started = time.perf_counter()
    rows, missing = [], []
    for name in names:
        if args.table_only:
            for d in latents:
                found = done.get((name, d, LIMITS.get(name)))
                rows.append(found) if found else missing.append(f"{name} at {d}")
            continue
        split = load_dataset(name)
        if name in LIMITS:
            (x_train, y_train), test = split
            split = ((x_train[:LIMITS[name]], None if y_train is None else y_train[:LIMITS[name]]), test)
        for d in latents:
            key = (name, d, LIMITS.get(name))
            r = done.get(key) or cell(name, d, split)
            if key not in done:
                with open(CELLS, "a") as f:
                    f.write(json.dumps(r) + "\n")
            rows.append(r)
            print(table([r]).splitlines()[2], flush=True)
    rows.sort(key=lambda r: (DATA.index(r["data"]), r["latent_dim"]))
    command = "python bench/quality.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    took = (f" from the cells in {CELLS.name}, each run by `python bench/quality.py [--resume]`" if args.table_only
            else f", {(time.perf_counter() - started) / 60:.0f} min")
    text = (f"# aekit's defaults against PCA\n\n`{command}` ({time.strftime('%Y-%m-%d')}{took})\n\n"
            f"Machine: {machine()}, aekit {aekit.__version__}\n\n{table(rows)}")
    if missing:
        text += f"\nNot run: {', '.join(missing)}.\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
