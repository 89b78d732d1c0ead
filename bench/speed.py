"""Training and encoding speed of the seed network, measured side by side (issues 4 and 20).

    .venv/bin/python bench/speed.py            # the full table (make bench); ~10 min on 2 busy cores
    .venv/bin/python bench/speed.py --quick    # fewer images, one round: a smoke run

Every number comes from a subprocess of its own (so its peak resident memory is its own),
and the implementations take turns, round after round, so a change in the machine's load
hits them all alike; the table gives each one's median. What is compared:

- ``keras``: stock Keras 3 on its PyTorch backend, the seed's code as written (NHWC,
  ``compile(optimizer='adam', loss='mean_squared_error')``, ``fit(batch_size=128)``);
  "not installed" when ``keras`` does not import (``pip install -e '.[bench]'``).
- ``plain``: a plain PyTorch loop as a tutorial writes it: ``nn.Sequential``, NCHW,
  ``DataLoader(shuffle=True)``, ``Adam``, ``MSELoss``, ``loss.item()`` every step.
- ``aekit``: :func:`aekit.training.fit` on the same data and batch, with the blog's recipe
  and with the default one.

All three at batch 32 and at batch 128. Then where an epoch of aekit goes (one thread, under
:mod:`torch.profiler`: bench/profile_step.py), and the default model (``pca-conv``) against
a plain eager loop and encoder over the same network.

Then the encoder: :func:`aekit.inference.encode` at each thread count, and the user's call,
``ConvAutoencoder(model="seed").transform`` on the 10,000 MNIST test images, against that
path and a plain eager ``model.encode`` in one process (issue 9: at least 0.8x the former).

Each runs at every thread count in ``--threads``: thread count is the largest effect on
a shared machine (see bench/RESULTS.md). Timings are for comparing rows of one run, never
for tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from profile_step import layer_flops, print_profile, profile_fit  # noqa: E402  (bench/profile_step.py)
MNIST_TRAIN = 60_000


# ----------------------------------------------------------------------- the workers
# Each worker runs in its own process, prints one JSON line and exits.

def _mnist(n: int):
    from aekit.data import load_dataset
    import numpy as np
    (x_train, _), (x_test, _) = load_dataset("mnist")
    reps = max(1, math.ceil(n / len(x_train)))
    return np.concatenate([x_train] * reps)[:n], x_test


def _train_keras(n: int, batch: int) -> float:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    from keras.layers import Conv2D, Input, MaxPooling2D, UpSampling2D
    from keras.models import Model

    x, _ = _mnist(n)
    x = x.astype("float32") / 255.0
    x = x[:, :, :, None]
    # The seed, as written in the post.
    input_img = Input(shape=(28, 28, 1))
    h = Conv2D(16, (3, 3), activation="relu", padding="same")(input_img)
    h = MaxPooling2D((2, 2), padding="same")(h)
    h = Conv2D(8, (3, 3), activation="relu", padding="same")(h)
    h = MaxPooling2D((2, 2), padding="same")(h)
    encoded = Conv2D(8, (3, 3), activation="relu", padding="same")(h)
    h = Conv2D(8, (3, 3), activation="relu", padding="same")(encoded)
    h = UpSampling2D((2, 2))(h)
    h = Conv2D(8, (3, 3), activation="relu", padding="same")(h)
    h = UpSampling2D((2, 2))(h)
    h = Conv2D(16, (3, 3), activation="relu", padding="same")(h)
    decoded = Conv2D(1, (3, 3), activation="sigmoid", padding="same")(h)
    autoencoder = Model(input_img, decoded)
    autoencoder.compile(optimizer="adam", loss="mean_squared_error")
    autoencoder.fit(x[:2 * batch], x[:2 * batch], batch_size=batch, epochs=1, verbose=0)  # warm up
    started = time.perf_counter()
    autoencoder.fit(x, x, batch_size=batch, epochs=1, shuffle=True, verbose=0)
    return n / (time.perf_counter() - started)


def _train_plain(n: int, batch: int, device: str) -> float:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    x, _ = _mnist(n)
    data = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 255.0
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 1, 3, padding=1), nn.Sigmoid(),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.MSELoss()

    def epoch(loader) -> float:
        running = 0.0
        for (xb,) in loader:
            xb = xb.to(device)
            loss = criterion(model(xb), xb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
        return running

    epoch(DataLoader(TensorDataset(data[:2 * batch]), batch_size=batch, shuffle=True))  # warm up
    started = time.perf_counter()
    epoch(DataLoader(TensorDataset(data), batch_size=batch, shuffle=True))
    return n / (time.perf_counter() - started)


def _aekit_model(config, device):
    import dataclasses

    from aekit.start import new_model
    return new_model(dataclasses.replace(config, image_shape=(1, 28, 28)), device)


def _train_aekit(n: int, batch: int, device: str, recipe: str, workers: int | None,
                 precision: str = "float32") -> float:
    from aekit.data import prepare_images
    from aekit.config import TrainConfig
    from aekit.training import fit

    x, x_test = _mnist(n)
    x, x_val = prepare_images(x), prepare_images(x_test[:10])
    config = TrainConfig(model="seed", recipe=recipe, epochs=1, batch_size=batch, device=device,
                         precision=precision).resolved()
    fit(_aekit_model(config, device), x[:2 * batch], x_val, config, progress=False, workers=workers)  # warm up
    model = _aekit_model(config, device)
    started = time.perf_counter()
    fit(model, x, x_val, config, progress=False, workers=workers)
    return n / (time.perf_counter() - started)


def _encode(device: str, workers: int, batch: int = 1024, repeats: int = 20) -> dict:
    import torch

    from aekit.inference import encode
    from aekit.data import prepare_images
    from aekit.config import TrainConfig

    _, x_test = _mnist(0)
    x = prepare_images(x_test[:batch]).to(device)
    model = _aekit_model(TrainConfig(model="seed").resolved(), device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def rate(images: torch.Tensor, times: int) -> list[float]:
        seconds = []
        for _ in range(times):
            started = time.perf_counter()
            encode(model, images, workers=workers)
            sync()
            seconds.append(time.perf_counter() - started)
        return seconds

    rate(x, 3)
    batch_rate = batch / statistics.median(rate(x, repeats))
    latency = statistics.median(rate(x[:1], 200))
    return {"images_per_second": batch_rate, "latency_ms": 1e3 * latency}


def _default_model(n: int, batch: int = 32) -> dict:
    """The default model: images/s of aekit's fit and of a plain eager loop over the same
    network (one pass over ``n`` images each, after a warm-up), and of
    :func:`aekit.inference.encode` and an eager ``model.encode`` on the 10,000 test images."""
    import dataclasses

    import torch
    from torch import nn

    from aekit.config import TrainConfig
    from aekit.data import prepare_images
    from aekit.inference import encode
    from aekit.start import new_model
    from aekit.training import fit

    x_train, x_test = _mnist(n)
    x, x_val, x_test = prepare_images(x_train), prepare_images(x_test[:10]), prepare_images(x_test)
    config = TrainConfig(model="pca-conv", epochs=1, batch_size=batch).resolved()
    config = dataclasses.replace(config, image_shape=(1, 28, 28))

    def aekit_fit(images, precision: str = "float32") -> float:
        model = new_model(config, torch.device("cpu"))
        started = time.perf_counter()
        fit(model, images, x_val, dataclasses.replace(config, precision=precision), progress=False)
        return len(images) / (time.perf_counter() - started)

    def plain_fit(images) -> float:
        model = new_model(config, torch.device("cpu"))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        started = time.perf_counter()
        for xb in images[torch.randperm(len(images))].split(batch):
            loss = nn.functional.mse_loss(model(xb), xb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return len(images) / (time.perf_counter() - started)

    aekit_fit(x[:4 * batch]), plain_fit(x[:4 * batch]), aekit_fit(x[:4 * batch], "bfloat16")  # warm up
    out = {"fit": aekit_fit(x), "plain": plain_fit(x), "fit_bfloat16": aekit_fit(x, "bfloat16")}
    model = new_model(config, torch.device("cpu")).eval()
    encode(model, x_test[:256])
    started = time.perf_counter()
    encode(model, x_test)
    out["encode"] = len(x_test) / (time.perf_counter() - started)
    with torch.inference_mode():
        model.encode(x_test[:256])
        started = time.perf_counter()
        model.encode(x_test)
    out["eager_encode"] = len(x_test) / (time.perf_counter() - started)
    return out


def _transform(rounds: int = 7) -> dict:
    """The user's encoder against the fastest path and plain PyTorch, on the 10,000 MNIST
    test images, in one process, taking turns: ``ConvAutoencoder(model="seed").transform``
    (uint8 (n, 28, 28) in, float32 (n, 392) out: parsing and conversion counted), the
    bench's best path (:func:`aekit.inference.encode` on a prepared float tensor), and a
    plain eager ``model.encode(x)`` in one pass. Then evaluation: ``aekit.inference.evaluate``
    (the objective and the MSE, as validation after every epoch computes them) against a
    plain eager ``model(x)`` and its squared error. Images per second, medians."""
    import torch

    from aekit import ConvAutoencoder
    from aekit.inference import encode, evaluate
    from aekit.data import prepare_images

    x_train, x_test = _mnist(1024)
    estimator = ConvAutoencoder(model="seed", epochs=1, random_state=0).fit(x_train)
    model, x = estimator.model_, prepare_images(x_test)

    def eager():
        with torch.inference_mode():
            model.encode(x)

    def eager_evaluate():
        with torch.inference_mode():
            float(((model(x) - x) ** 2).mean())

    ways = {"transform": lambda: estimator.transform(x_test), "best": lambda: encode(model, x), "eager": eager,
            "evaluate": lambda: evaluate(model, x, estimator.config_.loss), "eager_evaluate": eager_evaluate}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds + 1):
        for name, run in ways.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: len(x_test) / statistics.median(times[1:]) for name, times in seconds.items()}


def _matmul(size: int = 2048, repeats: int = 10) -> float:
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started))
    return best / 1e9


def _quality(target: float, check_every: int) -> dict:
    """Seconds of training (evaluation not counted) until test MSE <= target, default recipe."""
    from aekit import fast
    from aekit.data import prepare_images
    from aekit.config import TrainConfig
    from aekit.start import make_optimizer

    x_train, x_test = _mnist(MNIST_TRAIN)
    x_train, x_test = prepare_images(x_train), prepare_images(x_test)
    # The schedule of `make demo` (20 epochs); TrainConfig leaves epochs to the epoch rule.
    config = TrainConfig(model="seed", epochs=20).resolved()
    model = _aekit_model(config, "cpu")
    optimizer = make_optimizer(model, config)
    with fast.on_cpu(model, optimizer) as twin:  # as fit trains: aekit.fast's twin, channels_last
        return _train_to(model, twin, optimizer, config, x_train, x_test, target, check_every)


def _train_to(model, twin, optimizer, config, x_train, x_test, target: float, check_every: int) -> dict:
    import torch

    from aekit import fast
    from aekit.inference import evaluate
    from aekit.data import ArrayImages
    from aekit.start import learning_rate
    from aekit.training import train_step

    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    micro = fast.default_micro_batch(torch.device("cpu"), config.batch_size)
    seconds, step = 0.0, 0
    for epoch in range(config.epochs):
        for xb in ArrayImages(x_train).batches(config.batch_size, config.seed, epoch):
            started = time.perf_counter()
            twin.train()
            optimizer.param_groups[0]["lr"] = learning_rate(config, step, total)
            train_step(twin, xb, xb, config.loss, optimizer, micro)
            seconds += time.perf_counter() - started
            step += 1
            if step % check_every == 0:
                mse = evaluate(model, x_test, config.loss).mse
                if mse <= target:
                    return {"seconds": seconds, "images": step * config.batch_size, "mse": mse}
    return {"seconds": None, "images": step * config.batch_size, "mse": mse}


def _stream(path: str, train_batches: int) -> dict:
    """Read one whole epoch of a big .npy through NpyStream; train on its first batches."""
    import torch

    from aekit import fast
    from aekit.data import NpyStream
    from aekit.config import TrainConfig
    from aekit.start import make_optimizer

    config = TrainConfig(model="seed", recipe="blog").resolved()
    model = _aekit_model(config, "cpu")
    optimizer = make_optimizer(model, config)
    stream = NpyStream(path)
    micro = fast.default_micro_batch(torch.device("cpu"), config.batch_size)
    with fast.on_cpu(model, optimizer) as twin:  # as fit trains: aekit.fast's twin, channels_last
        return _read_and_train(stream, twin, optimizer, config, micro, train_batches)


def _read_and_train(stream, model, optimizer, config, micro: int, train_batches: int) -> dict:
    from aekit.training import train_step

    started, trained, images = time.perf_counter(), 0.0, 0
    for index, xb in enumerate(stream.batches(config.batch_size, seed=0, epoch=0)):
        images += len(xb)
        if index < train_batches:
            step_started = time.perf_counter()
            train_step(model, xb, xb, config.loss, optimizer, micro)
            trained += time.perf_counter() - step_started
    read_seconds = time.perf_counter() - started - trained
    return {"images": images, "trained_images": train_batches * config.batch_size,
            "train_images_per_second": train_batches * config.batch_size / trained,
            "read_images_per_second": images / read_seconds}


def worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind in ("encode", "transform", "quality", "stream") or spec.get("impl") == "aekit":
        from aekit.fast import keep_freed_memory

        keep_freed_memory()  # as the aekit command does: the library leaves it to its caller
    if kind == "train":
        impl, n, batch, device = spec["impl"], spec["images"], spec["batch"], spec.get("device", "cpu")
        if impl == "keras":
            rate = _train_keras(n, batch)
        elif impl == "plain":
            rate = _train_plain(n, batch, device)
        else:
            rate = _train_aekit(n, batch, device, spec["recipe"], spec.get("workers"),
                                spec.get("precision", "float32"))
        out = {"images_per_second": rate}
    elif kind == "encode":
        out = _encode(spec.get("device", "cpu"), spec["threads"])
    elif kind == "transform":
        out = _transform()
    elif kind == "profile":
        out = profile_fit(spec["model"], spec["recipe"], spec["batch"], spec["images"])
    elif kind == "default_model":
        out = _default_model(spec["images"])
    elif kind == "matmul":
        out = {"gflops": _matmul()}
    elif kind == "quality":
        out = _quality(spec["target"], spec["check_every"])
    elif kind == "stream":
        out = _stream(spec["path"], spec["train_batches"])
    elif kind == "idle":
        import aekit.training  # noqa: F401  (what importing torch and aekit costs)
        out = {}
    else:
        raise ValueError(f"unknown worker kind {kind!r}")
    out["max_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process' peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over from the parent through fork and exec, so a worker started by a big parent would
    report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh interpreter; {'error': ...} when it fails."""
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------- the table

