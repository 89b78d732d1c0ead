"""On a CUDA GPU: training, DDP with NCCL, export, the estimator and the bench's CUDA rows.

Marked ``gpu`` and left out of ``make test``; ``make test-gpu`` runs them and fails (never
skips) when PyTorch sees no CUDA GPU.

Where a CUDA result is compared with the CPU's, TensorFloat-32 is switched off first
(PyTorch uses it for cuDNN convolutions by default on Ampere and later: 10 mantissa bits,
errors ~1e-3), so that both sides compute in float32 and differ only by the order of
floating-point sums. What a tolerance below separates, measured on the CPU with this
module's data (512 MNIST images, one epoch, default recipe): a learning rate 1% off moves
the epoch's loss by 2.5e-3 and val_mse by 5e-3 (relative), another shuffle by 2e-2 and
6e-2; reordered float32 sums move them by ~1e-7 (the DDP test: 8e-8 and 2e-7).
"""

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aekit.cli import main
from aekit.estimator import ConvAutoencoder
from aekit.models import INITS, build_model
from aekit.data import prepare_images
from aekit.weights import load_model
from aekit.config import TrainConfig
from aekit.training import fit

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
# Float32 on both sides: 100x the float32 reordering effect measured on the CPU (cuDNN may
# also choose other convolution algorithms, e.g. Winograd, good to ~1e-5), and still 25x
# below what a learning rate 1% off does to one epoch.
SAME_IN_FLOAT32 = 1e-4
# With TensorFloat-32 left on (what a user gets): 10 mantissa bits in every convolution.
SAME_IN_TF32 = 1e-2


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail(f"the gpu tests need a CUDA GPU and PyTorch {torch.__version__} sees none "
                    f"(built for CUDA {torch.version.cuda}); run them on a GPU machine with a CUDA "
                    "build of PyTorch: make test-gpu")


@contextlib.contextmanager
def float32_on_cuda():
    """TensorFloat-32 off for cuDNN and matrix products, as it was afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def images(mnist):
    (x_train, _), (x_test, _) = mnist
    return prepare_images(x_train[:512]), prepare_images(x_test[:256])


def one_epoch(device: str, images) -> dict[str, float]:
    """One epoch of the seed network, default recipe, from the same initial weights."""
    config = TrainConfig(model="seed", epochs=1, device=device).resolved()
    torch.manual_seed(0)
    model = build_model("seed", (1, 28, 28))
    INITS[config.init](model)  # on the CPU: the same weights for every device
    model.to(device)
    record = fit(model, *images, config, progress=False).history[0]
    assert next(model.parameters()).device.type == torch.device(device).type
    return {"loss": record.loss, "val_loss": record.val_loss, "val_mse": record.val_mse}


def test_one_epoch_on_cuda_matches_the_cpu(images):
    cpu = one_epoch("cpu", images)
    with float32_on_cuda():
        cuda = one_epoch("cuda", images)
    tf32 = one_epoch("cuda", images)
    print(f"cpu {cpu}\ncuda float32 {cuda}\ncuda tf32 {tf32}")
    for key in cpu:
        assert cuda[key] == pytest.approx(cpu[key], rel=SAME_IN_FLOAT32), key
        assert tf32[key] == pytest.approx(cpu[key], rel=SAME_IN_TF32), key


def aekit_train(*args: str, launcher: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}  # float32 in cuBLAS and cuDNN (see above)
    return subprocess.run([sys.executable, *launcher, "-m", "aekit", "train", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def history(out: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(out / "history.csv"))]


def test_ddp_with_nccl_on_every_gpu(tmp_path, mnist):
    """torchrun with one rank per GPU against one process on one GPU. With a single GPU
    this is a one-rank launch, which trains without a process group (aekit joins one from
    two ranks on); NCCL is exercised from two GPUs on."""
    gpus = torch.cuda.device_count()
    flags = ("--limit", "1000", "--batch-size", "37", "--schedule", "constant", "--epochs", "2",
             "--device", "cuda", "--quiet")
    one = aekit_train(*flags, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = aekit_train(*flags, "--out", str(tmp_path / "ranks"),
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus)))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("run folder:") == 1  # rank 0 speaks for the run
    print(f"{gpus} GPU(s): {ranks.stdout.strip()}")
    a, b = history(tmp_path / "ranks"), history(tmp_path / "one")
    assert [r["epoch"] for r in a] == [1, 2] and a[1]["loss"] < 0.8 * a[0]["loss"]
    for mine, theirs in zip(a, b):
        for key in ("loss", "val_loss", "val_mse"):
            assert mine[key] == pytest.approx(theirs[key], rel=SAME_IN_FLOAT32), (mine["epoch"], key)


def test_export_of_a_run_trained_on_cuda(tmp_path, mnist, capsys):
    import onnxruntime as ort

    run = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--limit", "300", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["device"] == "cuda"
    assert main(["export", str(run), "--format", "onnx"]) == 0
    model, _ = load_model(run, device="cuda")
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    with float32_on_cuda(), torch.no_grad():
        expected = model(x.cuda()).cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_estimator_on_cuda(mnist):
    (x_train, _), (x_test, _) = mnist
    fitted = {}
    for device in ("cpu", "cuda"):
        with float32_on_cuda():
            fitted[device] = ConvAutoencoder(model="seed", epochs=1, random_state=0, device=device).fit(x_train[:512])
    gpu = fitted["cuda"]
    assert next(gpu.model_.parameters()).device.type == "cuda"
    assert gpu.transform(x_test[:10]).shape == (10, 392)
    assert gpu.reconstruct(x_test[:10]).shape == (10, 28, 28)
    with float32_on_cuda():
        errors = {device: est.reconstruction_error(x_test[:100]) for device, est in fitted.items()}
    # Per image, not averaged over an epoch: ten times the epoch tolerance.
    np.testing.assert_allclose(errors["cuda"], errors["cpu"], rtol=10 * SAME_IN_FLOAT32)
    assert gpu.predict(x_test[:100]).shape == (100,)


@pytest.mark.parametrize("model", ["map", "vae", "pca-conv"])
def test_the_model_families_train_on_cuda(model, mnist):
    """The families with randomness or data of their own (a map's graph and edge draws, a
    VAE's noise, pca-conv's principal directions) train on CUDA: their generators and
    graph indices are on the devices they are used on. Their random draws are seeded by
    the batch's pixel sums, which CUDA may round differently from the CPU, so the result
    is compared loosely: the mean test error within 20% of the CPU's."""
    (x_train, _), (x_test, _) = mnist
    errors = {}
    for device in ("cpu", "cuda"):
        fitted = ConvAutoencoder(model=model, latent_dim=2, epochs=1, random_state=0,
                                 device=device).fit(x_train[:512])
        assert next(fitted.model_.parameters()).device.type == device
        errors[device] = float(fitted.reconstruction_error(x_test[:100]).mean())
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=0.2), errors


def test_the_bench_cuda_rows():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--quick",
                             "--skip", "keras", "quality", "stream", "profile", "default-model"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    cuda = result.stdout.split("## CUDA", 1)[1]
    print(cuda)
    rates = dict(re.findall(r"^(.+?): ([\d,]+) images/s", cuda, flags=re.MULTILINE))
    assert set(rates) == {"plain PyTorch loop, batch 128", "aekit fit, blog recipe, batch 128", "encoder"}, cuda
    assert all(int(rate.replace(",", "")) > 0 for rate in rates.values()), cuda
