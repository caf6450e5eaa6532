"""SOLOv2 postprocess with fixed-size tensors: the exportable form of ``postprocess_single_image``.

:func:`postprocess_single_image` filters candidates with ``nonzero``, branches on their count,
sorts with ``sort(stable=True)``, reduces in chunk loops and calls C++ kernels: none of that can
be traced into a graph (``torch.export``, ONNX). :func:`postprocess_fixed_size` computes the same
detections with tensors whose shapes depend only on the input shapes and the parameters:

1. the ``max_candidates`` (K1) highest category scores are taken with ``topk``; sub-threshold
   scores are masked to -inf so they come last, and carry a validity flag instead of being
   removed. If more than K1 (cell, class) pairs pass SCORE_THR, ``overflow`` is set: some
   candidates were dropped and the result may differ from the eager one. While it is false the
   result is the eager one (labels, masks; scores to float rounding of the runtime);
2. the K1 soft masks come from one matmul, their areas and maskness from one pass, and the area
   filter becomes a validity flag;
3. each stable descending sort of the eager code becomes a rank computed from comparisons,
   ``rank_i = #{j: s_j > s_i} + #{j: s_j == s_i, t_j < t_i}`` with ``t`` the position the eager
   sort breaks ties by, followed by ``topk`` of the (distinct) ranks: the same order as
   ``sort(stable=True)``, which has no ONNX lowering, ties included;
4. Matrix NMS is the dense formulation of ``matrix_nms_dense`` on the NMS_PRE best slots, with
   the same operations in the same order, so the valid slots' decayed scores are the eager ones
   bit for bit: invalid slots rank below every valid one, so the upper triangle already keeps
   them from decaying a valid slot, and pairs with an invalid slot are masked out as well, so
   that this does not rest on the ranking. Intersections are float32 matmul
   sums of 0/1 values: every partial sum is an integer below the mask's pixel count, exact while
   that is below 2**24 (masks at feature resolution of under 16.7M pixels);
5. the MAX_PER_IMG best survivors are gathered, zero-padded past ``num_valid``.

Run by PyTorch, every step is the eager one's operation on the same values. The soft-mask
matmul has K1 rows instead of the eager candidate count: BLAS does not promise equal rows for a
different row count, though they were equal in every case the tests and benchmarks ran. One
known exception: a maskness sum over more than 32768 pixels that the eager code reduces as a
single row (one candidate, or the last row of one of its chunks) may be split across threads by
PyTorch and differ in its last bits. Scores then differ by about 1e-7, and an order could change
only between candidates whose scores are that close. Other runtimes (ONNX Runtime) round the
matmuls and sums their own way: scores agree to about 1e-7, soft masks to about 1e-6.

Masks leave at mask-feature resolution, soft: the final upsample, crop and resize to the
requested size is per request and must be the eager model's bit for bit, so
:func:`instances_from_fixed_size` runs it with ``mask_upsample.upsample_and_threshold``, as
``postprocess_single_image`` does (and ``max_per_image`` full-size masks would be large outputs).
Only ``NMS_TYPE == "matrix"`` (gaussian and linear kernels) has a fixed-size form; the greedy mask
NMS is sequential.
"""

import math
from typing import NamedTuple, Tuple

import torch
from detectron2.structures import Instances
from torch import Tensor

from .mask_upsample import upsample_and_threshold
from .postprocess import InferenceParams, _feature_matrix, _instances, empty_instances

__all__ = [
    "FixedSizeDetections",
    "default_max_candidates",
    "postprocess_fixed_size",
    "instances_from_fixed_size",
]

# K1 = this many times NMS_PRE. The eager code keeps at most NMS_PRE candidates after the area
# filter; the area filter and the maskness re-scoring pick them from every candidate above
# SCORE_THR, so K1 must hold all of those, with room for the ones the area filter removes. Twice
# NMS_PRE bounds the K1 x (Hf * Wf) soft masks and the K1 x K1 rank comparisons while leaving as
# many slots for removed candidates as NMS_PRE itself keeps.
MAX_CANDIDATES_PER_NMS_PRE = 2


def default_max_candidates(params: InferenceParams) -> int:
    """The default K1 for ``params``: ``MAX_CANDIDATES_PER_NMS_PRE * NMS_PRE``."""
    return MAX_CANDIDATES_PER_NMS_PRE * int(params.nms_pre)


