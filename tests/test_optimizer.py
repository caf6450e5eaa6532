import pytest
import torch
from detectron2.modeling import build_model

from solov2_d2.engine import build_optimizer
from solov2_d2.engine.optimizer import _add_gradient_clipping, clip_each_gradient_norm_

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


def _gradients_to_clip(generator):
    """Parameters whose gradient norms lie on both sides of 35 (Base-SOLOv2's CLIP_VALUE), in
    two dtypes, one without a gradient and one with a zero gradient."""
    params = []
    for shape, scale, dtype in [
        ((64, 66, 3, 3), 1.0, torch.float32),  # norm ~230: clipped
        ((64,), 0.1, torch.float32),  # norm ~0.8: kept
        ((7, 5), 20.0, torch.float32),  # norm ~120: clipped
        ((1,), 100.0, torch.float32),
        ((3, 3), 30.0, torch.float64),
        ((16,), 0.0, torch.float32),
    ]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator, dtype=dtype) * scale
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_each_gradient_clipped_bitwise_like_detectron2s_per_parameter_clipper(norm_type):
    params = _gradients_to_clip(torch.Generator().manual_seed(3))
    original = [None if p.grad is None else p.grad.clone() for p in params]
    expected = []
    for p in params:
        # what Detectron2's CLIP_TYPE "norm" does: one clip_grad_norm_ call per parameter
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        torch.nn.utils.clip_grad_norm_(q, 35.0, norm_type)
        expected.append(q.grad)
    clip_each_gradient_norm_(params, 35.0, norm_type)
    for p, want, before in zip(params, expected, original):
        if want is None:
            assert p.grad is None
            continue
        assert p.grad.dtype == want.dtype and torch.equal(p.grad, want)
        norm = torch.linalg.vector_norm(before, norm_type)
        # the large gradients were scaled down (to norm 35), the small ones kept as they were
        assert torch.equal(p.grad, before) == bool(norm <= 35.0)


def test_adamw_step_clips_like_detectron2s_wrapper():
    from detectron2.solver.build import maybe_add_gradient_clipping

    cfg = tiny_cfg()
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "norm"
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    generator = torch.Generator().manual_seed(4)
    params = _gradients_to_clip(generator)[:4]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference):
        q.grad = p.grad.clone()
    ours = _add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=0.1, weight_decay=0.05)
    theirs = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        reference, lr=0.1, weight_decay=0.05
    )
    ours.step()
    theirs.step()
    for p, q in zip(params, reference):
        assert torch.equal(p.grad, q.grad) and torch.equal(p, q)
        assert p.abs().sum() > 0


def test_sgd_step_clips_like_detectron2s_build_optimizer():
    from detectron2.solver import build_optimizer as detectron2_build_optimizer

    cfg = tiny_cfg()
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "norm"
    torch.manual_seed(0)
    model = build_model(cfg)
    reference_model = build_model(cfg)
    reference_model.load_state_dict(model.state_dict())
    ours, theirs = build_optimizer(cfg, model), detectron2_build_optimizer(cfg, reference_model)
    assert isinstance(ours, torch.optim.SGD) and type(ours) is not type(theirs)
    generator = torch.Generator().manual_seed(5)
    clipped = kept = 0
    for _ in range(2):
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            # gradient norms from ~0.1 to ~1000: some parameters clipped at 35, some not
            grad = torch.randn(p.shape, generator=generator) * 10 ** (len(name) % 4 - 1)
            p.grad, q.grad = grad.clone(), grad.clone()
            clipped += int(torch.linalg.vector_norm(grad) > 35)
            kept += int(torch.linalg.vector_norm(grad) <= 35)
        ours.step()
        theirs.step()
    assert clipped > 0 and kept > 0
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p.grad, q.grad) and torch.equal(p, q)


def test_unknown_optimizer_is_a_clear_error():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "LION"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, build_model(cfg))
