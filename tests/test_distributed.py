"""DDP: the sharding arithmetic against a direct computation, and real runs of
``torchrun --nproc-per-node 2 -m aekit train`` on this machine's CPUs (gloo).

The torchrun tests load a small audit hook (Python's sys.addaudithook, through a
sitecustomize on PYTHONPATH) into every rank, which logs each file a rank opens for
writing, renames or creates, so that "only rank 0 writes" is checked, not assumed.
"""

import csv
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from aekit.cli import main
from aekit.distributed import Ranks
from aekit.runs import CHECKPOINT, RUN_FILES, WEIGHTS
from aekit.weights import saved_progress

# 1000 images in batches of 37: 27 full batches split 19/18 over two ranks, then one
# image, which leaves rank 1 nothing (its weightless stand-in row is exercised too).
# A constant learning rate, so that a 2-epoch run extended to 3 is a 3-epoch run. The CPU
# (gloo) by name: --device auto would pick CUDA on a GPU machine, where two ranks need two
# GPUs (tests/test_gpu.py runs DDP on the GPUs).
FLAGS = ("--model", "seed", "--limit", "1000", "--batch-size", "37", "--schedule", "constant", "--device", "cpu", "--quiet")

AUDIT_HOOK = textwrap.dedent('''
    import os, sys
    _dir, _rank = os.environ.get("AEKIT_TEST_WRITES"), os.environ.get("RANK")
    if _dir and _rank is not None:
        _fd = os.open(os.path.join(_dir, "rank%s.log" % _rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fail = os.environ.get("AEKIT_TEST_FAIL_RANK0_CHECKPOINT")  # the n-th checkpoint write fails
        _count = [0]
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if not ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                        or (isinstance(flags, int) and flags & _WRITE)):
                    return
                if _fail and _rank == "0" and ".%s." % "checkpoint.safetensors" in str(path):
                    _count[0] += 1
                    if _count[0] == int(_fail):
                        raise OSError(28, "No space left on device")
                os.write(_fd, ("open %s\\n" % (path,)).encode())
            elif event in ("os.rename", "os.mkdir", "os.remove"):
                os.write(_fd, ("%s %s\\n" % (event, " ".join(map(str, args[:2])))).encode())

        sys.addaudithook(_hook)
''')


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    yield


# ------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("size", [1, 2, 3, 4, 12])
def test_shares_partition_each_batch_and_weights_give_its_mean_loss(size):
    batch = torch.arange(11, dtype=torch.float64).reshape(11, 1, 1, 1) ** 1.5  # B = 11
    shares = [Ranks(rank=r, size=size).share(batch) for r in range(size)]
    taken = sorted(float(v) for rows, weight in shares if weight > 0 for v in rows.flatten())
    assert taken == sorted(batch.flatten().tolist())  # every row on exactly one rank
    assert all(len(rows) > 0 for rows, _ in shares)  # every rank takes part in the step
    # DDP averages the ranks' gradients: the same average of the ranks' losses is the mean.
    ddp_loss = sum(weight * rows.mean() for rows, weight in shares) / size
    assert float(ddp_loss) == pytest.approx(float(batch.mean()), rel=1e-12)


@pytest.mark.parametrize("n, size", [(10, 3), (2, 4), (1000, 2), (0, 2)])
def test_spans_cover_the_validation_set_once(n, size):
    spans = [Ranks(rank=r, size=size).span(n) for r in range(size)]
    assert [i for start, stop in spans for i in range(start, stop)] == list(range(n))


def test_single_process_is_left_alone():
    model = torch.nn.Linear(2, 2)
    ranks = Ranks()
    batch = torch.ones(5, 1, 1, 1)
    assert ranks.wrap(model) is model and ranks.is_main
    rows, weight = ranks.share(batch)
    assert rows is batch and weight == 1.0
    assert ranks.sum(batch) is batch and ranks.span(7) == (0, 7)


# ------------------------------------------------------------------- real torchrun runs

def torchrun(tmp_path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    hook = tmp_path / "audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    logs = tmp_path / "writes"
    logs.mkdir(exist_ok=True)
    for old in logs.iterdir():
        old.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "AEKIT_TEST_WRITES": str(logs), "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "aekit", "train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def writes(tmp_path, rank: int, under) -> list[str]:
    """What rank ``rank`` wrote, renamed or created under the folder ``under``."""
    log = tmp_path / "writes" / f"rank{rank}.log"
    assert log.exists(), f"rank {rank} did not start with the audit hook"
    return [line for line in log.read_text().splitlines() if str(under) in line]


def history(out) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in history_text(out)]


