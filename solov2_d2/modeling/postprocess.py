"""SOLOv2 inference: grid-cell candidates -> dynamic masks -> maskness -> NMS -> ``Instances``.

The order of operations follows the official implementation (and so its predictions), with two
corrections: soft masks are always upsampled by exactly the mask-feature stride (4) to the padded
input before cropping, so every image of a mixed-size batch gets its own correct masks, and
``pred_boxes`` are the tight boxes of the final masks rather than zeros.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .matrix_nms import mask_nms, matrix_nms

MASK_FEATURE_STRIDE = 4


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


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x1, y1, x2, y2) boxes of (N, H, W) bool masks, in Detectron2's pixel convention
    (x2 = last column + 1); an empty mask gives a zero box."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    h, w = masks.shape[1:]
    # argmax finds the first True; on the flipped vector it finds the last one.
    y1 = rows.float().argmax(dim=1)
    y2 = h - rows.flip(1).float().argmax(dim=1)
    x1 = cols.float().argmax(dim=1)
    x2 = w - cols.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


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
    candidates = (category_scores > params.score_threshold).nonzero()
    if candidates.shape[0] == 0:
        return empty_instances(output_size, device)
    cells, labels = candidates[:, 0], candidates[:, 1]
    scores = category_scores[cells, labels]

    # M = G * F for the candidates only: one matmul of their 1x1 kernels with F.
    num_masks, feat_h, feat_w = mask_feature.shape
    soft_masks = (kernel_preds[cells] @ mask_feature.reshape(num_masks, -1)).sigmoid()
    soft_masks = soft_masks.view(-1, feat_h, feat_w)
    binary_masks = soft_masks > params.mask_threshold
    areas = binary_masks.sum(dim=(1, 2)).float()

    keep = areas > cell_strides[cells]
    if not bool(keep.any()):
        return empty_instances(output_size, device)
    soft_masks, binary_masks, areas = soft_masks[keep], binary_masks[keep], areas[keep]
    scores, labels = scores[keep], labels[keep]

    scores = scores * maskness(soft_masks, binary_masks, areas)
    order = torch.sort(scores, descending=True, stable=True).indices[: params.nms_pre]
    soft_masks, binary_masks, areas = soft_masks[order], binary_masks[order], areas[order]
    scores, labels = scores[order], labels[order]

    if params.nms_type == "matrix":
        scores = matrix_nms(
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
    soft_masks, scores, labels = soft_masks[keep], scores[keep], labels[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[: params.max_per_image]
    soft_masks, scores, labels = soft_masks[order], scores[order], labels[order]

    # Back to the padded input (x4), crop the image, then resize to the requested size.
    h, w = image_size
    soft_masks = F.interpolate(
        soft_masks.unsqueeze(0),
        size=(feat_h * MASK_FEATURE_STRIDE, feat_w * MASK_FEATURE_STRIDE),
        mode="bilinear",
        align_corners=False,
    )[:, :, :h, :w]
    soft_masks = F.interpolate(soft_masks, size=output_size, mode="bilinear", align_corners=False)
    final_masks = soft_masks.squeeze(0) > params.mask_threshold

    result = Instances(output_size)
    result.pred_masks = final_masks
    result.pred_boxes = Boxes(masks_to_boxes(final_masks))
    result.scores = scores
    result.pred_classes = labels
    return result
