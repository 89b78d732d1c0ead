"""The Keras-style layer table of a model (:func:`summary`), as printed in the blog.

Shapes are NCHW inside PyTorch; the table prints them NHWC, as Keras does.
"""

from __future__ import annotations

import torch
from torch import nn

from aekit.models.base import count_parameters


def _nhwc(shape: tuple[int, ...]) -> str:
    """(n, C, H, W) -> "(None, H, W, C)"; (n, d) -> "(None, d)"."""
    if len(shape) == 4:
        _, c, h, w = shape
        return f"(None, {h}, {w}, {c})"
    return f"(None, {shape[1]})"


def summary(model: nn.Module) -> str:
    """A Keras-style layer table (NHWC output shapes), as printed in the blog.

    Where a model pads or crops between two layers (:class:`aekit.models.blocks.ConvEncoder`
    pads an image to a multiple of its downsampling, the decoder crops back to the image),
    the table has a ZeroPadding2D or Cropping2D row there, as Keras would show those layers,
    so that each row's shape follows from the one before and the last row is the output."""
    channels, height, width = model.image_shape
    rows: list[tuple[str, str, tuple[int, ...], int]] = [("input_1", "InputLayer", (1, channels, height, width), 0)]
    keras_names = {nn.Conv2d: ("conv2d", "Conv2D"), nn.MaxPool2d: ("max_pooling2d", "MaxPooling2D"),
                   nn.Upsample: ("up_sampling2d", "UpSampling2D"), nn.Linear: ("dense", "Dense")}
    counters: dict[str, int] = {}
    hooks = []

    def add(prefix: str, kind: str, shape: tuple[int, ...], params: int) -> None:
        counters[prefix] = counters.get(prefix, 0) + 1
        rows.append((f"{prefix}_{counters[prefix]}", kind, tuple(shape), params))

    def resized(shape: tuple[int, ...]) -> None:
        """A row for the padding or crop that took the last row's image to ``shape``."""
        last = rows[-1][2]
        if len(shape) == 4 and len(last) == 4 and last[1] == shape[1] and last[2:] != shape[2:]:
            grew = shape[2] >= last[2] and shape[3] >= last[3]
            add(*(("zero_padding2d", "ZeroPadding2D") if grew else ("cropping2d", "Cropping2D")), shape, 0)

    def before(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        resized(tuple(inputs[0].shape))

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        prefix, kind = next(names for cls, names in keras_names.items() if isinstance(module, cls))
        add(prefix, kind, tuple(output.shape), sum(p.numel() for p in module.parameters()))

    for module in model.modules():
        if isinstance(module, tuple(keras_names)):
            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(record))
    # The output shapes from a pass on PyTorch's meta device: shapes only, so the table of a
    # large image costs no memory for its activations.
    meta = {name: tensor.to("meta") for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.no_grad():
            output = torch.func.functional_call(model, meta, (torch.zeros(1, channels, height, width, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
    resized(tuple(output.shape))  # the decoder's output cropped to the image

    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = "_" * 69
    out = [line, f"{'Layer (type)':<33}{'Output Shape':<26}{'Param #':<10}", "=" * 69]
    for name, kind, shape, params in rows:
        label = f"{name} ({kind})"
        out.append(f"{label:<33}{_nhwc(shape):<26}{params:<10}")
    out += ["=" * 69, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)
