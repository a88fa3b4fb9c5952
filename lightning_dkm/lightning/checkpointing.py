"""How :class:`~lightning_dkm.DKMCallback` writes and reads Lightning checkpoints.

A checkpoint's ``state_dict`` is the plain model's: every clustered weight under its plain name,
snapped to its current centroids (as ``ModelPruning`` saves pruned weights), no DKM key and no
``_COREML_`` buffer, so ``Model().load_state_dict(checkpoint["state_dict"])`` works without
this package. The DKM state (the originals, centroids, tau, scales and carried palettes: see
:mod:`lightning_dkm.model.checkpoint`) goes under the callback's own key,
``checkpoint["callbacks"][state_key]["model"]``, beside its primitive ``state_dict()``.

Lightning restores the model's weights before any callback state (``restore_model``, then
``restore_callbacks``: ``on_load_checkpoint``, ``load_state_dict``), so reading is three steps:

1. a ``load_state_dict`` pre-hook on the module (from ``setup`` to ``teardown``) makes the plain
   weights loadable into the parametrized or finalized model
   (:func:`~lightning_dkm.model.checkpoint.prepare_plain_load`) and remembers which tensors wait
   for their DKM state; a state dict with the DKM keys (a weights-only checkpoint) is checked
   against the selection instead and loads as it is;
2. ``on_load_checkpoint`` writes the DKM state in
   (:func:`~lightning_dkm.model.checkpoint.restore_dkm_state`) and takes it out of the loaded
   checkpoint, so the copy Lightning makes for ``load_state_dict`` does not duplicate it;
3. at the start of training or evaluation, a tensor still waiting (a weights-only checkpoint,
   or one written without this callback) is an error, never placeholders trained or evaluated.

Weights-only checkpoints (``ModelCheckpoint(save_weights_only=True)``) are written without any
callback hook, so they keep the DKM keys; a finalized model loads them snapped
(:func:`~lightning_dkm.model.snapping.snap_on_load`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..model.attach import clustered_tensors
from ..model.checkpoint import PlainLoad, prepare_plain_load, restore_dkm_state, split_dkm_state
from ..model.snapping import checkpoint_clustered_names

__all__ = ["DKM_STATE_KEY", "DKMCheckpointing", "selection_error"]

#: The key of the DKM state inside the callback's checkpoint state.
DKM_STATE_KEY = "model"
_NOTHING = PlainLoad([], [])


def selection_error(in_checkpoint: list[str], in_model: list[str]) -> MisconfigurationException:
    """The refusal of a checkpoint that clusters other tensors than this run selects."""
    hint = (
        " The checkpoint was written without DKM: load its weights into the model before fit "
        "(model.load_state_dict) instead of passing ckpt_path."
        if not in_checkpoint else ""
    )
    return MisconfigurationException(
        f"DKMCallback: the checkpoint clusters {in_checkpoint}, but this run's targets select "
        f"{in_model}; resume with the same targets / exclude / min_size / overrides (and bits, "
        "cluster_dim, group_size, per_channel_scale) as the run that wrote the checkpoint."
        f"{hint}"
    )


def _other_key_error(written: str, state_key: str, names: list[str]
                     ) -> MisconfigurationException:
    """The refusal of a checkpoint that holds these very tensors' DKM state under another
    callback's key: a callback's key is its settings (``DKMCallback.state_key``), so the run
    that wrote it had other ones."""
    return MisconfigurationException(
        f"DKMCallback: the checkpoint's DKM state of {names} is stored under {written}, but "
        f"this callback's key is {state_key}: the run that wrote it had other settings among "
        "those in the key (bits, cluster_dim, group_size, per_channel_scale, targets, exclude, "
        "a numeric average_bits). Resume with that run's settings; to change them, start a "
        "fresh fit (no ckpt_path) from its weights: model.load_state_dict(torch.load(path)"
        "[\"state_dict\"]), the plain model it holds (clustered weights snapped)."
    )


class DKMCheckpointing:
    """The checkpoint format of one :class:`~lightning_dkm.DKMCallback` (module docstring);
    ``names`` are the tensors that callback clusters (or, on a finalized model, clustered)."""

    def __init__(self) -> None:
        self._hook: Any = None
        self._names: list[str] | None = None
        self.waiting: PlainLoad = _NOTHING

    # -- writing ----------------------------------------------------------------------------------
    @staticmethod
    def save(
        pl_module: pl.LightningModule, checkpoint: dict[str, Any], state_key: str,
        names: list[str],
    ) -> None:
        """``on_save_checkpoint``: the plain state dict in place of the module's, the DKM state
        of ``names`` under ``checkpoint["callbacks"][state_key]["model"]``."""
        if not names:
            return
        plain, dkm_state = split_dkm_state(pl_module, checkpoint["state_dict"], names)
        checkpoint["state_dict"] = plain
        checkpoint.setdefault("callbacks", {}).setdefault(state_key, {})[DKM_STATE_KEY] = dkm_state

    # -- reading ----------------------------------------------------------------------------------
    def watch(self, pl_module: pl.LightningModule, names: list[str] | None) -> None:
        """From ``setup``: convert what Lightning loads into ``pl_module`` (step 1). ``names``
        ``None``: every clustered or carried tensor of the module."""
        self.unwatch()
        self._names = names
        self.waiting = _NOTHING
        self._hook = pl_module.register_load_state_dict_pre_hook(self._pre_hook)

    def unwatch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pre_hook(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        if prefix:
            return
        in_checkpoint = sorted(checkpoint_clustered_names(state_dict))
        in_model = sorted(clustered_tensors(module))
        own = sorted(clustered_tensors(module, self._names))
        ours = [name for name in in_checkpoint if name in own]
        # DKM keys of another callback's tensors only are that callback's placeholders (its
        # hook ran first: prepare_plain_load) or, beside plain weights of ours, a checkpoint
        # that restore() refuses; DKM keys of ours are a weights-only checkpoint's.
        if (ours and ours != own) or not set(in_checkpoint) <= set(in_model):
            raise selection_error(in_checkpoint, in_model)
        if ours:  # the DKM keys themselves (weights-only): they load as they are
            return
        self.waiting = prepare_plain_load(module, state_dict, self._names)

    def restore(
        self, pl_module: pl.LightningModule, checkpoint: dict[str, Any], state_key: str,
        names: list[str],
    ) -> None:
        """``on_load_checkpoint`` (step 2): the DKM state into the tensors that wait for it."""
        states = checkpoint.get("callbacks") or {}
        own = states.get(state_key)
        dkm_state = own.pop(DKM_STATE_KEY, None) if isinstance(own, dict) else None
        waiting, self.waiting = self.waiting, _NOTHING
        if not (waiting.parametrized or waiting.carried):
            return
        if dkm_state is None:
            held = {  # what each other DKMCallback's state in the checkpoint clusters
                key: sorted((state.get(DKM_STATE_KEY) or {}).get("tensors", {}))
                for key, state in states.items()
                if str(key).startswith("DKMCallback") and isinstance(state, dict)
            }
            if waiting.parametrized:
                same = [key for key, tensors in held.items() if tensors == sorted(names)]
                if same:  # these tensors' state, under another callback's settings
                    raise _other_key_error(same[0], state_key, sorted(names))
                raise selection_error(sorted({n for tensors in held.values() for n in tensors}),
                                      sorted(names))
            rank_zero_warn(
                f"DKMCallback: the checkpoint has no DKM state for this callback ({state_key}); "
                "its weights were loaded, but the model no longer carries palettes for "
                f"{waiting.carried}. Finalize or palettize it again before exporting."
            )
            return
        if waiting.parametrized and sorted(dkm_state["tensors"]) != sorted(names):
            raise selection_error(sorted(dkm_state["tensors"]), sorted(names))
        restore_dkm_state(pl_module, dkm_state, [*waiting.parametrized, *waiting.carried])

    def require_restored(self, stage: str) -> None:
        """Step 3: before ``stage`` runs, no tensor may still hold a placeholder."""
        if self.waiting.parametrized:
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint loaded before {stage} has plain weights for "
                f"{self.waiting.parametrized} but no DKM state came with it (a weights-only "
                "checkpoint, or one written without DKMCallback), so the clustered weights "
                "were not loaded. Pass a full checkpoint written with this DKMCallback, or load "
                "the weights into the model (model.load_state_dict) before attaching DKM."
            )
