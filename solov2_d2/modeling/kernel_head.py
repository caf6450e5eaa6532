"""The SOLOv2 kernel head: category branch and dynamic-kernel branch over S x S grids (Sec. 3.2).

For every FPN level the feature map is resized to the level's S x S grid. Cell (i, j) of the
category branch scores the object classes whose center falls in it; the same cell of the kernel
branch predicts the weights G of a 1x1 convolution that, applied to the unified mask feature F,
gives that object's mask (M = G * F). The kernel branch sees normalized coordinates (CoordConv)
so that kernels can be position-sensitive.

Module and parameter names (``cate_tower``, ``kernel_tower``, ``cate_pred``, ``kernel_pred``) match
the official/AdelaiDet implementation so its checkpoints load unchanged.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .layers import append_coordinates, conv_norm_relu, init_conv_weights


def instance_level_features(features: List[torch.Tensor]) -> List[torch.Tensor]:
    """FPN p2..p6 -> the kernel head's inputs at effective strides 8, 8, 16, 32, 32.

    p2 is halved (bilinear) and p6 is resized to p5's size; the finest and coarsest grids
    otherwise sit on maps that are needlessly large or small for them.
    """
    if len(features) != 5:
        # Custom level lists (e.g. fewer levels) are used as they are.
        return list(features)
    p2, p3, p4, p5, p6 = features
    return [
        F.interpolate(p2, scale_factor=0.5, mode="bilinear", align_corners=False),
        p3,
        p4,
        p5,
        F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False),
    ]


def _conv_tower(in_channels: int, channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for i in range(num_convs):
        layers += conv_norm_relu(in_channels if i == 0 else channels, channels, 3, norm)
    return nn.Sequential(*layers)


class SOLOv2KernelHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_convs: int,
        num_grids: List[int],
        num_classes: int,
        num_kernels: int,
        norm: str = "GN",
        use_coord_conv: bool = True,
        prior_prob: float = 0.01,
    ):
        """
        Args:
            in_channels: channels of the FPN features.
            channels: channels inside both towers.
            num_convs: 3x3 conv (+ GN + ReLU) blocks per tower; the towers are shared by levels.
            num_grids: S of each level.
            num_classes: outputs of the category branch (sigmoid per class, no background).
            num_kernels: length of each dynamic kernel (E for 1x1 kernels over E mask channels).
            norm: "GN" or "" (no normalization, convs get biases).
            use_coord_conv: append normalized coordinates to the kernel branch input.
            prior_prob: initial foreground probability of the category branch (focal loss init).
        """
        super().__init__()
        if norm not in ("GN", ""):
            raise ValueError("MODEL.SOLOV2.NORM must be 'GN' or 'none', got {!r}".format(norm))
        self.num_grids = list(num_grids)
        self.use_coord_conv = use_coord_conv
        kernel_in = in_channels + 2 if use_coord_conv else in_channels
        self.cate_tower = _conv_tower(in_channels, channels, num_convs, norm)
        self.kernel_tower = _conv_tower(kernel_in, channels, num_convs, norm)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(channels, num_kernels, 3, padding=1)

        init_conv_weights(self)
        # Focal loss init (RetinaNet Sec. 3.3): start every class at probability prior_prob.
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg):
        sol = cfg.MODEL.SOLOV2
        return {
            "in_channels": sol.INSTANCE_IN_CHANNELS,
            "channels": sol.INSTANCE_CHANNELS,
            "num_convs": sol.NUM_INSTANCE_CONVS,
            "num_grids": list(sol.NUM_GRIDS),
            "num_classes": sol.NUM_CLASSES,
            "num_kernels": sol.NUM_KERNELS,
            "norm": "" if sol.NORM.lower() == "none" else sol.NORM,
            "use_coord_conv": sol.USE_COORD_CONV,
            "prior_prob": sol.PRIOR_PROB,
        }

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: one (N, C, H, W) map per instance level (see ``instance_level_features``).

        Returns:
            category_logits: per level (N, num_classes, S, S).
            kernel_preds: per level (N, num_kernels, S, S).
        """
        if len(features) != len(self.num_grids):
            raise ValueError(
                "the kernel head got {} feature levels but NUM_GRIDS has {} entries".format(
                    len(features), len(self.num_grids)
                )
            )
        category_logits, kernel_preds = [], []
        for feature, num_grid in zip(features, self.num_grids):
            if self.use_coord_conv:
                feature = append_coordinates(feature)
            # One resize for both branches: the category branch drops the coordinate channels.
            grid_feature = F.interpolate(
                feature, size=(num_grid, num_grid), mode="bilinear", align_corners=False
            )
            category_feature = grid_feature[:, :-2] if self.use_coord_conv else grid_feature
            kernel_preds.append(self.kernel_pred(self.kernel_tower(grid_feature)))
            category_logits.append(self.cate_pred(self.cate_tower(category_feature)))
        return category_logits, kernel_preds
