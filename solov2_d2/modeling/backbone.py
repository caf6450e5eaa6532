"""``build_solov2_resnet_fpn_backbone``: Detectron2's ResNet-FPN whose deformable stages run on
``torchvision.ops.deform_conv2d`` (CPU and GPU).

Detectron2's ``build_resnet_backbone`` already honours ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``,
``DEFORM_MODULATED`` and ``DEFORM_NUM_GROUPS`` (and ResNeXt through ``NUM_GROUPS`` /
``WIDTH_PER_GROUP``), building a ``DeformBottleneckBlock`` for every block of a deformable stage,
stride-2 blocks included. Only the 3x3 conv of those blocks, Detectron2's ``DeformConv`` /
``ModulatedDeformConv``, needs Detectron2's compiled CUDA ops. This builder calls Detectron2's own
``build_resnet_fpn_backbone`` and replaces each of those convs by ``deform.DeformConv`` holding the
same parameter tensors and norm: the module tree, the parameter names
(``resN.B.conv2.weight``, ``resN.B.conv2.norm.*``, ``resN.B.conv2_offset.*``), the initialisation
and the random numbers drawn are Detectron2's, and so are the block's forward (its offset/mask
split, see ``deform.py``) and freezing. Without deformable stages it returns exactly Detectron2's
backbone.
"""

from detectron2.layers import ShapeSpec
from detectron2.layers.deform_conv import DeformConv as D2DeformConv
from detectron2.layers.deform_conv import ModulatedDeformConv as D2ModulatedDeformConv
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from torch import nn

from .deform import DeformConv

# Detectron2's builders that make its compiled-op deformable convs when DEFORM_ON_PER_STAGE asks.
DETECTRON2_RESNET_BUILDERS = (
    "build_resnet_backbone",
    "build_resnet_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone",
)


def check_resnet_deform_config(cfg) -> None:
    """Clear errors for the deformable-conv keys of ``MODEL.RESNETS`` that Detectron2's builder
    would only assert on, index past, or accept and fail on later."""
    res = cfg.MODEL.RESNETS
    deform_on = list(res.DEFORM_ON_PER_STAGE)
    if len(deform_on) != 4:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one entry per stage res2..res5 (4), got "
            "{}".format(deform_on)
        )
    if not any(deform_on):
        return
    if res.DEPTH in (18, 34):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE {} asks for deformable convs, but ResNet-{} is "
            "made of BasicBlocks, which have none (Detectron2 and the published models put them "
            "in the 3x3 conv of bottleneck blocks: DEPTH 50, 101 or 152)".format(
                deform_on, res.DEPTH
            )
        )
    groups = res.DEFORM_NUM_GROUPS
    if groups < 1:
        raise ValueError("MODEL.RESNETS.DEFORM_NUM_GROUPS must be >= 1, got {}".format(groups))
    bottleneck = res.NUM_GROUPS * res.WIDTH_PER_GROUP
    for stage, on in enumerate(deform_on):
        channels = bottleneck * 2**stage
        if on and channels % groups:
            raise ValueError(
                "MODEL.RESNETS.DEFORM_NUM_GROUPS ({}) must divide the {} bottleneck channels of "
                "res{} (NUM_GROUPS x WIDTH_PER_GROUP x {})".format(
                    groups, channels, stage + 2, 2**stage
                )
            )


def replace_deform_convs(module: nn.Module) -> nn.Module:
    """Replaces, in place, every Detectron2 ``DeformConv`` / ``ModulatedDeformConv`` under
    ``module`` by ``deform.DeformConv`` with the same hyper-parameters, the same parameter tensors
    (so their values, ``requires_grad`` and any optimizer state follow) and the same ``norm`` and
    ``activation`` modules. Returns ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (D2DeformConv, D2ModulatedDeformConv)):
                continue
            conv = DeformConv(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=child.groups,
                deformable_groups=child.deformable_groups,
                bias=child.bias is not None,
                modulated=isinstance(child, D2ModulatedDeformConv),
                norm=child.norm,
                activation=child.activation,
            )
            conv.weight = child.weight
            if child.bias is not None:
                conv.bias = child.bias
            setattr(parent, name, conv)
    return module


@BACKBONE_REGISTRY.register()
def build_solov2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_fpn_backbone`` (same config keys, modules and parameter names)
    with its deformable convs on torchvision's op."""
    check_resnet_deform_config(cfg)
    return replace_deform_convs(build_resnet_fpn_backbone(cfg, input_shape))
