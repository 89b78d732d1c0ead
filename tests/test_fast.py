"""aekit.fast: the CPU speed tricks compute what the plain model computes, and leave it as it was."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from conftest import need

from aekit import fast, inference
from aekit.fast import ConvToOne, run_chunks
from aekit.models import SeedAutoencoder, build_model, init_he_


def _seed_model() -> SeedAutoencoder:
    torch.manual_seed(0)
    model = SeedAutoencoder()
    init_he_(model)
    return model


@pytest.mark.parametrize("workers", [1, 2])
def test_inference_encode_is_the_encoder_and_leaves_the_model_as_it_was(workers):
    model = _seed_model()
    x = torch.rand(300, 1, 28, 28)  # 300 = 4 chunks of 64 and one of 44
    with torch.no_grad():
        expected = model.encode(x)
    threads = torch.get_num_threads()
    latents = inference.encode(model, x, workers=workers)
    assert latents.shape == (300, 8, 7, 7)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    assert model.training and torch.get_num_threads() == threads
    assert all(p.is_contiguous() for p in model.parameters())


def test_run_chunks_keeps_the_order():
    x = torch.arange(10.0).reshape(10, 1)
    assert torch.equal(torch.cat(run_chunks(lambda c: c * 2, x, chunk=3, workers=3)), x * 2)


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_to_one_matches_torch_conv2d_forward_and_backward(channels_last):
    """The output layer's matrix-product convolution against F.conv2d, values and gradients."""
    torch.manual_seed(0)
    conv = ConvToOne(16)
    x = torch.randn(5, 16, 12, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_y = torch.randn(5, 1, 12, 8)
    ours = conv(x)
    reference = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, (x, conv.weight, conv.bias), grad_y),
                    torch.autograd.grad(reference, (x, conv.weight, conv.bias), grad_y)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_conv_to_one_follows_autocast_as_torch_conv2d_does():
    """Under bfloat16 autocast (precision="bfloat16") ConvToOne takes bfloat16 inputs, as
    F.conv2d does, and its backward runs in the forward's autocast state: the same values
    and gradients to bfloat16's precision, in the inputs' and parameters' own dtypes."""
    torch.manual_seed(0)
    conv = ConvToOne(16)
    x = torch.randn(5, 16, 12, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_y = torch.randn(5, 1, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = conv(x)
        reference = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert ours.dtype == reference.dtype == torch.bfloat16
    # Both round the inputs to bfloat16 (round to nearest even, the same on every CPU),
    # multiply exactly and sum in float32 (oneDNN, and PyTorch's own bfloat16 kernels where
    # oneDNN has none); ConvToOne also rounds its nine tap planes to bfloat16 before adding
    # them. So |ours - reference| <= 2^-9 * (sum over taps of |tap| + 2 |y|), whatever the
    # summation order: at most 0.012 on these inputs (|y| <= 1.93), an eighth of the
    # allowance. Each gradient is rounded to bfloat16 once on each side: within 2^-8 of it.
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=5e-2)
    ours_grads = torch.autograd.grad(ours, (x, conv.weight, conv.bias), grad_y)
    reference_grads = torch.autograd.grad(reference, (x, conv.weight, conv.bias), grad_y)
    for a, b, param in zip(ours_grads, reference_grads, (x, conv.weight, conv.bias)):
        assert a.dtype == b.dtype == param.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-1)


def test_every_gradient_has_its_parameters_strides_while_fast():
    """DDP copies each gradient into a bucket laid out as its parameter, and warns on every
    torchrun run ("Grad strides do not match bucket view strides") where one differs:
    ConvToOne's weight gradient of shape (1, C, 3, 3) must be channels_last as its weight is."""
    model = _seed_model()
    with fast.on_cpu(model) as twin:
        twin.loss(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), "mse").total.backward()
        assert [(name, p.grad.stride()) for name, p in model.named_parameters()] == \
            [(name, p.stride()) for name, p in model.named_parameters()]


