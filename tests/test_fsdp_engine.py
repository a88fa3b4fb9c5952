"""The engine under FSDP2 (``torch.distributed.fsdp.fully_shard``), two CPU processes with gloo.
Parametrizations attached before ``fully_shard`` see the unsharded weight in the forward
(gathered clustering), and every rank ends a training step with the same centroids; shard-local
DKM (``lightning_dkm.engine.shard_local``) gives the gathered path's gradients, the same
centroids bit for bit on every rank, and the raw weights back bit for bit."""

from __future__ import annotations

import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _clustered_mlp(mesh=None) -> nn.Sequential:
    """The two-Linear model these workers train: seed 0, DKM attached to both weights (3 bits,
    ``"unique"``, tau 3e-2); with ``mesh``, each Linear and then the whole model
    ``fully_shard``-ed on it."""
    import lightning_dkm as L

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 256))
    L.attach(model, L.select_targets(model, L.ClusterSpec(bits=3), min_size=0),
             implementation="unique", temperature=3e-2)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _train_one_step(rank: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    L.attach(model, L.select_targets(model, L.ClusterSpec(bits=2), min_size=0))
    seen: dict[str, tuple[int, ...]] = {}
    for name, tensor in L.clustered_tensors(model).items():
        def recording(weight, name=name, forward=tensor.parametrization.forward):
            seen[name] = tuple(weight.shape)  # the weight the parametrization is given
            return forward(weight)

        tensor.parametrization.forward = recording
    mesh = init_device_mesh("cpu", (2,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))  # rank's data
    with L.clustering_pass(model):
        loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    local = model[0].parametrizations.weight.original.to_local().shape
    results[rank] = {
        "seen": seen, "local": tuple(local),
        "centroids": {n: t.parametrization.centroids.clone()
                      for n, t in L.clustered_tensors(model).items()},
    }


def _in_process_group(rank: int, init_file: str, results, worker) -> None:
    """``worker(rank, results)`` inside a gloo process group of 2 ranks that meet in
    ``init_file`` (a file store: no port that two pytest-xdist workers could both pick)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        worker(rank, results)
    finally:
        dist.destroy_process_group()


def _on_two_ranks(worker) -> dict:
    """Run ``worker(rank, results)`` on 2 spawned processes in one process group; what each
    rank left in ``results``."""
    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        results = manager.dict()
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_in_process_group, args=(init_file, results, worker), nprocs=2)
        return dict(results)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fully_sharded_weights_are_clustered_unsharded_with_the_same_centroids_on_every_rank():
    ranks = _on_two_ranks(_train_one_step)
    assert ranks[0]["local"] == ranks[1]["local"] == (64, 64)  # each rank holds half the rows
    for rank in (0, 1):  # ... but the parametrization sees the whole weight
        assert ranks[rank]["seen"] == {"0.weight": (128, 64), "2.weight": (64, 128)}
    for name, centroids in ranks[0]["centroids"].items():
        torch.testing.assert_close(ranks[1]["centroids"][name], centroids, rtol=0, atol=0)


def _sharded_step_against_a_plain_one(rank: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L

    build = _clustered_mlp

    data = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(1))
    plain = build()  # every rank: the whole global batch, no FSDP
    with L.clustering_pass(plain):
        loss = plain(data.flatten(0, 1)).square().mean()
    loss.backward()
    sharded = build()
    mesh = init_device_mesh("cpu", (2,))
    for module in sharded:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    with L.clustering_pass(sharded) as current:
        rebuilt = [current.rebuilds(t.parametrization)
                   for t in L.clustered_tensors(sharded).values()]
        loss = sharded(data[rank]).square().mean()  # this rank's half
    loss.backward()  # FSDP2 averages the two halves' gradients
    results[rank] = {
        "rebuilt": rebuilt,
        "grads": {n: (p.grad.full_tensor(), dict(plain.named_parameters())[n].grad)
                  for n, p in sharded.named_parameters()},
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_weights_rebuild_their_soft_weights_and_get_the_plain_gradients():
    ranks = _on_two_ranks(_sharded_step_against_a_plain_one)
    for rank in (0, 1):
        assert ranks[rank]["rebuilt"] == [True, True]
        for name, (sharded, plain) in ranks[rank]["grads"].items():
            torch.testing.assert_close(sharded, plain, rtol=1e-5, atol=1e-7, msg=name)


def _shard_local_against_gathered(rank: int, results) -> None:
    """One optimizer step's gradients of two micro-batches per rank, clustered two ways: the
    gathered weights in the forward (a clustering pass reading both micro-batches, one DKM
    step) and shard-locally (:class:`~lightning_dkm.engine.shard_local.ShardLocalDKM`)."""
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_dkm as L
    from lightning_dkm.engine.shard_local import RawShards, ShardLocalDKM, eligible

    mesh = init_device_mesh("cpu", (2,))

    def build():
        return _clustered_mlp(mesh)

    data = torch.randn(2, 2, 8, 256, generator=torch.Generator().manual_seed(1))
    gathered, local, checkpointed = build(), build(), build()
    with L.clustering_pass(gathered):
        loss = sum(gathered(x).square().mean() for x in data[rank])
    loss.backward()

    tensors = L.clustered_tensors(local)
    weights = [(n, t.parametrization, t.original) for n, t in tensors.items()]
    reasons = [eligible(p, o) for _, p, o in weights]
    raw = {n: t.original.to_local().clone() for n, t in tensors.items()}
    raw_shards = RawShards()  # kept from this step to the next, as the callback keeps it
    shard_local = ShardLocalDKM(weights, raw_shards)
    owners = [w.owner for w in shard_local.weights]
    shard_local.soften()
    first_memory = [w.raw.data_ptr() for w in shard_local.weights]
    soft = {n: t.original.detach().full_tensor() for n, t in tensors.items()}  # gathered
    losses = []
    for i, x in enumerate(data[rank]):  # two micro-batches: DKM once, soft values again
        if i:
            shard_local.reapply()  # the raw shards aside again, in the same memory
            reused = [w.raw.data_ptr() for w in shard_local.weights] == first_memory
        losses.append(local(x).square().mean())
        losses[-1].backward()
        shard_local.restore()
        restored = all(torch.equal(t.original.to_local(), raw[n]) for n, t in tensors.items())
    shard_local.finish()

    # the same step under activation checkpointing: the forward runs again in the backward
    again = L.clustered_tensors(checkpointed)
    shard_local = ShardLocalDKM([(n, t.parametrization, t.original)
                                 for n, t in again.items()], raw_shards)
    shard_local.soften()
    for i, x in enumerate(data[rank]):
        if i:
            shard_local.reapply()
        torch.utils.checkpoint.checkpoint(checkpointed, x, use_reentrant=False
                                          ).square().mean().backward()
        shard_local.restore()
    shard_local.finish()
    replayed = {n: (p.grad.full_tensor(), dict(local.named_parameters())[n].grad
                    .full_tensor()) for n, p in checkpointed.named_parameters()}
    results[rank] = {
        "replayed": replayed,
        "reasons": reasons, "owners": owners, "restored": restored, "reused": reused,
        "raw_after": all(torch.equal(t.original.to_local(), raw[n])
                         for n, t in tensors.items()),
        "soft": soft, "loss": (float(sum(losses).detach()), float(loss.detach())),
        "grads": {n: (p.grad.full_tensor(), dict(gathered.named_parameters())[n]
                      .grad.full_tensor()) for n, p in local.named_parameters()},
        "centroids": {n: (t.parametrization.centroids.clone(),
                          L.clustered_tensors(gathered)[n].parametrization.centroids.clone())
                      for n, t in tensors.items()},
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_shard_local_dkm_gives_the_gathered_gradients_and_identical_centroids_on_every_rank():
    """Also under activation checkpointing, and with two micro-batches (DKM once)."""
    ranks = _on_two_ranks(_shard_local_against_gathered)
    for rank in (0, 1):
        r = ranks[rank]
        assert r["reasons"] == [None, None]
        assert r["owners"] == [0, 1]  # two weights of 32,768: one each
        assert r["restored"] and r["raw_after"]  # the raw shards come back bit for bit
        assert r["reused"]  # the second micro-batch kept its raw shards in the first's memory
        torch.testing.assert_close(*r["loss"], rtol=1e-5, atol=1e-6)
        for name, (local, gathered) in r["grads"].items():
            torch.testing.assert_close(local, gathered, rtol=1e-4, atol=1e-6, msg=name)
        for name, (local, gathered) in r["centroids"].items():
            torch.testing.assert_close(local, gathered, rtol=1e-5, atol=1e-6, msg=name)
    for name, (centroids, _) in ranks[0]["centroids"].items():
        assert torch.equal(ranks[1]["centroids"][name][0], centroids), name
    for name, soft in ranks[0]["soft"].items():  # every rank gathered the same soft weights
        assert torch.equal(ranks[1]["soft"][name], soft), name
        assert torch.unique(soft).numel() > 8  # soft, not snapped
    for rank in (0, 1):  # activation checkpointing: its replay reads the same soft weights
        for name, (checkpointed, plain) in ranks[rank]["replayed"].items():
            torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-8, msg=name)


def test_raw_shards_reuse_a_parameters_memory_until_released() -> None:
    from lightning_dkm.engine.shard_local import RawShards

    raw_shards = RawShards()
    parameter, other_parameter = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
    shard = torch.randn(4, 8)
    first = raw_shards.copy(parameter, shard)
    assert torch.equal(first, shard) and first.data_ptr() != shard.data_ptr()
    again = raw_shards.copy(parameter, shard * 2)  # the next step: the same memory, new values
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, shard * 2)
    other = raw_shards.copy(other_parameter, shard)  # each parameter its own, names aside
    assert other.data_ptr() != first.data_ptr() and len(raw_shards) == 2
    for changed in (torch.randn(2, 8), shard.double(), shard.t()):
        kept = raw_shards.copy(parameter, changed)  # another shape or dtype: other memory
        assert torch.equal(kept, changed) and kept.is_contiguous()
    assert raw_shards.copy(parameter, shard.t()).data_ptr() == kept.data_ptr()
    raw_shards.release()
    assert len(raw_shards) == 0
    assert raw_shards.copy(parameter, shard.t()).data_ptr() != kept.data_ptr()
    # a parameter that is gone lets its memory go when another one comes
    raw_shards.copy(other_parameter, shard)
    assert len(raw_shards) == 2
    del other_parameter
    gc.collect()
    newcomer = nn.Parameter(torch.randn(4, 8))
    raw_shards.copy(newcomer, shard)
    assert len(raw_shards) == 2  # parameter's and the newcomer's


def test_the_callbacks_fsdp_side_lets_the_raw_shards_memory_go_when_it_drops_the_step() -> None:
    # at an epoch's end, the fit's end and on an exception (DKMCallback calls drop)
    from lightning_dkm.lightning.fully_sharded import FullySharded

    fully_sharded = FullySharded()
    fully_sharded._raw_shards.copy(nn.Parameter(torch.zeros(3)), torch.ones(3))
    assert len(fully_sharded._raw_shards) == 1
    fully_sharded.drop()
    assert len(fully_sharded._raw_shards) == 0


def _soft_weights_at_extreme_magnitudes(rank: int, results) -> None:
    """The soft weights that shard-local DKM writes, against the gathered ``"unique"`` step on
    the whole weight, for weights whose squares overflow float32 (1e18), whose mean dwarfs
    their spread (1e3 +- 1e-3), tiny ones (1e-18), and float16 ones whose shards' sums overflow
    float16 (8 +- 1, 16,384 per shard: the sums are float32 passes whatever the dtype)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L
    from lightning_dkm.engine.parametrization import StepConfig
    from lightning_dkm.engine.shard_local import ShardLocalDKM

    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for label, scale, offset, dtype in [
            ("huge", 1e18, 0.0, torch.float32), ("offset", 1e-3, 1e3, torch.float32),
            ("tiny", 1e-18, 0.0, torch.float32), ("half", 1.0, 8.0, torch.float16)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 128))
        with torch.no_grad():
            model[0].weight.mul_(scale / model[0].weight.std()).add_(offset)
        model.to(dtype)
        L.attach(model, L.select_targets(model, L.ClusterSpec(bits=3), min_size=0),
                 implementation="unique", temperature=3e-2)
        (tensor,) = L.clustered_tensors(model).values()
        p = tensor.parametrization
        whole = tensor.original.detach().clone()
        expected = p.step(whole.float().reshape(1, -1, 1), p.centroids, p.temperature,
                          StepConfig(p.max_iter, p.epsilon)).weights.reshape(whole.shape)
        expected = expected.to(dtype).float()  # rounded as the shards hold it
        fully_shard(model, mesh=mesh)
        shard_local = ShardLocalDKM([("0.weight", p, tensor.original)])
        shard_local.soften()
        soft = tensor.original.detach().full_tensor().float()
        shard_local.restore()
        out[label] = (soft, expected, p.centroids.clone(),
                      torch.equal(tensor.original.detach().full_tensor(), whole))
    results[rank] = out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_shard_local_soft_weights_equal_the_gathered_step_at_extreme_magnitudes():
    ranks = _on_two_ranks(_soft_weights_at_extreme_magnitudes)
    for label, (soft, expected, centroids, restored) in ranks[0].items():
        assert restored, label
        assert torch.isfinite(soft).all(), label
        spread = (expected - expected.mean()).abs().max()
        ulp = 2.0 ** -6 if label == "half" else 0.0  # float16's spacing at 8..16, twice
        torch.testing.assert_close(soft, expected, rtol=0, atol=1e-4 * float(spread) + ulp,
                                   msg=label)
        assert torch.equal(ranks[1][label][2], centroids), label
        assert torch.equal(ranks[1][label][0], soft), label


