"""The implicit (IDKM) gradient against the unrolled one, after few and after many iterations.

    python benchmarks/implicit_gradient.py

20,000 float16-representable Gaussian weights (normalisation fixed to mean 0, std 1, so both
gradients are of the same rounded problem), centroids from 5 Lloyd iterations, a Gaussian
upstream gradient. Prints relative differences of the weight gradients: implicit vs unrolled
after 200 iterations (the implicit gradient is the many-iteration limit of the unrolled one),
the same after 3 iterations, and the unrolled gradient after 3 vs after 200 iterations.
"""

from __future__ import annotations

import torch

from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import Normalization


def weight_gradient(x, c, tau, max_iter, gradient, norm, upstream) -> torch.Tensor:
    xi = x.clone().requires_grad_()
    out = unique_dkm_cluster(xi, c, tau, max_iter=max_iter, epsilon=0, normalization=norm,
                             gradient=gradient)
    (out.weights * upstream).sum().backward()
    return xi.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 20000, 1).half().float()
    norm = Normalization(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    print(f"{'k':>3s} {'tau':>6s} {'implicit vs unrolled, 200 it':>29s} "
          f"{'the same, 3 it':>15s} {'unrolled 3 vs 200 it':>21s}")
    for k, tau in ((4, 1e-1), (4, 1e-2), (16, 3e-2), (16, 1e-2)):
        c = kmeans(x, k, torch.Generator().manual_seed(0), max_iter=5).centroids
        upstream = torch.randn_like(x)
        grads = {(it, gradient): weight_gradient(x, c, tau, it, gradient, norm, upstream)
                 for it in (3, 200) for gradient in ("unrolled", "implicit")}
        print(f"{k:3d} {tau:6.0e} "
              f"{relative(grads[200, 'implicit'], grads[200, 'unrolled']):29.1e} "
              f"{relative(grads[3, 'implicit'], grads[3, 'unrolled']):15.1e} "
              f"{relative(grads[3, 'unrolled'], grads[200, 'unrolled']):21.1e}", flush=True)


if __name__ == "__main__":
    main()