@pytest.mark.parametrize("name", ["seed", "conv"])
def test_the_models_are_plain_pytorch_and_on_cpu_makes_the_fast_twin(name):
    """The model definitions hold no speed tricks (export and GPUs see plain layers); the
    twin on_cpu yields swaps in ConvToOne, shares every parameter object, and computes the
    same; after the block the model is contiguous and unchanged."""
    model = build_model(name, (1, 28, 28))
    assert not any(isinstance(m, ConvToOne) for m in model.modules())
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    with fast.on_cpu(model) as twin:
        assert twin is not model
        assert sum(isinstance(m, ConvToOne) for m in twin.modules()) == 1
        assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
        kernels = [p for p in model.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-6)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any(isinstance(m, ConvToOne) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_on_cpu_blocks_nest_and_carry_the_optimizer_state_along():
    """Validation runs inside training's block: the inner block must not undo the outer
    one's channels_last, and Adam's moments follow the parameters' layout both ways."""
    model = _seed_model()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    with fast.on_cpu(model, optimizer) as twin:
        twin(torch.rand(4, 1, 28, 28)).sum().backward()
        optimizer.step()
        with fast.on_cpu(model):
            pass
        kernels = [p for p in model.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert all(optimizer.state[p]["exp_avg"].stride() == p.stride() for p in kernels)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(optimizer.state[p]["exp_avg"].stride() == p.stride() for p in model.parameters())


def test_a_twin_trains_the_model():
    """An optimiser of the model steps the twin's (the same) parameters."""
    model = _seed_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with fast.on_cpu(model, optimizer) as twin:
        twin(torch.rand(4, 1, 28, 28)).sum().backward()
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_inference_leaves_the_parameters_trainable():
    """The passes run in inference mode, the layout changes around them do not: a parameter
    whose data were replaced in inference mode would stay an inference tensor, which
    autograd refuses to save for backward."""
    model = _seed_model()
    x = torch.rand(70, 1, 28, 28)
    inference.encode(model, x)
    inference.reconstruction_errors(model, x)
    inference.evaluate(model, x, "bce")
    assert not any(p.is_inference() for p in model.parameters())
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_inference_leaves_the_random_generator_alone():
    """Making the fast twin draws no random numbers: encoding does not move the global
    generator that the user's own code draws from."""
    model = _seed_model()
    state = torch.get_rng_state()
    inference.encode(model, torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    with fast.on_cpu(model):
        pass
    assert torch.equal(torch.get_rng_state(), state)


# ---- denormal floats (issue 20): flushed in a training step's threads, the same weights

def _denormals(t: torch.Tensor) -> int:
    """How many of a float32 tensor's values are denormal, read from their bits (a thread
    that flushes also compares denormals as zero, so ``abs() < 1.18e-38`` would not see them)."""
    bits = t.detach().float().contiguous().view(torch.int32)
    return int((((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)).sum())


def test_flush_denormals_flushes_in_the_block_and_gives_the_thread_its_setting_back():
    need(torch.set_flush_denormal(False), "this CPU cannot flush denormal floats")
    cpu = torch.device("cpu")
    assert not fast.flushing_denormals()
    with fast.flush_denormals(cpu):
        assert fast.flushing_denormals()
        assert _denormals(torch.full((4,), 1e-39) * 0.5) == 0
    assert not fast.flushing_denormals()
    assert _denormals(torch.full((4,), 1e-39) * 0.5) == 4
    torch.set_flush_denormal(True)  # a thread that flushed before the block flushes after it
    try:
        with fast.flush_denormals(cpu):
            assert fast.flushing_denormals()
        assert fast.flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    with fast.flush_denormals(torch.device("meta")):  # not the CPU's arithmetic: nothing
        assert not fast.flushing_denormals()


@pytest.mark.filterwarnings("ignore::aekit.training.CollapseWarning", "ignore:Full backward hook is firing")
@pytest.mark.parametrize("workers", [1, 2])
def test_training_steps_flush_denormals_and_train_the_same_weights(mnist, workers, monkeypatch):
    """The blog recipe's plateau makes denormal gradients (where some CPUs slow down 2-3x):
    with flushing, no step's backward sees one, in the calling thread or in ChunkPool's;
    without, some do. The weights after the epoch are the same bit for bit: a flushed value
    is under 1.2e-38, and what Adam could make of it (times 3e-3, times 10 for the first
    step's bias correction, over its epsilon 1e-7) is under 1e-32, far below the last place
    of any of these weights (aekit.fast)."""
    need(torch.set_flush_denormal(False), "this CPU cannot flush denormal floats")
    from aekit.config import TrainConfig
    from aekit.data import prepare_images
    from aekit.start import new_model
    from aekit.training import fit

    (x_train, _), (x_test, _) = mnist
    # At 3e-3 (the blog's 1e-3 reaches the plateau later: step 29-50 on seeds 0-3) denormals
    # come from step 11-22 of these 50 on seeds 0-3, so a CPU's own rounding has room.
    x, x_val = prepare_images(x_train[:3200]), prepare_images(x_test[:64])
    config = TrainConfig(model="seed", recipe="blog", lr=3e-3, epochs=1, batch_size=64, device="cpu",
                         image_shape=(1, 28, 28)).resolved()

    def train() -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = new_model(config, torch.device("cpu"))
        seen = []
        def count(module, grad_in, grad_out):  # the output layer's input gradient has most of them
            if isinstance(module, ConvToOne):
                seen.append(sum(_denormals(g) for g in grad_in if g is not None))

        hook = nn.modules.module.register_module_full_backward_hook(count)
        try:  # one PyTorch thread: its intra-op threads keep their own setting (aekit.fast)
            with fast.torch_threads(1):
                fit(model, x, x_val, config, progress=False, workers=workers, micro_batch=32)
        finally:
            hook.remove()
        assert not fast.flushing_denormals()  # fit gives the thread its setting back
        return [p.detach().clone() for p in model.parameters()], sum(seen)

    flushed, denormals_seen = train()
    assert denormals_seen == 0
    with monkeypatch.context() as m:
        m.setattr(fast, "flush_denormals", lambda device: contextlib.nullcontext())
        plain, plain_denormals = train()
    assert plain_denormals > 0  # these steps do make them
    assert all(torch.equal(a, b) for a, b in zip(flushed, plain))


def test_chunk_pool_workers_flush_denormals_while_they_compute_a_chunk():
    """Each worker enters the flush itself: its threads may have started outside a step."""
    need(torch.set_flush_denormal(False), "this CPU cannot flush denormal floats")
    from aekit import models

    pool, seen = fast.ChunkPool(_seed_model(), 2), []

    def loss(model, chunk_in, chunk_target):
        seen.append(fast.flushing_denormals())
        return models.loss(model, chunk_in, chunk_target, "mse")

    x = torch.rand(4, 1, 28, 28)
    try:
        for _ in range(2):  # the second time on the threads the first one started
            pool.gradients(list(zip(x.split(2), x.split(2))), loss, len(x))
        after = [pool._pool.submit(fast.flushing_denormals).result() for _ in range(4)]
    finally:
        pool.close()
    assert seen == [True] * 4
    assert after == [False] * 4  # and gives its setting back after the chunk


def test_flushing_denormals_reads_the_cpu_float32_setting_whatever_the_defaults():
    """A user's float64 default dtype (where 1e-39 is a normal number) does not hide the
    thread's setting, so flush_denormals does not turn off a flush the user made."""
    need(torch.set_flush_denormal(False), "this CPU cannot flush denormal floats")
    before = torch.get_default_dtype()
    torch.set_flush_denormal(True)
    torch.set_default_dtype(torch.float64)
    try:
        assert fast.flushing_denormals()
        with fast.flush_denormals(torch.device("cpu")):
            pass
        assert fast.flushing_denormals()
    finally:
        torch.set_default_dtype(before)
        torch.set_flush_denormal(False)
