"""The CLI, called in-process as ``main([...])``, and the run folder it writes."""

import argparse
import copy
import csv
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aekit.cli import COMMANDS, as_flags, build_parser, main, parse_args
from aekit.data import DataError, data_home
from aekit.estimator import ConvAutoencoder
from aekit.experiment import ResumeMismatch, resumed_config, train_and_evaluate
from aekit.models import MODELS
from aekit.runs import read_config
from aekit.weights import load_model
from aekit.config import TrainConfig
from aekit.collapse import COLLAPSE, CollapseWarning
from conftest import one_error_line


@pytest.fixture(scope="module")
def trained_run(seed_1500_run):
    """conftest's shared seed run (1,500 images, 2 epochs); read-only: a test that changes it copies it."""
    return seed_1500_run


def test_summary_prints_the_blog_table(capsys):
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_3 (Conv2D)" in out and "(None, 7, 7, 8)" in out
    assert "Total params: 4,385" in out


def test_train_writes_the_run_folder(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "model.safetensors", "history.csv", "metrics.json",
            "reconstructions.png", "checkpoint.safetensors"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads((trained_run / "config.json").read_text())
    assert config["recipe"] == "default" and config["loss"] == "bce" and config["image_shape"] == [1, 28, 28]
    rows = list(csv.DictReader(open(trained_run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "val_loss", "val_mse", "seconds", "images_per_second"}
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test_mse", "test_psnr", "epochs", "seconds", "images_per_second"):
        assert key in metrics
    assert metrics["epochs"] == 2
    assert metrics["test_psnr"] == pytest.approx(10 * np.log10(1 / metrics["test_mse"]))
    assert float(rows[-1]["val_mse"]) == pytest.approx(metrics["test_mse"], rel=1e-4)
    with Image.open(trained_run / "reconstructions.png") as img:
        assert img.width > img.height  # two rows of ten


def test_weights_round_trip(trained_run):
    model, config = load_model(trained_run, device="cpu")
    saved = load_file(str(trained_run / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for key in saved:
        assert torch.equal(saved[key], state[key])


def test_evaluate_prints_json(trained_run, capsys):
    assert main(["evaluate", str(trained_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert result["test_mse"] == pytest.approx(metrics["test_mse"], rel=1e-6)


def test_reconstruct_writes_png_and_will_not_overwrite(trained_run, tmp_path, capsys):
    out = tmp_path / "recon.png"
    assert main(["reconstruct", str(trained_run), "--out", str(out), "--n", "4"]) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    assert main(["reconstruct", str(trained_run), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in one_error_line(capsys)


def test_existing_run_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "model.safetensors").read_bytes()
    assert main(["train", "--limit", "100", "--epochs", "1", "--out", str(trained_run), "--quiet"]) == 2
    assert "already holds a run" in one_error_line(capsys)
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_resume_extends_a_run(tmp_path, mnist, capsys):
    out = tmp_path / "r"
    assert main(["train", "--limit", "600", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert " 1 epoch in " in capsys.readouterr().out  # the summary line, in words
    assert main(["train", "--epochs", "2", "--out", str(out), "--resume", "--quiet"]) == 0
    assert " 2 epochs in " in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((out / "config.json").read_text())["limit"] == 600  # kept from the run


def test_data_info_and_fetch(tmp_path, capsys, rng, mnist):
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (20, 8, 8), dtype=np.uint8))
    assert main(["data", "info", str(tmp_path / "x.npy")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"]["shape"] == [18, 8, 8] and info["test"]["labels"] is None

    assert main(["data", "fetch", "mnist"]) == 0  # cached by the mnist fixture: no download
    printed = capsys.readouterr().out.strip()
    assert printed == str(data_home() / "mnist.npz")
    with np.load(printed) as arrays:
        assert arrays["x_train"].shape == (60000, 28, 28)


def test_train_on_a_users_image_folder(tmp_path, rng, capsys):
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["image_shape"] == [1, 16, 16]


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/data", "--out", "{tmp}/x"], "no data at '/no/such/data'"),
    (["train", "--resume"], "--resume needs --out DIR"),
    (["train", "--device", "cuda:7", "--out", "{tmp}/x"], "PyTorch sees no CUDA GPU"),
    (["evaluate", "{tmp}"], "not a run folder"),
    (["data", "fetch", "cifar"], "unknown data set 'cifar'"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "x").exists()  # nothing half-written


# Bad command lines: argparse's refusals, each one line naming the flag and the --help
# that explains it, exit code 2, never argparse's usage block or a SystemExit.
@pytest.mark.parametrize("argv, named", [
    (["train", "--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (["train", "--seed", "x"], "argument --seed: expected an integer from 0 to 2**63 - 1, got 'x'"),
    (["train", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["train", "--model", "no-such-model"], "argument --model: invalid choice: 'no-such-model'"),
    (["train", "--recipe"], "argument --recipe: expected one argument"),
    (["train", "--resume", "--overwrite", "--out", "r"], "argument --overwrite: not allowed with argument --resume"),
    (["score", "r", "x.npy", "--out", "s.csv", "--fpr", "0.1", "--contamination", "0.1"],
     "argument --contamination: not allowed with argument --fpr"),
    (["score", "r", "x.npy", "--out", "s.csv", "--fpr", "0.7"], "argument --fpr: expected a fraction"),
    (["score", "r", "--data", "x.npy", "--out", "s.csv"],
     "unrecognized arguments: --data; aekit score takes its images as INPUT, the argument after RUN: drop --data"),
    (["denoise", "r", "--data", "x", "--out", "d"],
     "unrecognized arguments: --data; aekit denoise takes its images as INPUT, the argument after RUN: drop --data"),
    (["reconstruct", "r"], "the following arguments are required: --out"),
    (["compare", "--latent-dims", "2,x", "--out", "o"], "argument --latent-dims: expected comma-separated"),
    (["data", "info", "x.npy", "--resize", "28"], "argument --resize: expected 2 arguments"),
    (["data", "fetch"], "the following arguments are required: NAME"),
    (["data"], "the following arguments are required: ACTION"),
    ([], "the following arguments are required: COMMAND"),
    (["trian"], "argument COMMAND: invalid choice: 'trian'"),
])
def test_bad_command_lines_are_one_line_and_exit_2(argv, named, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert named in line
    command = " ".join(["aekit"] + [a for a in argv[:2] if a in ("train", "score", "denoise", "reconstruct",
                                                                 "compare", "data", "info", "fetch")])
    assert line.endswith(f"see `{command} --help`"), line


def test_one_default_device_everywhere():
    # train leaves --device unset (TrainConfig's default applies; on --resume, the run's).
    assert parse_args(["compare", "--out", "o"]).device == TrainConfig().device == "auto"
    assert parse_args(["train"]).device is None


def test_help_and_version_still_exit_0(capsys):
    for argv in (["--help"], ["train", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--batch-size" in capsys.readouterr().out


def _help_of(*command: str) -> dict[str, str]:
    """The help text of each option and argument of ``aekit COMMAND``, by destination."""
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {action.dest: action.help or "" for action in parser._actions}


def test_every_argument_of_every_command_says_what_it_is():
    """`aekit COMMAND --help` explains each of its arguments and options (the positional run
    folder included), for every command and `data`'s actions."""
    commands = [(name,) for name in COMMANDS if name != "data"] + [("data", "fetch"), ("data", "info")]
    unexplained = [(*command, dest) for command in commands for dest, text in _help_of(*command).items()
                   if dest != "help" and not text.strip()]
    assert unexplained == []


def _models_named(text: str) -> set[str]:
    """The registered models ``text`` names (``conv`` not counted inside ``pca-conv``)."""
    return {name for name in MODELS if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}


@pytest.mark.parametrize("command", ["train", "summary"])
def test_help_names_every_model_and_which_ones_take_each_option(command, capsys):
    """--model's help lists every registered model; --latent-dim, --widths and --beta name
    exactly the models whose ``options`` take them: read from the registry, so they stay true."""
    helps = _help_of(command)
    assert _models_named(helps["model"]) == set(MODELS), helps["model"]
    for option in ("latent_dim", "widths", "beta"):
        if option in helps:
            takers = {name for name, model in MODELS.items() if option in model.options}
            assert _models_named(helps[option]) == takers, (option, helps[option])
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert not re.search(r"\w-\n", shown), shown  # pca-conv, fashion-mnist: never split over two lines


def test_help_names_every_built_in_data_set():
    from aekit.data import BUILTINS

    helps = [_help_of("data", "fetch")["name"]] + [_help_of(command)["data"] for command in
                                                   ("train", "evaluate", "reconstruct", "compare", "report")]
    for text in helps:
        assert all(name in text for name in BUILTINS), text


def test_an_internal_error_is_one_line_saying_it_is_a_bug(monkeypatch, capsys):
    def broken(args):
        return 1 / 0

    monkeypatch.setitem(COMMANDS, "summary", broken)
    monkeypatch.delenv("AEKIT_TRACEBACK", raising=False)
    assert main(["summary"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("aekit: internal error: ZeroDivisionError: division by zero. This is a bug in aekit")
    assert "report it to" in err[0] and "AEKIT_TRACEBACK=1" in err[0]

    monkeypatch.setenv("AEKIT_TRACEBACK", "1")
    assert main(["summary"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "return 1 / 0" in "\n".join(err)
    assert err[-1].startswith("aekit: internal error: ZeroDivisionError")


def test_a_stray_warning_is_one_line(monkeypatch, capsys):
    def warns(args):
        warnings.warn("something odd\non two lines", UserWarning)
        return 0

    monkeypatch.setitem(COMMANDS, "summary", warns)
    before = warnings.showwarning
    assert main(["summary"]) == 0
    assert capsys.readouterr().err == "aekit: warning: something odd on two lines\n"
    assert warnings.showwarning is before  # the process's own warning display is back


def test_collapse_is_reported_once_with_flags(tmp_path, mnist, capsys):
    out = tmp_path / "blog"
    assert main(["train", "--model", "seed", "--recipe", "blog", "--limit", "300", "--epochs", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["collapsed"]  # both epochs collapsed
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"aekit: warning: epoch 1: {COLLAPSE}; use --recipe default (binary cross-entropy, "
                   "He init) or --loss bce"]


def test_collapse_warns_an_estimator_user_once_in_parameters(mnist):
    (x_train, _), _ = mnist
    with pytest.warns(CollapseWarning) as caught:
        # The plain conv model: pca-conv starts as PCA, never at a blank output.
        ConvAutoencoder(model="conv", recipe="blog", epochs=2, device="cpu").fit(x_train[:300])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("epoch 1: the reconstructions are nearly constant")
    assert 'loss="bce"' in message and 'recipe="default"' in message and "--" not in message
    # The same warning after a copy or a trip between processes (pickle; pytest-xdist
    # rebuilds it as type(w)(*w.args)).
    warning = caught[0].message
    for again in (copy.copy(warning), pickle.loads(pickle.dumps(warning)), type(warning)(*warning.args)):
        assert str(again) == message and again.epoch == 1


# --------------------------------------------------------------------------- --resume

# The run the --resume tests try to change: every flag below differs from it, including
# --seed 0 and --batch-size 32, which are the defaults a flag left out would take.
RUN_FLAGS = ["--model", "seed", "--limit", "300", "--epochs", "1", "--seed", "3", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def run_to_resume(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("resume") / "r"
    assert main(["train", *RUN_FLAGS, "--out", str(out)]) == 0
    return out


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("flags, shown", [
    (["--batch-size", "32"], "--batch-size 32 differs from the run in {run}, which has --batch-size 64"),
    (["--lr", "0.01"], "--lr 0.01 differs from the run in {run}, which has --lr 0.003"),
    (["--data", "fashion-mnist"], "--data fashion-mnist differs from the run in {run}, which has --data mnist"),
    (["--seed", "0"], "--seed 0 differs from the run in {run}, which has --seed 3"),
    (["--model", "conv"], "--model conv differs"),
    (["--recipe", "blog"], "--recipe blog differs"),
    (["--loss", "mse"], "--loss mse differs"),
    (["--init", "keras"], "--init keras differs"),
    (["--schedule", "constant"], "--schedule constant differs"),
    (["--limit", "200"], "--limit 200 differs from the run in {run}, which has --limit 300"),
    (["--patience", "2"], "--patience 2 differs from the run in {run}, which has no --patience"),
    (["--noise", "gaussian:0.3"], "--noise gaussian:0.3 differs"),
    (["--latent-dim", "16"], "--latent-dim 16 differs"),
    (["--widths", "8,16"], "--widths 8,16 differs"),
    (["--resize", "14", "14"], "--resize 14 14 differs"),
    (["--stream"], "--stream differs from the run in {run}, which has no --stream"),
])
def test_resume_refuses_a_flag_that_changes_the_run(flags, shown, run_to_resume, capsys):
    before = folder_bytes(run_to_resume)
    assert main(["train", "--out", str(run_to_resume), "--resume", "--epochs", "2", *flags]) == 2
    line = one_error_line(capsys)
    assert shown.format(run=run_to_resume) in line
    assert "only --epochs may extend it" in line and f"drop {flags[0]}" in line
    assert folder_bytes(run_to_resume) == before


def test_resume_with_the_runs_own_values_and_where_to_run(run_to_resume, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run_to_resume, out)
    same = ["--data", "mnist", "--model", "seed", "--recipe", "default", "--loss", "bce", "--init", "he",
            "--schedule", "cosine", "--lr", "0.003"]
    assert main(["train", *RUN_FLAGS, *same, "--epochs", "2", "--device", "cpu", "--threads", "1",
                 "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in csv.DictReader(open(out / "history.csv"))] == ["1", "2"]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["device"] == "cpu" and config["seed"] == 3


def test_the_library_refuses_a_changed_field_on_resume(run_to_resume):
    before = folder_bytes(run_to_resume)
    with pytest.raises(ResumeMismatch, match=r"batch_size=16 differs from the run's batch_size=64") as exc:
        train_and_evaluate(TrainConfig(batch_size=16, epochs=2), run_to_resume, resume=True, progress=False)
    assert exc.value.field == "batch_size" and "--" not in str(exc.value)
    assert folder_bytes(run_to_resume) == before
    # Fields left at their defaults take the run's values: nothing to refuse.
    assert resumed_config(run_to_resume, {"epochs": 5}) == dataclasses.replace(
        read_config(run_to_resume), epochs=5)


# ------------------------------------------------------------------------ CI settings

def test_ci_sets_ci_and_fuzzes_with_a_fixed_seed():
    root = Path(__file__).resolve().parents[1]
    assert "export CI=true" in (root / ".ci" / "run").read_text()
    script = ("from hypothesis import settings; import fuzzing; "
              "print(settings().derandomize, settings().max_examples)")
    for env, expected in (({"CI": "true"}, "True 100"), ({"CI": ""}, "False 100"),
                          ({"CI": "true", "HYPOTHESIS_PROFILE": "slow"}, "False 5000")):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=root / "tests", env={**os.environ, "HYPOTHESIS_PROFILE": "default", **env})
        assert run.stdout.split() == expected.split(), (env, run.stdout, run.stderr)


# ------------------------------------------------------- library parameters, CLI flags

@pytest.mark.parametrize("message, command, shown", [
    ("pass resume=True to continue it, overwrite=True to replace it", "train",
     "pass --resume to continue it, --overwrite to replace it"),
    ("resume=True and overwrite=True contradict each other; pass one", "train",
     "--resume and --overwrite contradict each other; pass one"),
    ("a built-in data set; pass stream=False", "train", "a built-in data set; drop --stream"),
    ("the run has stream=False", "train", "the run has no --stream"),
    ("pass data of the same size (or resize=(H, W))", "evaluate", "pass data of the same size (or --resize H W)"),
    ("resize=(28, 28)", "denoise", "--resize 28 28"),
    ("e.g. latent_dims=(2, 8, 32)", "compare", "e.g. --latent-dims 2,8,32"),
    ('pass device="cpu" or device="cuda:0"', "train", "pass --device cpu or --device cuda:0"),
    ("pass epochs=3 or more to finish it", "train", "pass --epochs 3 or more to finish it"),
    ("pass epochs=N", "compare", "pass --epochs N"),
    ('use recipe="default" or loss="bce"', "train", "use --recipe default or --loss bce"),
    ("a threshold: false_positive_rate=0.1", "score", "a threshold: --fpr 0.1"),
    ("finish the run (resume=True)", "evaluate", "finish the run (--resume)"),  # a flag of train
    # The library method a command calls, as the command: sample() is `aekit sample`.
    ("sample() needs a model with a prior", "sample", "aekit sample needs a model with a prior"),
    ("fit() was given 0 images", "train", "fit() was given 0 images"),  # another name than the command's
    # Left alone: names no option sets, and names only another command's option sets.
    ("X has 0 feature(s) (shape=(0, 28)); n=0", "evaluate", "X has 0 feature(s) (shape=(0, 28)); n=0"),
    ('"seed": 1 in config.json', "evaluate", '"seed": 1 in config.json'),
])
def test_library_parameters_read_as_flags(message, command, shown):
    assert as_flags(message, command) == shown


def test_library_errors_name_parameters_and_the_cli_the_flags(trained_run, tmp_path, capsys):
    from aekit.export import export_onnx
    from aekit.runs import RunError, load_split
    from aekit.weights import load_model

    # Training into a run folder without overwrite=True / --overwrite.
    with pytest.raises(RunError, match=r"pass resume=True to continue it, overwrite=True to replace it") as caught:
        train_and_evaluate(TrainConfig(limit=100, epochs=1), trained_run, progress=False)
    assert "--" not in str(caught.value)
    assert main(["train", "--limit", "100", "--epochs", "1", "--out", str(trained_run), "--quiet"]) == 2
    assert "pass --resume to continue it, --overwrite to replace it, or choose another folder" in one_error_line(capsys)

    # A built-in data set streamed.
    with pytest.raises(DataError, match=r"which loads in memory; pass stream=False$"):
        load_split(TrainConfig(stream=True))
    assert main(["train", "--stream", "--out", str(tmp_path / "streamed"), "--quiet"]) == 2
    assert one_error_line(capsys).endswith("which loads in memory; drop --stream")
    assert not (tmp_path / "streamed").exists()

    # Exporting over earlier files.
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_text("mine")
    with pytest.raises(RunError, match=r"model.onnx already exists; pass overwrite=True to replace it"):
        export_onnx(trained_run, tmp_path / "onnx")
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    assert "model.onnx already exists; pass --overwrite to replace it" in one_error_line(capsys)

    # Using a run that has not finished: what to train, named in the other command's flags.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run, unfinished)
    (unfinished / "model.safetensors").unlink()
    with pytest.raises(RunError, match=r"finish the run first \(train it with resume=True\)"):
        load_model(unfinished)
    assert main(["evaluate", str(unfinished)]) == 2
    assert one_error_line(capsys).endswith("finish the run first (train it with --resume)")


def test_the_seed_networks_fixed_latent_is_refused_in_flags(tmp_path, capsys):
    assert main(["train", "--model", "seed", "--latent-dim", "16", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "use --model conv" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_choices_come_from_the_registries(monkeypatch):
    from aekit import config, models, noise

    class Tiny(models.ConvAutoencoderNet):
        objectives = (*models.ConvAutoencoderNet.objectives, "l1")

    monkeypatch.setitem(models.MODELS, "tiny", Tiny)
    monkeypatch.setitem(models.INITS, "zeros", models.INITS["torch"])
    monkeypatch.setitem(config.RECIPES, "fast", config.RECIPES["default"])
    monkeypatch.setattr(config, "SCHEDULES", (*config.SCHEDULES, "step"))
    monkeypatch.setattr(noise, "KINDS", (*noise.KINDS, "blur"))
    args = parse_args(["train", "--model", "tiny", "--init", "zeros", "--recipe", "fast", "--loss", "l1",
                       "--schedule", "step"])
    assert (args.model, args.init, args.recipe, args.loss, args.schedule) == ("tiny", "zeros", "fast", "l1", "step")
    assert parse_args(["summary", "--model", "tiny"]).model == "tiny"
    assert "blur" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_the_rank_comes_from_the_process_group_not_the_environment(monkeypatch, capsys):
    from aekit import distributed

    monkeypatch.setenv("RANK", "1")  # no process group: this is the only process, rank 0 of 1
    assert main(["data", "fetch", "cifar"]) == 2
    assert one_error_line(capsys).startswith("aekit: error: unknown data set")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank=1, size=2))
    monkeypatch.delenv("RANK")
    assert main(["data", "fetch", "cifar"]) == 2
    assert capsys.readouterr().err.startswith("aekit: error (rank 1): unknown data set")


def test_resize_and_limit_are_one_option_each():
    for command in (["data", "info", "x"], ["train"], ["denoise", "r", "x", "--out", "o"],
                    ["score", "r", "x", "--out", "o"], ["compare", "--out", "o"]):
        assert parse_args([*command, "--resize", "14", "12"]).resize == (14, 12)  # as the library takes it
    assert parse_args(["train", "--limit", "5"]).limit == parse_args(["compare", "--out", "o", "--limit", "5"]).limit == 5
