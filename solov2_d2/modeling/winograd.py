"""Winograd's minimal filtering F(4x4, 3x3) for the fast path's wide 3x3 convolutions (CPU).

A 3x3 convolution computes each 4x4 block of outputs from a 6x6 input tile with 144
multiplications per channel pair; Winograd's algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) needs 36: with ``d`` the tile, ``g`` the 3x3 filter,

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise over the 6 x 6 positions)

and the 36 positions' products summed over the input channels are 36 matrix products
(tiles x input channels) @ (input channels x output channels). The interpolation points are
0, +-1, +-2 and infinity (Lavin & Gray's): B^T and A^T hold small integers (the transforms are
additions and multiplications by 2, 4, 5 and 8), G holds fractions and is applied to the weights
once, in float64, rounded once to float32. F(4x4, 3x3) was chosen over F(2x2, 3x3) (16
multiplications per 2x2 tile, 2.25 per output against 4) by measurement: R50-FPN at 800 x 1216
14% faster end to end, the same detections (README "Performance").

The activations are read and written channels-last (NHWC), the layout of the fast path, so
that every transform is a pass over contiguous channel vectors. The tiles go through in chunks
of a few MiB of transformed input: a whole 1/4-scale map's transforms at once are copies of the
activations far larger than the cache, and the passes over them cost more than the
multiplications saved (measured, README "Performance"); a chunk's transforms and product stay
in the cache. Small maps that share the weights (the kernel head's levels) share a chunk, so
their tiles go into one matrix product.

Where it pays is measured, not assumed (``fast.MIN_WINOGRAD_CHANNELS``): for convolutions with
at least 128 input and output channels (the FPN's output convs, the mask-feature head, ResNet's
res3 to res5, the kernel head); ResNet's 64-channel res2 is faster direct.

Rounding differs from a direct convolution's (other sums in another order, and G's fractions):
against a float64 reference the largest error is a few 1e-6 relative, a few times the direct
convolution's (``tests/test_winograd.py``). That is why it belongs to the fast path
(``optimize_for_inference``, the CPU inference copy), never to the model as built.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WinogradConv2d", "is_winograd_eligible", "transform_weight", "winograd_conv3x3"]

# G of F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity.
_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)
TILE, OUT = 6, 4  # input tile and output block sides
POSITIONS = TILE * TILE

# Transformed input per matrix product, bytes (36 positions x tiles x input channels x 4): a
# chunk whose transforms stay in this CPU's cache (2 x 1 MiB L2, 32 MiB L3), about 6 tile rows of
# a 256-channel 1/4-scale map; chunks of that order measured fastest, whole maps 2-3x slower.
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
    """(O, I, 3, 3) filters -> (36, I, O): ``G g G^T`` at the 6 x 6 tile positions, row-major,
    computed in float64 and rounded once to the weight's dtype."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    transformed = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)
    return (
        transformed.reshape(POSITIONS, weight.shape[1], weight.shape[0])
        .to(weight.dtype)
        .contiguous()
    )


def _transform_input_1d(d: List[torch.Tensor], out: List[torch.Tensor]) -> None:
    """``out = B^T d`` along one axis of the tiles: ``d`` the 6 tile rows (or columns) as views,
    ``out`` 6 tensors written in place. B^T of F(4x4, 3x3):

        [4  0 -5  0  1  0]     rows 1-4 share the sums d1 + d2, d3 + d4, d1 - d2, d4 - d3,
        [0 -4 -4  1  1  0]     d4 - d2 and d3 - d1.
        [0  4 -4 -1  1  0]
        [0 -2 -1  2  1  0]
        [0  2 -1 -2  1  0]
        [0  4  0 -5  0  1]
    """
    d0, d1, d2, d3, d4, d5 = d
    torch.add(d4, d0, alpha=4, out=out[0]).add_(d2, alpha=-5)
    torch.add(d3 + d4, d1 + d2, alpha=-4, out=out[1])
    torch.add(d4 - d3, d1 - d2, alpha=4, out=out[2])
    d42, d31 = d4 - d2, d3 - d1
    torch.add(d42, d31, alpha=2, out=out[3])
    torch.add(d42, d31, alpha=-2, out=out[4])
    torch.add(d5, d1, alpha=4, out=out[5]).add_(d3, alpha=-5)


