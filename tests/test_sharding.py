"""The single-process side of FSDP2 support: the sharding helpers pass plain tensors through,
the weightless skeleton rebuilds the plain model, and weights on the meta device are refused.
The distributed behaviour is in test_fsdp_engine.py and test_fsdp_callback.py."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet
from torch import nn

from lightning_dkm.engine.sharding import full_tensor, is_sharded, shard_like, write_full
from lightning_dkm.lightning.preflight import check_fully_sharded_model
from lightning_dkm.model.skeleton import materialize, tensorless_copy


def test_plain_tensors_pass_through_the_sharding_helpers():
    param = nn.Parameter(torch.randn(4, 3))
    assert not is_sharded(param)
    whole = full_tensor(param)
    assert whole.data_ptr() == param.data_ptr() and not whole.requires_grad
    value = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    assert shard_like(param, value).dtype == torch.float32
    write_full(param, value)
    assert torch.equal(param.detach(), value.float())


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("running", torch.full((8,), 2.0))
        self.register_buffer("cache", torch.arange(8.0), persistent=False)
        self.not_copied = object()


def test_the_skeleton_holds_no_weights_but_keeps_non_persistent_buffers():
    model = WithCache()
    skeleton = tensorless_copy(model, leave_out=[model.not_copied])
    assert skeleton.linear.weight.is_meta and skeleton.running.is_meta
    assert skeleton.not_copied is None
    assert torch.equal(skeleton.cache, torch.arange(8.0))  # not in a state dict: copied
    assert isinstance(skeleton.linear.weight, nn.Parameter)


def test_a_full_state_dict_materializes_the_skeleton_into_the_model():
    model = WithCache()
    skeleton = tensorless_copy(model)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    rebuilt = materialize(skeleton, state)
    assert type(rebuilt) is WithCache
    for key, value in state.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert rebuilt.linear.weight.requires_grad


def test_a_state_dict_that_misses_a_key_does_not_materialize():
    skeleton = tensorless_copy(WithCache())
    with pytest.raises(RuntimeError, match=r"Missing key.*running"):
        materialize(skeleton, {k: v for k, v in WithCache().state_dict().items()
                               if k != "running"})


def test_a_module_that_cannot_be_copied_names_why():
    class Uncopyable(nn.Module):
        def __deepcopy__(self, memo):
            raise RuntimeError("holds a socket")

    with pytest.raises(TypeError, match=r"Uncopyable cannot be copied.*holds a socket"):
        tensorless_copy(Uncopyable())


def test_weights_on_the_meta_device_are_refused_under_fsdp():
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(MisconfigurationException, match=r"meta device.*__init__.*configure_model"):
        check_fully_sharded_model(model)


def test_shard_local_dkm_deals_the_weights_to_owners_by_cost_the_same_way_on_every_rank():
    from lightning_dkm.engine.shard_local import owners

    # largest first, each to the least loaded rank (ties: the lowest)
    assert owners([10, 30, 20, 5], 2) == [1, 0, 1, 0]
    assert owners([10, 30, 20, 5], 1) == [0, 0, 0, 0]
    assert owners([7, 7, 7], 4) == [0, 1, 2]
    # ... by the iterations' cost, which stops growing at 65,536 distinct values: one huge
    # weight does not leave the other rank every other weight
    assert owners([40_000_000, 600_000, 600_000, 600_000], 2) == [0, 1, 0, 1]


def test_shard_local_dkm_says_why_a_weight_cannot_take_it():
    import lightning_dkm as L
    from lightning_dkm.engine.shard_local import ShardLocalDKM, eligible

    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16))
    L.attach(model, L.select_targets(model, L.ClusterSpec(bits=2), min_size=0),
             implementation="chunked")
    tensors = L.clustered_tensors(model)
    for t in tensors.values():  # plain tensors: checked first, then the step and the layout
        assert eligible(t.parametrization, t.original) == "it is not sharded by FSDP2"
    with pytest.raises(ValueError, match="at least one weight"):
        ShardLocalDKM([])


def test_shard_local_dkm_leaves_a_cpu_offloaded_shard_to_the_gathered_path(monkeypatch):
    """Under FSDP2's CPUOffloadPolicy the shards stay on the CPU while the mesh (and its NCCL
    group) is on the accelerator: shard-local DKM's collectives on the shards' tables would
    fail there, so such a weight keeps clustering the gathered weight, and says why."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard

    import lightning_dkm as L
    from lightning_dkm.engine import shard_local

    model = nn.Sequential(nn.Linear(16, 8))
    L.attach(model, L.select_targets(model, L.ClusterSpec(bits=2), min_size=0),
             implementation="unique")
    (t,) = L.clustered_tensors(model).values()

    class Offloaded:  # what eligible reads of an offloaded DTensor: a CPU shard, a cuda mesh
        placements = (Shard(0),)
        device_mesh = SimpleNamespace(ndim=1, device_type="cuda")

        def to_local(self):
            return torch.zeros(4, 16)

    monkeypatch.setattr(shard_local, "is_sharded", lambda tensor: True)
    reason = shard_local.eligible(t.parametrization, Offloaded())
    assert reason is not None
    assert reason.startswith("its shard lives on cpu and its mesh on cuda (FSDP2's CPU offload)")
    Offloaded.device_mesh = SimpleNamespace(ndim=1, device_type="cpu")  # both on the CPU: fine
    assert shard_local.eligible(t.parametrization, Offloaded()) is None
