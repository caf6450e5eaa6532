"""Optimizer choice for the yacs flow: Detectron2's SGD, or AdamW (SOLVER.OPTIMIZER)."""

from collections import defaultdict
from typing import Iterable, Type

import torch
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "clip_each_gradient_norm_"]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` "SGD" is Detectron2's own optimizer (the COCO configs use it, as the
    paper does); "ADAMW" uses the same parameter groups (norm / bias weight decay, bias lr factor)
    and converges much faster when training from scratch, which is what the CPU demo does. Both
    clip gradients as Detectron2's ``SOLVER.CLIP_GRADIENTS`` defines it."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        # Detectron2's own SGD (its arguments differ between versions), with the clipping below.
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = build_sgd_optimizer(unclipped, model)
        optimizer.__class__ = _add_gradient_clipping(cfg, type(optimizer))
        return optimizer
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
    return _add_gradient_clipping(cfg, torch.optim.AdamW)(
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


@torch.no_grad()
def clip_each_gradient_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> None:
    """Detectron2's CLIP_TYPE "norm": every parameter's gradient scaled by
    min(1, max_norm / (its own norm + 1e-6)), as one ``clip_grad_norm_`` call per parameter
    computes it, in a few foreach calls per device and dtype instead of ~10 small ops per
    parameter. Bitwise the same gradients (tests/test_optimizer.py)."""
    groups = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[(p.grad.device, p.grad.dtype)].append(p.grad)
    for grads in groups.values():
        norms = torch._foreach_norm(grads, float(norm_type))
        # clip_grad_norm_ takes the norm of the stacked per-tensor norms (one each here).
        totals = torch.linalg.vector_norm(torch.stack(norms)[:, None], float(norm_type), dim=1)
        scales = torch.clamp(float(max_norm) / (totals + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind()))


def _add_gradient_clipping(cfg, optimizer_type: Type[torch.optim.Optimizer]):
    """``maybe_add_gradient_clipping`` with CLIP_TYPE "norm" done by ``clip_each_gradient_norm_``
    (the same result, cheaper per step); the other clip types are Detectron2's."""
    clipping = cfg.SOLVER.CLIP_GRADIENTS
    if not clipping.ENABLED or clipping.CLIP_TYPE != "norm":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    max_norm, norm_type = clipping.CLIP_VALUE, clipping.NORM_TYPE

    def step(self, closure=None):
        clip_each_gradient_norm_(
            (p for group in self.param_groups for p in group["params"]), max_norm, norm_type
        )
        return optimizer_type.step(self, closure)

    return type(optimizer_type.__name__ + "WithGradientClip", (optimizer_type,), {"step": step})
