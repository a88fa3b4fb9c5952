"""Specification of target selection: patterns, exclusion, size threshold, overrides, ties."""

from __future__ import annotations

import re
import warnings

import pytest
from torch import nn

from lightning_dkm import ClusterSpec, attach, select_targets
from lightning_dkm.model.targets import clusterable_parameters, matches


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)
        )
        self.embed = nn.Embedding(64, 16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.up = nn.ConvTranspose2d(16, 8, 2)
        self.head = nn.Linear(16, 4)  # 64 elements: below a small min_size


def names(targets) -> list[str]:
    return [t.name for t in targets]


ALL = [
    "features.0.weight",
    "features.2.weight",
    "embed.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "up.weight",
    "head.weight",
]


def test_without_patterns_every_supported_weight_is_a_target_in_module_order() -> None:
    assert names(select_targets(Net(), ClusterSpec(bits=2), min_size=0)) == ALL


def test_glob_patterns_match_module_or_parameter_names() -> None:
    model = Net()
    assert names(select_targets(model, targets="features.*", min_size=0)) == ALL[:2]
    assert names(select_targets(model, targets=["*.in_proj_weight", "head"], min_size=0)) == [
        "attn.in_proj_weight",
        "head.weight",
    ]
    assert names(select_targets(model, targets="features.[2]", min_size=0)) == [ALL[1]]


def test_re_patterns_are_full_match_regular_expressions() -> None:
    model = Net()
    assert names(select_targets(model, targets="re:features\\.\\d+", min_size=0)) == ALL[:2]
    # "re:" must match the whole name: "feat" alone matches nothing.
    with pytest.raises(ValueError, match="matches no supported weight"):
        select_targets(model, targets="re:feat", min_size=0)


def test_matches_distinguishes_globs_from_regexes() -> None:
    assert matches("*.fc", "model.fc") and not matches("*.fc", "model.fc2")
    assert matches("re:layer\\.[0-3]", "layer.2") and not matches("re:layer\\.[0-3]", "layer.20")


def test_exclude_removes_matching_tensors() -> None:
    selected = select_targets(Net(), exclude=["features.*", "re:attn\\..*"], min_size=0)
    assert names(selected) == ["embed.weight", "up.weight", "head.weight"]


def test_tensors_below_min_size_are_skipped_with_one_warning_listing_them() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selected = select_targets(Net(), ClusterSpec(bits=2), min_size=600)
    skipped = {"features.0.weight", "attn.out_proj.weight", "up.weight", "head.weight"}
    assert set(names(selected)) == set(ALL) - skipped
    messages = [str(w.message) for w in caught if "min_size" in str(w.message)]
    assert len(messages) == 1
    assert "skipping 4 tensor(s) smaller than min_size=600" in messages[0]
    for name in skipped:
        assert name in messages[0]


def test_no_warning_when_nothing_is_skipped() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_targets(Net(), ClusterSpec(bits=2), min_size=0)


def test_overrides_apply_per_pattern_and_the_first_match_wins() -> None:
    selected = select_targets(
        Net(),
        ClusterSpec(bits=4),
        min_size=0,
        overrides={
            "features.2": {"bits": 2, "cluster_dim": 2},
            "features.*": {"bits": 3},  # later: does not override features.2
            "re:attn\\..*": {"group_size": 16},
        },
    )
    specs = {t.name: t.spec for t in selected}
    assert specs["features.2.weight"] == ClusterSpec(bits=2, cluster_dim=2)
    assert specs["features.0.weight"] == ClusterSpec(bits=3)
    assert specs["attn.in_proj_weight"] == ClusterSpec(bits=4, group_size=16)
    assert specs["attn.out_proj.weight"] == ClusterSpec(bits=4, group_size=16)
    assert specs["embed.weight"] == ClusterSpec(bits=4)


def test_an_override_with_bad_bits_errors_naming_the_pattern_and_value() -> None:
    with pytest.raises(
        ValueError, match=r"overrides\['head'\]: bits must be an int in 1\.\.8; got 9"
    ):
        select_targets(Net(), overrides={"head": {"bits": 9}}, min_size=0)


def test_an_override_with_an_unknown_key_errors_naming_the_pattern_and_the_allowed_keys() -> None:
    with pytest.raises(
        ValueError,
        match=r"overrides\['head'\] has unknown keys \['bitz'\]; allowed: "
        r"\('bits', 'cluster_dim', 'group_size', 'per_channel_scale'\)",
    ):
        select_targets(Net(), overrides={"head": {"bitz": 2}}, min_size=0)


def test_an_override_that_does_not_fit_the_tensor_errors_naming_it() -> None:
    with pytest.raises(ValueError, match=r"head\.weight: cluster_dim=3 does not divide"):
        select_targets(
            Net(), ClusterSpec(bits=1), overrides={"head": {"cluster_dim": 3}}, min_size=0
        )


@pytest.mark.parametrize("argument", ["targets", "overrides"])
def test_a_pattern_that_matches_nothing_errors_listing_the_candidates(argument: str) -> None:
    kwargs = (
        {"targets": ["classifier"]}
        if argument == "targets"
        else {"overrides": {"classifier": {"bits": 2}}}
    )
    with pytest.raises(ValueError, match=rf"{argument} pattern 'classifier' matches no") as info:
        select_targets(Net(), min_size=0, **kwargs)
    for name in ALL:
        assert name in str(info.value)


def test_an_invalid_regular_expression_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"targets: invalid regular expression 're:\('"):
        select_targets(Net(), targets="re:(", min_size=0)


