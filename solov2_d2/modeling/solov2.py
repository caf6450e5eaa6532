"""The SOLOv2 META_ARCHITECTURE: image -> ResNet-FPN -> kernel head + mask-feature head ->
(training) center-region targets + focal/dice losses, or (inference) Matrix NMS -> ``Instances``.
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances, PolygonMasks
from torch import nn

from ..memory import arrange_for_cpu_inference
from .backbone import DETECTRON2_RESNET_BUILDERS
from .deform import is_modulated
from .fast import InferenceCopy
from .kernel_head import SOLOv2KernelHead
from .losses import solov2_losses
from .mask_feature_head import SOLOv2MaskFeatureHead
from .postprocess import InferenceParams, cells_of_levels, postprocess_single_image
from .target_assigner import assign_targets_single_image

__all__ = ["SOLOv2"]


def _check_config(cfg):
    """Options that exist in the config (for AdelaiDet compatibility) but are not implemented
    here fail loudly instead of being silently ignored."""
    sol = cfg.MODEL.SOLOV2
    if sol.USE_DCN_IN_INSTANCE or sol.USE_DCN_IN_MASK_FEATURE:
        is_modulated(sol.TYPE_DCN)  # an unknown TYPE_DCN fails here, naming the key
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) and (
        cfg.MODEL.BACKBONE.NAME in DETECTRON2_RESNET_BUILDERS
    ):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE asks for deformable convs, which Detectron2's {} "
            "builds on its compiled CUDA ops (no CPU kernel). Set MODEL.BACKBONE.NAME to "
            "build_solov2_resnet_fpn_backbone: Detectron2's build_resnet_fpn_backbone (same "
            "modules, keys and config) with its deformable convs on "
            "torchvision.ops.deform_conv2d (CPU and GPU).".format(cfg.MODEL.BACKBONE.NAME)
        )
    if not sol.LOSS.FOCAL_USE_SIGMOID:
        raise NotImplementedError("MODEL.SOLOV2.LOSS.FOCAL_USE_SIGMOID=False is not implemented.")
    if sol.NMS_TYPE not in ("matrix", "mask"):
        raise ValueError("MODEL.SOLOV2.NMS_TYPE must be 'matrix' or 'mask', got " + sol.NMS_TYPE)
    if sol.NMS_KERNEL not in ("gaussian", "linear"):
        raise ValueError(
            "MODEL.SOLOV2.NMS_KERNEL must be 'gaussian' or 'linear', got " + sol.NMS_KERNEL
        )
    if sol.NUM_KERNELS != sol.NUM_MASKS:
        raise ValueError(
            "MODEL.SOLOV2.NUM_KERNELS ({}) must equal NUM_MASKS ({}): the dynamic kernels are 1x1 "
            "convolutions over the mask feature".format(sol.NUM_KERNELS, sol.NUM_MASKS)
        )


@META_ARCH_REGISTRY.register()
class SOLOv2(nn.Module):
    """SOLOv2: Dynamic and Fast Instance Segmentation (Wang et al., NeurIPS 2020)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        kernel_head: SOLOv2KernelHead,
        mask_head: SOLOv2MaskFeatureHead,
        scale_ranges: List[List[float]],
        sigma: float,
        num_classes: int,
        focal_alpha: float,
        focal_gamma: float,
        focal_weight: float,
        dice_weight: float,
        normalize_across_processes: bool,
        inference_params: InferenceParams,
        pixel_mean: List[float],
        pixel_std: List[float],
        fast_inference: bool = True,
    ):
        """
        Args:
            backbone: gives the features by name (``output_shape()``: their channels, strides).
            kernel_head, mask_head: read their features from the backbone's output; the kernel
                head owns the instance levels (features, instance strides, grid sizes).
            scale_ranges, sigma: the target assigner's (one range per instance level).
            fast_inference: eval-mode CPU forwards without autograd run an optimized copy of
                the networks (``fast.InferenceCopy``): same detections, last float bits differ.
                False (and always in training, with autograd, on other devices): the modules
                as built, whose predictions are bitwise the reference implementation's.
            The others: the losses' and inference's parameters, the input normalization.
        """
        super().__init__()
        self.backbone = backbone
        # "ins_head"/"mask_head" are the official module names: their checkpoints load as is.
        self.ins_head = kernel_head
        self.mask_head = mask_head
        # The kernel head checks its own keys (FPN_INSTANCE_STRIDES, NUM_GRIDS) against its
        # levels; the scale ranges are the target assigner's, one per level too.
        if len(scale_ranges) != len(kernel_head.num_grids):
            raise ValueError(
                "MODEL.SOLOV2.FPN_SCALE_RANGES has {} entries but the kernel head has {} levels "
                "(INSTANCE_IN_FEATURES: {})".format(
                    len(scale_ranges),
                    len(kernel_head.num_grids),
                    ", ".join(kernel_head.in_features),
                )
            )
        if mask_head.output_stride != 4:
            raise ValueError(
                "the mask feature must have stride 4 (the mask targets and the final masks' "
                "upsampling assume it); MASK_IN_FEATURES starts at stride {}".format(
                    mask_head.output_stride
                )
            )
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.sigma = sigma
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.normalize_across_processes = normalize_across_processes
        self.inference_params = inference_params
        self.fast_inference = fast_inference
        self._inference_copy = InferenceCopy()
        # Non-persistent: they are config, not weights (and official checkpoints lack them).
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # The instance stride of every grid cell, all levels concatenated.
        self.register_buffer(
            "cell_strides",
            torch.cat(
                [
                    torch.full((s * s,), float(stride))
                    for s, stride in zip(kernel_head.num_grids, kernel_head.instance_strides)
                ]
            ),
            False,
        )

    @classmethod
    def from_config(cls, cfg):
        _check_config(cfg)
        sol = cfg.MODEL.SOLOV2
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "kernel_head": SOLOv2KernelHead(cfg, backbone.output_shape()),
            "mask_head": SOLOv2MaskFeatureHead(cfg, backbone.output_shape()),
            "scale_ranges": sol.FPN_SCALE_RANGES,
            "sigma": sol.SIGMA,
            "num_classes": sol.NUM_CLASSES,
            "focal_alpha": sol.LOSS.FOCAL_ALPHA,
            "focal_gamma": sol.LOSS.FOCAL_GAMMA,
            "focal_weight": sol.LOSS.FOCAL_WEIGHT,
            "dice_weight": sol.LOSS.DICE_WEIGHT,
            "normalize_across_processes": sol.LOSS.NORM_ACROSS_PROCESSES,
            "inference_params": InferenceParams(
                score_threshold=sol.SCORE_THR,
                mask_threshold=sol.MASK_THR,
                nms_pre=sol.NMS_PRE,
                update_threshold=sol.UPDATE_THR,
                max_per_image=sol.MAX_PER_IMG,
                nms_type=sol.NMS_TYPE,
                nms_kernel=sol.NMS_KERNEL,
                nms_sigma=float(sol.NMS_SIGMA),
                mask_nms_iou_threshold=sol.MASK_NMS_IOU_THR,
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "fast_inference": sol.FAST_INFERENCE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def num_grids(self) -> List[int]:
        """S of each instance level: the kernel head's (it owns ``NUM_GRIDS``)."""
        return self.ins_head.num_grids

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean)
            / self.pixel_std
            for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts: "image" (C, H, W) in the config's
                INPUT.FORMAT, "instances" (training) with gt_classes, gt_boxes and gt_masks
                (PolygonMasks or BitMasks), and optional "height"/"width" for the output size.

        Returns:
            training: dict of losses; inference: list of {"instances": Instances} with
            pred_masks (bool), pred_boxes (tight boxes of the masks), scores, pred_classes.
        """
        backbone, kernel_head, mask_head = self.backbone, self.ins_head, self.mask_head
        if not self.training and self.device.type == "cpu" and not torch.compiler.is_compiling():
            # Large activations would otherwise be page-faulted in on every call (memory.py).
            arrange_for_cpu_inference()
            if self.fast_inference and not torch.is_grad_enabled():
                networks = self._inference_copy.networks(self)
                backbone, kernel_head, mask_head = (
                    networks.backbone,
                    networks.ins_head,
                    networks.mask_head,
                )
        images = self.preprocess_image(batched_inputs)
        features = backbone(images.tensor)
        category_logits, kernel_preds = kernel_head(features)
        mask_feature = mask_head(features)

        if self.training:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(category_logits, kernel_preds, mask_feature, gt_instances, images)
        # Detections are not differentiable (thresholds, sorting, NMS); with autograd on, the
        # postprocess's in-place ops would otherwise fail deep inside.
        with torch.no_grad():
            return self.inference(
                category_logits, kernel_preds, mask_feature, images, batched_inputs
            )

    # ------------------------------------------------------------------------------ training
    def losses(self, category_logits, kernel_preds, mask_feature, gt_instances, images):
        padded_size = tuple(images.tensor.shape[-2:])
        category_targets, mask_logits, mask_targets = [], [], []
        for i, instances in enumerate(gt_instances):
            targets = assign_targets_single_image(
                _bitmasks(instances),
                instances.gt_boxes.tensor,
                instances.gt_classes,
                padded_size,
                self.num_grids,
                self.scale_ranges,
                self.sigma,
                self.num_classes,
            )
            category_targets.append(torch.cat(targets.category_targets))
            # Kernels of the positive cells, all levels, then M = G * F as one matmul.
            kernels = torch.cat(
                [
                    level_kernels[i].flatten(1).t()[cells]
                    for level_kernels, cells in zip(kernel_preds, targets.positive_cells)
                ]
            )
            num_masks, feat_h, feat_w = mask_feature.shape[1:]
            # In float32 even under autocast (which would run the matmul in float16/bfloat16):
            # each logit sums E products, and the dice loss then sums whole masks.
            product_dtype = torch.promote_types(mask_feature.dtype, torch.float32)
            features = mask_feature[i].view(num_masks, -1).to(product_dtype)
            with torch.autocast(mask_feature.device.type, enabled=False):
                product = kernels.to(product_dtype) @ features
            mask_logits.append(product.view(-1, feat_h, feat_w))
            mask_targets.append(targets.mask_targets[torch.cat(targets.positive_instances)])

        # (N, C, S, S) per level -> (N * sum S^2, C), in the same image-major, level, cell order.
        flat_logits = torch.cat(
            [
                torch.cat([level[i].flatten(1).t() for level in category_logits])
                for i in range(len(gt_instances))
            ]
        )
        return solov2_losses(
            flat_logits,
            torch.cat(category_targets),
            torch.cat(mask_logits),
            torch.cat(mask_targets),
            num_classes=self.num_classes,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            focal_weight=self.focal_weight,
            dice_weight=self.dice_weight,
            normalize_across_processes=self.normalize_across_processes,
        )

    # ----------------------------------------------------------------------------- inference
    def inference(
        self,
        category_logits,
        kernel_preds,
        mask_feature,
        images,
        batched_inputs,
        postprocess=postprocess_single_image,
    ):
        """Per-image ``postprocess`` of the heads' outputs; ``postprocess`` is
        ``postprocess_single_image`` or anything with its signature (the benchmarks and tests
        pass ``postprocess_single_image_reference``)."""
        # (N, C, num_cells), (N, E, num_cells)
        category_scores, kernels = cells_of_levels(category_logits, kernel_preds)
        results = []
        for i, (image_size, inputs) in enumerate(zip(images.image_sizes, batched_inputs)):
            output_size = (
                int(inputs.get("height", image_size[0])),
                int(inputs.get("width", image_size[1])),
            )
            instances = postprocess(
                category_scores[i].t(),
                kernels[i].t(),
                mask_feature[i],
                self.cell_strides,
                tuple(image_size),
                output_size,
                self.inference_params,
            )
            results.append({"instances": instances})
        return results


def _bitmasks(instances: Instances) -> torch.Tensor:
    """The (K, h, w) bool masks of the ground truth, whatever format the mapper produced."""
    h, w = instances.image_size
    if not instances.has("gt_masks"):
        if len(instances) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=instances.gt_classes.device)
        raise ValueError(
            "SOLOv2 needs instance masks: the dataset mapper produced instances without gt_masks "
            "(is MODEL.MASK_ON / the dataset's 'segmentation' field missing?)"
        )
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, h, w)
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    return masks.to(device=instances.gt_classes.device, dtype=torch.bool)
