import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config

from .conftest import tiny_cfg

# AdelaiDet's MODEL.SOLOV2 defaults (key names and values are a compatibility contract).
ADELAIDET_DEFAULTS = {
    "INSTANCE_IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "FPN_INSTANCE_STRIDES": [8, 8, 16, 32, 32],
    "FPN_SCALE_RANGES": ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)),
    "SIGMA": 0.2,
    "INSTANCE_IN_CHANNELS": 256,
    "INSTANCE_CHANNELS": 512,
    "NUM_INSTANCE_CONVS": 4,
    "USE_DCN_IN_INSTANCE": False,
    "TYPE_DCN": "DCN",
    "NUM_GRIDS": [40, 36, 24, 16, 12],
    "NUM_CLASSES": 80,
    "NUM_KERNELS": 256,
    "NORM": "GN",
    "USE_COORD_CONV": True,
    "PRIOR_PROB": 0.01,
    "MASK_IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MASK_IN_CHANNELS": 256,
    "MASK_CHANNELS": 128,
    "NUM_MASKS": 256,
    "NMS_PRE": 500,
    "SCORE_THR": 0.1,
    "UPDATE_THR": 0.05,
    "MASK_THR": 0.5,
    "MAX_PER_IMG": 100,
    "NMS_TYPE": "matrix",
    "NMS_KERNEL": "gaussian",
    "NMS_SIGMA": 2,
}
ADELAIDET_LOSS_DEFAULTS = {
    "FOCAL_USE_SIGMOID": True,
    "FOCAL_ALPHA": 0.25,
    "FOCAL_GAMMA": 2.0,
    "FOCAL_WEIGHT": 1.0,
    "DICE_WEIGHT": 3.0,
}


def test_defaults_match_adelaidet():
    cfg = get_cfg()
    add_solov2_config(cfg)
    for key, value in ADELAIDET_DEFAULTS.items():
        assert cfg.MODEL.SOLOV2[key] == value, key
    for key, value in ADELAIDET_LOSS_DEFAULTS.items():
        assert cfg.MODEL.SOLOV2.LOSS[key] == value, key


def test_add_solov2_config_adds_model_solov2_and_solver_optimizer_only():
    before = get_cfg()
    after = get_cfg()
    add_solov2_config(after)
    added = {
        f"{section}.{key}"
        for section in after
        if isinstance(after[section], dict)
        for key in set(after[section]) - set(before[section])
    }
    assert added == {"MODEL.SOLOV2", "SOLVER.OPTIMIZER"}
    assert after.SOLVER.OPTIMIZER == "SGD"
    # A config that already has an optimizer key keeps its value.
    before.SOLVER.OPTIMIZER = "ADAMW"
    add_solov2_config(before)
    assert before.SOLVER.OPTIMIZER == "ADAMW"


def test_add_solov2_config_does_not_touch_global_defaults():
    cfg = get_cfg()
    add_solov2_config(cfg)
    assert "SOLOV2" not in get_cfg().MODEL


def test_adelaidet_style_yaml_loads(tmp_path):
    """A YAML written with AdelaiDet's key names (a SOLOv2-Light-like override) merges as is."""
    base = {
        "MODEL": {
            "META_ARCHITECTURE": "SOLOv2",
            "MASK_ON": True,
            "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
            "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
            "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
        },
        "INPUT": {"MIN_SIZE_TRAIN": [800], "MASK_FORMAT": "bitmask"},
        "VERSION": 2,
    }
    leaf = {
        "_BASE_": "Base-SOLOv2.yaml",
        "MODEL": {
            "SOLOV2": {
                "NUM_INSTANCE_CONVS": 2,
                "INSTANCE_CHANNELS": 256,
                "FPN_SCALE_RANGES": [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]],
                "NMS_KERNEL": "linear",
                "LOSS": {"DICE_WEIGHT": 3.0},
            }
        },
    }
    (tmp_path / "Base-SOLOv2.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "R50_light.yaml").write_text(yaml.safe_dump(leaf))
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(tmp_path / "R50_light.yaml"))
    assert cfg.MODEL.SOLOV2.NUM_INSTANCE_CONVS == 2
    assert cfg.MODEL.SOLOV2.NMS_KERNEL == "linear"
    assert list(cfg.MODEL.SOLOV2.FPN_SCALE_RANGES[0]) == [1, 56]


@pytest.mark.parametrize(
    "key, value, error, words",
    [
        ("NMS_TYPE", "soft", ValueError, "NMS_TYPE"),
        ("NMS_KERNEL", "cosine", ValueError, "NMS_KERNEL"),
        ("NUM_KERNELS", 32, ValueError, "NUM_KERNELS"),
        ("NUM_GRIDS", [12, 10, 8], ValueError, "NUM_GRIDS has 3 entries"),
        ("FPN_INSTANCE_STRIDES", [8, 16], ValueError, "FPN_INSTANCE_STRIDES has 2 entries"),
        ("FPN_SCALE_RANGES", [[1, 64]], ValueError, "FPN_SCALE_RANGES has 1 entries"),
        # Kept for AdelaiDet's YAMLs and checked against the backbone (tiny_cfg's FPN: 64).
        ("INSTANCE_IN_CHANNELS", 256, ValueError, "INSTANCE_IN_CHANNELS is 256, but"),
        ("MASK_IN_CHANNELS", 256, ValueError, "MASK_IN_CHANNELS is 256, but"),
    ],
)
def test_set_but_unimplemented_or_inconsistent_keys_fail_clearly(key, value, error, words):
    cfg = tiny_cfg()
    cfg.MODEL.SOLOV2[key] = value
    with pytest.raises(error, match=words):
        build_model(cfg)


def test_focal_softmax_is_refused():
    cfg = tiny_cfg()
    cfg.MODEL.SOLOV2.LOSS.FOCAL_USE_SIGMOID = False
    with pytest.raises(NotImplementedError, match="FOCAL_USE_SIGMOID"):
        build_model(cfg)


def test_model_device_follows_pixel_mean_buffer():
    model = build_model(tiny_cfg())
    assert model.device == torch.device("cpu")
    assert "pixel_mean" not in model.state_dict()
