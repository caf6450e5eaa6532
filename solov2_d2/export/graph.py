"""The exported graph: a normalized, padded image (batch 1) -> SOLOv2's detections.

``SOLOv2Network`` is the network part (backbone, heads, point NMS, the levels concatenated: the
same tensors ``SOLOv2.inference`` builds); ``SOLOv2ExportGraph`` appends the fixed-size
postprocess (candidates, masks, Matrix NMS, top MAX_PER_IMG), whose outputs have shapes that do
not depend on the image content, as an exported graph needs.
"""

from typing import Tuple

import torch
from torch import nn

from ..modeling.postprocess import cells_of_levels
from ..modeling.static_postprocess import postprocess_fixed_size

__all__ = ["SOLOv2Network", "SOLOv2ExportGraph", "OUTPUT_NAMES", "NETWORK_OUTPUT_NAMES"]

NETWORK_OUTPUT_NAMES = ("category_scores", "kernel_preds", "mask_feature")
OUTPUT_NAMES = ("scores", "labels", "soft_masks", "num_valid", "overflow")


class SOLOv2Network(nn.Module):
    """(1, 3, H, W) normalized image padded to the backbone's size divisibility ->
    category_scores (cells, classes) after point NMS, kernel_preds (cells, E), mask_feature
    (E, H / 4, W / 4): the first inputs of ``postprocess_single_image``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.ins_head = model.ins_head
        self.mask_head = model.mask_head

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(image)
        category_logits, kernel_preds = self.ins_head(features)
        mask_feature = self.mask_head(features)
        category_scores, kernels = cells_of_levels(category_logits, kernel_preds)
        return category_scores[0].t(), kernels[0].t(), mask_feature[0]


class SOLOv2ExportGraph(nn.Module):
    """(1, 3, H, W) normalized, padded image -> ``FixedSizeDetections`` as a tuple
    (``OUTPUT_NAMES``): scores, labels, soft masks at mask-feature resolution, number valid,
    overflow. The graph runs one image: the runtimes' callables loop over a batch."""

    def __init__(self, model: nn.Module, max_candidates: int):
        super().__init__()
        self.network = SOLOv2Network(model)
        self.register_buffer("cell_strides", model.cell_strides.detach().clone(), False)
        self.params = model.inference_params
        self.max_candidates = int(max_candidates)

    def forward(self, image: torch.Tensor):
        category_scores, kernel_preds, mask_feature = self.network(image)
        detections = postprocess_fixed_size(
            category_scores,
            kernel_preds,
            mask_feature,
            self.cell_strides,
            self.params,
            self.max_candidates,
        )
        return tuple(detections)
