"""Export a trained run for other runtimes: ONNX files of the encoder, decoder and model.

::

    encoder.onnx   image (batch, C, H, W) in [0, 1] -> latent (batch, *latent_shape)
    decoder.onnx   latent (batch, *latent_shape)    -> image (batch, C, H, W) in [0, 1]
    model.onnx     image (batch, C, H, W)           -> reconstruction (batch, C, H, W)

The encoder is the model's ``encode`` (the code ``transform`` gives; a VAE's posterior mean),
the decoder its ``decode``, and model.onnx is the two graphs joined at ``latent``. The batch
dimension is dynamic. The files come from PyTorch's ``torch.export``-based ONNX
exporter (the default since PyTorch 2.9; the TorchScript-based one is deprecated), which
needs the ``onnx`` and ``onnxscript`` packages: ``pip install 'aekit[onnx]'`` (that extra
also brings ``onnxruntime`` to run the files).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from aekit._io import atomic_path, refuse_existing
from aekit.runs import RunError, RunExists, read_config
from aekit.weights import load_model

ONNX_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "model": "model.onnx"}
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RunError(f"ONNX export needs the package(s) {', '.join(missing)}, which are not installed; "
                       "install them with: pip install 'aekit[onnx]'")


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's notes that say nothing about the user's model (e.g. that
    torchvision, which aekit does not use, is not installed) and its internal deprecations."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _program(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str):
    """``module`` (one tensor in, one out) as an ``onnx.ModelProto``, batch dimension dynamic."""
    module.eval()
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                    output_names=[output_name], dynamic_shapes=({0: batch},),
                                    external_data=False, verbose=False)
    return program.model_proto


def _save(proto, path: Path) -> Path:
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    return path


def export_module(module: nn.Module, example: torch.Tensor, path: str | Path,
                  input_name: str, output_name: str) -> Path:
    """Write ``module`` (one tensor in, one out) to ``path`` as ONNX, batch dimension dynamic."""
    _require_onnx()
    return _save(_program(module, example, input_name, output_name), Path(path))


def _chain(encoder, decoder):
    """model.onnx from the two parts: the decoder's graph after the encoder's, joined at
    ``latent``, its output renamed ``reconstruction`` (one trace per part, so the three
    files cannot disagree, and an export traces twice, not three times)."""
    from onnx import compose

    encoder = compose.add_prefix(encoder, "encoder/", rename_inputs=False, rename_outputs=False)
    decoder = compose.add_prefix(decoder, "decoder/", rename_inputs=False)
    (output,) = decoder.graph.output
    for node in decoder.graph.node:
        if output.name in node.output:
            node.output[list(node.output).index(output.name)] = "reconstruction"
    output.name = "reconstruction"
    return compose.merge_models(encoder, decoder, io_map=[("latent", "latent")],
                                producer_name=encoder.producer_name, producer_version=encoder.producer_version)


class _Method(nn.Module):
    """One of a model's methods (``encode``, ``decode``) as a module the exporter can trace:
    the family's code, not its ``encoder`` attribute (a VAE's encoder outputs the posterior's
    mean and log-variance; its ``encode`` is the mean, the code)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def export_onnx(run_dir: str | Path, out_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Export a run's encoder, decoder and full model as ONNX into ``out_dir`` (default:
    the run folder). Returns ``{"encoder": path, "decoder": path, "model": path}``.

    Existing files are replaced only with ``overwrite``; the model runs on the CPU.
    """
    run_dir = Path(run_dir)
    read_config(run_dir)  # "not a run folder" before anything else
    out_dir = run_dir if out_dir is None else Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir} is a file, not a folder; choose another folder")
    paths = {part: out_dir / name for part, name in ONNX_FILES.items()}
    refuse_existing(*paths.values(), overwrite=overwrite, error=RunExists)
    _require_onnx()
    model, config = load_model(run_dir, device="cpu")
    x = torch.zeros(EXAMPLE_BATCH, *config.image_shape)  # (2, C, H, W); values do not matter
    with torch.no_grad():
        z = model.encode(x)                              # (2, *latent_shape)
    encoder = _program(_Method(model, "encode"), x, "image", "latent")
    decoder = _program(_Method(model, "decode"), z, "latent", "image")
    _save(encoder, paths["encoder"])
    _save(decoder, paths["decoder"])
    _save(_chain(encoder, decoder), paths["model"])
    return paths


# The CLI's --format names; the library calls the functions directly.
FORMATS = {"onnx": export_onnx}

__all__ = ["export_onnx", "export_module", "ONNX_FILES", "FORMATS"]
