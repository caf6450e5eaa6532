import math

import torch

from solov2_d2.modeling.kernel_head import SOLOv2KernelHead, instance_level_features
from solov2_d2.modeling.layers import append_coordinates
from solov2_d2.modeling.mask_feature_head import SOLOv2MaskFeatureHead


def test_append_coordinates_x_then_y_linspace():
    out = append_coordinates(torch.zeros(2, 1, 3, 2))
    assert out.shape == (2, 3, 3, 2)
    # x runs along the width (2 columns: -1, 1), y along the height (3 rows: -1, 0, 1).
    assert torch.equal(out[0, 1], torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]]))
    assert torch.equal(out[1, 2], torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_instance_level_features_strides():
    sizes = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]  # p2..p6 of a 128x192 input
    feats = [torch.randn(1, 4, h, w) for h, w in sizes]
    out = instance_level_features(feats)
    assert [tuple(f.shape[-2:]) for f in out] == [(16, 24), (16, 24), (8, 12), (4, 6), (4, 6)]
    assert out[1] is feats[1]


def make_kernel_head(**overrides):
    args = dict(
        in_channels=32,
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
    return SOLOv2KernelHead(**args)


def test_kernel_head_shapes_and_coordconv_only_on_kernel_branch():
    head = make_kernel_head()
    assert head.kernel_tower[0].in_channels == 34  # + x, y
    assert head.cate_tower[0].in_channels == 32
    feats = [torch.randn(2, 32, 10, 12), torch.randn(2, 32, 5, 6)]
    logits, kernels = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 4, 5, 5), (2, 4, 3, 3)]
    assert [tuple(x.shape) for x in kernels] == [(2, 16, 5, 5), (2, 16, 3, 3)]


def test_kernel_head_prior_bias():
    head = make_kernel_head()
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99.0)))
    # With zero input and zero-mean tower weights the initial probability is about prior_prob.
    logits, _ = head([torch.zeros(1, 32, 5, 5), torch.zeros(1, 32, 3, 3)])
    assert torch.allclose(logits[0].sigmoid(), torch.full_like(logits[0], 0.01), atol=1e-3)


def test_kernel_head_without_norm_has_biases():
    head = make_kernel_head(norm="")
    assert head.cate_tower[0].bias is not None
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())


def test_mask_feature_head_fuses_to_quarter_scale():
    head = SOLOv2MaskFeatureHead(in_channels=32, channels=32, num_masks=64, num_levels=4)
    feats = [torch.randn(1, 32, 16 // 2**i, 24 // 2**i) for i in range(4)]  # p2..p5, 64x96 in
    out = head(feats)
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


def test_mask_feature_head_coordinates_matter():
    """The p5 branch sees position: a constant input still gives a spatially varying output."""
    torch.manual_seed(0)
    head = SOLOv2MaskFeatureHead(in_channels=32, channels=32, num_masks=32, num_levels=4, norm="")
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.5)
    feats = [torch.ones(1, 32, 16 // 2**i, 16 // 2**i) for i in range(4)]
    out = head(feats)
    assert out[0, :, 2:-2, 2:-2].std(dim=(1, 2)).max() > 0
