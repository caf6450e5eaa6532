"""The SOLOv2 unified mask-feature head: F at 1/4 scale from FPN p2..p5 (paper Sec. 3.2.2).

Level i (p2 + i) goes through i rounds of 3x3 conv + GN + ReLU + 2x bilinear upsampling (p2 gets a
single conv), the results are summed at 1/4 scale and a 1x1 conv + GN + ReLU gives the E-channel
mask feature. Normalized coordinates are appended to the coarsest level (p5, 1/32) before its
first conv, which gives the position information the dynamic kernels rely on.

Module names (``convs_all_levels.<level>.conv<j>``, ``conv_pred``) match the official/AdelaiDet
implementation so its checkpoints load unchanged.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from .layers import (
    append_coordinates,
    check_head_norm,
    check_in_channels_key,
    conv_norm_relu,
    init_conv_weights,
    select_features,
)


def _conv_norm_relu(in_channels, out_channels, kernel_size, norm, type_dcn):
    return nn.Sequential(*conv_norm_relu(in_channels, out_channels, kernel_size, norm, type_dcn))


class SOLOv2MaskFeatureHead(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        channels: int,
        num_masks: int,
        norm: str = "GN",
        type_dcn: Optional[str] = None,
    ):
        """
        Args:
            input_shape: the backbone features fused, finest first (p2, p3, ...), by name: their
                channels and strides. Each level's stride must be twice the previous one's (level
                i is upsampled i times by 2); the last level gets the coordinates. F has the
                finest level's stride (``output_stride``).
            channels: channels of the per-level branches.
            num_masks: E, the channels of the mask feature F.
            norm: "GN", "BN" or "" (no normalization).
            type_dcn: None (plain convs), or "DCN" / "DCNv2": every conv deformable (v1 / v2),
                the 1x1 ``conv_pred`` included, as mmdet's MaskFeatModule with a DCN
                ``conv_cfg`` (R101/X101-DCN) and the official SOLOv2 R101/X101-DCN
                MaskFeatHead.
        """
        super().__init__()
        check_head_norm(norm)
        self.in_features = list(input_shape)
        if not self.in_features:
            raise ValueError("MODEL.SOLOV2.MASK_IN_FEATURES is empty")
        strides = [input_shape[name].stride for name in self.in_features]
        if any(coarse != 2 * fine for fine, coarse in zip(strides, strides[1:])):
            raise ValueError(
                "MODEL.SOLOV2.MASK_IN_FEATURES must be consecutive FPN levels, each of twice the "
                "previous stride (level i is upsampled i times by 2); got strides {}".format(
                    dict(zip(self.in_features, strides))
                )
            )
        self.output_stride = strides[0]
        num_levels = len(self.in_features)
        self.convs_all_levels = nn.ModuleList()
        for level, name in enumerate(self.in_features):
            branch = nn.Sequential()
            in_channels = input_shape[name].channels
            # Coordinates go in at the coarsest level (1/32 for p2..p5) only.
            level_in = in_channels + 2 if level == num_levels - 1 and level > 0 else in_channels
            for j in range(max(level, 1)):
                branch.add_module(
                    "conv{}".format(j),
                    _conv_norm_relu(level_in if j == 0 else channels, channels, 3, norm, type_dcn),
                )
                if level > 0:
                    branch.add_module(
                        "upsample{}".format(j),
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    )
            self.convs_all_levels.append(branch)
        self.conv_pred = _conv_norm_relu(channels, num_masks, 1, norm, type_dcn)

        init_conv_weights(self)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        sol = cfg.MODEL.SOLOV2
        level_shapes = select_features(input_shape, sol.MASK_IN_FEATURES, "MASK_IN_FEATURES")
        check_in_channels_key("MASK_IN_CHANNELS", sol.MASK_IN_CHANNELS, level_shapes)
        return {
            "input_shape": level_shapes,
            "channels": sol.MASK_CHANNELS,
            "num_masks": sol.NUM_MASKS,
            "norm": "" if sol.NORM.lower() == "none" else sol.NORM,
            "type_dcn": sol.TYPE_DCN if sol.USE_DCN_IN_MASK_FEATURE else None,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: the backbone's output by name; the head reads its ``in_features``. The
                input must be padded to a multiple of the coarsest stride so that every
                upsampled branch lands exactly on the finest level's size.

        Returns:
            the mask feature F, (N, num_masks, H / output_stride, W / output_stride).
        """
        levels: List[torch.Tensor] = [features[name] for name in self.in_features]
        fused = self.convs_all_levels[0](levels[0])
        for level in range(1, len(levels)):
            feature = levels[level]
            if level == len(levels) - 1:
                feature = append_coordinates(feature)
            fused = fused + self.convs_all_levels[level](feature)
        return self.conv_pred(fused)
