"""AdelaiDet SOLOv2 checkpoints load unchanged; our own checkpoints round-trip."""

import json
import logging
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from .conftest import ROOT, sharpen_untrained_heads, tiny_cfg


def adelaidet_r50_cfg(num_classes):
    from detectron2.config import get_cfg

    from solov2_d2 import add_solov2_config

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "SOLOv2_R50_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SOLOV2.NUM_CLASSES = num_classes
    return cfg


@pytest.fixture(scope="module")
def adelaidet_keys(request):
    path = os.path.join(ROOT, "..", "shared", "reference", "adelaidet_solov2_keys.json")
    if not os.path.exists(path):
        pytest.skip("../shared/reference/adelaidet_solov2_keys.json is not beside this clone")
    with open(path) as f:
        return [(name, tuple(shape)) for name, shape in json.load(f)]


def test_adelaidet_checkpoint_loads_without_missing_or_unexpected_keys(
    adelaidet_keys, tmp_path, caplog
):
    num_classes = dict(adelaidet_keys)["ins_head.cate_pred.bias"][0]
    model = build_model(adelaidet_r50_cfg(num_classes))
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in adelaidet_keys}
    path = str(tmp_path / "adelaidet_solov2_R50.pth")
    torch.save({"model": state}, path)

    ours = model.state_dict()
    assert set(ours) == set(state)
    assert {k: tuple(v.shape) for k, v in ours.items()} == dict(adelaidet_keys)

    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(path)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "not found" not in warnings and "unexpected" not in warnings.lower(), warnings
    assert "not used" not in warnings, warnings
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_our_checkpoint_round_trips(tmp_path):
    """A model saved and loaded into a differently initialized one: the same weights and the same
    detections. The saved model's predictors are sharpened (weights changed after init) so that it
    detects at the config's thresholds and its weights differ from any fresh init."""
    torch.manual_seed(0)
    model = sharpen_untrained_heads(build_model(tiny_cfg())).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    torch.manual_seed(1)
    other = build_model(tiny_cfg()).eval()
    image = {"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255}
    with torch.no_grad():
        expected = model([image])[0]["instances"]
        before = other([image])[0]["instances"]
    assert len(expected) > 5
    # Unloaded, the other model finds nothing at SCORE_THR 0.1 (scores near the 0.01 prior).
    assert len(before) == 0

    DetectionCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    with torch.no_grad():
        loaded = other([image])[0]["instances"]
    assert torch.equal(loaded.scores, expected.scores)
    assert torch.equal(loaded.pred_classes, expected.pred_classes)
    assert torch.equal(loaded.pred_masks, expected.pred_masks)
