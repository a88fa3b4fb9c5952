"""The ``torch.nn.utils.parametrize`` module that runs DKM on one weight during training.

``register_parametrization(linear, "weight", DKMParametrization(layout))`` makes
``linear.weight`` a computed tensor: the trainable original stays a ``Parameter`` with the same
identity (optimizers built before or after stay valid) under
``linear.parametrizations.weight.original``, and every access returns its clustered form.

Modes (``DKMParametrization.mode``):

* ``"soft"`` -- training: the DKM step (:func:`lightning_dkm.engine.reference.dkm_cluster`); the
  centroids move to where the iterations ended (in place, no gradient). In ``eval()`` the
  weight is snapped to its nearest centroid, so validation measures the model as it will ship.
* ``"hard"`` -- nearest-centroid weights with a straight-through gradient (identity backward);
  in training the centroids move to the mean of their members (one Lloyd step per forward).
* ``"dense"`` -- the weight passes through unchanged (plain training before DKM starts).

Temperature and centroids are buffers, updated in place (``fill_`` / ``copy_``): they follow the
module across devices, land in ``state_dict`` and checkpoints, and never trigger a recompile.
They stay float32 when the module is cast to half precision (``module.half()``, Lightning's
``16-true`` / ``bf16-true``), and the DKM step runs in float32 with autocast off (Lightning's
``16-mixed`` / ``bf16-mixed``); only the clustered weight takes the weight's dtype.

A training forward reads nothing back to the host (no device sync): whether the centroids are
initialised is a Python flag (:attr:`DKMParametrization.is_initialized`), tau stays a device
tensor, and the steps decide their early stop on the device where reads are not free
(:func:`lightning_dkm.engine.numerics.host_reads_are_free`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from .accumulation import SoftWindow, outside_saved_tensor_hooks
from .chunked import chunked_dkm_cluster
from .distinct import unique_dkm_cluster
from .kmeans import kmeans_centroids, kmeans_centroids_many, member_means, waves
from .layout import PaletteLayout, is_int
from .numerics import (
    DKMOutput,
    autocast_disabled,
    check_step_arguments,
    chunks,
    hard_assign,
    inverse_temperature,
    normalized_problem,
)
from .palette import Palette
from .reference import dkm_cluster
from .snap_cache import SnapCache
from .weighted import DEFAULT_CHUNK, Gradient, attention, attention_entropy, check_gradient

__all__ = [
    "AUTO_UNIQUE_MIN_WEIGHTS",
    "STEPS",
    "DKMParametrization",
    "Mode",
    "Step",
    "StepConfig",
    "check_implementation",
    "initialize_many",
    "resolve_implementation",
    "stable_seed",
]

Mode = Literal["soft", "hard", "dense"]
Implementation = Literal["auto", "chunked", "unique", "reference"]


class StepConfig(NamedTuple):
    """A DKM step's settings besides its tensors; each step reads those it uses."""

    max_iter: int
    epsilon: float
    gradient: Gradient = "unrolled"
    chunk: int = DEFAULT_CHUNK
    rebuild: bool = False  # the "unique" step's FSDP2 rebuild (:mod:`.rebuild`)


#: The one step interface: ``step(x (P, n, d), centroids (P, k, d), tau, config) -> DKMOutput``.
Step = Callable[[Tensor, Tensor, Tensor, StepConfig], DKMOutput]
#: Every implementation behind it, bound once per parametrization (``DKMParametrization.step``);
#: ``"reference"`` (plain autograd) is the oracle the tests hold the others to.
STEPS: dict[str, Step] = {
    "reference": lambda x, c, tau, s: dkm_cluster(
        x, c, tau, max_iter=s.max_iter, epsilon=s.epsilon),
    "chunked": lambda x, c, tau, s: chunked_dkm_cluster(
        x, c, tau, max_iter=s.max_iter, epsilon=s.epsilon, chunk=s.chunk, gradient=s.gradient),
    "unique": lambda x, c, tau, s: unique_dkm_cluster(
        x, c, tau, max_iter=s.max_iter, epsilon=s.epsilon, gradient=s.gradient,
        rebuild=s.rebuild),
}
#: ``"auto"`` takes ``"unique"`` for scalar clustering of at least this many weights per
#: palette: below it the distinct-value bookkeeping costs more than it saves.
AUTO_UNIQUE_MIN_WEIGHTS = 1 << 14


