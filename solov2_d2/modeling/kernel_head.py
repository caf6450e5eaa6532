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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from .layers import (
    accepts_levels,
    append_coordinates,
    check_head_norm,
    check_in_channels_key,
    conv_norm_relu,
    init_conv_weights,
    run_tower,
    run_tower_levels,
    select_features,
)


def instance_level_features(
    features: Sequence[torch.Tensor], strides: Sequence[int], instance_strides: Sequence[int]
) -> List[torch.Tensor]:
    """Resizes each FPN level to the stride the kernel head runs it at (paper Sec. 3.1).

    Level k, of stride ``strides[k]``, is resized (bilinear) to ``ceil(H / instance_strides[k])
    x ceil(W / instance_strides[k])``, where H x W is the padded input size, recovered from the
    finest level (its size times its stride: exact when the input is padded to a multiple of the
    strides, as Detectron2's FPN pads it to 32). Strided convolutions and pooling make every
    level ``ceil(H / stride)`` high, so a level whose instance stride is its own stride keeps
    its size and is returned as it is.

    With the official p2..p6 and instance strides 8, 8, 16, 32, 32 this halves p2 and brings p6
    to p5's size: the finest and coarsest grids otherwise sample maps that are needlessly large
    or small for them. Any number of levels follows the same rule.
    """
    if not len(features) == len(strides) == len(instance_strides):
        raise ValueError(
            "instance_level_features got {} levels, {} strides and {} instance strides".format(
                len(features), len(strides), len(instance_strides)
            )
        )
    finest = min(range(len(features)), key=lambda level: strides[level])
    height, width = (size * strides[finest] for size in features[finest].shape[-2:])
    resized = []
    for feature, instance_stride in zip(features, instance_strides):
        size = (-(-height // instance_stride), -(-width // instance_stride))
        if tuple(feature.shape[-2:]) != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        resized.append(feature)
    return resized


# MODEL.SOLOV2.DCN_INSTANCE_CONVS: which tower convs are deformable when USE_DCN_IN_INSTANCE is on.
# "all": the official SOLOv2Head (use_dcn_in_tower) and mmdet's SOLOV2Head with
# dcn_apply_to_all_conv=True (R101/X101-DCN); "last": the official SOLOv2LightHead and mmdet's
# dcn_apply_to_all_conv=False (Light R50-DCN).
DCN_INSTANCE_CONVS = ("all", "last")


def _conv_tower(
    in_channels: int,
    channels: int,
    num_convs: int,
    norm: str,
    type_dcn: Optional[str],
    dcn_convs: str,
    num_levels: int,
) -> nn.Sequential:
    layers = []
    for i in range(num_convs):
        deformable = type_dcn is not None and (dcn_convs == "all" or i == num_convs - 1)
        layers += conv_norm_relu(
            in_channels if i == 0 else channels,
            channels,
            3,
            norm,
            type_dcn=type_dcn if deformable else None,
            num_levels=num_levels,
        )
    return nn.Sequential(*layers)


class SOLOv2KernelHead(nn.Module):
    """Category and kernel branches over the S x S grids of the instance levels.

    The head owns the instance levels' layout: which backbone features it reads
    (``in_features``), the stride each is resized to (``instance_strides``) and each level's
    grid size S (``num_grids``, the one reader of ``MODEL.SOLOV2.NUM_GRIDS``). The META_ARCH and
    the target assigner ask it for them.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        instance_strides: List[int],
        channels: int,
        num_convs: int,
        num_grids: List[int],
        num_classes: int,
        num_kernels: int,
        norm: str = "GN",
        use_coord_conv: bool = True,
        prior_prob: float = 0.01,
        type_dcn: Optional[str] = None,
        dcn_convs: str = "all",
    ):
        """
        Args:
            input_shape: the backbone features the head reads, finest grid first, by name (the
                order of the levels; e.g. p2..p6): their channels (all equal, the towers are
                shared by the levels) and strides.
            instance_strides: per level, the stride it is resized to before its grid.
            channels: channels inside both towers.
            num_convs: 3x3 conv (+ GN + ReLU) blocks per tower; the towers are shared by levels.
            num_grids: S of each level.
            num_classes: outputs of the category branch (sigmoid per class, no background).
            num_kernels: length of each dynamic kernel (E for 1x1 kernels over E mask channels).
            norm: "GN", "BN" (one BatchNorm per level in the shared towers,
                ``LevelBatchNorm2d``) or "" (no normalization, convs get biases).
            use_coord_conv: append normalized coordinates to the kernel branch input.
            prior_prob: initial foreground probability of the category branch (focal loss init).
            type_dcn: None (plain convs), or "DCN" / "DCNv2" for deformable v1 / v2 tower convs.
            dcn_convs: with ``type_dcn``, which convs of both towers are deformable: "all" or
                "last" (``DCN_INSTANCE_CONVS``).
        """
        super().__init__()
        check_head_norm(norm)
        if dcn_convs not in DCN_INSTANCE_CONVS:
            raise ValueError(
                "MODEL.SOLOV2.DCN_INSTANCE_CONVS must be 'all' or 'last', got {!r}".format(
                    dcn_convs
                )
            )
        self.in_features = list(input_shape)
        self.in_strides = [input_shape[name].stride for name in self.in_features]
        self.instance_strides = list(instance_strides)
        self.num_grids = list(num_grids)
        for key, values in (
            ("FPN_INSTANCE_STRIDES", self.instance_strides),
            ("NUM_GRIDS", self.num_grids),
        ):
            if len(values) != len(self.in_features):
                raise ValueError(
                    "MODEL.SOLOV2.{} has {} entries but INSTANCE_IN_FEATURES has {} ({})".format(
                        key, len(values), len(self.in_features), ", ".join(self.in_features)
                    )
                )
        level_channels = {input_shape[name].channels for name in self.in_features}
        if len(level_channels) != 1:
            raise ValueError(
                "the kernel head's towers are shared by its levels, so its input features must "
                "have one channel count; got {}".format(
                    {name: input_shape[name].channels for name in self.in_features}
                )
            )
        (in_channels,) = level_channels
        self.use_coord_conv = use_coord_conv
        kernel_in = in_channels + 2 if use_coord_conv else in_channels
        tower_args = (channels, num_convs, norm, type_dcn, dcn_convs, len(self.in_features))
        self.cate_tower = _conv_tower(in_channels, *tower_args)
        self.kernel_tower = _conv_tower(kernel_in, *tower_args)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(channels, num_kernels, 3, padding=1)

        init_conv_weights(self)
        # Focal loss init (RetinaNet Sec. 3.3): start every class at probability prior_prob.
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        sol = cfg.MODEL.SOLOV2
        level_shapes = select_features(
            input_shape, sol.INSTANCE_IN_FEATURES, "INSTANCE_IN_FEATURES"
        )
        check_in_channels_key("INSTANCE_IN_CHANNELS", sol.INSTANCE_IN_CHANNELS, level_shapes)
        return {
            "input_shape": level_shapes,
            "instance_strides": list(sol.FPN_INSTANCE_STRIDES),
            "channels": sol.INSTANCE_CHANNELS,
            "num_convs": sol.NUM_INSTANCE_CONVS,
            "num_grids": list(sol.NUM_GRIDS),
            "num_classes": sol.NUM_CLASSES,
            "num_kernels": sol.NUM_KERNELS,
            "norm": "" if sol.NORM.lower() == "none" else sol.NORM,
            "use_coord_conv": sol.USE_COORD_CONV,
            "prior_prob": sol.PRIOR_PROB,
            "type_dcn": sol.TYPE_DCN if sol.USE_DCN_IN_INSTANCE else None,
            "dcn_convs": sol.DCN_INSTANCE_CONVS,
        }

    def instance_features(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The head's levels of the backbone ``features``, each resized to its instance stride
        (``instance_level_features``)."""
        return instance_level_features(
            [features[name] for name in self.in_features], self.in_strides, self.instance_strides
        )

    def forward(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: the backbone's output by name; the head reads its ``in_features``.

        Returns:
            category_logits: per level (N, num_classes, S, S).
            kernel_preds: per level (N, num_kernels, S, S).
        """
        levels = zip(self.instance_features(features), self.num_grids)
        if accepts_levels(self.kernel_tower) or accepts_levels(self.cate_tower):
            # The fast path's Winograd convs take every level in one call: run layer by layer.
            grid_features = [self._grid_feature(feature, num_grid) for feature, num_grid in levels]
            kernels = run_tower_levels(self.kernel_tower, grid_features)
            categories = run_tower_levels(
                self.cate_tower, [self._category_input(grid) for grid in grid_features]
            )
            return (
                run_tower_levels(self.cate_pred, categories),
                run_tower_levels(self.kernel_pred, kernels),
            )
        category_logits, kernel_preds = [], []
        for level, (feature, num_grid) in enumerate(levels):
            grid_feature = self._grid_feature(feature, num_grid)
            kernel_preds.append(self.kernel_pred(run_tower(self.kernel_tower, grid_feature, level)))
            category_logits.append(
                self.cate_pred(
                    run_tower(self.cate_tower, self._category_input(grid_feature), level)
                )
            )
        return category_logits, kernel_preds

    def _grid_feature(self, feature: torch.Tensor, num_grid: int) -> torch.Tensor:
        """A level's feature (with coordinates, if used) resized to its S x S grid: one resize
        for both branches."""
        if self.use_coord_conv:
            feature = append_coordinates(feature)
        return F.interpolate(
            feature, size=(num_grid, num_grid), mode="bilinear", align_corners=False
        )

    def _category_input(self, grid_feature: torch.Tensor) -> torch.Tensor:
        """The category branch's input: the grid feature without the coordinate channels."""
        return grid_feature[:, :-2] if self.use_coord_conv else grid_feature
