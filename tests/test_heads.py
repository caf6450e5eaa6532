import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances, PolygonMasks

from solov2_d2.modeling.kernel_head import SOLOv2KernelHead, instance_level_features
from solov2_d2.modeling.layers import append_coordinates
from solov2_d2.modeling.mask_feature_head import SOLOv2MaskFeatureHead

from .conftest import tiny_cfg

# FPN levels of an 800 x 1216 input (a multiple of 32, as Detectron2's FPN pads it): every level
# is ceil(800 / stride) x ceil(1216 / stride) (strided convs and pooling round up).
LEVEL_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
LEVEL_SIZES = {
    "p2": (200, 304),
    "p3": (100, 152),
    "p4": (50, 76),
    "p5": (25, 38),
    "p6": (13, 19),
    "p7": (7, 10),
}


def test_append_coordinates_x_then_y_linspace():
    out = append_coordinates(torch.zeros(2, 1, 3, 2))
    assert out.shape == (2, 3, 3, 2)
    # x runs along the width (2 columns: -1, 1), y along the height (3 rows: -1, 0, 1).
    assert torch.equal(out[0, 1], torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]]))
    assert torch.equal(out[1, 2], torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))


def levels(names, channels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, *LEVEL_SIZES[name], generator=generator) for name in names]


@pytest.mark.parametrize("input_size", [(800, 1216), (128, 192), (512, 800), (96, 160)])
def test_five_levels_are_what_the_official_p2_p6_rule_gave(input_size):
    """p2 halved with scale_factor 0.5 and p6 resized to p5's size (the former special case,
    written out here) give the same bits as the general rule."""
    height, width = input_size
    features = [
        torch.randn(2, 3, math.ceil(height / s), math.ceil(width / s)) for s in (4, 8, 16, 32, 64)
    ]
    p2, p3, p4, p5, p6 = features
    official = [
        F.interpolate(p2, scale_factor=0.5, mode="bilinear", align_corners=False),
        p3,
        p4,
        p5,
        F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False),
    ]
    out = instance_level_features(features, [4, 8, 16, 32, 64], [8, 8, 16, 32, 32])
    assert len(out) == 5
    for new, old in zip(out, official):
        assert new.shape == old.shape and torch.equal(new, old)
    assert out[1] is p3 and out[2] is p4 and out[3] is p5
    assert [tuple(f.shape[-2:]) for f in out][0] == (height // 8, width // 8)


INSTANCE_LEVEL_CASES = {
    # name: (levels, instance strides, expected sizes for the 800 x 1216 input)
    "3 levels p3-p5": (
        ["p3", "p4", "p5"],
        [8, 16, 32],
        [(100, 152), (50, 76), (25, 38)],
    ),
    "4 levels p3-p6 (AdelaiDet-style)": (
        ["p3", "p4", "p5", "p6"],
        [8, 16, 32, 32],
        [(100, 152), (50, 76), (25, 38), (25, 38)],
    ),
    "5 levels p2-p6 (official)": (
        ["p2", "p3", "p4", "p5", "p6"],
        [8, 8, 16, 32, 32],
        [(100, 152), (100, 152), (50, 76), (25, 38), (25, 38)],
    ),
    "6 levels p2-p7": (
        ["p2", "p3", "p4", "p5", "p6", "p7"],
        [8, 8, 16, 32, 32, 32],
        [(100, 152), (100, 152), (50, 76), (25, 38), (25, 38), (25, 38)],
    ),
}


@pytest.mark.parametrize("case", list(INSTANCE_LEVEL_CASES))
def test_any_number_of_levels_goes_to_its_instance_strides(case):
    names, instance_strides, expected = INSTANCE_LEVEL_CASES[case]
    features = levels(names)
    out = instance_level_features(features, [LEVEL_STRIDES[n] for n in names], instance_strides)
    assert [tuple(f.shape[-2:]) for f in out] == expected
    for name, feature, resized, instance_stride in zip(names, features, out, instance_strides):
        if LEVEL_STRIDES[name] == instance_stride:
            assert resized is feature  # at its own stride: untouched
        else:
            assert resized is not feature


def test_level_resizing_values_by_hand():
    """Bilinear, half-pixel centres: halving averages 2 x 2 blocks; doubling a 2 x 2 map gives the
    taps 0, 1/4, 3/4, 1 along each axis (the border pixels clamp)."""
    fine = torch.arange(64.0).view(1, 1, 8, 8)  # stride 4 of a 32 x 32 input, to stride 8
    coarse = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)  # stride 16, to stride 8
    halved, doubled = instance_level_features([fine, coarse], [4, 16], [8, 8])
    # fine[y, x] = 8 y + x: the block of (2i, 2j) averages 8 (2i + 1/2) + 2j + 1/2.
    rows, cols = torch.arange(4.0)[:, None], torch.arange(4.0)[None, :]
    assert torch.equal(halved[0, 0], 16 * rows + 2 * cols + 4.5)
    taps = torch.tensor([0.0, 0.25, 0.75, 1.0])
    # coarse[y, x] = x + 2 y, and bilinear interpolation keeps a linear function linear.
    assert torch.equal(doubled[0, 0], taps[None, :] + 2 * taps[:, None])


