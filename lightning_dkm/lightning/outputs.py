"""What :class:`~lightning_dkm.DKMCallback` produces and where it goes.

* During fit: the per-epoch clustering metrics (``dkm/entropy``, ``dkm/<metric>/<tensor>``)
  through ``pl_module.log``, and TensorBoard histograms of centroids and weights.
* At fit end (after finalize): the :class:`~lightning_dkm.export.report.CompressionReport`
  (JSON and Markdown in ``save_dir``, ``dkm_report/*`` scalars to every logger, the Markdown as
  TensorBoard text) and the compressed artifact, written as one group (the report records the
  artifact's size and SHA-256; a failed write leaves the previous pair), the printed report,
  and only then, optionally, the Core ML and Core AI packages (recorded in the report; a failed
  export names the artifact and the call that retries it).
* Last, what an earlier fit left in ``save_dir`` that this fit did not write (the artifact with
  ``save_artifact=False``, a package whose export is off now or failed) goes, so ``save_dir``
  never shows an earlier fit's output beside this fit's report as if it were this fit's: an
  output the earlier report records (the artifact by its SHA-256, a package by its path) is
  removed, with an info line naming it; anything else at those names (not known to be ours: a
  user's own file, or an earlier report that cannot be read) is left alone, with a warning
  naming it (:func:`settle_earlier_outputs`).
* The results, a :class:`DKMResults` the callback holds (``stats``, ``palettes``, ``report``,
  ``output_paths``, ``artifact_path``, ``finalized_model``), also in the process that launched a
  ``ddp_spawn`` fit, which gets them from rank 0 through the handoff file (:mod:`.handoff`).
"""

from __future__ import annotations

import copy
import os
import tempfile
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..engine.palette import Palette
from ..engine.sharding import is_sharded
from ..export.files import FileGroup, remove_output, safetensors_errors_as_os_errors
from ..export.report import REPORT_JSON, REPORT_MARKDOWN, CompressionReport, artifact_entry
from ..export.report_render import export_line as _export_line
from ..export.tracing import as_example_tuple
from ..model.attach import ClusteredTensor
from ..model.bit_budget import BitAllocation
from .handoff import discard_handoff, read_handoff, write_handoff

__all__ = [
    "ARTIFACT_NAME",
    "COREAI_NAME",
    "COREML_NAME",
    "EXPORTS",
    "DKMResults",
    "log_epoch_metrics",
    "log_histograms",
    "settle_earlier_outputs",
    "warn_not_clustered",
    "write_report_and_artifact",
]

#: File name of the compressed model written into ``save_dir``.
ARTIFACT_NAME = "model.dkm.safetensors"
#: The Core ML package written with ``export_coreml=True``.
COREML_NAME = "model.mlpackage"
#: The Core AI package written with ``export_coreai=True``.
COREAI_NAME = "model.aimodel"
#: The exports a fit can write, by ``DKMCallback`` argument: ``(key, file, name)``, the key
#: naming it in the report and the pip extra that provides it, the package written into
#: ``save_dir``, and what users call it.
EXPORTS = {"export_coreml": ("coreml", COREML_NAME, "Core ML"),
           "export_coreai": ("coreai", COREAI_NAME, "Core AI")}


def warn_not_clustered(trainer: pl.Trainer, start_epoch: int) -> None:
    """Fit ended before DKM started: nothing is clustered and nothing is written; say so."""
    rank_zero_warn(
        f"DKMCallback: fit ended at epoch {trainer.current_epoch} (global step "
        f"{trainer.global_step}) before DKM started (start_epoch={start_epoch}), so the model "
        "was NOT clustered: its weights stay as trained, in full precision, and no report or "
        "artifact was written. Train past start_epoch (max_epochs / max_steps) or lower "
        "start_epoch."
    )


def log_epoch_metrics(
    pl_module: pl.LightningModule, stats: dict[str, dict[str, float]], model_entropy: float
) -> None:
    """``dkm/entropy`` (in the progress bar) and ``dkm/<metric>/<tensor>`` for the epoch.
    ``sync_dist``: every rank holds the same values, so the mean is exact and cheap."""
    log = {"dkm/entropy": model_entropy}
    for name, values in stats.items():
        for key, value in values.items():
            log[f"dkm/{key}/{name}"] = value
    for key, value in log.items():
        pl_module.log(key, value, on_step=False, on_epoch=True, prog_bar=key == "dkm/entropy",
                      sync_dist=True)


