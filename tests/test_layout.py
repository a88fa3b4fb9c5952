"""Specification of ClusterSpec and PaletteLayout: validation and the tensor <-> palettes map."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout


def numbered(*shape: int) -> torch.Tensor:
    """A float tensor whose entries are their own flat index: every position is recognisable."""
    return torch.arange(math.prod(shape), dtype=torch.float32).view(shape)


# -- ClusterSpec ---------------------------------------------------------------------------------
def test_spec_has_2_to_the_bits_centroids_and_bits_over_dim_bits_per_weight() -> None:
    spec = ClusterSpec(bits=4, cluster_dim=2)
    assert spec.num_centroids == 16
    assert spec.bits_per_weight == 2.0
    assert ClusterSpec() == ClusterSpec(bits=4, cluster_dim=1, group_size=None)


@pytest.mark.parametrize("bits", [0, 9, -1, 4.0, True])
def test_spec_rejects_bits_outside_1_to_8(bits) -> None:
    with pytest.raises(ValueError, match=rf"bits must be an int in 1\.\.8; got {bits!r}"):
        ClusterSpec(bits=bits)


@pytest.mark.parametrize("cluster_dim", [0, 9, 2.0])
def test_spec_rejects_cluster_dim_outside_1_to_8(cluster_dim) -> None:
    with pytest.raises(
        ValueError, match=rf"cluster_dim must be an int in 1\.\.8; got {cluster_dim!r}"
    ):
        ClusterSpec(cluster_dim=cluster_dim)


@pytest.mark.parametrize("group_size", [0, -2, 1.5])
def test_spec_rejects_a_group_size_that_is_not_none_or_positive(group_size) -> None:
    with pytest.raises(
        ValueError, match=rf"group_size must be None .* or an int >= 1; got {group_size!r}"
    ):
        ClusterSpec(group_size=group_size)


# -- layout validation ---------------------------------------------------------------------------
def test_layout_rejects_a_cluster_dim_that_does_not_divide_the_input_axis() -> None:
    with pytest.raises(
        ValueError,
        match=r"fc\.weight: cluster_dim=4 does not divide the input-channel axis \(size 6.*"
        r"allowed: a divisor of 6",
    ):
        PaletteLayout((8, 6), ClusterSpec(bits=1, cluster_dim=4), name="fc.weight")


def test_layout_rejects_a_group_size_that_does_not_divide_the_output_axis() -> None:
    with pytest.raises(
        ValueError,
        match=r"fc\.weight: group_size=3 does not divide the output-channel axis \(size 8.*"
        r"allowed: None or a divisor of 8",
    ):
        PaletteLayout((8, 6), ClusterSpec(bits=1, group_size=3), name="fc.weight")


def test_layout_rejects_palettes_with_fewer_vectors_than_centroids() -> None:
    with pytest.raises(
        ValueError,
        match=r"small\.weight: each palette holds 12 vectors, fewer than 2\*\*bits = 16 .*"
        r"bits=4",
    ):
        PaletteLayout((4, 3), ClusterSpec(bits=4), name="small.weight")
    # The same tensor is fine with fewer bits, and grouping counts per palette.
    PaletteLayout((4, 3), ClusterSpec(bits=3))
    with pytest.raises(
        ValueError, match="each palette holds 6 vectors, fewer than 2\\*\\*bits = 8"
    ):
        PaletteLayout((4, 3), ClusterSpec(bits=3, group_size=2))


def test_layout_rejects_one_dimensional_tensors() -> None:
    with pytest.raises(ValueError, match=r"bias: only tensors with >= 2 dims .* got \(64,\)"):
        PaletteLayout((64,), ClusterSpec(bits=2), name="bias")


def test_layout_rejects_equal_or_out_of_range_axes() -> None:
    with pytest.raises(ValueError, match="group_axis and vector_axis must differ"):
        PaletteLayout((8, 8), ClusterSpec(bits=2), group_axis=1, vector_axis=-1)
    with pytest.raises(ValueError, match="vector_axis=2 is out of range"):
        PaletteLayout((8, 8), ClusterSpec(bits=2), vector_axis=2)


def test_check_accepts_a_finite_float_tensor_of_the_layout_shape() -> None:
    PaletteLayout((4, 8), ClusterSpec(bits=2)).check(torch.randn(4, 8))


def test_check_rejects_the_wrong_shape() -> None:
    layout = PaletteLayout((4, 8), ClusterSpec(bits=2), name="fc.weight")
    with pytest.raises(ValueError, match=r"fc\.weight: expected shape \(4, 8\), got \(8, 4\)"):
        layout.check(torch.zeros(8, 4))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_check_rejects_non_floating_weights(dtype: torch.dtype) -> None:
    layout = PaletteLayout((4, 8), ClusterSpec(bits=2), name="fc.weight")
    with pytest.raises(ValueError, match=rf"fc\.weight: only floating-point .* got {dtype}"):
        layout.check(torch.zeros(4, 8, dtype=dtype))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_rejects_nan_and_inf_weights(bad: float) -> None:
    layout = PaletteLayout((4, 8), ClusterSpec(bits=2), name="fc.weight")
    weight = torch.zeros(4, 8)
    weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"fc\.weight: weight contains NaN or Inf .*only finite"):
        layout.check(weight)


# -- sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "spec", "group_axis", "vector_axis", "expected"),
    [
        ((8, 6), ClusterSpec(bits=2), 0, 1, (1, 48, 1)),
        ((8, 6), ClusterSpec(bits=2, cluster_dim=2), 0, 1, (1, 24, 2)),
        ((8, 6), ClusterSpec(bits=2, cluster_dim=3, group_size=4), 0, 1, (2, 8, 3)),
        ((16, 8, 3, 3), ClusterSpec(bits=4, cluster_dim=4, group_size=8), 0, 1, (2, 144, 4)),
        ((8, 6, 3, 3), ClusterSpec(bits=2, cluster_dim=2, group_size=3), 1, 0, (2, 108, 2)),
    ],
)
def test_palette_shape_is_palettes_by_vectors_by_cluster_dim(
    shape, spec, group_axis, vector_axis, expected
) -> None:
    layout = PaletteLayout(shape, spec, group_axis, vector_axis)
    assert layout.palette_shape == expected
    assert layout.num_palettes * layout.vectors_per_palette * spec.cluster_dim == layout.numel


# -- mapping -------------------------------------------------------------------------------------
ROUND_TRIP_CASES = {
    "linear": (lambda: nn.Linear(12, 6), 0, 1),
    "conv2d": (lambda: nn.Conv2d(8, 6, 3), 0, 1),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(8, 6, 3), 1, 0),
    "embedding": (lambda: nn.Embedding(12, 8), 0, 1),
}


@pytest.mark.parametrize(
    "spec",
    [
        ClusterSpec(bits=2),
        ClusterSpec(bits=2, cluster_dim=2),
        ClusterSpec(bits=2, cluster_dim=4, group_size=2),
        ClusterSpec(bits=1, group_size=6),
    ],
    ids=["plain", "dim2", "dim4-group2", "group6"],
)
@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_to_palettes_and_from_palettes_round_trip_exactly(case: str, spec: ClusterSpec) -> None:
    make, group_axis, vector_axis = ROUND_TRIP_CASES[case]
    weight = make().weight.detach()
    layout = PaletteLayout(tuple(weight.shape), spec, group_axis, vector_axis)
    x = layout.to_palettes(weight)
    assert tuple(x.shape) == layout.palette_shape
    assert torch.equal(layout.from_palettes(x), weight)
    # and the other way round: any palettes map to a tensor and back unchanged
    y = torch.randn(layout.palette_shape)
    assert torch.equal(layout.to_palettes(layout.from_palettes(y)), y)


def test_linear_vectors_run_along_the_input_axis() -> None:
    weight = numbered(4, 6)
    x = PaletteLayout((4, 6), ClusterSpec(bits=1, cluster_dim=2)).to_palettes(weight)
    assert x.shape == (1, 12, 2)
    for o in range(4):
        for j in range(3):
            assert x[0, 3 * o + j].tolist() == [
                weight[o, 2 * j].item(),
                weight[o, 2 * j + 1].item(),
            ]


def test_conv2d_vectors_run_along_the_input_channel_axis() -> None:
    weight = numbered(2, 4, 2, 2)  # (out, in, kh, kw)
    x = PaletteLayout((2, 4, 2, 2), ClusterSpec(bits=1, cluster_dim=2)).to_palettes(weight)
    vectors = {tuple(v.tolist()) for v in x[0]}
    expected = {
        tuple(weight[o, 2 * j : 2 * j + 2, h, w].tolist())
        for o in range(2)
        for j in range(2)
        for h in range(2)
        for w in range(2)
    }
    assert vectors == expected and x.shape == (1, 16, 2)


def test_grouped_palettes_take_consecutive_output_channels() -> None:
    weight = numbered(6, 4)
    x = PaletteLayout((6, 4), ClusterSpec(bits=1, group_size=2)).to_palettes(weight)
    assert x.shape == (3, 8, 1)
    for p in range(3):
        assert torch.equal(x[p].flatten(), weight[2 * p : 2 * p + 2].flatten())


def test_conv_transpose_groups_output_channels_on_axis_1_and_vectors_on_axis_0() -> None:
    weight = numbered(4, 6, 2, 2)  # ConvTranspose2d: (in, out, kh, kw)
    layout = PaletteLayout(
        (4, 6, 2, 2), ClusterSpec(bits=1, cluster_dim=2, group_size=3), group_axis=1, vector_axis=0
    )
    x = layout.to_palettes(weight)
    assert x.shape == (2, 24, 2)
    for p in range(2):
        vectors = {tuple(v.tolist()) for v in x[p]}
        expected = {
            tuple(weight[2 * i : 2 * i + 2, o, h, w].tolist())
            for o in range(3 * p, 3 * p + 3)
            for i in range(2)
            for h in range(2)
            for w in range(2)
        }
        assert vectors == expected


def test_to_palettes_is_a_view_when_no_permutation_is_needed() -> None:
    weight = torch.randn(8, 6)
    x = PaletteLayout((8, 6), ClusterSpec(bits=2, cluster_dim=2)).to_palettes(weight)
    assert x.data_ptr() == weight.data_ptr() and x._base is weight


def test_the_mapping_is_differentiable() -> None:
    weight = torch.randn(6, 4, 3, 3, requires_grad=True)
    layout = PaletteLayout((6, 4, 3, 3), ClusterSpec(bits=2, cluster_dim=2, group_size=3))
    upstream = torch.randn(layout.palette_shape)
    (layout.to_palettes(weight) * upstream).sum().backward()
    assert torch.equal(weight.grad, layout.from_palettes(upstream))


def test_negative_axes_are_normalised() -> None:
    layout = PaletteLayout((4, 6, 3), ClusterSpec(bits=1), group_axis=-3, vector_axis=-2)
    assert (layout.group_axis, layout.vector_axis) == (0, 1)


# -- the dict form -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    ClusterSpec(bits=3),
    ClusterSpec(bits=2, cluster_dim=2, group_size=4),
    ClusterSpec(bits=1, per_channel_scale=True),
], ids=["per-tensor", "grouped-vectors", "scaled"])
def test_the_dict_form_round_trips_every_field(spec: ClusterSpec) -> None:
    layout = PaletteLayout((4, 8, 3), spec, group_axis=1, vector_axis=0, name="conv.weight")
    data = layout.to_dict()
    assert PaletteLayout.from_dict(data, "conv.weight") == layout
    assert ("per_channel_scale" in data) == spec.per_channel_scale  # written only where true


def test_the_dict_form_is_plain_json() -> None:
    import json

    layout = PaletteLayout((8, 16), ClusterSpec(bits=2, group_size=4, per_channel_scale=True))
    assert json.loads(json.dumps(layout.to_dict())) == layout.to_dict()


def test_a_layout_from_a_lut_shape_reads_bits_cluster_dim_and_group_size() -> None:
    layout = PaletteLayout.of_lut((8, 16), (2, 4, 2), 0, 1, name="fc.weight")
    assert layout == PaletteLayout((8, 16), ClusterSpec(bits=2, cluster_dim=2, group_size=4),
                                   name="fc.weight")
    assert PaletteLayout.of_lut((8, 16), (1, 16, 1), 0, 1).spec.group_size is None


def test_a_lut_of_entries_not_a_power_of_two_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fc\.weight: the LUT has 3 entries, not a power of two"):
        PaletteLayout.of_lut((8, 16), (1, 3, 1), 0, 1, name="fc.weight")
