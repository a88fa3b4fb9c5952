"""Apple's DKM (``coremltools.optimize.torch.palettization.DKMPalettizer``) as a study method.

coremltools' training-time palettizer, at **its defaults**: only ``n_bits`` (and ``cluster_dim``
1) is set, per target module, through ``DKMPalettizerConfig(module_name_configs=...)``, so that it
clusters exactly the Linear layers ``lightning_dkm`` clusters (a ``global_config`` would also
palettize every Embedding above its ``weight_threshold``). Usage, as its docstring prescribes::

    palettizer = DKMPalettizer(model, config)
    model = palettizer.prepare(inplace=True)   # FakePalettize on each module's weight
    for batch in data:                          # the caller's loop: forward, backward,
        ...; optimizer.step(); palettizer.step()  # optimizer.step(), then palettizer.step()
    model = palettizer.finalize(inplace=True)   # weights = LUT[indices]

Its defaults (``DEFAULT_PALETTIZATION_ADVANCED_OPTIONS`` / ``DEFAULT_PALETTIZATION_OPTIONS`` of
``palettization_config.py``; :func:`apple_defaults` reads them from the installed package):
``palett_tau`` 1e-4, a constant softmax temperature on the *raw* squared distances (weights in
their own units, not normalised); ``kmeans_max_iter`` 3 DKM iterations per forward, stopped early
when the inertia changes by at most ``palett_epsilon`` 1e-4; ``milestone`` 0 (DKM from the first
step); ``kmeans_init`` "auto" (k-means++-style farthest-point seeding with ``kmeans_n_init`` 10
restarts of up to 100 Lloyd iterations on the fp32 weights at the first forward; "opt1d" for
tensors of <= 1024 weights); ``lut_dtype`` "f32"; per-tensor LUT (``granularity`` "per_tensor"),
no per-channel scale; ``prune_threshold`` 1e-7 and ``zero_threshold`` 1e-7 (attention clamp);
``weight_threshold`` 2048; ``palett_cluster_tol`` 0 (duplicate centroids are split).

:func:`palettes_from_snapped` turns the finalized weights into ``lightning_dkm`` palettes (the
distinct values as the LUT, indices into it), so that the size is computed by the same
``CompressionReport`` as every other method's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_dkm import Palette, Target

__all__ = [
    "apple_defaults",
    "apple_dkm_unavailable",
    "finalize_apple_dkm",
    "palettes_from_snapped",
    "prepare_apple_dkm",
]

#: coremltools' state-dict entries (compression metadata) that are not part of the model.
_METADATA_MARK = "_COREML_"


@contextlib.contextmanager
def _quiet_import():
    """coremltools prints warnings about its native libraries (absent on Linux), untested torch
    and scikit-learn versions at import; none of them matters to the torch palettizer."""
    for name in ("coremltools", "coremltools.optimize"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _palettization() -> Any:
    with _quiet_import():
        from coremltools.optimize.torch import palettization
    return palettization


def apple_dkm_unavailable() -> str | None:
    """``None`` if coremltools' DKMPalettizer can be imported, else why not."""
    try:
        _palettization()
    except Exception as err:  # ImportError, or a coremltools that does not import with this torch
        return f"coremltools' DKMPalettizer is not available ({type(err).__name__}: {err})"
    return None


def apple_defaults() -> dict[str, Any]:
    """The installed coremltools' default options of ``ModuleDKMPalettizerConfig`` (the ones
    that decide what DKM does), for the study's JSON."""
    with _quiet_import():
        import coremltools
        from coremltools.optimize.torch.palettization import palettization_config as pc
    keys = ("palett_tau", "kmeans_max_iter", "palett_epsilon", "kmeans_init", "kmeans_n_init",
            "palett_mode", "palett_cluster_tol", "prune_threshold", "zero_threshold",
            "enforce_zero", "palett_lambda", "palett_unique")
    options = {"coremltools": coremltools.__version__}
    options.update({k: pc.DEFAULT_PALETTIZATION_ADVANCED_OPTIONS[k] for k in keys})
    options.update({k: pc.DEFAULT_PALETTIZATION_OPTIONS[k]
                    for k in ("milestone", "weight_threshold", "lut_dtype", "granularity",
                              "enable_per_channel_scale")})
    return options


