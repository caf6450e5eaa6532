"""The baseline of the speed comparisons: SOLOv2 inference as the official code does it.

A re-creation, written here, of the operations of the official SOLOv2 ``get_seg_single`` (SOLO
repository, mmdet 1.x; AdelaiDet's ``inference_single_image`` does the same) in the same order, on
the outputs of our heads (which equal the official heads' for the same weights, see the README):

1. candidates: point-NMS'd category scores above SCORE_THR (``cells_of_levels``, as in the
   official ``get_seg``), their kernels and their level's stride;
2. soft masks of the candidates at 1/4 resolution: ``F.conv2d`` of the mask feature with the
   kernels as 1x1 filters, ``sigmoid``;
3. binary masks (> MASK_THR), their areas; candidates whose area is not above their stride are
   dropped;
4. maskness (mean soft value inside the binary mask) times the category score; ``argsort``
   descending, the first NMS_PRE;
5. the official Matrix NMS (dense IoU matrix from one matmul, upper triangle, same-class matrix,
   compensation by the largest IoU each candidate had with a higher-scored one); candidates with
   a decayed score below UPDATE_THR dropped; ``argsort``, the first MAX_PER_IMG;
6. the soft masks of those upsampled x4 to the padded input, cropped to the image, resized to the
   output size (``F.interpolate``, bilinear, align_corners False), thresholded at MASK_THR.

Only the final detections are upsampled, as in the official code (our former "eager" form
upsampled every candidate and was slower than the code it stood for). The official code returns no
boxes; so that both sides produce the same Detectron2 ``Instances``, the tight boxes of the final
masks come from ``masks_to_boxes``, as in ours (a cost both sides pay alike).
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from solov2_d2.modeling.mask_upsample import masks_to_boxes
from solov2_d2.modeling.postprocess import InferenceParams, empty_instances

__all__ = ["official_matrix_nms", "official_style_postprocess"]


def official_matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    kernel: str,
    sigma: float,
    areas: torch.Tensor,
) -> torch.Tensor:
    """Decayed scores of candidates sorted by descending score (paper Eq. 4-5, official form)."""
    count = labels.shape[0]
    flat = masks.reshape(count, -1).float()
    intersections = flat @ flat.t()
    areas_rows = areas.expand(count, count)
    iou = (intersections / (areas_rows + areas_rows.t() - intersections)).triu(diagonal=1)
    labels_rows = labels.expand(count, count)
    same_class = (labels_rows == labels_rows.t()).float().triu(diagonal=1)
    decay_iou = iou * same_class
    # For each candidate: its largest IoU with a higher-scored one of its class.
    compensate_iou = decay_iou.max(0).values.expand(count, count).t()
    if kernel == "gaussian":
        decay = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate_iou**2)
    elif kernel == "linear":
        decay = (1 - decay_iou) / (1 - compensate_iou)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    return scores * decay.min(0).values


def official_style_postprocess(
    category_scores: torch.Tensor,
    kernel_preds: torch.Tensor,
    mask_feature: torch.Tensor,
    cell_strides: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    params: InferenceParams,
) -> Instances:
    """Same arguments and result type as ``postprocess_single_image`` (the module docstring)."""
    output_size = (int(output_size[0]), int(output_size[1]))
    device = mask_feature.device
    over = category_scores > params.score_threshold
    scores = category_scores[over]
    if scores.numel() == 0:
        return empty_instances(output_size, device)
    cells, labels = over.nonzero().unbind(1)
    kernels = kernel_preds[cells]
    strides = cell_strides[cells]

    count, channels = kernels.shape
    soft = F.conv2d(mask_feature[None], kernels.view(count, channels, 1, 1)).squeeze(0).sigmoid()
    binary = soft > params.mask_threshold
    areas = binary.sum((1, 2)).float()
    keep = areas > strides
    if keep.sum() == 0:
        return empty_instances(output_size, device)
    soft, binary, areas = soft[keep], binary[keep], areas[keep]
    scores, labels = scores[keep], labels[keep]
    scores = scores * ((soft * binary.float()).sum((1, 2)) / areas)

    order = torch.argsort(scores, descending=True)[: params.nms_pre]
    soft, binary, areas = soft[order], binary[order], areas[order]
    scores, labels = scores[order], labels[order]
    scores = official_matrix_nms(binary, labels, scores, params.nms_kernel, params.nms_sigma, areas)
    keep = scores >= params.update_threshold
    if keep.sum() == 0:
        return empty_instances(output_size, device)
    soft, scores, labels = soft[keep], scores[keep], labels[keep]
    order = torch.argsort(scores, descending=True)[: params.max_per_image]
    soft, scores, labels = soft[order], scores[order], labels[order]

    feat_h, feat_w = soft.shape[-2:]
    height, width = image_size
    padded = F.interpolate(soft[None], size=(4 * feat_h, 4 * feat_w), mode="bilinear")
    final = F.interpolate(padded[:, :, :height, :width], size=output_size, mode="bilinear")
    masks = final.squeeze(0) > params.mask_threshold

    result = Instances(output_size)
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks))
    result.scores = scores
    result.pred_classes = labels
    return result
