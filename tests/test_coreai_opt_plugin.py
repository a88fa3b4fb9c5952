"""DKM inside Apple's coreai-opt: the ``"lightning_dkm"`` training strategy that coreai-opt finds
through its ``coreai_opt.plugins`` entry point (lightning_dkm/integrations/coreai_opt.py).

Every test drives coreai-opt's own ``KMeansPalettizer`` (prepare, ``training_mode``, finalize)
with the strategy named in its config. To read what our engine ended with, the tests open the
strategy coreai-opt built for a weight (``module._training_strategy``, test-only); the plugin
itself never touches it.
"""

# ruff: noqa: E402 (coreai-opt is imported after the check that its extra is installed)

from __future__ import annotations

import asyncio
import copy
import io
import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from extras import need
from torch import nn
from torch.nn import functional as F

# The imports below need the coreai-opt extra (Python >= 3.11 only: never required below it).
need("coreai_opt")

from coreai_opt import ExportBackend
from coreai_opt.palettization import (
    KMeansPalettizer,
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    PalettizationSpec,
)
from coreai_opt.palettization.config import VectorKMeansConfig
from coreai_opt.palettization.spec import (
    PerGroupedChannelGranularity,
    TrainingStrategySpec,
)
from pydantic import ValidationError

from lightning_dkm.engine.reference import dkm_cluster
from lightning_dkm.integrations.coreai_opt import (
    STRATEGY_KEY,
    DKMTrainingSpec,
    DKMTrainingStrategy,
)

TAU = 1e-2
DKM = {"type": STRATEGY_KEY, "temperature": TAU}
#: The palettization settings of the export test: scalar palettes, one per tensor; and
#: 2-vectors in per-2-channel groups with per-channel scales (coreai-opt's vector layout).
LAYOUTS = {
    "scalar": {},
    "vectors": {"cluster_dim": 2, "enable_per_channel_scale": True,
                "granularity": PerGroupedChannelGranularity(axis=0, group_size=2)},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                         nn.ReLU(), nn.Linear(32, 10))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(16, 3, 8, 8, generator=generator),
            torch.randint(0, 10, (16,), generator=generator))


def _config(strategy: dict, n_bits: int = 2, **spec) -> KMeansPalettizerConfig:
    weight = PalettizationSpec(n_bits=n_bits, training_strategy_spec=strategy, **spec)
    scalar = spec.get("cluster_dim", 1) == 1
    return KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig(
        op_state_spec={"weight": weight},
        enable_fast_kmeans_mode=scalar,
        # One short k-means run seeds the vector palettes (the default, 5 runs of up to 300
        # rounds, takes seconds): DKM moves the centroids from there.
        vector_kmeans_config=None if scalar else VectorKMeansConfig(n_init=1, max_iter=20),
    ))


def _palettized(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight name: coreai-opt's fake-palettize module}`` of a prepared model."""
    return {module.tensor_fqn: module for module in model.modules()
            if hasattr(module, "vectorize") and hasattr(module, "centroids")}


def _original(model: nn.Module, name: str) -> torch.Tensor:
    """The trainable weight under the parametrization of ``name`` (``"3.weight"``)."""
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner).parametrizations[attr].original


def _train(palettizer, model, steps: int, lr: float = 0.1) -> tuple[list[float], dict]:
    """``steps`` SGD steps in coreai-opt's training mode; the losses, and the weights the last
    forward saw (the optimizer moves them once more after it)."""
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with palettizer.training_mode():
        for _ in range(steps):
            seen = {name: _original(model, name).detach().clone() for name in _palettized(model)}
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            palettizer.step()
            losses.append(loss.item())
    return losses, seen


# -- discovery ------------------------------------------------------------------------------
def test_the_package_advertises_the_plugin_in_coreai_opts_entry_point_group():
    found = {ep.name: ep.value for ep in entry_points(group="coreai_opt.plugins")}
    assert found.get("lightning_dkm") == "lightning_dkm.integrations:register_coreai_opt", (
        "the coreai_opt.plugins entry point is not installed; run: pip install --no-deps -e ."
    )


_DISCOVERY = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {first}
    import coreai_opt
    from coreai_opt.palettization.spec import TrainingStrategySpec
