import os

import pytest
import torch

from solov2_d2 import add_solov2_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))

# Two cores: keep the suite from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_cfg(num_classes=3):
    """A SOLOv2 config small enough to train steps in a unit test on a CPU."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-SOLOv2.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FPN.NORM = "GN"
    sol = cfg.MODEL.SOLOV2
    sol.NUM_CLASSES = num_classes
    sol.INSTANCE_IN_CHANNELS = 64
    sol.INSTANCE_CHANNELS = 64
    sol.NUM_INSTANCE_CONVS = 2
    sol.MASK_IN_CHANNELS = 64
    sol.MASK_CHANNELS = 64
    sol.NUM_MASKS = 64
    sol.NUM_KERNELS = 64
    sol.NUM_GRIDS = [12, 10, 8, 6, 4]
    sol.FPN_SCALE_RANGES = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048))
    return cfg


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared (real COCO sample, reference files) is not beside this clone")
    return SHARED
