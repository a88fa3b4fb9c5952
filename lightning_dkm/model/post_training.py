r"""Post-training palettization: k-means on the chosen weights, no training.

This is the baseline every study compares DKM against: the same targets, the same palette
format (LUT + indices) and the same report, but the centroids come from k-means on the trained
weights alone, without letting the loss adapt the weights to them.

Two objectives are offered:

* **plain** (the default): per palette, minimise :math:`\sum_i \lVert w_i - c_{a(i)}\rVert^2`,
  every weight (vector) counting the same.
* **sensitivity-weighted** (``calibration=(dataloader, loss_fn)``; SqueezeLLM, Kim et al. 2023,
  arXiv 2306.07629; coremltools' ``SKMPalettizer``): minimise the loss increase that the
  snapping causes. With :math:`\delta = w - \hat w` the change a palettization makes, a Taylor
  expansion of the loss around the trained weights gives

  .. math::

      L(\hat w) - L(w) \approx -g^\top \delta + \tfrac12\, \delta^\top H \delta
      \approx \tfrac12 \sum_i F_{ii}\,(w_i - c_{a(i)})^2 ,

  because at a trained model the gradient :math:`g` is close to 0, the Hessian :math:`H` is
  approximated by the Fisher information :math:`F`, and :math:`F` by its diagonal, the sum over
  calibration batches of the squared gradients (:func:`fisher_diagonal`). The right-hand side
  is k-means with sample weights :math:`F_{ii}`: Lloyd moves each centroid to the
  Fisher-weighted mean of its members, :math:`c_j = \sum_{a(i)=j} F_{ii} w_i / \sum_{a(i)=j}
  F_{ii}`, and k-means++ seeds with probability :math:`\propto F_{ii} D_i^2`, so the palette
  spends its entries where the loss is sensitive. (The assignment, nearest centroid, does not
  change: a positive weight does not move the argmin.)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.kmeans import kmeans, kmeans_scalars, waves
from ..engine.layout import ClusterSpec, PaletteLayout, is_int
from ..engine.numerics import all_finite, random_states
from ..engine.palette import Palette
from ..engine.parametrization import stable_seed
from .bit_budget import (
    DEFAULT_BITS,
    SENSITIVITY_BATCHES,
    SENSITIVITY_SAMPLES,
    UNIFORM,
    check_budget,
    fixed_by_overrides,
    plan_widths,
    uniform_allocation,
)
from .carried import carry_palettes
from .eval_mode import in_eval_mode
from .targets import DEFAULT_MIN_SIZE, Target, select_targets

__all__ = [
    "Calibration",
    "LossFn",
    "allocation_curvature",
    "first_samples",
    "fisher_diagonal",
    "hessian_diagonal",
    "hessian_diagonal_fd",
    "no_double_backward",
    "palettize",
]

#: ``loss_fn(model, batch) -> scalar loss``: what :func:`fisher_diagonal` differentiates.
LossFn = Callable[[nn.Module, Any], Tensor]
#: ``(dataloader, loss_fn)``: the calibration data of a sensitivity-weighted :func:`palettize`.
Calibration = tuple[Iterable[Any], LossFn]

# Weights below this fraction of their palette's mean sensitivity are raised to it, so that a
# weight without gradient still pulls a centroid once the sensitive ones are all covered.
_FISHER_FLOOR = 1e-8


@torch.no_grad()
def palettize(
    model: nn.Module,
    bits: int | None = None,
    cluster_dim: int = 1,
    group_size: int | None = None,
    targets: Iterable[str] | str | None = None,
    *,
    per_channel_scale: bool = False,
    exclude: Iterable[str] | str | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
    calibration: Calibration | None = None,
    calibration_batches: int | None = None,
    average_bits: float | None = None,
    allowed_bits: Iterable[int] | None = None,
    progress: bool | None = None,
) -> dict[str, Palette]:
    r"""Cluster the selected weights of ``model`` in place with k-means and return their palettes.

    Without ``calibration`` every weight counts the same (plain k-means). With it, k-means is
    weighted by each weight's sensitivity :math:`F_{ii}`, the diagonal Fisher information of the
    calibration loss (SqueezeLLM; see the module docstring): it minimises
    :math:`\sum_i F_{ii} (w_i - c_{a(i)})^2`, the second-order estimate of the loss increase.

    Args:
        model: any ``nn.Module``; its targeted weights are overwritten with their snapped values.
        bits, cluster_dim, group_size: the default
        :class:`~lightning_dkm.engine.layout.ClusterSpec` (``bits`` ``None``: 4, or chosen
        per tensor by ``average_bits``, which then must be the only width given).
        per_channel_scale: cluster each output channel divided by its largest ``|weight|``
            and store those scales with the palette (see :mod:`lightning_dkm.layout`); with
            ``calibration`` the sensitivities are rescaled to match (:math:`F_{ii} s_c^2`).
        targets, exclude, min_size, overrides: which tensors, as in
            :func:`~lightning_dkm.model.targets.select_targets`.
        seed: k-means++ seed for vector palettes (``cluster_dim > 1``); each tensor uses
            ``stable_seed(seed, name)``. Scalar palettes get the optimal k-means (a dynamic
            program over the sorted values, :mod:`lightning_dkm.engine.optimal1d`), which
            needs no seed.
        n_init: k-means restarts per vector palette (the best inertia is kept; weighted
            inertia when calibrated); scalars need none.
        max_iter: Lloyd iterations at most (vector palettes).
        calibration: ``None`` (default) for plain k-means, or a pair ``(dataloader, loss_fn)``
            for sensitivity-weighted k-means: ``dataloader`` is any iterable of batches (a
            one-shot iterator such as a generator is read once, also with ``average_bits``) and
            ``loss_fn(model, batch)`` returns the scalar loss (see :func:`fisher_diagonal`,
            which computes the sensitivities of all targets in one pass, before any weight
            is snapped). With ``cluster_dim = d > 1`` a d-vector's weight is the sum of its
            coordinates' :math:`F_{ii}` (the objective becomes
            :math:`\sum_v (\sum_{i \in v} F_{ii}) \lVert w_v - c_{a(v)}\rVert^2`, exact when the
            coordinates of a vector are equally sensitive). A palette whose weights all have
            zero gradient is clustered unweighted, with a warning naming the tensor.
        calibration_batches: with ``calibration``, read at most this many batches (``None``:
            the whole dataloader).
        average_bits: choose each tensor's width under the bytes of every tensor at this many
            bits (a number in [1, 8]), as ``DKMCallback(average_bits=...)`` does
            (:func:`~lightning_dkm.model.bit_budget.plan_widths`): the errors weighted by the
            Hessian diagonal of the calibration loss (:func:`allocation_curvature`: on the
            first ``SENSITIVITY_SAMPLES`` samples of at most ``SENSITIVITY_BATCHES``
            batches; the Fisher information is rounding noise where a loss starts at its
            minimum), uniform widths with a warning where the loss has no second derivative
            (:func:`~lightning_dkm.model.bit_budget.uniform_allocation`), or the squared
            error alone without ``calibration``; an override's ``bits`` fixes that tensor's
            width and counts against the budget. The
            widths chosen are the palettes' ``layout.spec.bits``. Default ``None``: ``bits``.
        allowed_bits: the widths ``average_bits`` may choose (default 1..8).
        progress: a tqdm progress bar over the tensors on stderr, as Lightning's: ``None``
            (default) shows it when stderr is a terminal (not in a pipe, a log file or CI),
            ``True`` always, ``False`` never.

    Returns:
        ``{parameter name: Palette}``; ``palette.weight()`` equals the new weight bit for bit.
        The model carries them too (:func:`~lightning_dkm.model.carried.carry_palettes`).

    Raises:
        ValueError: a spec that does not fit a tensor, non-finite or non-float weights, a
            malformed ``calibration`` or ``calibration_batches``, and the errors of
            :func:`fisher_diagonal`.
    """
    _check_calibration(calibration, calibration_batches)
    average_bits, widths = check_budget(bits, average_bits, allowed_bits)
    spec = ClusterSpec(bits=DEFAULT_BITS if bits is None else bits, cluster_dim=cluster_dim,
                       group_size=group_size, per_channel_scale=per_channel_scale)
    selected = select_targets(
        model, spec, targets=targets, exclude=exclude, min_size=min_size, overrides=overrides
    )
    modules = dict(model.named_modules())
    weights = {t.name: getattr(modules[t.module_name], t.param_name) for t in selected}
    for target in selected:
        target.layout.check(weights[target.name])
    fisher: dict[str, Tensor] = {}
    curvature_batches = min(calibration_batches or SENSITIVITY_BATCHES, SENSITIVITY_BATCHES)
    if calibration is not None and selected:
        dataloader, loss_fn = calibration
        if average_bits is not None:  # two readers
            dataloader, head = _read_twice(dataloader, curvature_batches)
            calibration = (head, loss_fn)
        fisher = fisher_diagonal(
            model, dataloader, loss_fn, list(weights), num_batches=calibration_batches
        )
    if average_bits is not None and selected:
        fixed = fixed_by_overrides(selected, overrides)
        free = [n for n in weights if n not in fixed]
        if calibration is None:  # no data: the squared error alone
            allocation = plan_widths(selected, weights, average_bits, fixed=fixed,
                                     allowed_bits=widths, seed=seed)
        else:  # the allocation weighs by curvature, as DKMCallback's
            curvature, label = allocation_curvature(model, *calibration, free,
                                                    curvature_batches, SENSITIVITY_SAMPLES, seed)
            if curvature is None:
                warnings.warn(f"palettize(average_bits={average_bits:g}): {label}; {UNIFORM}",
                              UserWarning, stacklevel=2)
                allocation = uniform_allocation(selected, weights, average_bits, label,
                                                fixed=fixed, allowed_bits=widths, seed=seed)
            else:
                allocation = plan_widths(selected, weights, average_bits, fixed=fixed,
                                         sensitivity=curvature, sensitivity_label=label,
                                         allowed_bits=widths, seed=seed)
        selected = allocation.apply(selected)

    palettes: dict[str, Palette] = {}
    bar = _progress(len(selected), progress)
    for wave in _waves(selected):
        scales = {t.name: t.layout.channel_scale(weights[t.name]) for t in wave}
        fits = _cluster(wave, weights, scales, fisher, seed=seed, n_init=n_init,
                        max_iter=max_iter)
        for target in wave:
            weight, scale = weights[target.name], scales[target.name]
            centroids, labels = fits.pop(target.name)
            palette = Palette(centroids, labels, target.layout, scale).to(weight.device,
                                                                          weight.dtype)
            weight.copy_(palette.weight())
            palettes[target.name] = palette
            bar.set_postfix_str(target.name, refresh=False)
            bar.update()
    bar.close()
    carry_palettes(model, palettes)
    return palettes


def _waves(selected: list[Target]) -> list[list[Target]]:
    """``selected`` in consecutive runs of at most :data:`~lightning_dkm.engine.kmeans.WAVE_WEIGHTS`
    weights: a wave's scalar tensors share one batched dynamic program, their float32 values
    and labels held at once."""
    return [[selected[i] for i in run]
            for run in waves([math.prod(t.layout.shape) for t in selected])]


def _cluster(wave: list[Target], weights: Mapping[str, Tensor],
             scales: Mapping[str, Tensor | None], fisher: Mapping[str, Tensor], *, seed: int,
             n_init: int, max_iter: int) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (centroids, labels)}`` of every tensor of ``wave``: the scalar palettes
    together (:func:`~lightning_dkm.engine.kmeans.kmeans_scalars`, one batched program), the
    vector ones by :func:`~lightning_dkm.engine.kmeans.kmeans`, seeded per tensor."""
    problems = {}
    for target in wave:
        layout, scale = target.layout, scales[target.name]
        x = layout.to_palettes(weights[target.name].detach(), scale).float().cpu()
        sample_weight = None
        if target.name in fisher:
            sensitivity = fisher[target.name]
            if scale is not None:  # an error of e in scaled units is s * e in the weight's
                sensitivity = sensitivity * layout.broadcast_scale(scale.to(sensitivity)) ** 2
            sample_weight = _sample_weights(layout, sensitivity)
        problems[target.name] = (x, layout.spec.num_centroids, sample_weight, target.name)
    scalar = [name for name, (x, *_) in problems.items() if x.shape[-1] == 1]
    fits = dict(zip(scalar, kmeans_scalars([problems[name] for name in scalar]), strict=True))
    for name, (x, k, sample_weight, _) in problems.items():
        if name not in fits:
            generator = torch.Generator().manual_seed(stable_seed(seed, name))
            result = kmeans(x, k, generator, n_init=n_init, max_iter=max_iter,
                            sample_weight=sample_weight, name=name)
            fits[name] = result.centroids, result.labels
    return fits