def history_text(out) -> list[dict[str, str]]:
    """history.csv as written: each number to the 6 significant digits it keeps."""
    return list(csv.DictReader(open(out / "history.csv")))


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mnist):
    """The reference: the same run in one process, as it stood after epochs 2 and 3.

    (Resuming in one process replays a run exactly: see test_runs' kill -9 test.)
    """
    root = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)
    assert main(["train", *FLAGS, "--epochs", "2", "--out", str(root / "one")]) == 0
    shutil.copytree(root / "one", root / "after2")
    assert main(["train", "--out", str(root / "one"), "--resume", "--epochs", "3", "--quiet"]) == 0
    return {2: root / "after2", 3: root / "one"}


# How far apart "the same run" may end, on any x86 CPU. Two ranks sum each batch's gradient
# in two halves, one process in one: the same arithmetic up to the order of float32 sums
# (~1e-7 relative per step). Adam then amplifies such differences wherever a gradient is near
# zero (the update is ~lr * sign), by an amount that depends on the CPU's own rounding and
# has no useful a-priori bound. So each bound below is about ten times the largest
# difference measured on either kind of CPU the tests meet (an Intel Xeon and an AMD EPYC,
# Zen 4 with AVX-512), and each test shows that the bug it guards lands well outside:
# - the loss of an epoch that starts from the same weights (a fresh run's first two epochs,
#   a resumed run's first): agreement to the 6 digits history.csv keeps (measured: <= 2e-7
#   relative before rounding); a loss weighted wrongly over the ranks is 5e-4 off in epoch 1;
# - that loss in a later epoch: 1e-3 relative (measured: < 7e-6 Intel, 6e-5 AMD); a resume
#   that lost Adam's moments is 5e-2 off in its first epoch;
# - the weights after 2 ranks x 2 epochs: 1e-3 (measured: 2e-6 Intel, 5.5e-5 AMD);
# - after one more epoch: 1e-2 (measured: 7e-4 Intel, 1.4e-3 AMD).
# A resume that loses Adam's moments is caught by the test that resumes at epoch 1 against a
# reference resumed at epoch 2; where both sides resume at the same epoch, both would lose
# them alike, and only a checkpoint that depends on the number of ranks shows.
SAME_AFTER_DDP_EPOCHS = 1e-3
SAME_AFTER_ONE_MORE_EPOCH = 1e-2
SAME_LOSS_AFTER_MORE_EPOCHS = 1e-3


def assert_same_to_6_digits(ranks: list[dict[str, str]], one: list[dict[str, str]],
                            keys=("loss", "val_loss", "val_mse")) -> None:
    """N ranks' history.csv against one process's: each epoch's ``keys`` agree to the 6
    significant digits the file keeps (README: DDP).

    Two ranks add each batch's loss in two halves, so the unrounded numbers differ in the
    7th digit (measured: relative 8e-8 for loss, 2e-7 for val_mse). Rounded to 6 digits they
    are the same text, unless the two fall on either side of a rounding boundary: then they
    are one unit of the 6th digit apart, which is still agreement to 6 digits. A loss off by
    a whole image's share of a batch (~1e-4) fails.
    """
    assert [r["epoch"] for r in ranks] == [r["epoch"] for r in one]
    for a, b in zip(ranks, one):
        print(f"epoch {a['epoch']}  loss {a['loss']} / {b['loss']}  val_loss {a['val_loss']} / "
              f"{b['val_loss']}  val_mse {a['val_mse']} / {b['val_mse']}  (N ranks / 1 process)")
        for key in keys:
            last_digit = 10.0 ** (math.floor(math.log10(abs(float(b[key])))) - 5)
            assert abs(float(a[key]) - float(b[key])) <= last_digit * (1 + 1e-9), (a["epoch"], key, a[key], b[key])


def assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> float:
    """The largest weight difference, checked against ``tolerance``."""
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tolerance, f"weights differ by up to {worst:g}, more than {tolerance:g}"
    return worst