def test_instance_level_features_needs_one_stride_per_level():
    with pytest.raises(ValueError, match="2 levels, 2 strides and 3 instance strides"):
        instance_level_features(levels(["p3", "p4"]), [8, 16], [8, 16, 32])


def shapes(channels=32, names=("p3", "p4")):
    return {name: ShapeSpec(channels=channels, stride=LEVEL_STRIDES[name]) for name in names}


def make_kernel_head(input_shape=None, **overrides):
    args = dict(
        instance_strides=[8, 16],
        channels=32,
        num_convs=2,
        num_grids=[5, 3],
        num_classes=4,
        num_kernels=16,
        norm="GN",
        use_coord_conv=True,
        prior_prob=0.01,
    )
    args.update(overrides)
    return SOLOv2KernelHead(shapes() if input_shape is None else input_shape, **args)


def test_kernel_head_channels_from_input_shape_and_coordconv_only_on_kernel_branch():
    head = make_kernel_head(shapes(channels=48))
    assert head.in_features == ["p3", "p4"] and head.in_strides == [8, 16]
    assert head.kernel_tower[0].in_channels == 50  # + x, y
    assert head.cate_tower[0].in_channels == 48
    # The head reads its own levels from the backbone's dict and ignores the others.
    feats = {"p2": None, "p3": torch.randn(2, 48, 10, 12), "p4": torch.randn(2, 48, 5, 6)}
    logits, kernels = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 4, 5, 5), (2, 4, 3, 3)]
    assert [tuple(x.shape) for x in kernels] == [(2, 16, 5, 5), (2, 16, 3, 3)]


def test_kernel_head_prior_bias():
    head = make_kernel_head()
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99.0)))
    # With zero input and zero-mean tower weights the initial probability is about prior_prob.
    logits, _ = head({"p3": torch.zeros(1, 32, 5, 5), "p4": torch.zeros(1, 32, 3, 3)})
    assert torch.allclose(logits[0].sigmoid(), torch.full_like(logits[0], 0.01), atol=1e-3)


def test_kernel_head_without_norm_has_biases():
    head = make_kernel_head(norm="")
    assert head.cate_tower[0].bias is not None
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())


@pytest.mark.parametrize(
    "input_shape, overrides, words",
    [
        (None, dict(num_grids=[5, 3, 2]), "NUM_GRIDS has 3 entries but INSTANCE_IN_FEATURES has 2"),
        (None, dict(instance_strides=[8]), "FPN_INSTANCE_STRIDES has 1 entries"),
        (
            {"p3": ShapeSpec(channels=32, stride=8), "p4": ShapeSpec(channels=16, stride=16)},
            {},
            "one channel count",
        ),
    ],
)
def test_kernel_head_rejects_inconsistent_levels(input_shape, overrides, words):
    with pytest.raises(ValueError, match=words):
        make_kernel_head(input_shape, **overrides)


def tiny_backbone_shapes():
    cfg = tiny_cfg()
    return cfg, build_backbone(cfg).output_shape()


