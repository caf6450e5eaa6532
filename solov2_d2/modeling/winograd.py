"""Winograd's minimal filtering F(2x2, 3x3) for the fast path's wide 3x3 convolutions (CPU).

A 3x3 convolution computes each 2x2 block of outputs from a 4x4 input tile with 36
multiplications per channel pair; Winograd's algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) needs 16: with ``d`` the tile, ``g`` the 3x3 filter,

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise over the 4 x 4 positions)

and the 16 positions' products summed over the input channels are 16 matrix products
(tiles x input channels) @ (input channels x output channels). B^T and A^T hold only 0 and +-1
(the input and output transforms are additions), G holds 0, +-1/2 and 1 and is applied to the
weights once, in float64, rounded once to float32.

The activations are read and written channels-last (NHWC), the layout of the fast path, so
that every transform is a pass over contiguous channel vectors. The tiles go through in chunks
of a few MiB of transformed input: a whole 1/4-scale map's transforms at once are four copies
of the activations, far larger than the cache, and the passes over them cost more than the
multiplications saved (measured, README "Performance"); a chunk's transforms and product stay
in the cache. Small maps that share the weights (the kernel head's levels) share a chunk, so
their tiles go into one matrix product.

Where it pays is measured, not assumed: for convolutions with at least 256 input and output
channels (the FPN's output convs, ResNet's res4 and res5, the kernel head). Narrower ones (the
mask-feature head's 128-channel outputs, res2 and res3) are as fast or faster direct.

Rounding differs from a direct convolution's (other sums in another order), by as much as
another direct implementation's: against a float64 reference the largest error of both is a few
1e-6 relative (``tests/test_winograd.py``). That is why it belongs to the fast path
(``optimize_for_inference``), never to the model as built.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WinogradConv2d", "is_winograd_eligible", "transform_weight", "winograd_conv3x3"]

# G of F(2x2, 3x3), interpolation points 0, 1, -1 and infinity.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

# Transformed input per matrix product, bytes (16 positions x tiles x input channels x 4): the
# chunk whose transforms stay in this CPU's cache (2 x 1 MiB L2, 32 MiB L3); 4-32 MiB measured
# within noise of each other, whole maps 2-3x slower.
CHUNK_BYTES = 16 << 20


def is_winograd_eligible(conv: nn.Module) -> bool:
    """A 3x3 convolution with stride 1, dilation 1, padding 1, no groups: ``nn.Conv2d`` or
    Detectron2's ``Conv2d`` (whose ``norm`` and ``activation`` then follow)."""
    from detectron2.layers import Conv2d as D2Conv2d

    return (
        type(conv) in (nn.Conv2d, D2Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) filters -> (16, I, O): ``G g G^T`` at the 4 x 4 tile positions, row-major,
    computed in float64 and rounded once to the weight's dtype."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    transformed = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)
    return transformed.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _input_transform(padded: torch.Tensor, tiles_h: int, tiles_w: int, out: torch.Tensor) -> None:
    """Writes ``B^T d B`` of the 4 x 4 tiles (stride 2) of ``padded`` (N, 2 tiles_h + 2,
    2 tiles_w + 2, C; NHWC, zero-padded) into ``out`` (16, N, tiles_h, tiles_w, C)."""
    rows = [padded[:, i : i + 2 * tiles_h : 2] for i in range(4)]
    # B^T along the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    rows = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])
    # The same along the columns, each result written into its position's slice.
    for r, row in enumerate(rows):
        cols = [row[:, :, j : j + 2 * tiles_w : 2] for j in range(4)]
        torch.sub(cols[0], cols[2], out=out[4 * r])
        torch.add(cols[1], cols[2], out=out[4 * r + 1])
        torch.sub(cols[2], cols[1], out=out[4 * r + 2])
        torch.sub(cols[1], cols[3], out=out[4 * r + 3])


def _output_transform(
    products: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor
) -> None:
    """Writes ``A^T m A`` (+ bias) of ``products`` (16, N, tiles_h, tiles_w, O) into ``out``
    (N, 2 tiles_h, 2 tiles_w, O; NHWC)."""
    m = products.unflatten(0, (4, 4))
    # A^T along the rows: m0 + m1 + m2, m1 - m2 - m3.
    top = m[0] + m[1]
    top.add_(m[2])
    bottom = m[1] - m[2]
    bottom.sub_(m[3])
    if bias is not None:  # column 1 enters all four outputs of a tile with coefficient +1
        top[1].add_(bias)
        bottom[1].add_(bias)
    n, tiles_h, tiles_w, channels = products.shape[1:]
    # Output pixel (2 i + a, 2 j + b) of tile (i, j) at [:, i, a, j, b].
    blocks = out.view(n, tiles_h, 2, tiles_w, 2, channels)
    for a, rows in enumerate((top, bottom)):
        left, right = blocks[:, :, a, :, 0], blocks[:, :, a, :, 1]
        torch.add(rows[0], rows[1], out=left).add_(rows[2])
        torch.sub(rows[1], rows[2], out=right).sub_(rows[3])


def _chunks(tile_grids: List[Tuple[int, int, int]], max_tiles: int):
    """Groups (input, first tile row, last tile row + 1) pieces of the inputs' tile grids
    ((N, tiles_h, tiles_w) each) into chunks of at most ``max_tiles`` tiles (a piece holds at
    least one row of tiles); consecutive small inputs share a chunk."""
    chunk, size = [], 0
    for index, (n, tiles_h, tiles_w) in enumerate(tile_grids):
        row_tiles = n * tiles_w
        rows_per_piece = max(1, max_tiles // row_tiles)
        for start in range(0, tiles_h, rows_per_piece):
            stop = min(tiles_h, start + rows_per_piece)
            tiles = (stop - start) * row_tiles
            if chunk and size + tiles > max_tiles:
                yield chunk
                chunk, size = [], 0
            chunk.append((index, start, stop))
            size += tiles
    if chunk:
        yield chunk


def winograd_conv3x3(
    inputs: List[torch.Tensor], transformed: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> List[torch.Tensor]:
    """``F.conv2d(x, weight, bias, padding=1)`` for each (N, C, H, W) ``x`` of ``inputs`` by
    F(2x2, 3x3). ``transformed``: ``transform_weight(weight)``. Each output has its input's
    memory format (channels-last inputs, the fast path's, are the fast ones)."""
    channels, out_channels = transformed.shape[1:]
    padded, outputs, grids = [], [], []
    for x in inputs:
        n, _, h, w = x.shape
        tiles_h, tiles_w = -(-h // 2), -(-w // 2)
        nhwc = x.permute(0, 2, 3, 1)
        padded.append(F.pad(nhwc, (0, 0, 1, 2 * tiles_w + 1 - w, 1, 2 * tiles_h + 1 - h)))
        outputs.append(x.new_empty(n, 2 * tiles_h, 2 * tiles_w, out_channels))
        grids.append((n, tiles_h, tiles_w))
    max_tiles = max(1, CHUNK_BYTES // (16 * channels * transformed.element_size()))
    for chunk in _chunks(grids, max_tiles):
        sizes = [grids[i][0] * (stop - start) * grids[i][2] for i, start, stop in chunk]
        columns = transformed.new_empty(16, sum(sizes), channels)
        offset = 0
        for (index, start, stop), size in zip(chunk, sizes):
            n, _, tiles_w = grids[index]
            piece = columns[:, offset : offset + size].view(16, n, stop - start, tiles_w, channels)
            _input_transform(
                padded[index][:, 2 * start : 2 * stop + 2], stop - start, tiles_w, piece
            )
            offset += size
        products = torch.bmm(columns, transformed)
        offset = 0
        for (index, start, stop), size in zip(chunk, sizes):
            n, _, tiles_w = grids[index]
            piece = products[:, offset : offset + size].view(16, n, stop - start, tiles_w, -1)
            _output_transform(piece, bias, outputs[index][:, 2 * start : 2 * stop])
            offset += size
    results = []
    for x, y in zip(inputs, outputs):
        y = y[:, : x.shape[2], : x.shape[3]].permute(0, 3, 1, 2)
        if x.is_contiguous(memory_format=torch.channels_last):
            results.append(y.contiguous(memory_format=torch.channels_last))
        else:
            results.append(y.contiguous())
    return results


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 convolution for inference by ``winograd_conv3x3``: called with a list of
    feature maps (the levels that share the conv), returns the list of outputs; called with
    one tensor, its output. Keeps the conv's ``weight``, ``bias`` and, for Detectron2's
    ``Conv2d``, its ``norm`` and ``activation`` (applied after, as there); the transformed
    weights are a non-persistent buffer computed once, so change the weights through a new
    module."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_winograd_eligible(conv):
            raise ValueError(f"WinogradConv2d needs a 3x3 stride-1 padding-1 conv, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = conv.weight
        self.bias = conv.bias
        self.norm = getattr(conv, "norm", None)
        self.activation = getattr(conv, "activation", None)
        with torch.no_grad():
            transformed = transform_weight(conv.weight.detach())
        self.register_buffer("transformed_weight", transformed, persistent=False)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def forward(self, x):
        single = isinstance(x, torch.Tensor)
        outputs = winograd_conv3x3([x] if single else list(x), self.transformed_weight, self.bias)
        outputs = [self._finish(y) for y in outputs]
        return outputs[0] if single else outputs

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(2x2, 3x3)"
