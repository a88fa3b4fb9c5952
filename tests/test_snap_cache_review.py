"""Specification of the snap cache where a weight changes without PyTorch seeing it, and where a
forward changes the weight it was handed: in both cases every forward inside the cache still
computes exactly what the uncached eval forward computes."""

from __future__ import annotations

import pytest
import torch
from test_snap_cache import clustered_linear
from torch import nn

from lightning_dkm import ClusterSpec, attach, clustered_tensors, select_targets
from lightning_dkm.engine.snap_cache import snap_cache

GRAD_OFF = [torch.inference_mode, torch.no_grad]


def uncached(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``model(*args)`` in eval mode without any snap cache, under inference mode."""
    ps = [t.parametrization for t in clustered_tensors(model).values()]
    kept = [p.snap_cache for p in ps]
    for p in ps:
        p.snap_cache = None
    try:
        with torch.inference_mode():
            return model(*args)
    finally:
        for p, cache in zip(ps, kept, strict=True):
            p.snap_cache = cache


# -- a weight changed through ``.data``: no version bump -----------------------------------------
@pytest.mark.parametrize("grad_off", GRAD_OFF)
def test_weights_swapped_in_through_data_are_snapped_again(grad_off):
    """An EMA helper that swaps its averages in and out with ``param.data.copy_`` (as
    ``torch_ema``'s ``copy_to`` / ``restore`` do) changes the weight without bumping its version:
    a validation step comparing the raw and the averaged model must see both."""
    linear, p = clustered_linear()
    original = linear.parametrizations.weight.original
    raw = original.detach().clone()
    averaged = raw + 0.3 * torch.randn_like(raw)
    x = torch.randn(4, 16)
    with torch.no_grad():
        original.copy_(averaged)
        expected_averaged = uncached(linear, x)
        original.copy_(raw)
    expected_raw = uncached(linear, x)
    assert not torch.equal(expected_raw, expected_averaged)
    with snap_cache([p]), grad_off():
        for _ in range(2):  # two validation batches
            assert torch.equal(linear(x), expected_raw)
            original.data.copy_(averaged)  # swap the averages in
            assert torch.equal(linear(x), expected_averaged)
            original.data.copy_(raw)  # and back
            assert torch.equal(linear(x), expected_raw)


@pytest.mark.parametrize("grad_off", GRAD_OFF)
def test_centroids_or_scales_changed_through_data_are_snapped_again(grad_off):
    linear, p = clustered_linear(per_channel_scale=True)
    x = torch.randn(4, 16)
    with snap_cache([p]), grad_off():
        linear(x)
        for change in (lambda: p.centroids.data.mul_(0.5), lambda: p.scale.data.mul_(2.0)):
            change()
            assert torch.equal(linear(x), uncached(linear, x))


# -- a forward that changes the weight it is handed -------------------------------------------
class TiedMaxNormLM(nn.Module):
    """An embedding with ``max_norm`` tied to the output projection: ``F.embedding`` renormalises
    the rows it looks up in place, in the tensor ``emb.weight`` returned."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32, max_norm=0.5)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens))


@pytest.mark.parametrize("grad_off", GRAD_OFF)
def test_a_forward_that_changes_its_weight_in_place_changes_no_other_forward(grad_off):
    """Each forward is handed its own snapped weight, as without the cache: what one forward
    does to it in place (``max_norm`` renormalising looked-up rows) reaches neither the tied
    projection nor the next batch."""
    torch.manual_seed(0)
    model = TiedMaxNormLM()
    attach(model, select_targets(model, ClusterSpec(2, 1, None), min_size=0))
    model.eval()
    batches = [torch.randint(0, 64, (4, 3)) for _ in range(3)]
    expected = [uncached(model, b) for b in batches]
    ps = [t.parametrization for t in clustered_tensors(model).values()]
    with snap_cache(ps) as cache, grad_off():
        outputs = [model(b) for b in batches]
        assert len(cache) == 1
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected, strict=True))


@pytest.mark.parametrize("grad_off", GRAD_OFF)
def test_a_weight_read_and_changed_in_place_does_not_change_the_next_read(grad_off):
    linear, p = clustered_linear()
    x = torch.randn(4, 16)
    expected = uncached(linear, x)
    with snap_cache([p]), grad_off():
        linear.weight.mul_(0.0)  # the first read, changed by its reader
        linear.weight.add_(1.0)  # a served read, changed by its reader
        assert torch.equal(linear(x), expected)
