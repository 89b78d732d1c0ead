"""The seed network against the blog's table and against a NumPy reference forward pass."""

import numpy as np
import pytest
import torch
from torch import nn

from aekit.models import SeedAutoencoder, build_model, count_parameters, init_he_, init_keras_, summary

# The blog's model.summary(), row by row: (name, output shape NHWC, params).
BLOG_TABLE = [
    ("input_1", (None, 28, 28, 1), 0),
    ("conv2d_1", (None, 28, 28, 16), 160),
    ("max_pooling2d_1", (None, 14, 14, 16), 0),
    ("conv2d_2", (None, 14, 14, 8), 1160),
    ("max_pooling2d_2", (None, 7, 7, 8), 0),
    ("conv2d_3", (None, 7, 7, 8), 584),
    ("conv2d_4", (None, 7, 7, 8), 584),
    ("up_sampling2d_1", (None, 14, 14, 8), 0),
    ("conv2d_5", (None, 14, 14, 8), 584),
    ("up_sampling2d_2", (None, 28, 28, 8), 0),
    ("conv2d_6", (None, 28, 28, 16), 1168),
    ("conv2d_7", (None, 28, 28, 1), 145),
]


def test_parameter_count_is_the_blogs():
    model = SeedAutoencoder()
    assert count_parameters(model) == 4385
    assert count_parameters(model.encoder) == 160 + 1160 + 584
    assert count_parameters(model.decoder) == 584 + 584 + 1168 + 145


def test_summary_matches_the_blog_table():
    text = summary(SeedAutoencoder())
    rows = [line for line in text.splitlines() if "(" in line and ")" in line and "Layer (type)" not in line]
    assert len(rows) == len(BLOG_TABLE)
    for line, (name, shape, params) in zip(rows, BLOG_TABLE):
        assert line.startswith(name + " ")
        assert str(shape) in line
        assert line.split()[-1] == str(params)
    assert "Total params: 4,385" in text
    assert "Trainable params: 4,385" in text


def table_rows(text: str) -> list[tuple[str, str]]:
    """(name, NHWC output shape) of each row of a summary table."""
    return [(line.split()[0], line[33:59].strip()) for line in text.splitlines()
            if line.split() and line.split()[0][-1].isdigit()]


def test_summary_shows_where_a_model_pads_and_crops_an_image():
    """A 30x30 RGB image: the encoder pads it to 32x32 before its first convolution and the
    decoder's output is cropped back, before pca-conv's refinement; each row's shape follows
    from the one before and the last row is the model's output. At 28x28 nothing is padded."""
    conv = table_rows(summary(build_model("conv", (3, 30, 30))))
    assert conv[:3] == [("input_1", "(None, 30, 30, 3)"), ("zero_padding2d_1", "(None, 32, 32, 3)"),
                        ("conv2d_1", "(None, 32, 32, 16)")]
    assert conv[-2:] == [("conv2d_5", "(None, 32, 32, 3)"), ("cropping2d_1", "(None, 30, 30, 3)")]
    pca_conv = table_rows(summary(build_model("pca-conv", (3, 30, 30))))
    crop = pca_conv.index(("cropping2d_1", "(None, 30, 30, 3)"))
    assert pca_conv[crop - 1] == ("conv2d_5", "(None, 32, 32, 3)") and pca_conv[crop + 1][0] == "conv2d_6"
    assert pca_conv[-1] == ("conv2d_8", "(None, 30, 30, 3)") and pca_conv[1][0] == "zero_padding2d_1"
    for model in ("conv", "pca-conv", "vae", "map"):
        assert not any(name.startswith(("zero_padding", "cropping"))
                       for name, _ in table_rows(summary(build_model(model, (1, 28, 28)))))


