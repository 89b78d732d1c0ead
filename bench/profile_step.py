"""Where an epoch of aekit's training goes, on the CPU: `bench/speed.py`'s profile section.

One process trains the model for one pass over the images through :func:`aekit.training.fit`
(what `aekit train` runs) at one PyTorch thread, under :mod:`torch.profiler`, and every
operation's own time (its "self" time, children excluded) is put into one share:

- ``convolution``: oneDNN's forward and backward convolutions, and the matrix products of
  :class:`aekit.fast.ConvToOne` (the one-channel output layer) with everything it runs;
- ``elementwise``: activations and their gradients, the loss, copies, fills, adds;
- ``pooling/upsampling``: max pooling and nearest upsampling, forward and backward;
- ``optimiser``: everything under ``Optimizer.step`` (Adam);
- ``autograd, Python and loop``: the rest of the wall time, outside every PyTorch
  operation: the training loop, autograd's engine and the interpreter.

and every convolution's forward and backward time into its layer, with the layer's FLOPs,
so that each layer's share of the machine's measured float32 peak shows. The profiler costs
time of its own (it records every operation); the table says how much by giving the same
pass's rate without it.

Run alone: ``.venv/bin/python bench/profile_step.py --model seed --recipe blog --batch 128``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

# Operation names (without "aten::") in each share; the rest of aten's are elementwise.
CONVOLUTION = {"mkldnn_convolution", "convolution_backward", "_ConvToOneFunction",
               "_ConvToOneFunctionBackward"}
POOLING = {"max_pool2d_with_indices", "max_pool2d_with_indices_backward", "upsample_nearest2d",
           "upsample_nearest2d_backward"}
OPTIMISER_MARK = "Optimizer.step"
SHARES = ("convolution", "elementwise", "pooling/upsampling", "optimiser", "autograd, Python and loop")


def _layer(event) -> str | None:
    """'Cin->Cout @HxW' for a convolution event, from its recorded input shapes; None otherwise."""
    name, shapes = event.name.removeprefix("aten::"), event.input_shapes
    if name == "mkldnn_convolution":       # (input (n, Cin, H, W), weight (Cout, Cin, k, k), ...)
        (_, cin, h, w), cout = shapes[0], shapes[1][0]
    elif name == "convolution_backward":   # (grad_output (n, Cout, H, W), input, weight, ...)
        (_, cout, h, w), cin = shapes[0], shapes[2][1]
    elif name == "_ConvToOneFunction":     # (input (n, Cin, H, W), weight (1, Cin, 3, 3), bias)
        (_, cin, h, w), cout = shapes[0], 1
    elif name == "_ConvToOneFunctionBackward":  # (grad (n, 1, H, W),); Cin from its products,
        (_, cout, h, w) = shapes[0]              # each (., 9|n*H*W) x (9|n*H*W, Cin)
        cin = next((c.input_shapes[1][1] for c in event.cpu_children if c.name == "aten::mm"), "?")
    else:
        return None
    return f"{cin}->{cout} @{h}x{w}"


def _share(event) -> tuple[str | None, str | None, bool]:
    """(share, layer or None, backward?) of a profiler event, by it and its callers: an
    operation run by a convolution or by the optimiser belongs to it. Share None: not an
    operation (autograd's engine, a mark), so its time stays in the rest."""
    node = event
    while node is not None:
        name = node.name.removeprefix("aten::")
        if name.startswith(OPTIMISER_MARK):
            return "optimiser", None, False
        if name in CONVOLUTION:
            return "convolution", _layer(node), "backward" in name.lower()
        node = node.cpu_parent
    if not event.name.startswith("aten::"):
        return None, None, False
    name = event.name.removeprefix("aten::")
    if name in POOLING:
        return "pooling/upsampling", None, "backward" in name
    return "elementwise", None, False


def profile_fit(model: str, recipe: str, batch: int, images: int) -> dict:
    """One pass over ``images`` MNIST training images, profiled; the shares in seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from aekit.config import TrainConfig
    from aekit.data import load_dataset, prepare_images
    from aekit.fast import keep_freed_memory
    from aekit.start import new_model
    from aekit.training import fit

    keep_freed_memory()  # as the aekit command does
    torch.set_num_threads(1)
    (x_train, _), (x_test, _) = load_dataset("mnist")
    x, x_val = prepare_images(x_train[:images]), prepare_images(x_test[:10])
    config = TrainConfig(model=model, recipe=recipe, epochs=1, batch_size=batch).resolved()
    config = dataclasses.replace(config, image_shape=(1, 28, 28))

    def one_pass(images_in) -> float:
        torch.manual_seed(0)
        net = new_model(config, torch.device("cpu"))
        started = time.perf_counter()
        fit(net, images_in, x_val, config, progress=False, workers=1)
        return time.perf_counter() - started

    one_pass(x[:4 * batch])  # warm up
    plain = one_pass(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        wall = one_pass(x)
    shares = dict.fromkeys(SHARES, 0.0)
    layers: dict[str, dict[str, float]] = {}
    flops, count = layer_flops(model)
    for event in prof.events():
        seconds = event.self_cpu_time_total / 1e6
        share, layer, backward = _share(event)
        if share is None:
            continue
        shares[share] += seconds
        if layer is not None:
            entry = layers.setdefault(layer, {"forward": 0.0, "backward": 0.0})
            entry["backward" if backward else "forward"] += seconds
    shares["autograd, Python and loop"] = max(0.0, wall - sum(shares.values()))
    return {"model": model, "recipe": recipe, "batch": batch, "images": images, "seconds": wall,
            "unprofiled_seconds": plain, "shares": shares, "layers": layers, "layer_flops": flops,
            "layer_count": count}


def layer_flops(model: str) -> tuple[dict[str, float], dict[str, int]]:
    """Forward FLOPs per image of the convolutions of ``model`` on 28x28 images, by the same
    'Cin->Cout @HxW' key (2 * H * W * Cin * Cout * k * k; backward: twice that), and how
    many layers share each key."""
    import torch
    from torch import nn

    from aekit.models import build_model

    net, flops, count = build_model(model, (1, 28, 28)), {}, {}

    def hook(module, inputs, output):
        (_, cin, h, w), cout = inputs[0].shape, module.out_channels
        key = f"{cin}->{cout} @{h}x{w}"
        flops[key] = flops.get(key, 0) + 2 * h * w * cin * cout * module.kernel_size[0] * module.kernel_size[1]
        count[key] = count.get(key, 0) + 1

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    return flops, count


def print_profile(result: dict, peak_gflops: float | None) -> None:
    """The two tables of one :func:`profile_fit` result, as markdown."""
    wall, n = result["seconds"], result["images"]
    print(f"### {result['model']}, {result['recipe']} recipe, batch {result['batch']}, 1 thread: "
          f"{n / wall:,.0f} images/s profiled ({n / result['unprofiled_seconds']:,.0f} without the profiler)\n")
    print("| share | ms per 1,000 images | % of the pass |")
    print("| --- | ---: | ---: |")
    for share in SHARES:
        seconds = result["shares"][share]
        print(f"| {share} | {1000 * seconds / n * 1000:.1f} | {100 * seconds / wall:.0f}% |")
    print()
    peak = f"% of the {peak_gflops:.0f} GFLOP/s matmul peak" if peak_gflops else "% of peak"
    print(f"| convolution | forward ms / 1,000 images | backward ms / 1,000 images | GFLOP/s | {peak} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    flops, count = result["layer_flops"], result["layer_count"]
    for layer, t in sorted(result["layers"].items(), key=lambda kv: -sum(kv[1].values())):
        spent = t["forward"] + t["backward"]
        work = 3 * flops.get(layer, 0) * n  # forward + backward (twice the forward)
        rate = work / spent / 1e9 if spent and work else None
        rate_text = f"{rate:.1f}" if rate else "-"
        peak_text = f"{100 * rate / peak_gflops:.0f}%" if rate and peak_gflops else "-"
        name = f"{layer} (x{count[layer]})" if count.get(layer, 1) > 1 else layer
        print(f"| {name} | {1e6 * t['forward'] / n:.1f} | {1e6 * t['backward'] / n:.1f} | {rate_text} | {peak_text} |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="seed")
    parser.add_argument("--recipe", default="blog")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=6_400)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    result = profile_fit(args.model, args.recipe, args.batch, args.images)
    if args.json:
        print(json.dumps(result))
    else:
        print_profile(result, None)


if __name__ == "__main__":
    main()
