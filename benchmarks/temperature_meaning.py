"""What one tau means at each bit width, and what the calibrated ('auto') taus are.

    .venv/bin/python benchmarks/temperature_meaning.py

Synthetic weights (stated plainly: Gaussian, std 0.03, 50,000 per tensor, seed 0), centroids
from k-means++ and Lloyd as DKM seeds them. Prints (1) the mean assignment entropy, in bits, at
fixed taus (units of the weight variance) for 1-4 bits: the same tau is soft for 16 centroids
and hard for 2; (2) the taus that ``temperature: auto`` calibrates (start: 0.1 x log2 k bits,
end: 1e-2 bits), the entropies they give, and the share of weights whose largest assignment
is below 0.9 at the start tau (the weights that DKM's soft assignment really moves).
"""

from __future__ import annotations

import torch

from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import normalization_of
from lightning_dkm.engine.reference import soft_assignment
from lightning_dkm.lightning.temperature import TemperatureConfig, mean_assignment_entropy

TAUS = (1e-4, 1e-3, 1e-2, 1e-1)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    config = TemperatureConfig()
    print("mean assignment entropy (bits) at a fixed tau")
    print(f"{'bits':>4} " + "".join(f"{'tau=' + format(t, 'g'):>11}" for t in TAUS)
          + f"  {'auto start':>11} {'H':>7} {'max a<0.9':>10}  {'auto end':>10} {'H':>8}")
    for bits in (1, 2, 3, 4):
        x = torch.randn(1, 50_000, 1, generator=gen) * 0.03
        centroids = kmeans(x, 2**bits, torch.Generator().manual_seed(bits), max_iter=100).centroids
        fixed = [mean_assignment_entropy(x, centroids, t, max_points=10**6) for t in TAUS]
        start, end = config.bounds(x, centroids)
        h_start = mean_assignment_entropy(x, centroids, start, max_points=10**6)
        h_end = mean_assignment_entropy(x, centroids, end, max_points=10**6)
        norm = normalization_of(x)
        xt = ((x - norm.center) / norm.scale).transpose(1, 2)
        a = soft_assignment(xt, (centroids - norm.center) / norm.scale, start)
        soft_share = float((a.max(dim=1).values < 0.9).float().mean())
        print(f"{bits:>4} " + "".join(f"{h:>11.3g}" for h in fixed)
              + f"  {start:>11.4g} {h_start:>7.3f} {soft_share:>10.1%}  {end:>10.3g} {h_end:>8.2g}")


if __name__ == "__main__":
    main()
