"""Normalized coordinate maps (CoordConv, Liu et al. 2018), used by both SOLOv2 heads."""

import torch


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