def _progress(total: int, progress: bool | None):
    """A tqdm progress bar over ``total`` tensors (tqdm comes with Lightning); ``disable=None``
    is tqdm's own rule: off when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="palettize", unit="tensor",
                disable=None if progress is None else not progress)


def allocation_curvature(model: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn,
                         names: list[str], num_batches: int, samples: int | None, seed: int = 0
                         ) -> tuple[dict[str, Tensor] | None, str]:
    """The Hessian diagonal that weighs ``average_bits``' estimate: :func:`hessian_diagonal`
    on the first ``num_batches`` batches, each cut to its first ``samples`` samples
    (:func:`first_samples`; ``None``: whole), and how it was had (the allocation's
    ``sensitivity`` label). Where the loss has no second derivative (an op without a double
    backward, :func:`no_double_backward`: a fused attention kernel, a ``once_differentiable``
    function, a compiled module) the same estimate by finite differences of two plain
    gradients (:func:`hessian_diagonal_fd`, labelled ``"hessian by finite differences
    (...)"``): not always, because on a ReLU network it also counts the kinks its step crosses
    and so chooses other widths than the double backward, whose allocations the accuracy study
    measured (``benchmarks/hessian_fd.py``). ``None`` and why only where neither can be had
    (no gradient either): the caller then warns and chooses uniform widths
    (:func:`~.bit_budget.uniform_allocation`). Any other error is raised. What ``palettize``
    and ``DKMCallback`` both use."""
    if samples is not None and not is_int(samples, 1):
        raise ValueError(f"samples must be None or an int >= 1; got {samples!r}")
    batches = list(itertools.islice(dataloader, num_batches))
    parts = [first_samples(batch, samples) for batch in batches]
    cut = sum(part is not batch for part, batch in zip(parts, batches, strict=True))
    how = "hessian"
    try:
        hessian = hessian_diagonal(model, parts, loss_fn, names, seed=seed)
    except RuntimeError as err:
        if not no_double_backward(err):
            raise
        try:
            hessian = hessian_diagonal_fd(model, parts, loss_fn, names, seed=seed)
        except RuntimeError as fd_err:
            return None, (f"the loss has no second derivative here ({err}) and no gradient "
                          f"for a finite difference ({fd_err})")
        how = "hessian by finite differences"
    label = f"{how} ({len(batches)} batch{'es' if len(batches) != 1 else ''}"
    if samples is not None:
        label += (f", the first {samples} samples of each" if cut == len(batches) else
                  f", the first {samples} samples of {cut}" if cut else ", whole")
    return hessian, label + ")"


#: What PyTorch says when an op of a loss has no double backward, lower-cased: a kernel
#: without a derivative formula of its backward ("derivative for aten::... is not
#: implemented", ``NotImplemented`` nodes; "the derivative for '...' is not implemented."),
#: a module compiled by ``torch.compile`` ("torch.compile with aot_autograd does not currently
#: support double backward"), cuDNN RNNs ("double backwards is not supported"), grid_sampler
#: and scatter_reduce ("double backward not implemented / is unsupported"), an
#: ``autograd.Function`` marked ``once_differentiable`` whose result is differentiated twice
#: ("trying to differentiate twice"); and what :func:`hessian_diagonal` says when no gradient
#: has a graph to differentiate again (a loss whose every path runs through such a function).
#: A user's own "... is not implemented" (a ``NotImplementedError`` is a ``RuntimeError``)
#: is none of these.
_NO_DOUBLE_BACKWARD = ("double backward", "differentiate twice", "no graph to differentiate again")


def no_double_backward(err: BaseException) -> bool:
    """Whether ``err`` (from :func:`hessian_diagonal`) says that the loss has no second
    derivative (:data:`_NO_DOUBLE_BACKWARD`, or autograd's "derivative for ... is not
    implemented"), as opposed to any other failure of the loss, which ``average_bits`` must
    not hide behind a fallback."""
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return (any(m in text for m in _NO_DOUBLE_BACKWARD)
            or ("derivative for " in text and "not implemented" in text))


def first_samples(batch: Any, samples: int | None) -> Any:
    """``batch`` cut to its first ``samples`` samples: every tensor in it (also inside tuples,
    lists, named tuples and mappings, as :func:`_to_device` walks it) to its first
    ``samples`` rows, where every leaf is a tensor of at least one dimension and all share
    their first dimension, larger than ``samples``. Else ``batch`` itself (``None``; a batch
    of other objects, or of tensors whose first dimensions differ, has no one axis of samples
    to cut). The Hessian-vector product costs in proportion to the samples."""
    if samples is None:
        return batch
    leaves = _leaves(batch)
    if not leaves or not all(isinstance(t, Tensor) and t.dim() > 0 for t in leaves):
        return batch
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) != 1 or sizes.pop() <= samples:
        return batch
    return _mapped(batch, lambda t: t[:samples])


def _leaves(batch: Any) -> list[Any]:
    """Everything in ``batch`` that is not a tuple, list or mapping, in order."""
    if isinstance(batch, (tuple, list)):
        return [leaf for b in batch for leaf in _leaves(b)]
    if isinstance(batch, Mapping):
        return [leaf for b in batch.values() for leaf in _leaves(b)]
    return [batch]


def _mapped(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor, also inside tuples, lists, named tuples
    and mappings (as new containers; a mapping becomes a plain ``dict``); everything else
    unchanged."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_mapped(b, fn) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_mapped(b, fn) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _mapped(v, fn) for k, v in batch.items()}
    return batch


def fisher_diagonal(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    names: Iterable[str] | str,
    num_batches: int | None = None,
) -> dict[str, Tensor]:
    r"""The diagonal of the empirical Fisher information of the named weights:
    :math:`F_{ii} = \sum_b \left(\partial L_b / \partial w_i\right)^2`, summed over batches.

    :math:`L_b` is ``loss_fn(model, batch)`` on batch ``b`` of ``dataloader``. For a loss that
    averages over a batch this is the squared gradient of the batch mean; batches of one sample
    give the per-sample empirical Fisher that SqueezeLLM uses. Only relative values matter to
    :func:`palettize`, so the sum (not the mean) over batches is returned.

    ``loss_fn`` receives the model and one batch as the dataloader yields it (its tensors, also
    inside tuples, lists and dicts, moved to the device of the first named weight) and returns
    a scalar tensor; it must not call ``backward`` itself. For a classifier fed ``(x, y)``
    batches::

        def loss_fn(model, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        fisher = fisher_diagonal(model, val_loader, loss_fn, ["fc.weight"], num_batches=8)

    The model is left as it was: the gradients are taken in eval mode (no dropout, batch-norm
    running statistics neither used for the batch nor updated) and every module's ``training``
    flag is restored after; the gradients are returned by ``torch.autograd.grad``, so no
    ``.grad`` is written; only the named weights require grad during the pass (a frozen weight
    is measured too) and every parameter's ``requires_grad`` is restored; weights are not
    changed. Runs under ``torch.no_grad()`` too (it enables grad for its own pass).

    Args:
        model: any ``nn.Module``.
        dataloader: an iterable of batches (a ``DataLoader``, a list, a generator).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``.
        names: parameter names as ``model.named_parameters()`` spells them (``"0.weight"``).
        num_batches: read at most this many batches; ``None`` reads the whole dataloader.

    Returns:
        ``{name: F}`` with ``F`` of the weight's shape, float32, on the weight's device; a
        weight the loss does not reach gets zeros.

    Raises:
        ValueError: an unknown or non-floating parameter name, ``num_batches`` not ``None`` or
            an int >= 1, a dataloader without batches, a loss that is not a scalar tensor or
            does not depend on any named weight, and a non-finite result (the loss or its
            gradient overflowed or was NaN).
    """
    def squared_gradients(loss: Callable[[], Tensor], params: list[Tensor]
                          ) -> list[Tensor | None]:
        grads = torch.autograd.grad(loss(), params, allow_unused=True)
        return [None if g is None else g.detach().float().square() for g in grads]

    return _summed_over_batches(model, dataloader, loss_fn, names, num_batches,
                                squared_gradients, "the Fisher information (squared loss "
                                "gradients)")


def hessian_diagonal(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    names: Iterable[str] | str,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    r"""Hutchinson's estimate of the Hessian diagonal of the named weights, summed over
    batches and clipped at 0: :math:`\max(0, \sum_b z_b \odot H_b z_b)` with one Rademacher
    vector :math:`z_b` (entries :math:`\pm 1`, drawn from ``seed``) per batch and
    :math:`H_b z_b` by a second backward pass through the gradient (HAWQ-V2, Dong et al. 2020).

    Unlike the squared gradients of :func:`fisher_diagonal` it measures curvature where the
    gradient is 0: a loss at its minimum at the measured weights (distillation toward the model
    itself, a converged fine-tune) has squared gradients of rounding noise (1e-21 on the
    accuracy study's MiniLM) but its true curvature. It costs about three backward passes per
    batch and needs every op of the loss to have a double backward: attention runs in
    PyTorch's math kernel inside (the fused CPU kernels have none); another op without one
    raises ``RuntimeError`` (:func:`no_double_backward` tells which). An
    ``autograd.Function`` marked ``once_differentiable`` on some of the loss's paths only is
    not detected: PyTorch raises nothing and the curvature through it is missing. Same
    arguments, model handling and errors as :func:`fisher_diagonal`.
    """
    generator = torch.Generator().manual_seed(seed)

    def curvature(loss: Callable[[], Tensor], params: list[Tensor]) -> list[Tensor | None]:
        grads = torch.autograd.grad(loss(), params, create_graph=True, allow_unused=True)
        zs = _rademacher(generator, params)
        out: list[Tensor | None] = [None] * len(grads)  # a gradient without graph: 0
        curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not curved:  # nothing to differentiate again: linear, or a backward without graph
            raise RuntimeError(
                "the loss's gradient of the named weights has no graph to differentiate again: "
                "the loss is linear in them or its backward is not differentiable, and the "
                "Hessian diagonal cannot tell which")
        hz = torch.autograd.grad([grads[i] for i in curved], [params[i] for i in curved],
                                 grad_outputs=[zs[i] for i in curved], allow_unused=True)
        for i, h in zip(curved, hz, strict=True):
            if h is not None:
                out[i] = zs[i].mul_(h).float()  # in place: z is not read again
        return [torch.zeros_like(g, dtype=torch.float32) if o is None and g is not None else o
                for o, g in zip(out, grads, strict=True)]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        total = _summed_over_batches(model, dataloader, loss_fn, names, num_batches, curvature,
                                     "the Hessian diagonal")
    return {name: value.clamp_min_(0) for name, value in total.items()}


#: The finite difference's step of :func:`hessian_diagonal_fd`, relative to the rms over all
#: named weights: 1e-3 gives the double backward's :math:`z \odot Hz` to at most 2.6e-4 per
#: tensor on MiniLM's encoder, 6.4e-4 on the char-LM, 1e-4 on small tanh networks; 1e-2 was
#: off by 1e-2 to 3 there (the step's truncation; a ReLU's kinks), 1e-4 loses digits to
#: float32 rounding (1e-3) (``benchmarks/hessian_fd.py``, docs/results.md).
FD_STEP = 1e-3


def hessian_diagonal_fd(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    names: Iterable[str] | str,
    num_batches: int | None = None,
    seed: int = 0,
    step: float = FD_STEP,
) -> dict[str, Tensor]:
    r""":func:`hessian_diagonal`'s estimate (the same Rademacher vectors :math:`z_b` from
    ``seed``) with each Hessian-vector product a central difference of two plain gradients
    instead of a double backward:
    :math:`H_b z_b \approx (g_b(w + \epsilon z_b) - g_b(w - \epsilon z_b)) / 2\epsilon`.

    Two ordinary forward and backward passes per batch, so any loss that trains works: no op
    needs a double backward (fused attention kernels, ``torch.compile``, an
    ``autograd.Function`` marked ``once_differentiable``), and attention keeps its default
    kernels. :math:`\epsilon` is one number for all named weights, ``step`` times their rms
    taken together (raised to :math:`\sqrt{\text{eps}}` of the least precise dtype among
    them: 0.031 for float16, 0.088 for bfloat16, where a step of 1e-3 would not move most
    weights at all), so the probe stays :math:`z_b` and the estimate is
    :func:`hessian_diagonal`'s up to the difference's error (2.5e-4 per tensor on MiniLM's
    encoder), not the differently scaled probe a per-tensor step would make. A tensor whose
    weights are far smaller than the others' takes a step large against its own scale and a
    far larger one a step small against its rounding, so the error grows there
    (docs/results.md). Where the loss has kinks (ReLU, max-pooling), the difference sees the
    gradient's jumps across those that the step crosses, which the double backward (a
    ReLU's second derivative is 0) does not: there the two estimates differ (by 11-18x on a
    small ReLU network at the default step; MiniLM and the char-LM use GELU). In
    float16/bfloat16 the step is taken in the weight's dtype, so each weight moves by its
    rounded step (within half an ulp of :math:`\epsilon`).

    Both gradients of a batch see the same randomness: the torch CPU and CUDA generators and
    Python's ``random`` and numpy's global state (where numpy is imported) are saved before
    the first pass and restored before the second, so a loss that masks or augments at random
    is differenced at the same draws (and the generators are left as one pass leaves them).
    The weights are copied back bit for bit after every batch (also when the loss raises);
    otherwise the model handling, arguments and errors are :func:`fisher_diagonal`'s. A loss
    that has no gradient at all raises autograd's ``RuntimeError``. A loss linear in the
    weights gets 0.
    """
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step < 1:
        raise ValueError(f"step must be a number in (0, 1); got {step!r}")
    generator = torch.Generator().manual_seed(seed)
    epsilon: list[float] = []  # one for the call, from the weights as they come in

    def curvature(loss: Callable[[], Tensor], params: list[Tensor]) -> list[Tensor | None]:
        zs = _rademacher(generator, params)
        unique = list({id(p): p for p in params}.values())  # a tied weight moves once
        if not epsilon:
            epsilon.append(_fd_epsilon(unique, step))
        eps = epsilon[0]
        saved = [p.detach().clone() for p in unique]
        states = random_states()

        def gradients(sign: float) -> tuple[Tensor | None, ...]:
            with torch.no_grad():
                for p, w in zip(unique, saved, strict=True):
                    p.copy_(w)
                for p, z in zip(params, zs, strict=True):
                    p.add_(z, alpha=sign * eps)
            for setter, state in states:
                setter(state)
            return torch.autograd.grad(loss(), params, allow_unused=True)

        try:
            plus = gradients(1.0)
            minus = gradients(-1.0)
        finally:
            with torch.no_grad():
                for p, w in zip(unique, saved, strict=True):
                    p.copy_(w)
        return [None if a is None or b is None else
                (a.detach().float() - b.detach().float()).mul_(z).div_(2 * eps)
                for a, b, z in zip(plus, minus, zs, strict=True)]

    total = _summed_over_batches(model, dataloader, loss_fn, names, num_batches, curvature,
                                 "the Hessian diagonal")
    return {name: value.clamp_min_(0) for name, value in total.items()}


def _rademacher(generator: torch.Generator, params: list[Tensor]) -> list[Tensor]:
    """One Hutchinson probe: a +-1 tensor per weight, in order, in the weight's dtype and on
    its device, from ``generator`` (the draws of an int64 ``randint(0, 2)``, made in place:
    its temporaries were a tenth of the Hessian's time on MiniLM's encoder). The one home of
    the draw, so that :func:`hessian_diagonal` and :func:`hessian_diagonal_fd` probe alike."""
    return [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype)
            .mul_(2).sub_(1).to(p.device) for p in params]


def _fd_epsilon(unique: list[Tensor], step: float) -> float:
    """:func:`hessian_diagonal_fd`'s one step: ``step`` (at least the square root of the
    least precise dtype's eps) times the rms over the weights ``unique`` (each once, a tied
    one too) together (1 where they are all 0), summed in float64 (weights of 2**66 do not
    overflow)."""
    squares = sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2
                  for p in unique)
    count = sum(p.numel() for p in unique)
    rms = math.sqrt(squares / count) if count and squares > 0 else 1.0
    relative = max([step] + [math.sqrt(torch.finfo(p.dtype).eps) for p in unique
                             if p.dtype in (torch.float16, torch.bfloat16)])
    return relative * rms


def _summed_over_batches(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    names: Iterable[str] | str,
    num_batches: int | None,
    per_batch: Callable[[Callable[[], Tensor], list[Tensor]], list[Tensor | None]],
    what: str,
) -> dict[str, Tensor]:
    """The sum over the first ``num_batches`` batches of ``per_batch(loss, weights)`` (one
    tensor per named weight, ``None`` where the loss does not reach it; ``loss()`` evaluates
    ``loss_fn`` on the batch, checked, each time it is called), in eval mode with
    only the named weights requiring grad; the model's flags are restored after (the pass of
    :func:`fisher_diagonal`, :func:`hessian_diagonal` and :func:`hessian_diagonal_fd`)."""
    if not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be a callable loss_fn(model, batch) -> scalar loss tensor; got "
            f"{type(loss_fn).__name__}"
        )
    if not isinstance(dataloader, Iterable):
        raise ValueError(
            f"dataloader must be an iterable of batches; got {type(dataloader).__name__}"
        )
    _check_num_batches("num_batches", num_batches)
    params = _named_weights(model, names)
    if not params:
        return {}
    device = next(iter(params.values())).device
    # each weight's sum, its first batch's tensor itself (no zeros to add it to)
    total: dict[str, Tensor | None] = dict.fromkeys(params)
    wanted = {id(p) for p in params.values()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    seen = 0
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        with in_eval_mode(model), torch.enable_grad():
            for batch in itertools.islice(dataloader, num_batches):
                on_device = _to_device(batch, device)

                def loss(on_device: Any = on_device, index: int = seen) -> Tensor:
                    value = loss_fn(model, on_device)
                    _check_loss(value, index)
                    return value

                values = per_batch(loss, list(params.values()))
                for name, value in zip(params, values, strict=True):
                    if value is not None:
                        mine = total[name]
                        total[name] = value if mine is None else mine.add_(value)
                seen += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError(
            f"dataloader yielded no batches; {what} needs at least one calibration batch"
        )
    out = {n: torch.zeros_like(p, dtype=torch.float32) if total[n] is None else total[n]
           for n, p in params.items()}
    for name, value in out.items():
        if not all_finite(value):
            raise ValueError(
                f"{name}: {what} is NaN or Inf; check that loss_fn gives a finite loss on "
                "every calibration batch"
            )
    return out


def _sample_weights(layout: PaletteLayout, fisher: Tensor) -> Tensor:
    r"""k-means sample weights ``(P, n)`` from a tensor's Fisher diagonal.

    Per d-vector the sum of its coordinates' :math:`F_{ii}`, divided by the palette's largest
    (k-means is invariant to scaling the weights; this keeps them in [0, 1] for k-means++'s
    sampling), then floored at ``1e-8`` of the palette's mean. A palette with zero Fisher
    everywhere gets uniform weights, and a warning names the tensor.
    """
    w = layout.to_palettes(fisher).sum(-1).float().cpu()  # (P, n)
    peak = w.amax(dim=1, keepdim=True)
    dead = peak.squeeze(1) <= 0
    w = torch.where(dead[:, None], 1.0, w / peak.clamp_min(torch.finfo(w.dtype).tiny))
    w = torch.maximum(w, _FISHER_FLOOR * w.mean(dim=1, keepdim=True))
    if bool(dead.any()):
        warnings.warn(
            f"{layout.name}: the calibration loss has zero gradient for every weight of "
            f"{int(dead.sum())} of {dead.numel()} palette(s), so they are clustered unweighted "
            "(plain k-means); check that loss_fn uses this weight, or leave it out with "
            "`exclude`",
            UserWarning,
            stacklevel=3,
        )
    return w


def _named_weights(model: nn.Module, names: Iterable[str] | str) -> dict[str, nn.Parameter]:
    if isinstance(names, str):
        names = [names]
    params: dict[str, nn.Parameter] = {}
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"names must be parameter names (str); got {name!r}")
        try:
            param = model.get_parameter(name)
        except AttributeError:
            known = [n for n, _ in model.named_parameters()]
            raise ValueError(
                f"names: {name!r} is not a parameter of the model; parameters are: "
                f"{', '.join(known) or '(none)'}"
            ) from None
        if not param.is_floating_point():
            raise ValueError(
                f"names: {name!r} has dtype {param.dtype}; only floating-point weights have "
                "gradients"
            )
        params[name] = param
    return params


def _check_num_batches(label: str, value: object) -> None:
    if value is not None and not is_int(value, 1):
        raise ValueError(f"{label} must be None (all batches) or an int >= 1; got {value!r}")


def _read_twice(dataloader: Iterable[Any], head: int) -> tuple[Iterable[Any], Iterable[Any]]:
    """``dataloader`` for a reader of its batches from the first, and its first ``head``
    batches for a second reader. A one-shot iterator (a generator, ``iter(loader)``) would be
    exhausted by the first read, or moved past the batches it read: its first ``head`` batches
    are taken once, and the first reader gets them followed by the rest. A re-iterable
    (a list, a ``DataLoader``) is returned as it is to both, unread."""
    if not isinstance(dataloader, Iterator):
        return dataloader, dataloader
    first = list(itertools.islice(dataloader, head))
    return itertools.chain(first, dataloader), first


def _check_calibration(calibration: object, calibration_batches: object) -> None:
    _check_num_batches("calibration_batches", calibration_batches)
    if calibration is None:
        if calibration_batches is not None:
            raise ValueError(
                f"calibration_batches={calibration_batches!r} is given without calibration; "
                "pass calibration=(dataloader, loss_fn) or leave calibration_batches None"
            )
        return
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
        raise ValueError(
            "calibration must be None or a pair (dataloader, loss_fn); got "
            f"{type(calibration).__name__}"
            + (f" of length {len(calibration)}" if isinstance(calibration, (tuple, list)) else "")
        )
    dataloader, loss_fn = calibration
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise ValueError(
            "calibration[0] (the dataloader) must be an iterable of batches; got "
            f"{type(dataloader).__name__}"
        )
    if not callable(loss_fn):
        raise ValueError(
            "calibration[1] (loss_fn) must be a callable loss_fn(model, batch) -> scalar loss "
            f"tensor; got {type(loss_fn).__name__}"
        )


def _check_loss(loss: object, batch_index: int) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar loss tensor; got {got} on batch {batch_index}"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"loss_fn's loss on batch {batch_index} does not depend on any of the weights "
            "measured (it requires no grad); compute it from model(...) without torch.no_grad() "
            "or .detach()"
        )


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (also inside tuples, lists, named tuples and mappings) on
    ``device``; everything else unchanged."""
    return _mapped(batch, lambda t: t.to(device))
