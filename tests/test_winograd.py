"""Winograd F(4x4, 3x3) (solov2_d2/modeling/winograd.py), the fast path's wide 3x3 convs:
hand-computed outputs, agreement with a float64 direct convolution at least as close as the
float32 direct convolution's, levels batched in one call, and the head in the fast path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from solov2_d2.modeling import winograd
from solov2_d2.modeling.fast import optimize_for_inference, use_winograd_in_kernel_head
from solov2_d2.modeling.winograd import (
    WinogradConv2d,
    is_winograd_eligible,
    transform_weight,
    winograd_conv3x3,
)


def test_transform_weight_by_hand():
    # The centre tap alone: G g G^T = outer(G[:, 1], G[:, 1]), G[:, 1] = (0, -1/6, 1/6, 1/12,
    # -1/12, 0), computed in float64 and rounded once.
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    column = torch.tensor([0.0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0.0], dtype=torch.float64)
    expected = torch.outer(column, column).flatten().float()
    assert torch.equal(transform_weight(weight)[:, 0, 0], expected)
    # All ones: G's row sums (1/4, -1/2, -1/6, 7/24, 1/8, 1) on each axis.
    ones = transform_weight(torch.ones(1, 1, 3, 3))[:, 0, 0]
    row = torch.tensor([1 / 4, -1 / 2, -1 / 6, 7 / 24, 1 / 8, 1.0], dtype=torch.float64)
    assert torch.equal(ones, torch.outer(row, row).flatten().float())
    assert transform_weight(torch.ones(5, 3, 3, 3)).shape == (36, 3, 5)


def test_winograd_conv_by_hand():
    # A box filter on [[1, 2], [3, 4]] with zero padding: every output sees all four pixels.
    # (G's fractions round: equal to float32 rounding, not bitwise.)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    (y,) = winograd_conv3x3([x], transform_weight(torch.ones(1, 1, 3, 3)))
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 10.0), rtol=0, atol=1e-5)
    # A 3 x 3 image (the one tile is mostly padding) and a bias.
    x = torch.arange(9.0).view(1, 1, 3, 3)
    weight = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    (y,) = winograd_conv3x3([x], transform_weight(weight), torch.tensor([0.5]))
    # Neighbours minus 4 x centre, e.g. (0, 0): 1 + 3 - 0; (1, 1): 1 + 3 + 5 + 7 - 16.
    laplacian = [[4.0, 2.0, -2.0], [-2.0, 0.0, -6.0], [-14.0, -10.0, -20.0]]
    expected = torch.tensor(laplacian).view(1, 1, 3, 3) + 0.5
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    # 9 x 10: three tile rows (the last partly padding), tiles meeting at every border.
    x = torch.arange(90.0).view(1, 1, 9, 10) % 7
    (y,) = winograd_conv3x3([x], transform_weight(weight))
    torch.testing.assert_close(y, F.conv2d(x, weight, padding=1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_winograd_is_as_close_to_float64_as_the_direct_conv(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 40, 3, 3, generator=generator) / (9 * 40) ** 0.5
    bias = torch.randn(48, generator=generator)
    # Levels of different sizes, odd ones included, batch 2, one channels-last.
    levels = [torch.randn(2, 40, h, w, generator=generator) for h, w in ((13, 20), (8, 8), (5, 3))]
    levels[1] = levels[1].contiguous(memory_format=torch.channels_last)
    outputs = winograd_conv3x3(levels, transform_weight(weight), bias)
    for x, y in zip(levels, outputs):
        reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        direct = F.conv2d(x, weight, bias, padding=1)
        # The input's memory format, as F.conv2d gives.
        assert y.shape == reference.shape and y.stride() == direct.stride()
        scale = reference.abs().max()
        winograd_error = float((y.double() - reference).abs().max() / scale)
        direct_error = float((direct.double() - reference).abs().max() / scale)
        # F(4x4, 3x3)'s fractions cost a few times the direct conv's error (measured 3-6x).
        assert winograd_error < 2e-5, (winograd_error, direct_error)
        assert winograd_error <= 10 * max(direct_error, 1e-7)
    # Each level alone gives what it gives in the batch: the tiles do not mix.
    for x, y in zip(levels, outputs):
        (alone,) = winograd_conv3x3([x], transform_weight(weight), bias)
        assert torch.equal(alone, y)


def test_chunks_by_hand():
    # Tile grids (N, tiles_h, tiles_w): rows of 2 x 3 = 6 tiles, then two small maps.
    grids = [(2, 5, 3), (1, 2, 2), (1, 1, 1)]
    # At most 13 tiles: 2 rows (12 tiles) per piece; the last row (6) and the 4 + 1 small ones.
    assert list(winograd._chunks(grids, 13)) == [
        [(0, 0, 2)],
        [(0, 2, 4)],
        [(0, 4, 5), (1, 0, 2), (2, 0, 1)],
    ]
    # A row wider than the chunk still goes whole; everything fits in one chunk of 100.
    assert list(winograd._chunks([(1, 2, 9)], 4)) == [[(0, 0, 1)], [(0, 1, 2)]]
    assert list(winograd._chunks(grids, 100)) == [[(0, 0, 5), (1, 0, 2), (2, 0, 1)]]


@pytest.mark.parametrize("chunk_bytes", [1, 36 * 40 * 4 * 7, 1 << 30])
def test_winograd_in_chunks_equals_float64(monkeypatch, chunk_bytes):
    """Chunks of one tile row, of 7 tiles (pieces of several maps and rows) and one chunk for
    everything: the same convolution, to float32 rounding."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 40, 3, 3, generator=generator) / (9 * 40) ** 0.5
    bias = torch.randn(24, generator=generator)
    levels = [
        torch.randn(2, 40, h, w, generator=generator).contiguous(memory_format=torch.channels_last)
        for h, w in ((9, 11), (4, 6), (1, 1))
    ]
    for x, y in zip(levels, winograd_conv3x3(levels, transform_weight(weight), bias)):
        reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert float((y.double() - reference).abs().max() / reference.abs().max()) < 2e-5


