"""Matrix NMS (SOLOv2 paper, Sec. 4) and greedy class-aware mask NMS.

Matrix NMS decays every candidate's score in one pass instead of removing candidates one by one.
For candidates ranked by descending score, candidate ``j`` is decayed by (paper Eq. 4-5)

    decay_j = min_i f(iou_ij) / f(iou_{.,i}),    iou_{.,i} = max_{k ranked above i} iou_ki

where ``iou_ij`` is the mask IoU of a higher-ranked same-class candidate ``i`` with ``j`` (0 for
every other pair) and ``f`` is the linear kernel ``1 - iou`` or the gaussian kernel
``exp(-sigma * iou^2)``. The denominator "compensates" for ``i`` itself being suppressed: a
mask that overlaps an already-suppressed mask is decayed less.

Two implementations give the same scores, bit for bit:

- :func:`matrix_nms_dense` is the formulation of the official SOLOv2 code: one ``(N, HW) @ (HW, N)``
  float matmul gives every pairwise intersection. It is the reference for tests and benchmarks,
  and the path on accelerators, where one large matmul is what they do best.
- :func:`matrix_nms` on the CPU counts only what can be non-zero: pairs of different classes are
  never used, so the C++ kernel of ``csrc/mask_intersections.cpp`` packs each mask into bits and
  counts each same-class pair's common pixels with AND + popcount over the rows both occupy.
  Intersections are integers and their float32 values are exact, so the result is the dense
  matmul's, not an approximation of it. Without the kernel it takes the dense path.

Both need intersections below 2**24 to be exact in float32, i.e. masks of fewer than 16.7M
pixels (4096 x 4096).
"""

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import native

__all__ = ["matrix_nms", "matrix_nms_dense", "mask_nms", "native_status"]

_KERNELS = ("gaussian", "linear")

IntersectionFn = Callable[[Tensor, Tensor, bool], Tuple[Tensor, Optional[Tensor]]]


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    mask_areas: Optional[Tensor] = None,
) -> Tensor:
    """Matrix NMS (paper Sec. 4, Eq. 4-5): decays the scores of overlapping same-class masks.

    Same result as :func:`matrix_nms_dense`, with the same-class intersections counted by the
    C++ kernel on the CPU (see the module docstring) and the dense matmul elsewhere.

    Args:
        masks: (N, H, W) binary masks: bool, or 0/1 values of any dtype.
        labels: (N,) class index of each mask.
        scores: (N,) score of each mask; any order. Candidates are ranked by a stable descending
            sort, so equal scores keep their input order.
        kernel: "gaussian", f(iou) = exp(-sigma * iou^2), or "linear", f(iou) = 1 - iou.
        sigma: gaussian kernel width (unused by the linear kernel).
        mask_areas: optional (N,) precomputed mask areas (pixel counts).

    Returns:
        (N,) decayed scores in the input order: ``scores * decay`` with ``decay`` in (0, 1].

    With the linear kernel, a candidate ``i`` that duplicates a higher-ranked one exactly
    (compensation ``iou_{.,i} == 1``) makes Eq. 4 divide by zero; its terms are taken as +inf,
    i.e. ``i`` decays nobody, while the candidates it overlaps are still decayed directly by the
    higher duplicate. A pair of empty masks has IoU 1 (the official code gives NaN).
    """
    return _matrix_nms(masks, labels, scores, kernel, sigma, mask_areas, _same_class_intersections)


def matrix_nms_dense(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    mask_areas: Optional[Tensor] = None,
) -> Tensor:
    """Matrix NMS (paper Sec. 4, Eq. 4-5) as the official SOLOv2 code computes it.

    All pairwise intersections come from one ``(N, HW) @ (HW, N)`` float32 matmul. Kept as the
    reference that :func:`matrix_nms` must reproduce; arguments and result are the same.
    """
    return _matrix_nms(masks, labels, scores, kernel, sigma, mask_areas, _dense_intersections)


def mask_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.5,
    mask_areas: Optional[Tensor] = None,
) -> Tensor:
    """Greedy class-aware mask NMS, the baseline Matrix NMS replaces (paper Sec. 4, Table 7).

    Candidates are visited by descending score (stable sort); a candidate is dropped if its mask
    IoU with an already kept, higher-ranked mask of the same class is above ``iou_threshold``.
    Two empty masks count as overlapping (IoU 1).

    Args:
        masks, labels, scores, mask_areas: as for :func:`matrix_nms`.
        iou_threshold: IoU above which the lower-ranked mask is dropped.

    Returns:
        (N,) bool tensor, True for the kept candidates, in the input order.
    """
    _check_inputs(masks, labels, scores, mask_areas)
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    order, iou = _ranked_same_class_iou(
        masks, labels, scores, mask_areas, _same_class_intersections
    )
    # Row i marks the lower-ranked candidates that i suppresses if i itself is kept. Only this
    # visit of the rows is sequential; every row is one vectorized update.
    suppresses = (iou > iou_threshold).cpu().numpy()
    removed = np.zeros(len(suppresses), dtype=bool)
    for rank in np.flatnonzero(suppresses.any(axis=1)):
        if not removed[rank]:
            removed |= suppresses[rank]
    keep_ranked = torch.from_numpy(~removed).to(scores.device)
    keep = torch.empty_like(keep_ranked)
    keep[order] = keep_ranked
    return keep


