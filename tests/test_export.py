"""`aekit export --format onnx`: the ONNX files, run in onnxruntime, against PyTorch."""

import shutil
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from aekit.cli import main
from aekit.export import ONNX_FILES, export_onnx
from aekit.runs import RunError
from aekit.weights import load_model
from conftest import need, one_error_line

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def need_onnx():
    missing = [name for name in ONNX_PACKAGES if find_spec(name) is None]
    need(not missing, f"{', '.join(missing)} not installed: pip install -e '.[onnx]'")


@pytest.fixture(scope="module")
def seed_run(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "seed"
    shutil.copytree(small_run, out)  # the export writes into the run folder
    return out


# conv_run, pca_conv_run, map_run and vae_run are conftest's shared runs: the library exports them
# into another folder, so they stay as trained.


@pytest.mark.parametrize("which", ["seed_run", "conv_run", "pca_conv_run", "map_run", "vae_run"])
def test_onnx_files_match_pytorch(which, request, tmp_path, capsys):
    need_onnx()
    import onnxruntime as ort

    run = request.getfixturevalue(which)
    if which == "seed_run":
        # The CLI, into the run folder (the default), replacing stale files (--overwrite).
        out = run
        for name in ONNX_FILES.values():
            (out / name).write_bytes(b"stale")
        capsys.readouterr()
        assert main(["export", str(run), "--format", "onnx", "--overwrite"]) == 0
        printed = capsys.readouterr().out.split()
        assert printed == [str(out / name) for name in ("encoder.onnx", "decoder.onnx", "model.onnx")]
    else:
        # The library, into another folder.
        out = tmp_path / "onnx"
        paths = export_onnx(run, out)
        assert paths == {part: out / name for part, name in
                         (("encoder", "encoder.onnx"), ("decoder", "decoder.onnx"), ("model", "model.onnx"))}
    assert not list(out.glob(".*.tmp"))

    model, config = load_model(run, device="cpu")
    g = torch.Generator().manual_seed(0)
    parts = {"encoder.onnx": (model.encode, config.image_shape, "image", "latent"),
             "decoder.onnx": (model.decode, model.latent_shape, "latent", "image"),
             "model.onnx": (model, config.image_shape, "image", "reconstruction")}
    for name, (forward, input_shape, input_name, output_name) in parts.items():
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        (onnx_input,), (onnx_output,) = session.get_inputs(), session.get_outputs()
        assert (onnx_input.name, onnx_output.name) == (input_name, output_name)
        assert isinstance(onnx_input.shape[0], str) and list(onnx_input.shape[1:]) == list(input_shape)
        for batch in (1, 7):  # neither is the batch of 2 the export traced with
            x = torch.rand(batch, *input_shape, generator=g)
            if input_name == "latent":
                x = x * 4  # latents are not confined to [0, 1]
            (got,) = session.run(None, {input_name: x.numpy()})
            with torch.no_grad():
                expected = forward(x).numpy()
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{which} {name} batch {batch}")


def test_existing_files_are_kept_without_overwrite(seed_run, tmp_path, capsys):
    stale = {name: tmp_path / name for name in ("encoder.onnx", "decoder.onnx", "model.onnx")}
    for path in stale.values():
        path.write_bytes(b"stale")
    assert main(["export", str(seed_run), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "already holds encoder.onnx, decoder.onnx, model.onnx; pass --overwrite" in one_error_line(capsys)
    with pytest.raises(RunError, match="pass overwrite=True"):
        export_onnx(seed_run, tmp_path)
    assert all(path.read_bytes() == b"stale" for path in stale.values())


@pytest.mark.parametrize("argv, message", [
    (["export", "{run}", "--format", "tflite"], "unknown --format 'tflite'; expected one of onnx"),
    (["export", "{tmp}/nope", "--format", "onnx"], "not a run folder"),
    (["export", "{run}", "--format", "onnx", "--out", "{tmp}/file"], "is a file, not a folder"),
])
def test_export_errors_are_one_line_and_exit_2(argv, message, seed_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(seed_run)) for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys)


def test_missing_onnx_packages_are_named(seed_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(RunError, match=r"needs the package\(s\) onnxscript.*pip install 'aekit\[onnx\]'"):
        export_onnx(seed_run, tmp_path)
    assert not list(tmp_path.iterdir())
