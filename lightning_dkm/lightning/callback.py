"""``DKMCallback``: the Lightning lifecycle glue around the DKM engine.

Hooks, one concern each:

* ``setup("fit")`` -- select targets, register the parametrizations (before
  ``configure_optimizers`` and before DDP wraps the model), seed the centroids.
* ``on_train_epoch_start`` -- mode (off / soft / hard) and tau from the schedule.
* ``on_before_optimizer_step`` -- the method's gradient term (Deep k-Means' regulariser).
* ``on_train_epoch_end`` -- clustering metrics, logged with ``pl_module.log``; TensorBoard
  histograms of centroids and weights.
* ``on_fit_end`` -- finalize: snap, remove parametrizations, print and save the report.
* ``state_dict`` / ``load_state_dict`` -- what resuming needs beyond the model's own buffers.
* ``setup`` for validate/test/predict -- lets a mid-DKM checkpoint (``ckpt_path="best"``) load
  into a model that was already finalized: its weights arrive snapped to their centroids.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import uuid
import weakref
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.utils import parametrize

from ..engine.layout import ClusterSpec
from ..engine.palette import Palette
from ..engine.parametrization import check_gradient
from ..export.artifact import save_compressed
from ..export.report import CompressionReport
from ..model.attach import (
    ClusteredTensor,
    attach,
    checkpoint_clustered_names,
    clustered_tensors,
    finalize,
    register_load_pre_hook,
    release,
    snap_on_load,
)
from ..model.methods import (
    DEFAULT_REFRESH_EVERY,
    DEFAULT_REGULARIZATION,
    ClusteringMethod,
    MethodName,
    build_method,
)
from ..model.targets import DEFAULT_MIN_SIZE, Target, _spec_with_override, select_targets
from .convergence import measure_all
from .handoff import discard_handoff, read_handoff, write_handoff
from .temperature import TemperatureConfig, TemperaturePlan, geometric_mean

__all__ = ["DKMCallback"]

def _unsupported_strategies() -> list[tuple[type, str]]:
    """``(strategy class, why)`` for the strategies DKM refuses; checked with ``isinstance`` so
    that subclasses are refused too. DeepSpeed is optional in Lightning, hence the lookup."""
    from lightning.pytorch import strategies

    reasons = {
        "FSDPStrategy": "FSDP shards each weight across ranks, but DKM needs the whole tensor on "
        "every rank to compute its assignments and centroids",
        "DeepSpeedStrategy": "DeepSpeed ZeRO partitions parameters and wraps the optimizer, "
        "which the parametrizations are not yet adapted to",
        "ModelParallelStrategy": "tensor-parallel and FSDP2 weights are sharded across ranks; "
        "DKM needs whole tensors",
    }
    return [
        (getattr(strategies, name), why)
        for name, why in reasons.items()
        if isinstance(getattr(strategies, name, None), type)
    ]

_STATE_VERSION = 2
# The tau a parametrization holds before DKM starts (replaced by the plan's before it is used).
_INITIAL_TAU = 1e-2
_LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: File name of the compressed model written into ``save_dir``.
ARTIFACT_NAME = "model.dkm.safetensors"
#: The Core ML package written with ``export_coreml=True``.
COREML_NAME = "model.mlpackage"


def _pattern_list(label: str, patterns: str | list[str] | None) -> list[str] | None:
    """``targets`` / ``exclude`` as a list: one string is one pattern (never its characters)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(
            f"{label} must be non-empty strings (name globs or 're:' regexes); got {bad!r}"
        )
    return out


