"""Training targets of SOLOv2: which grid cells own which instance, and the mask each must predict.

SOLO splits the image into an S x S grid per FPN level and makes a cell responsible for an instance
when the cell falls in the instance's "center region" (SOLO paper, Sec. 3.3.1 "Label Assignment",
reused unchanged by SOLOv2 Sec. 3): the box (cx, cy, sigma * w, sigma * h) around the mask's
center of mass, with sigma = 0.2. Each instance goes to the FPN levels whose scale range contains
sqrt(w * h), SOLO's FPN scale assignment. Every positive cell predicts the instance's mask at the
resolution of the unified mask feature (1/4 of the input, SOLOv2 Sec. 3.2).

The arithmetic below reproduces the official implementation bit for bit (cell indices through
Python's float floor division, mask targets through OpenCV's fixed-point bilinear resize), because
the positive set and the mask targets move AP. Everything is vectorized over instances and cells.
"""

from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["SOLOv2Targets", "assign_targets_single_image", "resize_masks_like_cv2"]

# OpenCV's bilinear resize of 8-bit images works in fixed point: interpolation weights are integers
# scaled by 2**11 (its INTER_RESIZE_COEF_BITS).
_CV2_COEF_BITS = 11
_CV2_COEF_SCALE = 1 << _CV2_COEF_BITS


class SOLOv2Targets(NamedTuple):
    """Targets of one image. Lists hold one entry per FPN level, in the order of ``num_grids``.

    category_targets: int64 (S*S,) per level; the class id of each cell, ``num_classes`` where the
        cell is background.
    positive_cells: int64 (P_l,) per level; flat cell index ``row * S + col`` of every
        (instance, cell) pair, ordered by instance (input order) then by cell (row-major). A cell
        covered by two instances appears once for each.
    positive_instances: int64 (P_l,) per level; for each entry of ``positive_cells``, the index of
        its instance, i.e. of its row in ``mask_targets``.
    mask_targets: uint8 (K, H_pad // mask_stride, W_pad // mask_stride); the 0/1 mask target of
        every input instance (empty or unassigned ones included) at mask-feature resolution.
    """

    category_targets: List[Tensor]
    positive_cells: List[Tensor]
    positive_instances: List[Tensor]
    mask_targets: Tensor


def _validate_inputs(
    gt_masks, gt_boxes, gt_classes, padded_size, num_grids, scale_ranges, num_classes, mask_stride
):
    if gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be (K, h, w), got shape {tuple(gt_masks.shape)}")
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must be (K, 4) x1,y1,x2,y2, got shape {tuple(gt_boxes.shape)}")
    if gt_classes.dim() != 1:
        raise ValueError(f"gt_classes must be (K,), got shape {tuple(gt_classes.shape)}")
    num_masks, num_boxes, num_labels = gt_masks.shape[0], gt_boxes.shape[0], gt_classes.shape[0]
    if not num_masks == num_boxes == num_labels:
        raise ValueError(
            "gt_masks, gt_boxes and gt_classes must describe the same instances, got "
            f"{num_masks} masks, {num_boxes} boxes and {num_labels} classes"
        )
    if gt_classes.is_floating_point() or gt_classes.dtype == torch.bool:
        raise ValueError(f"gt_classes must hold integer class ids, got dtype {gt_classes.dtype}")
    if num_labels > 0:
        lowest, highest = int(gt_classes.min()), int(gt_classes.max())
        if lowest < 0 or highest >= num_classes:
            raise ValueError(
                f"gt_classes must lie in [0, num_classes={num_classes}), got values in "
                f"[{lowest}, {highest}]"
            )
    if len(num_grids) != len(scale_ranges):
        raise ValueError(
            f"num_grids and scale_ranges must have one entry per FPN level, got "
            f"{len(num_grids)} grids and {len(scale_ranges)} scale ranges"
        )
    if len(padded_size) != 2:
        raise ValueError(f"padded_size must be (H_pad, W_pad), got {padded_size}")
    mask_height, mask_width = gt_masks.shape[1:]
    padded_height, padded_width = padded_size
    if padded_height < mask_height or padded_width < mask_width:
        raise ValueError(
            f"padded_size {tuple(padded_size)} is smaller than the masks' image size "
            f"({mask_height}, {mask_width})"
        )
    target_height, target_width = _downsampled_size(mask_height, mask_width, mask_stride)
    canvas_height, canvas_width = padded_height // mask_stride, padded_width // mask_stride
    if target_height > canvas_height or target_width > canvas_width:
        raise ValueError(
            f"masks of size ({mask_height}, {mask_width}) downsample to ({target_height}, "
            f"{target_width}), which does not fit the ({canvas_height}, {canvas_width}) mask "
            f"feature of padded_size {tuple(padded_size)}: pad to a multiple of {mask_stride}"
        )


