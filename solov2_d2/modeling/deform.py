"""Deformable convolution, v1 (Dai et al., ICCV 2017) and v2 / modulated (Zhu et al., CVPR 2019),
on ``torchvision.ops.deform_conv2d``: one implementation for CPU and GPU, with autograd.

Detectron2's ``DeformConv`` / ``ModulatedDeformConv`` compute the same function but only through
its compiled CUDA ops (no CPU kernel). The modules here keep their parameter names, so that
checkpoints of either load unchanged:

- ``DeformConv``: Detectron2's interface, ``forward(x, offset, mask=None)`` with the offsets (and
  the v2 modulation mask) computed by the caller. Detectron2's ``DeformBottleneckBlock`` computes
  them with its sibling ``conv2_offset``; ``backbone.py`` puts this module in its ``conv2``.
- ``DeformConvPack``: mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``, which predict
  the offsets (and mask) from the layer's own input with a child conv ``conv_offset``; the heads
  use it.

Offset layout. For output position p0, deformable group g and kernel tap n = i * kw + j (row
major), the offset channel 2 * (g * kh * kw + n) holds the row displacement dy and the next
channel the column displacement dx; mask channel g * kh * kw + n holds the modulation m. The
sample of tap n is x(p0 * stride - padding + dilation * (i, j) + (dy, dx)), bilinear, zero outside
the input. That is torchvision's documented layout, and the one of mmcv's and Detectron2's CUDA
kernels (all three come from the original DCN code); tests/test_deform.py checks it against the
formula, dy/dx swapped included. The v2 offset conv predicts 3 * G * kh * kw channels: mmcv's
``ModulatedDeformConv2dPack`` and Detectron2's ``DeformBottleneckBlock`` chunk them into three
and concatenate the first two as the offsets (Detectron2 names them ``offset_x, offset_y``, but
each third interleaves dy and dx), the third through a sigmoid being the mask. That is: the
first 2 G kh kw channels are the offsets, the last G kh kw the mask logits, as
``split_offset_mask`` takes them. v1 predicts the 2 G kh kw offsets only.
"""

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

# MODEL.SOLOV2.TYPE_DCN (and the official SOLO's type_dcn): the layer each name means.
DCN_TYPES = {"DCN": False, "DCNv2": True}  # name -> modulated


def is_modulated(type_dcn: str, key: str = "MODEL.SOLOV2.TYPE_DCN") -> bool:
    """Whether a TYPE_DCN value means v2 (modulated); an unknown value fails, naming ``key``."""
    if type_dcn not in DCN_TYPES:
        raise ValueError(
            "{} must be 'DCN' (deformable conv v1) or 'DCNv2' (modulated, v2), got {!r}".format(
                key, type_dcn
            )
        )
    return DCN_TYPES[type_dcn]


def split_offset_mask(
    offset_mask: torch.Tensor, modulated: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """An offset conv's output as (offset, mask): v1 is all offsets; v2's first two thirds are the
    offsets and the sigmoid of its last third the mask (the chunk-into-3 of mmcv and Detectron2,
    see the module docstring)."""
    if not modulated:
        return offset_mask, None
    num_mask = offset_mask.shape[1] // 3
    return offset_mask[:, : 2 * num_mask], offset_mask[:, 2 * num_mask :].sigmoid()


class DeformConv(nn.Module):
    """A deformable conv given its offsets: Detectron2's ``DeformConv`` (v1) and
    ``ModulatedDeformConv`` (v2) on torchvision's op, with their attributes and parameters
    (``weight`` [out, in / groups, kh, kw], ``bias`` or None, optional ``norm`` and
    ``activation`` applied after the conv)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
        modulated: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        for name, value, divisor_name, divisor in (
            ("in_channels", in_channels, "groups", groups),
            ("out_channels", out_channels, "groups", groups),
            ("in_channels", in_channels, "deformable_groups", deformable_groups),
        ):
            if value % divisor:
                raise ValueError(
                    "a deformable conv's {} ({}) must be divisible by its {} ({})".format(
                        name, value, divisor_name, divisor
                    )
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.modulated = modulated
        self.norm = norm
        self.activation = activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Detectron2's init of its deformable convs (kaiming uniform, relu gain); the heads and the
        # backbone builder overwrite it with their own.
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    @property
    def offset_channels(self) -> int:
        """Channels of the offset conv that drives this layer: (3 if v2 else 2) * G * kh * kw."""
        taps = self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        return (3 if self.modulated else 2) * taps

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if (mask is not None) != self.modulated:
            raise ValueError(
                "a {} deformable conv takes {} mask".format(
                    "modulated (v2)" if self.modulated else "v1",
                    "a" if self.modulated else "no",
                )
            )
        # torchvision's op takes groups from the weight and deformable groups from the offsets.
        out = deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            "in_channels={}, out_channels={}, kernel_size={}, stride={}, padding={}, dilation={}, "
            "groups={}, deformable_groups={}, bias={}, modulated={}".format(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.deformable_groups,
                self.bias is not None,
                self.modulated,
            )
        )


class DeformConvPack(DeformConv):
    """A deformable conv that predicts its own offsets (and v2 mask) from its input: mmcv's
    ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``. ``conv_offset`` is a conv with bias and
    the layer's kernel, stride, padding and dilation, zero-initialised as in mmcv and Detectron2:
    a fresh layer samples the regular grid, so a fresh v1 layer is the plain conv and a fresh v2
    layer is the plain conv with every tap weighted sigmoid(0) = 1/2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.conv_offset = nn.Conv2d(
            in_channels,
            self.offset_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = split_offset_mask(self.conv_offset(x), self.modulated)
        return super().forward(x, offset, mask)
