r"""What every DKM step shares: normalisation, numerics, precision and host reads.

**Numerics.** Distances are formed on data normalised to unit variance, so they are modest
numbers and ``-D / tau`` stays finite for every ``tau >= MIN_TAU`` (1e-30); softmax subtracts
each weight's largest logit, so it cannot produce NaN (tested down to tau = 1e-7 and below, where
the assignments become exactly one-hot). The attention is laid out ``(P, k, n)`` so that every
elementwise pass runs over contiguous memory. A centroid whose attention mass falls
below ``EMPTY_MASS`` (an empty cluster) keeps its previous position instead of dividing by
~0. Data are centred before distances are formed, so weights far from the origin lose no
precision in the ``|x|^2 - 2x.c + |c|^2`` expansion used for vectors.

**Scale.** Every step works in units of each palette's centre and standard deviation
(:func:`normalization_of`, or the ``"unique"`` step's own from the same rules), so the weights'
magnitude enters only there: the standard deviation is in range for weights of any magnitude
(:func:`root_mean_square`), and a palette without spread is floored relative to its centre
(:func:`floored_scale`). Weights of 1e-20 and of 1e20 then give the normalised problem unit
weights give, and everything after it (tau, ``epsilon``, the attention, the ``auto``
temperature's calibration) is in those units. The backward's intermediates are the incoming
gradient times the scale, in range while ``|gradient| * |weight|`` is (a loss is invariant to
a layer's scale when a normalisation follows it, and then that product is of the loss's order).

**Precision.** Every step runs in (at least) float32 with autocast off
(:func:`autocast_disabled`): under ``torch.autocast`` (Lightning's ``16-mixed`` /
``bf16-mixed``) the matrix products would otherwise run in half precision, which moves the
soft weights by up to a standard deviation for vectors. Only the output is cast to the
weights' dtype.

**Host reads.** The early stop (``epsilon``) reads back whether the centroids still move
eagerly on CPU only (:func:`host_reads_are_free`); elsewhere it is decided on the device, with
the same values and gradients (:class:`EarlyStop`).
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kmeans import nearest_centroid, power_of_two

__all__ = [
    "EMPTY_MASS",
    "MIN_TAU",
    "DKMOutput",
    "EarlyStop",
    "Groups",
    "Normalization",
    "NormalizedProblem",
    "all_finite",
    "autocast_disabled",
    "check_step_arguments",
    "chunks",
    "denormalized_output",
    "floored_scale",
    "hard_assign",
    "host_reads_are_free",
    "inverse_temperature",
    "normalization_of",
    "normalized_problem",
    "pick",
    "random_states",
    "random_states_kept",
    "root_mean_square",
    "root_mean_squares",
    "sync_free",
]

#: A cluster whose total attention mass is below this is treated as empty (its centroid stays).
EMPTY_MASS = 1e-6
#: Smallest temperature used; a smaller tau gives the same (one-hot) assignments anyway.
MIN_TAU = 1e-30
#: The scale of a palette with neither spread nor centre (all zeros): anything positive works.
_ZERO_PALETTE_SCALE = 1e-12
#: Points per palette :func:`root_mean_square` looks at for its power of two.
_SAMPLE_POINTS = 1 << 12


_sync_free_depth = 0  # > 0 inside sync_free()


@contextlib.contextmanager
def sync_free() -> Iterator[None]:
    """Run the DKM steps on CPU as they run on an accelerator: no value is read back to the
    host (the early stop is decided on the device, the ``"unique"`` step works on the full
    table of float16 codes). Process-wide; the tests count host reads with it."""
    global _sync_free_depth
    _sync_free_depth += 1
    try:
        yield
    finally:
        _sync_free_depth -= 1


def host_reads_are_free(t: Tensor) -> bool:
    """Whether a step may read values of ``t`` back to the host to save work: eagerly on CPU
    only. On an accelerator a read is a sync (the CPU waits for the device to catch up), under
    ``torch.compile`` a graph break, and inside :func:`sync_free` it is refused for tests."""
    return t.device.type == "cpu" and not _sync_free_depth and not torch.compiler.is_compiling()


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``: the DKM step's products in float32
    whatever autocast region it is called from (nothing where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: its sum is (one pass that vectorises, against
    ``isfinite(t).all()``'s boolean tensor: 20x the time on MiniLM's Hessian diagonal), else,
    since finite values may also sum to Inf, the values themselves decide."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def random_states() -> list[tuple[Callable[[Any], Any], Any]]:
    """The global random states a loss or a dataloader may draw from, each with its setter:
    torch's CPU generator, CUDA's (where CUDA is initialized), Python's ``random`` and NumPy's
    (where NumPy is imported). Setting them back replays the same draws."""
    states: list[tuple[Callable[[Any], Any], Any]] = [(torch.set_rng_state,
                                                       torch.get_rng_state())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append((torch.cuda.set_rng_state_all, torch.cuda.get_rng_state_all()))
    states.append((random.setstate, random.getstate()))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states.append((numpy.random.set_state, numpy.random.get_state()))
    return states


@contextlib.contextmanager
def random_states_kept() -> Iterator[None]:
    """The global random states (:func:`random_states`) as they were before, whatever the
    block draws: work done on the side (the allocation's sensitivity batch at ``setup``)
    leaves a seeded fit's data order and draws as they would have been."""
    states = random_states()
    try:
        yield
    finally:
        for setter, state in states:
            setter(state)


def chunks(n: int, size: int) -> Iterator[slice]:
    """``slice(0, size), slice(size, 2 * size), ...`` up to ``n``: the chunks in which a pass
    goes over ``n`` weights (or points), bounding its temporaries."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Groups(NamedTuple):
    """Which tensor of a batch each palette belongs to: ``ids`` (P,) int64 on the device,
    values ``0 .. count - 1``. ``count`` is known on the host when the batch is built; taking
    it from ``ids`` would be a host read. ``host``: the same ids as a host tuple, where the
    batch knows them (:meth:`of_sizes`), so that nothing reads ``ids`` back."""

    ids: Tensor
    count: int
    host: tuple[int, ...] | None = None

    @classmethod
    def of_sizes(cls, palettes: Sequence[int], device: torch.device) -> Groups:
        """The groups of a batch of tensors with ``palettes[t]`` palettes each, in order: two
        operator calls whatever the number of tensors (one where each has one palette)."""
        host = tuple(t for t, p in enumerate(palettes) for _ in range(p))
        ids = over_palettes(torch.arange(len(palettes), device=device), palettes)
        return cls(ids, len(palettes), host)


def over_palettes(per_tensor: Tensor, palettes: Sequence[int]) -> Tensor:
    """``per_tensor`` (T, ...), one entry per tensor of a batch, repeated for each of its
    ``palettes[t]`` palettes: (sum palettes, ...). Itself where every tensor has one palette,
    else one ``repeat_interleave`` whose size is given (no host read)."""
    if all(p == 1 for p in palettes):
        return per_tensor
    return per_tensor.repeat_interleave(torch.tensor(list(palettes), device=per_tensor.device),
                                        dim=0, output_size=sum(palettes))


class EarlyStop:
    """The ``epsilon`` early stop of a DKM loop, with no host read where reads are not free.

    Per round the step calls :meth:`advance` with the centroids before and after the update
    (``True``: stop now), then :meth:`keep` on each state it carries. ``groups`` gives each
    palette its group (a tensor of a batch; without groups every palette is in one): each group
    stops on its own, as if it were alone, at the first round in which none of its centroids
    moved more than ``epsilon`` (compared in the centroids' dtype; a NaN move stops its group,
    as the device's comparison does); the loop ends once every group has stopped. Two ways:

    - **On the host** (:func:`host_reads_are_free`): each round reads the groups' largest
      moves back once (one value without groups), and the loop breaks once all have stopped.
      A round in which every group is still running keeps its update with no op at all; only
      a batch whose groups stop at different rounds masks the stopped ones' state.
    - **On the device** (an accelerator, ``torch.compile``, :func:`sync_free`): every round
      runs; a flag per group on the device records whether its stop has happened, and
      :meth:`keep` then returns the old state (``torch.where``), so the result is the same as
      stopping, with nothing read back.

    With ``epsilon <= 0`` nothing stops the loop and nothing is compared. ``iterations``
    counts the rounds that took effect: an int where every palette took the same (no groups,
    on the host, or no stop at all), a list of ints per group on the host, or on the device a
    0-dim (no groups) or (``groups.count``,) int64 tensor. :meth:`per_palette` gives the
    count of every palette, :meth:`rounds` the one count where the host knows it.
    """

    def __init__(self, epsilon: float, like: Tensor, groups: Groups | None = None) -> None:
        self.epsilon = epsilon
        self.groups = groups if epsilon > 0 else None
        self.on_device = epsilon > 0 and not host_reads_are_free(like)
        self.device = like.device
        # the host compares in the centroids' dtype, as the device does (computed only there:
        # a rounding past float32's range is an operator call, a host read on the device)
        self._threshold = (_rounded_to(epsilon, like.dtype) if epsilon > 0 and not self.on_device
                           else math.nan)
        count = 1 if self.groups is None else self.groups.count
        # on the host: each group's rounds and flags; on the device: flags as tensors
        self._counts = [0] * count
        self._host_running = [True] * count
        self._host_active = self._host_running
        self._palette_groups: list[int] | None = None
        self._running: Tensor | None = None  # device flag(s): the stop has not happened yet
        self._active: Tensor | None = None  # device flag(s): the round just counted took effect
        self._device_counts: Tensor | None = None
        if self.on_device:
            shape = () if self.groups is None else (count,)
            self._running = torch.ones(shape, dtype=torch.bool, device=like.device)
            self._device_counts = torch.zeros(shape, dtype=torch.long, device=like.device)
        elif self.groups is not None:
            self._palette_groups = (list(self.groups.host) if self.groups.host is not None
                                    else self.groups.ids.tolist())

    @property
    def iterations(self) -> int | list[int] | Tensor:
        """The rounds that took effect (class docstring)."""
        if self._device_counts is not None:
            return self._device_counts
        return self._counts[0] if self.groups is None else list(self._counts)

    def advance(self, old: Tensor, new: Tensor) -> bool:
        """Count the update ``old -> new`` (centroids); whether the loop must stop now."""
        if self.epsilon <= 0:
            self._counts[0] += 1
            return False
        change = (new.detach() - old.detach()).abs()
        if self.on_device:
            self._advance_on_device(change)
            return False
        if self.groups is None:
            moved = [float(change.amax())]
        else:
            moved = self._largest_per_group(
                change.amax(dim=tuple(range(1, change.ndim))).tolist())
        self._host_active = self._host_running
        self._counts = [i + a for i, a in zip(self._counts, self._host_active, strict=True)]
        self._host_running = [a and m > self._threshold
                              for a, m in zip(self._host_active, moved, strict=True)]
        return not any(self._host_running)

    def _largest_per_group(self, per_palette: list[float]) -> list[float]:
        """Each group's largest move from its palettes' (a NaN wins and stays, as ``amax``
        propagates it)."""
        assert self._palette_groups is not None
        moved = [-math.inf] * len(self._counts)
        for group, change in zip(self._palette_groups, per_palette, strict=True):
            largest = moved[group]
            if math.isnan(change) or (not math.isnan(largest) and change > largest):
                moved[group] = change
        return moved

    def _advance_on_device(self, change: Tensor) -> None:
        """:meth:`advance` with the flags on the device: nothing read back."""
        assert self._running is not None and self._device_counts is not None
        if self.groups is not None:  # per group: the largest move of its palettes
            per_palette = change.amax(dim=tuple(range(1, change.ndim)))
            moved = torch.zeros_like(self._running, dtype=per_palette.dtype).scatter_reduce_(
                0, self.groups.ids, per_palette, "amax", include_self=False)
        else:
            moved = change.amax()
        self._active = self._running
        self._device_counts = self._device_counts + self._active
        self._running = self._active & (moved > self.epsilon)

    def keep(self, new: Tensor, old: Tensor) -> Tensor:
        """``new`` if the round just counted took effect, else ``old``."""
        if self.on_device:
            assert self._active is not None
            active = self._active
            if self.groups is not None:
                active = active[self.groups.ids].reshape(-1, *([1] * (new.ndim - 1)))
            return torch.where(active, new, old)
        if all(self._host_active):
            return new
        assert self._palette_groups is not None  # one group: the loop broke when it stopped
        mask = torch.tensor([self._host_active[g] for g in self._palette_groups],
                            device=new.device)
        return torch.where(mask.reshape(-1, *([1] * (new.ndim - 1))), new, old)

    def rounds(self) -> int | None:
        """The rounds that took effect, where the host knows that every palette took the same
        number (``None`` where they differ, or where host reads are not free), so that a batch
        whose tensors all stopped at the same round picks its rounds as views instead of
        gathering them per palette (:class:`~.weighted.Trajectory`'s ``ran``)."""
        if self.on_device:  # known on the device only: reading it back is what it avoids
            return None
        counts = set(self._counts)
        return counts.pop() if len(counts) == 1 else None

    def per_palette(self, palettes: int) -> Tensor:
        """The rounds that took effect per palette: (``palettes``,) int64 on the device."""
        if self._device_counts is not None:
            if self.groups is not None:
                return self._device_counts[self.groups.ids]
            return self._device_counts.expand(palettes)
        if self._palette_groups is None:
            return torch.full((palettes,), self._counts[0], dtype=torch.long,
                              device=self.device)
        return torch.tensor([self._counts[g] for g in self._palette_groups], dtype=torch.long,
                            device=self.device)


def _rounded_to(value: float, dtype: torch.dtype) -> float:
    """``value`` as ``dtype`` holds it (a float32 rounding without an operator call), so that
    the host compares a move with ``epsilon`` as the device compares them."""
    if dtype == torch.float64:
        return float(value)
    if dtype == torch.float32 and abs(value) <= _FLOAT32_MAX:
        return struct.unpack("f", struct.pack("f", value))[0]
    return float(torch.tensor(value, dtype=dtype))  # rounds past the largest float32 too


_FLOAT32_MAX = torch.finfo(torch.float32).max


def pick(stacked: Tensor, index: int | Tensor) -> Tensor:
    """``stacked[index]`` for an int (a view); for a (P,) tensor of indices (on the device,
    nothing read back), palette ``p`` from ``stacked[index[p], p]`` (each palette its own
    round), the indices clamped to the valid range."""
    if isinstance(index, int):
        return stacked[index]
    rounds = index.clamp(0, stacked.shape[0] - 1)
    return stacked[rounds, torch.arange(rounds.shape[0], device=rounds.device)]


class Normalization(NamedTuple):
    """Per-palette affine normalisation ``x_n = (x - center) / scale`` (constants for autograd)."""

    center: Tensor  # (P, 1, d)
    scale: Tensor  # (P, 1, 1)


class DKMOutput(NamedTuple):
    """What one DKM call returns."""

    weights: Tensor  # (P, n, d): the soft-clustered weights A @ C, differentiable
    centroids: Tensor  # (P, k, d): the final centroids, detached (the state for the next call)
    attention: Tensor  # (P, k, n): the last soft-assignment matrix (part of the graph)
    #: centroid updates that took effect (<= max_iter); a 0-dim device tensor when the early
    #: stop was decided on the device (:class:`EarlyStop`)
    iterations: int | Tensor
    #: ``weights`` computed again (detached, bit for bit) from the step's input and a small
    #: table, where the step offers it (the ``"unique"`` step with ``rebuild``): a saved-tensor
    #: hook can then drop ``weights`` between the forward and the backward (:mod:`.rebuild`)
    rebuild: Callable[[], Tensor] | None = None


@torch.no_grad()
def normalization_of(x: Tensor) -> Normalization:
    """Centre and scale of each palette of ``x`` (P, n, d): the mean vector and the standard
    deviation of the scalar weights about it (:func:`root_mean_square`, in range for weights
    of any magnitude), floored by :func:`floored_scale`."""
    center = x.mean(dim=1, keepdim=True)
    return Normalization(center, floored_scale(root_mean_square(x - center), center))


@torch.no_grad()
def root_mean_square(deviations: Tensor) -> Tensor:
    r"""The root mean square of each palette's ``deviations`` (P, n, ...), shaped
    ``(P, 1, ...)``: :math:`u \sqrt{\sum (\delta / u)^2 / N}` with :math:`u` the power of two
    just above the largest ``|deviation|`` among at most ``_SAMPLE_POINTS`` evenly strided
    points of the palette (:func:`~.kmeans.power_of_two`), so that the squares stay in
    float32's normal range for weights of any magnitude (those of 1e20 square to 1e40, of
    1e-20 to 1e-40: beyond it); bit for bit the plain root mean square wherever that was in
    range (a power of two rounds nothing). A
    sample suffices: the squares have some 76 decades of room in float32, and it costs a few
    small ops, not a pass over the weights."""
    unit = power_of_two(_sampled_peak(deviations))
    return _in_units(deviations, unit).mul_(unit)


def _sampled_peak(deviations: Tensor) -> Tensor:
    """Each palette's largest ``|deviation|`` among at most :data:`_SAMPLE_POINTS` evenly
    strided points, ``(P, 1, ...)``."""
    stride = max(1, deviations.shape[1] // _SAMPLE_POINTS)
    dims = tuple(range(1, deviations.ndim))
    return deviations[:, ::stride].abs().amax(dim=dims, keepdim=True)


def _in_units(deviations: Tensor, unit: Tensor) -> Tensor:
    """Each palette's root mean square in units of its ``unit`` (a power of two), one pass."""
    dims = tuple(range(1, deviations.ndim))
    rms = torch.linalg.vector_norm(deviations / unit, dim=dims, keepdim=True)
    return rms.div_(math.sqrt(math.prod(deviations.shape[1:])))


def root_mean_squares(deviations: Sequence[Tensor]) -> Tensor:
    """:func:`root_mean_square` of each tensor of ``deviations`` (P_t, n_t), concatenated
    (sum P_t, 1), bit for bit: each tensor's peak, its pass and its mean, but the powers of
    two of all palettes at once (four ops for the batch, not per tensor: where every op is a
    kernel launch, as on an accelerator, they outnumbered the passes)."""
    if len(deviations) == 1:
        return root_mean_square(deviations[0])
    units = power_of_two(torch.cat([_sampled_peak(d) for d in deviations]))
    parts = units.split([d.shape[0] for d in deviations])
    return torch.cat([_in_units(d, u) for d, u in zip(deviations, parts, strict=True)]
                     ).mul_(units)


def floored_scale(std: Tensor, center: Tensor) -> Tensor:
    """A palette's scale from its standard deviation ``std`` and ``center`` (same shape but
    for the last axis): ``std``, raised to the float rounding of the centre (a constant
    palette's ``std`` is rounding noise) and, for a palette with neither (all zeros), a fixed
    positive value, so that every scale is finite and positive. Relative to the palette, not
    an absolute floor (1e-12 collapsed every palette below it to one or two values), so that a
    palette of tiny weights keeps its spread."""
    floor = center.abs().amax(dim=-1, keepdim=True).mul_(torch.finfo(center.dtype).eps)
    scale = torch.maximum(std, floor)
    return scale.masked_fill_(scale < torch.finfo(scale.dtype).tiny, _ZERO_PALETTE_SCALE)


def check_step_arguments(tau: Tensor | float, max_iter: int, epsilon: float) -> None:
    """The checks every DKM step implementation makes first. Tensor taus are checked where they
    are set (a buffer's ``fill_``), not on every call."""
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1; got {max_iter!r}")
    if not (epsilon >= 0 and math.isfinite(epsilon)):  # inf: every loop would stop at once
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}")
    if not isinstance(tau, Tensor) and not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau!r}")


class NormalizedProblem(NamedTuple):
    """A DKM step's inputs in normalised units (shared by every implementation)."""

    x: Tensor  # (P, n, d), (x - center) / scale, differentiable w.r.t. the input
    centroids: Tensor  # (P, k, d), detached
    normalization: Normalization


def normalized_problem(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    max_iter: int,
    epsilon: float,
    normalization: Normalization | None,
) -> NormalizedProblem:
    """Check a DKM step's arguments and move ``x`` and ``centroids`` to normalised units, in
    at least float32."""
    check_step_arguments(tau, max_iter, epsilon)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute_dtype)
    if normalization is not None:
        norm, deviations = normalization, xc - normalization.center
    else:  # normalization_of, with the deviations computed once for both uses
        center = xc.detach().mean(dim=1, keepdim=True)
        deviations = xc - center
        norm = Normalization(center, floored_scale(root_mean_square(deviations.detach()), center))
    c = (centroids.detach().to(compute_dtype) - norm.center) / norm.scale
    return NormalizedProblem(deviations / norm.scale, c, norm)


def inverse_temperature(tau: Tensor | float, dtype: torch.dtype = torch.float32
                        ) -> Tensor | float:
    """``1 / tau``, tau raised to ``MIN_TAU`` first (a tau buffer cast to half precision may
    have underflowed to 0): a Python float for a float, and for a tensor a 0-dim tensor of
    ``dtype`` on its device, so that no value is read back to the host (on an accelerator
    ``float(tau)`` is a sync)."""
    if isinstance(tau, Tensor):
        return 1.0 / tau.detach().to(dtype).clamp_min(MIN_TAU)
    return 1.0 / max(float(tau), MIN_TAU)


def palette_inverse_temperatures(taus: Sequence[Tensor | float], palettes: Sequence[int],
                                 dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(sum(palettes), 1, 1)``: each tensor's :func:`inverse_temperature` (bit for bit) for
    each of its ``palettes[t]`` palettes, as a batch of tensors steps with them. The callback's
    tau buffers (0-dim tensors of one dtype and device) take a few operator calls whatever the
    number of tensors; other taus one each."""
    if (all(isinstance(t, Tensor) and t.dim() == 0 for t in taus)
            and len({(t.dtype, t.device) for t in taus}) == 1):  # type: ignore[union-attr]
        inverse = inverse_temperature(torch.stack(list(taus)), dtype)  # type: ignore[arg-type]
        assert isinstance(inverse, Tensor)
        inverse = inverse.to(device)
    else:
        inverse = torch.cat([torch.as_tensor(inverse_temperature(t, dtype), dtype=dtype,
                                             device=device).reshape(1) for t in taus])
    return over_palettes(inverse, palettes).reshape(-1, 1, 1)


def denormalized_output(
    weights_n: Tensor, centroids_n: Tensor, problem: NormalizedProblem, x: Tensor,
    centroids: Tensor,
) -> tuple[Tensor, Tensor]:
    """Soft weights (P, n, d) and final centroids (P, k, d) back in the units and dtypes of the
    step's inputs."""
    norm = problem.normalization
    return (
        (weights_n * norm.scale + norm.center).to(x.dtype),
        (centroids_n.detach() * norm.scale + norm.center).to(centroids.dtype),
    )


def hard_assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-centroid indices ``(P, n)`` and the snapped weights ``centroids[indices]``.

    The nearest centroid is found in at least float32 with autocast off (half-precision
    distances would misplace weights near a boundary). The snapped tensor is built by
    gathering from ``centroids`` and cast to the dtype of ``x``, so ``LUT[indices]`` with the
    LUT in that dtype reproduces it bit for bit. No gradient flows through it.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, centroids.dtype), torch.float32)
    with torch.no_grad(), autocast_disabled(x.device.type):
        idx = nearest_centroid(x.detach().to(dtype), centroids.to(dtype))
        snapped = centroids.gather(1, idx.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))
    return idx, snapped.to(x.dtype)
