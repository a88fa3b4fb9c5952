"""What :class:`~lightning_dkm.DKMCallback` checks against the Trainer before training.

At ``setup("fit")`` (:func:`check_fit`): the strategy, the output directory, the Core ML / Core
AI exports and what ``max_epochs`` / ``max_steps`` make of ``start_epoch``, ``hard_epoch`` and
the temperature schedule; at ``on_train_start``, when the dataloaders are known, the number of
soft units the schedule spans (:func:`soft_units`), and whether the clustered tensors are in
train mode (:func:`warn_if_in_eval_mode`). Each problem is a
``MisconfigurationException`` or a warning that names the setting and the fix, raised before
the first step rather than at the end of fit.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from shutil import disk_usage

import lightning.pytorch as pl
import torch
from lightning.pytorch import strategies
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..export.files import describe_path
from ..export.report import REPORT_JSON, REPORT_MARKDOWN
from ..export.tracing import as_example_tuple, exportable
from ..model.targets import Target
from .outputs import ARTIFACT_NAME, EXPORTS
from .ownership import rank_zero_check, save_dir_label
from .temperature import TemperatureConfig

__all__ = [
    "check_export_widths",
    "check_exports",
    "check_fit",
    "check_fully_sharded_model",
    "check_limits",
    "check_outputs",
    "check_strategy",
    "check_writable_dir",
    "is_fully_sharded",
    "model_fp32_bytes",
    "output_paths",
    "resolve_save_dir",
    "soft_units",
    "warn_if_in_eval_mode",
]


#: The strategies DKM refuses, by class name in ``lightning.pytorch.strategies``, and why.
_REFUSED_STRATEGIES = {
    "FSDPStrategy": "FSDP1 flattens each wrapped module's weights into one sharded "
    "FlatParameter, under which the DKM parametrizations are not tested (Lightning runs it "
    "on CUDA only, and no GPU was available to test it). Use FSDP2 instead: "
    "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard "
    "in configure_model (docs/distributed.md)",
    "DeepSpeedStrategy": "DeepSpeed ZeRO partitions parameters and wraps the optimizer, "
    "which the parametrizations are not yet adapted to. Use FSDP2 "
    "(ModelParallelStrategy with tensor_parallel_size=1), 'ddp' or 'ddp_spawn'",
}


def is_fully_sharded(trainer: pl.Trainer) -> bool:
    """Whether the Trainer runs FSDP2 (``ModelParallelStrategy``): the weights are sharded."""
    return isinstance(trainer.strategy, strategies.ModelParallelStrategy)


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse FSDP1, DeepSpeed and tensor parallelism (and their subclasses); FSDP2 through
    ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` is supported."""
    for name, why in _REFUSED_STRATEGIES.items():
        refused = getattr(strategies, name, None)  # DeepSpeed is optional in Lightning
        if isinstance(refused, type) and isinstance(trainer.strategy, refused):
            raise MisconfigurationException(
                f"DKMCallback does not support {type(trainer.strategy).__name__}: {why}."
            )
    if is_fully_sharded(trainer):
        tp = getattr(trainer.strategy, "_tensor_parallel_size", 1)
        if tp != 1:
            raise MisconfigurationException(
                f"DKMCallback does not support tensor parallelism (ModelParallelStrategy "
                f"tensor_parallel_size={tp}): a tensor-parallel weight is split into parts "
                "that different ranks multiply with, and DKM clusters a weight as one tensor "
                "(one palette for all its parts). Use ModelParallelStrategy(data_parallel_size="
                f"{trainer.world_size}, tensor_parallel_size=1) for FSDP2, or 'ddp'."
            )


def check_fully_sharded_model(pl_module: pl.LightningModule) -> None:
    """Under FSDP2, at ``setup``: the weights to cluster exist (created in ``__init__``, not in
    ``configure_model``) and are real tensors, not ``meta`` ones."""
    on_meta = [name for name, p in pl_module.named_parameters() if p.is_meta]
    if on_meta:
        raise MisconfigurationException(
            f"DKMCallback under FSDP2: {on_meta[:3]} are on the meta device at setup; DKM seeds "
            "its centroids from the trained values, so create the layers with real weights in "
            "__init__ and apply fully_shard (only) in configure_model"
        )