def seed_flops_per_image() -> tuple[float, float]:
    """(forward, training step) FLOPs per 28x28 image: 2*H*W*Cin*Cout*9 per convolution
    (profile_step.layer_flops), the step counted as three forwards (backward ~ twice the
    forward), as the issue does."""
    forward = sum(layer_flops("seed")[0].values())
    return forward, 3 * forward


def keras_status() -> str | None:
    """None when Keras 3 with the torch backend imports, else why not."""
    probe = "import os; os.environ['KERAS_BACKEND']='torch'; import keras; print(keras.__version__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"not installed ({last}); pip install -e '.[bench]'"


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"
    return (f"{cpu}, {os.cpu_count()} cores (torch default {torch.get_num_threads()} threads){gpu}; "
            f"{isa_and_caches()}; Python {platform.python_version()}, torch {torch.__version__} "
            f"(CPU kernels: {torch.backends.cpu.get_cpu_capability()})")


def isa_and_caches() -> str:
    """The vector instruction sets that matter to float32 training, and the caches of
    core 0, from Linux's /proc and /sys ('?' where they cannot be read)."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    isa = " ".join(flag for flag in wanted if flag in flags) or "?"
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    return f"ISA {isa}; caches per core 0: {', '.join(caches) or '?'}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12_800, help="images per training measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to compare (default: 1 and the number of cores)")
    parser.add_argument("--stream-images", type=int, default=1_000_000, help="size of the big .npy")
    parser.add_argument("--quick", action="store_true", help="2,560 images, 1 round, a 100,000-image stream")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["keras", "quality", "stream", "cuda", "profile", "default-model"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.images, args.rounds, args.stream_images = 2_560, 1, 100_000
    import numpy as np
    import torch

    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    keras_missing = "keras" in args.skip and "skipped (--skip keras)" or keras_status()
    forward_flops, step_flops = seed_flops_per_image()
    print(f"# bench/speed.py, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"seed network: {forward_flops / 1e6:.2f} MFLOP forward, {step_flops / 1e6:.2f} MFLOP per training "
          f"image; {args.images:,} images per measurement, {args.rounds} rounds, median shown\n", flush=True)

    rows = []  # (label, spec)
    for t in threads:
        for batch in (32, 128):
            if keras_missing is None:
                rows.append((f"Keras 3, torch backend, batch {batch}, {t} thr",
                             dict(impl="keras", batch=batch, threads=t)))
            rows.append((f"plain PyTorch loop, batch {batch}, {t} thr", dict(impl="plain", batch=batch, threads=t)))
            for recipe in ("blog", "default"):
                rows.append((f"aekit fit, {recipe} recipe, batch {batch}, {t} thr",
                             dict(impl="aekit", recipe=recipe, batch=batch, threads=t, workers=t)))
            if t == max(threads):  # the option, not the same run: beside the float32 rows, not among them
                rows.append((f"aekit fit, default recipe, precision bfloat16, batch {batch}, {t} thr",
                             dict(impl="aekit", recipe="default", batch=batch, threads=t, workers=t,
                                  precision="bfloat16")))
        if t == max(threads):
            rows.append(("aekit fit, blog recipe, batch 128, default (pool or 1 thr, as load allows)",
                         dict(impl="aekit", recipe="blog", batch=128, threads=t, workers=None)))
    results: dict[str, list[dict]] = {label: [] for label, _ in rows}
    peaks = {t: [] for t in threads}
    for round_index in range(args.rounds):
        for t in threads:
            peaks[t].append(run_worker({"kind": "matmul", "threads": t}))
        for label, spec in rows:
            results[label].append(run_worker({"kind": "train", "images": args.images, **spec}))
        print(f"round {round_index + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    def median(values: list[dict], key: str) -> float | None:
        good = [v[key] for v in values if key in v]
        return statistics.median(good) if good else None

    peak = {t: median(peaks[t], "gflops") for t in threads}
    print("## Training (seed network, MNIST images, one pass over the measured images)\n")
    print("'N thr' is torch.set_num_threads(N) for Keras, the plain loop and aekit at batch 32 (one "
          "chunk, so no ChunkPool); aekit at batch 128 runs N ChunkPool workers of one thread each; "
          "'default' is fit() left to choose (ChunkPool or one thread, re-checked every 400 steps). "
          "'vs Keras' and 'vs plain' compare rows of the same batch and threads; Keras runs the blog's "
          "code (its recipe: MSE, Glorot init), against which both of aekit's recipes are compared.\n")
    print("| implementation | images/s median (min-max) | s/epoch (60k) | GFLOP/s | % of matmul peak | vs Keras | vs plain | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = {label: median(results[label], "images_per_second") for label, _ in rows}
    for label, spec in rows:
        rate, t = rates[label], spec["threads"]
        errors = [r["error"] for r in results[label] if "error" in r]
        if rate is None:
            print(f"| {label} | failed: {errors[0] if errors else '?'} | | | | | | |")
            continue
        gflops = rate * step_flops / 1e9
        keras = rates.get(f"Keras 3, torch backend, batch {spec['batch']}, {t} thr")
        plain = rates.get(f"plain PyTorch loop, batch {spec['batch']}, {t} thr")
        ratio = lambda ref: f"{rate / ref:.2f}x" if ref else "-"  # noqa: E731
        spread = [r["images_per_second"] for r in results[label] if "images_per_second" in r]
        # The peak is float32's: a bfloat16 row's share of it would overstate how busy the machine is.
        share = "-" if spec.get("precision") == "bfloat16" else f"{100 * gflops / peak[t]:.0f}%"
        print(f"| {label} | {rate:,.0f} ({min(spread):,.0f}-{max(spread):,.0f}) | {MNIST_TRAIN / rate:.1f} | {gflops:.1f} | "
              f"{share} | {ratio(keras)} | {ratio(plain)} | "
              f"{median(results[label], 'max_rss_mb'):.0f} |")
    if keras_missing is not None:
        print(f"| Keras 3, torch backend | {keras_missing} | | | | | | |")
    print("\nfloat32 matrix-product peak (2048x2048, best of 10, median of rounds): "
          + ", ".join(f"{t} thr {peak[t]:.0f} GFLOP/s" for t in threads))
    stock_t = torch.get_num_threads()
    for batch in (32, 128):
        best = max((label for label, spec in rows
                    if spec["impl"] == "aekit" and spec["batch"] == batch and spec["recipe"] == "blog" and rates[label]),
                   key=lambda label: rates[label], default=None)
        for ref_name in ("Keras 3, torch backend", "plain PyTorch loop"):
            ref = rates.get(f"{ref_name}, batch {batch}, {stock_t} thr")
            if best and ref:
                print(f"best aekit, blog recipe (batch {batch}, {best.split(f'batch {batch}, ', 1)[1]}) vs "
                      f"{ref_name} at torch's default {stock_t} threads: {rates[best] / ref:.2f}x")
        bf16 = rates.get(f"aekit fit, default recipe, precision bfloat16, batch {batch}, {max(threads)} thr")
        keras = rates.get(f"Keras 3, torch backend, batch {batch}, {max(threads)} thr")
        if bf16 and keras:
            print(f"aekit, default recipe in bfloat16 (batch {batch}, {max(threads)} thr) vs Keras 3, torch backend "
                  f"(float32): {bf16 / keras:.2f}x, another arithmetic, so not the float32 goal")

    if "profile" not in args.skip:
        print("\n## Where an epoch goes (bench/profile_step.py: aekit.training.fit under torch.profiler, "
              "1 thread)\n")
        print("Each operation's own time goes to one share (a convolution's and the optimiser's inner "
              "operations to them); 'autograd, Python and loop' is the wall time outside every "
              "operation. The convolution table gives each layer's forward and backward time and its "
              "rate against the 1-thread matmul peak above.\n")
        for model, recipe, batch, images in (("seed", "blog", 128, args.images), ("seed", "default", 32, args.images),
                                             ("pca-conv", "default", 32, max(320, args.images // 4))):
            result = run_worker({"kind": "profile", "threads": 1, "model": model, "recipe": recipe,
                                 "batch": batch, "images": images})
            if "error" in result:
                print(f"{model}, {recipe}, batch {batch}: failed: {result['error']}\n")
            else:
                print_profile(result, peak.get(1))

    if "default-model" not in args.skip:
        print("\n## The default model (pca-conv, default recipe, batch 32, MNIST)\n")
        print("aekit.training.fit against a plain eager PyTorch loop over the same network (built by "
              "aekit, PCA fitted, then Adam on the model's squared error without aekit.fast), and "
              "aekit.inference.encode on the 10,000 test images against a plain eager model.encode; "
              f"{cores} threads, taking turns, median of the rounds.\n")
        dm = [run_worker({"kind": "default_model", "threads": cores, "images": max(640, args.images // 4)})
              for _ in range(args.rounds)]
        if median(dm, "fit") is None:
            print(f"failed: {dm[0].get('error')}")
        else:
            fit_rate, plain_rate = median(dm, "fit"), median(dm, "plain")
            enc, eager = median(dm, "encode"), median(dm, "eager_encode")
            print("| what | aekit images/s | plain images/s | aekit vs plain | s/epoch (60k), aekit |")
            print("| --- | ---: | ---: | ---: | ---: |")
            print(f"| training | {fit_rate:,.0f} | {plain_rate:,.0f} | {fit_rate / plain_rate:.2f}x | "
                  f"{MNIST_TRAIN / fit_rate:.1f} |")
            bf16 = median(dm, "fit_bfloat16")
            print(f"| training, precision bfloat16 (another arithmetic) | {bf16:,.0f} | {plain_rate:,.0f} | "
                  f"{bf16 / plain_rate:.2f}x | {MNIST_TRAIN / bf16:.1f} |")
            print(f"| encoding | {enc:,.0f} | {eager:,.0f} | {enc / eager:.2f}x | |")

    print("\n## Encoding (aekit encoder, CPU)\n")
    print("aekit.inference.encode: aekit.fast's twin (channels_last), chunks of 64, N worker threads of one "
          "PyTorch thread.\n")
    print("| workers | images/s at batch 1024 | single-image latency ms | GFLOP/s | peak RSS MB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t in threads:
        enc = [run_worker({"kind": "encode", "threads": t}) for _ in range(args.rounds)]
        rate = median(enc, "images_per_second")
        if rate is None:
            print(f"| {t} | failed: {enc[0].get('error')} | | | |")
            continue
        print(f"| {t} | {rate:,.0f} | {median(enc, 'latency_ms'):.3f} | "
              f"{rate * _encoder_flops() / 1e9:.1f} | {median(enc, 'max_rss_mb'):.0f} |")

    print("\n## The user's encoder and evaluation: ConvAutoencoder(model=\"seed\").transform, "
          "aekit.inference.evaluate\n")
    print("The 10,000 MNIST test images (uint8) in one call, against aekit.inference.encode on the same "
          f"images as a float tensor (the path above) and a plain eager model.encode(x), in one process "
          f"at {cores} threads, taking turns; median of 7.\n")
    tr = [run_worker({"kind": "transform", "threads": cores}) for _ in range(args.rounds)]
    if median(tr, "transform") is None:
        print(f"failed: {tr[0].get('error')}")
    else:
        best, eager, user = median(tr, "best"), median(tr, "eager"), median(tr, "transform")
        print("| path | images/s | transform vs it |")
        print("| --- | ---: | ---: |")
        print(f"| ConvAutoencoder.transform | {user:,.0f} | 1.00x |")
        print(f"| aekit.inference.encode (best) | {best:,.0f} | {user / best:.2f}x |")
        print(f"| plain eager model.encode | {eager:,.0f} | {user / eager:.2f}x |")
        ev, eager_ev = median(tr, "evaluate"), median(tr, "eager_evaluate")
        print("\n| evaluation of the 10,000 test images | images/s | aekit vs it |")
        print("| --- | ---: | ---: |")
        print(f"| aekit.inference.evaluate (objective and MSE) | {ev:,.0f} | 1.00x |")
        print(f"| plain eager model(x) and its MSE | {eager_ev:,.0f} | {ev / eager_ev:.2f}x |")

    if "quality" not in args.skip:
        t = threads[0]
        q = run_worker({"kind": "quality", "threads": t, "target": 0.010, "check_every": 200})
        print("\n## Time to quality (default recipe, full MNIST, test MSE checked every 200 steps)\n")
        if q.get("seconds") is not None:
            print(f"test MSE {q['mse']:.4f} <= 0.010 after {q['seconds']:.1f} s of training "
                  f"({q['images']:,} images, {q['images'] / MNIST_TRAIN:.2f} epochs) at {t} thread(s)")
        else:
            print(f"not reached: {q}")

    if "stream" not in args.skip:
        print(f"\n## Streaming a {args.stream_images:,}-image 28x28 uint8 .npy from disk\n")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "big.npy"
            x_train, _ = _mnist(MNIST_TRAIN)
            big = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.stream_images, 28, 28))
            for start in range(0, args.stream_images, len(x_train)):
                stop = min(start + len(x_train), args.stream_images)
                big[start:stop] = x_train[:stop - start]
            big.flush()
            del big
            idle = run_worker({"kind": "idle", "threads": threads[0]})
            s = run_worker({"kind": "stream", "threads": threads[0], "path": str(path), "train_batches": 300})
            size_mb = path.stat().st_size / 1e6
        if "error" in s:
            print(f"failed: {s['error']}")
        else:
            print(f"file {size_mb:,.0f} MB ({args.stream_images * 784 * 4 / 1e6:,.0f} MB as float32 in memory); "
                  f"read all {s['images']:,} images in batches of 128 at {s['read_images_per_second']:,.0f} images/s "
                  f"and trained on the first {s['trained_images']:,} at {s['train_images_per_second']:,.0f} images/s "
                  f"({threads[0]} thread(s)).")
            print(f"peak resident memory: {s['max_rss_mb']:.0f} MB (a process that only imports torch and aekit: "
                  f"{idle.get('max_rss_mb', float('nan')):.0f} MB)")

    if "cuda" not in args.skip:
        print("\n## CUDA\n")
        if not torch.cuda.is_available():
            print("no CUDA device on this machine: rows not measured")
        else:
            for label, spec in (("plain PyTorch loop, batch 128", dict(impl="plain", batch=128)),
                                ("aekit fit, blog recipe, batch 128", dict(impl="aekit", recipe="blog", batch=128))):
                r = run_worker({"kind": "train", "images": args.images * 4, "threads": cores, "device": "cuda", **spec})
                print(f"{label}: {r.get('images_per_second', 0):,.0f} images/s {r.get('error', '')}")
            enc = run_worker({"kind": "encode", "threads": 1, "device": "cuda"})
            print(f"encoder: {enc.get('images_per_second', 0):,.0f} images/s at batch 1024, "
                  f"{enc.get('latency_ms', 0):.3f} ms per single image {enc.get('error', '')}")
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _encoder_flops() -> float:
    """Forward FLOPs of the encoder alone (the first three convolutions) per 28x28 image."""
    return 2 * 9 * (28 * 28 * 1 * 16 + 14 * 14 * 16 * 8 + 7 * 7 * 8 * 8)


if __name__ == "__main__":
    main()