@pytest.mark.parametrize("min_size", [-1, 1.5, True])
def test_min_size_must_be_a_non_negative_int(min_size) -> None:
    with pytest.raises(ValueError, match=rf"min_size must be an int >= 0; got {min_size}"):
        select_targets(Net(), min_size=min_size)


def test_a_spec_that_does_not_fit_a_tensor_errors_naming_it() -> None:
    with pytest.raises(
        ValueError, match=r"head\.weight: each palette holds 64 vectors, fewer than"
    ):
        select_targets(Net(), ClusterSpec(bits=7), min_size=0)


def test_tied_weights_are_one_target_that_names_its_other_owners() -> None:
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32, bias=False))
    model[1].weight = model[0].weight
    selected = select_targets(model, ClusterSpec(bits=2), min_size=0)
    assert names(selected) == ["0.weight"]
    assert selected[0].tied == (("1", "weight"),)


def test_tied_weights_are_found_again_once_clustered() -> None:
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32, bias=False))
    model[1].weight = model[0].weight
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))
    again = select_targets(model, ClusterSpec(bits=2), min_size=0)
    assert names(again) == ["0.weight"] and again[0].tied == (("1", "weight"),)


def test_already_clustered_tensors_are_found_again_by_their_original_shape() -> None:
    model = Net()
    attach(model, select_targets(model, ClusterSpec(bits=2), targets="head", min_size=0))
    again = select_targets(model, ClusterSpec(bits=2), targets="head", min_size=0)
    assert names(again) == ["head.weight"] and again[0].layout.shape == (4, 16)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(4, 4), [("weight", 0, 1)]),
        (nn.Conv1d(4, 4, 3), [("weight", 0, 1)]),
        (nn.Conv3d(4, 4, 3), [("weight", 0, 1)]),
        (nn.ConvTranspose1d(4, 4, 3), [("weight", 1, 0)]),
        (nn.EmbeddingBag(10, 4), [("weight", 0, 1)]),
        (nn.MultiheadAttention(8, 2), [("in_proj_weight", 0, 1)]),
        (
            nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
            [("q_proj_weight", 0, 1), ("k_proj_weight", 0, 1), ("v_proj_weight", 0, 1)],
        ),
        (nn.LayerNorm(4), []),
        (nn.BatchNorm2d(4), []),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_clusterable_parameters_name_the_weight_and_its_axes(module: nn.Module, expected) -> None:
    assert clusterable_parameters(module) == expected


def test_targets_carry_the_layout_axes_of_their_module() -> None:
    by_name = {t.name: t for t in select_targets(Net(), ClusterSpec(bits=2), min_size=0)}
    up = by_name["up.weight"].layout
    assert (up.group_axis, up.vector_axis) == (1, 0)
    assert by_name["features.0.weight"].layout.shape == (16, 4, 3, 3)
    assert by_name["features.0.weight"].module_name == "features.0"
    assert by_name["attn.in_proj_weight"].param_name == "in_proj_weight"


def test_a_weight_computed_by_another_parametrization_is_refused():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(64, 64))
    parametrize.register_parametrization(model[0], "weight", Double())
    with pytest.raises(ValueError, match=r"0\.weight is computed by another parametrization"):
        select_targets(model, ClusterSpec(bits=2))


# -- bare names: PEFT's target_modules list semantics -------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.k_proj = nn.Linear(16, 16)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.mlp = nn.Linear(16, 16)


