"""ResNet-18/34 narrower than Detectron2 allows (MODEL.RESNETS.RES2_OUT_CHANNELS != 64), built by
``build_solov2_resnet_fpn_backbone`` from Detectron2's own blocks (solov2_d2/modeling/backbone.py).
"""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, build_resnet_backbone

from solov2_d2.modeling.backbone import build_narrow_basic_resnet, build_solov2_resnet_fpn_backbone

from .conftest import tiny_cfg
from .test_solov2_model import synthetic_input

INPUT = ShapeSpec(channels=3)


def narrow_cfg(width, depth=18):
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_solov2_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    return cfg


def test_detectron2_refuses_what_the_builder_accepts():
    with pytest.raises(AssertionError, match="RES2_OUT_CHANNELS = 64"):
        build_resnet_fpn_backbone(narrow_cfg(32), INPUT)


@pytest.mark.parametrize("depth,blocks", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))])
def test_widths_strides_and_parameter_names(depth, blocks):
    backbone = build_solov2_resnet_fpn_backbone(narrow_cfg(32, depth), INPUT)
    resnet = backbone.bottom_up
    shapes = resnet.output_shape()
    # Each stage doubles the width of the one before, from RES2_OUT_CHANNELS; strides 4..32.
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    for index, stage in enumerate(("res2", "res3", "res4", "res5")):
        stage_blocks = list(getattr(resnet, stage).children())
        assert len(stage_blocks) == blocks[index]
        assert all(isinstance(b, BasicBlock) for b in stage_blocks)
        assert stage_blocks[0].conv1.stride == ((1, 1) if index == 0 else (2, 2))
    params = dict(backbone.named_parameters())
    # Detectron2's names: stem 32 (STEM_OUT_CHANNELS) -> res2 32 needs no shortcut conv.
    assert params["bottom_up.stem.conv1.weight"].shape == (32, 3, 7, 7)
    assert "bottom_up.res2.0.shortcut.weight" not in params
    assert params["bottom_up.res3.0.shortcut.weight"].shape == (64, 32, 1, 1)
    assert params["bottom_up.res5.{}.conv2.weight".format(blocks[3] - 1)].shape == (256, 256, 3, 3)
    assert params["fpn_lateral5.weight"].shape == (64, 256, 1, 1)
    # FPN p2..p6 with the config's 64 channels, stride 64 from the max-pool top block.
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "p2": (64, 4),
        "p3": (64, 8),
        "p4": (64, 16),
        "p5": (64, 32),
        "p6": (64, 64),
    }


def test_width_64_is_detectron2s_own_backbone():
    """At 64 the builder hands over to Detectron2's: same modules, names, values."""
    torch.manual_seed(0)
    ours = build_solov2_resnet_fpn_backbone(narrow_cfg(64), INPUT).state_dict()
    torch.manual_seed(0)
    theirs = build_resnet_fpn_backbone(narrow_cfg(64), INPUT).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_narrow_resnet_draws_detectron2s_random_numbers():
    """The narrow build follows Detectron2's module order: a width-64 build through the narrow
    path's code gives Detectron2's very initial weights."""
    cfg = narrow_cfg(64)
    torch.manual_seed(1)
    ours = build_narrow_basic_resnet(cfg, INPUT).state_dict()
    torch.manual_seed(1)
    theirs = build_resnet_backbone(cfg, INPUT).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_freeze_at_is_honoured():
    cfg = narrow_cfg(32)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    resnet = build_solov2_resnet_fpn_backbone(cfg, INPUT).bottom_up
    assert not any(p.requires_grad for p in resnet.stem.parameters())
    assert not any(p.requires_grad for p in resnet.res2.parameters())
    assert all(p.requires_grad for p in resnet.res3.parameters())


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("RES2_OUT_CHANNELS", 0, "RES2_OUT_CHANNELS must be >= 1"),
        ("RES5_DILATION", 2, "RES5_DILATION 1 and NUM_GROUPS 1"),
        ("NUM_GROUPS", 2, "RES5_DILATION 1 and NUM_GROUPS 1"),
    ],
)
def test_bad_settings_get_clear_errors(key, value, message):
    cfg = narrow_cfg(32)
    setattr(cfg.MODEL.RESNETS, key, value)
    with pytest.raises(ValueError, match=message):
        build_solov2_resnet_fpn_backbone(cfg, INPUT)


def test_a_narrow_model_trains_and_infers():
    cfg = narrow_cfg(32)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    inputs = [synthetic_input(96, 128), synthetic_input(96, 128)]
    losses = model(inputs)
    sum(losses.values()).backward()
    grad = model.backbone.bottom_up.res2[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([{"image": inputs[0]["image"]}])
    assert out[0]["instances"].pred_masks.shape[-2:] == (96, 128)
