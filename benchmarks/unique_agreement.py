"""How far the ``unique`` DKM step (float16 distinct values) is from the exact step on
arbitrary float32 weights: relative differences of the soft weights, the final centroids and
the weight gradients, against the reference unrolled step.

    python benchmarks/unique_agreement.py

Weights: Gaussian (std 0.02) and, for a heavier-tailed case, Laplace, 100,000 per tensor;
centroids from k-means; max_iter 3, epsilon 0; the upstream gradient is Gaussian. The last
columns show where the gradients differ: without the 0.1% of weights with the largest
difference (those within a rounding step of a cluster boundary), and the share of the exact
gradient's squared norm those weights carry. On
weights the codes hold exactly the two steps agree to float32 rounding (tests/test_unique_dkm.py);
what is printed here is the cost of the rounding itself.
"""

from __future__ import annotations

import argparse

import torch

from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.reference import dkm_cluster


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def weights(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(1, n, 1, generator=generator) * 0.02
    u = torch.rand(1, n, 1, generator=generator) - 0.5
    return -0.02 * u.sign() * torch.log1p(-2 * u.abs())  # Laplace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{'weights':9s} {'k':>3s} {'tau':>6s} {'soft weights':>13s} {'centroids':>10s} "
          f"{'gradient':>9s} {'gradient w/o top 0.1%':>22s} {'boundary share':>15s}")
    for kind in ("gaussian", "laplace"):
        for k in (4, 16):
            for tau in (1e-2, 1e-3):
                g = torch.Generator().manual_seed(0)
                x = weights(kind, args.n, g)
                c = kmeans(x, k, torch.Generator().manual_seed(0), max_iter=20).centroids
                upstream = torch.randn(x.shape, generator=g)
                results = []
                for step in (dkm_cluster, unique_dkm_cluster):
                    xi = x.clone().requires_grad_()
                    out = step(xi, c, tau, max_iter=3, epsilon=0)
                    (out.weights * upstream).sum().backward()
                    results.append((out.weights.detach(), out.centroids, xi.grad))
                (ref_w, ref_c, ref_g), (w, c_u, g_u) = results
                # Where the gradients differ: the weights whose difference is among the 0.1%
                # largest (those within a rounding step of a cluster boundary, where the
                # attention's slope ~1/tau is steepest), and the share of the reference
                # gradient's squared norm that those same weights carry.
                diff = (g_u - ref_g).abs().flatten()
                top = diff.topk(max(1, diff.numel() // 1000)).indices
                rest = torch.ones_like(diff, dtype=torch.bool)
                rest[top] = False
                flat_ref, flat_u = ref_g.flatten(), g_u.flatten()
                share = float(flat_ref[top].square().sum() / flat_ref.square().sum())
                print(f"{kind:9s} {k:3d} {tau:6.0e} {relative(w, ref_w):13.1e} "
                      f"{relative(c_u, ref_c):10.1e} {relative(g_u, ref_g):9.1e} "
                      f"{relative(flat_u[rest], flat_ref[rest]):22.1e} {share:15.2f}", flush=True)


if __name__ == "__main__":
    main()