def prepare_apple_dkm(model: nn.Module, module_names: Iterable[str], bits: int,
                      cluster_dim: int = 1) -> tuple[nn.Module, Any]:
    """Insert coremltools' FakePalettize into the named modules of ``model`` (in place) with
    ``ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=cluster_dim)`` and nothing else;
    returns ``(model, palettizer)``. Build the optimizer on the returned model's parameters and
    call ``palettizer.step()`` after every ``optimizer.step()``."""
    pal = _palettization()
    names = sorted(set(module_names))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"apple_dkm: no modules named {missing}")
    config = pal.DKMPalettizerConfig(module_name_configs={
        name: pal.ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=cluster_dim)
        for name in names
    })
    palettizer = pal.DKMPalettizer(model, config)
    with _quiet_import():
        prepared = palettizer.prepare(inplace=True)
    wrapped = [n for n, m in prepared.named_modules() if hasattr(m, "weight_fake_quant")]
    if sorted(wrapped) != names:
        raise RuntimeError(
            f"apple_dkm: DKMPalettizer palettizes {sorted(wrapped)}, expected {names} (a module "
            "at or below its weight_threshold, or an unsupported module type)"
        )
    return prepared, palettizer


def finalize_apple_dkm(palettizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """``palettizer.finalize`` (weights = LUT[indices]); returns the finalized model's state
    dict without coremltools' metadata entries, to load into a plain copy of the model."""
    with _quiet_import():
        finalized = palettizer.finalize(model, inplace=True)
    return {k: v.detach().clone() for k, v in finalized.state_dict().items()
            if _METADATA_MARK not in k}


@torch.no_grad()
def palettes_from_snapped(model: nn.Module, targets: Iterable[Target]) -> dict[str, Palette]:
    """For every target weight of ``model`` (already snapped: at most ``2**bits`` distinct
    values per palette), the ``lightning_dkm`` Palette of its distinct values (LUT, padded with
    its last value when fewer are used) and the index of each weight into it.

    Raises:
        ValueError: a palette holds more distinct values than its ``2**bits`` LUT entries.
    """
    modules = dict(model.named_modules())
    palettes: dict[str, Palette] = {}
    for target in targets:
        weight = getattr(modules[target.module_name], target.param_name).detach()
        layout = target.layout
        x = layout.to_palettes(weight)  # (P, n, d)
        k = layout.spec.num_centroids
        P, n, d = x.shape
        luts, indices = [], []
        for p in range(P):
            values, inverse = torch.unique(x[p], dim=0, return_inverse=True)
            if len(values) > k:
                raise ValueError(
                    f"{target.name}: {len(values)} distinct values in palette {p}, more than "
                    f"the {k} of {layout.spec.bits} bits: the weight is not snapped"
                )
            pad = values[-1:].expand(k - len(values), d)
            luts.append(torch.cat([values, pad]))
            indices.append(inverse.reshape(n))
        palette = Palette(torch.stack(luts), torch.stack(indices), layout)
        if not torch.equal(palette.weight(), weight):
            raise RuntimeError(f"{target.name}: the palette does not rebuild the weight")
        palettes[target.name] = palette
    return palettes


def demo(bits: int = 2, steps: int = 40) -> dict[str, Any]:
    """coremltools' DKM on a small MLP regression (``Linear(24, 128)``, ``Linear(128, 64)``
    clustered; the last layer is below ``min_size``): prepare, ``steps`` AdamW steps with
    ``palettizer.step()``, finalize, and the palettes and ``CompressionReport`` of the result,
    as the study computes them. Returns what the run showed (``{"unavailable": why}`` without
    coremltools)."""
    if (why := apple_dkm_unavailable()) is not None:
        return {"unavailable": why}
    from lightning_dkm import ClusterSpec, CompressionReport, select_targets

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(24, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                             nn.Linear(64, 1))

    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(256, 24)
    y = x[:, :1] * x[:, 1:2]
    targets = select_targets(model, ClusterSpec(bits=bits))
    prepared, palettizer = prepare_apple_dkm(model, [t.module_name for t in targets], bits=bits)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = (prepared(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        palettizer.step()
        losses.append(float(loss.detach()))
    plain = mlp()
    plain.load_state_dict(finalize_apple_dkm(palettizer, prepared))
    palettes = palettes_from_snapped(plain, targets)
    report = CompressionReport.build(plain, palettes, lut_dtype=torch.float16)
    return {
        "bits": bits,
        "targets": [t.module_name for t in targets],
        "losses": losses,
        "distinct_weights": {name: int(torch.unique(plain.get_parameter(name)).numel())
                             for name in palettes},
        "distinct_per_palette_max": {name: max(p.distinct_values_per_palette())
                                     for name, p in palettes.items()},
        "clustered_parameters": report.clustered_parameters,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="coremltools' DKM on a small MLP: "
                                     "trains, finalizes, and reads its palettes back")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = demo(args.bits, args.steps)
    if "unavailable" in result:
        print(result["unavailable"])
    else:
        losses = result["losses"]
        print(f"apple_dkm, {result['bits']} bits, targets {result['targets']}: loss "
              f"{losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps; distinct values "
              f"per palette {result['distinct_per_palette_max']}; clustered parameters "
              f"{result['clustered_parameters']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
