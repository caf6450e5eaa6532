"""MODEL.SOLOV2.NORM "BN": BatchNorm in both heads, one per FPN level in the shared towers."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from torch import nn

from solov2_d2.modeling.layers import LevelBatchNorm2d, conv_norm_relu, run_tower
from solov2_d2.modeling.mask_feature_head import SOLOv2MaskFeatureHead

from .conftest import tiny_cfg
from .test_heads import make_kernel_head, shapes


def test_level_batchnorm_keeps_each_levels_statistics():
    norm = LevelBatchNorm2d(1, num_levels=3)
    norm.train()
    # Level 0 sees values of mean 5 (variance 0 within the batch), level 1 of mean -3.
    norm(torch.full((2, 1, 2, 2), 5.0), 0)
    norm(torch.full((2, 1, 2, 2), -3.0), 1)
    # BatchNorm's running mean moves by momentum 0.1 from 0 toward the batch mean; the unbiased
    # batch variance is 0, so the running variance goes from 1 to 0.9.
    assert norm.levels[0].running_mean.item() == pytest.approx(0.5)
    assert norm.levels[1].running_mean.item() == pytest.approx(-0.3)
    assert norm.levels[2].running_mean.item() == 0.0  # level 2 never ran
    assert [int(n.num_batches_tracked) for n in norm.levels] == [1, 1, 0]
    assert norm.levels[0].running_var.item() == pytest.approx(0.9)
    norm.eval()
    x = torch.full((1, 1, 1, 1), 5.0)
    # eval: (x - running mean) / sqrt(running var + eps), each level with its own statistics.
    assert norm(x, 0).item() == pytest.approx((5.0 - 0.5) / (0.9 + 1e-5) ** 0.5)
    assert norm(x, 1).item() == pytest.approx((5.0 + 0.3) / (0.9 + 1e-5) ** 0.5)


def test_conv_norm_relu_norms():
    assert isinstance(conv_norm_relu(4, 32, 3, "GN")[1], nn.GroupNorm)
    assert isinstance(conv_norm_relu(4, 32, 3, "BN")[1], nn.BatchNorm2d)
    shared = conv_norm_relu(4, 32, 3, "BN", num_levels=5)[1]
    assert isinstance(shared, LevelBatchNorm2d) and len(shared.levels) == 5
    assert conv_norm_relu(4, 32, 3, "BN")[0].bias is None
    with pytest.raises(ValueError, match="NORM must be 'GN', 'BN' or '' / 'none'.*'SyncBN'"):
        conv_norm_relu(4, 32, 3, "SyncBN")


def test_kernel_head_bn_runs_each_level_through_its_own_norms():
    torch.manual_seed(0)
    head = make_kernel_head(norm="BN")  # levels p3, p4; grids 5, 3; 2 convs per tower
    for tower in (head.cate_tower, head.kernel_tower):
        assert [type(m) for m in tower] == [
            nn.Conv2d,
            LevelBatchNorm2d,
            nn.ReLU,
            nn.Conv2d,
            LevelBatchNorm2d,
            nn.ReLU,
        ]
        assert all(len(m.levels) == 2 for m in tower if isinstance(m, LevelBatchNorm2d))
    keys = set(head.state_dict())
    assert "cate_tower.1.levels.1.running_mean" in keys and "cate_tower.1.weight" not in keys

    # Training: one forward updates each level's statistics once.
    head.train()
    features = {"p3": torch.randn(2, 32, 10, 12) + 2.0, "p4": torch.randn(2, 32, 5, 6) - 2.0}
    head(features)
    for norm in (head.cate_tower[1], head.kernel_tower[4]):
        assert [int(n.num_batches_tracked) for n in norm.levels] == [1, 1]
    assert not torch.allclose(
        head.cate_tower[1].levels[0].running_mean, head.cate_tower[1].levels[1].running_mean
    )

    # Inference: level k's logits are the tower with level k's BatchNorms as plain modules.
    head.eval()
    logits, kernels = head(features)
    grid_feature = torch.nn.functional.interpolate(
        features["p4"], size=(3, 3), mode="bilinear", align_corners=False
    )
    plain = nn.Sequential(
        *[m.levels[1] if isinstance(m, LevelBatchNorm2d) else m for m in head.cate_tower]
    )
    assert torch.equal(logits[1], head.cate_pred(plain(grid_feature)))
    assert torch.equal(run_tower(head.cate_tower, grid_feature, 1), plain(grid_feature))
    other = nn.Sequential(
        *[m.levels[0] if isinstance(m, LevelBatchNorm2d) else m for m in head.cate_tower]
    )
    assert not torch.allclose(logits[1], head.cate_pred(other(grid_feature)))


def test_mask_feature_head_bn_has_plain_batchnorms():
    input_shape = shapes(channels=32, names=("p2", "p3", "p4"))
    head = SOLOv2MaskFeatureHead(input_shape, channels=32, num_masks=16, norm="BN")
    norms = [m for m in head.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    # p2: 1 conv, p3: 1, p4: 2, conv_pred: 1, each with its own BatchNorm.
    assert len(norms) == 5 and all(type(m) is nn.BatchNorm2d for m in norms)


def test_model_with_bn_heads_trains_and_infers():
    cfg = tiny_cfg()
    cfg.MODEL.SOLOV2.NORM = "BN"
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not any(isinstance(m, nn.GroupNorm) for m in model.ins_head.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.mask_head.modules())
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    instances = Instances((96, 128))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 72.0, 80.0]]))
    instances.gt_classes = torch.tensor([1])
    instances.gt_masks = PolygonMasks([[[8.0, 8.0, 72.0, 8.0, 72.0, 80.0, 8.0, 80.0]]])
    model.train()
    before = copy.deepcopy(model.ins_head.cate_tower[1].state_dict())
    # Two images, so that the statistics are over a batch.
    batch = [{"image": image, "instances": instances}, {"image": image, "instances": instances}]
    losses = model(batch)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.ins_head.cate_tower[1].levels[4].weight.grad.abs().sum() > 0
    after = model.ins_head.cate_tower[1].state_dict()
    for level in range(5):  # every level's statistics moved
        key = "levels.{}.running_mean".format(level)
        assert not torch.equal(before[key], after[key])
    model.eval()
    model.inference_params.score_threshold = model.inference_params.update_threshold = 0.0
    with torch.no_grad():
        outputs = model([{"image": image, "height": 96, "width": 128}])
    assert len(outputs[0]["instances"]) > 0
