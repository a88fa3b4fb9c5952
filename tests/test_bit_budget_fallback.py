"""Where ``average_bits`` gets its Hessian and what it does without one (#24): the Hessian is
taken on the first samples of a batch; a loss without a double backward, a fit without a
training dataloader or with manual optimization, and a sensitivity of rounding noise all give
uniform widths (a fractional budget: the widths around it), with a warning naming
``average_bits`` and why; any other error of the loss is raised, not hidden behind a
fallback."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import SquareOnce, TinyNet, trainer

from lightning_dkm import DKMCallback
from lightning_dkm.engine.layout import ClusterSpec
from lightning_dkm.model.bit_budget import (
    SENSITIVITY_SAMPLES,
    budget_bytes,
    uniform_allocation,
)
from lightning_dkm.model.post_training import (
    allocation_curvature,
    first_samples,
    hessian_diagonal,
    no_double_backward,
)
from lightning_dkm.model.targets import select_targets

pytestmark = pytest.mark.filterwarnings("ignore:skipping 1 tensor:UserWarning")


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


# -- first_samples ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [
    torch.arange(10),
    (torch.zeros(10, 3), torch.arange(10)),
    [torch.zeros(10, 3), (torch.ones(10), {"y": torch.arange(10)})],
    {"x": torch.zeros(10, 3), "y": torch.arange(10)},
    Pair(torch.zeros(10, 3), torch.arange(10)),
])
def test_first_samples_cuts_every_tensor_of_a_batch_to_its_first_rows(batch):
    cut = first_samples(batch, 4)
    assert type(cut) is type(batch)
    leaves = [cut] if isinstance(cut, torch.Tensor) else _tensors(cut)
    assert leaves and all(t.shape[0] == 4 for t in leaves)
    assert all(torch.equal(a, b[:4]) for a, b in zip(leaves, _tensors(batch) or [batch],
                                                    strict=True))


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


@pytest.mark.parametrize("batch, why", [
    ((torch.zeros(10, 3), torch.zeros(7)), "first dimensions differ"),
    ((torch.zeros(10, 3), ["a"] * 10), "a leaf that is not a tensor"),
    ((torch.zeros(10, 3), torch.tensor(1.0)), "a 0-d tensor"),
    ((torch.zeros(4, 3), torch.zeros(4)), "no more samples than asked for"),
    (3, "no tensor at all"),
])
def test_first_samples_leaves_a_batch_without_one_sample_axis_whole(batch, why):
    assert first_samples(batch, 4) is batch, why


def test_first_samples_of_none_is_the_whole_batch():
    batch = (torch.zeros(10, 3),)
    assert first_samples(batch, None) is batch


# -- allocation_curvature -----------------------------------------------------------------------
def _linear_and_batches():
    model = torch.nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 3, generator=generator), torch.randn(10, 2, generator=generator))
               for _ in range(3)]
    return model, batches


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(torch.tanh(model(x)), y)


def test_the_allocation_hessian_is_that_of_the_first_samples_of_the_first_batches():
    model, batches = _linear_and_batches()
    hessian, label = allocation_curvature(model, batches, _mse, ["weight"], 2, 4, seed=1)
    expected = hessian_diagonal(model, [first_samples(b, 4) for b in batches[:2]], _mse,
                                ["weight"], seed=1)
    assert torch.equal(hessian["weight"], expected["weight"])
    assert label == "hessian (2 batches, the first 4 samples of each)"
    _, whole = allocation_curvature(model, batches, _mse, ["weight"], 1, None)
    assert whole == "hessian (1 batch)"
    _, uncut = allocation_curvature(model, batches, _mse, ["weight"], 1, 10)
    assert uncut == "hessian (1 batch, whole)"


def test_the_allocation_samples_must_be_a_positive_int():
    model, batches = _linear_and_batches()
    with pytest.raises(ValueError, match=r"samples must be None or an int >= 1; got 0"):
        allocation_curvature(model, batches, _mse, ["weight"], 1, 0)


def _once_differentiable_loss(model, batch):
    x, y = batch
    return SquareOnce.apply(model(x) - y).mean()


def test_a_loss_without_a_double_backward_gets_its_hessian_by_finite_differences():
    model, batches = _linear_and_batches()
    hessian, label = allocation_curvature(model, batches, _once_differentiable_loss,
                                          ["weight"], 1, 4)
    def twice_differentiable(model, batch):  # the same loss with a double backward
        x, y = batch
        return (model(x) - y).square().mean()

    expected = hessian_diagonal(model, [first_samples(batches[0], 4)], twice_differentiable,
                                ["weight"])
    torch.testing.assert_close(hessian["weight"], expected["weight"], rtol=1e-3, atol=1e-6)
    assert label == "hessian by finite differences (1 batch, the first 4 samples of each)"


def test_any_other_error_of_the_loss_is_raised_not_taken_for_a_missing_double_backward():
    model, batches = _linear_and_batches()

    def failing(model, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        allocation_curvature(model, batches, failing, ["weight"], 1, 4)


def _hessian_error(loss_fn) -> RuntimeError:
    model, batches = _linear_and_batches()
    try:
        hessian_diagonal(model, batches[:1], loss_fn, ["weight"])
    except RuntimeError as err:
        return err
    raise AssertionError("no error")


def test_the_errors_of_a_missing_double_backward_are_recognised():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(model, batch):  # the fused CPU attention kernel has no double backward
        q = model(batch[0]).view(1, 1, 10, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, q, q).sum()

    assert "is not implemented" in str(_hessian_error(flash))
    assert "no graph to differentiate again" in str(_hessian_error(_once_differentiable_loss))
    for loss_fn in (flash, _once_differentiable_loss):
        assert no_double_backward(_hessian_error(loss_fn))
    assert not no_double_backward(RuntimeError("CUDA out of memory"))
    assert not no_double_backward(ValueError("derivative for x is not implemented"))


def test_a_compiled_module_is_recognised_as_having_no_double_backward():
    """torch.compile's message names no "derivative ... is not implemented"; before this
    test the fit raised it at setup instead of falling back to uniform widths."""
    _, batches = _linear_and_batches()
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    model[0] = torch.compile(model[0], backend="aot_eager")
    err = None
    try:
        hessian_diagonal(model, batches[:1], _mse, ["0._orig_mod.weight"])
    except RuntimeError as caught:
        err = caught
    assert "does not currently support double backward" in str(err)
    assert no_double_backward(err)
    hessian, how = allocation_curvature(model, batches, _mse, ["0._orig_mod.weight"], 1, None)
    assert float(hessian["0._orig_mod.weight"].sum()) > 0
    assert how.startswith("hessian by finite differences")


@pytest.mark.parametrize("message", [
    "Double backwards is not supported for CuDNN RNNs due to limitations in the CuDNN API.",
    "grid_sampler_3d double backward not implemented for interpolation_mode=",
    "scatter_reduce(): Double backward is unsupported for src when >1 zeros in src are scattered",
    "trying to differentiate twice a function that was marked with @once_differentiable",
    "the derivative for '_cdist_backward' is not implemented.",
])
def test_torchs_other_missing_double_backward_messages_are_recognised(message):
    assert no_double_backward(RuntimeError(message))


def test_a_users_own_not_implemented_error_is_raised_not_taken_for_a_missing_double_backward():
    """NotImplementedError is a RuntimeError: "is not implemented" alone must not hide it."""
    model, batches = _linear_and_batches()

    def unfinished(model, batch):
        raise NotImplementedError("the loss of this task is not implemented")

    assert not no_double_backward(NotImplementedError("feature X is not implemented"))
    with pytest.raises(NotImplementedError, match="this task"):
        allocation_curvature(model, batches, unfinished, ["weight"], 1, 4)


# -- uniform_allocation -------------------------------------------------------------------------
def _tiny_targets(bits=4):
    model = TinyNet()
    targets = select_targets(model, ClusterSpec(bits=bits))
    return targets, {t.name: model.get_parameter(t.name) for t in targets}


@pytest.mark.parametrize("average_bits", [1, 2, 3, 5])
def test_without_a_sensitivity_an_integer_budget_is_that_width_everywhere(average_bits):
    targets, weights = _tiny_targets()
    allocation = uniform_allocation(targets, weights, average_bits, "no Hessian")
    assert set(allocation.bits.values()) == {average_bits}
    assert allocation.total_bytes == allocation.budget_bytes
    assert allocation.sensitivity == "uniform (no Hessian)"


def test_without_a_sensitivity_a_fractional_budget_takes_the_two_widths_around_it():
    targets, weights = _tiny_targets()
    allocation = uniform_allocation(targets, weights, 2.5, "no Hessian")
    # 2.5 buys the 2,048-weight tensor its third bit, not the 4,096-weight one
    assert allocation.bits == {"body.0.weight": 3, "body.2.weight": 2}
    assert allocation.total_bytes <= allocation.budget_bytes
    core_ai = uniform_allocation(targets, weights, 3, "no Hessian", allowed_bits=[1, 2, 4, 6, 8])
    assert set(core_ai.bits.values()) <= {2, 4}
    assert core_ai.total_bytes <= budget_bytes([t.layout for t in targets], 3)


def test_without_a_sensitivity_fixed_tensors_that_leave_too_little_let_others_go_narrower():
    targets, weights = _tiny_targets(bits=3)
    allocation = uniform_allocation(targets, weights, 2, "no Hessian", fixed={"body.0.weight"})
    # body.0 keeps its 3 bits; body.2 cannot have 2 beside them
    assert allocation.bits == {"body.0.weight": 3, "body.2.weight": 1}
    assert allocation.total_bytes <= allocation.budget_bytes


# -- in a fit -----------------------------------------------------------------------------------
class FusedAttentionNet(TinyNet):
    """TinyNet whose loss runs PyTorch's fused CPU attention kernel, which has no double
    backward."""

    def training_step(self, batch, batch_idx):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x, y = batch
        q = self(x).view(1, 1, -1, 4)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, q, q)
        return F.cross_entropy(out.view(-1, 4), y)


class ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class FailingNet(TinyNet):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("a bug in the user's training_step")


def _fit(tmp_path, model, average_bits):
    callback = DKMCallback(average_bits=average_bits, verbose=False, save_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(model)
    return callback


@pytest.mark.parametrize("model, why", [
    (ManualNet(), r"the module uses manual optimization"),
])
def test_a_fit_without_a_hessian_clusters_at_uniform_widths_with_a_warning(tmp_path, model,
                                                                           why):
    with pytest.warns(UserWarning, match=r"DKMCallback\(average_bits=2\): " + why
                      + r".*every tensor gets the budget's own width"):
        callback = _fit(tmp_path, model, 2)
    assert set(callback.bit_allocation.bits.values()) == {2}
    assert callback.bit_allocation.sensitivity.startswith("uniform (")
    assert callback.report.clustered_bytes <= callback.bit_allocation.budget_bytes


def test_a_fit_whose_loss_has_no_double_backward_gets_its_hessian_by_finite_differences(
        tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = _fit(tmp_path, FusedAttentionNet(), 2)
    assert not [w for w in caught if "average_bits" in str(w.message)]
    assert callback.bit_allocation.sensitivity.startswith("hessian by finite differences (")


def test_a_fit_takes_its_hessian_on_the_first_8_samples_of_one_training_batch(tmp_path):
    """8 samples keep the allocation under 5 % of the study's MiniLM fit and its accuracy
    targets (docs/results.md: why); TinyNet's batches hold 32."""
    assert SENSITIVITY_SAMPLES == 8
    callback = _fit(tmp_path, TinyNet(), 2.5)
    assert callback.bit_allocation.sensitivity == "hessian (1 batch, the first 8 samples of each)"


def test_a_training_step_that_fails_otherwise_fails_the_fit(tmp_path):
    with pytest.raises(RuntimeError, match="a bug in the user's training_step"):
        _fit(tmp_path, FailingNet(), 2)


def test_a_failure_on_rank_0_is_broadcast_before_it_is_raised(tmp_path):
    """Under DDP only rank 0 runs the Hessian: an error of training_step raised there before
    the broadcast left the other ranks waiting in it; they now get it and raise too."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    sent = []

    class Recording(SingleDeviceStrategy):
        def broadcast(self, obj, src=0):
            sent.append(obj)
            return obj

    callback = DKMCallback(average_bits=2, verbose=False, save_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="a bug in the user's training_step"):
        trainer(tmp_path, callbacks=[callback], max_epochs=1,
                strategy=Recording(device="cpu")).fit(FailingNet())
    sent = [obj for obj in sent if isinstance(obj, tuple) and len(obj) == 2]
    assert sent and sent[-1][0] is None
    assert "a bug in the user's training_step" in sent[-1][1]
