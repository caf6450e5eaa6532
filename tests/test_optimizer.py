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


def test_adamw_is_fused_and_steps_like_the_per_parameter_loop():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults["fused"] is True
    # The same parameter groups in the per-parameter loop: after 3 steps with the same gradients,
    # the weights agree to float rounding (a fused kernel orders the arithmetic differently).
    reference_model = build_model(cfg)
    reference_model.load_state_dict(model.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    reference_params = dict(reference_model.named_parameters())
    reference_groups = [
        {**g, "fused": False, "params": [reference_params[names[id(p)]] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    reference = torch.optim.AdamW(reference_groups, lr=1e-3, weight_decay=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for name, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=generator) * 1e-2
            p.grad = grad.clone()
            reference_params[name].grad = grad.clone()
        optimizer.step()
        reference.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, reference_params[name], rtol=1e-5, atol=1e-7)
        # every parameter had a gradient, so every one moved (the comparison is not vacuous)
        assert not torch.equal(p, before[name]), name


def test_unknown_optimizer_is_a_clear_error():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "LION"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, build_model(cfg))
