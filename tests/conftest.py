import importlib.util
import os
import sys

import pytest
import torch

from solov2_d2 import add_solov2_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """The script ``tools/<name>.py`` of this clone as a module. Loaded by path, not ``import
    tools.<name>``: Detectron2 main installs a package named ``tools`` into site-packages, which
    wins over our folder (a namespace package) on ``sys.path``."""
    module_name = "solov2_d2_tools_" + name
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, os.path.join(ROOT, "tools", name + ".py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


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


# The model of ``tiny_cfg`` as YAML overrides of configs/Base-SOLOv2.yaml, for the tests that go
# through the command-line flow (train_net.setup, demo.py), which only takes a file and KEY VALUEs.
TINY_MODEL_OVERRIDES = {
    "DEVICE": "cpu",
    "WEIGHTS": "",
    "RESNETS": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, "NORM": "GN", "STEM_OUT_CHANNELS": 32},
    "BACKBONE": {"FREEZE_AT": 0},
    "FPN": {"OUT_CHANNELS": 64, "NORM": "GN"},
    "SOLOV2": {
        "INSTANCE_IN_CHANNELS": 64,
        "INSTANCE_CHANNELS": 64,
        "NUM_INSTANCE_CONVS": 2,
        "MASK_IN_CHANNELS": 64,
        "MASK_CHANNELS": 64,
        "NUM_MASKS": 64,
        "NUM_KERNELS": 64,
        "NUM_GRIDS": [12, 10, 8, 6, 4],
        "FPN_SCALE_RANGES": [[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]],
    },
}


def _deep_update(target, updates):
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
    return target


def write_tiny_config(directory, num_classes=3, name="tiny.yaml", **sections):
    """Writes ``<directory>/<name>``: ``_BASE_`` configs/Base-SOLOv2.yaml, the model of
    ``tiny_cfg(num_classes)``, then ``sections`` (top-level keys, e.g. ``INPUT={...}``) merged
    in depth. Returns the path."""
    import copy

    import yaml

    content = {
        "_BASE_": os.path.join(ROOT, "configs", "Base-SOLOv2.yaml"),
        "MODEL": copy.deepcopy(TINY_MODEL_OVERRIDES),
    }
    content["MODEL"]["SOLOV2"]["NUM_CLASSES"] = num_classes
    _deep_update(content, copy.deepcopy(sections))
    path = os.path.join(str(directory), name)
    with open(path, "w") as stream:
        yaml.safe_dump(content, stream, sort_keys=False)
    return path


def sharpen_untrained_heads(model, factor=10.0):
    """Scales the weights of the category and kernel predictors of an untrained SOLOv2 by
    ``factor``, so that its outputs depend visibly on the image. At init every category logit sits
    near the PRIOR_PROB bias (scores ~0.01, below SCORE_THR 0.1: no detection) and every mask logit
    near 0 (sigmoid ~0.5 = MASK_THR, where float rounding decides pixels). With 10x the scores of
    a 64 x 64 image spread over ~[0, 0.8], so that tens of detections pass the default thresholds,
    and the mask logits lie well away from the mask threshold. The biases (the prior) stay."""
    with torch.no_grad():
        model.ins_head.cate_pred.weight.mul_(factor)
        model.ins_head.kernel_pred.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def detecting_model():
    """``tiny_cfg``'s model (seed 0) with ``sharpen_untrained_heads``, in eval mode, at the
    config's thresholds. Shared by a module's tests: switch modes as needed, change nothing
    else."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return sharpen_untrained_heads(build_model(tiny_cfg())).eval()
