"""The README's bars for the default recipe, and the script that regenerates its seed table.

The README: test MSE <= 0.010 after one epoch and <= 0.0030 after twenty, full MNIST.
tests/test_training.py checks a one-epoch run (slow); here the 20-epoch run of seed 0
(slow, 4-10 minutes on two CPU cores), and bench/seeds.py on a tiny budget.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aekit.experiment import train_and_evaluate
from aekit.runs import read_history
from aekit.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_recipe_reaches_the_bar_after_20_epochs(mnist, tmp_path):
    result = train_and_evaluate(TrainConfig(model="seed", epochs=20, seed=0), tmp_path / "seed0",
                                progress=False)
    history = result.state.history
    print(f"seed 0: test MSE {history[0].val_mse:.5f} after epoch 1, {result.metrics['test_mse']:.5f} after 20")
    assert len(history) == 20 and result.metrics["n_train"] == 60_000 and result.metrics["n_test"] == 10_000
    assert history[0].val_mse <= 0.010  # the README's table: epoch 1 of the 20-epoch run
    assert result.metrics["test_mse"] <= 0.0030


@pytest.mark.heavy
def test_seed_table_script(mnist, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds.py"), "--epochs", "1", "--limit", "1000",
                          "--seeds", "0", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("Seeds of the default recipe, 1 epoch, the first 1,000 MNIST images")
    assert lines[2:4] == ["| seed | test MSE after epoch 1 | after epoch 1 |", "| --- | --- | --- |"]
    for seed, line in zip((0, 1), lines[4:], strict=True):  # the runs' own numbers, rounded
        metrics = json.loads((tmp_path / f"seed{seed}" / "metrics.json").read_text())
        first = read_history(tmp_path / f"seed{seed}")[0].val_mse
        assert line == f"| {seed} | {first:.5f} | {metrics['test_mse']:.5f} |"
    assert json.loads((tmp_path / "seed1" / "config.json").read_text())["seed"] == 1