class FixedSizeDetections(NamedTuple):
    """The kept detections in output order, P = ``params.max_per_image`` slots; slots from
    ``num_valid`` on are padding (zeros)."""

    scores: Tensor  # (P,) float32
    labels: Tensor  # (P,) int64
    soft_masks: Tensor  # (P, Hf, Wf) float32: sigmoid(G * F) at mask-feature resolution
    num_valid: Tensor  # () int64
    overflow: Tensor  # () bool: more than max_candidates passed SCORE_THR; result not exact


def _check_params(params: InferenceParams, max_candidates: int) -> None:
    if params.nms_type != "matrix":
        raise ValueError(
            "the fixed-size (exportable) postprocess implements Matrix NMS only: "
            f"MODEL.SOLOV2.NMS_TYPE must be 'matrix', got {params.nms_type!r} (greedy mask NMS "
            "visits candidates one by one and has no fixed-size form)"
        )
    if params.nms_kernel not in ("gaussian", "linear"):
        raise ValueError(
            "MODEL.SOLOV2.NMS_KERNEL must be 'gaussian' or 'linear', " f"got {params.nms_kernel!r}"
        )
    if int(max_candidates) < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    if int(params.nms_pre) < 1 or int(params.max_per_image) < 1:
        raise ValueError(
            "MODEL.SOLOV2.NMS_PRE and MAX_PER_IMG must be at least 1 for the fixed-size "
            f"postprocess, got {params.nms_pre} and {params.max_per_image}"
        )


