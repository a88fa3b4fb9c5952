"""``hessian_diagonal_fd``: Hutchinson's Hessian diagonal with each Hessian-vector product a
central difference of two plain gradients (#24): the double backward's estimate (same probes)
up to the difference's error, the weights restored bit for bit, both gradients at the same
random draws, and a real sensitivity where an op has no double backward."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import SquareOnce
from torch import nn

from lightning_dkm.model.post_training import hessian_diagonal, hessian_diagonal_fd


def _close(fd: dict, exact: dict, rtol: float) -> None:
    assert fd.keys() == exact.keys()
    for name in exact:
        error = float((fd[name] - exact[name]).norm() / exact[name].norm())
        assert error < rtol, (name, error)


def _mlp_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(20, 16, generator=generator),
                torch.randint(0, 8, (20,), generator=generator)) for _ in range(2)]
    return model, batches


def _cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_the_difference_is_the_double_backwards_estimate_on_an_mlp():
    model, batches = _mlp_and_batches()
    names = ["0.weight", "0.bias", "2.weight"]
    exact = hessian_diagonal(model, batches, _cross_entropy, names, seed=3)
    _close(hessian_diagonal_fd(model, batches, _cross_entropy, names, seed=3), exact, 1e-3)
    other = hessian_diagonal_fd(model, batches, _cross_entropy, names, seed=4)
    assert float((other["0.weight"] - exact["0.weight"]).norm()
                 / exact["0.weight"].norm()) > 0.1  # the seed's probes, not any


def test_the_difference_is_the_double_backwards_estimate_on_a_transformer_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 16, generator=generator), torch.randn(4, 6, 16, generator=generator)

    def loss(model, batch):
        return (model(batch) - y).square().mean()

    names = [n for n, p in layer.named_parameters() if p.dim() == 2]
    exact = hessian_diagonal(layer, [x], loss, names, seed=0)
    _close(hessian_diagonal_fd(layer, [x], loss, names, seed=0), exact, 1e-3)


def test_the_difference_is_exact_where_the_hessian_is_diagonal_and_zero_where_linear():
    model = nn.Linear(8, 4)
    c = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    hessian = hessian_diagonal_fd(model, range(3), lambda m, _: (c * m.weight.square()).sum(),
                                  ["weight"])
    torch.testing.assert_close(hessian["weight"], 3 * 2 * c, rtol=1e-3, atol=0)
    linear = hessian_diagonal_fd(model, [torch.randn(5, 8)], lambda m, x: m(x).sum(),
                                 ["weight"])
    assert torch.equal(linear["weight"], torch.zeros(4, 8))


def test_the_model_is_left_as_it_was_bit_for_bit():
    model, batches = _mlp_and_batches()
    model.train()
    model[2].weight.requires_grad_(False)
    marker = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = marker.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # enables grad for its own passes, as hessian_diagonal
        hessian_diagonal_fd(model, batches, _cross_entropy, ["0.weight", "2.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(model[0].weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert model.training and model[0].weight.requires_grad
    assert not model[2].weight.requires_grad


def test_the_weights_are_restored_when_the_loss_raises():
    model, batches = _mlp_and_batches()
    before = model[0].weight.detach().clone()
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 2:  # in the second pass, with the weights moved
            raise RuntimeError("a bug in the loss")
        return _cross_entropy(model, batch)

    with pytest.raises(RuntimeError, match="a bug in the loss"):
        hessian_diagonal_fd(model, batches, failing, ["0.weight"])
    assert torch.equal(model[0].weight, before)


def test_a_tied_weight_named_twice_gets_the_double_backwards_estimate():
    model, batches = _mlp_and_batches()
    names = ["0.weight", "0.weight"]
    before = model[0].weight.detach().clone()
    got = hessian_diagonal_fd(model, batches, _cross_entropy, names, seed=2)
    assert torch.equal(model[0].weight, before)
    _close(got, hessian_diagonal(model, batches, _cross_entropy, names, seed=2), 1e-3)


def test_both_gradients_see_the_same_random_draws():
    """A loss that masks at random (torch's generator, Python's ``random``, numpy's) gets the
    estimate of the same loss with those draws fixed, and the generators advance as after
    one pass."""
    model, batches = _mlp_and_batches()
    names = ["0.weight", "2.weight"]

    def noise(x):
        mask = (torch.rand(x.shape) > 0.3).float()
        return x * mask * random.uniform(0.5, 1.5) * float(np.random.uniform(0.5, 1.5))

    def random_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(noise(x)), y)

    def seeded():
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)

    seeded()
    fixed = [(noise(x), y) for x, y in batches]
    after_one_pass = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    seeded()
    got = hessian_diagonal_fd(model, batches, random_loss, names, seed=1)
    assert torch.equal(torch.get_rng_state(), after_one_pass[0])
    assert random.getstate() == after_one_pass[1]
    assert np.array_equal(np.random.get_state()[1], after_one_pass[2])
    expected = hessian_diagonal_fd(model, fixed, _cross_entropy, names, seed=1)
    assert all(torch.equal(got[n], expected[n]) for n in names)
    _close(got, hessian_diagonal(model, fixed, _cross_entropy, names, seed=1), 1e-3)


def _linear_and_batches():
    model = nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 3, generator=generator), torch.randn(10, 2, generator=generator))
               for _ in range(2)]
    return model, batches


def test_an_op_without_a_double_backward_gets_a_real_sensitivity():
    """``once_differentiable`` (and the fused attention kernels, torch.compile) have no double
    backward: the difference needs none and finds the same curvature as the plain op."""
    model, batches = _linear_and_batches()

    def once(model, batch):
        x, y = batch
        return SquareOnce.apply(torch.tanh(model(x)) - y).mean()

    def plain(model, batch):
        x, y = batch
        return (torch.tanh(model(x)) - y).square().mean()

    def bare(model, batch):  # every path through SquareOnce: nothing to differentiate again
        x, y = batch
        return SquareOnce.apply(model(x) - y).mean()

    with pytest.raises(RuntimeError, match="no graph to differentiate again"):
        hessian_diagonal(model, batches, bare, ["weight"])
    exact = hessian_diagonal(model, batches, plain, ["weight"], seed=5)
    missing = hessian_diagonal(model, batches, once, ["weight"], seed=5)  # through tanh only
    assert float((missing["weight"] - exact["weight"]).norm() / exact["weight"].norm()) > 0.1
    got = hessian_diagonal_fd(model, batches, once, ["weight"], seed=5)
    _close(got, exact, 1e-3)
    assert float(hessian_diagonal_fd(model, batches, bare, ["weight"])["weight"].sum()) > 0


def test_fused_attention_and_a_compiled_module_get_a_sensitivity():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batches = _linear_and_batches()
    target = torch.randn(1, 1, 10, 2, generator=torch.Generator().manual_seed(2))

    def attention(model, batch, backend):
        q = torch.tanh(model(batch[0])).view(1, 1, 10, 2)
        with sdpa_kernel(backend):
            return (F.scaled_dot_product_attention(q, q, q) - target).square().sum()

    exact = hessian_diagonal(model, batches, lambda m, b: attention(m, b, SDPBackend.MATH),
                             ["weight"])
    fused = hessian_diagonal_fd(model, batches,
                                lambda m, b: attention(m, b, SDPBackend.FLASH_ATTENTION),
                                ["weight"])
    _close(fused, exact, 1e-2)
    compiled = nn.Sequential(nn.Linear(3, 2))
    compiled[0] = torch.compile(compiled[0], backend="aot_eager")

    def mse(model, batch):
        x, y = batch
        return F.mse_loss(torch.tanh(model(x)), y)

    got = hessian_diagonal_fd(compiled, batches, mse, ["0._orig_mod.weight"])
    assert float(got["0._orig_mod.weight"].sum()) > 0


def test_a_loss_without_a_gradient_still_fails_clearly():
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.square()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("NoBackward has no derivative")

    model, batches = _linear_and_batches()
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match="NoBackward has no derivative"):
        hessian_diagonal_fd(model, batches, lambda m, b: NoBackward.apply(m(b[0])).sum(),
                            ["weight"])
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_get_the_float32_estimate_roughly(dtype):
    """The step is at least sqrt(eps) of the dtype (0.031, 0.088 of the rms): 1e-3 would not
    move most half-precision weights at all."""
    model, batches = _mlp_and_batches()
    names = ["0.weight", "2.weight"]
    exact = hessian_diagonal(model, batches, _cross_entropy, names, seed=0)
    half = model.to(dtype)
    before = {n: p.detach().clone() for n, p in half.named_parameters()}
    got = hessian_diagonal_fd(half, [(x.to(dtype), y) for x, y in batches], _cross_entropy,
                              names, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in half.named_parameters())
    assert all(got[n].dtype == torch.float32 and bool(torch.isfinite(got[n]).all())
               for n in names)
    _close(got, exact, 0.3)
    for name in names:  # the ranking of tensors, what the allocation reads, holds
        assert float(got[name].sum() / exact[name].sum()) == pytest.approx(1, abs=0.15)


def test_the_step_must_be_a_fraction():
    model, batches = _linear_and_batches()
    for step in (0, 1, -1e-3, True, "1e-3"):
        with pytest.raises(ValueError, match="step must be a number in"):
            hessian_diagonal_fd(model, batches, _cross_entropy, ["weight"], step=step)