@pytest.mark.heavy
def test_two_ranks_train_like_one_process_and_only_rank_0_writes(tmp_path, one_process):
    out = tmp_path / "two"
    data_home = os.environ.get("AEKIT_DATA") or os.path.expanduser("~/.cache/aekit")
    started = time.monotonic()
    result = torchrun(tmp_path, *FLAGS, "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"torchrun, 2 ranks, 2 epochs: {time.monotonic() - started:.1f} s")

    # The loss falls as in one process: the same numbers, to the 6 digits history.csv keeps;
    # the validation numbers after the first epoch (the second's follow weights already
    # apart by rounding amplified, see SAME_AFTER_DDP_EPOCHS).
    assert_same_to_6_digits(history_text(out), history_text(one_process[2]), keys=("loss",))
    assert_same_to_6_digits(history_text(out)[:1], history_text(one_process[2])[:1])
    assert history(out)[1]["loss"] < 0.8 * history(out)[0]["loss"]
    worst = assert_same_run(weights(out), weights(one_process[2]), SAME_AFTER_DDP_EPOCHS)
    print(f"2 ranks x 2 epochs vs 1 process x 2 epochs: max |dw| = {worst:.3g}")

    # Written once, by rank 0: rank 1 touched neither the run folder nor the data cache.
    assert writes(tmp_path, 1, out) == [] and writes(tmp_path, 1, data_home) == []
    renamed = [line.split()[-1] for line in writes(tmp_path, 0, out) if line.startswith("os.rename")]
    assert {os.path.basename(p) for p in renamed} == set(RUN_FILES)
    for name in ("config.json", WEIGHTS, "metrics.json", "reconstructions.png"):
        assert renamed.count(str(out / name)) == 1, name
    assert renamed.count(str(out / CHECKPOINT)) == 2  # one per epoch
    assert result.stdout.count("run folder:") == 1 and result.stdout.count("test_mse") == 1
    # No warning from the ranks' training (e.g. DDP's on gradient strides; the launcher's own
    # lines, which depend on the host's network, are not aekit's).
    assert "aekit: warning" not in result.stderr, result.stderr[-3000:]

    # A checkpoint made with 2 ranks resumes in 1 process: the third epoch lands where the
    # one-process run's does.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert history(out)[2]["loss"] == pytest.approx(history(one_process[3])[2]["loss"], rel=SAME_LOSS_AFTER_MORE_EPOCHS)
    worst = assert_same_run(weights(out), weights(one_process[3]), SAME_AFTER_ONE_MORE_EPOCH)
    print(f"2 ranks x 2 epochs + 1 process x 1 epoch vs 1 process x 3 epochs: max |dw| = {worst:.3g}")


@pytest.mark.heavy
def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, one_process):
    out = tmp_path / "resumed"
    assert main(["train", *FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    result = torchrun(tmp_path, "--out", str(out), "--resume", "--epochs", "3", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]
    # The loss of epochs 1 (one process) and 2 (the ranks' first) to 6 digits; epoch 3
    # follows weights already apart by rounding: SAME_LOSS_AFTER_MORE_EPOCHS (see there).
    assert_same_to_6_digits(history_text(out)[:2], history_text(one_process[3])[:2], keys=("loss",))
    third, reference = history(out)[2]["loss"], history(one_process[3])[2]["loss"]
    assert third == pytest.approx(reference, rel=SAME_LOSS_AFTER_MORE_EPOCHS)
    worst = assert_same_run(weights(out), weights(one_process[3]), SAME_AFTER_ONE_MORE_EPOCH)
    print(f"1 process x 1 epoch + 2 ranks x 2 epochs vs 1 process x 3 epochs: max |dw| = {worst:.3g}")


@pytest.mark.heavy
def test_a_failing_rank_stops_the_run_without_a_hang(tmp_path, mnist):
    """Rank 0's disk fills at the second checkpoint; rank 1 waits in the next all-reduce.
    torchrun stops it at once (not after the 10-minute collective timeout), and the first
    checkpoint is intact."""
    out = tmp_path / "full"
    started = time.monotonic()
    result = torchrun(tmp_path, *FLAGS, "--epochs", "4", "--out", str(out), timeout=240,
                      AEKIT_TEST_FAIL_RANK0_CHECKPOINT="2")
    assert result.returncode != 0
    assert time.monotonic() - started < 200
    lines = result.stderr.splitlines()
    rank0 = [line for line in lines if line.startswith("aekit: error: ")]
    assert len(rank0) == 1 and rank0[0].startswith(f"aekit: error: cannot write {out / CHECKPOINT} "
                                                   "(No space left on device)"), result.stderr[-3000:]
    # Rank 1 either says in one line that it lost rank 0, or torchrun stopped it first.
    rank1 = [line for line in lines if line.startswith("aekit: error (rank 1)")]
    assert all("lost contact with the other ranks" in line for line in rank1) and len(rank1) <= 1
    assert "Traceback" not in "".join(line for line in lines if line.startswith("[rank"))
    assert saved_progress(out)[0] == 1 and not (out / WEIGHTS).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
