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

ResNet-18/34 narrower than 64 channels in res2 (``MODEL.RESNETS.RES2_OUT_CHANNELS`` 32, say: every
stage half as wide, a quarter of the FLOPs), which Detectron2's builder refuses with an assertion
although its ``BasicBlock`` stages take any width: built here from Detectron2's own ``BasicStem``,
``ResNet.make_stage(BasicBlock, ...)`` and ``ResNet``, in the order and with the strides, norm,
freezing and parameter names of its builder. ``make demo`` uses it: on two CPU cores the stages'
convolutions, not the heads, were most of a training step.
"""

from detectron2.layers import ShapeSpec
from detectron2.layers.deform_conv import DeformConv as D2DeformConv
from detectron2.layers.deform_conv import ModulatedDeformConv as D2ModulatedDeformConv
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
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


BASIC_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def is_narrow_basic_resnet(cfg) -> bool:
    """A ResNet-18/34 whose res2 is not 64 channels wide (Detectron2's builder asserts 64)."""
    res = cfg.MODEL.RESNETS
    return res.DEPTH in BASIC_BLOCKS_PER_STAGE and res.RES2_OUT_CHANNELS != 64


def build_narrow_basic_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 of any res2 width, doubling per stage, from Detectron2's own blocks and in the
    order of its ``build_resnet_backbone`` (so with the same parameter names, initialisation and
    random numbers drawn as a 64-wide one of its own)."""
    res = cfg.MODEL.RESNETS
    width = res.RES2_OUT_CHANNELS
    if width < 1:
        raise ValueError("MODEL.RESNETS.RES2_OUT_CHANNELS must be >= 1, got {}".format(width))
    if res.RES5_DILATION != 1 or res.NUM_GROUPS != 1:
        raise ValueError(
            "ResNet-{} takes MODEL.RESNETS.RES5_DILATION 1 and NUM_GROUPS 1 (Detectron2's "
            "BasicBlock has neither), got {} and {}".format(
                res.DEPTH, res.RES5_DILATION, res.NUM_GROUPS
            )
        )
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=res.STEM_OUT_CHANNELS, norm=res.NORM
    )
    stages = []
    in_channels = res.STEM_OUT_CHANNELS
    for index, num_blocks in enumerate(BASIC_BLOCKS_PER_STAGE[res.DEPTH]):
        out_channels = width * 2**index
        first_stride = 1 if index == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=res.NORM,
            )
        )
        in_channels = out_channels
    return ResNet(
        stem, stages, out_features=res.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_solov2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_fpn_backbone`` (same config keys, modules and parameter names)
    with its deformable convs on torchvision's op, and ResNet-18/34 of any width."""
    check_resnet_deform_config(cfg)
    if not is_narrow_basic_resnet(cfg):
        return replace_deform_convs(build_resnet_fpn_backbone(cfg, input_shape))
    return FPN(
        bottom_up=build_narrow_basic_resnet(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