def log_step_tau(trainer: pl.Trainer, pl_module: pl.LightningModule, tau: float,
                 batch_idx: int) -> None:
    """``dkm/tau`` (in the progress bar) for this step, where someone reads it: at a step whose
    metrics the loggers write (``log_every_n_steps``, ``fast_dev_run``), at an epoch's first and
    last batch, and at the fit's last step (``max_steps``). Between those the progress bar
    shows the last one. ``self.log`` costs about 0.5 ms on the CPU (Lightning converts the
    value and walks its result record), 1-2 % of a small model's step, so it is not paid on
    steps whose value nobody sees; the TensorBoard curve is the same."""
    if not _step_metrics_read(trainer, batch_idx):
        return
    pl_module.log("dkm/tau", tau, on_step=True, on_epoch=False, prog_bar=True)


def _step_metrics_read(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether a per-step value logged in ``on_train_batch_start`` is read (:func:`log_step_tau`).
    Lightning's own test (``should_update_logs``, designed to be asked before the step) is
    private: where it is missing every step counts as read."""
    if batch_idx == 0 or trainer.is_last_batch or trainer.fast_dev_run:
        return True
    if 0 <= trainer.max_steps <= trainer.global_step + 1:
        return True
    should_update = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs",
                            True)
    return bool(should_update)


def log_histograms(trainer: pl.Trainer, tensors: dict[str, ClusteredTensor]) -> None:
    """TensorBoard histograms of every tensor's centroids and weights (written by rank 0; call
    on every rank: a weight that FSDP2 shards is gathered first, one tensor at a time)."""
    boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not boards:  # the same on every rank: then no rank gathers anything
        return
    writers = [logger.experiment for logger in boards] if trainer.global_rank == 0 else []
    if not writers and not any(is_sharded(t.original) for t in tensors.values()):
        return
    step = trainer.global_step
    for name, tensor in tensors.items():
        weight = tensor.full_original()  # a collective on every rank when sharded
        for writer in writers:
            writer.add_histogram(
                f"dkm_centroids/{name}", tensor.parametrization.centroids.float().cpu(), step
            )
            writer.add_histogram(f"dkm_weights/{name}", weight.float().cpu(), step)


def _log_report(trainer: pl.Trainer, report: CompressionReport) -> None:
    """The compression totals as ``dkm_report/*`` scalars to every logger, and the Markdown
    report as TensorBoard text, where users look."""
    totals = report.totals()
    metrics = {f"dkm_report/{key}": float(totals[key]) for key in (
        "total_bytes", "clustered_bytes", "fp32_bytes", "ratio_vs_fp32", "ratio_vs_fp16")}
    metrics["dkm_report/bits_per_clustered_weight"] = (
        8.0 * report.clustered_bytes / max(report.clustered_parameters, 1))
    if report.energy is not None:
        metrics["dkm_report/estimated_energy_ratio"] = float(report.energy.estimated_energy_ratio)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("dkm_report", report.to_markdown(), trainer.global_step)


class DKMResults:
    """The results of a fit, held by the callback as ``callback.results`` (and read through its
    properties of the same names); in the process that launched a ``ddp_spawn`` fit they are
    rank 0's, read from the handoff file on first access."""

    def __init__(self) -> None:
        self._stats: dict[str, dict[str, float]] = {}
        self._palettes: dict[str, Palette] = {}
        self._report: CompressionReport | None = None
        self._output_paths: dict[str, Path] = {}
        #: Whether finalize ran (saved in the callback's state: a resumed fit does not repeat it).
        self.finalized = False
        #: The finalized plain model after fit: the LightningModule itself, or under FSDP2 on
        #: rank 0 a copy of it rebuilt from the gathered weights (``None`` on the other ranks,
        #: whose module stays sharded, its weights snapped). ``None`` before finalize.
        self.finalized_model: torch.nn.Module | None = None
        #: The widths ``average_bits`` chose (a :class:`~lightning_dkm.model.bit_budget.
        #: BitAllocation`), recorded in the report; ``None`` without ``average_bits``.
        self.bit_allocation: BitAllocation | None = None
        # Where rank 0 of a ddp_spawn fit leaves its results for this process (:mod:`.handoff`).
        self._launcher_pid = os.getpid()
        self._handoff_path = Path(tempfile.gettempdir()) / (
            f"lightning_dkm-{self._launcher_pid}-{uuid.uuid4().hex}.pt"
        )
        weakref.finalize(self, discard_handoff, self._handoff_path, self._launcher_pid)

    def start_fit(self) -> None:
        """A new fit (``setup("fit")``): nothing of an earlier fit stands for this one's
        results (a fit that ends before DKM starts, or raises, produces none)."""
        self._stats, self._palettes, self._report, self._output_paths = {}, {}, None, {}
        self.finalized, self.finalized_model, self.bit_allocation = False, None, None

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

    @property
    def output_paths(self) -> dict[str, Path]:
        """What fit wrote: ``{"json": ..., "markdown": ..., "artifact": ...}`` (empty before)."""
        self._take_handoff()
        return self._output_paths

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
        self.finalized = True

    def write(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule | None,
        out_dir: Path,
        *,
        lut_dtype: torch.dtype,
        write_artifact: Callable[..., Path] | None,
        exports: dict[str, bool],
        verbose: bool,
    ) -> None:
        """Everything fit end produces, in the order of the module docstring: the report on
        every rank; on rank 0 the report and the artifact (``write_artifact``, with
        :func:`~lightning_dkm.save_compressed`'s signature; ``None``: none) as one group, then
        the ``exports`` (``{"export_coreml": bool, ...}``), recorded in the report, and under
        ``ddp_spawn`` the handoff file. ``pl_module`` is the finalized model (under FSDP2 the
        plain one rebuilt on rank 0; ``None`` on the other ranks, which write and hold
        nothing)."""
        if pl_module is None:
            return
        final_stats = {
            name: {"entropy_bits": values["entropy"], "snap_rmse": values["snap_rmse"]}
            for name, values in self._stats.items()
        }
        self._report = CompressionReport.build(
            pl_module, self._palettes, lut_dtype=lut_dtype, stats=final_stats,
            example_input=getattr(pl_module, "example_input_array", None),
        )
        if self.bit_allocation is not None:
            self._report.bit_allocation = self.bit_allocation.to_dict()
        if trainer.global_rank != 0:
            return
        _log_report(trainer, self._report)
        earlier = earlier_report(out_dir)  # read before this fit's report replaces it
        paths = write_report_and_artifact(
            self._report, pl_module, out_dir, self._palettes, lut_dtype=lut_dtype,
            write_artifact=write_artifact,
        )
        self._publish(paths)
        if verbose:
            rank_zero_info("\n" + self._report.to_table())
        try:
            for argument, wanted in exports.items():
                if wanted:
                    target, entry = _export(argument, pl_module, out_dir, paths.get("artifact"))
                    paths[target] = Path(entry["path"])
                    self._report.record_export(target, entry)
        finally:
            if len(paths) > len(self._output_paths):
                self._report.save(out_dir)
                self._publish(paths)
            not_written = {ARTIFACT_NAME: "save_artifact=False"}
            for argument, (_, file, _) in EXPORTS.items():
                not_written[file] = (f"{argument}=True did not complete" if exports.get(argument)
                                     else f"{argument}=False")
            settle_earlier_outputs(out_dir, paths, earlier, not_written)
        if verbose:
            for target, _, _ in EXPORTS.values():
                if target in self._report.exports:
                    rank_zero_info(_export_line(target, self._report.exports[target]))
            rank_zero_info(f"DKM outputs written to {', '.join(str(p) for p in paths.values())}")

    def _publish(self, paths: dict[str, Path]) -> None:
        """Make ``paths`` the results (and, in a ``ddp_spawn`` worker, hand them off)."""
        self._output_paths = dict(paths)
        if os.getpid() != self._launcher_pid:
            write_handoff(self._handoff_path, paths, self._palettes, self._stats)


def write_report_and_artifact(
    report: CompressionReport,
    model: torch.nn.Module,
    out_dir: Path,
    palettes: dict[str, Palette],
    *,
    lut_dtype: torch.dtype,
    write_artifact: Callable[..., Any] | None,
) -> dict[str, Path]:
    """Write the artifact (``write_artifact(model, path, palettes, lut_dtype=...)``; ``None``:
    no artifact) and the report that describes it into ``out_dir`` as one group
    (:class:`~lightning_dkm.export.files.FileGroup`): the artifact is staged first, its size and
    SHA-256 go into ``report.artifact`` (``None`` without one), then the report is staged, and
    only then are all moved into place, all or none. So a write that fails (a full disk, an
    I/O error) leaves the previous report and artifact as they were, a pair, and no temporary
    file; a ``SafetensorError`` from the writer is raised as the ``OSError`` it reports.
    Returns ``{"json": ..., "markdown": ..., "artifact": ...}`` (no ``"artifact"`` without
    one)."""
    artifact = out_dir / ARTIFACT_NAME
    report.artifact = None
    with FileGroup() as group:
        if write_artifact is not None:
            def write(tmp: Path) -> None:  # a SafetensorError as an OSError, whoever writes
                with safetensors_errors_as_os_errors(f"the artifact {artifact}"):
                    write_artifact(model, tmp, palettes, lut_dtype=lut_dtype)

            staged = group.stage(artifact, write)
            report.artifact = artifact_entry(staged, ARTIFACT_NAME)
        for path, text in report.files(out_dir).items():
            group.stage(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        group.commit()
    paths = {"json": out_dir / REPORT_JSON, "markdown": out_dir / REPORT_MARKDOWN}
    if write_artifact is not None:
        paths["artifact"] = artifact
    return paths


def earlier_report(out_dir: Path) -> CompressionReport | None:
    """The report an earlier fit left in ``out_dir`` (``None``: none, or unreadable), which
    says what that fit wrote there (:func:`settle_earlier_outputs`)."""
    try:
        return CompressionReport.load(out_dir / REPORT_JSON)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _recorded_by(report: CompressionReport | None, path: Path) -> bool:
    """Whether ``report`` (an earlier fit's, from ``path``'s directory) records writing what
    is at ``path``: the artifact when its bytes still have the recorded size and SHA-256, a
    package when its recorded path is this one."""
    if report is None:
        return False
    try:
        if path.name == ARTIFACT_NAME:
            entry = report.artifact
            return (entry is not None and entry["file"] == ARTIFACT_NAME and path.is_file()
                    and not path.is_symlink() and path.stat().st_size == entry["bytes"]
                    and artifact_entry(path)["sha256"] == entry["sha256"])
        target = next(t for t, file, _ in EXPORTS.values() if file == path.name)
        recorded = report.exports.get(target, {}).get("path")
        return (isinstance(recorded, str) and path.is_dir() and not path.is_symlink()
                and os.path.samefile(recorded, path))
    except OSError:
        return False


def settle_earlier_outputs(
    out_dir: Path, written: dict[str, Path], earlier: CompressionReport | None,
    not_written: dict[str, str],
) -> None:
    """After a fit wrote ``written`` (its output paths) into ``out_dir``: what lies at the name
    of an output it did not write (the artifact, a package) is an earlier fit's, and beside this
    fit's report it would pass for this fit's. So an output the ``earlier`` fit's report
    records (:func:`_recorded_by`) is removed (:func:`~lightning_dkm.export.files.
    remove_output`), with an info line naming it: ``save_dir`` holds one fit's outputs, as one
    fit after another replaces them. Anything else there is not known to be ours (a user's own
    file, a report that cannot be read) and is never removed: a warning names it. ``not_written``
    says, by file name, why this fit did not write it (for the messages)."""
    names = [ARTIFACT_NAME] + [file for _, file, _ in EXPORTS.values()]
    ours = {path.resolve() for path in written.values()}
    removed = []
    for name in names:
        path = out_dir / name
        if not os.path.lexists(path) or path.resolve() in ours:
            continue
        why = not_written.get(name, "it did not write it")
        if _recorded_by(earlier, path):
            try:
                remove_output(path)
                removed.append(str(path))
            except OSError as err:
                rank_zero_warn(
                    f"DKMCallback: {path} is an earlier fit's output ({why} in this fit), but "
                    f"removing it failed ({err.strerror or err}); it is NOT this fit's output: "
                    "delete it before using the outputs"
                )
            continue
        rank_zero_warn(
            f"DKMCallback: {path} is not this fit's output ({why}), and no earlier fit's report "
            f"in {out_dir} records writing it, so it was left as it is; it does not belong to "
            f"this fit's {REPORT_JSON}: move it away, or pass another save_dir"
        )
    if removed:
        rank_zero_info(
            f"DKMCallback: removed {', '.join(removed)}: an earlier fit's output that this fit "
            "did not write (it would pass for this fit's beside its report)"
        )


def _export(argument: str, module: pl.LightningModule, out_dir: Path, artifact: Path | None
            ) -> tuple[str, dict[str, Any]]:
    """Run one export of the finalized ``module``; ``(target, report entry)``. A failure is a
    ``RuntimeError`` naming the artifact and the call that retries the export from it."""
    target, file, _ = EXPORTS[argument]
    path = out_dir / file
    try:
        example = tuple(x.cpu() for x in as_example_tuple(module.example_input_array))
        # the converters read the weights as numpy arrays: export a CPU copy if need be
        model = module if module.device.type == "cpu" else copy.deepcopy(module).cpu()
        if argument == "export_coreml":
            from ..export.coreml import export_coreml, package_bytes

            written = export_coreml(model, path, example)
            entry = {"path": str(written), "package_bytes": package_bytes(written),
                     "verified": "LUT ops read back (running it needs macOS / iOS 18+)"}
        else:
            from ..export.coreai import export_coreai

            entry = export_coreai(model, path, example).to_dict()
    except Exception as err:
        if artifact is None:
            where = ("no artifact was written (save_artifact=False); the finalized model is "
                     "the LightningModule itself: export it with lightning_dkm."
                     f"{argument}(model, {str(path)!r}, example_inputs)")
        else:
            where = (f"the compressed model is safe at {artifact} (report beside it); retry "
                     f"the export with lightning_dkm.{argument}(load_compressed(YourModel(), "
                     f"{str(artifact)!r}), {str(path)!r}, example_inputs)")
        raise RuntimeError(
            f"DKMCallback({argument}=True) failed after training: {type(err).__name__}: {err}. "
            + where
        ) from err
    return target, entry
