"""Matrix NMS (SOLOv2 paper, Sec. 4) and greedy class-aware mask NMS.

Matrix NMS decays every candidate's score in one pass instead of removing candidates one by one.
For candidates ranked by descending score, candidate ``j`` is decayed by (paper Eq. 4-5)

    decay_j = min_i f(iou_ij) / f(iou_{.,i}),    iou_{.,i} = max_{k ranked above i} iou_ki

where ``iou_ij`` is the mask IoU of a higher-ranked same-class candidate ``i`` with ``j`` (0 for
every other pair) and ``f`` is the linear kernel ``1 - iou`` or the gaussian kernel
``exp(-sigma * iou^2)``. The denominator "compensates" for ``i`` itself being suppressed: a
mask that overlaps an already-suppressed mask is decayed less.

Two implementations give the same scores (bitwise, up to the float32 exactness limit below):

- :func:`matrix_nms_dense` is the formulation of the official SOLOv2 code: one ``(N, HW) @ (HW, N)``
  float matmul gives every pairwise intersection. It is the reference for tests and benchmarks.
- :func:`matrix_nms` computes only what can be non-zero. Pairs of different classes are never
  used, so candidates are grouped by label. On the CPU, the C++ kernel of
  ``csrc/mask_intersections.cpp`` packs each mask into bits and counts each same-class pair's
  common pixels with AND + popcount over the rows both occupy. Without it, pixels outside a
  mask's bounding box are zero, so each class group is cut into rectangular blocks (a k-d split
  of the image guided by a cost model) and only the candidates whose box reaches a block take
  part in that block's matmul. Intersections are integers and their float32 sums are exact, so
  either way the result is the same as the dense matmul's, not an approximation of it.

Both need intersections below 2**24 to be exact in float32, i.e. masks of fewer than 16.7M
pixels (4096 x 4096).
"""

import logging
import math
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import native

__all__ = ["matrix_nms", "matrix_nms_dense", "mask_nms"]

logger = logging.getLogger(__name__)

_KERNELS = ("gaussian", "linear")

# Cost model of one block in the fast intersection path, in microseconds on a 2-core x86 CPU
# (fitted to torch's CPU BLAS and indexing). It only steers where blocks are split, never the
# result; within a factor of 2 of these values the total time changes by less than ~20%.
_BLOCK_OVERHEAD_US = 20.0  # Python and dispatch cost of one block's copy and matmul calls
_GATHER_US_PER_PIXEL = 5e-4  # copying one mask pixel of a block into the float matrix
_MATMUL_US_PER_FLOP = 1.3e-5  # float32 GEMM throughput, about 75 GFLOP/s counting 2 per product
_MATMUL_MIN_ROWS = 16  # small GEMMs run far below peak: count them as if 16 rows wider
# Blocks estimated cheaper than this are not worth another split (each adds an overhead).
_MIN_SPLIT_COST_US = 3 * _BLOCK_OVERHEAD_US

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

    Same result as :func:`matrix_nms_dense`, computed with class-wise, box-restricted matmuls
    (see the module docstring). Masks that are not on the CPU go through the dense path: one large
    matmul is what GPUs do best, and the block path was written and measured for CPUs only.

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
    """Same-class pairwise intersections, exact, computed block by block.

    Returns an (N, N) float32 matrix whose same-class entries equal the dense matmul's (cross-class
    entries are 0; the IoU step never uses them) and, if ``need_areas``, the mask areas (its
    diagonal). Every block contributes integer counts, so the float32 sums are exact.
    """
    if masks.device.type != "cpu":
        return _dense_intersections(masks, labels, need_areas)
    kernel = _intersection_kernel() if masks.dtype == torch.bool else None
    if kernel is not None:
        inter = kernel.same_class_intersections(masks.contiguous(), labels)
        return inter, (inter.diagonal().clone() if need_areas else None)
    return _block_intersections(masks, labels, need_areas)


_kernel_state = {"checked": False, "module": None}


def _intersection_kernel():
    """The C++ popcount kernel once it has matched the dense matmul on a check case, else None."""
    if not _kernel_state["checked"]:
        _kernel_state["checked"] = True
        module = native.load()
        if module is not None:
            generator = torch.Generator().manual_seed(0)
            masks = torch.rand(40, 23, 131, generator=generator) > 0.6
            masks[3] = False  # an empty mask
            masks[5, :, :70] = False  # one that occupies part of the rows only
            labels = torch.randint(0, 3, (40,), generator=generator)
            dense, _ = _dense_intersections(masks, labels, False)
            same = labels[:, None] == labels[None, :]
            got = module.same_class_intersections(masks, labels)
            if torch.equal(got, dense * same):
                _kernel_state["module"] = module
            else:  # as mask_upsample does: say so, then use the block matmuls
                logger.warning(
                    "solov2_d2: C++ intersection kernel rejected (its counts differ from the "
                    "dense matmul's on the check case); Matrix NMS uses block matmuls"
                )
    return _kernel_state["module"]