def test_bottleneck_can_be_read_and_decoded_alone():
    model = SeedAutoencoder().eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        z = model.encode(x)
        out = model.decode(z)
    assert z.shape == (5, 8, 7, 7)
    assert model.latent_shape == (8, 7, 7)
    assert out.shape == (5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(out, model(x))
        assert torch.allclose(torch.sigmoid(model.logits(x)), out)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_rejects_sizes_the_poolings_cannot_invert():
    with pytest.raises(ValueError, match="divisible by 4"):
        SeedAutoencoder((1, 30, 28))
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        build_model("no-such-model", (1, 28, 28))


def test_keras_init_is_glorot_uniform_with_zero_bias():
    torch.manual_seed(0)
    model = SeedAutoencoder()
    init_keras_(model)
    for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
        fan_in = conv.in_channels * 9
        fan_out = conv.out_channels * 9
        limit = np.sqrt(6 / (fan_in + fan_out))
        assert float(conv.weight.detach().abs().max()) <= limit
        assert float(conv.weight.detach().abs().max()) > 0.8 * limit  # fills the range, not a tiny init
        assert torch.count_nonzero(conv.bias) == 0


def assert_uniform(weight: torch.Tensor, bound: float, name: str) -> None:
    """``weight`` looks drawn from U(-bound, bound): nothing beyond the bound, the largest
    value near it, and the standard deviation bound / sqrt(3)."""
    w = weight.detach().flatten()
    assert float(w.abs().max()) <= bound * (1 + 1e-6), name
    assert float(w.abs().max()) >= bound * (1 - 20 / len(w)), name  # P(fails) < 1e-9 for n >= 144
    assert float(w.std()) == pytest.approx(bound / np.sqrt(3), rel=0.15), name


@pytest.mark.parametrize("model", [SeedAutoencoder(), build_model("conv", (1, 28, 28), latent_dim=32)],
                         ids=["seed", "conv"])
def test_he_init_is_kaiming_for_relu_layers_and_glorot_for_the_output_and_the_bottleneck(model):
    """kaiming_uniform (bound sqrt(6 / fan_in)) where a ReLU follows; glorot_uniform (bound
    sqrt(6 / (fan_in + fan_out))) for the output convolution, which feeds a sigmoid, and the
    conv model's dense bottleneck encoder.fc, which is linear. Zero biases everywhere."""
    torch.manual_seed(0)
    init_he_(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    glorot = {id(layers[-1]), id(getattr(model.encoder, "fc", None))}
    assert len(glorot - {id(None)}) == (2 if hasattr(model.encoder, "fc") else 1)
    for i, layer in enumerate(layers):
        receptive = layer.weight[0, 0].numel()  # 9 for a 3x3 convolution, 1 for a dense layer
        fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
        if id(layer) in glorot:
            assert_uniform(layer.weight, np.sqrt(6 / (fan_in + fan_out)), f"layer {i} (glorot)")
        else:
            assert_uniform(layer.weight, np.sqrt(6 / fan_in), f"layer {i} (he)")
        assert torch.count_nonzero(layer.bias) == 0


# --- a NumPy reference of the Keras layers, to check the PyTorch network against ---

def np_conv_same(x, w, b):
    """x (C, H, W), w (O, C, 3, 3), b (O,): Keras Conv2D(padding='same'), stride 1."""
    c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], padded[:, dy:dy + h, dx:dx + wd])
    return out + b[:, None, None]


def np_maxpool(x):
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def np_upsample(x):
    return x.repeat(2, axis=1).repeat(2, axis=2)


def np_forward(model, x):
    convs = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    h = relu(np_conv_same(x, *convs[0]))
    h = np_maxpool(h)
    h = relu(np_conv_same(h, *convs[1]))
    h = np_maxpool(h)
    z = relu(np_conv_same(h, *convs[2]))
    h = relu(np_conv_same(z, *convs[3]))
    h = np_upsample(h)
    h = relu(np_conv_same(h, *convs[4]))
    h = np_upsample(h)
    h = relu(np_conv_same(h, *convs[5]))
    return z, 1 / (1 + np.exp(-np_conv_same(h, *convs[6])))


def test_forward_matches_numpy_reference():
    torch.manual_seed(3)
    model = SeedAutoencoder().double().eval()
    for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
        nn.init.normal_(conv.bias, std=0.1)  # nonzero biases, so they are checked too
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        z, out = model.encode(x), model(x)
    for i in range(2):
        z_ref, out_ref = np_forward(model, x[i].numpy())
        np.testing.assert_allclose(z[i].numpy(), z_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out[i].numpy(), out_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, widths", [((1, 28, 28), (16, 32)), ((3, 64, 64), (8, 16, 32)),
                                           ((3, 30, 45), (8, 16)), ((1, 7, 9), (4,))])
def test_conv_autoencoder_any_size_and_latent(shape, widths):
    model = build_model("conv", shape, latent_dim=5, widths=widths).eval()
    x = torch.rand(3, *shape)
    with torch.no_grad():
        z = model.encode(x)
        out = model(x)
    assert z.shape == (3, 5) and model.latent_shape == (5,)
    assert out.shape == x.shape
    assert torch.equal(out, model.decode(z))


