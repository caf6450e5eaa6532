"""Optimizer choice for the yacs flow: Detectron2's SGD, or AdamW (SOLVER.OPTIMIZER)."""

import torch
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer"]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` "SGD" is Detectron2's own optimizer (the COCO configs use it, as the
    paper does); "ADAMW" uses the same parameter groups (norm / bias weight decay, bias lr factor)
    and the same gradient clipping, and converges much faster when training from scratch, which
    is what the CPU demo does."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(
            "SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got {!r}".format(cfg.SOLVER.OPTIMIZER)
        )
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        fused=_can_fuse(model),
    )


def _can_fuse(model: torch.nn.Module) -> bool:
    """PyTorch's fused AdamW (one kernel over all parameters) where it exists: the same update
    to float rounding (1 ulp), faster than the per-parameter loop, whose cost matters on small
    models such as the CPU demo's (README, Results). Its devices: CPU and CUDA, floating-point
    parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