def _block_intersections(masks, labels, need_areas):
    """_same_class_intersections without the C++ kernel: box-restricted float matmuls."""
    num = masks.shape[0]
    # A max-reduction is the cheapest full pass over the masks (a sum or a float conversion
    # costs 10-20x more), and it is the only one: blocks read only the pixels inside boxes.
    values = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    boxes = np.concatenate(
        [_occupied_span(values.amax(dim=2) != 0), _occupied_span(values.amax(dim=1) != 0)], axis=1
    )
    plan = _plan_blocks(boxes, labels.cpu().numpy(), keep_singletons=need_areas)

    inter = torch.zeros(num * num, dtype=torch.float32)
    if len(plan.sizes):
        pixels = plan.sizes * _box_areas(plan.regions)
        # Reused buffers: a fresh allocation per block costs page faults, often more than the
        # block's matmul.
        gathered_buffer = torch.empty(int(pixels.max()), dtype=values.dtype)
        float_buffer = torch.empty(int(pixels.max()), dtype=torch.float32)
        products = torch.empty(int((plan.sizes**2).sum()), dtype=torch.float32)
        members = torch.from_numpy(plan.members)
        member_start = product_start = 0
        for size, (y0, y1, x0, x1), num_pixels in zip(
            plan.sizes.tolist(), plan.regions.tolist(), pixels.tolist()
        ):
            gathered = gathered_buffer[:num_pixels].view(size, y1 - y0, x1 - x0)
            torch.index_select(
                values[:, y0:y1, x0:x1],
                0,
                members[member_start : member_start + size],
                out=gathered,
            )
            block = gathered.view(size, -1)
            if block.dtype != torch.float32:
                block = float_buffer[:num_pixels].view(size, -1).copy_(block)
            product = products[product_start : product_start + size * size].view(size, size)
            torch.mm(block, block.T, out=product)
            member_start += size
            product_start += size * size
        inter.index_add_(0, torch.from_numpy(_block_pair_positions(plan, num)), products)
    inter = inter.view(num, num)
    return inter, (inter.diagonal().clone() if need_areas else None)


def _occupied_span(occupied: Tensor) -> np.ndarray:
    """(N, L) bool -> (N, 2) int64 [first, last + 1) of the True entries; [0, 0) if none."""
    length = occupied.shape[1]
    positions = torch.arange(length)
    first = torch.where(occupied, positions, length).amin(dim=1)
    end = torch.where(occupied, positions + 1, 0).amax(dim=1)
    first = torch.minimum(first, end)  # empty rows: [0, 0)
    return torch.stack([first, end], dim=1).numpy()


class _BlockPlan(NamedTuple):
    """Blocks of masks: block ``b`` multiplies its ``sizes[b]`` masks (consecutive entries of
    ``members``) over the pixels of ``regions[b]`` = [y0, y1, x0, x1)."""

    members: np.ndarray
    sizes: np.ndarray
    regions: np.ndarray


def _block_cost_us(num_masks: np.ndarray, area: np.ndarray) -> np.ndarray:
    gather = _GATHER_US_PER_PIXEL * num_masks * area
    matmul = _MATMUL_US_PER_FLOP * 2.0 * (num_masks + _MATMUL_MIN_ROWS) * num_masks * area
    return np.where(num_masks > 0, _BLOCK_OVERHEAD_US + gather + matmul, 0.0)


def _box_areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 1] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 2], 0)


def _segment_union(boxes: np.ndarray, selected: np.ndarray, segment_starts: np.ndarray):
    """Union box of the ``selected`` boxes of each segment (an empty box where none is)."""
    far = np.iinfo(np.int64).max // 4
    return np.stack(
        [
            np.minimum.reduceat(np.where(selected, boxes[:, 0], far), segment_starts),
            np.maximum.reduceat(np.where(selected, boxes[:, 1], -far), segment_starts),
            np.minimum.reduceat(np.where(selected, boxes[:, 2], far), segment_starts),
            np.maximum.reduceat(np.where(selected, boxes[:, 3], -far), segment_starts),
        ],
        axis=1,
    )