def _a_module_switched_to_eval_within_the_step(rank: int, results) -> None:
    """One shard-local step with the first Linear in training mode throughout, and the same
    step with it switched to eval mode after :meth:`soften` (as a ``training_step`` or a
    LightningModule's ``on_train_batch_start`` may do, after the callback's batch start)."""
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_dkm as L
    from lightning_dkm.engine.shard_local import ShardLocalDKM

    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(rank))
    out = {}
    for label in ("train", "eval"):
        model = _clustered_mlp(mesh)
        tensors = L.clustered_tensors(model)
        step = ShardLocalDKM([(n, t.parametrization, t.original) for n, t in tensors.items()])
        step.soften()
        if label == "eval":
            model[0].eval()
        loss = model(x).square().mean()
        loss.backward()
        step.restore()
        step.finish()
        out[label] = (loss.detach(), {n: p.grad.full_tensor()
                                      for n, p in model.named_parameters()})
    results[rank] = out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_module_switched_to_eval_within_the_step_reads_the_soft_weight_it_was_given():
    """The shards hold the step's soft weight and its gradient becomes DKM's in ``finish``:
    the forward must not snap (cluster again) what is already soft, whatever the mode."""
    ranks = _on_two_ranks(_a_module_switched_to_eval_within_the_step)
    for rank in (0, 1):
        (loss, grads), (eval_loss, eval_grads) = ranks[rank]["train"], ranks[rank]["eval"]
        assert torch.equal(eval_loss, loss)
        for name, grad in grads.items():
            assert torch.equal(eval_grads[name], grad), name


