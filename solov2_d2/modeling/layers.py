"""Small building blocks shared by both SOLOv2 heads: coordinate channels, conv blocks, and the
checks of the backbone features a head is built for."""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from .deform import DeformConv, DeformConvPack, is_modulated
from .winograd import WinogradConv2d


def arange_linspace(start: float, end: float, steps, *, device=None, dtype=None):
    """``torch.linspace(start, end, steps)`` (``steps >= 2``) from ``arange``, so that an exported
    graph keeps ``steps`` symbolic. The values of PyTorch's CPU kernel: a float32 step, the first
    half counted from ``start``, the second from ``end``, each with one rounding (its fused
    multiply-add), which float64 arithmetic rounded once to float32 reproduces."""
    index = torch.arange(steps, device=device, dtype=torch.float64)
    last = index[-1:]  # steps - 1, as a tensor: no symbolic float in the graph
    step = ((end - start) / last.float()).double()  # float32 division, as the kernel's
    from_start = start + step * index
    from_end = end - step * (last - index)
    return torch.where(index < steps // 2, from_start, from_end).to(dtype or torch.float32)


def append_coordinates(features: torch.Tensor) -> torch.Tensor:
    """Appends x and y channels, each ``linspace(-1, 1)`` over the map, to an (N, C, H, W) tensor.

    The x channel comes first, then y, as in the official implementation (the first conv's weights
    of a checkpoint depend on this order).
    """
    n, _, h, w = features.shape
    # ``torch.export`` specializes ``linspace``'s step count to the traced size (a dynamic H/W
    # fails its guards); ``arange_linspace`` traces symbolically. Eager keeps ``linspace``.
    space = arange_linspace if torch.compiler.is_exporting() else torch.linspace
    y = space(-1, 1, h, device=features.device, dtype=features.dtype)
    x = space(-1, 1, w, device=features.device, dtype=features.dtype)
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).unsqueeze(0).expand(n, -1, -1, -1)
    return torch.cat([features, coords], dim=1)


HEAD_NORMS = ("GN", "BN", "")
"""The values of ``MODEL.SOLOV2.NORM`` the heads build (after ``"none"`` is read as ``""``)."""


def check_head_norm(norm: str) -> None:
    if norm not in HEAD_NORMS:
        raise ValueError(
            "MODEL.SOLOV2.NORM must be 'GN', 'BN' or '' / 'none' (no normalization), got "
            "{!r}".format(norm)
        )


class LevelBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per FPN level, for a conv tower that all levels share.

    The kernel head runs the same tower on every level's grid; one BatchNorm for all of them
    would train on each level's statistics in turn and keep their running mixture for inference,
    which fits no level. As AdelaiDet's FCOS head with BN, each level gets its own statistics and
    affine parameters while the convs stay shared. ``forward`` takes the level's index."""

    def __init__(self, num_channels: int, num_levels: int):
        super().__init__()
        self.levels = nn.ModuleList(nn.BatchNorm2d(num_channels) for _ in range(num_levels))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return self.levels[level](x)


def run_tower(tower: nn.Sequential, x: torch.Tensor, level: int) -> torch.Tensor:
    """``tower(x)`` for the FPN level ``level``: its ``LevelBatchNorm2d`` layers use that level's
    statistics."""
    for layer in tower:
        x = layer(x, level) if isinstance(layer, LevelBatchNorm2d) else layer(x)
    return x


def accepts_levels(tower: nn.Module) -> bool:
    """Whether ``tower`` (a module or a Sequential of them) has a layer that computes all levels
    in one call (``WinogradConv2d``, put in by ``optimize_for_inference``)."""
    layers = tower if isinstance(tower, nn.Sequential) else [tower]
    return any(isinstance(layer, WinogradConv2d) for layer in layers)


def run_tower_levels(tower: nn.Module, levels: List[torch.Tensor]) -> List[torch.Tensor]:
    """``run_tower`` for every level, layer by layer: a ``WinogradConv2d`` takes the list of
    levels (one matrix product for all), every other layer runs on each level in turn."""
    layers = tower if isinstance(tower, nn.Sequential) else [tower]
    for layer in layers:
        if isinstance(layer, WinogradConv2d):
            levels = layer(levels)
        elif isinstance(layer, LevelBatchNorm2d):
            levels = [layer(x, level) for level, x in enumerate(levels)]
        else:
            levels = [layer(x) for x in levels]
    return levels