def resolve_save_dir(trainer: pl.Trainer, save_dir: str | os.PathLike[str] | None) -> Path:
    """``save_dir``, or the trainer's ``log_dir`` (``default_root_dir``) + ``/dkm``, with ``~``
    expanded and made absolute against the working directory now, at ``setup``: fit end writes
    into this path even if the working directory changes during fit. Call it on every rank:
    ``trainer.log_dir`` is a broadcast."""
    if save_dir is None:
        save_dir = Path(trainer.log_dir or trainer.default_root_dir) / "dkm"
    return Path(os.path.abspath(os.path.expanduser(os.fspath(save_dir))))


def check_writable_dir(path: Path, explicit: bool) -> None:
    """``path`` is a directory this process can write into (created if missing), else a
    ``MisconfigurationException`` that names it (``save_dir`` when ``explicit``: given by the
    user), and what it is (a file, a FIFO, ...)."""
    label = save_dir_label(path, explicit)
    fix = "pass a writable directory as save_dir" if explicit else "pass save_dir"
    if os.path.lexists(path) and not path.is_dir():
        raise MisconfigurationException(
            f"DKMCallback: {label} is {describe_path(path)}, not a directory; {fix}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MisconfigurationException(
            f"DKMCallback: {label} cannot be created ({err.strerror or err}); {fix}"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise MisconfigurationException(f"DKMCallback: {label} is not writable; {fix}")


def output_paths(out_dir: Path, save_artifact: bool, exports: dict[str, bool]
                 ) -> list[tuple[Path, str, bool]]:
    """What fit end writes into ``out_dir``: ``(path, what it is, a package directory?)`` for
    the report (JSON and Markdown) and, as asked, the artifact and the packages."""
    paths = [(out_dir / REPORT_JSON, "the compression report (JSON)", False),
             (out_dir / REPORT_MARKDOWN, "the compression report (Markdown)", False)]
    if save_artifact:
        paths.append((out_dir / ARTIFACT_NAME, "the compressed artifact", False))
    for argument, (_, file, name) in EXPORTS.items():
        if exports.get(argument):
            paths.append((out_dir / file, f"the {name} package", True))
    return paths


#: The free-space margin: the outputs may take up to this many times their estimated size.
SPACE_MARGIN = 1.1
#: Room for the report (JSON and Markdown) and the lock, beyond the estimate.
SPACE_EXTRA = 1 << 20


def model_fp32_bytes(module: torch.nn.Module) -> int:
    """The model at fp32: every parameter and buffer (each once) at ``max(4, its width)``
    bytes per element, an upper bound of what one output (the artifact, a package) stores."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * max(4, t.element_size()) for t in tensors)


def check_outputs(out_dir: Path, label: str, pl_module: torch.nn.Module,
                  save_artifact: bool, exports: dict[str, bool]) -> None:
    """Room in ``out_dir`` for what fit end writes, else a ``MisconfigurationException``:
    nothing in the way of an output (each file absent or a file, a package absent or a
    directory; naming the path and what it is), and free space, estimated before training as
    ``1.1 x outputs x fp32 bytes of the model + 1 MiB`` (with the numbers and the formula): each
    output (the artifact, each package) stores at most every tensor at 4 bytes per element
    (clustered ones far less), a new output is written beside the one it replaces, and 1 MiB
    covers the report."""
    paths = output_paths(out_dir, save_artifact, exports)
    for path, what, package in paths:
        if path.exists() and not (path.is_dir() if package else path.is_file()):
            expected = "a directory (a package)" if package else "a file"
            raise MisconfigurationException(
                f"DKMCallback: {label}: {path} is {describe_path(path)}, not {expected}; "
                f"{what} is written there when fit ends. Move it away, or pass another save_dir"
            )
    outputs = [what for path, what, _ in paths if path.name not in (REPORT_JSON, REPORT_MARKDOWN)]
    fp32 = model_fp32_bytes(pl_module)
    needed = math.ceil(SPACE_MARGIN * len(outputs) * fp32) + SPACE_EXTRA
    free = disk_usage(out_dir).free
    if free < needed:
        listed = ", ".join(outputs) or "no artifact or package"
        raise MisconfigurationException(
            f"DKMCallback: {label} has {free:,} bytes free, but what fit end writes there may "
            f"need up to {needed:,} bytes = {SPACE_MARGIN} x {len(outputs)} output(s) "
            f"({listed}) x {fp32:,} fp32 bytes of the model + {SPACE_EXTRA:,} bytes for the "
            "report. Free some space, or pass a save_dir on a disk with room"
        )


def _example_inputs(pl_module: pl.LightningModule, argument: str) -> tuple[torch.Tensor, ...]:
    """``example_input_array`` as the export passes it: a tuple of positional tensors."""
    example = getattr(pl_module, "example_input_array", None)
    try:
        if example is None:
            raise ValueError(f"{type(pl_module).__name__} has none: set self.example_input_array")
        return as_example_tuple(example, "example_input_array")
    except ValueError as err:
        raise MisconfigurationException(
            f"DKMCallback({argument}=True) converts the model on its example_input_array: {err}"
        ) from None


def _trial_conversion(pl_module: pl.LightningModule, argument: str,
                      examples: tuple[torch.Tensor, ...]) -> None:
    """Convert the (dense) model once on ``examples``, in memory, as fit end will."""
    with exportable(pl_module) as module:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if argument == "export_coreml":
            from ..export.coreml import convert_to_mlprogram

            # coremltools reads the weights as numpy arrays: convert a CPU copy if need be
            module = module if device.type == "cpu" else copy.deepcopy(module).cpu()
            convert_to_mlprogram(module, tuple(x.cpu() for x in examples))
        else:
            from ..export.coreai import convert_to_coreai

            convert_to_coreai(module, tuple(x.to(device) for x in examples))


def check_exports(pl_module: pl.LightningModule, requested: dict[str, bool]) -> None:
    """Each export asked for (``{"export_coreml": bool, "export_coreai": bool}``) can work, so
    that nothing fails after training: its converter imports, the module has an
    ``example_input_array``, and the converter converts the model on it (dense weights: the
    LUT ops come at fit end). Else a ``MisconfigurationException`` naming the export, with the
    converter's own message."""
    for argument, wanted in requested.items():
        if not wanted:
            continue
        extra, _, target = EXPORTS[argument]
        try:
            if argument == "export_coreml":
                from ..export.coreml import require_coremltools as require
            else:
                from ..export.coreai import require_coreai as require
            require()
        except ImportError as err:
            raise MisconfigurationException(
                f"DKMCallback({argument}=True) needs the {extra} extra: pip install "
                f'"lightning-dkm[{extra}]" ({err})'
            ) from err
        examples = _example_inputs(pl_module, argument)
        try:
            _trial_conversion(pl_module, argument, examples)
        except Exception as err:
            raise MisconfigurationException(
                f"DKMCallback({argument}=True): {type(pl_module).__name__} cannot be converted "
                f"to {target} (checked before training, on its example_input_array with dense "
                f"weights): {type(err).__name__}: {err}. Make the model convertible, or set "
                f"{argument}=False"
            ) from err


def check_export_widths(targets: list[Target], export_coreai: bool,
                        what: str = "DKMCallback(export_coreai=True)") -> None:
    """With ``export_coreai``: every tensor to cluster has a width Core AI packs (``what``
    starts the error)."""
    if not export_coreai:
        return
    from ..export.coreai import check_packable

    try:
        check_packable({t.name: t.layout.spec.bits for t in targets}, what)
    except ValueError as err:
        raise MisconfigurationException(f"{err}, or set export_coreai=False") from None


def check_limits(
    trainer: pl.Trainer,
    config: TemperatureConfig,
    start_epoch: int,
    hard_epoch: int | None,
    uses_temperature: bool,
) -> None:
    """What the Trainer's limits make of ``start_epoch`` and the temperature schedule (errors
    and warnings name ``max_epochs`` / ``max_steps``)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and 0 <= max_epochs <= start_epoch:
        rank_zero_warn(
            f"DKMCallback: max_epochs={max_epochs} <= start_epoch={start_epoch}, so DKM "
            "never starts and the model will not be clustered; raise max_epochs or lower "
            "start_epoch"
        )
    if not (config.anneals and uses_temperature):
        return
    last = hard_epoch if hard_epoch is not None else max_epochs
    open_epochs = last is None or last < 0
    if open_epochs and (config.interval == "epoch" or max_steps is None or max_steps < 0):
        unit = "epoch" if config.interval == "epoch" else "step"
        raise MisconfigurationException(
            f"DKMCallback: the {config.schedule!r} temperature schedule anneals tau from "
            f"start to end over the soft DKM {unit}s, but the Trainer sets no limit "
            f"(max_epochs={max_epochs}, max_steps={max_steps}); set max_epochs or max_steps "
            "(or hard_epoch), or use a constant temperature (temperature: 1.0e-3)."
        )
    if config.interval == "epoch" and not open_epochs and last - start_epoch == 1:
        rank_zero_warn(
            f"DKMCallback: only one soft DKM epoch (max_epochs={max_epochs}, "
            f"start_epoch={start_epoch}, hard_epoch={hard_epoch}) with "
            "temperature interval 'epoch': tau changes once per epoch, so it stays at its "
            "start for the whole fit and never anneals. Use interval: step (the default)."
        )


def check_fit(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    save_dir: str | None,
    finalize_at_fit_end: bool,
    save_artifact: bool = True,
    exports: dict[str, bool],
    temperature: TemperatureConfig,
    start_epoch: int,
    hard_epoch: int | None,
    uses_temperature: bool,
) -> Path | None:
    """Every check of ``setup("fit")``; returns the output directory (absolute; ``None``
    unless fit ends with finalize: nothing is written then). The callback takes the directory last
    (:func:`~.ownership.claim_save_dir`), once its own setup has passed.

    Every rank resolves the output directory here: ``trainer.log_dir`` broadcasts, so it must
    not be reached by rank 0 alone at fit end; and a bad ``save_dir`` fails before training.
    What rank 0 alone writes (the output paths, the free space) rank 0 checks, and every rank
    raises its refusal.
    """
    check_strategy(trainer)
    out_dir = None
    if finalize_at_fit_end:
        out_dir = resolve_save_dir(trainer, save_dir)
        explicit = save_dir is not None
        label = save_dir_label(out_dir, explicit)
        check_writable_dir(out_dir, explicit)
        rank_zero_check(trainer, lambda: check_outputs(out_dir, label, pl_module, save_artifact,
                                                       exports))
    check_exports(pl_module, exports)
    check_limits(trainer, temperature, start_epoch, hard_epoch, uses_temperature)
    return out_dir


def soft_units(
    trainer: pl.Trainer, interval: str, start_epoch: int, hard_epoch: int | None
) -> tuple[int | None, int]:
    """At train start (the dataloaders are known): ``(soft units, start step)``, the number of
    units (steps or epochs) the schedule spans (``None`` when open-ended) and the optimizer step
    at which DKM starts (interval ``"step"``; 0 for ``"epoch"``)."""
    if interval == "epoch":
        last = hard_epoch if hard_epoch is not None else trainer.max_epochs
        return (None if last is None or last < 0 else max(last - start_epoch, 1)), 0
    batches = trainer.num_training_batches
    per_epoch = (
        math.inf if math.isinf(batches)
        else math.ceil(batches / max(trainer.accumulate_grad_batches, 1))
    )
    if math.isinf(per_epoch) and (start_epoch or hard_epoch is not None):
        raise MisconfigurationException(
            "DKMCallback: temperature interval 'step' with start_epoch / hard_epoch needs "
            "a train dataloader of known length (steps per epoch); use interval: epoch"
        )
    start_step = 0 if math.isinf(per_epoch) else start_epoch * per_epoch
    end = hard_epoch * per_epoch if hard_epoch is not None else trainer.estimated_stepping_batches
    return (None if math.isinf(end) else max(int(end) - start_step, 1)), start_step


def warn_if_in_eval_mode(names_in_eval: list[str], total: int) -> None:
    """Warn, at train start, that the clustered tensors ``names_in_eval`` (of ``total``) are in
    eval mode: their forward snaps each weight to its nearest centroid instead of running DKM,
    so the fit would not cluster them. Lightning keeps each submodule's own train/eval mode
    (it warns about any module in eval mode, not about what that does to DKM), and a model
    loaded by e.g. transformers' ``from_pretrained`` comes in eval mode."""
    if not names_in_eval:
        return
    shown = ", ".join(names_in_eval[:3]) + (", ..." if len(names_in_eval) > 3 else "")
    rank_zero_warn(
        f"DKMCallback: {len(names_in_eval)} of {total} clustered tensors are in eval mode at "
        f"the start of training ({shown}): in eval mode a clustered weight is snapped to its "
        "nearest centroid instead of running DKM, so training will not cluster it. Lightning "
        "keeps each submodule's own train/eval mode, and models loaded by e.g. "
        "from_pretrained() come in eval mode: call .train() on the model (in the "
        "LightningModule's __init__ or on_fit_start)"
    )