def test_heads_from_config_take_the_backbones_shapes():
    cfg, input_shape = tiny_backbone_shapes()
    kernel_head = SOLOv2KernelHead(cfg, input_shape)
    assert kernel_head.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert kernel_head.in_strides == [4, 8, 16, 32, 64]
    assert kernel_head.instance_strides == [8, 8, 16, 32, 32]
    assert kernel_head.num_grids == [12, 10, 8, 6, 4]
    assert kernel_head.cate_tower[0].in_channels == 64  # tiny_cfg's FPN.OUT_CHANNELS
    mask_head = SOLOv2MaskFeatureHead(cfg, input_shape)
    assert mask_head.in_features == ["p2", "p3", "p4", "p5"]
    assert mask_head.output_stride == 4
    assert mask_head.convs_all_levels[0].conv0[0].in_channels == 64


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("INSTANCE_IN_CHANNELS", 256, "INSTANCE_IN_CHANNELS is 256, but the backbone's p2, p3"),
        ("MASK_IN_CHANNELS", 128, "MASK_IN_CHANNELS is 128, but the backbone's p2, p3, p4, p5"),
        ("INSTANCE_IN_FEATURES", ["p3", "p7"], "INSTANCE_IN_FEATURES names p7, which the"),
        ("MASK_IN_FEATURES", ["res2"], "MASK_IN_FEATURES names res2, which the backbone"),
    ],
)
def test_heads_from_config_check_the_keys_against_the_backbone(key, value, words):
    cfg, input_shape = tiny_backbone_shapes()
    cfg.MODEL.SOLOV2[key] = value
    head = SOLOv2KernelHead if key.startswith("INSTANCE") else SOLOv2MaskFeatureHead
    with pytest.raises(ValueError, match=words) as error:
        head(cfg, input_shape)
    assert "64" in str(error.value) or "has p2, p3, p4, p5, p6" in str(error.value)