def test_conv_autoencoder_parameter_count():
    # 28x28x1, widths (16, 32), latent 30: convs 1->16, 16->32 | dense 1568->30, 30->1568 |
    # convs 32->16, 16->16, 16->1 (3x3 kernels, with biases).
    conv = lambda i, o: 9 * i * o + o  # noqa: E731
    expected = (conv(1, 16) + conv(16, 32) + (32 * 7 * 7 * 30 + 30) + (30 * 32 * 7 * 7 + 32 * 7 * 7)
                + conv(32, 16) + conv(16, 16) + conv(16, 1))
    assert count_parameters(build_model("conv", (1, 28, 28), latent_dim=30)) == expected


def test_conv_autoencoder_bad_params():
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        build_model("conv", (1, 28, 28), latent_dim=0)
    with pytest.raises(ValueError, match="widths must be positive integers"):
        build_model("conv", (1, 28, 28), latent_dim=2, widths=(8, -1))
    with pytest.raises(ValueError, match=r"^model='seed' takes no options, not latent_dim; use model='conv'"):
        build_model("seed", (1, 28, 28), latent_dim=2)


# --- a family is one file with @register; the hooks every family declares, with their defaults ---

FAMILY_MODULE = '''
from dataclasses import dataclass, field

from aekit.models import ConvAutoencoderNet, ConvOptions, register


@dataclass(frozen=True)
class WideOptions(ConvOptions):
    latent_dim: int = field(default=3, metadata={"help": "a default of its own"})


@register("scratch-family")
class ScratchFamily(ConvAutoencoderNet):
    """A new family: nothing else in aekit knows it."""

    Options = WideOptions
'''


def test_a_family_in_a_new_module_joins_by_decorator_and_is_built_by_name(scratch_registry, tmp_path, monkeypatch):
    import importlib

    (tmp_path / "scratch_family.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "scratch_family", raising=False)
    module = importlib.import_module("scratch_family")
    assert scratch_registry["scratch-family"] is module.ScratchFamily
    assert module.ScratchFamily.options == ("latent_dim", "widths")
    model = build_model("scratch-family", (1, 12, 12))  # options left None take the family's defaults
    assert type(model) is module.ScratchFamily and model.latent_shape == (3,)
    assert build_model("scratch-family", (1, 12, 12), latent_dim=5, widths=[4]).latent_shape == (5,)
    with pytest.raises(ValueError, match=r"^model='scratch-family' takes latent_dim, widths, not beta; "
                                         r"use model='vae' to choose beta$"):
        build_model("scratch-family", (1, 12, 12), beta=2.0)


def test_a_name_is_registered_once(scratch_registry):
    from aekit.models import Autoencoder, register

    with pytest.raises(ValueError, match=r"^model 'conv' is already registered \(by "
                                         r"aekit\.models\.conv\.ConvAutoencoderNet\); register Other under"):
        @register("conv")
        class Other(Autoencoder):
            pass
    assert build_model("conv", (1, 28, 28)).__class__.__name__ == "ConvAutoencoderNet"


def test_options_declare_defaults_and_help_and_check_as_the_constructor_does():
    from dataclasses import fields

    from aekit.models import MODELS

    for name, cls in MODELS.items():
        assert cls.options == tuple(f.name for f in fields(cls.Options)), name
        assert all(f.metadata["help"] for f in fields(cls.Options)), name
    assert MODELS["vae"].Options() == MODELS["vae"].Options(latent_dim=32, widths=(16, 32), beta=1.0)
    with pytest.raises(ValueError, match=r"^beta must be a non-negative number \(1.0: the plain VAE\), got -1$"):
        MODELS["vae"].Options(beta=-1).check((1, 28, 28))
    with pytest.raises(ValueError, match=r"^images of 3x3 are too small for 3 downsamplings; pass fewer widths$"):
        MODELS["map"].Options(widths=(4, 4, 4)).check((1, 3, 3))


def test_the_hooks_defaults_a_family_gets_without_declaring_them():
    model = SeedAutoencoder()
    assert model.test_metrics(torch.rand(4, 1, 28, 28)) == {}
    assert model.can_sample is False
    with pytest.raises(NotImplementedError, match="no prior"):
        model.sample_latents(2, torch.Generator())
    assert build_model("vae", (1, 28, 28), latent_dim=3).sample_latents(2, torch.Generator()).shape == (2, 3)
