"""Which parameters are clustered, and with what spec.

A *target* is one weight tensor of a supported module together with its
:class:`~lightning_dkm.engine.layout.ClusterSpec` and
:class:`~lightning_dkm.engine.layout.PaletteLayout`.

Patterns (in ``targets``, ``exclude`` and the keys of ``overrides``) follow the vocabulary of
PEFT's ``target_modules``. Each is matched against the qualified name of every supported module
(``"features.0"``, ``"encoder.layer.0.attention.q_proj"``) and of its clusterable parameter
(``"features.0.weight"``, ``"attn.in_proj_weight"``); a module that matches selects its
clusterable parameter(s). There are three kinds, told apart by their characters:

* ``re:<regex>``: a regular expression that must match the whole name,
  e.g. ``"re:features\\.\\d+"``;
* a *bare name* (no ``.``, no ``*``, ``?`` or ``[``): PEFT's list semantics, the name at any
  depth: it matches a name that equals it or ends in ``.<name>``. ``"q_proj"`` selects
  ``encoder.layer.0.attention.q_proj`` and every other ``q_proj``; ``"in_proj_weight"`` the
  ``in_proj_weight`` of every ``MultiheadAttention``; ``"head"`` a top-level ``head`` and
  ``decoder.head`` alike. It matches whole name components only (``"proj"`` does not select
  ``q_proj``), and a container (a ``Sequential`` such as ``"features"``) has no clusterable
  parameter of its own, so it matches nothing: write ``"features.*"`` for what it holds;
* anything else is a shell-style glob (``*``, ``?``, ``[...]``) on the whole name, e.g.
  ``"features.*"``, ``"*.fc"``, ``"layers.[0-3].mlp"``; a dotted name without glob characters
  (``"features.0"``) is an exact name.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from ..engine.layout import ClusterSpec, PaletteLayout, check_keys, is_int
from ..engine.parametrization import DKMParametrization
from .state import qualified_name, tensor_identity
from .tied import TiedWeight

__all__ = [
    "CONV",
    "CONV_TRANSPOSE",
    "DEFAULT_MIN_SIZE",
    "Target",
    "clusterable_parameters",
    "is_bare_name",
    "matches",
    "override_specs",
    "pattern_list",
    "select_targets",
]

#: Tensors with fewer elements are skipped by default (as coremltools' ``weight_threshold``):
#: a LUT plus indices saves little on them, and they are often the most sensitive.
DEFAULT_MIN_SIZE = 2048

#: The convolution types DKM clusters (and the MAC count counts).
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)


def clusterable_parameters(module: nn.Module) -> list[tuple[str, int, int]]:
    """``(parameter name, group_axis, vector_axis)`` for each weight of ``module`` that DKM can
    cluster; empty for unsupported module types.

    Output channels (``group_axis``) are axis 0 for Linear, Conv and Embedding rows and axis 1
    for ConvTranspose (whose weight is ``(in, out/groups, *kernel)``); vectors run along the
    other channel axis.
    """
    if isinstance(module, (nn.Linear, *CONV, *_EMBEDDING)):
        return [("weight", 0, 1)]
    if isinstance(module, CONV_TRANSPOSE):
        return [("weight", 1, 0)]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", 0, 1)]
        return [(name, 0, 1) for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    return []


_GLOB_CHARACTERS = ("*", "?", "[")


def is_bare_name(pattern: str) -> bool:
    """Whether ``pattern`` is a bare name (module docstring): not ``re:``, no ``.``, no glob
    characters. It then matches that name at any depth, as in PEFT's ``target_modules`` list."""
    return (
        not pattern.startswith("re:")
        and "." not in pattern
        and not any(c in pattern for c in _GLOB_CHARACTERS)
    )