def _matrix_nms(masks, labels, scores, kernel, sigma, mask_areas, intersect: IntersectionFn):
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    _check_inputs(masks, labels, scores, mask_areas)
    out_dtype = torch.promote_types(scores.dtype, torch.float32)
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=out_dtype, device=scores.device)

    order, decay_iou = _ranked_same_class_iou(masks, labels, scores, mask_areas, intersect)
    # iou_{.,i} of Eq. 4: the largest IoU of candidate i with any higher-ranked same-class
    # candidate (column max of the upper-triangular matrix; 0 for none). Indexed by row i below.
    compensate_iou = decay_iou.max(dim=0).values[:, None]
    if kernel == "gaussian":
        # Eq. 4 with f(iou) = exp(-sigma * iou^2).
        decay_ratio = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate_iou**2)
    else:
        # Eq. 4 with f(iou) = 1 - iou. A row with iou_{.,i} == 1 (i duplicates a higher mask)
        # divides by zero; x/0 already gives +inf, and 0/0 is set to +inf too: no decay from i.
        decay_ratio = (1 - decay_iou) / (1 - compensate_iou)
        decay_ratio = torch.where(compensate_iou < 1, decay_ratio, math.inf)
    # Eq. 5: decay_j = min over i. Rows i >= j hold f(0) / f(iou_{.,i}) >= 1 and row 0 holds
    # f(iou_0j) <= 1, so the minimum is always in (0, 1].
    decay = decay_ratio.min(dim=0).values
    decayed_ranked = scores[order] * decay
    decayed = torch.empty_like(decayed_ranked)
    decayed[order] = decayed_ranked
    return decayed


def _check_inputs(masks, labels, scores, mask_areas):
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    num = masks.shape[0]
    for name, tensor in (("labels", labels), ("scores", scores), ("mask_areas", mask_areas)):
        if tensor is not None and tuple(tensor.shape) != (num,):
            raise ValueError(
                f"{name} must have shape ({num},) to match masks {tuple(masks.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def _ranked_same_class_iou(masks, labels, scores, mask_areas, intersect: IntersectionFn):
    """Ranks candidates by a stable descending score sort and returns ``(order, iou)``.

    ``iou[a, b]`` (float32, ranked order) is the mask IoU of the candidates ranked ``a`` and ``b``
    when ``a < b`` and they share a label, else 0: the ``iou_ij`` of paper Eq. 4.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    inter, diagonal_areas = intersect(masks, labels, mask_areas is None)
    areas = diagonal_areas if mask_areas is None else mask_areas.to(torch.float32)
    inter = inter[order][:, order]
    areas = areas[order]
    ranked_labels = labels[order]
    union = areas[None, :] + areas[:, None] - inter
    # Two empty masks are the same (empty) set: IoU 1 rather than the dense formula's 0/0.
    iou = torch.where(union > 0, inter / union, 1.0)
    same_class = ranked_labels[:, None] == ranked_labels[None, :]
    return order, (iou * same_class).triu(diagonal=1)


def _dense_intersections(masks, labels, need_areas):
    """All pairwise intersections with one float32 matmul, as in the official code."""
    flat = masks.reshape(masks.shape[0], -1).to(torch.float32)
    inter = flat @ flat.T
    return inter, (flat.sum(dim=1) if need_areas else None)


def _same_class_intersections(masks, labels, need_areas):
    """Same-class pairwise intersections, exact.

    Returns an (N, N) float32 matrix whose same-class entries equal the dense matmul's (the IoU
    step never uses the cross-class ones, which the kernel leaves at 0) and, if ``need_areas``,
    the mask areas (its diagonal).
    """
    kernel = None
    if masks.device.type == "cpu" and masks.dtype == torch.bool:
        kernel = native.checked(_KERNEL_NAME, _intersection_self_check)
    if kernel is None:
        return _dense_intersections(masks, labels, need_areas)
    inter = kernel.same_class_intersections(masks.contiguous(), labels)
    return inter, (inter.diagonal().clone() if need_areas else None)


_KERNEL_NAME = "Matrix NMS intersections"


def native_status() -> str:
    """Which intersections the CPU path uses and why (runs the self-check if not yet run)."""
    native.checked(_KERNEL_NAME, _intersection_self_check)
    return native.checked_status(_KERNEL_NAME)


def _intersection_check_cases():
    """The cases the C++ kernel must count exactly before it is used, the same cases the tests
    check it on: widths around the 8-pixel packing step and the 64-bit word, empty masks, masks
    that occupy some rows only, densities from empty to full, one class and several."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for num, height, width, num_classes in [
        (1, 1, 1, 1),
        (7, 5, 7, 1),
        (30, 9, 64, 2),
        (50, 17, 65, 3),
        (80, 40, 131, 5),
    ]:
        density = torch.rand(num, 1, 1, generator=generator)
        masks = torch.rand(num, height, width, generator=generator) < density
        masks[::4] = False
        masks[1::4, : height // 2] = False
        labels = torch.randint(0, num_classes, (num,), generator=generator)
        cases.append((masks, labels))
    return cases


def _intersection_self_check(module) -> Optional[str]:
    for masks, labels in _intersection_check_cases():
        dense, _ = _dense_intersections(masks, labels, False)
        same_class = labels[:, None] == labels[None, :]
        if not torch.equal(module.same_class_intersections(masks, labels), dense * same_class):
            return f"its counts differ from the dense matmul's on a {tuple(masks.shape)} case"
    return None