def test_mask_feature_head_fuses_to_quarter_scale():
    head = SOLOv2MaskFeatureHead(shapes(names=("p2", "p3", "p4", "p5")), channels=32, num_masks=64)
    feats = {f"p{i + 2}": torch.randn(1, 32, 16 // 2**i, 24 // 2**i) for i in range(4)}
    out = head(feats)  # p2..p5 of a 64 x 96 input
    assert out.shape == (1, 64, 16, 24)
    assert (out >= 0).all()  # ends with ReLU
    names = {k for k, _ in head.named_parameters()}
    # Official layout: level i has i conv blocks (p2 one), coordinates enter the p5 branch.
    assert "convs_all_levels.0.conv0.0.weight" in names
    assert "convs_all_levels.3.conv2.0.weight" in names
    assert "convs_all_levels.3.conv3.0.weight" not in names
    assert head.convs_all_levels[3].conv0[0].in_channels == 34
    assert head.convs_all_levels[2].conv0[0].in_channels == 32
    assert "conv_pred.0.weight" in names and "conv_pred.1.weight" in names


def test_mask_feature_head_levels_must_double_in_stride():
    with pytest.raises(ValueError, match=r"twice the previous stride.*'p4': 16"):
        SOLOv2MaskFeatureHead(shapes(names=("p2", "p4")), channels=32, num_masks=32)
    head = SOLOv2MaskFeatureHead(shapes(names=("p3", "p4", "p5")), channels=32, num_masks=32)
    assert head.output_stride == 8


def test_mask_feature_head_coordinates_matter():
    """The p5 branch sees position: a constant input still gives a spatially varying output."""
    torch.manual_seed(0)
    head = SOLOv2MaskFeatureHead(
        shapes(names=("p2", "p3", "p4", "p5")), channels=32, num_masks=32, norm=""
    )
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.5)
    feats = {f"p{i + 2}": torch.ones(1, 32, 16 // 2**i, 16 // 2**i) for i in range(4)}
    out = head(feats)
    assert out[0, :, 2:-2, 2:-2].std(dim=(1, 2)).max() > 0


# ------------------------------------------------------------------ models of 3 to 6 levels

# Input 96 x 160 (a multiple of 32): a stride-s level is ceil(96 / s) x ceil(160 / s).
MODEL_LEVEL_CASES = {
    3: dict(
        features=["p3", "p4", "p5"],
        instance_strides=[8, 16, 32],
        grids=[10, 8, 6],
        ranges=[[1, 48], [24, 96], [48, 2048]],
        sizes=[(12, 20), (6, 10), (3, 5)],
    ),
    4: dict(
        features=["p3", "p4", "p5", "p6"],
        instance_strides=[8, 16, 32, 32],
        grids=[10, 8, 6, 4],
        ranges=[[1, 48], [24, 96], [48, 192], [96, 2048]],
        sizes=[(12, 20), (6, 10), (3, 5), (3, 5)],
    ),
    5: dict(
        features=["p2", "p3", "p4", "p5", "p6"],
        instance_strides=[8, 8, 16, 32, 32],
        grids=[12, 10, 8, 6, 4],
        ranges=[[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]],
        sizes=[(12, 20), (12, 20), (6, 10), (3, 5), (3, 5)],
    ),
    # Detectron2's RetinaNet FPN (LastLevelP6P7) on res2..res5 gives p2..p7.
    6: dict(
        features=["p2", "p3", "p4", "p5", "p6", "p7"],
        instance_strides=[8, 8, 16, 32, 32, 32],
        grids=[12, 10, 8, 6, 4, 3],
        ranges=[[1, 24], [12, 48], [24, 96], [48, 192], [96, 384], [192, 2048]],
        sizes=[(12, 20), (12, 20), (6, 10), (3, 5), (3, 5), (3, 5)],
        backbone="build_retinanet_resnet_fpn_backbone",
    ),
}


def level_cfg(num_levels):
    case = MODEL_LEVEL_CASES[num_levels]
    cfg = tiny_cfg()
    sol = cfg.MODEL.SOLOV2
    sol.INSTANCE_IN_FEATURES = case["features"]
    sol.FPN_INSTANCE_STRIDES = case["instance_strides"]
    sol.NUM_GRIDS = case["grids"]
    sol.FPN_SCALE_RANGES = case["ranges"]
    if "backbone" in case:
        cfg.MODEL.BACKBONE.NAME = case["backbone"]
    return cfg


@pytest.mark.parametrize("num_levels", sorted(MODEL_LEVEL_CASES))
def test_models_of_3_to_6_levels_train_and_infer(num_levels):
    case = MODEL_LEVEL_CASES[num_levels]
    torch.manual_seed(0)
    model = build_model(level_cfg(num_levels))
    assert model.ins_head.in_features == case["features"]
    assert model.num_grids is model.ins_head.num_grids  # the kernel head owns NUM_GRIDS
    assert model.cell_strides.tolist() == [
        float(stride)
        for grid, stride in zip(case["grids"], case["instance_strides"])
        for _ in range(grid * grid)
    ]
    image = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        instance_features = model.ins_head.instance_features(features)
    assert [tuple(f.shape[-2:]) for f in instance_features] == case["sizes"]

    instances = Instances((96, 160))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 72.0, 80.0], [100.0, 10.0, 150.0, 40.0]]))
    instances.gt_classes = torch.tensor([1, 2])
    instances.gt_masks = PolygonMasks(
        [
            [[8.0, 8.0, 72.0, 8.0, 72.0, 80.0, 8.0, 80.0]],
            [[100.0, 10.0, 150.0, 10.0, 150.0, 40.0, 100.0, 40.0]],
        ]
    )
    model.train()
    losses = model([{"image": image, "instances": instances}])
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    assert model.ins_head.kernel_pred.weight.grad.abs().sum() > 0

    model.eval()
    # Untrained (scores at the 0.01 prior): let every candidate through.
    model.inference_params.score_threshold = model.inference_params.update_threshold = 0.0
    with torch.no_grad():
        outputs = model([{"image": image, "height": 96, "width": 160}])
    assert outputs[0]["instances"].image_size == (96, 160)
    assert len(outputs[0]["instances"]) > 0


def test_mask_feature_must_be_at_stride_4():
    cfg = tiny_cfg()
    cfg.MODEL.SOLOV2.MASK_IN_FEATURES = ["p3", "p4", "p5"]
    with pytest.raises(ValueError, match="stride 4.*starts at stride 8"):
        build_model(cfg)