def matches(pattern: str, name: str) -> bool:
    """Whether the qualified ``name`` matches one pattern: a ``re:`` regex (full match), a bare
    name (``name`` equals it or ends in ``.<pattern>``) or a glob (module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if is_bare_name(pattern):
        return name == pattern or name.endswith("." + pattern)
    return fnmatch.fnmatchcase(name, pattern)


def _no_match_error(label: str, pattern: str, candidate_names: list[str]) -> ValueError:
    hint = (
        f" (a bare name matches a supported module or parameter called {pattern!r} at any "
        f"depth; for everything inside a container write {pattern + '.*'!r})"
        if is_bare_name(pattern)
        else ""
    )
    return ValueError(
        f"{label} pattern {pattern!r} matches no supported weight; candidates are: "
        f"{', '.join(candidate_names) or '(none)'}{hint}"
    )


def _matches_any(patterns: Iterable[str], names: Sequence[str]) -> bool:
    return any(matches(p, n) for p in patterns for n in names)


def pattern_list(label: str, patterns: Iterable[str] | str | None, *,
                 required: bool = False) -> list[str] | None:
    """``targets`` / ``exclude`` (``label``) as a checked list: one string is one pattern (never
    its characters), each a non-empty string and every ``re:`` a valid regex; ``None`` stays
    ``None`` (every supported weight / none excluded). An empty collection is ``None`` too
    (``exclude=[]`` excludes nothing, and is keyed and saved as ``None``), except where
    ``required`` (``targets``): there it would select no weight, so it is an error rather than
    a silent "every weight"."""
    if patterns is None:
        return None
    out = [patterns] if isinstance(patterns, str) else list(patterns)
    if not out:
        if required:
            raise ValueError(
                f"{label} is empty ({patterns!r}), which clusters nothing; give at least one "
                f"pattern, or {label}=None (the default) for every supported weight")
        return None
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"{label} must be non-empty strings (module or parameter names, globs "
                         f"or 're:' regexes); got {bad!r}")
    for p in out:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ValueError(f"{label}: invalid regular expression {p!r}: {err}") from err
    return out


_SPEC_KEYS = tuple(f.name for f in fields(ClusterSpec))


def override_specs(spec: ClusterSpec, overrides: Mapping[str, Any] | None
                   ) -> dict[str, ClusterSpec]:
    """Each ``overrides`` pattern's :class:`ClusterSpec`: ``spec`` with the fields it sets
    replaced; a pattern, key or value that does not fit is a ``ValueError`` naming it."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(
            f"overrides must be a mapping pattern -> {{key: value}} with keys from {_SPEC_KEYS}, "
            f"e.g. {{'classifier': {{'bits': 8}}}}; got {overrides!r}"
        )
    overrides = dict(overrides or {})
    pattern_list("overrides keys", list(overrides))
    return {p: _spec_with_override(spec, p, o) for p, o in overrides.items()}


def _spec_with_override(base: ClusterSpec, pattern: str, override: Any) -> ClusterSpec:
    check_keys(f"overrides[{pattern!r}]", override, _SPEC_KEYS)
    try:
        return replace(base, **dict(override))
    except ValueError as err:
        raise ValueError(f"overrides[{pattern!r}]: {err}") from err


@dataclass(frozen=True)
class Target:
    """One weight tensor to cluster."""

    module_name: str
    param_name: str
    layout: PaletteLayout
    #: Other ``(module name, parameter name)`` owners of the same tensor (tied weights): during
    #: training they read this target's clustered tensor, and finalize keeps them tied.
    tied: tuple[tuple[str, str], ...] = ()
    #: The ``overrides`` pattern that set this tensor's spec (``None``: the default spec).
    override: str | None = None

    @property
    def name(self) -> str:
        """The parameter's qualified name, e.g. ``"features.0.weight"``."""
        return qualified_name(self.module_name, self.param_name)

    @property
    def spec(self) -> ClusterSpec:
        return self.layout.spec


