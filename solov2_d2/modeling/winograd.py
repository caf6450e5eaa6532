"""Winograd's minimal filtering F(2x2, 3x3) for the kernel head's towers (inference on the CPU).

A 3x3 convolution computes each 2x2 block of outputs from a 4x4 input tile with 36
multiplications per channel pair; Winograd's algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) needs 16: with ``d`` the tile, ``g`` the 3x3 filter,

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise over the 4 x 4 positions)

and the 16 positions' products summed over the input channels are 16 matrix products
(output channels x input channels) @ (input channels x tiles). B^T and A^T hold only 0 and +-1
(the input and output transforms are additions), G holds 0, +-1/2 and 1 and is applied to the
weights once, in float64, rounded once to float32.

Why the kernel head: its towers run 512 (R50) or 256 (Light) channels of 3x3 convolutions on
small S x S grids (12 to 40 cells a side) where the matrix products are large and the
transforms small; every level's tiles go into one product, since the towers' weights are shared
by the levels. On the large 1/4-scale maps of the FPN and the mask-feature head the transforms,
passes over 16 copies of the activations, cost more than the multiplications they save (the
README's Performance section has the measurements), so those convolutions stay direct.

Rounding differs from a direct convolution's (other sums in another order), by as much as
another direct implementation's: against a float64 reference the largest error of both is a few
1e-6 relative (``tests/test_winograd.py``). That is why it belongs to the opt-in fast path
(``optimize_for_inference``), never to the model as built.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WinogradConv2d", "is_winograd_eligible", "transform_weight", "winograd_conv3x3"]

# G of F(2x2, 3x3), interpolation points 0, 1, -1 and infinity.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def is_winograd_eligible(conv: nn.Module) -> bool:
    """A plain 3x3 convolution with stride 1, dilation 1, padding 1, no groups."""
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) filters -> (16, O, I): ``G g G^T`` at the 4 x 4 tile positions, row-major,
    computed in float64 and rounded once to the weight's dtype."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    transformed = torch.einsum("ak,oikl,bl->abo" + "i", g, weight.double(), g)
    return transformed.reshape(16, *weight.shape[:2]).to(weight.dtype).contiguous()


def _input_transform(x: torch.Tensor, tiles_h: int, tiles_w: int, out: torch.Tensor) -> None:
    """Writes ``B^T d B`` of every 4 x 4 tile (stride 2) of ``x`` (N, C, H, W), zero-padded by 1
    (the convolution's padding) and to whole tiles, into ``out`` (16, C, N * tiles_h * tiles_w):
    position, channel, tile."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 2 * tiles_w + 1 - w, 1, 2 * tiles_h + 1 - h))
    rows = [padded[:, :, i : i + 2 * tiles_h : 2] for i in range(4)]
    # B^T along the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    rows = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])
    # The same along the columns, each result written in place into its position's slice.
    targets = out.view(16, c, n, tiles_h, tiles_w).transpose(1, 2)  # (16, N, C, th, tw)
    for r, row in enumerate(rows):
        cols = [row[..., j : j + 2 * tiles_w : 2] for j in range(4)]
        torch.sub(cols[0], cols[2], out=targets[4 * r])
        torch.add(cols[1], cols[2], out=targets[4 * r + 1])
        torch.sub(cols[2], cols[1], out=targets[4 * r + 2])
        torch.sub(cols[1], cols[3], out=targets[4 * r + 3])


def _output_transform(
    products: torch.Tensor, n: int, tiles_h: int, tiles_w: int, out: torch.Tensor
) -> None:
    """Writes ``A^T m A`` of every tile of ``products`` (16, O, N * tiles) into ``out``
    (N, O, 2 tiles_h, 2 tiles_w)."""
    m = products.reshape(4, 4, -1, n, tiles_h, tiles_w)
    # A^T along the rows: m0 + m1 + m2, m1 - m2 - m3.
    top = m[0] + m[1] + m[2]
    bottom = m[1] - m[2] - m[3]
    # (O, N, th, 2, tw, 2): output pixel (2 i + a, 2 j + b) of tile (i, j) at [..., i, a, j, b].
    blocks = out.view(n, -1, tiles_h, 2, tiles_w, 2).transpose(0, 1)
    for a, rows in enumerate((top, bottom)):
        left, right = blocks[:, :, :, a, :, 0], blocks[:, :, :, a, :, 1]
        torch.add(rows[0], rows[1], out=left).add_(rows[2])
        torch.sub(rows[1], rows[2], out=right).sub_(rows[3])


def winograd_conv3x3(
    inputs: List[torch.Tensor], transformed: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> List[torch.Tensor]:
    """``F.conv2d(x, weight, bias, padding=1)`` for each (N, C, H, W) ``x`` of ``inputs`` by
    F(2x2, 3x3), all inputs' tiles in one batched matrix product. ``transformed``:
    ``transform_weight(weight)``. Outputs are contiguous (NCHW)."""
    shapes = []
    for x in inputs:
        n, _, h, w = x.shape
        shapes.append((n, h, w, -(-h // 2), -(-w // 2)))
    counts = [n * tiles_h * tiles_w for n, _, _, tiles_h, tiles_w in shapes]
    first = inputs[0]
    columns = first.new_empty(16, first.shape[1], sum(counts))
    start = 0
    for x, (_, _, _, tiles_h, tiles_w), count in zip(inputs, shapes, counts):
        _input_transform(x, tiles_h, tiles_w, columns[:, :, start : start + count])
        start += count
    products = torch.bmm(transformed, columns)
    outputs, start = [], 0
    for (n, h, w, tiles_h, tiles_w), count in zip(shapes, counts):
        y = products.new_empty(n, products.shape[1], 2 * tiles_h, 2 * tiles_w)
        _output_transform(products[:, :, start : start + count], n, tiles_h, tiles_w, y)
        if (2 * tiles_h, 2 * tiles_w) != (h, w):
            y = y[:, :, :h, :w].contiguous()
        if bias is not None:
            y.add_(bias.view(1, -1, 1, 1))
        outputs.append(y)
        start += count
    return outputs


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 ``nn.Conv2d`` for inference by ``winograd_conv3x3``: called with a list of
    feature maps (the levels that share the conv), returns the list of outputs; called with
    one tensor, its output. Keeps the conv's ``weight`` and ``bias``; the transformed weights
    are a non-persistent buffer computed once, so change the weights through a new module."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_winograd_eligible(conv):
            raise ValueError(f"WinogradConv2d needs a 3x3 stride-1 padding-1 conv, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = conv.weight
        self.bias = conv.bias
        with torch.no_grad():
            transformed = transform_weight(conv.weight.detach())
        self.register_buffer("transformed_weight", transformed, persistent=False)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return winograd_conv3x3([x], self.transformed_weight, self.bias)[0]
        return winograd_conv3x3(list(x), self.transformed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(2x2, 3x3)"