def check_implementation(implementation: object) -> None:
    """``ValueError`` naming ``implementation`` unless it is ``"auto"`` or one of :data:`STEPS`."""
    if not isinstance(implementation, str) or (implementation != "auto"
                                               and implementation not in STEPS):
        raise ValueError(
            f"implementation must be 'auto' or one of {tuple(STEPS)}; got {implementation!r}")


def resolve_implementation(
    implementation: str, layout: PaletteLayout, gradient: str = "unrolled"
) -> str:
    """The DKM step ``implementation`` stands for on ``layout``: itself, or for ``"auto"`` the
    fastest one for the tensor's shape: ``"unique"`` for scalar clustering of >=
    ``AUTO_UNIQUE_MIN_WEIGHTS`` weights per palette, else ``"chunked"``, the exact step, which
    is 1.1-4x faster than the plain-autograd ``"reference"`` at every size measured (2,048 to
    16,384 weights, k = 4 to 256, scalars and pairs; ``docs/benchmarks.md``).

    Raises:
        ValueError: ``implementation`` is not ``"auto"`` or one of :data:`STEPS`, ``"unique"``
            on vectors (``cluster_dim > 1``), or a ``gradient`` that
            :func:`~.weighted.check_gradient` refuses.
    """
    check_implementation(implementation)
    if implementation == "unique" and layout.spec.cluster_dim != 1:
        raise ValueError(f"{layout.name}: implementation='unique' needs cluster_dim 1; got "
                         f"{layout.spec.cluster_dim} (use 'chunked')")
    check_gradient(gradient, implementation, layout.name)
    if implementation != "auto":
        return implementation
    if layout.spec.cluster_dim == 1 and layout.palette_shape[1] >= AUTO_UNIQUE_MIN_WEIGHTS:
        return "unique"
    return "chunked"


_MODES: tuple[str, ...] = get_args(Mode)
# Lloyd iterations used to initialise vector centroids (k-means++ then Lloyd, on the current
# weights; scalar centroids are the optimal ones).
_INIT_MAX_ITER = 100
#: Buffers kept in float32 when the module is cast to a half-precision dtype.
_FLOAT32_BUFFERS = ("centroids", "temperature", "scale")