def _downsampled_size(height: int, width: int, stride: int) -> Tuple[int, int]:
    # Rounded to nearest as the official code sizes its rescaled masks.
    return int(height / stride + 0.5), int(width / stride + 0.5)


def _cv2_linear_taps(in_size: int, out_size: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and fixed-point weights of OpenCV's INTER_LINEAR along one axis.

    Returns (first_index, second_index, first_weight, second_weight), each (out_size,), weights
    int32 on the 2**11 scale. Mirrors OpenCV: half-pixel centers computed in double and stored as
    float, edge samples clamped to the border pixel with full weight, weights rounded to nearest
    (ties to even) on the 2**11 scale.
    """
    scale = 1.0 / (out_size / in_size)  # OpenCV inverts the dsize / ssize ratio it derives
    positions = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5
    positions = positions.to(torch.float32)
    first_index = torch.floor(positions)
    fraction = positions - first_index
    first_index = first_index.to(torch.int64)
    before_start = first_index < 0
    past_end = first_index >= in_size - 1
    clamped = before_start | past_end
    fraction = torch.where(clamped, torch.zeros_like(fraction), fraction)
    first_index = first_index.clamp(0, in_size - 1)
    second_index = (first_index + 1).clamp(max=in_size - 1)
    first_weight = torch.round((1.0 - fraction) * _CV2_COEF_SCALE).to(torch.int32)
    second_weight = torch.round(fraction * _CV2_COEF_SCALE).to(torch.int32)
    return first_index, second_index, first_weight, second_weight


def resize_masks_like_cv2(masks: Tensor, out_height: int, out_width: int) -> Tensor:
    """Bilinear resize of binary masks, equal pixel for pixel to ``cv2.resize(INTER_LINEAR)``.

    masks: (K, h, w) bool or 0/1 integer. Returns uint8 (K, out_height, out_width) of 0/1.

    The official implementation builds mask targets with OpenCV on uint8 masks. A float bilinear
    resize (F.interpolate) disagrees with it on about 0.1% of the pixels of real-looking masks
    (a few % on noise), wherever the interpolated value sits near 0.5, because OpenCV rounds the
    weights to 11 bits and truncates partial sums. So this replays OpenCV's integer arithmetic:
    a horizontal pass ``sum = w0 * a + w1 * b`` (weights on the 2**11 scale), then a vertical pass
    ``((v0 * (sum0 >> 4)) >> 16) + ((v1 * (sum1 >> 4)) >> 16) + 2 >> 2``. Only the input rows that
    some output row samples go through the horizontal pass, and both passes gather two taps per
    output pixel, so no full-resolution integer or float copy of the masks is made.
    """
    num_masks, in_height, in_width = masks.shape
    device = masks.device
    if num_masks == 0 or out_height == 0 or out_width == 0:
        return torch.zeros((num_masks, out_height, out_width), dtype=torch.uint8, device=device)
    foreground = masks if masks.dtype == torch.bool else masks != 0

    top, bottom, top_weight, bottom_weight = _cv2_linear_taps(in_height, out_height, device)
    left, right, left_weight, right_weight = _cv2_linear_taps(in_width, out_width, device)
    zero = torch.zeros((), dtype=torch.int32, device=device)

    def horizontal_pass(rows: Tensor) -> Tensor:
        sums = torch.where(rows.index_select(2, left), left_weight, zero)
        sums += torch.where(rows.index_select(2, right), right_weight, zero)
        return sums

    top_sums = horizontal_pass(foreground.index_select(1, top))
    bottom_sums = horizontal_pass(foreground.index_select(1, bottom))
    top_term = (top_weight[:, None] * (top_sums >> 4)) >> 16
    bottom_term = (bottom_weight[:, None] * (bottom_sums >> 4)) >> 16
    return ((top_term + bottom_term + 2) >> 2).to(torch.uint8)


def _mass_centers(masks: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(center_y, center_x, pixel_count) of each (K, h, w) bool mask; centers float64 in pixels.

    The moments are summed exactly in integers and divided in float64, which equals the center of
    mass of the original SOLO/SOLOv2 code (scipy.ndimage, float64). AdelaiDet's port sums in
    float32, which drifts by a few ulps on large masks; that only matters for a center within
    those ulps of a cell boundary.
    """
    _, height, width = masks.shape
    device = masks.device
    # Counting through a uint8 view into int32 is several times faster than summing bools
    # (which go through int64); counts per row or column cannot overflow int32.
    as_bytes = masks.view(torch.uint8)
    row_counts = as_bytes.sum(dim=2, dtype=torch.int32).to(torch.int64)
    col_counts = as_bytes.sum(dim=1, dtype=torch.int32).to(torch.int64)
    pixel_count = row_counts.sum(dim=1)
    moment_y = (row_counts * torch.arange(height, device=device)).sum(dim=1)
    moment_x = (col_counts * torch.arange(width, device=device)).sum(dim=1)
    safe_count = pixel_count.clamp(min=1).to(torch.float64)
    center_y = moment_y.to(torch.float64) / safe_count
    center_x = moment_x.to(torch.float64) / safe_count
    return center_y, center_x, pixel_count


def _grid_cell(coords: Tensor, axis_length: int, num_grid: int) -> Tensor:
    """Cell index along one axis: ``int((coord / axis_length) // (1.0 / num_grid))``.

    Python's float floor division, not ``floor(coord * S / L)``: the official code uses ``//``,
    which differs on exact cell boundaries (e.g. ``0.5 // 0.1 == 4.0`` since the double 0.1 is
    slightly above 1/10). torch's floor rounding mode implements the same fmod-based rule on
    float64. The result may be negative or >= num_grid; callers clamp.
    """
    relative = coords / axis_length
    return torch.div(relative, 1.0 / num_grid, rounding_mode="floor").to(torch.int64)


def _center_region_pairs(center_y, center_x, half_height, half_width, upsampled_size, num_grid):
    """(cells, owners): every cell of each instance's center region, owners indexing the inputs.

    The region is the sigma-scaled box around the mass center, clipped to the grid and to the 3x3
    cells around the center cell (SOLO Sec. 3.3.1), so each instance enumerates the 3x3
    neighbourhood of its center cell and keeps the cells inside its region.
    """
    upsampled_height, upsampled_width = upsampled_size
    last = num_grid - 1
    center_row = _grid_cell(center_y, upsampled_height, num_grid)
    center_col = _grid_cell(center_x, upsampled_width, num_grid)
    top = _grid_cell(center_y - half_height, upsampled_height, num_grid).clamp(min=0)
    bottom = _grid_cell(center_y + half_height, upsampled_height, num_grid).clamp(max=last)
    left = _grid_cell(center_x - half_width, upsampled_width, num_grid).clamp(min=0)
    right = _grid_cell(center_x + half_width, upsampled_width, num_grid).clamp(max=last)

    # Enumerating only the 3x3 neighbourhood of the center cell is the official clip of the
    # region to center +- 1 cell; a cell is positive if it also lies in the clipped sigma box.
    offsets = torch.arange(-1, 2, device=center_y.device)
    rows = (center_row[:, None] + offsets)[:, :, None]  # (N, 3, 1)
    cols = (center_col[:, None] + offsets)[:, None, :]  # (N, 1, 3)
    inside = (
        (rows >= top[:, None, None])
        & (rows <= bottom[:, None, None])
        & (cols >= left[:, None, None])
        & (cols <= right[:, None, None])
    )
    # Boolean indexing walks (instance, row, col) in order: pairs come out grouped by instance
    # and row-major within it, as the official double loop appends them.
    cells = (rows * num_grid + cols)[inside]
    owners = torch.arange(center_y.shape[0], device=center_y.device)[:, None, None]
    owners = owners.expand_as(inside)[inside]
    return cells, owners


def _category_grid(cells: Tensor, instance_classes: Tensor, num_grid: int, num_classes: int):
    """(S*S,) class of each cell: the last pair covering a cell wins, as the official code paints
    instances one after another; background is ``num_classes``."""
    device = cells.device
    last_pair = torch.full((num_grid * num_grid,), -1, dtype=torch.int64, device=device)
    pair_order = torch.arange(cells.shape[0], dtype=torch.int64, device=device)
    last_pair.scatter_reduce_(0, cells, pair_order, reduce="amax")
    categories = torch.full((num_grid * num_grid,), num_classes, dtype=torch.int64, device=device)
    covered = last_pair >= 0
    categories[covered] = instance_classes[last_pair[covered]]
    return categories


def assign_targets_single_image(
    gt_masks: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    padded_size: Sequence[int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Tuple[float, float]],
    sigma: float,
    num_classes: int,
    mask_stride: int = 4,
) -> SOLOv2Targets:
    """SOLOv2 category and mask targets of one image.

    Args:
        gt_masks: (K, h, w) bool or 0/1 masks at the (unpadded, transformed) image size.
        gt_boxes: (K, 4) float x1, y1, x2, y2 in input pixels.
        gt_classes: (K,) int64 class ids in [0, num_classes).
        padded_size: (H_pad, W_pad) of the batch tensor, >= (h, w), a multiple of 32 in practice.
        num_grids: S of each FPN level.
        scale_ranges: (lower, upper) sqrt(box area) range of each level, both ends inclusive.
        sigma: center-region scale (0.2 in the paper).
        num_classes: number of categories; also the background label.
        mask_stride: stride of the mask feature relative to the input.

    Returns:
        SOLOv2Targets, all tensors on the device of ``gt_masks``.
    """
    _validate_inputs(
        gt_masks,
        gt_boxes,
        gt_classes,
        padded_size,
        num_grids,
        scale_ranges,
        num_classes,
        mask_stride,
    )
    device = gt_masks.device
    gt_boxes = gt_boxes.to(device)
    gt_classes = gt_classes.to(device=device, dtype=torch.int64)
    masks = gt_masks if gt_masks.dtype == torch.bool else gt_masks != 0
    padded_height, padded_width = int(padded_size[0]), int(padded_size[1])
    mask_height, mask_width = masks.shape[1:]

    # Box size terms stay in the boxes' dtype (float32), as in the official code; only the cell
    # arithmetic below is lifted to float64.
    box_widths = gt_boxes[:, 2] - gt_boxes[:, 0]
    box_heights = gt_boxes[:, 3] - gt_boxes[:, 1]
    # Objects outside all ranges are clamped into them, so that they train the first or last level
    # instead of being silently dropped (the official code drops them; with its COCO ranges
    # ending at 2048 that never happens, but custom ranges and huge inputs hit it).
    smallest = min(lower for lower, _ in scale_ranges)
    largest = max(upper for _, upper in scale_ranges)
    scales = torch.sqrt(box_widths * box_heights).clamp(smallest, largest)
    half_widths = (0.5 * box_widths * sigma).to(torch.float64)
    half_heights = (0.5 * box_heights * sigma).to(torch.float64)
    center_y, center_x, pixel_count = _mass_centers(masks)
    # Empty masks (e.g. cropped away by augmentation) have no center: they get no cell.
    non_empty = pixel_count > 0

    # The grid covers the mask feature upsampled back to input resolution, i.e. the padded image.
    upsampled_size = (
        padded_height // mask_stride * mask_stride,
        padded_width // mask_stride * mask_stride,
    )
    category_targets, positive_cells, positive_instances = [], [], []
    for num_grid, (lower, upper) in zip(num_grids, scale_ranges):
        # Inclusive at both ends: with overlapping ranges an instance trains two levels.
        assigned = non_empty & (scales >= lower) & (scales <= upper)
        instances = torch.nonzero(assigned).flatten()
        cells, owners = _center_region_pairs(
            center_y[instances],
            center_x[instances],
            half_heights[instances],
            half_widths[instances],
            upsampled_size,
            num_grid,
        )
        pair_instances = instances[owners]
        category_targets.append(
            _category_grid(cells, gt_classes[pair_instances], num_grid, num_classes)
        )
        positive_cells.append(cells)
        positive_instances.append(pair_instances)

    target_height, target_width = _downsampled_size(mask_height, mask_width, mask_stride)
    resized = resize_masks_like_cv2(masks, target_height, target_width)
    mask_targets = torch.zeros(
        (masks.shape[0], padded_height // mask_stride, padded_width // mask_stride),
        dtype=torch.uint8,
        device=device,
    )
    # Padding lies bottom-right, so the image's mask occupies the top-left corner of the feature.
    mask_targets[:, :target_height, :target_width] = resized
    return SOLOv2Targets(category_targets, positive_cells, positive_instances, mask_targets)