def conv_norm_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm: str,
    type_dcn: Optional[str] = None,
    num_levels: int = 1,
) -> List[nn.Module]:
    """[conv, norm, ReLU]: the heads' basic block. A list, so that towers can be flat
    ``nn.Sequential``s whose indices match the official checkpoints' key names.

    ``norm``: "GN" (GroupNorm, 32 groups, the paper's heads), "BN" (BatchNorm; with
    ``num_levels > 1`` a ``LevelBatchNorm2d``, for a block shared by that many FPN levels), or ""
    (none: the conv gets a bias). ``type_dcn`` ("DCN" or "DCNv2", ``MODEL.SOLOV2.TYPE_DCN``) makes
    the conv deformable (``DeformConvPack``, v1 or v2) at the same index, as mmdet's and the
    official SOLO's ``ConvModule`` with a DCN ``conv_cfg``: its keys are the conv's plus
    ``conv_offset.*``."""
    check_head_norm(norm)
    padding = kernel_size // 2
    if type_dcn is None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=not norm)
    else:
        conv = DeformConvPack(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            bias=not norm,
            modulated=is_modulated(type_dcn),
        )
    layers = [conv]
    if norm == "GN":
        layers.append(nn.GroupNorm(32, out_channels))
    elif norm == "BN":
        layers.append(
            nn.BatchNorm2d(out_channels)
            if num_levels == 1
            else LevelBatchNorm2d(out_channels, num_levels)
        )
    layers.append(nn.ReLU(inplace=True))
    return layers


def init_conv_weights(module: nn.Module) -> None:
    """The official heads' init: every conv weight ~ N(0, 0.01), biases 0. The offset convs of
    deformable convs keep their zero init (mmcv's, Detectron2's and the official SOLO's): a fresh
    deformable conv samples the regular grid."""
    offset_convs = {id(m.conv_offset) for m in module.modules() if isinstance(m, DeformConvPack)}
    for conv in module.modules():
        if isinstance(conv, (nn.Conv2d, DeformConv)) and id(conv) not in offset_convs:
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, 0)


def select_features(
    input_shape: Dict[str, ShapeSpec], names: Sequence[str], key: str
) -> Dict[str, ShapeSpec]:
    """``input_shape`` (the backbone's ``output_shape()``) restricted to ``names``, in their
    order. A name the backbone does not output fails here, naming the config ``key`` and the
    features the backbone has."""
    missing = [name for name in names if name not in input_shape]
    if missing:
        raise ValueError(
            "MODEL.SOLOV2.{} names {}, which the backbone does not output (it has {})".format(
                key, ", ".join(missing), ", ".join(input_shape)
            )
        )
    return {name: input_shape[name] for name in names}


def check_in_channels_key(key: str, value: int, level_shapes: Dict[str, ShapeSpec]) -> None:
    """``MODEL.SOLOV2.INSTANCE_IN_CHANNELS`` / ``MASK_IN_CHANNELS`` must agree with the backbone.

    The heads take their input channels from the backbone's ``output_shape()``. The keys stay
    because AdelaiDet's YAMLs set them; they are checked rather than ignored because a YAML whose
    value disagrees was written for another backbone, and its head weights would not fit (which
    Detectron2's checkpointer reports only as a warning, leaving those weights random).
    """
    disagree = {name: s.channels for name, s in level_shapes.items() if s.channels != value}
    if disagree:
        raise ValueError(
            "MODEL.SOLOV2.{} is {}, but the backbone's {} have {} channels. The heads take "
            "their input channels from the backbone; the key is only checked (it exists for "
            "AdelaiDet's YAMLs): set it to the backbone's channels (MODEL.FPN.OUT_CHANNELS for "
            "the FPN).".format(
                key,
                value,
                ", ".join(disagree),
                ", ".join(str(c) for c in sorted(set(disagree.values()))),
            )
        )