class Encoder(nn.Module):
    """encoder.layer.<i>.attention.{q,k}_proj and encoder.layer.<i>.mlp, as in HF models."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Layer(), Layer()])
        self.q_proj = nn.Linear(16, 16)  # a top-level module of the same name


def test_a_bare_module_name_matches_that_module_at_any_depth() -> None:
    selected = select_targets(Encoder(), targets=["q_proj"], min_size=0)
    assert names(selected) == [
        "encoder.layer.0.attention.q_proj.weight",
        "encoder.layer.1.attention.q_proj.weight",
        "q_proj.weight",
    ]


def test_a_bare_name_matches_whole_name_components_only() -> None:
    assert matches("q_proj", "encoder.layer.0.attention.q_proj")
    assert matches("q_proj", "q_proj")
    assert not matches("proj", "encoder.layer.0.attention.q_proj")
    assert not matches("q_proj", "encoder.layer.0.attention.q_proj2")
    with pytest.raises(ValueError, match=r"'proj' matches no supported weight.*at any depth"):
        select_targets(Encoder(), targets=["proj"], min_size=0)


def test_a_bare_parameter_name_matches_that_parameter_of_every_module() -> None:
    assert names(select_targets(Net(), targets="in_proj_weight", min_size=0)) == [
        "attn.in_proj_weight"
    ]
    assert names(select_targets(Net(), targets="out_proj", min_size=0)) == ["attn.out_proj.weight"]


def test_a_bare_container_name_matches_nothing_and_the_error_suggests_a_glob() -> None:
    with pytest.raises(ValueError, match=r"'features' matches no.*write 'features\.\*'"):
        select_targets(Net(), targets="features", min_size=0)


def test_bare_names_work_in_exclude_and_overrides_too() -> None:
    selected = select_targets(
        Encoder(), ClusterSpec(bits=2), min_size=0, exclude=["k_proj"],
        overrides={"mlp": {"bits": 3}},
    )
    specs = {t.name: t.spec.bits for t in selected}
    assert not any("k_proj" in name for name in specs)
    assert specs["encoder.layer.1.mlp.weight"] == 3
    assert specs["encoder.layer.0.attention.q_proj.weight"] == 2


def test_dotted_names_stay_exact_and_globs_stay_whole_name_matches() -> None:
    model = Encoder()
    assert names(select_targets(model, targets="encoder.layer.0.mlp", min_size=0)) == [
        "encoder.layer.0.mlp.weight"
    ]
    assert names(select_targets(model, targets="*.0.*.q_proj", min_size=0)) == [
        "encoder.layer.0.attention.q_proj.weight"
    ]
    # a glob is not a bare name: "q_pro?" must match the whole qualified name, so only the top one
    assert names(select_targets(model, targets="q_pro?", min_size=0)) == ["q_proj.weight"]


@pytest.mark.parametrize("overrides", ["classifier", ["classifier"], 4])
def test_overrides_that_are_not_a_mapping_error_naming_the_value_and_the_form(overrides) -> None:
    with pytest.raises(ValueError, match=r"overrides must be a mapping pattern -> "
                                         r"\{key: value\}.*; got " + re.escape(repr(overrides))):
        select_targets(Net(), overrides=overrides, min_size=0)


def test_the_callback_refuses_overrides_that_are_not_a_mapping_at_construction() -> None:
    from lightning_dkm import DKMCallback

    with pytest.raises(ValueError, match=r"overrides must be a mapping.*got 'classifier'"):
        DKMCallback(overrides="classifier")


# -- an empty pattern list --------------------------------------------------------------------
@pytest.mark.parametrize("targets", [[], ()])
def test_an_empty_targets_list_is_an_error_not_every_weight(targets) -> None:
    # Before: [] selected every supported weight (as None does), while DKMCallback keyed its
    # checkpoint state apart from None's: a resume of the one under the other was refused.
    with pytest.raises(ValueError, match=r"targets is empty.*clusters nothing.*targets=None"):
        select_targets(Net(), targets=targets, min_size=0)


def test_the_callback_refuses_an_empty_targets_list_at_construction() -> None:
    from lightning_dkm import DKMCallback

    with pytest.raises(ValueError, match=r"targets is empty.*targets=None"):
        DKMCallback(targets=[])


def test_an_empty_exclude_list_excludes_nothing_as_none_does() -> None:
    from lightning_dkm import DKMCallback

    assert names(select_targets(Net(), exclude=[], min_size=0)) == ALL
    assert DKMCallback(exclude=[]).exclude is None
    assert DKMCallback(exclude=[]).state_key == DKMCallback(exclude=None).state_key