def stable_descending_order(keys: Tensor, tiebreak: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` first elements of ``keys`` in descending order, equal keys ordered by
    ascending ``tiebreak`` (distinct values): ``sort(keys, descending=True, stable=True)`` when
    ``tiebreak`` is the position, without a sort. Each element's rank is counted from pairwise
    comparisons; the ranks are distinct, so ``topk`` of them has no ties to break."""
    greater = keys[None, :] > keys[:, None]  # [i, j]: keys_j ranks above keys_i
    earlier = (keys[None, :] == keys[:, None]) & (tiebreak[None, :] < tiebreak[:, None])
    ranks = (greater | earlier).to(torch.int64).sum(dim=1)
    return torch.topk(ranks, k, largest=False).indices


def _matrix_nms_ranked(binary, areas, labels, scores, valid, params: InferenceParams) -> Tensor:
    """Matrix NMS of ``matrix_nms_dense`` on candidates already in rank order, the same
    operations in the same order; pairs involving an invalid slot (which are all ranked below
    the valid ones) are masked out, so the valid slots' scores are unchanged by the padding.

    binary: (M, Hf * Wf) 0/1 float32; areas: (M,) their pixel counts (float32)."""
    num = binary.shape[0]
    inter = binary @ binary.T
    union = areas[None, :] + areas[:, None] - inter
    # Two empty masks are the same (empty) set: IoU 1, as in matrix_nms.
    iou = torch.where(union > 0, inter / union, 1.0)
    position = torch.arange(num, device=binary.device)
    pairs = (
        (labels[:, None] == labels[None, :])
        & (valid[:, None] & valid[None, :])
        & (position[:, None] < position[None, :])  # triu(diagonal=1)
    )
    decay_iou = iou * pairs
    compensate_iou = decay_iou.max(dim=0).values[:, None]
    sigma = params.nms_sigma
    if params.nms_kernel == "gaussian":
        decay_ratio = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate_iou**2)
    else:
        decay_ratio = (1 - decay_iou) / (1 - compensate_iou)
        decay_ratio = torch.where(compensate_iou < 1, decay_ratio, math.inf)
    decay = decay_ratio.min(dim=0).values
    return scores * decay


def _pad_to(tensor: Tensor, size: int) -> Tensor:
    """Zero rows appended up to ``size`` (static sizes: no-op when already there)."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    padding = tensor.new_zeros((missing, *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def postprocess_fixed_size(
    category_scores: Tensor,
    kernel_preds: Tensor,
    mask_feature: Tensor,
    cell_strides: Tensor,
    params: InferenceParams,
    max_candidates: int,
) -> FixedSizeDetections:
    """The detections of :func:`postprocess_single_image` before the final upsample, with shapes
    fixed by the input shapes and the parameters (see the module docstring).

    Args:
        category_scores, kernel_preds, mask_feature, cell_strides: as for
            ``postprocess_single_image``.
        params: NMS_TYPE must be "matrix".
        max_candidates: K1, how many (cell, class) pairs above SCORE_THR are processed
            (``default_max_candidates(params)``); more set ``overflow``.
    """
    _check_params(params, max_candidates)
    num_cells, num_classes = category_scores.shape
    feat_h, feat_w = mask_feature.shape[1:]
    device = mask_feature.device

    # 1. Candidates: K1 best (cell, class) pairs. Their flat index cell * C + class is the
    #    position in the eager code's row-major nonzero(), hence its tie order.
    flat_scores = category_scores.reshape(-1)
    passing = flat_scores > params.score_threshold
    num_candidates = min(int(max_candidates), num_cells * num_classes)
    overflow = passing.to(torch.int64).sum() > num_candidates
    masked = torch.where(passing, flat_scores, -math.inf)
    scores, flat_index = torch.topk(masked, num_candidates)
    valid = passing[flat_index]
    cells = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index - cells * num_classes

    # 2. Soft masks, binary masks, areas, maskness; the area filter as a flag.
    soft_masks = (kernel_preds[cells] @ _feature_matrix(mask_feature)).sigmoid()
    binary = soft_masks > params.mask_threshold
    binary_values = binary.to(soft_masks.dtype)
    areas = binary_values.sum(dim=1)
    # The values F.threshold keeps in the eager code: same elements, same row sums.
    soft_sums = torch.where(binary, soft_masks, 0.0).sum(dim=1)
    valid = valid & (areas > cell_strides[cells])
    # Invalid slots can hold 0 / 0 maskness: keep NaN out of the comparisons below.
    scores = torch.where(valid, scores * (soft_sums / areas), -math.inf)

    # 3. The NMS_PRE best by the eager stable sort (ties: candidate order).
    num_nms = min(int(params.nms_pre), num_candidates)
    ranked = stable_descending_order(scores, flat_index, num_nms)
    valid, scores, labels = valid[ranked], scores[ranked], labels[ranked]

    # 4. Matrix NMS, then UPDATE_THR.
    scores = torch.where(valid, scores, 0.0)
    decayed = _matrix_nms_ranked(
        binary_values[ranked], areas[ranked], labels, scores, valid, params
    )
    survives = valid & (decayed >= params.update_threshold)

    # 5. The MAX_PER_IMG best survivors by the eager stable sort (ties: NMS rank order).
    num_out = min(int(params.max_per_image), num_nms)
    keys = torch.where(survives, decayed, -math.inf)
    final = stable_descending_order(keys, torch.arange(num_nms, device=device), num_out)
    survives = survives[final]
    out_scores = torch.where(survives, decayed[final], 0.0)
    out_labels = torch.where(survives, labels[final], 0)
    out_masks = torch.where(survives[:, None], soft_masks[ranked[final]], 0.0)
    out_masks = out_masks.reshape(num_out, feat_h, feat_w)
    size = int(params.max_per_image)
    return FixedSizeDetections(
        scores=_pad_to(out_scores, size),
        labels=_pad_to(out_labels, size),
        soft_masks=_pad_to(out_masks, size),
        num_valid=survives.to(torch.int64).sum(),
        overflow=overflow,
    )


def instances_from_fixed_size(
    detections: FixedSizeDetections,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    params: InferenceParams,
) -> Instances:
    """The first ``num_valid`` detections as ``Instances``: their soft masks go through
    ``upsample_and_threshold`` exactly as in ``postprocess_single_image``, so final masks and
    boxes are the eager model's bit for bit."""
    output_size = (int(output_size[0]), int(output_size[1]))
    num = int(detections.num_valid)
    if num == 0:
        return empty_instances(output_size, detections.soft_masks.device)
    masks, boxes = upsample_and_threshold(
        detections.soft_masks[:num].contiguous(), image_size, output_size, params.mask_threshold
    )
    return _instances(masks, detections.scores[:num], detections.labels[:num], output_size, boxes)
