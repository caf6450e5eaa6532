import pytest
import torch
from detectron2.modeling import build_model

from solov2_d2.engine import build_optimizer

from .conftest import tiny_cfg


def test_sgd_is_the_default_and_is_detectron2s():
    cfg = tiny_cfg()
    assert cfg.SOLVER.OPTIMIZER == "SGD"
    optimizer = build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == cfg.SOLVER.MOMENTUM


def test_adamw_keeps_parameter_groups_and_gradient_clipping():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    optimizer = build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, torch.optim.AdamW)
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    # GroupNorm parameters get WEIGHT_DECAY_NORM (0), conv weights WEIGHT_DECAY.
    assert 0.0 in decays and 0.05 in decays
    # Base-SOLOv2 enables norm clipping: Detectron2 wraps the class.
    assert type(optimizer) is not torch.optim.AdamW


def test_unknown_optimizer_is_a_clear_error():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "LION"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, build_model(cfg))
