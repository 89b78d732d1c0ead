"""The Keras-style layer table of a model (:func:`summary`), as printed in the blog.

Shapes are NCHW inside PyTorch; the table prints them NHWC, as Keras does.
"""

from __future__ import annotations

import torch
from torch import nn

from aekit.models.base import count_parameters


def summary(model: nn.Module) -> str:
    """A Keras-style layer table (NHWC output shapes), as printed in the blog."""
    rows: list[tuple[str, str, str, int]] = []
    channels, height, width = model.image_shape
    rows.append(("input_1", "InputLayer", f"(None, {height}, {width}, {channels})", 0))
    keras_names = {nn.Conv2d: ("conv2d", "Conv2D"), nn.MaxPool2d: ("max_pooling2d", "MaxPooling2D"),
                   nn.Upsample: ("up_sampling2d", "UpSampling2D"), nn.Linear: ("dense", "Dense")}
    counters: dict[str, int] = {}
    hooks = []

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        prefix, kind = next(names for cls, names in keras_names.items() if isinstance(module, cls))
        counters[prefix] = counters.get(prefix, 0) + 1
        if output.ndim == 4:
            _, c, h, w = output.shape
            shape = f"(None, {h}, {w}, {c})"
        else:
            shape = f"(None, {output.shape[1]})"
        params = sum(p.numel() for p in module.parameters())
        rows.append((f"{prefix}_{counters[prefix]}", kind, shape, params))

    for module in model.modules():
        if isinstance(module, tuple(keras_names)):
            hooks.append(module.register_forward_hook(record))
    # The output shapes from a pass on PyTorch's meta device: shapes only, so the table of a
    # large image costs no memory for its activations.
    meta = {name: tensor.to("meta") for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta, (torch.zeros(1, channels, height, width, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()

    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = "_" * 69
    out = [line, f"{'Layer (type)':<33}{'Output Shape':<26}{'Param #':<10}", "=" * 69]
    for name, kind, shape, params in rows:
        label = f"{name} ({kind})"
        out.append(f"{label:<33}{shape:<26}{params:<10}")
    out += ["=" * 69, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)