def test_winograd_conv_module_and_eligibility():
    conv = nn.Conv2d(8, 6, 3, padding=1)
    module = WinogradConv2d(conv)
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)
        assert [y.shape for y in module([x, x[..., :4, :4]])] == [(1, 6, 7, 9), (1, 6, 4, 4)]
    # Detectron2's Conv2d: its norm and activation follow, as in its own forward.
    d2conv = Conv2d(8, 6, 3, padding=1, norm=nn.GroupNorm(2, 6), activation=torch.relu).eval()
    with torch.no_grad():
        torch.testing.assert_close(WinogradConv2d(d2conv)(x), d2conv(x), rtol=1e-5, atol=1e-5)
    assert "transformed_weight" not in module.state_dict()
    assert set(module.state_dict()) == {"weight", "bias"}
    for other in (
        nn.Conv2d(8, 6, 1),
        nn.Conv2d(8, 6, 3, padding=1, stride=2),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2),
        nn.Conv2d(8, 6, 3, padding=1, groups=2),
        nn.Conv2d(8, 6, 3, padding=0),
    ):
        assert not is_winograd_eligible(other)
        with pytest.raises(ValueError, match="3x3 stride-1"):
            WinogradConv2d(other)


def test_fast_kernel_head_uses_winograd_and_keeps_its_outputs(detecting_model):
    plain = detecting_model
    fast = copy.deepcopy(plain)
    # tiny_cfg: 2 convs per tower, two towers, two 3x3 predictors.
    assert use_winograd_in_kernel_head(fast) == 6
    assert use_winograd_in_kernel_head(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))) == 0
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 96, 128, generator=generator)
    with torch.no_grad():
        features = plain.backbone(image)
        for expected, actual in zip(plain.ins_head(features), fast.ins_head(features)):
            assert len(expected) == len(actual) == len(plain.ins_head.num_grids)
            for e, a in zip(expected, actual):
                assert e.shape == a.shape
                # Two conv + GroupNorm layers: GN divides by small standard deviations.
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
                assert not torch.equal(a, e)  # really another algorithm
    # optimize_for_inference puts it in on the CPU, and can leave it out.
    optimized = optimize_for_inference(copy.deepcopy(plain))
    assert isinstance(optimized.ins_head.kernel_pred, WinogradConv2d)
    without = optimize_for_inference(copy.deepcopy(plain), winograd=False)
    assert not any(isinstance(m, WinogradConv2d) for m in without.modules())


@pytest.mark.parametrize("variant", ["level_batchnorm", "deformable_last"])
def test_fast_kernel_head_with_other_tower_layers(variant):
    """Towers that mix Winograd convs with per-level BatchNorm or a deformable conv run layer
    by layer too, each such layer on every level in turn."""
    from detectron2.modeling import build_model

    from solov2_d2.modeling.layers import LevelBatchNorm2d

    from .conftest import tiny_cfg

    cfg = tiny_cfg()
    sol = cfg.MODEL.SOLOV2
    if variant == "level_batchnorm":
        sol.NORM = "BN"
    else:
        sol.USE_DCN_IN_INSTANCE, sol.TYPE_DCN, sol.DCN_INSTANCE_CONVS = True, "DCN", "last"
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    for module in plain.ins_head.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics that differ by level
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    fast = copy.deepcopy(plain)
    # Two towers of 2 convs and two predictors, less the deformable last conv of each tower.
    assert use_winograd_in_kernel_head(fast) == (6 if variant == "level_batchnorm" else 4)
    if variant == "level_batchnorm":
        assert any(isinstance(m, LevelBatchNorm2d) for m in fast.ins_head.cate_tower)
    with torch.no_grad():
        features = plain.backbone(torch.randn(1, 3, 96, 128, generator=generator))
        for expected, actual in zip(plain.ins_head(features), fast.ins_head(features)):
            for e, a in zip(expected, actual):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
