"""Specification of DKM under mixed and half precision.

Under ``torch.autocast`` (Lightning's ``16-mixed`` / ``bf16-mixed``) the DKM step runs in
float32 with autocast off; a module cast to half precision (``.half()``, Lightning's
``16-true`` / ``bf16-true``) keeps float32 centroids and tau; only the clustered weight takes
the weight's dtype.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import TinyNet, trainer

from lightning_dkm import ClusterSpec, DKMCallback, PaletteLayout, clustered_tensors
from lightning_dkm.engine.parametrization import DKMParametrization

# (implementation, cluster_dim, shape): "auto" resolves to "unique" for the 16,384-weight
# scalar tensor and to "reference" for the vectors; "unique" needs cluster_dim 1.
STEPS = [
    ("reference", 1, (64, 128)),
    ("reference", 2, (64, 128)),
    ("chunked", 1, (64, 128)),
    ("chunked", 2, (64, 128)),
    ("unique", 1, (64, 128)),
    ("auto", 1, (128, 128)),
    ("auto", 2, (64, 128)),
]
IMPLEMENTATIONS = ["auto", "reference", "chunked", "unique"]


def parametrization(implementation: str, cluster_dim: int, shape: tuple[int, int],
                    bits: int = 3) -> tuple[torch.Tensor, DKMParametrization]:
    """A trainable weight ~ N(0, 0.05^2) and an initialised, training parametrization."""
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.05).requires_grad_()
    layout = PaletteLayout(shape, ClusterSpec(bits=bits, cluster_dim=cluster_dim), name="fc")
    p = DKMParametrization(layout, implementation=implementation, epsilon=0.0)
    p.initialize(weight)
    return weight, p.train()


def step(weight: torch.Tensor, p: DKMParametrization, autocast: bool):
    """One forward (under CPU bf16 autocast or not) and the gradient of a fixed loss."""
    start = p.centroids.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = p(weight)
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (grad,) = torch.autograd.grad((out.float() * upstream).sum(), weight)
    moved = p.centroids.clone()
    p.centroids.copy_(start)
    return out.detach(), grad, moved


@pytest.mark.parametrize(("implementation", "cluster_dim", "shape"), STEPS)
def test_under_bf16_autocast_the_soft_step_equals_the_float32_step(
    implementation, cluster_dim, shape
) -> None:
    weight, p = parametrization(implementation, cluster_dim, shape)
    out32, grad32, centroids32 = step(weight, p, autocast=False)
    out, grad, centroids = step(weight, p, autocast=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out32, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, grad32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(centroids, centroids32, rtol=1e-6, atol=1e-8)


def test_under_bf16_autocast_the_snapped_vectors_equal_the_float32_ones() -> None:
    """Nearest centroids of vectors come from a matrix product, which autocast would run in
    bfloat16 (scalars use a sorted search, untouched by autocast)."""
    weight, p = parametrization("reference", 2, (64, 128))
    p.eval()
    with torch.no_grad():
        plain = p(weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = p(weight)
    assert torch.equal(autocast, plain)


CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to-float16": lambda m: m.to(torch.float16),
    "to-bfloat16": lambda m: m.to(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_a_half_precision_module_keeps_float32_centroids_and_temperature(cast) -> None:
    _, p = parametrization("reference", 1, (64, 128))
    centroids, tau = p.centroids.clone(), p.temperature.clone()
    CASTS[cast](p)
    assert p.centroids.dtype == torch.float32 and p.temperature.dtype == torch.float32
    assert torch.equal(p.centroids, centroids)  # no round trip through half precision
    assert torch.equal(p.temperature, tau)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("implementation", "cluster_dim", "shape"), STEPS)
def test_a_half_precision_module_gives_the_weight_dtype_and_gradients(
    dtype, implementation, cluster_dim, shape
) -> None:
    weight32, p = parametrization(implementation, cluster_dim, shape)
    p.to(dtype)
    weight = weight32.detach().to(dtype).requires_grad_()
    out = p(weight)
    out.float().sum().backward()
    assert out.dtype == dtype
    assert p.centroids.dtype == torch.float32
    assert weight.grad is not None and weight.grad.dtype == dtype
    assert bool(torch.isfinite(weight.grad.float()).all()) and bool(weight.grad.abs().sum() > 0)
    p.eval()
    snapped = p(weight)
    assert snapped.dtype == dtype
    assert torch.equal(p.palette(weight).weight(), snapped)


def test_a_half_precision_state_dict_loaded_with_assign_keeps_float32_centroids() -> None:
    _, source = parametrization("reference", 1, (64, 128))
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in source.state_dict().items()}
    _, target = parametrization("reference", 1, (64, 128))
    target.load_state_dict(state, assign=True)
    assert target.centroids.dtype == torch.float32 and target.temperature.dtype == torch.float32
    assert torch.equal(target.centroids, source.centroids.half().float())


class CentroidDtypes(pl.Callback):
    """Records the centroid and weight dtypes of every clustered tensor during training."""

    def __init__(self) -> None:
        self.seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for tensor in clustered_tensors(pl_module).values():
            self.seen.add((tensor.parametrization.centroids.dtype, tensor.original.dtype))


def clustered_weights(model: TinyNet) -> list[torch.Tensor]:
    return [model.body[0].weight, model.body[2].weight]  # the 2048- and 4096-weight tensors


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fit_in_bf16_ends_with_the_weights_on_a_float32_trained_palette(
    tmp_path, precision, implementation
) -> None:
    model, dtypes = TinyNet(), CentroidDtypes()
    callback = DKMCallback(bits=2, implementation=implementation, save_dir=str(tmp_path / "dkm"),
                           verbose=False)
    trainer(tmp_path, precision=precision, max_epochs=1, callbacks=[callback, dtypes]).fit(model)
    weight_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert dtypes.seen == {(torch.float32, weight_dtype)}
    for weight in clustered_weights(model):
        assert not torch.nn.utils.parametrize.is_parametrized(model.body[0])
        assert bool(torch.isfinite(weight.float()).all())
        assert torch.unique(weight).numel() <= 4


def test_fit_in_bf16_mixed_with_the_chunked_step_clusters_vectors(tmp_path) -> None:
    """The chunked step's in-place products used to meet a bfloat16 attention and fail."""
    model = TinyNet()
    callback = DKMCallback(bits=2, cluster_dim=2, implementation="chunked",
                           save_dir=str(tmp_path / "dkm"), verbose=False)
    trainer(tmp_path, precision="bf16-mixed", max_epochs=1, callbacks=[callback]).fit(model)
    for weight in clustered_weights(model):
        assert torch.unique(weight.reshape(-1, 2), dim=0).shape[0] <= 4