def _a_weight_with_fewer_rows_than_ranks(rank: int, results) -> None:
    """A (1, 40,000) weight: rank 1's shard is empty. Shard-local DKM against the gathered
    step (a clustering pass), one optimizer step's gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L
    from lightning_dkm.engine.shard_local import ShardLocalDKM

    mesh = init_device_mesh("cpu", (2,))

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40_000, 1, bias=False))
        L.attach(model, L.select_targets(model, L.ClusterSpec(bits=3), min_size=0),
                 implementation="unique", temperature=3e-2)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    x = torch.randn(4, 40_000, generator=torch.Generator().manual_seed(rank))
    gathered, local = build(), build()
    with L.clustering_pass(gathered):
        gathered(x).square().mean().backward()
    tensors = L.clustered_tensors(local)
    step = ShardLocalDKM([(n, t.parametrization, t.original) for n, t in tensors.items()])
    step.soften()
    local(x).square().mean().backward()
    step.restore()
    step.finish()
    results[rank] = {
        "rows": tensors["0.weight"].original.to_local().shape[0],
        "grads": {n: (p.grad.full_tensor(), dict(gathered.named_parameters())[n]
                      .grad.full_tensor()) for n, p in local.named_parameters()},
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_shard_local_dkm_of_a_weight_with_an_empty_shard_gives_the_gathered_gradient():
    ranks = _on_two_ranks(_a_weight_with_fewer_rows_than_ranks)
    assert (ranks[0]["rows"], ranks[1]["rows"]) == (1, 0)
    for rank in (0, 1):  # gradients up to ~100: float32 summation order
        for name, (local, gathered) in ranks[rank]["grads"].items():
            torch.testing.assert_close(local, gathered, rtol=1e-4, atol=1e-4, msg=name)


def _weights_on_two_meshes(rank: int, results) -> None:
    """The callback's shard-local step (:class:`~lightning_dkm.lightning.fully_sharded.
    FullySharded`) on a model whose units were sharded on two equal-ranked but different
    meshes (one with a dim name, one without: ``fully_shard`` without ``mesh=`` makes the
    latter), against the gathered step."""
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L
    from lightning_dkm.lightning.fully_sharded import FullySharded

    named = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    plain = init_device_mesh("cpu", (2,))

    def build():
        model = _clustered_mlp()
        fully_shard(model[0], mesh=named)
        fully_shard(model[2], mesh=plain)
        fully_shard(model, mesh=named)
        return model

    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(rank))
    gathered, local = build(), build()
    with L.clustering_pass(gathered):
        gathered(x).square().mean().backward()
    sharded = FullySharded()
    sharded.start_batch(SimpleNamespace(automatic_optimization=True),
                        L.clustered_tensors(local))
    presoftened = [t.parametrization.presoftened
                   for t in L.clustered_tensors(local).values()]
    local(x).square().mean().backward()
    sharded.end_batch()
    sharded.before_optimizer_step()
    results[rank] = {
        "presoftened": presoftened,
        "grads": {n: (p.grad.full_tensor(), dict(gathered.named_parameters())[n]
                      .grad.full_tensor()) for n, p in local.named_parameters()},
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_weights_sharded_on_different_meshes_each_go_shard_local_with_their_mesh():
    ranks = _on_two_ranks(_weights_on_two_meshes)
    for rank in (0, 1):
        assert ranks[rank]["presoftened"] == [True, True]
        for name, (local, gathered) in ranks[rank]["grads"].items():
            torch.testing.assert_close(local, gathered, rtol=1e-4, atol=1e-6, msg=name)


def _host_reads_of_a_shard_local_step(rank: int, results) -> None:
    """The host reads of one shard-local step (soften, forward, backward, finish) in the
    form it takes on an accelerator (:func:`~lightning_dkm.engine.numerics.sync_free`), for
    a model of 2 and of 4 clustered weights; and its gradients against the same steps on CPU's
    own path (host reads allowed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L
    from lightning_dkm.diagnostics import count_host_syncs
    from lightning_dkm.engine.numerics import sync_free
    from lightning_dkm.engine.shard_local import ShardLocalDKM

    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(rank))
    out = {}
    def build(layers):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(layers)])
        L.attach(model, L.select_targets(model, L.ClusterSpec(bits=3), min_size=0),
                 implementation="unique", temperature=3e-2)
        for module in model:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def step(model):
        model.zero_grad()
        tensors = L.clustered_tensors(model)
        engine = ShardLocalDKM([(n, t.parametrization, t.original)
                                for n, t in tensors.items()])
        engine.soften()
        model(x).square().mean().backward()
        engine.restore()
        engine.finish()

    for layers in (2, 4):
        model, plain = build(layers), build(layers)
        for _ in range(2):  # a warm-up step, then the counted one
            with sync_free(), count_host_syncs() as log:
                step(model)
            step(plain)
        grads = {n: (p.grad.full_tensor(), dict(plain.named_parameters())[n]
                     .grad.full_tensor()) for n, p in model.named_parameters()}
        out[layers] = (log.calls, grads)
    results[rank] = out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_shard_local_step_reads_nothing_back_per_weight():
    """On an accelerator a read is a sync: the step's few reads are batched over all its
    weights (the normalisations' fallback decision), none is made per weight."""
    ranks = _on_two_ranks(_host_reads_of_a_shard_local_step)
    for rank in (0, 1):
        (two, _), (four, grads) = ranks[rank][2], ranks[rank][4]
        assert len(four) == len(two) <= 2, (two, four)
        for name, (device_form, plain) in grads.items():
            torch.testing.assert_close(device_form, plain, rtol=1e-5, atol=1e-7, msg=name)


def _a_pass_batching_a_presoftened_weight(rank: int, results) -> None:
    """One FSDP unit with a shard-local weight (``0``) and one that cannot be (``1``: two
    palettes), both ``"unique"`` and small enough to batch: the callback's clustering pass
    batches every such weight of the unit at ``1``'s first read, ``0`` (soft already) too."""
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_dkm as L
    from lightning_dkm.lightning.fully_sharded import FullySharded

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    L.attach(model, L.select_targets(model, L.ClusterSpec(bits=2), min_size=0,
                                     overrides={"1": {"group_size": 64}}),
             implementation="unique", temperature=3e-2)
    fully_shard(model, mesh=mesh)
    tensors = L.clustered_tensors(model)
    sharded = FullySharded()
    sharded.start_batch(SimpleNamespace(automatic_optimization=True), tensors)
    softened = {n: (t.parametrization.presoftened, t.parametrization.centroids.clone())
                for n, t in tensors.items()}
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(rank))
    with L.clustering_pass(model):
        model(x).square().mean().backward()
    sharded.end_batch()
    results[rank] = {"softened": softened, "after": {
        n: t.parametrization.centroids.clone() for n, t in tensors.items()}}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_clustering_pass_does_not_move_a_presoftened_weights_centroids_again():
    """Shard-local DKM moved ``0``'s centroids once for the step; the pass's batched step of
    ``0`` (on the soft weight, which no forward reads) must not move them a second time."""
    ranks = _on_two_ranks(_a_pass_batching_a_presoftened_weight)
    for rank in (0, 1):
        r = ranks[rank]
        assert r["softened"]["0.weight"][0] and not r["softened"]["1.weight"][0]
        assert torch.equal(r["after"]["0.weight"], r["softened"]["0.weight"][1])
        assert not torch.equal(r["after"]["1.weight"], r["softened"]["1.weight"][1])
