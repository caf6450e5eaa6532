"""The SOLOv2 unified mask-feature head: F at 1/4 scale from FPN p2..p5 (paper Sec. 3.2.2).

Level i (p2 + i) goes through i rounds of 3x3 conv + GN + ReLU + 2x bilinear upsampling (p2 gets a
single conv), the results are summed at 1/4 scale and a 1x1 conv + GN + ReLU gives the E-channel
mask feature. Normalized coordinates are appended to the coarsest level (p5, 1/32) before its
first conv, which gives the position information the dynamic kernels rely on.

Module names (``convs_all_levels.<level>.conv<j>``, ``conv_pred``) match the official/AdelaiDet
implementation so its checkpoints load unchanged.
"""

from typing import List

import torch
from detectron2.config import configurable
from torch import nn

from .layers import append_coordinates, conv_norm_relu, init_conv_weights


def _conv_norm_relu(in_channels, out_channels, kernel_size, norm):
    return nn.Sequential(*conv_norm_relu(in_channels, out_channels, kernel_size, norm))


class SOLOv2MaskFeatureHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_masks: int,
        num_levels: int = 4,
        norm: str = "GN",
    ):
        """
        Args:
            in_channels: channels of the FPN features.
            channels: channels of the per-level branches.
            num_masks: E, the channels of the mask feature F.
            num_levels: FPN levels fused, finest first (p2..p5); the last one gets coordinates.
            norm: "GN" or "" (no normalization).
        """
        super().__init__()
        if norm not in ("GN", ""):
            raise ValueError("MODEL.SOLOV2.NORM must be 'GN' or 'none', got {!r}".format(norm))
        self.num_levels = num_levels
        self.convs_all_levels = nn.ModuleList()
        for level in range(num_levels):
            branch = nn.Sequential()
            # Coordinates go in at the coarsest level (1/32) only.
            level_in = in_channels + 2 if level == num_levels - 1 and level > 0 else in_channels
            for j in range(max(level, 1)):
                branch.add_module(
                    "conv{}".format(j),
                    _conv_norm_relu(level_in if j == 0 else channels, channels, 3, norm),
                )
                if level > 0:
                    branch.add_module(
                        "upsample{}".format(j),
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    )
            self.convs_all_levels.append(branch)
        self.conv_pred = _conv_norm_relu(channels, num_masks, 1, norm)

        init_conv_weights(self)

    @classmethod
    def from_config(cls, cfg):
        sol = cfg.MODEL.SOLOV2
        return {
            "in_channels": sol.MASK_IN_CHANNELS,
            "channels": sol.MASK_CHANNELS,
            "num_masks": sol.NUM_MASKS,
            "num_levels": len(sol.MASK_IN_FEATURES),
            "norm": "" if sol.NORM.lower() == "none" else sol.NORM,
        }

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: FPN maps p2, p3, ... (strides 4, 8, ...); input padded to a multiple of the
                coarsest stride so that every upsampled branch lands exactly on p2's size.

        Returns:
            the mask feature F, (N, num_masks, H/4, W/4).
        """
        if len(features) != self.num_levels:
            raise ValueError(
                "the mask feature head expects {} levels, got {}".format(
                    self.num_levels, len(features)
                )
            )
        fused = self.convs_all_levels[0](features[0])
        for level in range(1, self.num_levels):
            feature = features[level]
            if level == self.num_levels - 1:
                feature = append_coordinates(feature)
            fused = fused + self.convs_all_levels[level](feature)
        return self.conv_pred(fused)