def select_targets(
    model: nn.Module,
    spec: ClusterSpec | None = None,
    *,
    targets: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Target]:
    """The weights of ``model`` to cluster, in module order.

    Args:
        model: the model to inspect (already parametrized tensors are inspected by their
            original shape).
        spec: the default :class:`ClusterSpec` (bits, cluster_dim, group_size).
        targets: patterns of modules/parameters to cluster (module docstring: ``re:``
            regexes, bare names at any depth, globs); ``None`` means every supported weight
            (Linear, Conv*, ConvTranspose*, Embedding*, MultiheadAttention projections); an
            empty list is an error (it would cluster nothing).
        exclude: patterns removed from the selection (empty or ``None``: none).
        min_size: tensors with fewer elements are skipped, with one warning listing them.
        overrides: ``pattern -> {bits?, cluster_dim?, group_size?, per_channel_scale?}``; the
            first pattern (in mapping order) that matches a tensor replaces those fields of its
            spec.

    Raises:
        ValueError: a pattern in ``targets`` or an override that matches no supported weight
            (the message lists the candidates), a spec or layout that does not fit a tensor.
    """
    spec = spec if spec is not None else ClusterSpec()
    target_patterns = pattern_list("targets", targets, required=True) or []
    exclude_patterns = pattern_list("exclude", exclude) or []
    specs = override_specs(spec, overrides)
    if not is_int(min_size, 0):
        raise ValueError(f"min_size must be an int >= 0; got {min_size!r}")

    candidates: list[tuple[str, str, nn.Module, int, int]] = []
    for module_name, module in model.named_modules():
        for param_name, group_axis, vector_axis in clusterable_parameters(module):
            candidates.append((module_name, param_name, module, group_axis, vector_axis))
    candidate_names = [qualified_name(m, p) for m, p, *_ in candidates]
    module_names = [m for m, *_ in candidates]

    for label, patterns in (
        ("targets", target_patterns), ("overrides", list(specs)), ("exclude", exclude_patterns)
    ):
        for pattern in patterns:
            if not _matches_any([pattern], module_names + candidate_names):
                raise _no_match_error(label, pattern, candidate_names)

    selected: list[Target] = []
    skipped: list[str] = []
    owners: dict[tuple, int] = {}  # tensor_identity -> index in ``selected``
    used_overrides: set[str | None] = set()
    unused_overrides: dict[str, list[str]] = {}  # pattern -> tensors below min_size it matched
    left_out: dict[str, list[str]] = {}  # pattern -> tensors targets/exclude leave out
    for module_name, param_name, module, group_axis, vector_axis in candidates:
        names = (module_name, qualified_name(module_name, param_name))
        override = next((p for p in specs if _matches_any([p], names)), None)
        if (target_patterns and not _matches_any(target_patterns, names)) or _matches_any(
                exclude_patterns, names):
            if override is not None:
                left_out.setdefault(override, []).append(names[1])
            continue
        qualified = names[1]
        tensor = _original_tensor(module, param_name, qualified)
        key = tensor_identity(tensor)
        owner = owners.get(key) if key is not None else None
        if owner is not None:  # a tied weight: one palette, read by every owner
            first = selected[owner]
            if override is not None and override != first.override:
                first = _with_tied_override(first, override, specs[override], qualified)
                used_overrides.add(override)
            selected[owner] = replace(first, tied=(*first.tied, (module_name, param_name)))
            continue
        if tensor.numel() < min_size:
            skipped.append(f"{qualified} ({tensor.numel()} elements)")
            if override is not None:
                unused_overrides.setdefault(override, []).append(qualified)
            continue
        if key is not None:
            owners[key] = len(selected)
        tensor_spec = spec if override is None else specs[override]
        used_overrides.add(override)
        layout = PaletteLayout(
            tuple(tensor.shape), tensor_spec, group_axis, vector_axis, name=qualified
        )
        selected.append(Target(module_name, param_name, layout, override=override))

    for pattern, names_below in unused_overrides.items():
        if pattern in used_overrides:
            continue
        warnings.warn(
            f"overrides[{pattern!r}] is not applied: it matches only tensors smaller than "
            f"min_size={min_size} ({', '.join(names_below)}), which stay in full precision; "
            "lower min_size to cluster them",
            UserWarning,
            stacklevel=2,
        )
    for pattern, names_out in left_out.items():
        if pattern in used_overrides or pattern in unused_overrides:
            continue
        warnings.warn(
            f"overrides[{pattern!r}] is not applied: it matches only tensors that targets / "
            f"exclude leave out ({', '.join(names_out)}), which stay in full precision",
            UserWarning,
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"skipping {len(skipped)} tensor(s) smaller than min_size={min_size} elements "
            f"(kept in full precision): {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return selected


def _with_tied_override(first: Target, override: str, spec: ClusterSpec,
                        qualified: str) -> Target:
    """``first`` (a tied weight's target) with the spec of ``override``, which matched its
    further owner ``qualified``: an override of either owner applies to the one tensor; two
    owners with different overrides are a ``ValueError`` naming both."""
    if first.override is not None and spec != first.spec:
        raise ValueError(
            f"{first.name} and {qualified} are one tied weight, but overrides "
            f"{first.override!r} and {override!r} give it different specs ({first.spec} and "
            f"{spec}); override one of them only"
        )
    if first.override is not None:
        return first
    layout = first.layout
    return replace(first, override=override, layout=PaletteLayout(
        layout.shape, spec, layout.group_axis, layout.vector_axis, name=layout.name))


def _original_tensor(module: nn.Module, param_name: str, qualified: str):
    """The stored tensor behind ``module.<param_name>``, looking through a DKM parametrization.

    A weight computed by another parametrization (weight_norm, spectral_norm, orthogonal, a
    user's own) is refused: DKM would cluster the computed weight, but finalize snaps and
    stores the original, so the model would silently change.
    """
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and param_name in parametrizations:
        plist = parametrizations[param_name]
        others = [
            type(p).__name__ for p in plist if not isinstance(p, (DKMParametrization, TiedWeight))
        ]
        if others:
            raise ValueError(
                f"{qualified} is computed by another parametrization ({', '.join(others)}); DKM "
                "cannot be stacked on it: remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations) or leave this tensor out "
                "with `exclude`"
            )
        return plist.original
    return getattr(module, param_name)
