"""Per-rank peak memory and step time of DKM under FSDP2 and DDP on a GPT-2-small-shaped decoder.

    python benchmarks/perf_distributed.py                      # 125M decoder, every config
    python benchmarks/perf_distributed.py --width 2048 --configs fsdp fsdp_dkm4 ddp_dkm4 \\
        --budget-gb 12                                          # where DDP no longer fits

The model: a decoder-only transformer of GPT-2 small's shape (12 pre-LayerNorm blocks, width
768, 12 heads, 50,257-token vocabulary, 1,024 positions, the output layer tied to the token
embedding: 124.4M parameters), random weights and random tokens (time and memory do not depend
on the values). Every config runs in its own ``world`` processes (``torch.multiprocessing``,
gloo, one thread each), AdamW, ``--batch`` sequences of ``--seq`` tokens per rank:

* ``fsdp``: ``fully_shard`` on every block and the root (FSDP2, sharded over all ranks);
* ``fsdp_dkm2`` / ``fsdp_dkm4``: the same with DKM at 2 / 4 bits on every Linear and Embedding
  weight (the callback's defaults: ``implementation="auto"``, ``max_iter=3``), attached before
  ``fully_shard``, as ``DKMCallback`` does: shard-local DKM
  (:class:`~lightning_dkm.engine.shard_local.ShardLocalDKM`: soft weights written into the
  shards before the forward, DKM's backward on the reduce-scattered gradients before the
  optimizer step) for the weights it takes, each forward in ``clustering_pass(model)``;
* ``fsdp_gathered_dkm4``: DKM at 4 bits as before shard-local DKM (#22 item 4): every rank
  clusters every gathered weight inside its unit's forward;
* ``ddp`` / ``ddp_dkm4``: ``DistributedDataParallel`` (every rank holds the whole model).

Each rank reports its peak RSS over the timed steps (``VmHWM``, reset once the model, the
optimizer state and a warm-up step exist, so the one-off k-means seeding does not count), the
RSS at rest before them (parameters and optimizer state, gradients freed), the RSS before the
model was built (the process itself: Python, torch, gloo; included in the other two) and the
median step time, by the wall clock and by the process's CPU clock (``time.process_time``,
every thread of the rank; less disturbed than the wall clock by other load on the machine).
For shard-local DKM it also reports the time in its two hooks (``soften`` before the forward,
``finish`` before the optimizer step), which is all of DKM's own work for the weights it
takes: the forward and backward in between are plain FSDP2's. The summary gives each config
against plain FSDP2 at the same world size, DKM's added time per rank (the config's step
minus ``fsdp``'s) at each world size and its ratio to world 1's, and the same for the hooks.
``--budget-gb`` caps each rank's address space at that many
GB above its size after the imports: a config that does not fit fails with an allocation error
and is reported as such, instead of waking the machine's OOM killer. ``--world 1 2`` runs each
config at both world sizes (to see DKM's extra memory fall with the world size).
``--fast-seed`` seeds the centroids at quantiles of the weights instead of k-means++ and Lloyd,
which takes minutes per config at 700M parameters on one core (the timed steps do not depend on
how the centroids were seeded, beyond when the early stop ends an iteration).

Prints one table; ``--json PATH`` writes every number for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_dkm
from lightning_dkm.engine.shard_local import RawShards, ShardLocalDKM, eligible

CONFIGS = ("fsdp", "fsdp_dkm2", "fsdp_dkm4", "fsdp_gathered_dkm4", "ddp", "ddp_dkm4")


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Decoder(nn.Module):
    """GPT-2's shape; the output layer reads the token embedding (tied, as in GPT-2)."""

    def __init__(self, width: int, layers: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output layer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _settle_memory() -> None:
    """Give freed heap memory back to the OS, then reset the peak RSS (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _worker(rank: int, world: int, port: int, config: str, args: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if args["budget_gb"]:
        limit = _status_kb("VmSize") * 1024 + int(args["budget_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # A rank that fails (out of its budget) must not leave the other waiting for ever.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=20))
    try:
        results[rank] = _run(rank, world, config, args)
    except (RuntimeError, MemoryError) as err:  # an allocation beyond the budget
        results[rank] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        traceback.print_exc()
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def _seed_from_quantiles(model: nn.Module) -> None:
    """``--fast-seed``: each palette's centroids at evenly spaced quantiles of a sample of its
    weights, instead of k-means++ and Lloyd (minutes on a 700M-parameter model on one core)."""
    for tensor in lightning_dkm.clustered_tensors(model).values():
        p = tensor.parametrization
        x = p.to_palettes(tensor.original.detach())  # (P, n, 1)
        sample = x[:, :: max(1, x.shape[1] // 100_000), 0].float()
        k = p.centroids.shape[1]
        levels = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
        p.set_centroids(torch.quantile(sample, levels, dim=1).T.unsqueeze(-1))


def _run(rank: int, world: int, config: str, args: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    base = _status_kb("VmRSS") / 1024  # the process before the model: Python, torch, gloo
    torch.manual_seed(0)  # the same weights on every rank
    model = Decoder(args["width"], args["layers"], args["heads"], args["vocab"], args["context"])
    bits = int(config[-1]) if "dkm" in config else None
    if bits is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the min_size skip warning (LayerNorms, biases)
            targets = lightning_dkm.select_targets(model, lightning_dkm.ClusterSpec(bits=bits))
        lightning_dkm.attach(model, targets, temperature=1e-2, initialize=not args["fast_seed"])
        if args["fast_seed"]:
            _seed_from_quantiles(model)
    if config.startswith("fsdp"):
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(args["vocab"], (args["batch"], args["seq"] + 1), generator=generator)

    local = []  # the weights DKMCallback clusters shard-locally under FSDP2
    if bits is not None and config.startswith("fsdp") and "gathered" not in config:
        local = [(n, t.parametrization, t.original)
                 for n, t in lightning_dkm.clustered_tensors(model).items()
                 if eligible(t.parametrization, t.original) is None]

    raw_shards = RawShards()  # as DKMCallback keeps them, from one step to the next

    def step() -> tuple[float, float]:
        """One training step; the wall and CPU seconds spent in shard-local DKM's hooks."""
        wall, cpu = time.perf_counter(), time.process_time()
        shard_local = ShardLocalDKM(local, raw_shards) if local else None
        if shard_local is not None:  # DKMCallback.on_train_batch_start
            shard_local.soften()
        hooks = [time.perf_counter() - wall, time.process_time() - cpu]
        with lightning_dkm.clustering_pass(model):
            logits = wrapped(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        wall, cpu = time.perf_counter(), time.process_time()
        if shard_local is not None:  # DKMCallback.on_before_optimizer_step
            shard_local.finish()
        hooks[0] += time.perf_counter() - wall
        hooks[1] += time.process_time() - cpu
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return hooks[0], hooks[1]

    step()  # warm-up: the optimizer state exists from here on
    dist.barrier()
    _settle_memory()
    resting = _status_kb("VmRSS") / 1024
    times, cpu_times, hook_times, hook_cpu_times = [], [], [], []
    for _ in range(args["steps"]):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        hook_wall, hook_cpu = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        hook_times.append(hook_wall)
        hook_cpu_times.append(hook_cpu)
    return {
        "peak_mb": _status_kb("VmHWM") / 1024,
        "resting_mb": resting,
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "hooks_s": statistics.median(hook_times),
        "hooks_cpu_s": statistics.median(hook_cpu_times),
        "shard_local": len(local),
        "base_mb": base,
        "parameters": sum(p.numel() for p in model.parameters()),  # a DTensor counts whole
    }


def run_config(config: str, world: int, args: dict) -> dict:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # large frees go back to the OS
    with mp.Manager() as manager:
        results = manager.dict()
        try:
            mp.spawn(_worker, args=(world, _free_port(), config, args, results), nprocs=world)
        except mp.ProcessRaisedException as err:
            return {"config": config, "world": world, "error": str(err).splitlines()[-1]}
        except mp.ProcessExitedException as err:  # killed (out of memory)
            return {"config": config, "world": world, "error": f"process exited: {err}"}
        ranks = [results[r] for r in range(world)]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"config": config, "world": world, "error": errors[0]}
    return {
        "config": config, "world": world, "parameters": ranks[0]["parameters"],
        "peak_mb": max(r["peak_mb"] for r in ranks),
        "resting_mb": max(r["resting_mb"] for r in ranks),
        "base_mb": max(r["base_mb"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks),
        "cpu_s": max(r["cpu_s"] for r in ranks),
        "hooks_s": max(r["hooks_s"] for r in ranks),
        "hooks_cpu_s": max(r["hooks_cpu_s"] for r in ranks),
        "shard_local": ranks[0]["shard_local"],
    }


def _added_per_world(rows: list[dict], config: str) -> dict[int, tuple[float, float]]:
    """``{world: (wall s, cpu s)}``: ``config``'s step time minus plain FSDP2's, per rank."""
    def found(name: str, world: int) -> dict | None:
        return next((r for r in rows if r["config"] == name and r["world"] == world
                     and "error" not in r), None)

    added = {}
    for world in sorted({r["world"] for r in rows}):
        base, row = found("fsdp", world), found(config, world)
        if base is not None and row is not None:
            added[world] = (row["step_s"] - base["step_s"], row["cpu_s"] - base["cpu_s"])
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--world", nargs="+", type=int, default=[2])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=None)
    parser.add_argument("--fast-seed", action="store_true",
                        help="seed the centroids at quantiles instead of k-means")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in
                ("width", "layers", "heads", "vocab", "context", "seq", "batch", "steps",
                 "budget_gb", "fast_seed")}
    rows = []
    print(f"decoder width {args.width}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.batch} x {args.seq} tokens per rank; median of {args.steps} steps")
    print(f"{'config':<11} {'world':>5} {'params':>8} {'peak MB/rank':>13} "
          f"{'resting MB':>11} {'base MB':>8} {'step s':>8} {'cpu s':>8} {'hooks s':>8} "
          f"{'hooks cpu':>9}")
    for world in args.world:
        for config in args.configs:
            row = run_config(config, world, settings)
            rows.append(row)
            if "error" in row:
                print(f"{config:<11} {world:>5}   does not run: {row['error']}", flush=True)
                continue
            print(f"{config:<11} {world:>5} {row['parameters'] / 1e6:>7.1f}M "
                  f"{row['peak_mb']:>13.0f} {row['resting_mb']:>11.0f} {row['base_mb']:>8.0f} "
                  f"{row['step_s']:>8.2f} {row['cpu_s']:>8.2f} {row['hooks_s']:>8.2f} "
                  f"{row['hooks_cpu_s']:>9.2f}",
                  flush=True)
    for world in args.world:
        base = next((r for r in rows if r["config"] == "fsdp" and r["world"] == world
                     and "error" not in r), None)
        if base is None:
            continue
        for row in rows:
            if row["world"] == world and row["config"] != "fsdp" and "error" not in row:
                print(f"world {world}: {row['config']} / fsdp: peak memory "
                      f"{row['peak_mb'] / base['peak_mb']:.2f}x "
                      f"(+{row['peak_mb'] - base['peak_mb']:.0f} MB per rank), step time "
                      f"{row['step_s'] / base['step_s']:.2f}x (cpu "
                      f"{row['cpu_s'] / base['cpu_s']:.2f}x)")
    for config in (c for c in args.configs if c.startswith("fsdp_")):
        added = _added_per_world(rows, config)
        if 1 in added:
            for world, (wall, cpu) in sorted(added.items()):
                print(f"{config}: DKM's added time per rank at world {world}: {wall:+.2f} s "
                      f"wall ({wall / added[1][0]:.2f}x world 1's), {cpu:+.2f} s cpu "
                      f"({cpu / added[1][1]:.2f}x world 1's)")
        hooks = {r["world"]: r for r in rows if r["config"] == config and "error" not in r
                 and r["shard_local"]}
        if 1 in hooks:
            for world, row in sorted(hooks.items()):
                print(f"{config}: shard-local DKM's hooks per rank at world {world}: "
                      f"{row['hooks_s']:.2f} s wall "
                      f"({row['hooks_s'] / hooks[1]['hooks_s']:.2f}x world 1's), "
                      f"{row['hooks_cpu_s']:.2f} s cpu "
                      f"({row['hooks_cpu_s'] / hooks[1]['hooks_cpu_s']:.2f}x world 1's)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": settings, "rows": rows, "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
        }, indent=2))


if __name__ == "__main__":
    main()