def _plan_blocks(boxes: np.ndarray, labels: np.ndarray, keep_singletons: bool) -> _BlockPlan:
    """Cuts each class group into rectangular blocks whose matmuls cover all its intersections.

    ``boxes`` is (N, 4) int [y0, y1, x0, x1) per mask. The pixels of a mask lie in the union of
    the blocks it is a member of, and those blocks are disjoint, so summing the blocks'
    ``members x members`` products gives every same-class intersection exactly once. Each class
    group starts as one block; a block is halved (along y or x, whichever the cost model prefers)
    while that is estimated to be cheaper, and a mask joins every half its box reaches, with its
    box clipped to that half. All blocks of one round are decided together with array ops.
    """
    non_empty = np.flatnonzero((boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2]))
    block = np.unique(labels[non_empty], return_inverse=True)[1].reshape(-1)
    by_block = np.argsort(block, kind="stable")
    # One row per (block, member) pair, sorted by block: the member's mask and clipped box.
    block, mask_ids, member_boxes = block[by_block], non_empty[by_block], boxes[non_empty[by_block]]
    no_ints = np.zeros(0, dtype=np.int64)
    done_members, done_sizes, done_regions = [no_ints], [no_ints], [no_ints.reshape(0, 4)]
    while len(block):
        sizes = np.bincount(block)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        everyone = np.ones(len(block), dtype=bool)
        regions = _segment_union(member_boxes, everyone, starts)
        best_cost = _block_cost_us(sizes, _box_areas(regions))
        best_axis = np.full(len(sizes), -1)
        may_split = (sizes > 1) & (best_cost > _MIN_SPLIT_COST_US)
        for axis in (0, 2):  # 0: halve the rows (y), 2: halve the columns (x)
            middle = (regions[:, axis] + regions[:, axis + 1]) // 2
            split_cost = 0.0
            for reaches, clip_column, clip in _halves(member_boxes, middle[block], axis):
                half_regions = _segment_union(member_boxes, reaches, starts)
                half_regions[:, clip_column] = clip(half_regions[:, clip_column], middle)
                half_sizes = np.add.reduceat(reaches.astype(np.int64), starts)
                split_cost = split_cost + _block_cost_us(half_sizes, _box_areas(half_regions))
            thick = regions[:, axis + 1] - regions[:, axis] >= 2
            better = may_split & thick & (split_cost < best_cost)
            best_cost[better], best_axis[better] = split_cost[better], axis

        final = best_axis < 0
        emitted = final & ((sizes > 1) | keep_singletons)
        done_members.append(mask_ids[emitted[block]])
        done_sizes.append(sizes[emitted])
        done_regions.append(regions[emitted])

        child_block, child_ids, child_boxes = [], [], []
        for axis in (0, 2):
            splits_here = best_axis[block] == axis
            middle = (regions[:, axis] + regions[:, axis + 1]) // 2
            halves = _halves(member_boxes, middle[block], axis)
            for half, (reaches, clip_column, clip) in enumerate(halves):
                rows = splits_here & reaches
                clipped = member_boxes[rows]
                clipped[:, clip_column] = clip(clipped[:, clip_column], middle[block[rows]])
                child_block.append(2 * block[rows] + half)
                child_ids.append(mask_ids[rows])
                child_boxes.append(clipped)
        block = np.unique(np.concatenate(child_block), return_inverse=True)[1].reshape(-1)
        by_block = np.argsort(block, kind="stable")
        block = block[by_block]
        mask_ids = np.concatenate(child_ids)[by_block]
        member_boxes = np.concatenate(child_boxes)[by_block]
    return _BlockPlan(
        np.concatenate(done_members),
        np.concatenate(done_sizes),
        np.concatenate(done_regions),
    )


def _halves(member_boxes: np.ndarray, member_middle: np.ndarray, axis: int):
    """For halving each member's block at ``member_middle`` along ``axis``: per half, which
    members reach it, the box column to clip and how (the first half ends at the middle, the
    second starts there)."""
    return (
        (member_boxes[:, axis] < member_middle, axis + 1, np.minimum),
        (member_boxes[:, axis + 1] > member_middle, axis, np.maximum),
    )


def _block_pair_positions(plan: _BlockPlan, num: int) -> np.ndarray:
    """Flat (row * num + col) positions in the (num, num) matrix of every block's products, in
    the order the blocks' row-major (size, size) products are laid out."""
    pair_counts = plan.sizes**2
    block_of_pair = np.repeat(np.arange(len(plan.sizes)), pair_counts)
    first_pair = np.repeat(np.cumsum(pair_counts) - pair_counts, pair_counts)
    within = np.arange(len(block_of_pair)) - first_pair
    size = plan.sizes[block_of_pair]
    first_member = (np.cumsum(plan.sizes) - plan.sizes)[block_of_pair]
    rows = plan.members[first_member + within // size]
    cols = plan.members[first_member + within % size]
    return rows * num + cols
