"""``DKMCallback``: the Lightning lifecycle glue around the DKM engine.

Hooks, one concern each; the work is in the modules they call: :mod:`.arguments` (the
constructor's checks), :mod:`.preflight` (the Trainer's, at setup), :mod:`.timeline` (modes and
tau), :mod:`.forward_cache`, :mod:`~lightning_dkm.engine.snap_cache` (each weight snapped once
per validation / test / predict loop), :mod:`.checkpointing` (plain weights in checkpoints, the
DKM state beside them), :mod:`.outputs` (metrics, report, artifact, results). ``setup("fit")``
registers the parametrizations before ``configure_optimizers`` and before DDP wraps the model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..engine.layout import ClusterSpec
from ..engine.palette import LUT_DTYPES, LutDtype, Palette, lut_dtype_name
from ..engine.snap_cache import SnapCache
from ..export.artifact import save_compressed
from ..export.report import CompressionReport
from ..model.attach import (
    ClusteredTensor,
    attach,
    clustered_tensors,
    finalize,
    release,
    set_mode,
)
from ..model.bit_budget import BUDGET_OF_BITS, BitAllocation, fixed_by_overrides
from ..model.methods import DEFAULT_REFRESH_EVERY, DEFAULT_REGULARIZATION, ClusteringMethod
from ..model.snapping import snap_on_load
from ..model.targets import DEFAULT_MIN_SIZE, Target, pattern_list, select_targets
from . import outputs
from .arguments import (
    DEFAULT_BITS,
    TemperatureArgument,
    check_arguments,
    check_callback_budget,
    check_method_options,
    parse_temperature,
    resolve_method,
)
from .bit_widths import (
    FULLY_SHARDED_WIDTHS,
    log_allocation,
    plan_fit_widths,
    warn_if_allocated_otherwise,
)
from .checkpointing import DKMCheckpointing, selection_error
from .convergence import measure_all
from .forward_cache import ForwardCache
from .fully_sharded import FullySharded
from .outputs import ARTIFACT_NAME, COREML_NAME, DKMResults
from .ownership import SaveDirLock, claim_save_dir
from .preflight import check_export_widths, check_fit, is_fully_sharded, warn_if_in_eval_mode
from .temperature import TemperatureConfig
from .timeline import DKMTimeline

__all__ = ["ARTIFACT_NAME", "COREML_NAME", "DKMCallback"]

_STATE_VERSION = 1
# The tau a parametrization holds before DKM starts (replaced by the plan's before it is used).
_INITIAL_TAU = 1e-2


class DKMCallback(Callback):
    r"""Compress a model by train-time weight clustering (Differentiable K-Means).

    Add it to a ``Trainer``; the loss and the architecture stay as they are. During training
    every targeted weight is replaced by its soft-clustered form (DKM; or clustered by another
    ``method``); when fit ends the weights are snapped to their nearest centroid, so each palette
    holds at most ``2**bits`` values.

    Checkpoints written during fit load anywhere: their ``state_dict`` is the plain model's (each
    clustered weight under its own name, snapped to its current centroids), so
    ``Model().load_state_dict(checkpoint["state_dict"])`` needs no lightning_dkm; the DKM state a
    resume needs (originals, centroids, tau, scales, carried palettes) is in
    ``checkpoint["callbacks"][state_key]["model"]``, and ``fit(ckpt_path=...)`` resumes exactly.

    Runs under ``ddp``, ``ddp_spawn`` and FSDP2 (``ModelParallelStrategy`` with
    ``tensor_parallel_size=1`` and ``fully_shard`` in ``configure_model``, on layers created in
    ``__init__``); FSDP1, DeepSpeed and tensor parallelism are refused at ``setup``. Under FSDP2
    checkpoints keep the model's own (DKM) keys, full or sharded, and after fit
    ``finalized_model`` on rank 0 is the plain finalized model rebuilt from the shards (the
    report and the artifact come from it). See ``docs/distributed.md``.

    What fit produced is in ``results`` (a :class:`~lightning_dkm.lightning.outputs.DKMResults`),
    also read as the callback's ``stats``, ``palettes``, ``report``, ``output_paths``,
    ``artifact_path`` and ``finalized_model``; after a ``ddp_spawn`` fit, in the process that
    called fit too (rank 0's).

    Args:
        bits: bits per palette index (1..8): ``2**bits`` centroids per palette, on average
            over the tensors at the default ``average_bits="bits"``, for every tensor with
            ``average_bits=None``. Default ``None``: 4 (or, with a numeric ``average_bits``,
            that budget; then ``bits`` must stay ``None``).
        average_bits: the budget of per-tensor widths (1..8), chosen when DKM starts so that
            the clustered bytes (indices at their packed width, LUTs, scales: as the report
            counts them) stay within it, minimising the estimated loss increase: each tensor's
            k-means error at every width, weighted by the Hessian diagonal (Hutchinson) of
            ``training_step``'s loss on the first 8 samples of the first training batch
            (:mod:`lightning_dkm.model.bit_budget`). Default ``"bits"``: the bytes of every
            tensor at its configured width (``bits``, or an override's own ``bits``, which
            stays fixed). A number in [1, 8]: the bytes of every tensor at that width (a
            fraction, 2.5, lies between the budgets of the widths around it; an override's
            fixed bytes count against it). ``None``: no budget, every tensor at ``bits``.
            Where the loss has no double backward (a fused or custom kernel) the Hessian comes
            from finite differences of gradients instead; without a training dataloader at
            setup, with manual optimization, or under FSDP2 (where the widths would have to be
            chosen before the model is sharded) every tensor gets the budget's width, with a
            warning (a fraction: the widths around it, every tensor at
            least the narrower). The widths are chosen at ``setup`` from the weights as they
            are then (also with ``start_epoch > 0``), on rank 0 and broadcast; they are
            logged (TensorBoard text ``dkm/bit_allocation``, the report's
            ``bit_allocation``), saved in checkpoints and kept on resume (a checkpoint
            without an allocation resumes at its uniform widths; one whose allocation was made
            with another ``average_bits``, ``allowed_bits``, ``lut_dtype`` or ``overrides``
            resumes at its widths with one warning naming them). On by default because in
            the accuracy study it beats uniform widths at fewer bytes at 2 bits on the
            char-LM and MiniLM's whole encoder and is never worse at 3 and 4
            (``docs/results.md``).
        allowed_bits: the widths ``average_bits`` may choose. Default ``None``: 1..8, or with
            ``export_coreai=True`` the widths Core AI packs, 1, 2, 4, 6, 8.
        cluster_dim: length of the clustered vectors along the input-channel axis (1..8). An
            index then addresses a vector, so storage is ``bits / cluster_dim`` bits per weight.
            Default 1 (scalars).
        group_size: output channels that share a palette; ``None`` (default) gives one palette
            per tensor.
        per_channel_scale: divide each output channel by its own scale (its largest
            ``|weight|``, stored in the artifact with the palette: 2 bytes per channel) before
            clustering, so channels of very different magnitude share a palette well
            (coremltools' ``enable_per_channel_scale``). Default ``False``.
        targets: which weights to cluster, as PEFT's ``target_modules``; one string is one
            pattern. Each pattern is matched against the qualified names of every supported
            module and of its weight; a matching module selects its weight. A bare name (no
            dot, no ``*?[``) matches at any depth: ``"q_proj"`` selects
            ``encoder.layer.0.attention.q_proj`` and every other ``q_proj``,
            ``"in_proj_weight"`` every MultiheadAttention's packed weight (whole components
            only: ``"proj"`` does not select ``q_proj``). Anything else is a glob on the whole name
            (``"features.*"``, ``"*.fc"``; ``"features.0"`` is exact) or, prefixed ``"re:"``,
            a regex on the whole name. Default ``None``: every Linear, Conv*, ConvTranspose*,
            Embedding and MultiheadAttention weight. A pattern that matches no supported weight
            is an error, and so is an empty list (it would cluster nothing). A weight shared by
            several modules (tied) is clustered once; every owner reads the same clustered
            tensor.
        exclude: patterns (as in ``targets``) removed from the selection; a pattern that matches
            no supported weight is an error. Default none (``None``; an empty list is the same).
        min_size: tensors with fewer elements stay in full precision (one warning lists them).
            Default 2048.
        overrides: ``pattern -> {bits, cluster_dim, group_size, per_channel_scale}`` for
            particular tensors (patterns as in ``targets``), e.g. ``{"classifier": {"bits":
            8}}``; the first matching pattern wins. An override that matches only tensors below
            ``min_size`` is not applied, with a warning. Default none.
        temperature: the softmax temperature tau and how it anneals
            (:mod:`lightning_dkm.lightning.temperature`). ``"auto"`` (default, also ``None``): for
            each tensor, tau is calibrated when DKM starts so that its soft assignments have mean
            entropy ``start_entropy * log2(k)`` bits (0.1: genuinely soft at every bit width),
            then annealed exponentially every optimizer step to the tau of ``end_entropy``
            bits (1e-2: near-hard, so finalize moves the weights little; at most half of
            ``log2(k)``, with a warning naming the tensors it caps); this works for
            ``max_epochs=1`` and for ``max_steps``. A number is a constant tau, in units of
            each palette's weight variance. A mapping chooses: ``{schedule:
            constant|linear|exponential|cosine|step|<import.path>, start, end, interval:
            step|epoch, start_entropy, end_entropy, step_size, gamma}``; ``start`` / ``end``
            are numbers (variance units) or ``auto``; ``interval`` is how often tau moves
            (``step``, default, or ``epoch``); an import path names a callable ``unit -> tau``
            (a unit is a soft step or epoch, counted from the first). An object works as that
            import path: a :class:`~lightning_dkm.lightning.schedules.TemperatureSchedule`
            (e.g. ``ExponentialSchedule(start=1e-1, end=1e-3, num_units=1000)``; in YAML a
            ``class_path`` / ``init_args`` mapping) or any callable ``unit -> tau``, per step,
            or per epoch as ``{schedule: <object>, interval: epoch}``; it is called with unit
            0 at construction to check it. A callable is not saved in checkpoints: after a
            resume tau is the callable of the restored step, so it must be a pure function of
            the unit (and picklable for ``ddp_spawn``). ``dkm/tau`` is the tau in force (the
            geometric mean over tensors), logged at the steps the loggers write and at each
            epoch's first and last batch (the progress bar shows the latest).
        start_epoch: plain training before this epoch; DKM starts here (centroids are seeded
            from the weights as they are then). If fit ends before it (``max_epochs``,
            ``max_steps``, early stopping), the model is left as trained, unclustered, with a
            warning, and nothing is written. Default 0.
        hard_epoch: from this epoch on, hard nearest-centroid weights with straight-through
            gradients (centroids follow their members). Default ``None``: soft to the end.
            Only for ``method="dkm"``.
        max_iter: DKM iterations per forward pass. Default 3.
        epsilon: stop the iterations early once no centroid moves more than this many weight
            standard deviations; a finite number >= 0 (0 always runs ``max_iter``). Default 1e-4.
        implementation: how the DKM step is computed. ``"auto"`` (default): per tensor,
            ``"unique"`` for scalar clustering (cluster_dim 1) of >= 16,384 weights per
            palette, else ``"chunked"`` (exact, and faster than ``"reference"`` at every
            size); in a training step such a small scalar tensor joins the batch of the
            model's ``"unique"`` tensors on its float16 codes, where that is cheaper than its
            own call. ``"unique"`` (cluster_dim 1 only): the eDKM idea, the iterations run once
            per distinct float16 value of the normalised weights -- the fastest by far on
            large tensors, exact DKM of the float16-rounded weights.
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
            weighted DKM core, i.e. the ``"unique"`` and ``"chunked"`` steps (``"auto"`` then
            never picks ``"reference"``; ``implementation="reference"`` is an error). Only for
            ``method="dkm"``.
        seed: seed of the k-means++ initialisation of vector palettes (``cluster_dim > 1``;
            scalar palettes start from the optimal k-means, which needs none); the same on every
            rank. Default 0.
        finalize: snap the weights and remove the parametrizations when fit ends. Default True.
        save_dir: where the report and the artifact go; default: the trainer's ``log_dir``
            (or ``default_root_dir``) + ``/dkm``. Resolved once in ``setup`` (``~`` expanded,
            made absolute: fit end writes there even if the working directory changes) and
            checked before training: a directory, created if missing, writable, no directory
            or other non-file where an output goes, room for the outputs (``1.1 x outputs x
            fp32 bytes of the model + 1 MiB``), and no other fit using it: the fit owns it
            until it ends (a lock file, ``.lightning_dkm.lock``), and a second fit on it is
            refused at ``setup``, naming the first (:mod:`lightning_dkm.lightning.ownership`).
            A fit replaces the outputs of the fit before it: what that fit wrote and this one
            does not (the artifact with ``save_artifact=False``, a package whose export is off
            or failed) is removed at fit end, named in an info line, as its report recorded
            it; a file there that no earlier report records is left, with a warning
            (:func:`lightning_dkm.lightning.outputs.settle_earlier_outputs`).
        save_artifact: write the compressed model (``model.dkm.safetensors``: LUTs, bit-packed
            indices and every other tensor; see :func:`lightning_dkm.save_compressed`) when fit
            ends. Default True.
        export_coreml: also write ``model.mlpackage``, a Core ML ML program whose clustered
            weights are LUT ops (:func:`lightning_dkm.export_coreml`, traced on the module's
            ``example_input_array``; needs the ``coreml`` extra). Checked in ``setup``: without
            coremltools or ``example_input_array``, or when the model does not convert (one
            trial conversion of the dense model), it fails before training. Default False.
        export_coreai: also write ``model.aimodel``, a Core AI package (iOS / macOS 27) whose
            clustered weights are LUT ops (:func:`lightning_dkm.export_coreai`), then run it in
            coreai-core's runtime on ``example_input_array`` and compare with PyTorch (the
            difference goes into the report; beyond float tolerance it is an error). Needs the
            ``coreai`` extra and widths of 1, 2, 4, 6 or 8 bits. Checked in ``setup`` like
            ``export_coreml``. Default False.
        lut_dtype: precision of the stored palettes, ``"float16"`` (default; also ``"fp16"``,
            ``"half"``, ``torch.float16``) or ``"float32"`` (``"fp32"``, ``"float"``,
            ``torch.float32``); the report's sizes count the same.
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
            centroids refitted to the final weights before finalize. Or a
            :class:`~lightning_dkm.model.methods.ClusteringMethod` instance, used as it is
            (e.g. ``DeepKMeansMethod(regularization=1e-2)``; in YAML a ``class_path`` /
            ``init_args`` mapping): its ``name`` is saved in checkpoints and compared on
            resume, and ``regularization`` / ``refresh_every`` must stay at their defaults.
        regularization: Deep k-Means' ``lambda`` (> 0), the weight of the k-means regulariser
            ``R = Tr(W^T W) - Tr(F^T W^T W F)`` (a sum over each palette's weights). Default
            1e-3. Only for ``method="deep_kmeans"`` (with another method, an error).
        refresh_every: optimizer steps between Deep k-Means' assignment refreshes (>= 1).
            Default 50. Only for ``method="deep_kmeans"`` (with another method, an error).
    """

    def __init__(
        self,
        bits: int | None = None,
        cluster_dim: int = 1,
        group_size: int | None = None,
        per_channel_scale: bool = False,
        targets: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
        overrides: dict[str, dict[str, int | bool | None]] | None = None,
        temperature: TemperatureArgument = None,
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
        export_coreai: bool = False,
        lut_dtype: LutDtype = "float16",
        log_histograms: bool = True,
        verbose: bool = True,
        method: Literal["dkm", "deep_kmeans", "hard"] | ClusteringMethod = "dkm",
        regularization: float = DEFAULT_REGULARIZATION,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
        average_bits: float | Literal["bits"] | None = BUDGET_OF_BITS,
        allowed_bits: list[int] | None = None,
    ) -> None:
        super().__init__()
        #: The clustering method (its ``name`` is what checkpoints save).
        self.method: ClusteringMethod = resolve_method(method, regularization, refresh_every)
        #: The budget of per-tensor widths (``None``: every tensor at ``bits``), the widths it
        #: may choose, and what it chose in this fit (:class:`~.bit_budget.BitAllocation`).
        self.average_bits, self.allowed_bits = check_callback_budget(
            bits, average_bits, allowed_bits, export_coreai)
        self._budget_of_bits = average_bits == BUDGET_OF_BITS
        self.spec = ClusterSpec(bits=DEFAULT_BITS if bits is None else bits,
                                cluster_dim=cluster_dim, group_size=group_size,
                                per_channel_scale=per_channel_scale)
        self.targets = pattern_list("targets", targets, required=True)
        self.exclude = pattern_list("exclude", exclude)
        #: The validated temperature (a :class:`~.temperature.TemperatureConfig`).
        self.temperature: TemperatureConfig = parse_temperature(temperature)
        check_arguments(
            spec=self.spec, overrides=overrides, min_size=min_size, start_epoch=start_epoch,
            hard_epoch=hard_epoch, max_iter=max_iter, epsilon=epsilon,
            implementation=implementation, export_coreml=export_coreml,
            export_coreai=export_coreai, seed=seed, save_dir=save_dir,
            switches={"finalize": finalize, "save_artifact": save_artifact,
                      "log_histograms": log_histograms, "verbose": verbose},
        )
        self.overrides = dict(overrides or {})  # each entry checked by check_arguments
        self.lut_dtype = lut_dtype_name(lut_dtype)  # checked; the canonical name: a primitive
        check_method_options(self.method, hard_epoch, gradient, implementation)
        self.min_size, self.start_epoch, self.hard_epoch = min_size, start_epoch, hard_epoch
        self.max_iter, self.epsilon, self.seed = max_iter, float(epsilon), seed
        self.implementation, self.gradient = implementation, gradient
        #: The ``finalize`` argument (not named so: :func:`~lightning_dkm.finalize` is used here).
        self.finalize_at_fit_end = finalize
        self.save_dir, self.save_artifact = save_dir, save_artifact
        #: The exports asked for, by argument: ``{"export_coreml": bool, "export_coreai": bool}``.
        self.exports = {"export_coreml": export_coreml, "export_coreai": export_coreai}
        self.log_histograms, self.verbose = log_histograms, verbose
        self._names: list[str] = []
        self._timeline = DKMTimeline(self.temperature, self.method, start_epoch, hard_epoch)
        self._out_dir: Path | None = None
        self._save_dir_lock: SaveDirLock | None = None  # rank 0's, from setup to teardown
        self._forward_cache = ForwardCache()
        self._snap_cache = SnapCache()  # open for a validation / test / predict loop
        self._tensor_cache: tuple[pl.LightningModule, dict[str, ClusteredTensor]] | None = None
        self._checkpointing = DKMCheckpointing()
        self._fully_sharded: FullySharded | None = None  # under FSDP2 (ModelParallelStrategy)
        #: What fit produced (:class:`~.outputs.DKMResults`).
        self.results = DKMResults()

    # -- identity and state --------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # The default budget (``bits``'s own) keys like uniform ``bits``: a checkpoint of either
        # resumes under the other at its own widths (``_resume_widths``).
        budget = ({} if self.average_bits is None or self._budget_of_bits
                  else {"average_bits": self.average_bits})
        return self._generate_state_key(
            bits=self.spec.bits,
            cluster_dim=self.spec.cluster_dim,
            group_size=self.spec.group_size,
            targets=self.targets,
            exclude=self.exclude,
            per_channel_scale=self.spec.per_channel_scale,
            **budget,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beyond the model, as primitives (and Deep k-Means' uint8
        assignments): the clustered names, each tensor's tau bounds, the temperature it was
        written with (a callable by name only), finalized or not, the method's name and state,
        and with ``average_bits`` the widths chosen (``"bit_allocation"``; ``None`` without).
        ``on_save_checkpoint`` adds the model's DKM state under ``"model"``."""
        return {
            "version": _STATE_VERSION,
            "names": list(self._names),
            "temperature": self._timeline.state_dict(),
            "temperature_config": self.temperature.to_dict(),
            "finalized": self.results.finalized,
            "method": self.method.name,
            "method_state": self.method.state_dict(),
            "bit_allocation": (None if self.bit_allocation is None
                               else self.bit_allocation.to_dict()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint's callback state has version {version!r}; this "
                f"lightning_dkm reads version {_STATE_VERSION} (the format of its first release)"
            )
        names = list(state_dict["names"])
        if self._names and names and names != self._names:
            raise selection_error(names, self._names)
        self._timeline.load_state_dict(state_dict["temperature"], state_dict["temperature_config"])
        self.results.finalized = bool(state_dict["finalized"])
        method = state_dict["method"]
        if method != self.method.name:
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint was written with method={method!r}, but this "
                f"callback uses method={self.method.name!r}; resume with the same method"
            )
        self.method.load_state_dict(state_dict["method_state"])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._fully_sharded is None:  # under FSDP2 the model keeps its own state dict
            self._checkpointing.save(pl_module, checkpoint, self.state_key, self._names)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resume_widths(pl_module, checkpoint)
        self._checkpointing.restore(pl_module, checkpoint, self.state_key, self._names)

    def _resume_widths(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A resume keeps the widths the checkpoint was trained with: where ``setup`` chose
        others (from the weights before the checkpoint was loaded, or uniform ones where the
        checkpoint has an allocation), the tensors are attached again at the checkpoint's
        widths (its allocation, or ``bits`` everywhere where it has none) before its DKM state
        is written in. Settings the allocation was made under that differ now are named in a
        warning (:func:`~.bit_widths.warn_if_allocated_otherwise`), never applied."""
        own = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if not isinstance(own, dict) or not self._names:
            return  # no state of this callback: the checkpoint's restore says so
        saved = own.get("bit_allocation")
        allocation = None if saved is None else BitAllocation.from_dict(saved)
        chosen = self.bit_allocation
        if allocation is not None and set(allocation.bits) != set(self._names):
            return  # another selection: the checkpoint's restore names the difference
        if allocation is not None:
            warn_if_allocated_otherwise(
                allocation, average_bits=self.average_bits, allowed_bits=self.allowed_bits,
                lut_dtype=self.lut_dtype, overrides=self.overrides)
        widths = (None if allocation is None else allocation.bits)
        if widths != (None if chosen is None else chosen.bits):
            release(pl_module, self._names)
            selected = self._select(pl_module)
            if allocation is not None:
                selected = allocation.apply(selected)
            # widths setup did not check: refused now, not by the export after training
            check_export_widths(selected, self.exports["export_coreai"],
                                "DKMCallback(export_coreai=True) resuming at the checkpoint's "
                                "widths")
            self._attach(pl_module, selected, init=False)
            if allocation is None:
                rank_zero_warn(f"DKMCallback: the checkpoint was trained without an allocation "
                               f"(every tensor at bits={self.spec.bits}); the resume keeps "
                               "those widths, not the ones average_bits chose at setup")
        self.results.bit_allocation = allocation

    # -- the results, as documented attributes (``results`` holds them) ------------------------
    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-tensor statistics from the last measured epoch (name -> metric -> value)."""
        return self.results.stats

    @property
    def palettes(self) -> dict[str, Palette]:
        """The palettes (LUT + indices) produced by finalize, by parameter name."""
        return self.results.palettes

    @property
    def report(self) -> CompressionReport | None:
        """The compression report after fit (``None`` before)."""
        return self.results.report

    @property
    def output_paths(self) -> dict[str, Path]:
        """What fit wrote: ``{"json": ..., "markdown": ..., "artifact": ...}`` (empty before)."""
        return self.results.output_paths

    @property
    def artifact_path(self) -> Path | None:
        """The compressed model written at fit end (``None`` before, or without an artifact)."""
        return self.results.artifact_path

    @property
    def bit_allocation(self) -> BitAllocation | None:
        """The widths ``average_bits`` chose in this fit (kept from the checkpoint on resume);
        ``None`` without ``average_bits``."""
        return self.results.bit_allocation

    @property
    def finalized_model(self) -> torch.nn.Module | None:
        """The finalized plain model after fit (under FSDP2 rank 0's rebuilt copy)."""
        return self.results.finalized_model

    # -- helpers ---------------------------------------------------------------------------------
    def _tensors(self, pl_module: pl.LightningModule) -> dict[str, ClusteredTensor]:
        return clustered_tensors(pl_module, self._names)

    def _select(self, pl_module: pl.LightningModule) -> list[Target]:
        return select_targets(
            pl_module, self.spec, targets=self.targets, exclude=self.exclude,
            min_size=self.min_size, overrides=self.overrides,
        )

    def _step_tensors(self, pl_module: pl.LightningModule) -> dict[str, ClusteredTensor]:
        """:meth:`_tensors` for the per-step hooks, looked up once per fit (the walk over the
        model's modules is not repeated every batch); :meth:`_forget_tensors` when the
        parametrizations are registered or removed."""
        if self._tensor_cache is None or self._tensor_cache[0] is not pl_module:
            self._tensor_cache = (pl_module, self._tensors(pl_module))
        return self._tensor_cache[1]

    def _forget_tensors(self) -> None:
        self._tensor_cache = None
        self._forward_cache.forget()

    def _refuse_clustered_elsewhere(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                    selected: list[Target]) -> None:
        """Refuse, before anything runs, targets that another :class:`DKMCallback` clusters:
        one of this Trainer's (give each disjoint targets), or one whose earlier fit left its
        parametrizations on the model (``finalize=False``, or a fit that raised), which only
        that instance, its checkpoint, or taking them off can continue."""
        others = set(clustered_tensors(pl_module)) - set(self._names)
        clash = [t.name for t in selected if t.name in others]
        if not clash:
            return
        siblings = {name for callback in trainer.callbacks
                    if isinstance(callback, DKMCallback) and callback is not self
                    for name in callback._names}
        shared = [name for name in clash if name in siblings]
        if shared:
            raise MisconfigurationException(
                f"DKMCallback: {shared} are already clustered by another DKMCallback of this "
                "Trainer; give each callback disjoint targets (use `exclude`)"
            )
        raise MisconfigurationException(
            f"DKMCallback: {clash} still hold the DKM parametrizations of an earlier fit with "
            "another DKMCallback instance (one with finalize=False, or one that raised). "
            "Continue that fit with the same callback instance or from its checkpoint "
            "(Trainer.fit(..., ckpt_path=...)), or take them off first: "
            "lightning_dkm.finalize(model) snaps the weights to their palettes, "
            "lightning_dkm.release(model) keeps them as trained."
        )

    def _attach(self, pl_module: pl.LightningModule, selected: list[Target], init: bool) -> None:
        attach(
            pl_module, selected, temperature=_INITIAL_TAU, max_iter=self.max_iter,
            epsilon=self.epsilon, seed=self.seed, mode="dense", initialize=init,
            implementation=self.implementation, gradient=self.gradient,
        )
        self._names = [t.name for t in selected]
        self._forget_tensors()

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            if not self._tensors(pl_module):
                snap_on_load(pl_module)  # a state dict with DKM keys (weights-only) loads snapped
            self._checkpointing.watch(pl_module, self._names or None)
            return
        self._release_save_dir()  # a lock an earlier fit of this callback still held
        self._release_earlier_fit(pl_module)
        self._out_dir = check_fit(
            trainer, pl_module, save_dir=self.save_dir,
            finalize_at_fit_end=self.finalize_at_fit_end, save_artifact=self.save_artifact,
            exports=self.exports,
            temperature=self.temperature,
            start_epoch=self.start_epoch, hard_epoch=self.hard_epoch,
            uses_temperature=self.method.uses_temperature,
        )
        self._timeline = DKMTimeline(self.temperature, self.method, self.start_epoch,
                                     self.hard_epoch)  # a new fit: no calibrated bounds yet
        selected = self._select(pl_module)
        # before the allocation runs training_step: a clash is refused at once
        self._refuse_clustered_elsewhere(trainer, pl_module, selected)
        self._fully_sharded = FullySharded() if is_fully_sharded(trainer) else None
        self.results.start_fit()
        if self.average_bits is not None and selected:
            # widths the overrides fix are checked before the allocation runs training_step
            fixed = fixed_by_overrides(selected, self.overrides)
            check_export_widths([t for t in selected if t.name in fixed],
                                self.exports["export_coreai"])
            allocation = self.results.bit_allocation = replace(plan_fit_widths(
                trainer, pl_module, selected, average_bits=self.average_bits,
                allowed_bits=self.allowed_bits, fixed=fixed,
                lut_dtype=self.lut_dtype, seed=self.seed,
                no_sensitivity=(FULLY_SHARDED_WIDTHS if self._fully_sharded else None),
                at_configured_bytes=self._budget_of_bits),
                overrides={p: dict(o) for p, o in self.overrides.items()})  # seen on resume
            selected = allocation.apply(selected)
            log_allocation(trainer, allocation, self.verbose)
        check_export_widths(selected, self.exports["export_coreai"])
        if not selected:
            rank_zero_warn(
                "DKMCallback: no tensor is left to cluster (all matches are smaller than "
                f"min_size={self.min_size} or excluded); training runs without DKM"
                + (" (under FSDP2, layers created in configure_model are not seen at setup: "
                   "create them in __init__)" if self._fully_sharded else "")
            )
        if self._fully_sharded is not None:
            self._fully_sharded.setup(trainer, pl_module, self.finalize_at_fit_end)
        # Seed now (before DDP wraps the model) when DKM starts at once; otherwise at start_epoch
        # from the weights as they are then. Either way every rank computes the same centroids.
        # Under FSDP2 at the first epoch, from the gathered weights (see .fully_sharded).
        seed_now = self.start_epoch == 0 and self._fully_sharded is None
        self._attach(pl_module, selected, init=seed_now)
        if seed_now:
            self._timeline.begin(self._tensors(pl_module))
        self._checkpointing.watch(pl_module, self._names)
        if self._out_dir is not None:  # last, once this callback's setup has passed
            self._save_dir_lock = claim_save_dir(trainer, self._out_dir,
                                                 explicit=self.save_dir is not None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._snap_cache.close()
        self._forget_tensors()
        self._checkpointing.unwatch()
        if stage == "fit":
            self._release_save_dir()

    def _release_earlier_fit(self, pl_module: pl.LightningModule) -> None:
        """A new fit starts from a clean DKM state: the parametrizations an earlier fit of this
        callback left on the model (it raised, or ran with ``finalize=False``) are removed
        without snapping, so the weights are as trained and this fit chooses its widths from
        them and seeds new centroids (or a checkpoint's restore writes its own), instead of
        keeping the earlier fit's widths and centroids beside a new allocation."""
        if self._names:
            release(pl_module, self._names)
            self._names = []
        self._forget_tensors()

    def _release_save_dir(self) -> None:
        """End this fit's hold on ``save_dir`` (rank 0's lock, :mod:`.ownership`)."""
        lock, self._save_dir_lock = self._save_dir_lock, None
        if lock is not None:
            lock.release()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpointing.require_restored("training")
        self._timeline.on_train_start(trainer)
        tensors = self._step_tensors(pl_module)
        warn_if_in_eval_mode([n for n, t in tensors.items() if not t.parametrization.training],
                             len(tensors))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpointing.require_restored("validation")
        self._open_snap_cache(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snap_cache.close()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpointing.require_restored("testing")
        self._open_snap_cache(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snap_cache.close()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpointing.require_restored("prediction")
        self._open_snap_cache(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snap_cache.close()

    def _open_snap_cache(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snap each clustered weight once per evaluation loop, not once per batch
        (:mod:`~lightning_dkm.engine.snap_cache`; closed at the loop's end, on an exception and
        at teardown; training forwards never read it, and an entry whose weight an optimizer
        step changed is stale by its version). Not under FSDP2: there the weights are gathered
        per forward, and a whole snapped weight kept per tensor would hold the whole model on
        every rank."""
        self._snap_cache.close()
        if not is_fully_sharded(trainer):  # also validate() outside fit, which sets no state
            tensors = clustered_tensors(pl_module, self._names or None)
            self._snap_cache.open(t.parametrization for t in tensors.values())

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._timeline.on_epoch_start(trainer.current_epoch, self._tensors(pl_module)):
            pl_module.log("dkm/tau", self._timeline.tau, on_step=False, on_epoch=True,
                          prog_bar=True, sync_dist=True)

    # -- one DKM step per forward (ForwardCache: open at batch start, closed before backward),
    # -- once per optimizer step under gradient accumulation ------------------------------------
    def _window_position(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool | None:
        """Whether this batch ends its accumulation window, or ``None`` for a DKM step per
        forward: without accumulation, under manual optimisation (no window is known), under
        FSDP2 (the window's soft weights and their gradient would stay whole on every rank:
        the full model's size, which FSDP2 exists not to hold; its shard-local DKM runs once
        per optimizer step by itself, :mod:`.fully_sharded`), and where the loop cannot
        tell the window's last batch in advance (``training_step`` taking a
        ``dataloader_iter``, a strategy that accumulates itself)."""
        if (trainer.accumulate_grad_batches == 1 or not pl_module.automatic_optimization
                or self._fully_sharded is not None
                or trainer.strategy.handles_gradient_accumulation
                or isinstance(getattr(trainer.fit_loop, "_data_fetcher", None),
                              _DataLoaderIterDataFetcher)):
            return None
        return not trainer.fit_loop._should_accumulate()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._forward_cache.close()
        if self._timeline.on_step(trainer.global_step, trainer.current_epoch,
                                  lambda: self._step_tensors(pl_module)):
            outputs.log_step_tau(trainer, pl_module, self._timeline.tau, batch_idx)
        if self._names:
            if self._fully_sharded is not None:
                self._fully_sharded.start_batch(pl_module, self._step_tensors(pl_module))
            self._forward_cache.open(pl_module, self._window_position(trainer, pl_module))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._forward_cache.close()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._forward_cache.window_is_last:  # before AMP unscales the gradients
            self._forward_cache.finish_window()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        self._forward_cache.close()
        if self._fully_sharded is not None:
            self._fully_sharded.end_batch()
        if self._forward_cache.window_is_last:
            self._forward_cache.end_window()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._snap_cache.close()
        self._forward_cache.close()
        self._forward_cache.end_window(finish=False)
        if self._fully_sharded is not None:
            self._fully_sharded.drop()  # the raw weights back in the shards
        self._release_save_dir()  # Lightning calls no teardown hook after an exception

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._forward_cache.finish_window()  # the window's gradients complete before the step
        if self._fully_sharded is not None:
            self._fully_sharded.before_optimizer_step()  # shard-local DKM's backward
        if not self._names or not self._timeline.active(trainer.current_epoch):
            return
        self.method.on_before_optimizer_step(self._step_tensors(pl_module), optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward_cache.end_window()  # Lightning steps on an epoch's last batch
        if self._fully_sharded is not None:
            self._fully_sharded.drop()
        if not self._timeline.active(trainer.current_epoch):
            return
        tensors = self._tensors(pl_module)
        if not tensors:
            return
        self.results.stats, model_entropy = measure_all(tensors)
        outputs.log_epoch_metrics(pl_module, self.results.stats, model_entropy)
        if self.log_histograms:
            outputs.log_histograms(trainer, tensors)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget_tensors()
        if self._fully_sharded is not None:
            self._fully_sharded.drop()
        if not self.finalize_at_fit_end or not self._names or self.results.finalized:
            return
        tensors = self._tensors(pl_module)
        if not tensors:
            return
        if not all(t.parametrization.is_initialized for t in tensors.values()):
            # Fit ended (max_epochs, max_steps, early stopping, an interrupt) before DKM began:
            # there are no centroids to snap to. Leave the model as trained, never damaged
            # (under FSDP2 the parametrizations stay, in mode "dense": FSDP2 owns what they hold).
            if self._fully_sharded is None:
                release(pl_module, self._names)
            else:
                set_mode(pl_module, "dense", self._names)
            self._names = []
            outputs.warn_not_clustered(trainer, self.start_epoch)
            return
        self.method.before_finalize(tensors)
        results = self.results
        results.stats, _ = measure_all(tensors)
        if self._fully_sharded is not None:
            results.palettes, results.finalized_model = self._fully_sharded.finalize(
                trainer, pl_module, self._names)
        else:
            results.palettes = finalize(pl_module, self._names)
            snap_on_load(pl_module)  # state dicts with the DKM keys (weights-only) still load
            results.finalized_model = pl_module
        results.finalized = True
        assert self._out_dir is not None  # resolved in setup whenever finalize is on
        results.write(
            trainer, results.finalized_model, self._out_dir, lut_dtype=LUT_DTYPES[self.lut_dtype],
            write_artifact=save_compressed if self.save_artifact else None,
            exports=self.exports, verbose=self.verbose,
        )