spec = TrainingStrategySpec.REGISTRY.get("lightning_dkm")
print(json.dumps({{
    "spec": spec and f"{{spec.__module__}}.{{spec.__qualname__}}",
    "failed": [str(w.message) for w in caught if "plugin" in str(w.message)],
    "heavy": sorted(m for m in sys.modules
                    if m.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")),
}}))
"""


@pytest.mark.parametrize("first", ["pass", "import lightning_dkm.integrations.coreai_opt"],
                         ids=["import-coreai_opt", "import-our-module-first"])
def test_coreai_opt_registers_the_strategy_through_the_entry_point_without_lightning(first):
    """A fresh ``import coreai_opt`` (nothing of ours imported) registers the strategy, and so
    does importing our module first (coreai-opt then calls the plugin while our module is still
    loading); neither warns that the plugin failed, and neither imports Lightning."""
    script = textwrap.dedent(_DISCOVERY).format(first=first)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"spec": "lightning_dkm.integrations.coreai_opt.DKMTrainingSpec",
                      "failed": [], "heavy": []}


# -- configuration --------------------------------------------------------------------------
def test_the_strategy_is_named_by_its_key_in_a_yaml_config_and_round_trips():
    config = KMeansPalettizerConfig.from_yaml(io.StringIO(textwrap.dedent("""
        kmeans_palettization_config:
          global_config:
            op_state_spec:
              weight:
                n_bits: 4
                training_strategy_spec: {type: lightning_dkm, temperature: 0.05, max_iter: 2}
    """)))
    spec = config.global_config.op_state_spec["weight"].training_strategy_spec
    assert TrainingStrategySpec.REGISTRY[STRATEGY_KEY] is DKMTrainingSpec
    assert spec == DKMTrainingSpec(temperature=0.05, max_iter=2)
    again = KMeansPalettizerConfig.from_dict(config.to_dict())
    assert again.global_config.op_state_spec["weight"].training_strategy_spec == spec
    strategy = spec.build_strategy()
    assert isinstance(strategy, DKMTrainingStrategy)
    assert (strategy.temperature, strategy.max_iter, strategy.epsilon) == (0.05, 2, 1e-4)


@pytest.mark.parametrize("fields", [
    {"temperature": 0.0}, {"temperature": float("nan")}, {"max_iter": 0}, {"epsilon": -1.0},
    {"implementation": "fast"}, {"implementation": "reference", "gradient": "implicit"},
])
def test_invalid_settings_are_refused_when_the_config_is_built(fields):
    with pytest.raises(ValidationError):
        PalettizationSpec(training_strategy_spec={"type": STRATEGY_KEY, **fields})


@pytest.mark.parametrize("spec, match", [
    ({"sparsity_detection_threshold": 0.5}, "sparsity_detection_threshold=None"),
    ({"lut_qspec": {"dtype": torch.int8}}, "lut_qspec=None"),
], ids=["sparsity", "quantized-lut"])
def test_what_dkm_would_not_train_faithfully_is_refused_at_the_first_training_step(spec, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    palettizer = KMeansPalettizer(model, _config(DKM, **spec))
    prepared = palettizer.prepare((torch.randn(2, 16),))
    with palettizer.training_mode(), pytest.raises(ValueError, match=match):
        prepared(torch.randn(2, 16))


# -- training -------------------------------------------------------------------------------
def test_the_default_strategy_gives_the_palettized_weights_no_gradient():
    """The contrast: coreai-opt's own strategy holds every palettized weight at its LUT."""
    palettizer = KMeansPalettizer(_model(), _config({"type": "default"}))
    prepared = palettizer.prepare((_batch()[0],))
    _train(palettizer, prepared, steps=1)
    assert all(_original(prepared, name).grad is None for name in _palettized(prepared))


def test_the_loss_gradient_reaches_the_palettized_weights_through_dkm():
    """One training step through coreai-opt computes what lightning_dkm's reference DKM
    (plain autograd through the unrolled iterations) computes from the same weights and
    starting centroids: the same loss, the same gradient on every palettized weight, the same
    moved centroids; SGD then moves each weight by exactly ``-lr * grad``. (The strategy's
    default step, ``"auto"``, is the weighted core's exact ``"chunked"`` step on these small
    weights: its analytic gradient equals autograd's up to float32 rounding, 1e-3 relative on
    an element near 0.)"""
    model = _model()
    plain = copy.deepcopy(model)
    palettizer = KMeansPalettizer(model, _config(DKM))
    prepared = palettizer.prepare((_batch()[0],))
    modules = _palettized(prepared)
    start = {name: module.centroids.detach().clone() for name, module in modules.items()}
    before = {name: _original(prepared, name).detach().clone() for name in modules}

    losses, _ = _train(palettizer, prepared, steps=1, lr=0.1)

    # The oracle: the plain model with each palettized weight replaced by its soft weights.
    soft, moved = {}, {}
    for name, centroids in start.items():
        weight = plain.get_parameter(name)
        result = dkm_cluster(weight.reshape(1, -1, 1), centroids, TAU, max_iter=3)
        soft[name], moved[name] = result.weights.reshape(weight.shape), result.centroids
    x, y = _batch()
    loss = F.cross_entropy(torch.func.functional_call(plain, soft, (x,)), y)
    loss.backward()

    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    for name, module in modules.items():
        grad = _original(prepared, name).grad
        expected = plain.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(module.centroids, moved[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(_original(prepared, name).detach(), before[name] - 0.1 * grad)


def test_a_checkpoint_resumes_from_the_centroids_coreai_opt_keeps():
    """The DKM state is coreai-opt's own ``centroids`` buffer: a state dict saved mid-training
    and loaded into a freshly prepared model (``prepare(state_dict=...)``) continues exactly
    as the uninterrupted run."""
    palettizer = KMeansPalettizer(_model(), _config(DKM))
    prepared = palettizer.prepare((_batch()[0],))
    _train(palettizer, prepared, steps=2)
    state = copy.deepcopy(prepared.state_dict())
    resumed_palettizer = KMeansPalettizer(_model(), _config(DKM))
    resumed = resumed_palettizer.prepare((_batch()[0],), state_dict=state)

    losses, _ = _train(palettizer, prepared, steps=1)
    resumed_losses, _ = _train(resumed_palettizer, resumed, steps=1)
    assert resumed_losses == losses
    for name, module in _palettized(resumed).items():
        torch.testing.assert_close(module.centroids, _palettized(prepared)[name].centroids,
                                   rtol=0, atol=0)


# -- export ---------------------------------------------------------------------------------
def _run_aimodel(path, x: torch.Tensor):
    from coreai.authoring import AIModelAsset
    from coreai.runtime import NDArray

    async def run():
        async with AIModelAsset.load(path).executable() as program:
            function = program.load_function("main")
            (name,) = function.desc.input_names
            outputs = await function({name: NDArray(x.numpy())})
            return [torch.from_numpy(outputs[n].numpy()) for n in function.desc.output_names]

    return asyncio.run(run())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_coreai_opts_export_carries_the_luts_and_indices_dkm_ended_with(layout, tmp_path):
    """After a few DKM steps, coreai-opt's Core AI finalize (LUT + indices per weight) holds
    exactly our engine's final centroids, its indices decode to our engine's snapped weights
    (and count the same members per centroid), and the ``.aimodel`` coreai-torch converts it to
    computes in Core AI's runtime what the trained model computes in eval."""
    coreai_torch = need("coreai_torch")  # coreai-opt installs without it (its own extra)

    palettizer = KMeansPalettizer(_model(), _config(DKM, **LAYOUTS[layout]))
    prepared = palettizer.prepare((_batch()[0],))
    losses, seen = _train(palettizer, prepared, steps=3)
    assert losses[-1] < losses[0]

    ended = {}
    for name, module in _palettized(prepared).items():
        strategy = module._training_strategy  # test-only: what our engine ended with
        assert isinstance(strategy, DKMTrainingStrategy)
        centroids, assignment = strategy.parametrization.centroids, strategy.assignment
        vectors, context = module.vectorize(seen[name])
        snapped = centroids.gather(1, assignment.unsqueeze(-1).expand(vectors.shape))
        ended[name] = (centroids.clone(), assignment.clone(),
                       module.devectorize(snapped, context).detach())
    x, _ = _batch()
    prepared.eval()
    with torch.no_grad():
        expected_output = prepared(x)

    finalized = palettizer.finalize(backend=ExportBackend.CoreAI)
    for name, (centroids, assignment, weight) in ended.items():
        owner, _, attr = name.rpartition(".")
        exported = finalized.get_submodule(owner).parametrizations[attr][0]
        P, k, d = centroids.shape
        assert torch.equal(exported.lut.reshape(P, k, d), centroids), name
        with torch.no_grad():
            decoded = getattr(finalized.get_submodule(owner), attr)  # Core AI's lut_to_dense
        torch.testing.assert_close(decoded, weight, rtol=1e-6, atol=0)
        # Both layouts group along axis 0, so palette p's indices are the p-th block of rows.
        counts = [torch.bincount(a.flatten().long(), minlength=k)
                  for a in (*assignment, *exported.indices.reshape(P, -1))]
        assert torch.equal(torch.stack(counts[:P]), torch.stack(counts[P:])), name
    with torch.no_grad():
        torch.testing.assert_close(finalized(x), expected_output, rtol=0, atol=1e-6)

    program = torch.export.export(finalized, (x,))
    program = program.run_decompositions(coreai_torch.get_decomp_table())
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    path = tmp_path / "model.aimodel"
    converter.add_exported_program(program).to_coreai().save_asset(path)
    (output,) = _run_aimodel(path, x)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
