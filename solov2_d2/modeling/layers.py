"""Small building blocks shared by both SOLOv2 heads: coordinate channels and conv blocks."""

from typing import List

import torch
from torch import nn


def append_coordinates(features: torch.Tensor) -> torch.Tensor:
    """Appends x and y channels, each ``linspace(-1, 1)`` over the map, to an (N, C, H, W) tensor.

    The x channel comes first, then y, as in the official implementation (the first conv's weights
    of a checkpoint depend on this order).
    """
    n, _, h, w = features.shape
    y = torch.linspace(-1, 1, h, device=features.device, dtype=features.dtype)
    x = torch.linspace(-1, 1, w, device=features.device, dtype=features.dtype)
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).unsqueeze(0).expand(n, -1, -1, -1)
    return torch.cat([features, coords], dim=1)


def conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, norm: str
) -> List[nn.Module]:
    """[conv, GroupNorm(32) if norm == "GN", ReLU]: the heads' basic block. A list, so that towers
    can be flat ``nn.Sequential``s whose indices match the official checkpoints' key names."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
    ]
    if norm == "GN":
        layers.append(nn.GroupNorm(32, out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


def init_conv_weights(module: nn.Module) -> None:
    """The official heads' init: every conv weight ~ N(0, 0.01), biases 0."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, 0)
