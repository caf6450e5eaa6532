"""SOLOv2 inference: grid-cell candidates -> dynamic masks -> maskness -> NMS -> ``Instances``.

The order of operations follows the official implementation (and so its predictions), with two
corrections: soft masks are always upsampled by exactly the mask-feature stride (4) to the padded
input before cropping, so every image of a mixed-size batch gets its own correct masks, and
``pred_boxes`` are the tight boxes of the final masks rather than zeros.

Two implementations give the same predictions, bit for bit (``tests/test_fast_path.py``):

- :func:`postprocess_single_image`, the one the model uses, works at mask-feature resolution
  (1/4 of the input) until the end: it thresholds and counts the candidates' masks there, moves
  indices rather than masks through the filtering, sorting and NMS steps, and upsamples only the
  final detections (``mask_upsample.py``: a C++ kernel on the CPU, chunked PyTorch otherwise;
  both compute the same definition of the final masks).
- :func:`postprocess_single_image_reference` is the straightforward form: it upsamples every
  candidate's soft mask to the output size before any filtering and uses the dense Matrix NMS
  of the official code. It exists to check the fast path and to measure it against
  (``benchmarks/inference.py``).
"""

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .mask_upsample import final_mask_values, masks_to_boxes, upsample_and_threshold
from .matrix_nms import mask_nms, matrix_nms, matrix_nms_dense

# Elements of candidate masks reduced per step: bounded temporaries stay in the CPU caches and in
# memory the allocator reuses (a fresh allocation of tens of MB costs page faults, often more than
# the arithmetic that fills it).
_ELEMENTS_PER_CHUNK = 1 << 22


@dataclass
class InferenceParams:
    score_threshold: float = 0.1  # SCORE_THR
    mask_threshold: float = 0.5  # MASK_THR
    nms_pre: int = 500  # NMS_PRE
    update_threshold: float = 0.05  # UPDATE_THR
    max_per_image: int = 100  # MAX_PER_IMG
    nms_type: str = "matrix"  # NMS_TYPE: "matrix" | "mask"
    nms_kernel: str = "gaussian"  # NMS_KERNEL: "gaussian" | "linear"
    nms_sigma: float = 2.0  # NMS_SIGMA
    mask_nms_iou_threshold: float = 0.5  # MASK_NMS_IOU_THR


def point_nms(heatmap: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """Keeps grid cells that are local maxima of their 2x2 neighbourhood, zeroes the rest.

    A 2x2 max-pool with stride 1 and padding 1, cropped back to the input size, compares each cell
    with its upper/left neighbours; this is SOLO's cheap stand-in for box NMS on the category map.
    """
    pooled = F.max_pool2d(heatmap, kernel_size, stride=1, padding=1)
    return heatmap * (pooled[..., :-1, :-1] == heatmap)


def cells_of_levels(category_logits, kernel_preds) -> Tuple[torch.Tensor, torch.Tensor]:
    """The heads' per-level outputs as per-cell tensors of the batch: point-NMS'd sigmoid scores
    (N, num_classes, num_cells) and kernels (N, E, num_cells), levels concatenated coarse grid
    last, row-major within a level (the cell order of ``postprocess_single_image``)."""
    category_scores = torch.cat(
        [point_nms(level.sigmoid()).flatten(2) for level in category_logits], dim=2
    )
    kernels = torch.cat([level.flatten(2) for level in kernel_preds], dim=2)
    return category_scores, kernels


def maskness(soft_masks: torch.Tensor, binary_masks: torch.Tensor, areas: torch.Tensor):
    """Mean soft value inside each binary mask: the mask-quality factor of the final score."""
    return (soft_masks * binary_masks).sum(dim=(1, 2)) / areas


def empty_instances(output_size: Tuple[int, int], device) -> Instances:
    result = Instances(output_size)
    result.pred_masks = torch.zeros((0, *output_size), dtype=torch.bool, device=device)
    result.pred_boxes = Boxes(torch.zeros((0, 4), dtype=torch.float32, device=device))
    result.scores = torch.zeros((0,), dtype=torch.float32, device=device)
    result.pred_classes = torch.zeros((0,), dtype=torch.int64, device=device)
    return result


def _instances(masks, scores, labels, output_size, boxes=None) -> Instances:
    result = Instances(output_size)
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks) if boxes is None else boxes)
    result.scores = scores
    result.pred_classes = labels
    return result