def _transform_output_1d(m: List[torch.Tensor], out: List[torch.Tensor]) -> None:
    """``out = A^T m`` along one axis: ``m`` 6 tensors, ``out`` 4 written in place. A^T of
    F(4x4, 3x3):

        [1  1  1  1  1  0]
        [0  1 -1  2 -2  0]
        [0  1  1  4  4  0]
        [0  1 -1  8 -8  1]
    """
    m0, m1, m2, m3, m4, m5 = m
    s12, s34, d12, d34 = m1 + m2, m3 + m4, m1 - m2, m3 - m4
    torch.add(s12, s34, out=out[0]).add_(m0)
    torch.add(d12, d34, alpha=2, out=out[1])
    torch.add(s12, s34, alpha=4, out=out[2])
    torch.add(d12, d34, alpha=8, out=out[3]).add_(m5)


def _input_transform(padded: torch.Tensor, tiles_h: int, tiles_w: int, out: torch.Tensor) -> None:
    """Writes ``B^T d B`` of the 6 x 6 tiles (stride 4) of ``padded`` (N, 4 tiles_h + 2,
    4 tiles_w + 2, C; NHWC, zero-padded) into ``out`` (36, N, tiles_h, tiles_w, C)."""
    n, _, width, channels = padded.shape
    rows = padded.new_empty(TILE, n, tiles_h, width, channels)
    # Along the tile rows (every column at once), then along the columns of each result.
    _transform_input_1d([padded[:, i : i + OUT * tiles_h : OUT] for i in range(TILE)], list(rows))
    out = out.view(TILE, TILE, n, tiles_h, tiles_w, channels)
    for r in range(TILE):
        columns = [rows[r][:, :, j : j + OUT * tiles_w : OUT] for j in range(TILE)]
        _transform_input_1d(columns, list(out[r]))


def _output_transform(
    products: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor
) -> None:
    """Writes ``A^T m A`` (+ bias) of ``products`` (36, N, tiles_h, tiles_w, O) into ``out``
    (N, 4 tiles_h, 4 tiles_w, O; NHWC)."""
    m = products.unflatten(0, (TILE, TILE))
    n, tiles_h, tiles_w, channels = products.shape[1:]
    rows = products.new_empty(OUT, TILE, n, tiles_h, tiles_w, channels)
    for c in range(TILE):  # along the rows, column position by column position
        _transform_output_1d([m[r, c] for r in range(TILE)], [rows[a, c] for a in range(OUT)])
    # Output pixel (4 i + a, 4 j + b) of tile (i, j) at [:, i, a, j, b].
    blocks = out.view(n, tiles_h, OUT, tiles_w, OUT, channels)
    for a in range(OUT):
        _transform_output_1d(list(rows[a]), [blocks[:, :, a, :, b] for b in range(OUT)])
    if bias is not None:
        out.add_(bias)


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
    F(4x4, 3x3). ``transformed``: ``transform_weight(weight)``. Each output has its input's
    memory format (channels-last inputs, the fast path's, are the fast ones)."""
    channels, out_channels = transformed.shape[1:]
    padded, outputs, grids = [], [], []
    for x in inputs:
        n, _, h, w = x.shape
        tiles_h, tiles_w = -(-h // OUT), -(-w // OUT)
        nhwc = x.permute(0, 2, 3, 1)
        pad = (0, 0, 1, OUT * tiles_w + 1 - w, 1, OUT * tiles_h + 1 - h)
        padded.append(F.pad(nhwc, pad))
        outputs.append(x.new_empty(n, OUT * tiles_h, OUT * tiles_w, out_channels))
        grids.append((n, tiles_h, tiles_w))
    max_tiles = max(1, CHUNK_BYTES // (POSITIONS * channels * transformed.element_size()))
    for chunk in _chunks(grids, max_tiles):
        sizes = [grids[i][0] * (stop - start) * grids[i][2] for i, start, stop in chunk]
        columns = transformed.new_empty(POSITIONS, sum(sizes), channels)
        offset = 0
        for (index, start, stop), size in zip(chunk, sizes):
            n, _, tiles_w = grids[index]
            piece = columns[:, offset : offset + size].view(
                POSITIONS, n, stop - start, tiles_w, channels
            )
            rows = padded[index][:, OUT * start : OUT * stop + 2]
            _input_transform(rows, stop - start, tiles_w, piece)
            offset += size
        products = torch.bmm(columns, transformed)
        offset = 0
        for (index, start, stop), size in zip(chunk, sizes):
            n, _, tiles_w = grids[index]
            piece = products[:, offset : offset + size].view(
                POSITIONS, n, stop - start, tiles_w, -1
            )
            _output_transform(piece, bias, outputs[index][:, OUT * start : OUT * stop])
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
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(4x4, 3x3)"
