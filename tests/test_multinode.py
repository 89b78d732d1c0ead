"""The README's several-machines command, with two "machines" on this one: two torchrun
launchers, ``--nnodes 2`` with their own ``--node-rank``, meeting at a loopback
``--rdzv-endpoint``, one process each (gloo on the CPU)."""

import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from aekit.cli import main

FLAGS = ("--model", "seed", "--limit", "1000", "--batch-size", "37", "--schedule", "constant", "--epochs", "1",
         "--device", "cpu", "--quiet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(out) -> list[dict[str, str]]:
    return list(csv.DictReader(open(out / "history.csv")))


@pytest.mark.heavy
def test_two_nodes_train_like_one_process(tmp_path, mnist):
    torch.set_num_threads(1)
    assert main(["train", *FLAGS, "--out", str(tmp_path / "one")]) == 0

    out, port = tmp_path / "nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "-m", "aekit", "train", *FLAGS, "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    # Node 0 holds rank 0, which alone reports and writes the run.
    assert "run folder:" in results[0][0] and "run folder:" not in results[1][0]
    # The same epoch as one process: the loss agrees to the digits history.csv keeps.
    (two,), (one,) = history(out), history(tmp_path / "one")
    for key in ("loss", "val_loss", "val_mse"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=2e-6), key