def replaying() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) computing a forward again. Such a forward
    starts from the centroids the step started from and moves none, so that it computes what
    the first forward did and a step moves the centroids once. Always false while
    ``torch.compile`` traces (no graph break; a compiled graph's replay is its own)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _is_half(dtype: torch.dtype) -> bool:
    """A floating dtype narrower than float32 (float16, bfloat16, the float8 types)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def stable_seed(base_seed: int, name: str) -> int:
    """A per-tensor seed that is the same in every process and every Python run (unlike
    ``hash``): ``base_seed`` mixed with the CRC32 of the parameter's name."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class DKMParametrization(nn.Module):
    """Differentiable k-means clustering of one weight tensor.

    Args:
        layout: how the weight is cut into palettes (:class:`~.layout.PaletteLayout`),
            including bits, cluster_dim and group_size.
        temperature: initial tau (> 0), in units of the palette's weight variance.
        max_iter: DKM iterations per forward (the paper and coremltools use 3).
        epsilon: early-stop threshold on centroid movement, in weight standard deviations; 0
            always runs ``max_iter`` iterations. Where the test is read back (eagerly on CPU)
            and where it stays on the device: :class:`~.numerics.EarlyStop`.
        seed: k-means++ seed of vector palettes (scalar ones get the exact 1-D k-means, which
            needs none); with :func:`stable_seed` every rank gets the same centroids.
        implementation: the DKM step (:data:`STEPS`): ``"unique"`` (cluster_dim 1: DKM of
            the weights' distinct float16 values, :mod:`.distinct`), ``"chunked"`` (exact, in
            bounded memory, :mod:`.chunked`), ``"reference"`` (plain autograd,
            :mod:`.reference`), or ``"auto"`` (default): per tensor, as
            :func:`resolve_implementation` says.
        chunk: weights per chunk for ``"chunked"``.
        gradient: ``"unrolled"`` (default: through every iteration) or ``"implicit"`` (IDKM: at
            the iterations' fixed point, work and memory independent of ``max_iter``; computed
            by the weighted core, :mod:`.weighted`, so not by ``"reference"``).
        mode: ``"soft"``, ``"hard"`` or ``"dense"`` (module docstring).

    The centroids are set by :meth:`initialize` (or by loading a state dict that holds them);
    a forward before that initialises them from the weight it is given, and :meth:`palette`
    refuses to snap to centroids that were never set.
    """

    centroids: Tensor
    temperature: Tensor
    initialized: Tensor

    def __init__(
        self,
        layout: PaletteLayout,
        *,
        temperature: float = 1e-2,
        max_iter: int = 3,
        epsilon: float = 1e-4,
        seed: int = 0,
        mode: Mode = "soft",
        implementation: Implementation = "auto",
        chunk: int = DEFAULT_CHUNK,
        gradient: Gradient = "unrolled",
    ) -> None:
        super().__init__()
        self.layout = layout
        self.max_iter = max_iter
        self.epsilon = float(epsilon)
        self.seed = int(seed)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
        self.implementation = implementation
        self.gradient = gradient
        self.step_implementation = resolve_implementation(implementation, layout, gradient)
        self.chunk = chunk
        #: The DKM step (:data:`Step`), bound once.
        self.step: Step = STEPS[self.step_implementation]
        #: The step an open :func:`~.clustering_pass.clustering_pass` hands this weight (its
        #: batched result, or :attr:`step` with the pass's settings); never state.
        self.pass_step: Step | None = None
        #: The accumulation window this weight is in (:mod:`.accumulation`: the soft weights
        #: computed once per optimizer step), or ``None``: a DKM step per training forward.
        self.window: SoftWindow | None = None
        #: The evaluation loop's cache of snapped weights this weight is in
        #: (:mod:`.snap_cache`: an eval-mode snap computed once per loop), or ``None``.
        self.snap_cache: SnapCache | None = None
        # The centroids a training step started from, for a forward that activation
        # checkpointing runs again in the backward (:func:`replaying`): it must start there
        # too, and move nothing.
        self._step_start: Tensor | None = None
        #: Whether the weight handed to the forward is already this step's soft weight
        #: (shard-local DKM under FSDP2 wrote it into the shards, :mod:`.shard_local`): every
        #: forward is then the identity, also in eval mode (a module switched to eval within
        #: the step): snapping the soft weight would cluster it twice, and ``finish`` turns its
        #: gradient into DKM's as for the soft weight.
        self.presoftened = False
        P, _, d = layout.palette_shape
        k = layout.spec.num_centroids
        self.register_buffer("centroids", torch.zeros(P, k, d, dtype=torch.float32))
        # Per-channel scales (layout.scale_shape), set with the centroids; only with the spec's
        # per_channel_scale, so other parametrizations' state dicts are unchanged.
        self.register_buffer("scale", None if layout.scale_shape is None else
                             torch.ones(layout.scale_shape, dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(1.0, dtype=torch.float32))
        # The buffer travels in checkpoints; the Python flag answers without a device read.
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False
        self.set_temperature(temperature)
        check_step_arguments(self.temperature, max_iter, epsilon)  # tau: set_temperature's
        self.mode: Mode = "soft"
        self.set_mode(mode)

    # -- state -------------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        """Whether the centroids have been set (by :meth:`initialize` or by loading a state dict
        whose ``initialized`` is true). A Python flag kept equal to the ``initialized`` buffer,
        so asking reads nothing back from the device (``bool(self.initialized)`` would sync)."""
        return self._initialized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Load as ``nn.Module`` does, then refresh :attr:`is_initialized` from the loaded
        buffer (one read, at load time) and keep centroids and tau in float32 (a half-precision
        checkpoint loaded with ``assign=True`` would replace them)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_float32({name: None for name in _FLOAT32_BUFFERS})
        self._initialized = bool(self.initialized)

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``to``, ``cuda``, ``half``, ...), except that centroids and tau
        stay float32 when it would make them half precision: they follow the device only.
        Lightning's ``16-true`` / ``bf16-true`` cast the whole model this way."""
        before = {name: self._buffers.get(name) for name in _FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        self._keep_float32(before)
        return self

    def _keep_float32(self, before: dict[str, Tensor | None]) -> None:
        """Buffers of ``before`` that became half precision: back to float32, from their value
        before the cast where there is one (no double rounding)."""
        for name, old in before.items():
            new = self._buffers.get(name)
            if new is not None and _is_half(new.dtype):
                source = new if old is None or _is_half(old.dtype) else old
                self._buffers[name] = source.to(device=new.device, dtype=torch.float32)

    def set_temperature(self, tau: float) -> None:
        """Set tau in place (``fill_``: the buffer keeps its identity, device and dtype)."""
        tau = float(tau)
        if not (tau > 0 and tau != float("inf")):
            raise ValueError(
                f"{self.layout.name}: temperature must be a finite number > 0; got {tau}"
            )
        self.temperature.fill_(tau)

    def set_mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"{self.layout.name}: mode must be one of {_MODES}; got {mode!r}")
        self.mode = mode

    @torch.no_grad()
    def initialize(self, weight: Tensor, generator: torch.Generator | None = None) -> None:
        """Centroids from k-means of ``weight``, computed on CPU in float32 with autocast off
        (:func:`~.kmeans.kmeans_centroids`): for scalars the optimal ones (a dynamic program
        over the sorted values, deterministic, no seed needed), for vectors seeded k-means++
        and Lloyd (deterministic for a seed)."""
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
        x = self._seeding_palettes(weight)
        with autocast_disabled("cpu"):
            centroids = kmeans_centroids(
                x,
                self.layout.spec.num_centroids,
                generator,
                max_iter=_INIT_MAX_ITER,
                name=self.layout.name,
            )
        self._seeded(centroids)

    def _seeding_palettes(self, weight: Tensor) -> Tensor:
        """What :meth:`initialize` clusters: ``weight`` checked, its per-channel scales set,
        as float32 palettes on CPU."""
        self.layout.check(weight)
        if self.scale is not None:
            self.scale.copy_(self.layout.channel_scale(weight))
        return self.to_palettes(weight.detach()).float().cpu()

    def _seeded(self, centroids: Tensor) -> None:
        self.centroids.copy_(centroids.to(self.centroids.dtype))
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def set_centroids(self, centroids: Tensor, scale: Tensor | None = None) -> None:
        """Start from given centroids ``(P, k, d)`` (e.g. another method's palettes, or a
        sensitivity-weighted k-means) instead of :meth:`initialize`'s k-means; marks the
        parametrization initialised. With ``per_channel_scale`` the centroids are in scaled
        units and ``scale`` (one per output channel, ``Palette.scale``) is required. A wrong
        shape or a non-finite value is an error (:meth:`~.layout.PaletteLayout.check_scale`)."""
        self.layout.check_scale(scale)
        expected = tuple(self.centroids.shape)
        if tuple(centroids.shape) != expected:
            raise ValueError(
                f"{self.layout.name}: centroids must have shape {expected} (palettes, 2**bits, "
                f"cluster_dim); got {tuple(centroids.shape)}"
            )
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError(f"{self.layout.name}: centroids contain NaN or Inf values")
        self.centroids.copy_(centroids.detach().to(self.centroids))
        if scale is not None:
            self.scale.copy_(scale.detach().to(self.scale))
        self.initialized.fill_(True)
        self._initialized = True

    def to_palettes(self, weight: Tensor) -> Tensor:
        """``weight`` as the palettes ``(P, n, d)`` that the centroids cluster: the layout's
        view, each output channel divided by its scale with ``per_channel_scale``."""
        return self.layout.to_palettes(weight, self.scale)

    def from_palettes(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_palettes`: palettes back to the weight's shape and units."""
        return self.layout.from_palettes(x, self.scale)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, weight: Tensor) -> Tensor:
        """The clustered weight (module docstring), in the dtype of ``weight``; the DKM step
        and the snap run in float32 with autocast off. Centroids that were never set are
        initialised from ``weight`` first (a Python flag: no device read). A
        :attr:`presoftened` weight is returned as it is, whatever the module's mode."""
        if self.mode == "dense" or self.presoftened:
            return weight
        if not self.is_initialized:
            self.initialize(weight)
        with autocast_disabled(weight.device.type):
            return self._clustered(weight)

    def _clustered(self, weight: Tensor) -> Tensor:
        """The soft (training) or snapped weight of an initialised parametrization: the step
        (:attr:`pass_step` inside a clustering pass) on the layout's step view, read back; in
        an accumulation window (:attr:`window`) computed once per window; the eval-mode snap
        served from an open :attr:`snap_cache` where it may be."""
        soft = self.mode == "soft" and self.training
        window = self.window if soft else None
        if window is not None and window.has():
            return window.read()
        # A replay starts where the step started; so does a window's step computed again with
        # DKM's graph (its first forward ran without one, e.g. in a reentrant checkpoint).
        replay = self._step_start is not None and (
            replaying() or (window is not None and window.soft is not None))
        start = self._step_start if replay else self.centroids
        cache = None if self.training or replay else self.snap_cache
        if cache is not None and (kept := cache.get(self, weight)) is not None:
            return kept
        x = self.layout.step_view(weight, self.scale)
        if soft:
            step = self.step if self.pass_step is None else self.pass_step
            # a window's graph is kept to its last backward, past this micro-batch's hooks
            with contextlib.nullcontext() if window is None else outside_saved_tensor_hooks():
                config = StepConfig(self.max_iter, self.epsilon, self.gradient, self.chunk)
                result = step(x, start, self.temperature, config)
                soft_weight = self.layout.from_step_view(result.weights, self.scale)
            if not replay:
                self.keep_centroids(result.centroids)
            if window is None:
                return soft_weight
            window.keep(soft_weight)
            return window.read()
        idx, snapped = hard_assign(x, start)
        if self.mode == "hard" and self.training and not replay:
            # one Lloyd step from the assignment just made: each centroid to its members' mean
            self._step_start = self.centroids.detach().clone()
            means, counts = member_means(x.detach().float(), idx, self.centroids.shape[1])
            self.centroids.copy_(torch.where(counts.unsqueeze(-1) > 0, means,
                                             self.centroids.float()))
        # Straight-through: the value is the snapped weight, the gradient is the identity. Adding
        # the exact zero ``x - x.detach()`` keeps the value bit-for-bit ``snapped``
        # (``x + (snapped - x)`` rounds, giving more than 2**bits distinct values).
        clustered = self.layout.from_step_view(snapped + (x - x.detach()), self.scale)
        if cache is not None:
            cache.put(self, weight, clustered)
        return clustered

    @torch.no_grad()
    def keep_centroids(self, centroids: Tensor) -> None:
        """Move the centroids to where a training step ended (in place), remembering where it
        started for an activation-checkpoint replay (:func:`replaying`). A no-op while
        :attr:`presoftened`: shard-local DKM moved them for this step already (a clustering
        pass that batched this weight with others of its FSDP unit computed a step of the soft
        weight, which no forward reads)."""
        if self.presoftened:
            return
        start = self._step_start
        if start is None or start.shape != self.centroids.shape or start.dtype != \
                self.centroids.dtype or start.device != self.centroids.device:
            self._step_start = self.centroids.detach().clone()
        else:  # in place: no allocation and no module attribute set per step
            start.copy_(self.centroids)
        self.centroids.copy_(centroids)

    # -- inspection and finalize -------------------------------------------------------------
    @torch.no_grad()
    def soft_assignment_chunks(
        self, weight: Tensor, chunk_rows: int = 1 << 16
    ) -> Iterator[Tensor]:
        """The current soft assignments (P, rows, k), a chunk of rows at a time, without
        gradient: for metrics such as assignment entropy on tensors of any size.

        They are the training step's attention (:func:`~.weighted.attention`): an entry below
        ``e^-LOGIT_FLOOR`` (9e-27) of its row's largest is exactly 0, as in the step. A plain
        softmax sent such entries through ``exp``'s slow path into subnormal numbers: the
        epoch end's statistics on MiniLM's encoder at 4 bits took 2.05 s against 1.58 s now
        (``benchmarks/perf_epoch_end.py``); they agree to float rounding (1e-9)."""
        for xt, centroids, inv_tau in self._soft_assignment_parts(weight, chunk_rows):
            with autocast_disabled(xt.device.type):
                assignment = attention(xt, centroids, inv_tau)
            yield assignment.transpose(1, 2)

    @torch.no_grad()
    def soft_assignment_entropy(self, weight: Tensor,
                                chunk_rows: int = 1 << 16) -> tuple[Tensor, int]:
        """The entropy in nats of every row of :meth:`soft_assignment_chunks`, summed, and the
        number of rows: ``(float64 0-dim tensor, int)``, the sum on the weight's device (on
        the CPU for an MPS weight: MPS has no float64). It is computed from the logits
        (:func:`~.weighted.attention_entropy`) without forming the assignments: the epoch
        end's mean entropy in less time than ``-sum p log p`` of the chunks
        (``benchmarks/perf_epoch_end.py``), equal to it to float rounding."""
        device = torch.device("cpu") if weight.device.type == "mps" else weight.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        for xt, centroids, inv_tau in self._soft_assignment_parts(weight, chunk_rows):
            with autocast_disabled(xt.device.type):
                entropy = attention_entropy(xt, centroids, inv_tau)
            total += entropy.to(device).sum(dtype=torch.float64)
            rows += entropy.numel()
        return total, rows

    def _soft_assignment_parts(
        self, weight: Tensor, chunk_rows: int
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The normalised points (P, d, rows) of ``weight`` a chunk at a time, with the
        normalised centroids and ``1 / tau``: what the attention of the current step takes,
        in float32 or wider (to be used outside autocast)."""
        if not is_int(chunk_rows, 1):
            raise ValueError(f"chunk_rows must be an int >= 1; got {chunk_rows!r}")
        problem = normalized_problem(self.to_palettes(weight.detach()).float(), self.centroids,
                                     self.temperature, self.max_iter, self.epsilon, None)
        xt = problem.x.transpose(1, 2)
        inv_tau = inverse_temperature(self.temperature, xt.dtype)
        for part in chunks(xt.shape[2], chunk_rows):
            yield xt[:, :, part], problem.centroids, inv_tau

    @torch.no_grad()
    def palette(self, weight: Tensor) -> Palette:
        """Hard-assign ``weight`` to the current centroids: the LUT and indices it ships as.

        Raises:
            RuntimeError: the centroids were never initialised (they would be all zeros, and
                every weight would snap to 0).
        """
        if not self.is_initialized:
            raise RuntimeError(
                f"{self.layout.name}: the DKM centroids were never initialised, so there is no "
                "palette to snap to; call initialize(weight) first (or load a state_dict that "
                "holds initialised centroids)"
            )
        self.layout.check(weight)
        x = self.to_palettes(weight.detach())
        idx, _ = hard_assign(x, self.centroids)
        lut = self.centroids.to(weight.dtype).clone()
        scale = None if self.scale is None else self.scale.to(weight.dtype).clone()
        return Palette(lut=lut, indices=idx, layout=self.layout, scale=scale)

    def extra_repr(self) -> str:
        spec = self.layout.spec
        return (
            f"bits={spec.bits}, cluster_dim={spec.cluster_dim}, group_size={spec.group_size}, "
            f"per_channel_scale={spec.per_channel_scale}, "
            f"palettes={self.layout.num_palettes}, max_iter={self.max_iter}, mode={self.mode!r}, "
            f"implementation={self.implementation!r} ({self.step_implementation}), "
            f"gradient={self.gradient!r}"
        )


@torch.no_grad()
def initialize_many(pairs: Sequence[tuple[DKMParametrization, Callable[[], Tensor]]]) -> None:
    """:meth:`DKMParametrization.initialize` of each ``(parametrization, weight)`` (``weight``
    a callable that returns the whole weight: FSDP2 gathers a sharded one), bit for bit the
    same centroids, with the scalar palettes of consecutive tensors clustered together by one
    batched dynamic program (:func:`~.kmeans.kmeans_centroids_many`, at most
    :data:`~.kmeans.WAVE_WEIGHTS` weights at once): the fixed cost of a call is paid once per
    batch, not once per tensor (MiniLM's 36 encoder Linears at 4 bits: ``docs/benchmarks.md``,
    "DKM's start: seeding and tau calibration"). Vector palettes are seeded one at a time.
    Under FSDP2 the weights of a batch are gathered together (at most that many)."""
    sizes = [math.prod(p.layout.shape) for p, _ in pairs]
    for run in waves(sizes):
        scalars = []
        for i in run:
            p, weight = pairs[i]
            if p.layout.spec.cluster_dim != 1:
                p.initialize(weight())
                continue
            scalars.append((p, p._seeding_palettes(weight())))
        with autocast_disabled("cpu"):
            centroids = kmeans_centroids_many(
                [(x, p.layout.spec.num_centroids, p.layout.name) for p, x in scalars])
        for (p, _), c in zip(scalars, centroids, strict=True):
            p._seeded(c)