class DKMCallback(Callback):
    r"""Compress a model by train-time weight clustering (Differentiable K-Means).

    Add it to a ``Trainer``; the loss and the architecture stay as they are. During training
    every targeted weight is replaced by its soft-clustered form (DKM; or clustered by another
    ``method``); when fit ends the weights are snapped to their nearest centroid, so each palette
    holds at most ``2**bits`` values.

    Args:
        bits: bits per palette index (1..8): ``2**bits`` centroids per palette. Default 4.
        cluster_dim: length of the clustered vectors along the input-channel axis (1..8). An
            index then addresses a vector, so storage is ``bits / cluster_dim`` bits per weight.
            Default 1 (scalars).
        group_size: output channels that share a palette; ``None`` (default) gives one palette
            per tensor.
        per_channel_scale: divide each output channel by its own scale (its largest
            ``|weight|``, stored in the artifact with the palette: 2 bytes per channel) before
            clustering, so channels of very different magnitude share a palette well
            (coremltools' ``enable_per_channel_scale``). Default ``False``.
        targets: module or parameter name patterns to cluster (globs such as ``"features.*"``,
            or regexes prefixed ``"re:"``; one string is one pattern). Default ``None``: every
            Linear, Conv*, ConvTranspose*, Embedding and MultiheadAttention weight. A pattern
            that matches no supported weight is an error. A weight shared by several modules
            (tied) is clustered once; every owner reads the same clustered tensor.
        exclude: patterns removed from the selection; a pattern that matches no supported
            weight is an error. Default none.
        min_size: tensors with fewer elements stay in full precision (one warning lists them).
            Default 2048.
        overrides: ``pattern -> {bits, cluster_dim, group_size, per_channel_scale}`` for
            particular tensors, e.g.
            ``{"features.0": {"bits": 8}}``; the first matching pattern wins. An override that
            matches only tensors below ``min_size`` is not applied, with a warning. Default
            none.
        temperature: the softmax temperature tau and how it anneals
            (:mod:`lightning_dkm.lightning.temperature`). ``"auto"`` (default, also ``None``): for
            each
            tensor, tau is calibrated when DKM starts so that its soft assignments have mean
            entropy ``start_entropy * log2(k)`` bits (0.1: genuinely soft at every bit width),
            then annealed exponentially every optimizer step to the tau of ``end_entropy``
            bits (1e-2: near-hard, so finalize moves the weights little); this works for
            ``max_epochs=1`` and for ``max_steps``. A number is a constant tau, in units of
            each palette's weight variance. A mapping chooses: ``{schedule:
            constant|linear|exponential|cosine|step|<import.path>, start, end, interval:
            step|epoch, start_entropy, end_entropy, step_size, gamma}``; ``start`` / ``end``
            are numbers (variance units) or ``auto``; ``interval`` is how often tau moves
            (``step``, default, or ``epoch``); an import path names a callable ``unit -> tau``
            (a unit is a soft step or epoch). The progress bar's ``dkm/tau`` is the tau in
            force (the geometric mean over tensors).
        start_epoch: plain training before this epoch; DKM starts here (centroids are seeded
            from the weights as they are then). If fit ends before it (``max_epochs``,
            ``max_steps``, early stopping), the model is left as trained, unclustered, with a
            warning, and nothing is written. Default 0.
        hard_epoch: from this epoch on, hard nearest-centroid weights with straight-through
            gradients (centroids follow their members). Default ``None``: soft to the end.
            Only for ``method="dkm"``.
        max_iter: DKM iterations per forward pass. Default 3.
        epsilon: stop the iterations early once no centroid moves more than this many weight
            standard deviations; 0 always runs ``max_iter``. Default 1e-4.
        implementation: how the DKM step is computed. ``"auto"`` (default): per tensor,
            ``"unique"`` for scalar clustering (cluster_dim 1) of >= 16,384 weights per
            palette, else ``"reference"`` while the attention matrix is small (<= 2**20
            entries), else ``"chunked"``. ``"unique"`` (cluster_dim 1 only): the eDKM idea,
            the iterations run once per distinct float16 value of the normalised weights --
            the fastest by far on large tensors, exact DKM of the float16-rounded weights.
            ``"chunked"``: the iterations in cache-sized chunks with an analytic backward
            that recomputes the attention, so extra memory does not grow with ``max_iter``.
            ``"reference"``: plain autograd through the unrolled iterations (one ``n x k``
            attention matrix kept per iteration). ``"chunked"`` and ``"reference"`` give the
            same values and gradients up to float rounding. Timings:
            ``docs/benchmarks.md``.
        gradient: ``"unrolled"`` (default): backpropagate through every DKM iteration.
            ``"implicit"``: IDKM (arXiv 2312.07759), the gradient at the fixed point the
            iterations approach, from the last iteration's map and an adjoint solve, so the
            backward's work and memory do not depend on ``max_iter``; computed by the
            ``"unique"`` step (cluster_dim 1; ``implementation`` must be ``"auto"`` or
            ``"unique"``). Only for ``method="dkm"``.
        seed: seed of the k-means++ initialisation (the same on every rank). Default 0.
        finalize: snap the weights and remove the parametrizations when fit ends. Default True.
        save_dir: where the report and the artifact go; default: the trainer's ``log_dir``
            (or ``default_root_dir``) + ``/dkm``. Resolved and checked (a directory, created if
            missing, writable) in ``setup``, before training, on every rank.
        save_artifact: write the compressed model (``model.dkm.safetensors``: LUTs, bit-packed
            indices and every other tensor; see :func:`lightning_dkm.save_compressed`) when fit
            ends. Default True.
        export_coreml: also write ``model.mlpackage``, a Core ML ML program whose clustered
            weights are LUT ops (:func:`lightning_dkm.export.coreml.export_coreml`, traced on the
            module's ``example_input_array``; needs the ``coreml`` extra). Checked in ``setup``:
            without coremltools or ``example_input_array`` it fails before training. Default
            False.
        lut_dtype: precision of the stored palettes, ``"float16"`` (default) or ``"float32"``;
            the report's sizes count the same.
        log_histograms: TensorBoard histograms of centroids and weights every epoch. Default
            True (only with a ``TensorBoardLogger``).
        verbose: print the compression report at the end of fit. Default True.
        method: the train-time clustering method (:mod:`lightning_dkm.model.methods`); every method
            ends with the same finalize, palettes, report and artifact.
            ``"dkm"`` (default): Differentiable K-Means (soft, temperature schedule).
            ``"hard"``: nearest centroid with straight-through gradients, centroids moved to
            their members' means (TensorFlow Model Optimization's clustering) from
            ``start_epoch``; ``temperature`` only sets the tau at which the entropy metric is
            measured. ``"deep_kmeans"``: Deep k-Means (Wu et al., ICML 2018): weights train
            freely with ``regularization * 2 (w - mean of its cluster)`` added to their
            gradients, assignments refreshed every ``refresh_every`` optimizer steps,
            centroids refitted to the final weights before finalize.
        regularization: Deep k-Means' ``lambda`` (> 0), the weight of the k-means regulariser
            ``R = Tr(W^T W) - Tr(F^T W^T W F)`` (a sum over each palette's weights). Default
            1e-3. Only used by ``method="deep_kmeans"``.
        refresh_every: optimizer steps between Deep k-Means' assignment refreshes (>= 1).
            Default 50. Only used by ``method="deep_kmeans"``.
    """

    def __init__(
        self,
        bits: int = 4,
        cluster_dim: int = 1,
        group_size: int | None = None,
        per_channel_scale: bool = False,
        targets: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
        overrides: dict[str, dict[str, int | bool | None]] | None = None,
        temperature: float | str | dict[str, Any] | None = None,
        start_epoch: int = 0,
        hard_epoch: int | None = None,
        max_iter: int = 3,
        epsilon: float = 1e-4,
        implementation: Literal["auto", "unique", "chunked", "reference"] = "auto",
        gradient: Literal["unrolled", "implicit"] = "unrolled",
        seed: int = 0,
        finalize: bool = True,
        save_dir: str | None = None,
        save_artifact: bool = True,
        export_coreml: bool = False,
        lut_dtype: Literal["float16", "float32"] = "float16",
        log_histograms: bool = True,
        verbose: bool = True,
        method: MethodName = "dkm",
        regularization: float = DEFAULT_REGULARIZATION,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
    ) -> None:
        super().__init__()
        self.method = method
        self._method: ClusteringMethod = build_method(
            method, regularization=regularization, refresh_every=refresh_every
        )
        self.regularization = float(regularization)
        self.refresh_every = refresh_every
        self.spec = ClusterSpec(bits=bits, cluster_dim=cluster_dim, group_size=group_size,
                                per_channel_scale=per_channel_scale)
        self.targets = _pattern_list("targets", targets)
        self.exclude = _pattern_list("exclude", exclude)
        if not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size must be an int >= 0; got {min_size!r}")
        self.min_size = min_size
        self.overrides = dict(overrides or {})
        for pattern, override in self.overrides.items():
            _spec_with_override(self.spec, pattern, override)  # early, clear errors
        #: The validated temperature (a :class:`~.temperature.TemperatureConfig`).
        self.temperature = TemperatureConfig.parse(temperature)
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0; got {start_epoch!r}")
        if hard_epoch is not None and (not isinstance(hard_epoch, int) or hard_epoch < start_epoch):
            raise ValueError(
                f"hard_epoch must be None or an int >= start_epoch ({start_epoch}); "
                f"got {hard_epoch!r}"
            )
        if hard_epoch is not None and method != "dkm":
            raise ValueError(
                f"hard_epoch={hard_epoch!r} only applies to method='dkm'; got method={method!r}"
            )
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1; got {max_iter!r}")
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0; got {epsilon!r}")
        self.start_epoch = start_epoch
        self.hard_epoch = hard_epoch
        self.max_iter = max_iter
        self.epsilon = float(epsilon)
        if implementation not in ("auto", "unique", "chunked", "reference"):
            raise ValueError(
                "implementation must be 'auto', 'unique', 'chunked' or 'reference'; got "
                f"{implementation!r}"
            )
        self.implementation = implementation
        check_gradient(gradient, implementation, "DKMCallback")
        if gradient == "implicit" and (cluster_dim != 1 or method != "dkm"):
            raise ValueError(
                "DKMCallback: gradient='implicit' needs method='dkm' and cluster_dim=1; got "
                f"method={method!r}, cluster_dim={cluster_dim!r}"
            )
        self.gradient = gradient
        self._forward_cache: ExitStack | None = None  # parametrize.cached() of the forward
        self.seed = int(seed)
        self.finalize = finalize
        self.save_dir = save_dir
        self.save_artifact = save_artifact
        if not isinstance(export_coreml, bool):
            raise ValueError(f"export_coreml must be True or False; got {export_coreml!r}")
        self.export_coreml = export_coreml
        if lut_dtype not in _LUT_DTYPES:
            raise ValueError(f"lut_dtype must be one of {tuple(_LUT_DTYPES)}; got {lut_dtype!r}")
        self.lut_dtype = lut_dtype
        self.log_histograms = log_histograms
        self.verbose = verbose

        self._names: list[str] = []
        self._plan = TemperaturePlan(self.temperature)
        self._taus: dict[str, float] = {}  # the tau in force per tensor
        self._start_step = 0  # the optimizer step at which DKM starts (interval "step")
        self._finalized = False
        self._out_dir: Path | None = None
        self._selection_check: Any = None  # the load_state_dict pre-hook of a fit
        # ddp_spawn runs fit in worker processes that receive a pickled copy of this callback;
        # rank 0 leaves its results in this file for the copy in the launching process.
        self._launcher_pid = os.getpid()
        self._handoff_path = Path(tempfile.gettempdir()) / (
            f"lightning_dkm-{self._launcher_pid}-{uuid.uuid4().hex}.pt"
        )
        weakref.finalize(self, discard_handoff, self._handoff_path, self._launcher_pid)
        self._stats: dict[str, dict[str, float]] = {}
        self._palettes: dict[str, Palette] = {}
        self._report: CompressionReport | None = None
        self._output_paths: dict[str, Path] = {}

    # -- results (also in the process that launched a ddp_spawn fit) ------------------------------
    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-tensor statistics from the last measured epoch (name -> metric -> value)."""
        self._take_handoff()
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, dict[str, float]]) -> None:
        self._stats = value

    @property
    def palettes(self) -> dict[str, Palette]:
        """The palettes (LUT + indices) produced by finalize, by parameter name."""
        self._take_handoff()
        return self._palettes

    @palettes.setter
    def palettes(self, value: dict[str, Palette]) -> None:
        self._palettes = value

    @property
    def report(self) -> CompressionReport | None:
        """The :class:`~lightning_dkm.export.report.CompressionReport` after fit (``None``
        before)."""
        self._take_handoff()
        return self._report

    @report.setter
    def report(self, value: CompressionReport | None) -> None:
        self._report = value

    @property
    def output_paths(self) -> dict[str, Path]:
        """What fit wrote: ``{"json": ..., "markdown": ..., "artifact": ...}`` (empty before)."""
        self._take_handoff()
        return self._output_paths

    @output_paths.setter
    def output_paths(self, value: dict[str, Path]) -> None:
        self._output_paths = dict(value)

    @property
    def artifact_path(self) -> Path | None:
        """The compressed model written at fit end (``None`` before, or without an artifact)."""
        return self.output_paths.get("artifact")

    def _take_handoff(self) -> None:
        """In the launching process of a ddp_spawn fit, adopt what rank 0 left behind."""
        if os.getpid() != self._launcher_pid or not self._handoff_path.is_file():
            return
        handoff = read_handoff(self._handoff_path)
        self._handoff_path.unlink(missing_ok=True)
        self._output_paths = handoff["paths"]
        self._palettes = handoff["palettes"]
        self._stats = handoff["stats"]
        self._report = CompressionReport.load(self._output_paths["json"])
        self._finalized = True

    # -- identity and state --------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            bits=self.spec.bits,
            cluster_dim=self.spec.cluster_dim,
            group_size=self.spec.group_size,
            targets=self.targets,
            exclude=self.exclude,
            # only when set, so the key (and old checkpoints' state) stays as it was otherwise
            **({"per_channel_scale": True} if self.spec.per_channel_scale else {}),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "names": list(self._names),
            "temperature": self._plan.state_dict(),
            "finalized": self._finalized,
            "method": self.method,
            "method_state": self._method.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = list(state_dict.get("names", []))
        if self._names and names and names != self._names:
            raise MisconfigurationException(
                "DKMCallback: the checkpoint clusters "
                f"{names}, but this callback's targets select {self._names}; resume with the "
                "same targets / exclude / min_size as the run that wrote the checkpoint"
            )
        if "temperature" in state_dict:  # version 1 had one tau, from the config's numbers
            self._plan.load_state_dict(state_dict["temperature"])
        self._finalized = bool(state_dict.get("finalized", False))
        method = state_dict.get("method", "dkm")
        if method != self.method:
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint was written with method={method!r}, but this "
                f"callback uses method={self.method!r}; resume with the same method"
            )
        self._method.load_state_dict(state_dict.get("method_state", {}))

    # -- helpers ---------------------------------------------------------------------------------
    def _select(self, pl_module: pl.LightningModule) -> list[Target]:
        return select_targets(
            pl_module,
            self.spec,
            targets=self.targets,
            exclude=self.exclude,
            min_size=self.min_size,
            overrides=self.overrides,
        )

    def _tensors(self, pl_module: pl.LightningModule) -> dict[str, ClusteredTensor]:
        return clustered_tensors(pl_module, self._names)

    def _attach(self, pl_module: pl.LightningModule, selected: list[Target], init: bool) -> None:
        others = set(clustered_tensors(pl_module)) - set(self._names)
        clash = [t.name for t in selected if t.name in others]
        if clash:
            raise MisconfigurationException(
                f"DKMCallback: {clash} are already clustered by another DKMCallback; give each "
                "callback disjoint targets (use `exclude`)"
            )
        attach(
            pl_module,
            selected,
            temperature=_INITIAL_TAU,
            max_iter=self.max_iter,
            epsilon=self.epsilon,
            seed=self.seed,
            mode="dense",
            initialize=init,
            implementation=self.implementation,
            gradient=self.gradient,
        )
        self._names = [t.name for t in selected]

    def _check_limits(self, trainer: pl.Trainer) -> None:
        """At ``setup``: what the Trainer's limits make of ``start_epoch`` and the temperature
        schedule (errors and warnings name ``max_epochs`` / ``max_steps``)."""
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and 0 <= max_epochs <= self.start_epoch:
            rank_zero_warn(
                f"DKMCallback: max_epochs={max_epochs} <= start_epoch={self.start_epoch}, so DKM "
                "never starts and the model will not be clustered; raise max_epochs or lower "
                "start_epoch"
            )
        config = self.temperature
        if not (config.anneals and self._method.uses_temperature):
            return
        last = self.hard_epoch if self.hard_epoch is not None else max_epochs
        open_epochs = last is None or last < 0
        if open_epochs and (config.interval == "epoch" or max_steps is None or max_steps < 0):
            unit = "per epoch" if config.interval == "epoch" else "per step"
            raise MisconfigurationException(
                f"DKMCallback: the {config.schedule!r} temperature schedule anneals tau from "
                f"start to end over the soft DKM {unit[4:]}s, but the Trainer sets no limit "
                f"(max_epochs={max_epochs}, max_steps={max_steps}); set max_epochs or max_steps "
                "(or hard_epoch), or use a constant temperature (temperature: 1.0e-3)."
            )
        if config.interval == "epoch" and not open_epochs and last - self.start_epoch == 1:
            rank_zero_warn(
                f"DKMCallback: only one soft DKM epoch (max_epochs={max_epochs}, "
                f"start_epoch={self.start_epoch}, hard_epoch={self.hard_epoch}) with "
                "temperature interval 'epoch': tau changes once per epoch, so it stays at its "
                "start for the whole fit and never anneals. Use interval: step (the default)."
            )

    def _soft_units(self, trainer: pl.Trainer) -> int | None:
        """At train start (the dataloaders are known): the soft units (steps or epochs) the
        schedule spans, ``None`` when open-ended; sets the step at which DKM starts."""
        if self.temperature.interval == "epoch":
            last = self.hard_epoch if self.hard_epoch is not None else trainer.max_epochs
            return None if last is None or last < 0 else max(last - self.start_epoch, 1)
        batches = trainer.num_training_batches
        per_epoch = (
            math.inf if math.isinf(batches)
            else math.ceil(batches / max(trainer.accumulate_grad_batches, 1))
        )
        if math.isinf(per_epoch) and (self.start_epoch or self.hard_epoch is not None):
            raise MisconfigurationException(
                "DKMCallback: temperature interval 'step' with start_epoch / hard_epoch needs "
                "a train dataloader of known length (steps per epoch); use interval: epoch"
            )
        self._start_step = 0 if math.isinf(per_epoch) else self.start_epoch * per_epoch
        end = (
            self.hard_epoch * per_epoch if self.hard_epoch is not None
            else trainer.estimated_stepping_batches
        )
        return None if math.isinf(end) else max(int(end) - self._start_step, 1)

    def _begin(self, tensors: dict[str, ClusteredTensor]) -> None:
        """DKM starts: seed the centroids still unseeded, then fix each tensor's tau bounds."""
        for tensor in tensors.values():
            if not tensor.parametrization.is_initialized:
                tensor.parametrization.initialize(tensor.original.detach())
        self._plan.calibrate({
            name: (t.parametrization.to_palettes(t.original.detach()),
                   t.parametrization.centroids)
            for name, t in tensors.items() if name not in self._plan.bounds
        })

    def _set_taus(self, tensors: dict[str, ClusteredTensor], unit: int) -> None:
        try:
            self._taus = self._plan.taus(unit)
        except ValueError as err:
            raise MisconfigurationException(f"DKMCallback temperature: {err}") from err
        for name, tensor in tensors.items():
            tensor.parametrization.set_temperature(self._taus[name])

    def _mode_for_epoch(self, epoch: int) -> str:
        return self._method.mode_for_epoch(epoch, self.start_epoch, self.hard_epoch)

    def _active(self, epoch: int) -> bool:
        """Whether clustering runs in ``epoch`` (Deep k-Means is active in mode "dense")."""
        return epoch >= self.start_epoch

    def _resolve_save_dir(self, trainer: pl.Trainer) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "dkm"

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            if not self._tensors(pl_module):
                snap_on_load(pl_module)  # e.g. test(ckpt_path="best") after finalize
            return
        for strategy_type, why in _unsupported_strategies():
            if isinstance(trainer.strategy, strategy_type):
                raise MisconfigurationException(
                    f"DKMCallback does not support {type(trainer.strategy).__name__} yet: "
                    f"{why}. Use a single device, 'ddp' or 'ddp_spawn'."
                )
        # Every rank resolves the output directory here: ``trainer.log_dir`` broadcasts, so it
        # must not be reached by rank 0 alone at fit end. Checking it now means a bad save_dir
        # fails before training, not after it.
        self._out_dir = self._resolve_save_dir(trainer) if self.finalize else None
        if self._out_dir is not None:
            _check_writable_dir(self._out_dir, "save_dir" if self.save_dir is not None else None)
        if self.export_coreml:
            _check_coreml_export(pl_module)
        self._check_limits(trainer)
        self._plan = TemperaturePlan(self.temperature)
        selected = self._select(pl_module)
        if not selected:
            rank_zero_warn(
                "DKMCallback: no tensor is left to cluster (all matches are smaller than "
                f"min_size={self.min_size} or excluded); training runs without DKM"
            )
        # Seed now (before DDP wraps the model) when DKM starts at once; otherwise at start_epoch
        # from the weights as they are then. Either way every rank computes the same centroids.
        self._attach(pl_module, selected, init=self.start_epoch == 0)
        if self.start_epoch == 0:
            self._begin(self._tensors(pl_module))
        self._finalized = False
        self._remove_selection_check()
        self._selection_check = register_load_pre_hook(pl_module, self._check_selection)

    def _check_selection(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        """Before a checkpoint's weights load into the parametrized model (``fit(ckpt_path=)``,
        which restores the model before any callback state): the checkpoint must cluster the
        same tensors as the model, else a clear error instead of torch's list of keys."""
        if prefix:
            return
        in_checkpoint = sorted(checkpoint_clustered_names(state_dict))
        in_model = sorted(clustered_tensors(module))
        if in_checkpoint != in_model:
            hint = (
                " The checkpoint was written without DKM: load its weights into the model "
                "before fit (model.load_state_dict) instead of passing ckpt_path."
                if not in_checkpoint
                else ""
            )
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint clusters {in_checkpoint}, but this run's targets "
                f"select {in_model}; resume with the same targets / exclude / min_size / "
                f"overrides as the run that wrote the checkpoint.{hint}"
            )

    def _remove_selection_check(self) -> None:
        if self._selection_check is not None:
            self._selection_check.remove()
            self._selection_check = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_selection_check()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan.set_units(self._soft_units(trainer))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        mode = self._mode_for_epoch(epoch)
        tensors = self._tensors(pl_module)
        uses_tau = self._method.uses_temperature
        if self._active(epoch) and tensors:
            self._begin(tensors)
            if not uses_tau:  # tau only sets where the entropy metric is measured: the start
                self._set_taus(tensors, 0)
            elif self.temperature.interval == "epoch":
                self._set_taus(tensors, epoch - self.start_epoch)
        for tensor in tensors.values():
            tensor.parametrization.set_mode(mode)  # type: ignore[arg-type]
        if uses_tau and mode != "dense" and self._taus and self.temperature.interval == "epoch":
            pl_module.log(
                "dkm/tau", geometric_mean(self._taus), on_step=False, on_epoch=True,
                prog_bar=True, sync_dist=True,
            )

    def _step_taus(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Interval "step": every tensor's tau for this optimizer step, shown in the progress
        bar (the geometric mean over tensors; every rank holds the same values)."""
        if (
            self.temperature.interval != "step"
            or not self._method.uses_temperature
            or self._mode_for_epoch(trainer.current_epoch) != "soft"
        ):
            return
        tensors = self._tensors(pl_module)
        if not tensors:
            return
        self._set_taus(tensors, max(trainer.global_step - self._start_step, 0))
        pl_module.log("dkm/tau", geometric_mean(self._taus), on_step=True, on_epoch=False,
                      prog_bar=True)

    # -- one DKM step per forward -----------------------------------------------------------
    # A module may read its weight more than once in a forward (nn.TransformerEncoderLayer reads
    # the attention weights for its fast-path check, tied or shared weights, RNN kernels); each
    # read of a parametrized weight would run DKM again. Within a training step's forward the
    # weights do not change, so the parametrization cache (``parametrize.cached``) serves every
    # read after the first. It is dropped before the backward, so nothing cached outlives the
    # step (gradient accumulation and manual optimisation included).
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._release_forward_cache()
        self._step_taus(trainer, pl_module)
        if self._names:
            self._forward_cache = ExitStack()
            self._forward_cache.enter_context(parametrize.cached())

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._release_forward_cache()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        self._release_forward_cache()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release_forward_cache()

    def _release_forward_cache(self) -> None:
        if self._forward_cache is not None:
            self._forward_cache.close()
            self._forward_cache = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not self._names or not self._active(trainer.current_epoch):
            return
        self._method.on_before_optimizer_step(self._tensors(pl_module), optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer.current_epoch):
            return
        tensors = self._tensors(pl_module)
        if not tensors:
            return
        self.stats, model_entropy = measure_all(tensors)
        log = {"dkm/entropy": model_entropy}
        for name, values in self.stats.items():
            for key, value in values.items():
                log[f"dkm/{key}/{name}"] = value
        for key, value in log.items():
            # sync_dist: every rank holds the same value, so the mean is exact and cheap.
            pl_module.log(
                key, value, on_step=False, on_epoch=True, prog_bar=key == "dkm/entropy",
                sync_dist=True,
            )
        if self.log_histograms:
            self._log_histograms(trainer, tensors)

    def _log_histograms(self, trainer: pl.Trainer, tensors: dict[str, ClusteredTensor]) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            for name, tensor in tensors.items():
                step = trainer.global_step
                writer.add_histogram(
                    f"dkm_centroids/{name}", tensor.parametrization.centroids.float().cpu(), step
                )
                writer.add_histogram(
                    f"dkm_weights/{name}", tensor.original.detach().float().cpu(), step
                )

    def _log_report(self, trainer: pl.Trainer) -> None:
        """The compression totals as ``dkm_report/*`` scalars to every logger, and the Markdown
        report as TensorBoard text, where users look."""
        assert self.report is not None
        totals = self.report.totals()
        metrics = {f"dkm_report/{key}": float(totals[key]) for key in (
            "total_bytes", "clustered_bytes", "fp32_bytes", "ratio_vs_fp32", "ratio_vs_fp16")}
        metrics["dkm_report/bits_per_clustered_weight"] = (
            8.0 * self.report.clustered_bytes / max(self.report.clustered_parameters, 1))
        if self.report.energy is not None:
            metrics["dkm_report/estimated_energy_ratio"] = float(
                self.report.energy.estimated_energy_ratio)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("dkm_report", self.report.to_markdown(),
                                           trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalize or not self._names or self._finalized:
            return
        tensors = self._tensors(pl_module)
        if not tensors:
            return
        if not all(t.parametrization.is_initialized for t in tensors.values()):
            # Fit ended (max_epochs, max_steps, early stopping, an interrupt) before DKM began:
            # there are no centroids to snap to. Leave the model as trained, never damaged.
            release(pl_module, self._names)
            self._names = []
            rank_zero_warn(
                f"DKMCallback: fit ended at epoch {trainer.current_epoch} (global step "
                f"{trainer.global_step}) before DKM started (start_epoch={self.start_epoch}), so "
                "the model was NOT clustered: its weights stay as trained, in full precision, "
                "and no report or artifact was written. Train past start_epoch (max_epochs / "
                "max_steps) or lower start_epoch."
            )
            return
        self._method.before_finalize(tensors)
        self.stats, _ = measure_all(tensors)
        self.palettes = finalize(pl_module, self._names)
        snap_on_load(pl_module)  # mid-DKM checkpoints (ckpt_path="best") still load
        self._finalized = True
        self._write_outputs(trainer, pl_module)

    def _write_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final_stats = {
            name: {"entropy_bits": values["entropy"], "snap_rmse": values["snap_rmse"]}
            for name, values in self.stats.items()
        }
        lut_dtype = _LUT_DTYPES[self.lut_dtype]
        self.report = CompressionReport.build(
            pl_module,
            self.palettes,
            lut_dtype=lut_dtype,
            stats=final_stats,
            example_input=getattr(pl_module, "example_input_array", None),
        )
        if trainer.global_rank != 0:
            return
        self._log_report(trainer)
        assert self._out_dir is not None  # resolved in setup whenever finalize is on
        paths = dict(self.report.save(self._out_dir))
        if self.save_artifact:
            paths["artifact"] = save_compressed(
                pl_module, self._out_dir / ARTIFACT_NAME, self.palettes, lut_dtype=lut_dtype
            )
        if self.export_coreml:
            from ..export.coreml import export_coreml

            example = _to_cpu(pl_module.example_input_array)
            # coremltools reads the weights as numpy arrays: trace a CPU copy if need be
            module = pl_module if pl_module.device.type == "cpu" else copy.deepcopy(
                pl_module).cpu()
            paths["coreml"] = export_coreml(module, self._out_dir / COREML_NAME, example)
        self.output_paths = paths
        if os.getpid() != self._launcher_pid:
            # A spawned worker (ddp_spawn): the process that called fit holds another copy of
            # this callback and gets only the weights back; leave it what it needs.
            write_handoff(self._handoff_path, paths, self.palettes, self.stats)
        if self.verbose:
            rank_zero_info("\n" + self.report.to_table())
            rank_zero_info(f"DKM outputs written to {', '.join(str(p) for p in paths.values())}")


# -- module helpers ------------------------------------------------------------------------------
def _check_coreml_export(pl_module: pl.LightningModule) -> None:
    """``export_coreml=True`` can work: coremltools imports and the module has an
    ``example_input_array`` to trace with; else a ``MisconfigurationException`` before training."""
    from ..export.coreml import require_coremltools

    try:
        require_coremltools()
    except ImportError as err:
        raise MisconfigurationException(
            'DKMCallback(export_coreml=True) needs coremltools: pip install '
            '"lightning-dkm[coreml]"'
        ) from err
    example = getattr(pl_module, "example_input_array", None)
    if example is None or isinstance(example, dict):
        raise MisconfigurationException(
            "DKMCallback(export_coreml=True) traces the model on its example_input_array; "
            f"{type(pl_module).__name__} has "
            + ("none: set self.example_input_array" if example is None else
               "a dict, which Core ML export cannot trace: use a tensor or a tuple")
        )


def _to_cpu(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example.cpu()
    return tuple(_to_cpu(e) for e in example)


def _check_writable_dir(path: Path, argument: str | None) -> None:
    """``path`` is a directory this process can write into (created if missing), else a
    ``MisconfigurationException`` that names ``argument`` (``save_dir``) and the path."""
    label = f"save_dir={str(path)!r}" if argument else f"the default output directory {path}"
    fix = "pass a writable directory as save_dir" if argument else "pass save_dir"
    if path.exists() and not path.is_dir():
        raise MisconfigurationException(
            f"DKMCallback: {label} is a file, not a directory; {fix}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MisconfigurationException(
            f"DKMCallback: {label} cannot be created ({err.strerror or err}); {fix}"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise MisconfigurationException(f"DKMCallback: {label} is not writable; {fix}")