def _feature_matrix(mask_feature: torch.Tensor) -> torch.Tensor:
    """(E, Hf, Wf) -> (E, Hf * Wf) without a copy, for NCHW and channels-last features alike."""
    if mask_feature.is_contiguous():
        return mask_feature.view(mask_feature.shape[0], -1)
    hwe = mask_feature.permute(1, 2, 0)
    if hwe.is_contiguous():  # channels-last: the transpose of a contiguous (Hf * Wf, E) matrix
        return hwe.reshape(-1, mask_feature.shape[0]).t()
    return mask_feature.reshape(mask_feature.shape[0], -1)


def _candidate_soft_masks(kernels: torch.Tensor, mask_feature: torch.Tensor) -> torch.Tensor:
    """M = sigmoid(G * F) of the candidates, as one matmul: (n, E) @ (E, Hf * Wf)."""
    return (kernels @ _feature_matrix(mask_feature)).sigmoid_()


def _areas_and_maskness(soft_masks: torch.Tensor, threshold: float):
    """Per flat (n, P) soft mask: binary mask, its area and the maskness (mean soft value inside).

    The same sums as ``maskness`` and ``binary.sum``, bit for bit (each row is reduced on its own,
    over the same values), in a few passes over chunks of rows that stay in the CPU caches:
    ``threshold`` keeps the soft values inside the mask and zeroes the rest, their sum is the
    maskness numerator, and ``ceil`` turns them into ones, whose sum is the area (exact in
    float32 below 2**24 pixels). Summing bools directly is several times slower.
    """
    binary = soft_masks > threshold
    num, pixels = soft_masks.shape
    areas = soft_masks.new_empty(num)
    soft_sums = soft_masks.new_empty(num)
    if threshold < 0:  # a zero soft value (sigmoid underflow) would be inside yet count 0
        areas.copy_(binary.sum(dim=1))
        torch.sum(torch.where(binary, soft_masks, 0.0), dim=1, out=soft_sums)
        return binary, areas, soft_sums / areas
    rows_per_chunk = max(1, _ELEMENTS_PER_CHUNK // max(pixels, 1))
    for start in range(0, num, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        inside = F.threshold(soft_masks[rows], threshold, 0.0)
        torch.sum(inside, dim=1, out=soft_sums[rows])
        torch.sum(inside.ceil_(), dim=1, out=areas[rows])
    return binary, areas, soft_sums / areas


def postprocess_single_image(
    category_scores: torch.Tensor,
    kernel_preds: torch.Tensor,
    mask_feature: torch.Tensor,
    cell_strides: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    params: InferenceParams,
) -> Instances:
    """
    Args:
        category_scores: (num_cells, num_classes) sigmoid scores after point NMS, all levels'
            cells concatenated (level by level, row-major within a level).
        kernel_preds: (num_cells, E) dynamic kernels of the same cells.
        mask_feature: (E, Hf, Wf) the image's unified mask feature (padded input / 4).
        cell_strides: (num_cells,) the instance stride of each cell's level; a mask must cover
            more pixels (at mask-feature resolution) than this to be kept.
        image_size: (h, w) of the image inside the padded input.
        output_size: (height, width) requested for the output masks.
    """
    device = mask_feature.device
    output_size = (int(output_size[0]), int(output_size[1]))
    candidates = (category_scores > params.score_threshold).nonzero()
    if candidates.shape[0] == 0:
        return empty_instances(output_size, device)
    cells, labels = candidates[:, 0], candidates[:, 1]
    scores = category_scores[cells, labels]

    # M = G * F for the candidates only, thresholded and measured at feature resolution.
    feat_h, feat_w = mask_feature.shape[1:]
    soft_masks = _candidate_soft_masks(kernel_preds[cells], mask_feature)
    binary_masks, areas, mask_quality = _areas_and_maskness(soft_masks, params.mask_threshold)

    # From here on candidates are moved around as indices into soft/binary_masks.
    kept = (areas > cell_strides[cells]).nonzero()[:, 0]
    if kept.shape[0] == 0:
        return empty_instances(output_size, device)
    scores = scores[kept] * mask_quality[kept]
    order = torch.sort(scores, descending=True, stable=True).indices[: params.nms_pre]
    kept, scores = kept[order], scores[order]
    labels = labels[kept]
    nms_masks = binary_masks[kept].view(-1, feat_h, feat_w)

    if params.nms_type == "matrix":
        scores = matrix_nms(
            nms_masks,
            labels,
            scores,
            kernel=params.nms_kernel,
            sigma=params.nms_sigma,
            mask_areas=areas[kept],
        )
        survivors = (scores >= params.update_threshold).nonzero()[:, 0]
    else:
        keep = mask_nms(
            nms_masks,
            labels,
            scores,
            iou_threshold=params.mask_nms_iou_threshold,
            mask_areas=areas[kept],
        )
        survivors = keep.nonzero()[:, 0]
    if survivors.shape[0] == 0:
        return empty_instances(output_size, device)
    scores, labels, kept = scores[survivors], labels[survivors], kept[survivors]
    order = torch.sort(scores, descending=True, stable=True).indices[: params.max_per_image]
    scores, labels, kept = scores[order], labels[order], kept[order]

    final_masks, boxes = upsample_and_threshold(
        soft_masks[kept].view(-1, feat_h, feat_w),
        image_size,
        output_size,
        params.mask_threshold,
    )
    return _instances(final_masks, scores, labels, output_size, boxes)


def upsample_and_threshold_reference(soft_masks, image_size, output_size, params) -> torch.Tensor:
    """All masks at once through the PyTorch form of the final-mask definition
    (``mask_upsample.py``), with no chunks and no C++ kernel."""
    values = final_mask_values(soft_masks, image_size, output_size)
    return values > torch.tensor(params.mask_threshold, dtype=torch.float32)


def postprocess_single_image_reference(
    category_scores: torch.Tensor,
    kernel_preds: torch.Tensor,
    mask_feature: torch.Tensor,
    cell_strides: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    params: InferenceParams,
) -> Instances:
    """The straightforward form of :func:`postprocess_single_image`, same arguments and result.

    Every candidate's soft mask is upsampled to the output size (x4, crop, resize, all at once
    with the PyTorch ops of ``mask_upsample.final_mask_values``) and thresholded before the
    candidates are filtered; the filtering itself (area, maskness, NMS)
    runs at feature resolution on full copies of the masks, with the dense Matrix NMS of the
    official code (``matrix_nms_dense``). Memory grows as candidates x output pixels (about
    1.2 GB per 300 candidates at 800 x 1216): a reference, not for production.
    """
    device = mask_feature.device
    output_size = (int(output_size[0]), int(output_size[1]))
    candidates = (category_scores > params.score_threshold).nonzero()
    if candidates.shape[0] == 0:
        return empty_instances(output_size, device)
    cells, labels = candidates[:, 0], candidates[:, 1]
    scores = category_scores[cells, labels]

    num_masks, feat_h, feat_w = mask_feature.shape
    soft_masks = (kernel_preds[cells] @ mask_feature.reshape(num_masks, -1)).sigmoid()
    soft_masks = soft_masks.view(-1, feat_h, feat_w)

    # Full-resolution masks of every candidate: x4 to the padded input, crop, resize.
    full_masks = upsample_and_threshold_reference(soft_masks, image_size, output_size, params)

    binary_masks = soft_masks > params.mask_threshold
    areas = binary_masks.sum(dim=(1, 2)).float()
    scores = scores * maskness(soft_masks, binary_masks, areas)

    keep = areas > cell_strides[cells]
    if not bool(keep.any()):
        return empty_instances(output_size, device)
    binary_masks, full_masks, areas = binary_masks[keep], full_masks[keep], areas[keep]
    scores, labels = scores[keep], labels[keep]

    order = torch.sort(scores, descending=True, stable=True).indices[: params.nms_pre]
    binary_masks, full_masks, areas = binary_masks[order], full_masks[order], areas[order]
    scores, labels = scores[order], labels[order]

    if params.nms_type == "matrix":
        scores = matrix_nms_dense(
            binary_masks,
            labels,
            scores,
            kernel=params.nms_kernel,
            sigma=params.nms_sigma,
            mask_areas=areas,
        )
        keep = scores >= params.update_threshold
    else:
        keep = mask_nms(
            binary_masks,
            labels,
            scores,
            iou_threshold=params.mask_nms_iou_threshold,
            mask_areas=areas,
        )
    if not bool(keep.any()):
        return empty_instances(output_size, device)
    full_masks, scores, labels = full_masks[keep], scores[keep], labels[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[: params.max_per_image]
    return _instances(full_masks[order], scores[order], labels[order], output_size)
